"""The stage contract's pure parts: planning, transient errors, --from / --force."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from embedder.artifacts import ArtifactStore
from embedder.config import load_config
from flows.pipeline import PipelineError, stages_to_recompute
from tasks.stage import PlannedStage, is_transient, plan_stages
from tasks.stages import PIPELINE


def test_plan_chains_fingerprints(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    plan = plan_stages(load_config("tiny"), store, PIPELINE)
    assert [p.name for p in plan] == [
        "world",
        "ingest",
        "pretrain",
        "embed",
        "zeroshot",
        "retrieve",
        "mine",
    ]
    assert plan[1].inputs == {"world": plan[0].fingerprint}
    assert plan[3].inputs == {"ingest": plan[1].fingerprint, "pretrain": plan[2].fingerprint}
    assert not any(p.cached for p in plan)
    other = plan_stages(load_config("tiny", overrides=["world.seed=9"]), store, PIPELINE)
    assert other[0].fingerprint != plan[0].fingerprint
    assert other[1].fingerprint != plan[1].fingerprint, "a new world invalidates ingest"
    same_world = plan_stages(
        load_config("tiny", overrides=["ingest.batch_rows=5"]), store, PIPELINE
    )
    assert same_world[0].fingerprint == plan[0].fingerprint


def test_real_sources_are_fingerprinted_by_their_files(tmp_path: Path) -> None:
    (tmp_path / "train" / "VOC2007").mkdir(parents=True)
    table = tmp_path / "train" / "VOC2007" / "original-0.parquet"
    table.write_bytes(b"v1")
    (tmp_path / "img").mkdir()
    cfg = load_config(
        "tiny",
        overrides=[
            "ingest.source=mmeb",
            f"ingest.train_dir={tmp_path / 'train'}",
            f"ingest.train_images={tmp_path / 'img'}",
        ],
    )
    store = ArtifactStore(tmp_path / "w")
    plan = plan_stages(cfg, store, PIPELINE)
    names = ["ingest", "pretrain", "embed", "retrieve", "mine"]
    assert [p.name for p in plan] == names, "no world, no zeroshot"
    table.write_bytes(b"v2 with new rows")
    assert plan_stages(cfg, store, PIPELINE)[0].fingerprint != plan[0].fingerprint


def test_only_transient_errors_are_retried() -> None:
    assert is_transient(ConnectionResetError())
    assert is_transient(TimeoutError())
    assert is_transient(OSError(errno.ESTALE, "stale NFS handle"))
    assert not is_transient(OSError(errno.ENOENT, "missing"))
    assert not is_transient(ValueError("bad row"))


def _plan(*cached: bool) -> list[PlannedStage]:
    names = ["world", "ingest", "embed"][: len(cached)]
    return [
        PlannedStage(n, "fp", {}, (), Path(n), c, ()) for n, c in zip(names, cached, strict=True)
    ]


def test_from_and_force_semantics() -> None:
    assert stages_to_recompute(_plan(True, True, True), None, []) == (set(), 0)
    assert stages_to_recompute(_plan(True, True, True), None, ["ingest"]) == (
        {"ingest", "embed"},
        0,
    )
    assert stages_to_recompute(_plan(True, False, False), "ingest", []) == ({"ingest", "embed"}, 1)
    with pytest.raises(PipelineError, match="needs published results of world"):
        stages_to_recompute(_plan(False, True, True), "embed", [])
    with pytest.raises(PipelineError, match="not part of this pipeline"):
        stages_to_recompute(_plan(True, True), None, ["finetune"])
