"""`finetune` across ranks under torchrun (two CPU processes, gloo): the global batch split
over ranks trains the adapter a single process trains on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tests.conftest import SMALL_WORLD_OVERRIDES, TINY_MODEL_OVERRIDES
from tests.test_flow import _run

pytestmark = [pytest.mark.flow, pytest.mark.usefixtures("prefect_server")]

ROW = "saha-hierarchical"
# No dropout, so the two ranks' forward passes equal the single process's.
TRAIN = ["finetune.steps=3", "finetune.lora_dropout=0.0", "finetune.chunk_size=4"]


def _torchrun(workdir: Path, overrides: list[str]) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29517",
        "-m",
        "flows.torchrun_finetune",
        "--workdir",
        str(workdir),
        "--row",
        ROW,
    ]
    for o in [*SMALL_WORLD_OVERRIDES, *overrides]:
        cmd += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def test_two_ranks_train_what_one_process_trains_on_the_same_global_batch(
    tmp_path: Path,
) -> None:
    # The pipeline up to mining, then the row's finetune under torchrun: 2 ranks x 16 pairs.
    base = [*TINY_MODEL_OVERRIDES, *TRAIN]
    two_ranks = [*base, "finetune.pairs_per_batch=16"]
    _run(tmp_path, overrides=two_ranks, until="mine", rows=[ROW])
    res = _torchrun(tmp_path, two_ranks)
    assert res.returncode == 0, res.stderr[-3000:]
    # Rank 0 recorded the job as one MLflow run: curves each step once, the adapter.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    name = f"finetune[{ROW}] (torchrun x2)"
    (job,) = client.search_runs(["1"], filter_string=f"attributes.run_name = '{name}'")
    assert job.info.status == "FINISHED" and job.data.tags["gen2embed.world_size"] == "2"
    steps = sorted(m.step for m in client.get_metric_history(job.info.run_id, "train_loss"))
    assert steps == list(range(1, len(steps) + 1)) and steps
    assert "adapter" in [a.path for a in client.list_artifacts(job.info.run_id)]
    # The next pipeline run finds it published under the pipeline's own fingerprint.
    paths, states = _run(tmp_path, overrides=two_ranks, until=None, rows=[ROW])
    assert states[f"finetune[{ROW}]"] == "Cached"
    assert states[f"evaluate[{ROW}]"] == "Completed"
    distributed = Path(paths[f"finetune[{ROW}]"])
    # One process, 32 pairs per step: the same global batches.
    single, _ = _run(
        tmp_path, overrides=[*base, "finetune.pairs_per_batch=32"], until="finetune", rows=[ROW]
    )
    one = Path(single[f"finetune[{ROW}]"])
    a = load_file(str(distributed / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        # Float noise only: other padding and chunking; Adam scales tiny gradients up.
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)
    loss_a = json.loads((distributed / "history.json").read_text())["loss"]
    loss_b = json.loads((one / "history.json").read_text())["loss"]
    assert loss_a == pytest.approx(loss_b, rel=1e-4)


def test_missing_inputs_are_one_clear_message(tmp_path: Path) -> None:
    res = _torchrun(tmp_path, [*TINY_MODEL_OVERRIDES, *TRAIN])
    assert res.returncode != 0
    assert "gen2embed: world is not published" in res.stderr
    assert "--until world" in res.stderr
