"""SaHa and the baselines on hand-built embedding sets whose geometry fixes the answer."""

from __future__ import annotations

import numpy as np
import pytest

from embedder.config import MineConfig
from embedder.mining import SubsetPool, diagnose, mine_subset
from embedder.retrieval import approximate_search, exact_search, recall_at_k


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
    for c in mine_subset(pool, "saha", MineConfig(k=1, m=2)):
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
