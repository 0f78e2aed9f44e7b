"""The MLflow record of one stage: the run it computes in, what that run holds once the
folder is published, and the short run a cache hit gets.

Every stage run carries the same tags (`stage_tags`): the stage, its fingerprint, its table
row, the Prefect flow run when there is one; a run with no parent (the torchrun job's)
carries the source (commit, host) itself, as the pipeline's parent run does for its stages.
"""

from __future__ import annotations

import logging
from pathlib import Path

from embedder.artifacts import Manifest
from embedder.outputs import StageOutput
from tasks.tracking import Tracker, source_tags

log = logging.getLogger("gen2embed.stage")

REPORT_SUFFIXES = {".png", ".md", ".json"}
REPORT_MAX_BYTES = 5 * 1024 * 1024


def stage_tags(
    stage: str,
    fp: str,
    *,
    row: str | None,
    flow_run_id: str,
    parent_run_id: str | None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The tags of a stage's MLflow run (names under `gen2embed.` and `prefect.`)."""
    tags = {"gen2embed.stage": stage, "gen2embed.fingerprint": fp}
    if row is not None:
        tags["gen2embed.row"] = row
    if flow_run_id:
        tags["prefect.flow_run_id"] = flow_run_id
    if parent_run_id is None:
        tags.update(source_tags())
    return {**tags, **(extra or {})}


def track_published(tracker: Tracker, run_id: str, manifest: Manifest, output: StageOutput) -> None:
    """What a stage's MLflow run records once its folder (`output.folder`) is published:
    metrics, row counts, per-step curves, small folders (an adapter), the manifest, reports
    and plots (top-level .png/.md/.json up to 5 MiB), the folder's path and warnings."""
    published = output.folder
    tracker.log_metrics(run_id, manifest.metrics)
    tracker.log_metrics(run_id, {f"rows.{k}": v for k, v in manifest.rows.items()})
    tracker.log_curves(run_id, output.curves())
    for folder in output.tracked_folders():
        tracker.log_folder(run_id, folder)
    tracker.log_json(run_id, manifest.__dict__, "manifest.json")
    for rel, entry in manifest.files.items():
        # Top-level reports and plots travel to MLflow; tables, shards and weights stay,
        # referenced by the folder path tag.
        report = "/" not in rel and Path(rel).suffix in REPORT_SUFFIXES
        if report and entry["size"] <= REPORT_MAX_BYTES:
            tracker.log_file(run_id, published / rel)
    tracker.set_tags(run_id, {"gen2embed.path": str(published), **warning_tags(manifest)})


def record_cached(
    tracker: Tracker, manifest: Manifest, name: str, tags: dict[str, str], parent_run_id: str | None
) -> str:
    """A cache hit still gets a (short) run, tagged `cached`, pointing at the run that made
    the folder (`gen2embed.source_run`); returns its id."""
    cached = {
        **tags,
        "gen2embed.cached": "true",
        "gen2embed.source_run": str(manifest.info.get("mlflow_run_id", "")),
    }
    with tracker.run(
        name, parent_run_id=parent_run_id, tags=cached, params=manifest.config
    ) as run_id:
        tracker.log_metrics(run_id, manifest.metrics)
        tracker.log_metrics(run_id, {f"rows.{k}": v for k, v in manifest.rows.items()})
        tracker.set_tags(run_id, warning_tags(manifest))
    return run_id


def warning_tags(manifest: Manifest) -> dict[str, str]:
    """The stage's warnings, logged once more and joined into the `gen2embed.warnings` tag."""
    warnings = manifest.info.get("warnings", [])
    for warning in warnings:
        log.warning("%s: %s", manifest.stage, warning)
    return {"gen2embed.warnings": " | ".join(warnings)[:5000]} if warnings else {}
