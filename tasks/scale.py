"""Fan-out of the embed and evaluate stages over their shards, as mapped Prefect tasks on a
Dask cluster (prefect-dask), never a scheduler of our own.

Why Dask and not Ray: dask-cuda's `LocalCUDACluster` (or `dask-cuda-worker` on each GPU box)
starts one worker per GPU pinned with CUDA_VISIBLE_DEVICES, so each shard task owns a whole
GPU; a cluster starts in seconds from a plain pip install (Ray brings a runtime of its own,
a minute and gigabytes on a small box). Ray's edge, fractional GPUs and autoscaling, buys
nothing for shards that each fill one GPU.

How: both stages are resumable by shard (a finished shard file is never recomputed). Before
the stage's own task runs, N shard tasks, each given one slice of the pending shards
(`embedder.model.encode.shard_slice`), write shard files into the stage's partial folder in
parallel; then the stage task runs as always, finds every shard done, assembles, publishes.
Same shards, same files: the result equals the single-process path's.
"""

from __future__ import annotations

from typing import Any

import cloudpickle
from prefect import task
from prefect.states import State

from embedder.artifacts import ArtifactStore
from embedder.config import ScaleConfig
from embedder.model.encode import shard_slice


def task_count(scale: ScaleConfig) -> int:
    if scale.tasks is not None:
        return scale.tasks
    if scale.address is not None:
        return 4
    return scale.workers or 2


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
        cluster_kwargs={"n_workers": scale.workers or 2, "threads_per_worker": 1},
    )


def _compute_slice(call_pickle: bytes, workdir: str, index: int, count: int) -> None:
    """One worker's share of a stage's shards, written into its partial folder."""
    # Pickled by hand: prefect-dask's parameter handling unwraps `quote` and would rebuild
    # the call's dataclass fields as plain values.
    call = cloudpickle.loads(call_pickle)
    store = ArtifactStore(workdir)
    partial = store.partial_path(call.stage.name, call.fingerprint)
    with shard_slice(index, count):
        call.stage.function(**call.arguments(partial))


compute_slice = task(_compute_slice, name="shards", retries=0)


def fan_out(runner: Any, call: Any, workdir: str, label: str, count: int) -> None:
    """Run `count` shard tasks of `call` on `runner` and wait; the first failure is raised."""
    blob = cloudpickle.dumps(call)
    futures = [
        runner.submit(
            compute_slice.with_options(task_run_name=f"{label}-shards-{k + 1}of{count}"),
            {"call_pickle": blob, "workdir": workdir, "index": k, "count": count},
        )
        for k in range(count)
    ]
    for future in futures:
        future.wait()
    for future in futures:
        state: State = future.state
        if not state.is_completed():
            state.result()  # raises the worker's error
