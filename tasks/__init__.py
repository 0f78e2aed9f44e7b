"""Prefect tasks: one per stage, each a thin wrapper over one embedder function.

`stage.py` is the one place that knows caching, publishing, retries and MLflow logging.
"""
