"""Fan-out of the embed and evaluate stages over their shards, as mapped Prefect tasks on a
Dask cluster (prefect-dask), never a scheduler of our own.

Why Dask and not Ray: dask-cuda's `LocalCUDACluster` (or `dask-cuda-worker` on each GPU box)
starts one worker per GPU pinned with CUDA_VISIBLE_DEVICES, so each shard task owns a whole
GPU; a cluster starts in seconds from a plain pip install (Ray brings a runtime of its own,
a minute and gigabytes on a small box). Ray's edge, fractional GPUs and autoscaling, buys
nothing for shards that each fill one GPU.

How: both stages are resumable by shard (a finished shard file is never recomputed). Once
the stage's task has decided to compute (tasks.execute), N shard tasks, each given one
slice of the pending shards (the stage function's `shard` argument,
embedder.model.shards.ShardSlice), write shard files into the stage's partial folder in
parallel; then the stage function runs whole, finds every shard done, assembles, publishes.
Same shards, same files: the result equals the single-process path's.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle
from prefect import task
from prefect.states import State

from embedder.config import ScaleConfig
from embedder.model.shards import ShardSlice


def local_workers(scale: ScaleConfig) -> int:
    """Workers of the local cluster: `scale.workers`, else one per visible GPU for a CUDA
    cluster class (dask-cuda's LocalCUDACluster refuses more workers than GPUs), else 2."""
    if scale.workers is not None:
        return scale.workers
    if scale.cluster_class is not None and "CUDA" in scale.cluster_class:
        import torch

        return max(1, torch.cuda.device_count())
    return 2


def task_count(scale: ScaleConfig) -> int:
    """Shard tasks per fanned-out stage: `scale.tasks`, else 4 on an existing cluster, else
    one per local worker."""
    if scale.tasks is not None:
        return scale.tasks
    if scale.address is not None:
        return 4
    return local_workers(scale)


def shard_runner(scale: ScaleConfig) -> Any:
    """A started-on-enter prefect-dask task runner for `scale` (a local cluster by default)."""
    import dask
    from prefect_dask import DaskTaskRunner

    # Worker processes start DataLoader processes of their own: they must not be daemons.
    dask.config.set({"distributed.worker.daemon": False})
    if scale.address is not None:
        return DaskTaskRunner(address=scale.address)
    return DaskTaskRunner(
        cluster_class=scale.cluster_class,
        cluster_kwargs={"n_workers": local_workers(scale), "threads_per_worker": 1},
    )


class _LazyRunner:
    """`scale`'s task runner, started on the first `get` (a stage that computes) and kept
    until `close`: a run whose fanned-out stages are all reused starts no cluster."""

    def __init__(self, scale: ScaleConfig) -> None:
        self.scale = scale
        self.runner: Any = None
        self._stack = ExitStack()

    def get(self) -> Any:
        if self.runner is None:
            self.runner = self._stack.enter_context(shard_runner(self.scale))
        return self.runner

    def close(self) -> None:
        self._stack.close()


# The runners of this process, by key. A stage task gets a `Shards` (a key, not the runner:
# Prefect sends a task's parameters along with every task it submits, and a runner's client
# cannot be pickled).
_RUNNERS: dict[str, _LazyRunner] = {}


@contextmanager
def runner_for(scale: ScaleConfig) -> Iterator[str]:
    """A key `Shards` finds `scale`'s task runner by; the runner starts when a stage first
    computes its shards and stops with the block."""
    key = uuid.uuid4().hex
    _RUNNERS[key] = _LazyRunner(scale)
    try:
        yield key
    finally:
        _RUNNERS.pop(key).close()


@dataclass(frozen=True)
class Shards:
    """How a fan-out stage's shards are computed: `count` shard tasks on the started runner
    `runner_key` (`runner_for`), named after the stage's `label`. Called as execute_stage's
    `shards`, only when the stage computes."""

    runner_key: str
    label: str
    count: int

    def __call__(self, call: Any, partial: Path) -> None:
        fan_out(_RUNNERS[self.runner_key].get(), self.label, self.count, call, partial)


def _compute_slice(call_pickle: bytes, partial: str, index: int, count: int) -> None:
    """One worker's share of a stage's shards, written into its partial folder."""
    # Pickled by hand: prefect-dask's parameter handling unwraps `quote` and would rebuild
    # the call's dataclass fields as plain values.
    call = cloudpickle.loads(call_pickle)
    call.stage.function(**call.arguments(Path(partial), ShardSlice(index, count)))


compute_slice = task(_compute_slice, name="shards", retries=0)


def fan_out(runner: Any, label: str, count: int, call: Any, partial: Path) -> None:
    """Run `count` shard tasks of `call` on `runner`, each writing its slice of the shards
    into `partial` (the stage's partial folder, opened by tasks.execute), and wait; the first
    failure is raised. Bound to a runner, label and count, it is execute_stage's `shards`."""
    blob = cloudpickle.dumps(call)
    futures = [
        runner.submit(
            compute_slice.with_options(task_run_name=f"{label}-shards-{k + 1}of{count}"),
            {"call_pickle": blob, "partial": str(partial), "index": k, "count": count},
        )
        for k in range(count)
    ]
    for future in futures:
        future.wait()
    for future in futures:
        state: State = future.state
        if not state.is_completed():
            state.result()  # raises the worker's error
