"""Executing one stage call: reuse its published folder, or compute and publish it.

`execute_stage` is the one body every way of running a stage goes through: the pipeline's
Prefect task (tasks.stage_task) and the torchrun job (flows.torchrun_finetune, one call per
rank). Under the stage's lock (embedder.artifacts: one writer per fingerprint across
processes), `reuse_decision` decides, in the only place this is decided, whether the
published folder is reused; if not, the stage computes into `<fingerprint>.partial/`
(afresh, or resumed when the stage is resumable and was not asked to recompute; shard
tasks may fill it first), publishes atomically with a manifest, and records itself in
MLflow (tasks.stage_record) and, inside a flow run, in Prefect's cards (tasks.cards).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prefect.runtime import flow_run
from pydantic import BaseModel

from embedder.artifacts import ArtifactStore, Manifest
from embedder.errors import UserError
from embedder.outputs import StageOutput
from embedder.progress import listening
from tasks.cards import ProgressArtifact, stage_cards
from tasks.stage import OutputT, StageCall
from tasks.stage_record import record_cached, stage_tags, track_published
from tasks.tracking import Tracker

log = logging.getLogger("gen2embed.stage")

# compute: reuse the published folder if it verifies, else compute;
# recompute: compute regardless (--force, --from, or an upstream stage recomputed);
# reuse: the folder must be published already (stages --from does not run).
Mode = Literal["compute", "recompute", "reuse"]


class PipelineError(UserError, RuntimeError):
    pass


class DiskFullError(UserError, OSError):
    pass


class RunSettings(BaseModel):
    """Where and how one stage call runs: the Prefect task's parameter, the torchrun job's
    settings."""

    workdir: str
    tracking_uri: str
    # The MLflow run the stage's run nests under (its table row's, or the pipeline's).
    parent_run_id: str | None
    mode: Mode = "compute"
    from_stage: str | None = None  # named in the error of mode `reuse`
    # The stage as the UIs name it: `embed`, `finetune[saha-hierarchical]` (stage_label).
    label: str = ""
    row: str | None = None  # the table row it belongs to


@dataclass(frozen=True)
class Ranks:
    """The processes computing one stage together: one by default; the torchrun job's ranks
    (`launcher` names the launcher; the MLflow run says `(torchrun xN)`). Rank 0 takes the
    lock, decides and publishes; `agree` gives every rank rank 0's value; `barrier` waits
    for all of them."""

    rank: int = 0
    size: int = 1
    launcher: str = ""
    barrier: Callable[[], None] = field(default=lambda: None)
    agree: Callable[[Any], Any] = field(default=lambda value: value)


ONE_PROCESS = Ranks()

TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ESTALE, errno.EINTR}


def is_transient(exc: BaseException) -> bool:
    """Errors worth a retry: the network or the filesystem hiccupped. Bad data, bad config
    and bugs fail at once."""
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


@dataclass(frozen=True)
class Executed:
    """What executing a stage call gave: its output and whether the cache served it."""

    output: Any
    cached: bool


def reuse_decision(
    call: StageCall[OutputT], mode: Mode, store: ArtifactStore, from_stage: str | None = None
) -> tuple[OutputT, Manifest] | None:
    """The published output to reuse, or None to compute: the only place this is decided,
    called under the stage's lock. `recompute` never reuses; otherwise a folder is reused
    only if it verifies (files and digests against its manifest), never trusted by name.

    Raises PipelineError in mode `reuse` (a stage --from does not run) when nothing usable
    is published."""
    if mode == "recompute":
        return None
    published = call.stage.published(store, call.fingerprint)
    if published is None and mode == "reuse":
        raise PipelineError(
            f"--from {from_stage} needs published results of {call.stage.name}; "
            "run without --from first"
        )
    return published


def execute_stage(
    call: StageCall[OutputT],
    run: RunSettings,
    *,
    shards: Callable[[StageCall[Any], Path], None] | None = None,
    ranks: Ranks = ONE_PROCESS,
) -> Executed:
    """Reuse or compute `call`'s folder under its lock; returns the output (paths resolved
    against the workdir) and whether it came from the cache.

    `shards(call, partial)`, when given, fills the partial folder's shards on other workers
    before the stage function runs whole (tasks.scale); it runs only when the stage computes.
    Files written: `<workdir>/stages/<stage>/<fingerprint>/` with `manifest.json`
    (embedder.artifacts), from the partial folder beside it. MLflow: one run per call (a
    short `cached` one for a cache hit).

    Raises the stage function's own errors, PipelineError (see `reuse_decision`) and
    DiskFullError when the device fills up while computing."""
    name, fp = call.stage.name, call.fingerprint
    label = run.label or name
    store = ArtifactStore(run.workdir)
    tracker = Tracker.for_workdir(store.workdir, run.tracking_uri)
    lead = ranks.rank == 0
    flow_run_id = str(flow_run.get_id() or "")
    extra = {"gen2embed.world_size": str(ranks.size)} if ranks.launcher else {}
    tags = stage_tags(
        name, fp, row=run.row, flow_run_id=flow_run_id, parent_run_id=run.parent_run_id, extra=extra
    )
    # A stage run nests under its row's run and is named by the stage; a run with no parent
    # names its row, and the launcher that ran it.
    run_name = name if run.parent_run_id else label
    if ranks.launcher:
        run_name = f"{label} ({ranks.launcher} x{ranks.size})"
    with store.lock(name, fp) if lead else nullcontext():
        decision = reuse_decision(call, run.mode, store, run.from_stage) if lead else None
        reused = ranks.agree(decision is not None)
        if reused:
            if not lead:
                return Executed(call.stage.published(store, fp)[0], cached=True)  # type: ignore[index]
            assert decision is not None
            output, manifest = decision
            path = store.path(name, fp)
            log.info("%s: cached (%s)", label, path)
            run_id = record_cached(tracker, manifest, run_name, tags, run.parent_run_id)
            stage_cards(manifest, path, tracker.run_url(run_id), label, cached=True)
            return Executed(output, cached=True)
        return Executed(
            _compute(call, run, store, tracker, tags, run_name, shards, ranks), cached=False
        )


def _compute(
    call: StageCall[OutputT],
    run: RunSettings,
    store: ArtifactStore,
    tracker: Tracker,
    tags: dict[str, str],
    run_name: str,
    shards: Callable[[StageCall[Any], Path], None] | None,
    ranks: Ranks,
) -> OutputT:
    stage, fp, label = call.stage, call.fingerprint, run.label or call.stage.name
    lead = ranks.rank == 0
    partial = store.partial_path(stage.name, fp)
    params = call.config()
    with ExitStack() as stack:
        run_id = ""
        if lead:
            run_id = stack.enter_context(
                tracker.run(run_name, parent_run_id=run.parent_run_id, tags=tags, params=params)
            )
            # Loss, lr and pairs/s reach the run while it trains; a progress card in Prefect.
            stack.enter_context(listening(ProgressArtifact(label, tracker, run_id)))
            # Resumable stages go on from their partial folder unless asked to recompute.
            fresh = run.mode == "recompute" or not stage.resumable
            store.open_partial(stage.name, fp, fresh=fresh)
            log.info("%s: computing into %s", label, partial)
        ranks.barrier()
        try:
            if shards is not None:
                shards(call, partial)
            output: StageOutput = stage.function(**call.arguments(partial))
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            raise DiskFullError(
                f"no space left on the device holding {partial} ({label}); free some and "
                "run again: finished stages are kept"
            ) from None
        ranks.barrier()
        if not lead:
            return output  # type: ignore[return-value]
        ids = {"mlflow_run_id": run_id, "prefect_flow_run_id": tags.get("prefect.flow_run_id", "")}
        manifest = store.publish(
            stage.name,
            fp,
            code_version=stage.code_version,
            config=params,
            inputs=call.inputs,
            output=output.model_copy(update={"info": {**output.info, **ids}}),
        )
        published = store.path(stage.name, fp)
        track_published(tracker, run_id, manifest, output.model_copy(update={"folder": published}))
        stage_cards(manifest, published, tracker.run_url(run_id), label, cached=False)
        log.info("%s: published %s", label, published)
    return stage.restore(store, manifest)
