"""The pipeline under real Prefect (one test server per session) and a real MLflow SQLite store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import SMALL_WORLD_OVERRIDES, TINY_MODEL_OVERRIDES

pytestmark = [pytest.mark.flow, pytest.mark.usefixtures("prefect_server")]


def _run(workdir: Path, **kwargs: Any) -> tuple[dict[str, str], dict[str, str]]:
    """Run the flow; return (stage -> folder, stage -> Prefect state name of its task run).
    The task runs themselves are kept in `_run.task_runs`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pipeline import pipeline

    overrides = [*SMALL_WORLD_OVERRIDES, *kwargs.pop("overrides", [])]
    kwargs.setdefault("until", "ingest")
    state = pipeline(workdir=str(workdir), overrides=overrides, return_state=True, **kwargs)
    paths = state.result()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
        )
    _run.task_runs = runs  # type: ignore[attr-defined]
    return paths, {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}


def _mlflow(workdir: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")


def test_second_run_is_cached_and_mlflow_holds_nested_runs(tmp_path: Path) -> None:
    paths, states = _run(tmp_path)
    assert states == {"world": "Completed", "ingest": "Completed"}
    ingest_dir = Path(paths["ingest"])
    assert (ingest_dir / "manifest.json").is_file()
    assert pq.read_table(ingest_dir / "pairs.parquet").num_rows == 200

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect:
        summaries = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["ingest-summary"]))
        )
    assert summaries and "| pairs | 200 |" in str(summaries[0].data)

    paths2, states2 = _run(tmp_path)
    assert paths2 == paths
    assert states2 == {"world": "Cached", "ingest": "Cached"}

    client = _mlflow(tmp_path)
    exp = client.get_experiment_by_name("gen2embed")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.info.run_name == "pipeline"]
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in parents)
    first_children = [
        r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
    ]
    ingest_run = next(r for r in first_children if r.info.run_name == "ingest")
    assert ingest_run.data.params["ingest.on_bad_rows"] == "error"
    assert ingest_run.data.metrics["rows_per_s"] > 0
    assert ingest_run.data.metrics["rows.pairs"] == 200
    assert ingest_run.data.tags["prefect.flow_run_id"]
    assert "manifest.json" in [a.path for a in client.list_artifacts(ingest_run.info.run_id)]
    cached = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[1].info.run_id]
    assert {r.info.run_name for r in cached} == {"world", "ingest"}
    cached_ingest = next(r for r in cached if r.info.run_name == "ingest")
    assert cached_ingest.data.tags["gen2embed.cached"] == "true"
    assert cached_ingest.data.tags["gen2embed.source_run"] == ingest_run.info.run_id


def test_damaged_or_deleted_result_is_recomputed(tmp_path: Path) -> None:
    paths, _ = _run(tmp_path)
    ingest_dir = Path(paths["ingest"])
    table = ingest_dir / "pairs.parquet"
    good = table.read_bytes()
    table.write_bytes(good[: len(good) // 2])
    _, states = _run(tmp_path)
    assert states == {"world": "Cached", "ingest": "Completed"}
    assert table.read_bytes() == good

    import shutil

    shutil.rmtree(ingest_dir)
    _, states = _run(tmp_path)
    assert states == {"world": "Cached", "ingest": "Completed"}
    assert table.read_bytes() == good


def test_from_and_force(tmp_path: Path) -> None:
    from flows.pipeline import PipelineError, pipeline

    with pytest.raises(PipelineError, match="needs published results of world"):
        pipeline(
            workdir=str(tmp_path),
            overrides=SMALL_WORLD_OVERRIDES,
            from_stage="ingest",
            until="ingest",
        )
    _run(tmp_path)
    _, states = _run(tmp_path, from_stage="ingest")
    assert states == {"world": "Cached", "ingest": "Completed"}  # world is reused, not run
    _, states = _run(tmp_path, force=["world"])
    assert states == {"world": "Completed", "ingest": "Completed"}


def test_bad_data_fails_the_stage_and_publishes_nothing(tmp_path: Path) -> None:
    from embedder.datasets.ingest import BadRowsError
    from flows.pipeline import pipeline

    root = tmp_path / "src"
    (root / "train" / "ImageNet_1K").mkdir(parents=True)
    (root / "img").mkdir()
    import pyarrow as pa

    row = {
        "qry": "<|image_1|>\nx",
        "qry_image_path": "gone.png",
        "pos_text": "a",
        "pos_image_path": "",
        "neg_text": "",
        "neg_image_path": "",
    }
    pq.write_table(
        pa.Table.from_pylist([row]), root / "train" / "ImageNet_1K" / "original-0.parquet"
    )
    overrides = [
        "ingest.source=mmeb",
        f"ingest.train_dir={root / 'train'}",
        f"ingest.train_images={root / 'img'}",
    ]
    work = tmp_path / "work"
    with pytest.raises(BadRowsError, match=r"gone\.png"):
        pipeline(workdir=str(work), overrides=overrides)
    folders = [p for p in (work / "artifacts" / "ingest").iterdir() if p.is_dir()]
    assert [p.suffix for p in folders] == [".partial"], "nothing published"
    client = _mlflow(work)
    exp = client.get_experiment_by_name("gen2embed")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert runs["ingest"].info.status == "FAILED"
    assert "BadRowsError" in runs["ingest"].data.tags["gen2embed.error"]
    assert runs["pipeline"].info.status == "FAILED"


def test_flow_parameters_render_as_a_form() -> None:
    from flows.pipeline import pipeline

    props = pipeline.parameters.model_dump()["properties"]
    assert set(props) == {
        "preset",
        "config_file",
        "overrides",
        "from_stage",
        "force",
        "until",
        "workdir",
    }
    assert props["preset"]["enum"] == ["tiny", "qwen2vl-2b"]
    assert props["preset"]["default"] == "tiny"
    assert all(p.get("description") for p in props.values()), "every field is documented"

    def enum_of(schema: dict) -> list[str]:
        for option in schema.get("anyOf", [schema]):
            if "enum" in option:
                return option["enum"]
            if option.get("type") == "array":
                return enum_of(option["items"])
        raise AssertionError(schema)

    from tasks.stages import STAGE_NAMES

    stages = ["world", "ingest", "pretrain", "embed", "zeroshot", "retrieve", "mine"]
    assert list(STAGE_NAMES) == stages
    assert enum_of(props["from_stage"]) == stages
    assert enum_of(props["force"]) == stages
    assert enum_of(props["until"]) == stages


def test_full_tiny_pipeline_reports_zero_shot_p1(tmp_path: Path) -> None:
    paths, states = _run(tmp_path, overrides=TINY_MODEL_OVERRIDES, until=None)
    stages = ["world", "ingest", "pretrain", "embed", "zeroshot", "retrieve", "mine"]
    assert states == dict.fromkeys(stages, "Completed")
    client = _mlflow(tmp_path)
    exp = client.get_experiment_by_name("gen2embed")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    zs = runs["zeroshot"].data.metrics
    for template in ("plain", "chat", "hierarchical"):
        assert 0.0 <= zs[f"p1.{template}.overall"] <= 1.0
        assert f"p1.{template}.ShapeClass" in zs
    assert zs["chance.ShapeClass"] == 1 / 12
    # Three pretraining steps make an unready generator: said at the end and tagged (8.15).
    assert "not ready" in runs["pipeline"].data.tags["gen2embed.warnings"]
    assert "not ready" in runs["pretrain"].data.tags["gen2embed.warnings"]
    from flows.cli import run_summary

    assert "pretrain: the tiny generator is not ready" in run_summary(paths, tmp_path)
    pre = runs["pretrain"].data.metrics
    assert {"vqa_acc.category", "vqa_acc.position", "final_loss"} <= set(pre)
    emb = runs["embed"].data.metrics
    assert emb["items_per_s"] > 0 and 0 < emb["padding_efficiency"] <= 1
    report = (Path(paths["zeroshot"]) / "report.md").read_text()
    assert "plain" in report.splitlines()[1] and "hierarchical" in report.splitlines()[1]
    assert "Next token predicted" in report
    mine = runs["mine"].data.metrics
    for strategy in ("saha", "topk", "topk_margin", "in_batch"):
        assert 0.0 <= mine[f"planted_fn_rate.{strategy}"] <= 1.0
    assert 0 < mine["coverage"] <= 1
    assert runs["retrieve"].data.metrics["queries"] > 0
    # An explicit mine.k wins over the default recipe, and R = 2km follows it.
    from embedder.artifacts import MANIFEST, Manifest

    def manifest(stage: str) -> Manifest:
        return Manifest.from_json((Path(paths[stage]) / MANIFEST).read_text())

    assert manifest("mine").config["mine"].items() >= {"k": 5, "m": 3, "recipe": "custom"}.items()
    assert manifest("retrieve").config["retrieve"]["top_r"] == 30
    assert manifest("retrieve").inputs == {"embed": manifest("embed").fingerprint}
    import polars as pl

    clusters = pl.read_parquet(Path(paths["mine"]) / "clusters.parquet")
    assert set(clusters["role"].unique()) == {"anchor", "negative"}
    assert (Path(paths["mine"]) / "scores.png").stat().st_size > 0
    logged = {a.path for a in client.list_artifacts(runs["mine"].info.run_id)}
    assert {"scores.png", "diagnostics.json", "manifest.json"} <= logged
    _assert_run_graph(_run.task_runs, paths)  # type: ignore[attr-defined]
    _, again = _run(tmp_path, overrides=TINY_MODEL_OVERRIDES, until=None)
    assert set(again.values()) == {"Cached"}


def _assert_run_graph(task_runs: list[Any], paths: dict[str, str]) -> None:
    """Prefect draws each stage's real inputs (no stage depends on every earlier one), shows
    the fingerprint as the cache key and a plain retry delay."""
    name_of = {r.id: r.name.rsplit("-", 1)[0] for r in task_runs}
    graph = {}
    for r in task_runs:
        ids = {i.id for inputs in r.task_inputs.values() for i in inputs if hasattr(i, "id")}
        graph[name_of[r.id]] = {name_of[i] for i in ids}
    assert graph == {
        "world": set(),
        "ingest": {"world"},
        "pretrain": set(),
        "embed": {"ingest", "pretrain"},
        "zeroshot": {"ingest", "pretrain"},
        "retrieve": {"embed"},
        "mine": {"retrieve", "embed"},
    }
    for r in task_runs:
        stage = name_of[r.id]
        assert r.cache_key == f"{stage}-{Path(paths[stage]).name}"
        assert r.empirical_policy.retry_delay == 10


# The demo's seeds and world with a shorter pretraining: the facts below hold for it (and
# for the full demo); see bench/RESULTS.md for the numbers.
DEMO_SEED_FACTS = ["pretrain.steps=900", "zeroshot.max_queries=30"]


def test_miniature_facts_on_the_demo_seed(tmp_path: Path) -> None:
    """Facts of the tiny run, not ranges: which pairs the clusters hold and in what order,
    and the orderings the paper predicts on the fixed demo seed."""
    import polars as pl

    paths, _ = _run(tmp_path, overrides=DEMO_SEED_FACTS, until=None)
    check_miniature_facts(paths)

    # Top-k, mined from the same cached candidates, picks other clusters.
    other, states = _run(tmp_path, overrides=[*DEMO_SEED_FACTS, "mine.strategy=topk"], until=None)
    assert states["retrieve"] == "Cached" and states["mine"] == "Completed"
    topk = pl.read_parquet(Path(other["mine"]) / "clusters.parquet")

    def members(table: pl.DataFrame) -> set[tuple[str, ...]]:
        return {tuple(g["id"].to_list()) for _, g in table.sort("position").group_by("cluster")}

    assert members(topk) != members(pl.read_parquet(Path(paths["mine"]) / "clusters.parquet"))


def check_miniature_facts(paths: dict[str, str], top_r: int = 2 * 15 * 3) -> None:
    """What a run of the miniature world on the demo seed must show (stage -> folder)."""
    import json

    import numpy as np
    import polars as pl

    from embedder.model.shards import load_embeddings

    report = json.loads((Path(paths["zeroshot"]) / "report.json").read_text())["templates"]
    assert report["hierarchical"]["aggregate"]["overall"] > report["plain"]["aggregate"]["overall"]
    diagnostics = json.loads((Path(paths["mine"]) / "diagnostics.json").read_text())
    assert diagnostics["saha"]["planted_fn_rate"] < diagnostics["topk"]["planted_fn_rate"]

    # The clusters' pair ids lead back to the embeddings that were mined.
    keys = pl.read_parquet(Path(paths["embed"]) / "pair_keys.parquet").unique("id", keep="first")
    vectors = dict(zip(*load_embeddings(Path(paths["embed"]) / "shards"), strict=True))
    clusters = pl.read_parquet(Path(paths["mine"]) / "clusters.parquet").join(
        keys.select("id", "meta_task", "qry_key", "pos_key"), on="id", how="left"
    )
    assert clusters["qry_key"].null_count() == 0, "every cluster member is a training pair"
    checked = 0
    for (subset,), part in clusters.group_by(["subset"]):
        pool = keys.filter(pl.col("subset") == subset)["pos_key"].unique().to_list()
        pos = np.stack([vectors[k] for k in pool])
        for (_,), cluster in part.sort("position").group_by(["cluster"], maintain_order=True):
            anchor, negatives = cluster.row(0, named=True), cluster.slice(1).to_dicts()
            assert anchor["role"] == "anchor" and {n["role"] for n in negatives} <= {"negative"}
            qa = vectors[anchor["qry_key"]]
            retrieved = {pool[i] for i in np.argsort(-(pos @ qa), kind="stable")[:top_r]}
            for n in negatives:
                assert n["pos_key"] != anchor["pos_key"], "never the anchor's own positive"
                assert n["pos_key"] in retrieved, "a negative's positive was retrieved"
            if anchor["meta_task"] != "classification":
                sims = [float(vectors[n["qry_key"]] @ qa) for n in negatives]
                assert sims == sorted(sims), "kept negatives: least query-similar first"
            checked += 1
    assert checked == diagnostics["saha"]["clusters"]


def test_a_moved_workdir_still_runs(tmp_path: Path) -> None:
    """Issue 8.4: folders record paths relative to the workdir, so after moving it a forced
    embed finds the images the ingest stage checked."""
    import json
    import shutil

    before = tmp_path / "before"
    paths, _ = _run(before, overrides=TINY_MODEL_OVERRIDES, until="embed")
    recorded = json.loads((Path(paths["ingest"]) / "manifest.json").read_text())["output"]
    assert not Path(recorded["pairs_images"]).is_absolute()
    plan = json.loads((Path(paths["embed"]) / "shards" / "plan.json").read_text())
    assert plan["model"] == "model", "the resume plan names no absolute path"
    after = tmp_path / "after"
    shutil.move(before, after)
    moved, states = _run(after, overrides=TINY_MODEL_OVERRIDES, until="embed", force=["embed"])
    assert states["ingest"] == "Cached" and states["embed"] == "Completed"
    assert moved["embed"].startswith(str(after))
    client = _mlflow(after)
    exp = client.get_experiment_by_name("gen2embed")
    assert exp.artifact_location == (after / "mlartifacts").as_uri(), "artifacts stay inside"
    assert any(e.name.startswith("gen2embed (artifacts at") for e in client.search_experiments())
    assert not before.exists()
