"""Prefect tasks: one per stage (stages.py), each an embedder function made a cached,
published, tracked step by the one stage contract (contract.py); MLflow in tracking.py."""
