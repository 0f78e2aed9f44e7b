"""Prefect tasks: one per stage (stages.py), each an embedder function made a cached,
published, tracked step by the stage contract (stage.py, execute.py, pipeline_run.py and
their neighbours; the module map is in docs/design.md); MLflow in tracking.py."""
