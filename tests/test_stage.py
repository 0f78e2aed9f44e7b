"""The stage contract's pure parts: planning the method, names, transient errors."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from embedder.artifacts import ArtifactStore
from embedder.config import load_config
from flows.pipeline import method
from tasks.execute import PipelineError, is_transient
from tasks.pipeline_run import PipelineRun
from tasks.selection import plan
from tasks.stages import STAGE_NAMES


def test_plan_chains_fingerprints(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    planned = plan(method, load_config("tiny"), store, verify=True)
    assert {p.name for p in planned} == set(STAGE_NAMES)
    assert [p.label for p in planned][:6] == [
        *STAGE_NAMES[:4],
        "retrieve",
        "evaluate[zeroshot-plain]",
    ]
    by_name = {p.name: p for p in planned}
    assert not any(p.cached for p in planned)
    other = {
        p.name: p for p in plan(method, load_config("tiny", overrides=["world.seed=9"]), store)
    }
    assert other["world"].fingerprint != by_name["world"].fingerprint
    assert other["ingest"].fingerprint != by_name["ingest"].fingerprint, "a new world: new ingest"
    same_world = {
        p.name: p
        for p in plan(method, load_config("tiny", overrides=["ingest.batch_rows=5"]), store)
    }
    assert same_world["world"].fingerprint == by_name["world"].fingerprint
    assert same_world["embed"].fingerprint != by_name["embed"].fingerprint, "downstream of ingest"
    assert same_world["pretrain"].fingerprint == by_name["pretrain"].fingerprint, "not downstream"
    deeper = {p.name: p for p in plan(method, load_config("tiny", overrides=["mine.k=5"]), store)}
    assert deeper["retrieve"].fingerprint != by_name["retrieve"].fingerprint, "R = 2km moved"
    assert deeper["embed"].fingerprint == by_name["embed"].fingerprint


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
    planned = plan(method, cfg, store)
    # No eval table: the rows fine-tune but nothing evaluates; zero-shot rows have no stage.
    assert [p.label for p in planned] == [
        "ingest",
        "pretrain",
        "embed",
        "retrieve",
        "mine[inbatch-plain]",
        "finetune[inbatch-plain]",
        "mine[inbatch-hierarchical]",
        "finetune[inbatch-hierarchical]",
        "mine[saha-hierarchical]",
        "finetune[saha-hierarchical]",
    ]
    # The in-batch rows share their mining (one fingerprint), not their fine-tuning.
    fps = {p.label: p.fingerprint for p in planned}
    assert fps["mine[inbatch-plain]"] == fps["mine[inbatch-hierarchical]"]
    assert fps["mine[inbatch-plain]"] != fps["mine[saha-hierarchical]"]
    assert len({fps[k] for k in fps if k.startswith("finetune")}) == 3
    table.write_bytes(b"v2 with new rows")
    assert plan(method, cfg, store)[0].fingerprint != planned[0].fingerprint


def test_stage_options_must_name_a_stage_of_this_pipeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEN2EMBED_HOME", str(tmp_path))  # the model digest cache lives there
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cfg = load_config("tiny", overrides=[f"model.backbone={model}"])
    with pytest.raises(PipelineError, match="--force pretrain: not part of this pipeline"):
        PipelineRun(method, cfg, str(tmp_path), preset="tiny", force=["pretrain"])
    zero_shot_only = cfg.with_rows(["zeroshot-plain"])
    with pytest.raises(PipelineError, match="--until finetune: not part"):
        PipelineRun(method, zero_shot_only, str(tmp_path), preset="tiny", until="finetune")


def test_only_transient_errors_are_retried() -> None:
    assert is_transient(ConnectionResetError())
    assert is_transient(TimeoutError())
    assert is_transient(OSError(errno.ESTALE, "stale NFS handle"))
    assert not is_transient(OSError(errno.ENOENT, "missing"))
    assert not is_transient(ValueError("bad row"))


def test_a_stage_reads_its_shape_from_the_function_signature() -> None:
    from tasks import stages

    assert stages.evaluate.sections == {"model": "model", "embed": "embed", "cfg": "evaluate"}
    assert list(stages.evaluate.upstream) == ["data", "generator", "adapter"]
    assert list(stages.mine.upstream) == ["cands", "emb"]
    assert stages.ingest.inputs is not None
    assert stages.embed.takes_shard and stages.evaluate.takes_shard
    assert not stages.mine.takes_shard


def _outputs() -> dict[str, Any]:
    from embedder.outputs import Candidates, Embeddings

    return {
        "cands": Candidates(folder=Path("c"), stage="retrieve", fingerprint="c1"),
        "emb": Embeddings(folder=Path("e"), stage="embed", fingerprint="e1"),
    }


@pytest.mark.parametrize(
    ("given", "error"),
    [
        (
            {"emb": "emb"},
            r"stage mine takes \(cands: Candidates, emb: Embeddings\) by name; check cands",
        ),
        ({"cands": "cands", "emb": "emb", "data": "emb"}, r"by name; check data"),
        ({"cands": "emb", "emb": "cands"}, r"by name; check cands, emb"),
        ({"candidates": "cands", "emb": "emb"}, r"check candidates, cands"),
    ],
    ids=["missing", "unknown", "swapped types", "misspelt"],
)
def test_upstream_outputs_reach_a_stage_by_parameter_name(
    given: dict[str, str], error: str
) -> None:
    from tasks import stages
    from tasks.stage import running

    outputs = _outputs()
    calls: list[Any] = []
    cfg = load_config("tiny")
    with running(calls.append), pytest.raises(TypeError, match=error):
        stages.mine(cfg, **{p: outputs[o] for p, o in given.items()})
    with pytest.raises(TypeError):  # by position: never
        stages.mine(cfg, outputs["cands"], outputs["emb"])  # type: ignore[call-arg]
    with running(calls.append):
        stages.mine(cfg, emb=outputs["emb"], cands=outputs["cands"])  # any order
    (call,) = calls
    assert call.upstream == {"cands": outputs["cands"], "emb": outputs["emb"]}
    assert call.inputs == {"retrieve": "c1", "embed": "e1"}


def test_a_shard_slice_is_an_argument_only_fan_out_stages_take() -> None:
    from embedder.model.shards import ShardSlice
    from tasks import stages
    from tasks.stage import Stage, StageCall

    cfg = load_config("tiny")
    sections = {"model": cfg.model, "embed": cfg.embed}
    call = StageCall(stages.embed, "fp", sections, {"data": None, "generator": None}, {})
    assert call.arguments(Path("out"))["shard"] is None
    assert call.arguments(Path("out"), ShardSlice(1, 2))["shard"] == ShardSlice(1, 2)
    mine = StageCall(stages.mine, "fp", {"mine": cfg.mine}, {"cands": None, "emb": None}, {})
    assert "shard" not in mine.arguments(Path("out"))
    with pytest.raises(ValueError, match="mine does not share out its work"):
        mine.arguments(Path("out"), ShardSlice(0, 2))
    with pytest.raises(TypeError, match="a fan-out stage's function takes `shard`"):
        Stage("mine", stages.mine.function, resumable=True, fan_out=True)
    for index, count in [(2, 2), (-1, 2), (0, 0)]:
        with pytest.raises(ValueError, match="shard slice"):
            ShardSlice(index, count)
    assert [s for s in range(7) if ShardSlice(1, 3).owns(s)] == [1, 4]


def test_a_function_of_another_shape_is_refused() -> None:
    from tasks.stage import Stage

    def wrong(cfg: dict, out: Path) -> None:  # type: ignore[empty-body]
        """Not a stage function: a plain dict is not a config section."""

    with pytest.raises(TypeError, match="a stage function takes config sections"):
        Stage("wrong", wrong)
