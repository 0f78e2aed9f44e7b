"""What a run produced and where to look at it: the summary `gen2embed run` prints and the
flow logs to Prefect (a run started from the UI shows the same table, losses and scores)."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect.logging.handlers import APILogHandler

from tasks.tracking import DB_FILE, mlflow_ui_url

UP_PREFECT = "http://127.0.0.1:4200"  # where `gen2embed up` serves the UIs by default
UP_MLFLOW = "http://127.0.0.1:5000"


def run_summary(
    paths: dict[str, str],
    workdir: Path,
    *,
    tracking_uri: str | None = None,
    experiment_id: str | None = None,
) -> str:
    """What a run produced and where to look at it. With `experiment_id`, the MLflow link
    opens the experiment's pipeline runs in MLflow's model-training view, at the tracking
    server when `tracking_uri` is one, else where `gen2embed up` serves it."""
    from embedder.artifacts import MANIFEST, Manifest

    lines = ["", "Published stage folders:"]
    summaries, warnings = [], []
    report = paths.pop("report", None)
    for stage, path in paths.items():
        manifest = Manifest.from_json((Path(path) / MANIFEST).read_text())
        rows = ", ".join(f"{k} {v:,}" for k, v in manifest.rows.items() if ":" not in k)
        lines.append(f"  {stage:32s} {path}" + (f"  ({rows})" if rows else ""))
        if manifest.info.get("summary"):
            summaries += ["", *manifest.info["summary"]]
        warnings += [f"  {stage}: {w}" for w in manifest.info.get("warnings", [])]
    lines += summaries
    if report is not None:
        table = (Path(report) / "report.md").read_text().split("```")[1].strip("\n")
        lines += [
            "",
            "The table (P@1 as MMEB scores it; strict P@1 and ties beside):",
            table,
            f"Report: {Path(report) / 'report.md'}",
        ]
    if warnings:
        lines += ["", "WARNINGS (also tagged gen2embed.warnings on the MLflow runs):", *warnings]
    served = bool(tracking_uri and tracking_uri.startswith("http"))
    base = tracking_uri if served and tracking_uri else UP_MLFLOW
    mlflow_link = mlflow_ui_url(base, experiment_id) if experiment_id else base
    lines += ["", f"MLflow runs:  {tracking_uri or f'sqlite:///{workdir / DB_FILE}'}"]
    if not served:
        lines += [
            f"Prefect state: {workdir / 'prefect'}",
            "Open the UIs: `make up` (or `gen2embed up --workdir ...`), then",
            f"  Prefect {UP_PREFECT}",
        ]
    lines.append(f"  MLflow {mlflow_link}")
    return "\n".join(lines)


def log_to_prefect(text: str) -> None:
    """Log `text` on the current flow run in Prefect only (the run's Logs tab): the terminal
    of `gen2embed run` prints it itself, once, without a log prefix on every line."""
    logger = logging.getLogger("gen2embed.summary")
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        logger.addHandler(APILogHandler())
        logger.propagate = False
        logger.setLevel(logging.INFO)
    logger.info(text)
    for handler in logger.handlers:  # sent before the flow run reports its end
        handler.flush()
