"""SaHa and the baselines on hand-built embedding sets whose geometry fixes the answer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from embedder.config import MineConfig, RetrieveConfig
from embedder.mining import (
    Cluster,
    MiningError,
    SubsetPool,
    diagnose,
    load_pools,
    mine_clusters,
    mine_subset,
    oracle_filter,
)
from embedder.outputs import Embeddings
from embedder.retrieval import (
    approximate_search,
    exact_search,
    recall_at_k,
    retrieve_candidates,
)


def unit(*v: float) -> np.ndarray:
    x = np.array(v, dtype=np.float32)
    return x / np.linalg.norm(x)


def make_pool(q: list[np.ndarray], p: list[np.ndarray], rows: list[tuple[int, int]],
              r: int, classification: bool = False) -> SubsetPool:  # fmt: skip
    queries, positives = np.stack(q), np.stack(p)
    res = exact_search(queries, positives, r, device="cpu")
    row_q = np.array([a for a, _ in rows])
    last = np.zeros(len(q), dtype=np.int64)
    last[row_q] = np.arange(len(rows))
    return SubsetPool("S", classification, row_q, np.array([b for _, b in rows]), last,
                      queries, positives, res.indices, res.scores)  # fmt: skip


def test_own_positive_dropped_and_owner_choice() -> None:
    # Positive 1 is owned by queries 1 and 2; query 2 is closer to the anchor (query 0).
    q = [unit(1, 0, 0), unit(0, 1, 0), unit(0.9, 0.1, 0)]
    p = [unit(1, 0, 0), unit(0.95, 0.05, 0)]
    pool = make_pool(q, p, [(0, 0), (1, 1), (2, 1)], r=2)
    clusters = mine_subset(pool, "topk", MineConfig(k=1, m=1))
    first = clusters[0]
    assert first.anchor == 0
    assert first.members == [2], "the owner most similar to the anchor is chosen"
    assert all(c.anchor not in c.members for c in clusters), "never its own negative"


def test_classification_never_takes_same_label_queries() -> None:
    # Two labels; three queries of label A (positive 0), three of label B (positive 1).
    q = [unit(1, 0.1 * i, 0) for i in range(3)] + [unit(0.8, 0.5, 0.1 * i) for i in range(3)]
    p = [unit(1, 0, 0), unit(0.8, 0.6, 0)]
    rows = [(0, 0), (1, 0), (2, 0), (3, 1), (4, 1), (5, 1)]
    pool = make_pool(q, p, rows, r=2, classification=True)
    label = {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 1}
    clusters = mine_subset(pool, "saha", MineConfig(k=1, m=2))
    # Rows in order: 0 (A) takes B's first free owner, 3 is the closest of 3..5 to query 0;
    # 1 (A) takes 4; 2 (A) takes 5; every query is then used.
    assert [(c.anchor, c.members) for c in clusters] == [(0, [3]), (1, [4]), (2, [5])]
    for c in clusters:
        assert all(label[o] != label[c.anchor] for o in c.members)


def _star(classification: bool) -> SubsetPool:
    """Anchor 0; positives 1..6 ranked by score; their owners 1..6 have query-query
    similarity to the anchor that *rises* down the ranking except owner 2, the least similar."""
    d = 8
    rng = np.random.default_rng(0)
    a = unit(*([1.0] + [0.0] * (d - 1)))
    qsim = {1: 0.5, 2: 0.1, 3: 0.6, 4: 0.7, 5: 0.8, 6: 0.9}
    q = [a]
    for i in range(1, 7):
        other = np.zeros(d, dtype=np.float32)
        other[i] = 1.0
        q.append(unit(*(qsim[i] * a + np.sqrt(1 - qsim[i] ** 2) * other)))
    p = [a + 0.0]
    for i in range(1, 7):  # descending score for the anchor: 0.9, 0.85, ...
        s = 0.95 - 0.05 * i
        noise = unit(*rng.normal(size=d))
        noise -= (noise @ a) * a
        noise /= np.linalg.norm(noise)
        p.append(unit(*(s * a + np.sqrt(1 - s * s) * noise)))
    rows = [(i, i) for i in range(7)]
    return make_pool(q, p, rows, r=7, classification=classification)


def test_false_negative_filter_keeps_least_similar() -> None:
    pool = _star(classification=False)
    first = mine_subset(pool, "saha", MineConfig(k=2, m=3))[0]
    assert first.anchor == 0
    # C = 6 owners in retrieval order 1..6; the 2 least similar queries are 2 (0.1), 1 (0.5).
    assert first.members == [2, 1]


def test_classification_keeps_retrieval_order() -> None:
    pool = _star(classification=True)
    first = mine_subset(pool, "saha", MineConfig(k=2, m=3))[0]
    assert first.members == [1, 2]


def test_topk_takes_retrieval_order_and_margin_drops_near_positives() -> None:
    pool = _star(classification=False)
    assert mine_subset(pool, "topk", MineConfig(k=2, m=3))[0].members == [1, 2]
    # Own positive scores 1.0; margin 0.83 drops candidates scoring 0.9 and 0.85 (ranks 1 and 2).
    assert mine_subset(pool, "topk_margin", MineConfig(k=2, margin=0.83))[0].members == [3, 4]


def test_phase_one_uses_each_pair_once_and_phase_two_fills_leftovers() -> None:
    rng = np.random.default_rng(3)
    n = 40
    q = [unit(*v) for v in rng.normal(size=(n, 6))]
    p = [unit(*(v + 0.3 * rng.normal(size=6))) for v in q]
    pool = make_pool(q, p, [(i, i) for i in range(n)], r=12)
    clusters = mine_subset(pool, "saha", MineConfig(k=3, m=2))
    phase1 = [c for c in clusters if c.phase == 1]
    seen = [x for c in phase1 for x in (c.anchor, *c.members)]
    assert len(seen) == len(set(seen)), "phase 1 uses every pair at most once"
    phase2 = [c for c in clusters if c.phase == 2]
    assert phase2, "leftover anchors are clustered in phase 2"
    used1 = set(seen)
    assert all(c.anchor not in used1 for c in phase2)
    assert any(set(c.members) & used1 for c in phase2), "phase 2 may reuse phase-1 owners"
    anchors = [c.anchor for c in clusters]
    assert len(anchors) == len(set(anchors))
    diag = diagnose(pool, clusters, [None] * n)
    assert diag.coverage == 1.0
    assert 0 < diag.phase2_share < 1


def test_deterministic_for_a_seed() -> None:
    rng = np.random.default_rng(5)
    q = [unit(*v) for v in rng.normal(size=(30, 5))]
    pool = make_pool(q, [unit(*(v + 0.2)) for v in q], [(i, i) for i in range(30)], r=10)

    def run(seed: int, strategy: str = "saha") -> list[tuple[int, list[int]]]:
        params = MineConfig(k=2, m=2, seed=seed, shuffle=True)
        return [(c.anchor, c.members) for c in mine_subset(pool, strategy, params)]  # type: ignore[arg-type]

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert run(1, "in_batch") == run(1, "in_batch")


def test_planted_false_negative_rate() -> None:
    # Queries 0 and 1 are a planted pair; a cluster holding both counts it.
    q = [unit(1, 0), unit(0.9, 0.1), unit(0, 1), unit(0.1, 0.9)]
    pool = make_pool(q, q, [(i, i) for i in range(4)], r=4)
    clusters = mine_subset(pool, "topk", MineConfig(k=1, m=1))
    diag = diagnose(pool, clusters, ["g", "g", None, None])
    assert diag.planted_fn_pairs == 1
    assert diag.planted_fn_rate == 1.0
    filtered = mine_subset(pool, "saha", MineConfig(k=1, m=3))
    assert diagnose(pool, filtered, ["g", "g", None, None]).planted_fn_rate == 0.0


def test_faiss_matches_numpy_exact_top_r() -> None:
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(500, 32)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    queries = pool[:50] + 0.1 * rng.normal(size=(50, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    res = exact_search(queries, pool, 20, batch=7, device="cpu")
    ref = np.argsort(-(queries @ pool.T), axis=1, kind="stable")[:, :20]
    assert res.backend == "faiss-cpu"
    assert (res.indices == ref).mean() > 0.99  # ties aside
    np.testing.assert_allclose(res.scores, np.take_along_axis(queries @ pool.T, ref, 1), atol=1e-5)
    for kind in ("ivf", "hnsw"):
        approx = approximate_search(queries, pool, 20, kind=kind, nlist=8, nprobe=4)  # type: ignore[arg-type]
        assert 0.5 < recall_at_k(approx.indices, res.indices) <= 1.0
    with pytest.raises(ValueError, match="not unit-norm"):
        from embedder.retrieval import check_unit_norm

        check_unit_norm(pool * 2, "pool")


# ------------------------------------------------- the stage functions, end to end on files


def _write_embeddings(
    folder: Path, pairs: list[dict], vectors: dict[str, np.ndarray]
) -> Embeddings:
    """An `embed` stage output written by hand: pair_keys.parquet and one shard."""
    import pyarrow as pa

    from embedder.datasets.schema import PAIR_KEYS_SCHEMA, write_table
    from embedder.model.shards import write_shard

    out = Embeddings(folder=folder)
    out.shards.mkdir(parents=True)
    keys = sorted(vectors)
    write_shard(out.shards / "shard-00000.parquet", keys, np.stack([vectors[k] for k in keys]))
    columns = {c: [p[c] for p in pairs] for c in PAIR_KEYS_SCHEMA.names}
    write_table(pa.table(columns), out.pair_keys, PAIR_KEYS_SCHEMA)
    return out


def _star_files(tmp_path: Path) -> tuple[Embeddings, dict[str, np.ndarray]]:
    """Subset S: the star geometry of `_star` as pairs a0..a6 (query qi, positive pi), plus
    a repeat of a3's query with a second positive (one query content, two rows); subset T:
    three unrelated pairs, so every subset has its own pool."""
    pool = _star(classification=False)
    vectors = {f"q{i}": pool.queries[i] for i in range(7)}
    vectors |= {f"p{i}": pool.positives[i] for i in range(7)}
    vectors["p3b"] = unit(*([0.0] * 7 + [1.0]))
    pairs = [
        {"id": f"a{i}", "subset": "S", "meta_task": "retrieval", "fn_group": None,
         "qry_key": f"q{i}", "pos_key": f"p{i}"} for i in range(7)
    ]  # fmt: skip
    pairs.insert(4, {**pairs[3], "id": "a3b", "pos_key": "p3b"})
    rng = np.random.default_rng(1)
    for i in range(3):
        vectors[f"tq{i}"], vectors[f"tp{i}"] = unit(*rng.normal(size=8)), unit(*rng.normal(size=8))
        pairs.append({"id": f"t{i}", "subset": "T", "meta_task": "vqa", "fn_group": None,
                      "qry_key": f"tq{i}", "pos_key": f"tp{i}"})  # fmt: skip
    return _write_embeddings(tmp_path / "embed", pairs, vectors), vectors


def test_retrieve_writes_each_query_s_exact_top_r_distinct_positives(tmp_path: Path) -> None:
    emb, vectors = _star_files(tmp_path)
    (tmp_path / "retrieve").mkdir()
    cands = retrieve_candidates(RetrieveConfig(top_r=4, device="cpu"), emb, tmp_path / "retrieve")
    rows = pl.read_parquet(cands.pair_rows)
    s_rows = rows.filter(pl.col("subset") == "S")
    # a3 and a3b share their query content: one distinct query, two positives.
    assert s_rows["id"].to_list() == ["a0", "a1", "a2", "a3", "a3b", "a4", "a5", "a6"]
    assert s_rows["query"].to_list() == [0, 1, 2, 3, 3, 4, 5, 6]
    assert s_rows["positive"].to_list() == [0, 1, 2, 3, 4, 5, 6, 7]
    queries = pl.read_parquet(cands.queries).filter(pl.col("subset") == "S")
    assert queries["row"].to_list() == [0, 1, 2, 4, 5, 6, 7], (
        "a repeated query maps to its last row"
    )
    positives = pl.read_parquet(cands.positives).filter(pl.col("subset") == "S")
    p_keys = positives["pos_key"].to_list()
    found = pl.read_parquet(cands.candidates).filter(pl.col("subset") == "S").sort("query")
    for q, row in zip(queries["qry_key"].to_list(), found.iter_rows(named=True), strict=True):
        scores = np.array([vectors[k] @ vectors[q] for k in p_keys])
        assert row["candidates"] == np.argsort(-scores, kind="stable")[:4].tolist()
        np.testing.assert_allclose(row["scores"], np.sort(scores)[::-1][:4], atol=1e-5)
    t = pl.read_parquet(cands.candidates).filter(pl.col("subset") == "T")
    assert t["candidates"].list.len().to_list() == [3, 3, 3], "R capped by the subset's pool"


def test_mine_clusters_name_the_pairs_the_geometry_picks(tmp_path: Path) -> None:
    emb, _ = _star_files(tmp_path)
    for name in ("retrieve", "mine", "topk"):
        (tmp_path / name).mkdir()
    cands = retrieve_candidates(RetrieveConfig(top_r=8, device="cpu"), emb, tmp_path / "retrieve")
    pools = dict((p.name, (p, r)) for p, r in load_pools(cands, emb))
    pool, rows = pools["S"]
    assert pool.own_positives(3).tolist() == [3, 4], "both positives of the repeated query"
    assert rows["id"][int(pool.query_row[3])] == "a3b"
    cfg = MineConfig(k=2, m=3, compare_strategies=False)
    clusters = mine_clusters(cfg, cands, emb, tmp_path / "mine")
    table = pl.read_parquet(clusters.clusters)
    first = table.filter(pl.col("cluster") == 0).sort("position")
    # Anchor a0; C = 6 owners in retrieval order a1, a2, a3b, a4, a5, a6 (a3's query maps to
    # its last row); the 2 least query-similar owners (0.1: a2, 0.5: a1) are kept.
    assert first["id"].to_list() == ["a0", "a2", "a1"]
    assert first["role"].to_list() == ["anchor", "negative", "negative"]
    topk = mine_clusters(cfg.model_copy(update={"strategy": "topk"}), cands, emb, tmp_path / "topk")
    top_first = pl.read_parquet(topk.clusters).filter(pl.col("cluster") == 0).sort("position")
    assert top_first["id"].to_list() == ["a0", "a1", "a2"], "top-k keeps retrieval order"
    report = json.loads(clusters.diagnostics.read_text())
    assert report["saha"]["clusters"] == table["cluster"].n_unique()


@pytest.mark.parametrize("strategy", ["in_batch", "saha", "topk", "topk_margin"])
@pytest.mark.parametrize("compare", [False, True])
def test_every_strategy_mines_alone_or_compared(
    tmp_path: Path, strategy: str, compare: bool
) -> None:
    """The paper presets mine their in-batch rows alone (compare_strategies off): a strategy
    with nothing to plot must still publish its clusters and diagnostics."""
    emb, _ = _star_files(tmp_path)
    for name in ("retrieve", "mine"):
        (tmp_path / name).mkdir()
    cands = retrieve_candidates(RetrieveConfig(top_r=8, device="cpu"), emb, tmp_path / "retrieve")
    cfg = MineConfig(k=2, m=3, strategy=strategy, compare_strategies=compare)
    clusters = mine_clusters(cfg, cands, emb, tmp_path / "mine")
    report = json.loads(clusters.diagnostics.read_text())
    assert next(iter(report)) == strategy and (len(report) > 1) == compare
    assert pl.read_parquet(clusters.clusters)["cluster"].n_unique() == report[strategy]["clusters"]
    assert (tmp_path / "mine" / "scores.png").exists() == (compare or strategy != "in_batch")


def test_every_subset_with_the_same_r_still_mines(tmp_path: Path) -> None:
    """R = 3 in both subsets: a fixed-size (n, 3) block must still be written as the schema's
    list column, which is what the miner reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    emb, _ = _star_files(tmp_path)
    (tmp_path / "retrieve").mkdir()
    (tmp_path / "mine").mkdir()
    cands = retrieve_candidates(RetrieveConfig(top_r=3, device="cpu"), emb, tmp_path / "retrieve")
    assert pa.types.is_list(pq.read_schema(cands.candidates).field("candidates").type)
    clusters = mine_clusters(MineConfig(k=1, m=1), cands, emb, tmp_path / "mine")
    assert clusters.rows["clusters"] > 0


def test_a_cluster_is_headed_by_the_row_being_visited(tmp_path: Path) -> None:
    """docs/method.md 3.6: a3 and a3b share their query; the anchor visited is a3 (its first row),
    while as an owner the query stands for its last row, a3b."""
    emb, _ = _star_files(tmp_path)
    for name in ("retrieve", "mine"):
        (tmp_path / name).mkdir()
    cands = retrieve_candidates(RetrieveConfig(top_r=8, device="cpu"), emb, tmp_path / "retrieve")
    clusters = mine_clusters(MineConfig(k=2, m=3), cands, emb, tmp_path / "mine")
    table = pl.read_parquet(clusters.clusters)
    anchors = table.filter(pl.col("role") == "anchor")["id"].to_list()
    assert "a3" in anchors and "a3b" not in anchors


def _strict_json(text: str) -> object:
    """Parse as other tools do: NaN / Infinity are not JSON."""

    def refuse(name: str) -> object:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_mining_data_without_planted_pairs_writes_strict_json(tmp_path: Path) -> None:
    """No fn_group anywhere: the planted false-negative rate has no value. It is null in the
    diagnostics and absent from the metrics, never a bare NaN other readers reject."""
    from embedder.artifacts import ArtifactStore

    emb, _ = _star_files(tmp_path)
    store = ArtifactStore(tmp_path / "w")
    cands = retrieve_candidates(
        RetrieveConfig(top_r=8, device="cpu"), emb, store.open_partial("retrieve", "r")
    )
    out = store.open_partial("mine", "m")
    clusters = mine_clusters(MineConfig(k=2, m=3), cands, emb, out)
    report = _strict_json(clusters.diagnostics.read_text())
    assert report["saha"]["planted_fn_pairs"] == 0
    assert report["saha"]["planted_fn_rate"] is None
    manifest = store.publish("mine", "m", code_version="1", config={}, inputs={}, output=clusters)
    published = store.path("mine", "m")
    for path in published.rglob("*.json"):
        _strict_json(path.read_text())
    assert not any(k.startswith("planted_fn_rate") for k in manifest.metrics)


@pytest.mark.parametrize(
    ("groups", "kept"),
    [
        (["g", "g", None, None, None], [2, 3, 4]),  # the anchor's own false negative
        ([None, "g", "g", None, None], [1, 3, 4]),  # two members: the first stays
        ([None, "g", "h", "g", "h"], [1, 2]),
        (["g", "h", "g", "h", "g"], [1]),
        ([None, "", "", None, None], [1, 2, 3, 4]),  # "" and None: no group
        (["g"] * 5, []),  # the anchor alone remains
    ],
)
def test_the_oracle_filter_removes_exactly_the_planted_false_negatives(
    groups: list[str | None], kept: list[int]
) -> None:
    q = [unit(1, i / 10) for i in range(5)]
    pool = make_pool(q, q, [(i, i) for i in range(5)], r=5)
    cluster = Cluster(0, [1, 2, 3, 4], 1, 0)
    (got,) = oracle_filter(pool, [cluster], groups)
    assert got.members == kept and got.anchor == 0 and got.phase == 1 and got.anchor_row == 0
    rate = diagnose(pool, [got], groups).planted_fn_rate
    assert rate in (0.0, None), "no planted pair left together"


def test_the_oracle_bound_needs_planted_groups(tmp_path: Path) -> None:
    emb, _ = _star_files(tmp_path)
    for name in ("retrieve", "mine"):
        (tmp_path / name).mkdir()
    cands = retrieve_candidates(RetrieveConfig(top_r=8, device="cpu"), emb, tmp_path / "retrieve")
    cfg = MineConfig(k=2, m=3, strategy="saha_oracle")
    with pytest.raises(MiningError, match=r"saha_oracle.*fn_group.*miniature world"):
        mine_clusters(cfg, cands, emb, tmp_path / "mine")
