"""Scale-out: the embed and evaluate stages fanned out over shards as Prefect tasks on a
local two-worker Dask cluster give the single-process path's vectors and scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from embedder.config import ConfigError, load_config
from embedder.model.shards import load_embeddings
from tests.conftest import TINY_MODEL_OVERRIDES
from tests.test_flow import _run

pytestmark = [pytest.mark.flow, pytest.mark.usefixtures("prefect_server")]
ROW = "saha-hierarchical"
# Shards of one batch each, so both stages have several shards to share out.
SMALL_SHARDS = [*TINY_MODEL_OVERRIDES, "embed.shard_size=8", "embed.batch_size=8"]


def test_shards_on_a_two_worker_dask_cluster_equal_the_single_process_path(
    tmp_path: Path,
) -> None:
    run = {"until": None, "rows": [ROW]}
    single, _ = _run(tmp_path / "single", overrides=SMALL_SHARDS, **run)
    dask = ["scale.engine=dask", "scale.workers=2"]
    spread, _ = _run(tmp_path / "dask", overrides=[*SMALL_SHARDS, *dask], **run)
    states = {r.name: r.state.name for r in _run.task_runs}  # type: ignore[attr-defined]
    shard_tasks = sorted(k for k in states if "-shards-" in k)
    assert shard_tasks == [
        "embed-shards-1of2",
        "embed-shards-2of2",
        f"evaluate[{ROW}]-shards-1of2",
        f"evaluate[{ROW}]-shards-2of2",
    ]
    assert all(states[k] == "Completed" for k in shard_tasks)
    # Same fingerprints (scale is not a result setting), same vectors, same scores.
    stage_folders = [k for k in single if k != "report"]  # reports are per run
    assert [Path(single[k]).name for k in stage_folders] == [
        Path(spread[k]).name for k in stage_folders
    ]
    for label, sub in (("embed", "shards"), (f"evaluate[{ROW}]", "embeddings")):
        keys_a, vecs_a = load_embeddings(Path(single[label]) / sub)
        keys_b, vecs_b = load_embeddings(Path(spread[label]) / sub)
        assert len(list((Path(spread[label]) / sub).glob("shard-*"))) > 2
        assert keys_a == keys_b
        np.testing.assert_allclose(vecs_a, vecs_b, rtol=0, atol=1e-6)
    # The workers did every shard; the stage task itself only assembled and published.
    embed = json.loads((Path(spread["embed"]) / "manifest.json").read_text())["metrics"]
    assert embed["resumed_shards"] == embed["shards"] > 2
    report = f"evaluate[{ROW}]"
    a = json.loads((Path(single[report]) / "report.json").read_text())
    b = json.loads((Path(spread[report]) / "report.json").read_text())
    assert a["subsets"] == b["subsets"]


def test_an_existing_cluster_and_local_cluster_settings_are_one_error() -> None:
    with pytest.raises(ConfigError, match=r"scale\.address and scale\.workers are both set"):
        load_config("tiny", overrides=["scale.address=tcp://10.0.0.1:8786", "scale.workers=4"])


@pytest.mark.parametrize(
    ("settings", "gpus", "workers", "tasks"),
    [
        ({}, 0, 2, 2),
        ({"workers": 3}, 0, 3, 3),
        ({"cluster_class": "dask_cuda.LocalCUDACluster"}, 1, 1, 1),
        ({"cluster_class": "dask_cuda.LocalCUDACluster"}, 8, 8, 8),
        ({"cluster_class": "dask_cuda.LocalCUDACluster", "workers": 2}, 8, 2, 2),
        ({"cluster_class": "dask_cuda.LocalCUDACluster", "tasks": 16}, 8, 8, 16),
        ({"address": "tcp://10.0.0.1:8786"}, 0, None, 4),
    ],
)
def test_a_local_cuda_cluster_gets_a_worker_per_gpu_unless_told(
    monkeypatch: pytest.MonkeyPatch,
    settings: dict[str, object],
    gpus: int,
    workers: int | None,
    tasks: int,
) -> None:
    """dask-cuda refuses more workers than visible GPUs: the default of 2 would not start on
    a one-GPU box."""
    import torch

    from embedder.config import ScaleConfig
    from tasks.scale import local_workers, task_count

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    scale = ScaleConfig(engine="dask", **settings)
    if workers is not None:
        assert local_workers(scale) == workers
    assert task_count(scale) == tasks
