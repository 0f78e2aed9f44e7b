"""Strict Precision@1: ties are misses."""

import numpy as np
from embedder.zeroshot import precision_at_1, strict_hits


def test_ties_count_as_failures() -> None:
    q = np.array([1.0, 0.0])
    same = np.array([[0.6, 0.8], [0.6, 0.8], [0.6, 0.8]])
    assert not strict_hits(q, same), "identical vectors must not score"
    assert strict_hits(q, np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert not strict_hits(q, np.array([[0.0, 1.0], [1.0, 0.0]]))


def test_precision_per_subset() -> None:
    vec = {"q": np.array([1.0, 0.0]), "a": np.array([1.0, 0.0]), "b": np.array([0.0, 1.0])}
    rows = [{"subset": "S"}, {"subset": "S"}, {"subset": "T"}]
    p1 = precision_at_1(rows, ["q", "q", "q"], [["a", "b"], ["b", "a"], ["a", "a"]], vec)
    assert p1 == {"S": 0.5, "T": 0.0}
