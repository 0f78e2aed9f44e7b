"""The code of every registered gen2embed model (MLflow "models from code"): MLflow copies
this file into the model folder and runs it on load. The model itself: tasks.pyfunc_model."""

from mlflow.models import set_model

from tasks.pyfunc_model import EmbedderModel

set_model(EmbedderModel())
