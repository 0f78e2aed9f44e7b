"""The stage contract under Prefect: the single place that turns an embedder function into a
cached, published, tracked Prefect task.

- Cache key = the stage's fingerprint (embedder.artifacts), so Prefect shows hits as Cached
  across runs; a published folder that fails verification is recomputed, never trusted.
- Output is written into `<fingerprint>.partial/` and published atomically with a manifest;
  the task returns only a small pointer, never the data.
- Retries only for transient errors (I/O hiccups, timeouts), never for bad data.
- One nested MLflow run per stage (params = config section, metrics, manifest artifact, tags
  linking the Prefect flow run) and a Prefect markdown artifact summarising the stage.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.context import get_run_context
from prefect.states import State

from embedder.artifacts import ArtifactStore, Manifest, StageOutput, fingerprint
from embedder.config import PipelineConfig
from tasks.tracking import Tracker

log = logging.getLogger("gen2embed.stage")

REPORT_SUFFIXES = {".png", ".md", ".json"}
REPORT_MAX_BYTES = 5 * 1024 * 1024


@dataclass(frozen=True)
class StageDef:
    """How one embedder function becomes a pipeline stage."""

    name: str
    code_version: str
    # Config sections the stage reads: they enter its fingerprint and its MLflow params.
    sections: tuple[str, ...]
    # Upstream stages whose published folders this stage reads, given the config.
    upstream: Callable[[PipelineConfig], tuple[str, ...]]
    compute: Callable[[PipelineConfig, Path, Mapping[str, Path]], StageOutput]
    # Extra fingerprint inputs beyond upstream fingerprints (e.g. source files for ingest).
    inputs: Callable[[PipelineConfig, Mapping[str, str]], dict[str, str]] = (
        lambda _config, _upstream: {}
    )
    enabled: Callable[[PipelineConfig], bool] = lambda _config: True
    # Long stages resume inside their partial folder; others start it afresh.
    resumable: bool = False

    def config_of(self, config: PipelineConfig) -> dict[str, Any]:
        """The part of the config this stage depends on, as plain JSON."""
        return {s: config.section(s).model_dump(mode="json") for s in self.sections}


@dataclass(frozen=True)
class PlannedStage:
    name: str
    fingerprint: str
    inputs: dict[str, str]
    upstream: tuple[str, ...]
    path: Path
    cached: bool
    problems: tuple[str, ...]


def plan_stages(
    config: PipelineConfig, store: ArtifactStore, stages: list[StageDef]
) -> list[PlannedStage]:
    """Fingerprint every enabled stage without running anything: fingerprints depend only on
    config, sources and upstream fingerprints, so the whole chain is known up front."""
    fps: dict[str, str] = {}
    planned = []
    for stage in stages:
        if not stage.enabled(config):
            continue
        upstream = stage.upstream(config)
        upstream_fps = {name: fps[name] for name in upstream}
        inputs = {**upstream_fps, **stage.inputs(config, upstream_fps)}
        fp = fingerprint(stage.name, stage.config_of(config), inputs, stage.code_version)
        fps[stage.name] = fp
        problems = tuple(store.verify(stage.name, fp))
        planned.append(
            PlannedStage(
                stage.name, fp, inputs, upstream, store.path(stage.name, fp), not problems, problems
            )
        )
    return planned


TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ESTALE, errno.EINTR}


def is_transient(exc: BaseException) -> bool:
    """Errors worth a retry: the network or the filesystem hiccupped. Bad data, bad config
    and bugs fail at once."""
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


def _retry_only_transient(_task: Any, _task_run: Any, state: State) -> bool:
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return False


def _cache_key(_context: Any, parameters: dict[str, Any]) -> str:
    return f"{parameters['stage']}-{parameters['fingerprint']}"


def _flow_run_id() -> str:
    ctx = get_run_context()
    flow_run = getattr(ctx, "flow_run", None)
    if flow_run is None:
        task_run = getattr(ctx, "task_run", None)
        return str(getattr(task_run, "flow_run_id", "") or "")
    return str(flow_run.id)


def summary_markdown(manifest: Manifest, path: Path, *, cached: bool, run_url: str | None) -> str:
    lines = [
        f"# Stage `{manifest.stage}` {'(cached)' if cached else ''}",
        "",
        f"- fingerprint: `{manifest.fingerprint}`",
        f"- folder: `{path}`",
        f"- code version: `{manifest.code_version}`",
    ]
    if run_url:
        lines.append(f"- MLflow run: [{run_url}]({run_url})")
    if manifest.rows:
        lines += ["", "| table | rows |", "|---|---:|"]
        lines += [f"| {k} | {v:,} |" for k, v in manifest.rows.items()]
    if manifest.metrics:
        lines += ["", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:,.4g} |" for k, v in manifest.metrics.items()]
    return "\n".join(lines)


def _publish_summary(
    manifest: Manifest, path: Path, tracker: Tracker, run_id: str, *, cached: bool
) -> None:
    url = tracker.run_url(run_id)
    key = f"{manifest.stage}-summary".lower().replace("_", "-")
    create_markdown_artifact(
        markdown=summary_markdown(manifest, path, cached=cached, run_url=url),
        key=key,
        description=f"{manifest.stage} stage, fingerprint {manifest.fingerprint}",
    )
    if url:
        create_link_artifact(link=url, link_text=f"MLflow run of {manifest.stage}")


def execute_stage(
    stage: StageDef,
    *,
    config: PipelineConfig,
    fingerprint_: str,
    inputs: Mapping[str, str],
    upstream_paths: Mapping[str, Path],
    store: ArtifactStore,
    tracker: Tracker,
    parent_run_id: str | None,
    recompute: bool,
) -> Manifest:
    """Compute (or reuse) one stage's published folder; the body of every stage task.
    The caller holds the folder's lock (`ArtifactStore.lock`)."""
    params = stage.config_of(config)
    if not recompute:
        existing = store.load(stage.name, fingerprint_)
        if existing is not None:
            # Prefect had no cache record (a new Prefect home), or another run published it
            # while this one waited for the lock: the folder is good, reuse it.
            log.info("%s: reusing published %s", stage.name, store.path(stage.name, fingerprint_))
            log_cached_run(
                stage.name, existing, tracker, parent_run_id, store.path(stage.name, fingerprint_)
            )
            return existing
    flow_run_id = _flow_run_id()
    tags = {
        "gen2embed.stage": stage.name,
        "gen2embed.fingerprint": fingerprint_,
        "prefect.flow_run_id": flow_run_id,
    }
    with tracker.run(stage.name, parent_run_id=parent_run_id, tags=tags, params=params) as run_id:
        partial = store.open_partial(
            stage.name, fingerprint_, fresh=recompute or not stage.resumable
        )
        log.info("%s: computing into %s", stage.name, partial)
        output = stage.compute(config, partial, upstream_paths)
        output = StageOutput(
            rows=output.rows,
            metrics=output.metrics,
            info={**output.info, "mlflow_run_id": run_id, "prefect_flow_run_id": flow_run_id},
        )
        manifest = store.publish(
            stage.name,
            fingerprint_,
            code_version=stage.code_version,
            config=params,
            inputs=inputs,
            output=output,
        )
        tracker.log_metrics(run_id, manifest.metrics)
        tracker.log_metrics(run_id, {f"rows.{k}": v for k, v in manifest.rows.items()})
        tracker.log_json(run_id, manifest.__dict__, "manifest.json")
        published = store.path(stage.name, fingerprint_)
        for rel, entry in manifest.files.items():
            # Top-level reports and plots travel to MLflow; tables, shards and weights stay,
            # referenced by the folder path tag.
            top_level = "/" not in rel
            if (
                top_level
                and Path(rel).suffix in REPORT_SUFFIXES
                and entry["size"] <= REPORT_MAX_BYTES
            ):
                tracker.log_file(run_id, published / rel)
        tracker.set_tags(run_id, {"gen2embed.path": str(store.path(stage.name, fingerprint_))})
        _publish_summary(
            manifest, store.path(stage.name, fingerprint_), tracker, run_id, cached=False
        )
    return manifest


def log_cached_run(
    stage: str, manifest: Manifest, tracker: Tracker, parent_run_id: str | None, path: Path
) -> None:
    """A cache hit still gets a (short) run, tagged `cached`, pointing at the run that made it."""
    with tracker.run(
        stage,
        parent_run_id=parent_run_id,
        tags={
            "gen2embed.stage": stage,
            "gen2embed.fingerprint": manifest.fingerprint,
            "gen2embed.cached": "true",
            "gen2embed.source_run": str(manifest.info.get("mlflow_run_id", "")),
        },
        params=manifest.config,
    ) as run_id:
        tracker.log_metrics(run_id, manifest.metrics)
        tracker.log_metrics(run_id, {f"rows.{k}": v for k, v in manifest.rows.items()})
        _publish_summary(manifest, path, tracker, run_id, cached=True)


def _run_stage_task(
    stage: str,
    fingerprint: str,
    config: dict[str, Any],
    inputs: dict[str, str],
    upstream_paths: dict[str, str],
    workdir: str,
    tracking_uri: str,
    parent_run_id: str | None,
    recompute: bool,
) -> dict[str, str]:
    """The task body. Parameters are plain JSON so Prefect can record and show them."""
    store = ArtifactStore(workdir)
    with store.lock(stage, fingerprint):
        manifest = execute_stage(
            STAGE_BY_NAME[stage],
            config=PipelineConfig.model_validate(config),
            fingerprint_=fingerprint,
            inputs=inputs,
            upstream_paths={k: Path(v) for k, v in upstream_paths.items()},
            store=store,
            tracker=Tracker.for_workdir(store.workdir, tracking_uri),
            parent_run_id=parent_run_id,
            recompute=recompute,
        )
    return {"stage": manifest.stage, "fingerprint": manifest.fingerprint}


def make_stage_task(stage: StageDef, result_dir: Path, *, refresh: bool) -> Any:
    """A Prefect task for `stage` whose cache key is the fingerprint."""
    return task(
        _run_stage_task,
        name=stage.name,
        cache_key_fn=_cache_key,
        persist_result=True,
        result_storage=result_dir,
        refresh_cache=refresh,
        retries=2,
        retry_delay_seconds=[5, 30],
        retry_condition_fn=_retry_only_transient,
    )


STAGE_BY_NAME: dict[str, StageDef] = {}


def register(stage: StageDef) -> StageDef:
    STAGE_BY_NAME[stage.name] = stage
    return stage
