"""A stage call as a Prefect task run: `execute_stage` with Prefect's states around it.

The task run's cache key shows `<stage>-<fingerprint>`; a reused folder ends it `Cached`
(Prefect never decides a cache hit itself: the folder must verify first, tasks.execute);
only transient errors are retried; a cancel from the UI ends it Cancelled, not Crashed.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.context import TaskRunContext
from prefect.exceptions import TerminationSignal
from prefect.states import Cancelled, Completed, State
from prefect.utilities.annotations import quote

from tasks.execute import RunSettings, execute_stage, is_transient
from tasks.stage import Stage, StageCall

log = logging.getLogger("gen2embed.stage")


def _retry_only_transient(_task: Any, _task_run: Any, state: State) -> bool:
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return False


def cancel_requested() -> bool:
    """Whether the SIGTERM being handled is Prefect's runner cancelling the flow run (the
    Cancel button), as its control channel told this process before signalling; False for
    any other SIGTERM (a `kill`, a machine shutting down) and where Prefect has no channel."""
    try:
        from prefect._internal.control_listener import get_intent
    except ImportError:  # a Prefect without the channel: every SIGTERM is a termination
        return False
    return get_intent() == "cancel"


def _run_stage(
    call: StageCall[Any],
    run: RunSettings,
    shards: Callable[[StageCall[Any], Path], None] | None = None,
) -> Any:
    """The stage task's body. Prefect delivers a UI cancel as SIGTERM, raised here as
    TerminationSignal, which its task engine would call a crash: the task ends Cancelled
    instead, and the flow re-raises (tasks.pipeline_run) so the flow run's own cancellation
    runs as before. Any other SIGTERM is a termination."""
    task_run = TaskRunContext.get()
    if task_run is not None:  # shown on the task run in the UI
        task_run.task_run.cache_key = f"{call.stage.name}-{call.fingerprint}"
    try:
        done = execute_stage(call, run, shards=shards)
    except TerminationSignal:
        if not cancel_requested():
            raise
        label = run.label or call.stage.name
        log.warning("%s: cancelled with its flow run; finished stages are kept", label)
        return Cancelled(message=f"{label}: cancelled with its flow run")
    # Quoted: Prefect searches results for objects it saw returned before (by identity, an
    # interned "hierarchical" in two outputs) and, in a state given as `wait_for`, would
    # draw edges to unrelated stages.
    if done.cached:
        path = done.output.folder
        return Completed(data=quote(done.output), name="Cached", message=f"reused {path}")
    return quote(done.output)


@functools.cache
def stage_task(stage: Stage[Any]) -> Task[..., Any]:
    """The Prefect task that runs calls of `stage` (one per stage, named after it)."""
    return task(
        _run_stage,
        name=stage.name,
        persist_result=False,
        retries=2,
        retry_delay_seconds=10,
        retry_condition_fn=_retry_only_transient,
    )
