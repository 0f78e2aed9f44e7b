"""The stage contract under Prefect: the one place that turns an embedder stage function into
a cached, published, tracked pipeline step.

A stage function (embedder/) takes its config sections (the pydantic models), its upstream
stages' outputs and an output folder `out`, and returns a typed output (embedder.outputs).
`Stage(name, function)` reads that shape from the function's signature; calling the stage
with the config and the upstream outputs, inside a `PipelineRun`, runs one Prefect task that

- fingerprints the stage: its sections + upstream fingerprints + code version (the import
  closure of the function's module); the fingerprint is the folder name and the task run's
  cache key;
- decides, in one place (`Stage.published`), whether the published folder can be reused: a
  reused folder ends the task run in a `Cached` state, anything missing or damaged is
  recomputed, never trusted;
- computes into `<fingerprint>.partial/` and publishes atomically with a manifest;
- retries only transient errors (I/O hiccups, timeouts), never bad data;
- logs one nested MLflow run (params = the sections, metrics, reports, manifest) and leaves a
  Prefect markdown artifact summarising the stage.

Inside `plan(...)` the same calls only fingerprint, so `gen2embed stages` and the checks of
--from / --force / --until see exactly the stages a run would execute.
"""

from __future__ import annotations

import base64
import contextvars
import errno
import inspect
import json
import logging
import mimetypes
import re
import signal
import time
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar
from uuid import UUID

from prefect import task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import TaskRunContext, get_run_context
from prefect.exceptions import TerminationSignal
from prefect.runtime import deployment, flow_run
from prefect.states import Cancelled, Completed, State
from prefect.utilities.annotations import quote
from pydantic import BaseModel, ValidationError

from embedder.artifacts import ArtifactStore, Manifest, code_version, fingerprint
from embedder.config import PipelineConfig, load_config
from embedder.errors import UserError
from embedder.outputs import StageOutput
from embedder.progress import listening
from embedder.report import COLUMNS, SHORT, RowResult
from tasks.registry import RegistryError, register_adapter
from tasks.tracking import Tracker, source_tags

log = logging.getLogger("gen2embed.stage")

REPORT_SUFFIXES = {".png", ".md", ".json"}
REPORT_MAX_BYTES = 5 * 1024 * 1024
OutputT = TypeVar("OutputT", bound=StageOutput)
Mode = Literal["compute", "recompute", "reuse"]


class PipelineError(UserError, RuntimeError):
    pass


class DiskFullError(UserError, OSError):
    pass


# ------------------------------------------------------------------ what a stage is


def _without_none(hint: Any) -> Any:
    """`X | None` -> X (an optional upstream stage), anything else unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


@dataclass(frozen=True)
class DatasetRef:
    """A table recorded as an MLflow dataset input: where it is, what it holds, its role."""

    name: str
    path: Path
    digest: str
    rows: int
    context: str  # MLflow's input context: train, eval


class Stage(Generic[OutputT]):
    """One pipeline stage: an embedder function plus how to cache, publish and track it."""

    def __init__(
        self,
        name: str,
        function: Callable[..., OutputT],
        *,
        resumable: bool = False,
        inputs: Callable[..., dict[str, str]] | None = None,
        headline: Callable[[Any], dict[str, float]] | None = None,
        datasets: Callable[[Any], list[DatasetRef]] | None = None,
        fan_out: bool = False,
    ) -> None:
        self.name = name
        self.function = function
        # Long stages resume inside their partial folder; others start it afresh.
        self.resumable = resumable
        # Fingerprint inputs beyond the upstream stages (ingest: the source files), called
        # with the stage's sections by parameter name.
        self.inputs = inputs
        # The results a run's parent shows (per table row) so runs compare in MLflow's table.
        self.headline = headline
        # Tables the stage read or wrote, recorded as MLflow dataset inputs of the run.
        self.datasets = datasets
        # Its shards can be computed by several workers at once (scale.engine, tasks.scale).
        self.fan_out = fan_out
        if fan_out and not resumable:
            raise ValueError(f"stage {name}: fan-out needs a resumable stage")
        hints = typing.get_type_hints(function)
        section_fields = {
            info.annotation: name
            for name, info in PipelineConfig.model_fields.items()
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)
        }
        self.sections: dict[str, str] = {}  # parameter -> PipelineConfig field
        # Parameters taking upstream outputs, in order, with the output type each expects.
        self.upstream: dict[str, type[StageOutput]] = {}
        for param in inspect.signature(function).parameters:
            hint = _without_none(hints[param])
            if param == "out":
                continue
            if hint in section_fields:
                self.sections[param] = section_fields[hint]
            elif isinstance(hint, type) and issubclass(hint, StageOutput):
                self.upstream[param] = hint
            else:
                raise TypeError(
                    f"{function.__qualname__}({param}: {hint}): a stage function takes config "
                    "sections, upstream stage outputs and `out: Path`"
                )
        self.output_type: type[OutputT] = hints["return"]
        self.task = task(
            _execute,
            name=name,
            # Prefect never decides a cache hit on its own: the published folder must pass
            # verification first, so `_execute` returns a Cached state itself.
            persist_result=False,
            retries=2,
            retry_delay_seconds=10,
            retry_condition_fn=_retry_only_transient,
        )

    @cached_property
    def code_version(self) -> str:
        return code_version(self.function)

    def __call__(self, cfg: PipelineConfig, *upstream: StageOutput | None) -> OutputT:
        expected = ", ".join(f"{p}: {t.__name__}" for p, t in self.upstream.items())
        if len(upstream) != len(self.upstream) or not all(
            u is None or isinstance(u, t)
            for u, t in zip(upstream, self.upstream.values(), strict=False)
        ):
            raise TypeError(f"stage {self.name} takes ({expected or 'no upstream outputs'})")
        sections = {f: getattr(cfg, f) for f in self.sections.values()}
        inputs = {u.stage: u.fingerprint for u in upstream if u is not None}
        if self.inputs is not None:
            by_param = {p: sections[f] for p, f in self.sections.items()}
            inputs.update(self.inputs(**by_param))
        call = StageCall(
            self,
            fingerprint(self.name, _dump(sections), inputs, self.code_version),
            sections,
            dict(zip(self.upstream, upstream, strict=True)),
            inputs,
        )
        runner = _RUNNER.get(None)
        if runner is None:
            raise RuntimeError(f"stage {self.name} called outside a PipelineRun or plan()")
        return runner(call)

    def published(self, store: ArtifactStore, fp: str) -> tuple[OutputT, Manifest] | None:
        """The published output of fingerprint `fp` (with its manifest) if its folder can be
        trusted, else None. The only place a cache hit is decided."""
        manifest = store.load(self.name, fp)
        if manifest is None:
            return None
        try:
            return self.restore(store, manifest), manifest
        except ValidationError as exc:  # a folder from before its output was recorded
            log.info("%s: manifest does not describe the output (%s)", self.name, exc)
            return None

    def restore(self, store: ArtifactStore, manifest: Manifest) -> OutputT:
        """The output recorded in a published folder's manifest."""
        output = self.output_type.model_validate(
            {
                **manifest.output,
                "folder": store.path(self.name, manifest.fingerprint),
                "stage": self.name,
                "fingerprint": manifest.fingerprint,
                "rows": manifest.rows,
                "metrics": manifest.metrics,
                "info": manifest.info,
            }
        )
        return output.resolved(store.workdir)


@dataclass(frozen=True)
class StageCall(Generic[OutputT]):
    """A stage applied to its config sections and upstream outputs: what its task gets."""

    stage: Stage[OutputT]
    fingerprint: str
    sections: dict[str, BaseModel]  # PipelineConfig field -> section
    upstream: dict[str, StageOutput | None]  # function parameter -> output
    inputs: dict[str, str]  # what the fingerprint hashed besides the sections

    def arguments(self, out: Path) -> dict[str, Any]:
        """The stage function's keyword arguments."""
        by_param = {p: self.sections[f] for p, f in self.stage.sections.items()}
        return {**by_param, **self.upstream, "out": out}


def _dump(sections: dict[str, BaseModel]) -> dict[str, Any]:
    return {name: section.model_dump(mode="json") for name, section in sections.items()}


# ------------------------------------------------------------------ the task body


class RunSettings(BaseModel):
    """Where and how one stage task runs; passed as a task parameter."""

    workdir: str
    tracking_uri: str
    parent_run_id: str | None
    # compute: reuse the published folder if it verifies, else compute;
    # recompute: compute regardless (--force, --from, or an upstream stage recomputed);
    # reuse: the folder must be published already (stages --from does not run).
    mode: Mode = "compute"
    from_stage: str | None = None
    # Shard tasks on a cluster wrote into the partial folder already (tasks.scale): keep it.
    fanned_out: bool = False
    # The stage as the UIs name it: `embed`, `finetune[saha-hierarchical]` (stage_label).
    label: str = ""


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


def _flow_run_id() -> str:
    ctx = get_run_context()
    run = getattr(ctx, "flow_run", None)
    if run is None:
        return str(getattr(getattr(ctx, "task_run", None), "flow_run_id", "") or "")
    return str(run.id)


def cancel_requested() -> bool:
    """Whether the SIGTERM being handled is Prefect's runner cancelling the flow run (the
    Cancel button), as its control channel told this process before signalling; False for
    any other SIGTERM (a `kill`, a machine shutting down) and where Prefect has no channel."""
    try:
        from prefect._internal.control_listener import get_intent
    except ImportError:  # a Prefect without the channel: every SIGTERM is a termination
        return False
    return get_intent() == "cancel"


def _execute(call: StageCall[Any], run: RunSettings) -> Any:
    """The stage task: `_execute_stage`, ended as Cancelled (not Crashed) when its flow run is
    cancelled from the UI. Prefect delivers the cancel as SIGTERM, raised here as
    TerminationSignal, and its task engine would call any such signal a crash; the flow
    re-raises it (PipelineRun.run) so the flow run's own cancellation runs as before."""
    try:
        return _execute_stage(call, run)
    except TerminationSignal:
        if not cancel_requested():
            raise
        label = run.label or call.stage.name
        log.warning("%s: cancelled with its flow run; finished stages are kept", label)
        return Cancelled(message=f"{label}: cancelled with its flow run")


def _execute_stage(call: StageCall[Any], run: RunSettings) -> Any:
    """The body of every stage task: reuse the published folder, or compute and publish."""
    name, fp = call.stage.name, call.fingerprint
    task_run = TaskRunContext.get()
    if task_run is not None:
        task_run.task_run.cache_key = f"{name}-{fp}"  # shown on the task run in the UI
    store = ArtifactStore(run.workdir)
    tracker = Tracker.for_workdir(store.workdir, run.tracking_uri)
    path = store.path(name, fp)
    with store.lock(name, fp):
        if run.mode != "recompute":
            published = call.stage.published(store, fp)
            if published is not None:
                output, manifest = published
                log.info("%s: cached (%s)", name, path)
                log_cached_run(name, manifest, tracker, run.parent_run_id, path, run.label or name)
                return Completed(data=quote(output), name="Cached", message=f"reused {path}")
            if run.mode == "reuse":
                raise PipelineError(
                    f"--from {run.from_stage} needs published results of {name}; "
                    "run without --from first"
                )
        # Quoted: Prefect searches results for objects it saw returned before (by identity,
        # an interned "hierarchical" in two outputs) and, in a state given as `wait_for`,
        # would draw edges to unrelated stages.
        return quote(_compute(call, run, store, tracker))


def artifact_key(label: str, kind: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for `kind` of the stage
    `label`: `finetune[saha-hierarchical]`, `mlflow` -> `finetune-saha-hierarchical-mlflow`."""
    return re.sub(r"[^a-z0-9]+", "-", f"{label}-{kind}".lower()).strip("-")


class ProgressArtifact:
    """A stage's long loops as a Prefect progress artifact (the task run's Artifacts tab):
    percent done, rate and ETA; the bar's values (training loss, lr) go to the stage's MLflow
    run as they come, so a long fine-tune can be watched. Best effort: a failed update never
    fails the stage."""

    def __init__(self, stage: str, tracker: Tracker, run_id: str) -> None:
        """`stage`: the stage's label (`evaluate[saha-hierarchical]`), which names the card."""
        self.stage, self.tracker, self.run_id = stage, tracker, run_id
        self.logged_step = -1  # each step's values reach MLflow once
        self.artifact_id: UUID | None = None
        self.failed: set[str] = set()

    def __call__(self, percent: float, line: str, step: int, values: dict[str, float]) -> None:
        # The bar tells on a timer and again when it closes: both can fall on the last step.
        if values and step > self.logged_step and "mlflow" not in self.failed:
            self.logged_step = step
            try:
                self.tracker.log_metrics(self.run_id, values, step=step)
            except Exception as exc:
                self.failed.add("mlflow")
                log.warning("%s: live metrics not logged (%s)", self.stage, exc)
        if "prefect" in self.failed or not flow_run.get_id():
            return
        # The engine names its loop ("embed: 1,200/4,000 items, ..."); the card names the
        # stage, so an evaluation's embedding reads as the evaluation's.
        _, _, how_far = line.partition(": ")
        description = f"{self.stage}: {how_far or line}"
        try:
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(
                    percent, key=artifact_key(self.stage, "progress"), description=description
                )
            else:
                update_progress_artifact(self.artifact_id, percent, description=description)
        except Exception as exc:
            self.failed.add("prefect")
            log.warning("%s: progress not shown in Prefect (%s)", self.stage, exc)


def track_published(tracker: Tracker, run_id: str, manifest: Manifest, output: StageOutput) -> None:
    """What a stage's MLflow run records once its folder (`output.folder`) is published:
    metrics, row counts, per-step curves, small folders (an adapter), the manifest, reports
    and plots, the folder's path."""
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
    tracker.set_tags(run_id, {"gen2embed.path": str(published), **_warning_tags(manifest)})


def _compute(
    call: StageCall[OutputT], run: RunSettings, store: ArtifactStore, tracker: Tracker
) -> OutputT:
    stage, fp = call.stage, call.fingerprint
    params = _dump(call.sections)
    flow_run_id = _flow_run_id()
    tags = {"gen2embed.stage": stage.name, "gen2embed.fingerprint": fp}
    tags["prefect.flow_run_id"] = flow_run_id
    with tracker.run(stage.name, parent_run_id=run.parent_run_id, tags=tags, params=params) as rid:
        fresh = (run.mode == "recompute" and not run.fanned_out) or not stage.resumable
        partial = store.open_partial(stage.name, fp, fresh=fresh)
        log.info("%s: computing into %s", stage.name, partial)
        try:
            with listening(ProgressArtifact(run.label or stage.name, tracker, rid)):
                output = stage.function(**call.arguments(partial))
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            raise DiskFullError(
                f"no space left on the device holding {partial} ({stage.name}); free some and "
                "run again: finished stages are kept"
            ) from None
        ids = {"mlflow_run_id": rid, "prefect_flow_run_id": flow_run_id}
        manifest = store.publish(
            stage.name,
            fp,
            code_version=stage.code_version,
            config=params,
            inputs=call.inputs,
            output=output.model_copy(update={"info": {**output.info, **ids}}),
        )
        published = store.path(stage.name, fp)
        track_published(tracker, rid, manifest, output.model_copy(update={"folder": published}))
        _publish_summary(manifest, published, tracker, rid, run.label or stage.name, cached=False)
    return stage.restore(store, manifest)


def summary_markdown(
    manifest: Manifest, path: Path, *, cached: bool, run_url: str | None, label: str = ""
) -> str:
    lines = [
        f"# Stage `{label or manifest.stage}` {'(cached)' if cached else ''}",
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
    manifest: Manifest, path: Path, tracker: Tracker, run_id: str, label: str, *, cached: bool
) -> None:
    """The stage's summary card and the link to its MLflow run, each keyed and described by
    the stage's label (`finetune[saha-hierarchical]`)."""
    url = tracker.run_url(run_id)
    how = "reused from the cache" if cached else "computed"
    create_markdown_artifact(
        markdown=summary_markdown(manifest, path, cached=cached, run_url=url, label=label),
        key=artifact_key(label, "summary"),
        description=f"Stage {label}: {how}, fingerprint {manifest.fingerprint}",
    )
    if url:
        create_link_artifact(
            link=url,
            link_text=f"MLflow run of {label}",
            key=artifact_key(label, "mlflow"),
            description=f"Stage {label}: its MLflow run (metrics, params, files)",
        )


def log_cached_run(
    stage: str,
    manifest: Manifest,
    tracker: Tracker,
    parent_run_id: str | None,
    path: Path,
    label: str,
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
        tracker.set_tags(run_id, _warning_tags(manifest))
        _publish_summary(manifest, path, tracker, run_id, label, cached=True)


def _warning_tags(manifest: Manifest) -> dict[str, str]:
    warnings = manifest.info.get("warnings", [])
    for warning in warnings:
        log.warning("%s: %s", manifest.stage, warning)
    return {"gen2embed.warnings": " | ".join(warnings)[:5000]} if warnings else {}


# ------------------------------------------------------------------ running and planning

# What a stage call does: inside `PipelineRun` it runs, inside `plan` it is only recorded.
_RUNNER: contextvars.ContextVar[Callable[[StageCall[Any]], Any]] = contextvars.ContextVar(
    "gen2embed_runner"
)


# The table row whose stages are being called (None: the shared stages), and how a PipelineRun
# opens a row's MLflow run.
_ROW: contextvars.ContextVar[str | None] = contextvars.ContextVar("gen2embed_row", default=None)
_ROW_SCOPE: contextvars.ContextVar[Callable[[str], Any]] = contextvars.ContextVar(
    "gen2embed_row_scope"
)


@contextmanager
def table_row(name: str) -> Iterator[None]:
    """Stages called inside belong to table row `name`: their task runs carry its name and
    their MLflow runs nest under the row's own run (which gets their metrics)."""
    token = _ROW.set(name)
    try:
        scope = _ROW_SCOPE.get(None)
        if scope is None:
            yield
        else:
            with scope(name):
                yield
    finally:
        _ROW.reset(token)


def current_row() -> str | None:
    return _ROW.get()


def stage_label(name: str, row: str | None) -> str:
    return name if row is None else f"{name}[{row}]"


@contextmanager
def running(runner: Callable[[StageCall[Any]], Any]) -> Iterator[None]:
    token = _RUNNER.set(runner)
    try:
        yield
    finally:
        _RUNNER.reset(token)


@dataclass(frozen=True)
class PlannedStage:
    name: str
    fingerprint: str
    problems: tuple[str, ...] | None  # None: not checked
    upstream: tuple[str, ...] = ()  # the stages whose outputs it reads
    row: str | None = None  # the table row it belongs to (None: shared by every row)

    @property
    def label(self) -> str:
        return stage_label(self.name, self.row)

    @property
    def cached(self) -> bool:
        return self.problems == ()


def check_selection(
    planned: list[PlannedStage],
    from_stage: str | None = None,
    force: list[str] | None = None,
    until: str | None = None,
) -> None:
    """--from / --force / --until name stages of this pipeline, and --from finds every stage
    it will not run already published. Needs only a plan: runs before any server starts."""
    names = [p.name for p in planned]
    options = [("--from", from_stage), ("--until", until)]
    for option, name in options + [("--force", f) for f in force or []]:
        if name is not None and name not in names:
            raise PipelineError(
                f"{option} {name}: not part of this pipeline (stages: {', '.join(names)})"
            )
    if from_stage is None:
        return
    if until is not None:  # stages after --until's last call do not run: they need nothing
        planned = planned[: len(names) - names[::-1].index(until)]
    downstream = {from_stage}
    for p in planned:
        if downstream.intersection(p.upstream):
            downstream.add(p.name)
    missing = [p.name for p in planned if p.name not in downstream and not p.cached]
    if missing:
        raise PipelineError(
            f"--from {from_stage} needs published results of {', '.join(missing)}; "
            "run without --from first"
        )


def plan(
    method: Callable[[PipelineConfig], Any],
    cfg: PipelineConfig,
    store: ArtifactStore,
    *,
    verify: bool = False,
) -> list[PlannedStage]:
    """The stages `method(cfg)` would run, in order, with their fingerprints (and, with
    `verify`, whether each is published), computing nothing."""
    planned: list[PlannedStage] = []

    def record(call: StageCall[OutputT]) -> OutputT:
        name, fp = call.stage.name, call.fingerprint
        problems = tuple(store.verify(name, fp)) if verify else None
        upstream = tuple(u.stage for u in call.upstream.values() if u is not None)
        planned.append(PlannedStage(name, fp, problems, upstream, _ROW.get()))
        # A stand-in carrying what downstream fingerprints need; nothing is read.
        return call.stage.output_type(folder=store.path(name, fp), stage=name, fingerprint=fp)

    with running(record):
        method(cfg)
    return planned


def crash_flow_runs(flow_run_ids: set[str]) -> None:
    """Mark Crashed the Prefect flow runs (and their task runs) of processes that died while
    running them: Prefect itself leaves them Running forever."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    message = "its process is gone (found by the next gen2embed run)"
    with get_client(sync_client=True) as client:
        for flow_run_id in flow_run_ids:
            try:
                run = client.read_flow_run(UUID(flow_run_id))
            except (ObjectNotFound, ValueError):
                continue  # another Prefect server's run, or no id
            if run.state is not None and not run.state.is_final():
                client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            only_this = FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
            for task_run in client.read_task_runs(flow_run_filter=only_this):
                if task_run.state is not None and not task_run.state.is_final():
                    client.set_task_run_state(task_run.id, Crashed(message=message), force=True)


class _StopAfter(Exception):
    """Raised after the --until stage; ends the run early and cleanly."""


def embed_pictures(markdown: str, folder: Path) -> str:
    """`markdown` with each picture it links by a relative path (`![loss](loss.png)`) inlined
    as a data URI: the Prefect UI resolves no relative path, and renders `data:image/` in
    markdown artifacts (both its UIs). A picture not in `folder` is left as it is."""

    def inline(match: re.Match[str]) -> str:
        alt, target = match.group(1), match.group(2)
        path = folder / target
        if "://" in target or not path.is_file():
            return match.group(0)
        kind = mimetypes.guess_type(path.name)[0] or "image/png"
        data = base64.b64encode(path.read_bytes()).decode()
        return f"![{alt}](data:{kind};base64,{data})"

    return re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", inline, markdown)


def score_rows(table: dict[str, Any]) -> list[dict[str, Any]]:
    """The `scores` artifact's rows from report table.json: the row's name, then the table's
    columns in its order (embedder.report.COLUMNS), strict P@1 and the tie rate overall, each
    rounded to the table's 3 decimals."""
    out = []
    for name, row in table["rows"].items():
        cells: dict[str, Any] = {"row": name}
        for column in COLUMNS:
            if column in row["aggregate"]:
                cells[SHORT[column]] = round(row["aggregate"][column], 3)
        cells["strict"] = round(row["aggregate_strict"]["overall"], 3)
        cells["ties"] = round(row["aggregate_tie_rate"]["overall"], 3)
        out.append(cells)
    return out


def prefect_run_url() -> str | None:
    """The current flow run's page in the Prefect UI (the route the UI itself links to),
    when a UI serves this run's API; None in Prefect's ephemeral mode."""
    from prefect.settings import PREFECT_UI_URL

    ui, run_id = PREFECT_UI_URL.value(), flow_run.get_id()
    return f"{str(ui).rstrip('/')}/runs/flow-run/{run_id}" if ui and run_id else None


def _run_note(name: str, preset: str, changed: dict[str, Any], prefect_url: str | None) -> str:
    """The MLflow run's description (markdown): where it came from and what it changed."""
    lines = [f"gen2embed pipeline run **{name}**, preset `{preset}`."]
    if prefect_url:
        lines.append(f"Prefect flow run: [{name}]({prefect_url})")
    if changed:
        lines.append("Settings changed from the preset: " + ", ".join(
            f"`{k}={json.dumps(v)}`" for k, v in changed.items()
        ))  # fmt: skip
    return "\n\n".join(lines)


class PipelineRun:
    """One run of the pipeline: the MLflow parent run, the choice of what to recompute
    (--from / --force / --until) and the published folder of every stage that ran."""

    def __init__(
        self,
        method: Callable[[PipelineConfig], Any],
        cfg: PipelineConfig,
        workdir: str | None,
        *,
        preset: str,
        name: str | None = None,
        from_stage: str | None = None,
        force: list[str] | None = None,
        until: str | None = None,
    ) -> None:
        self.store = ArtifactStore(workdir)
        planned = plan(method, cfg, self.store, verify=from_stage is not None)
        check_selection(planned, from_stage, force, until)
        self.tracker = Tracker.for_workdir(self.store.workdir)
        self.cfg, self.preset, self.name = cfg, preset, name or preset
        self.from_stage, self.force, self.until = from_stage, set(force or []), until
        self.recomputed: set[str] = set()  # fingerprints recomputed on purpose in this run
        self.states: dict[str, State] = {}  # fingerprint -> final state of its task run
        self.paths: dict[str, str] = {}  # stage label (with its row) -> published folder
        self.warnings: list[str] = []
        self.cached = 0
        self.done: set[str] = set()  # fingerprints already run here (rows share stages)
        self.row_ids: dict[str, str] = {}  # table row -> its MLflow run
        self.logged_inputs: set[str] = set()  # fingerprints whose tables are logged
        self._shard_runner: Any = None  # the Dask task runner, once a stage fans out
        self._until_left = sum(p.name == until for p in planned)
        self._exit = ExitStack()

    def __enter__(self) -> PipelineRun:
        swept = self.tracker.sweep_stale_runs()
        if swept:
            log.warning("marked %d MLflow run(s) of dead processes as KILLED", len(swept))
            crash_flow_runs({f for f in swept.values() if f})
        self.started = time.perf_counter()
        # A run of a deployment (the UI's Run button, a schedule) carries its Prefect flow
        # run's name into MLflow (`ui-finetune20` in both); a direct call keeps the preset
        # and rows (Prefect would draw a random name; `gen2embed run` names its flow run so
        # too). Beside it: the settings that differ from the preset, and a link back.
        name = self.name
        if flow_run.get_id() and deployment.get_id():
            name = flow_run.get_name() or name
        changed = self.cfg.changed_from(load_config(self.preset))
        prefect_url = prefect_run_url()
        tags = {
            "prefect.flow_run_id": str(flow_run.get_id() or ""),
            "prefect.flow_run_name": name,
            "gen2embed.preset": self.preset,
            "gen2embed.pipeline": "true",
            **source_tags(),
        }
        if changed:
            tags["gen2embed.settings"] = ", ".join(
                f"{k}={json.dumps(v)}" for k, v in changed.items()
            )[:5000]
        if prefect_url:
            tags["prefect.flow_run_url"] = prefect_url
        tags["mlflow.note.content"] = _run_note(name, self.preset, changed, prefect_url)
        params = self.cfg.model_dump(mode="json")
        self.parent_id = self._exit.enter_context(self.tracker.run(name, tags=tags, params=params))
        self.name = name
        url = self.tracker.run_url(self.parent_id)
        if url and flow_run.get_id():
            create_link_artifact(
                link=url,
                link_text=f"MLflow run {name}",
                key="mlflow-run",
                description="The pipeline's MLflow run: the table, metrics per row, each "
                "stage's run nested under it",
            )
        self._exit.enter_context(running(self.run))
        token = _ROW_SCOPE.set(self.row_scope)
        self._exit.callback(_ROW_SCOPE.reset, token)
        return self

    @contextmanager
    def row_scope(self, row: str) -> Iterator[None]:
        """A table row's MLflow run, nested under the pipeline's; its stages nest under it
        and their metrics are logged on it as `<stage>.<metric>`."""
        tags = {
            "gen2embed.row": row,
            "gen2embed.preset": self.preset,
            "prefect.flow_run_id": str(flow_run.get_id() or ""),
        }
        stopped: _StopAfter | None = None
        with self.tracker.run(row, parent_run_id=self.parent_id, tags=tags) as run_id:
            self.row_ids[row] = run_id
            try:
                yield
            except _StopAfter as stop:  # --until: the row ends FINISHED, not FAILED
                stopped = stop
            finally:
                del self.row_ids[row]
        if stopped is not None:
            raise stopped

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if kind is None or kind is _StopAfter:
            elapsed = time.perf_counter() - self.started
            metrics = {"seconds": elapsed, "stages_cached": self.cached}
            self.tracker.log_metrics(self.parent_id, metrics)
            # MLflow tag keys allow no brackets: evaluate[row] -> evaluate.row
            tags = {
                f"gen2embed.path.{k.replace('[', '.').rstrip(']')}": v
                for k, v in self.paths.items()
            }
            if self.warnings:
                tags["gen2embed.warnings"] = " | ".join(self.warnings)[:5000]
            self.tracker.set_tags(self.parent_id, tags)
            self._exit.close()
            return True
        return bool(self._exit.__exit__(kind, exc, tb))

    def publish_report(self, folder: Path) -> None:
        """The run's comparison table: files on the MLflow parent run, a Prefect artifact."""
        for path in sorted(folder.iterdir()):
            self.tracker.log_file(self.parent_id, path, "report")
        self.tracker.set_tags(self.parent_id, {"gen2embed.report": str(folder)})
        markdown = embed_pictures((folder / "report.md").read_text(), folder)
        create_markdown_artifact(
            markdown=markdown,
            key="table",
            description="The comparison table: P@1 per row (MMEB's convention), per subset, "
            "bar charts and loss curves",
        )
        table = json.loads((folder / "table.json").read_text())
        create_table_artifact(
            table=score_rows(table),
            key="scores",
            description="P@1 per table row as MMEB scores it (argmax; a tie with the correct "
            "candidate counts), columns as in the table; strict P@1 and the tie rate beside. "
            "MLflow: ROW/p1.* and ROW/p1_strict.* on the pipeline run",
        )
        self.paths["report"] = str(folder)

    def _fans_out(self, call: StageCall[Any], mode: Mode) -> bool:
        if not call.stage.fan_out or self.cfg.scale.engine == "none" or mode == "reuse":
            return False
        return mode == "recompute" or call.stage.published(self.store, call.fingerprint) is None

    def _fan_out(self, call: StageCall[Any], mode: Mode, label: str) -> None:
        """Shard tasks on the cluster write the stage's shards first (tasks.scale)."""
        from tasks.scale import fan_out, shard_runner, task_count

        if self._shard_runner is None:  # one cluster for the run, started on first need
            self._shard_runner = self._exit.enter_context(shard_runner(self.cfg.scale))
        name, fp = call.stage.name, call.fingerprint
        count = task_count(self.cfg.scale)
        log.info("%s: %d shard tasks on the Dask cluster", label, count)
        with self.store.lock(name, fp):  # a concurrent run of this stage waits
            self.store.open_partial(name, fp, fresh=mode == "recompute")
            fan_out(self._shard_runner, call, str(self.store.workdir), label, count)

    def register_adapters(self, results: list[RowResult]) -> None:
        """Each fine-tuned row's adapter as an MLflow model version (registry.*)."""
        if not self.cfg.registry.enabled:
            return
        for result in results:
            if result.adapter is None:
                continue
            row = result.row.name
            try:
                done = register_adapter(
                    self.tracker, self.cfg, result.row, result.adapter, result.evaluation,
                    self.parent_id, lock=self.store.workdir / "cache" / "registry.lock",
                )  # fmt: skip
            except RegistryError as exc:  # the run's results stand; the version is not made
                self.warnings.append(f"registry {row}: not registered: {exc}")
                log.warning("%s: not registered: %s", row, exc)
                self.tracker.set_tags(
                    self.parent_id, {f"gen2embed.registered.{row}": f"not registered: {exc}"[:5000]}
                )
                continue
            self.tracker.set_tags(
                self.parent_id,
                {
                    f"gen2embed.registered.{row}": f"{done.name}/{done.version}",
                    f"gen2embed.champion.{row}": ("champion: " if done.champion else "")
                    + done.reason,
                },
            )
            log.info("%s: %s (%s)", row, done.uri, done.reason)

    def mode(self, call: StageCall[Any]) -> Mode:
        name = call.stage.name
        if call.fingerprint in self.done:  # another row ran it already in this run
            return "compute"
        upstream_recomputed = any(
            u is not None and u.fingerprint in self.recomputed for u in call.upstream.values()
        )
        if name in self.force or name == self.from_stage or upstream_recomputed:
            return "recompute"
        return "reuse" if self.from_stage else "compute"

    def run(self, call: StageCall[OutputT]) -> OutputT:
        mode = self.mode(call)
        row = _ROW.get()
        label = stage_label(call.stage.name, row)
        settings = RunSettings(
            workdir=str(self.store.workdir),
            tracking_uri=self.tracker.tracking_uri,
            parent_run_id=self.row_ids.get(row or "", self.parent_id),
            mode=mode,
            from_stage=self.from_stage,
            label=label,
        )
        # Arguments are quoted (Prefect matches results by identity, and an interned string
        # such as a stage name would draw false edges); the run graph's edges are exactly the
        # upstream stages, given as `wait_for`.
        upstream = [self.states[u.fingerprint] for u in call.upstream.values() if u is not None]
        if self._fans_out(call, mode):
            self._fan_out(call, mode, label)
            settings = settings.model_copy(update={"fanned_out": True})
        # One naming rule for every task run: the stage label (`embed`, `mine[saha-...]`).
        task = call.stage.task.with_options(task_run_name=label)
        state = task(quote(call), quote(settings), wait_for=upstream, return_state=True)
        if state.is_cancelled():  # the Cancel button: the flow ends the way Prefect cancels
            raise TerminationSignal(signal.SIGTERM)
        self.states[call.fingerprint] = state
        output: OutputT = state.result().unquote()  # raises the stage's own error if it failed
        if mode == "recompute":
            self.recomputed.add(call.fingerprint)
        self.done.add(call.fingerprint)
        self.cached += state.name == "Cached"
        self.paths[label] = str(output.folder)
        self.warnings += [f"{label}: {w}" for w in output.info.get("warnings", [])]
        if row is not None and row in self.row_ids:
            metrics = {f"{call.stage.name}.{k}": v for k, v in output.metrics.items()}
            self.tracker.log_metrics(self.row_ids[row], metrics)
        if call.stage.headline is not None:
            # On the parent, per row ("saha-hierarchical/p1.overall"): MLflow's runs table
            # and compare view then set whole runs side by side.
            prefix = f"{row}/" if row is not None else ""
            headline = {f"{prefix}{k}": v for k, v in call.stage.headline(output).items()}
            self.tracker.log_metrics(self.parent_id, headline)
        if call.stage.datasets is not None and call.fingerprint not in self.logged_inputs:
            self.logged_inputs.add(call.fingerprint)
            self.tracker.log_datasets(self.parent_id, call.stage.datasets(output))
        if call.stage.name == self.until:
            self._until_left -= 1
            if self._until_left <= 0:
                raise _StopAfter
        return output
