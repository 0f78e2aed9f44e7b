"""Self-aware hard negative mining (SaHa) and the baselines that show what it buys.

SaHa follows METHOD.md section 3 step by step, per training subset:

1. identity is content: distinct queries and distinct positives (the `retrieve` stage);
2. the owner map: each distinct positive -> the distinct queries whose positive it is; each
   query -> its training row (the last row with that content);
3. phase 1: visit rows in dataset order (or a seeded shuffle), skip used anchors, take the
   top R = 2km retrieved positives minus the anchor's own;
4. walk them in rank order, mapping each to one unused owner (not the anchor): one -> take it,
   several -> the one most similar to the anchor (query-query cosine), none -> skip; stop at
   C = km owners;
5. false-negative filter: outside classification, keep the k owners *least* similar to the
   anchor (stable sort: ties keep retrieval order); classification keeps the first k;
6. a cluster = anchor row + chosen owners' rows; mark them used; no owner -> phase 2;
7. phase 2: the leftover anchors, C = 2km, owners may have been used in phase 1, only owners
   already taken in phase 2 are excluded.

Baselines with the same output: `topk` (first k owners in retrieval order, no filter),
`topk_margin` (drop candidates scoring above margin x the anchor's own positive score, then
top-k) and `in_batch` (random clusters of the same size).

Per-anchor work is O(R) Python steps over NumPy slices of a CSR owner map: nothing per anchor
grows with the pool.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

log = logging.getLogger("gen2embed.mining")

Strategy = Literal["saha", "topk", "topk_margin", "in_batch"]
STRATEGIES: tuple[str, ...] = ("saha", "topk", "topk_margin", "in_batch")


@dataclass
class SubsetPool:
    """One subset's mining inputs, all indices local to the subset."""

    name: str
    classification: bool
    row_query: np.ndarray  # (n_rows,) distinct-query index of each row, dataset order
    row_positive: np.ndarray  # (n_rows,) distinct-positive index of each row
    query_row: np.ndarray  # (n_queries,) the row a query maps back to (last with its content)
    queries: np.ndarray  # (n_queries, d) unit vectors
    positives: np.ndarray  # (n_positives, d) unit vectors
    candidates: np.ndarray  # (n_queries, R) positive indices by descending score, -1 = none
    scores: np.ndarray  # (n_queries, R)
    owner_ptr: np.ndarray = field(init=False)  # CSR: positive -> owner queries
    owner_idx: np.ndarray = field(init=False)
    own_ptr: np.ndarray = field(init=False)  # CSR: query -> its own positives
    own_idx: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        pairs = np.unique(np.stack([self.row_positive, self.row_query], axis=1), axis=0)
        self.owner_ptr, self.owner_idx = _csr(pairs[:, 0], pairs[:, 1], len(self.positives))
        by_query = pairs[np.lexsort((pairs[:, 0], pairs[:, 1]))]
        self.own_ptr, self.own_idx = _csr(by_query[:, 1], by_query[:, 0], len(self.queries))

    def owners(self, p: int) -> np.ndarray:
        return self.owner_idx[self.owner_ptr[p] : self.owner_ptr[p + 1]]

    def own_positives(self, q: int) -> np.ndarray:
        return self.own_idx[self.own_ptr[q] : self.own_ptr[q + 1]]


def _csr(keys: np.ndarray, values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(keys, kind="stable")
    counts = np.bincount(keys, minlength=n)
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    return ptr, values[order].astype(np.int64)


@dataclass(frozen=True)
class MineParams:
    k: int = 15
    m: int = 3
    seed: int = 0
    shuffle: bool = False
    margin: float = 0.95


@dataclass
class Cluster:
    anchor: int  # query index
    members: list[int]  # owner query indices, in kept order
    phase: int


@dataclass
class MineTrace:
    """What the filter saw, for the score histograms."""

    anchor_positive: list[float] = field(default_factory=list)
    kept: list[float] = field(default_factory=list)
    filtered: list[float] = field(default_factory=list)


def _walk(pool: SubsetPool, a: int, limit: int, taken: np.ndarray, drop_above: float | None
          ) -> tuple[list[int], list[float]]:  # fmt: skip
    """Map the anchor's retrieved positives (rank order) to owners; see step 4."""
    own = set(pool.own_positives(a).tolist())
    qa = pool.queries[a]
    chosen: list[int] = []
    chosen_scores: list[float] = []
    in_chosen = set()
    for p, score in zip(pool.candidates[a].tolist(), pool.scores[a].tolist(), strict=True):
        if p < 0 or p in own:
            continue
        if drop_above is not None and score > drop_above:
            continue
        owners = pool.owners(p)
        free = owners[~taken[owners] & (owners != a)]
        if in_chosen and len(free):
            free = free[[o not in in_chosen for o in free.tolist()]]
        if len(free) == 0:
            continue
        o = int(free[0]) if len(free) == 1 else int(free[np.argmax(pool.queries[free] @ qa)])
        chosen.append(o)
        chosen_scores.append(score)
        in_chosen.add(o)
        if len(chosen) == limit:
            break
    return chosen, chosen_scores


def mine_subset(pool: SubsetPool, strategy: Strategy, params: MineParams,
                trace: MineTrace | None = None) -> list[Cluster]:  # fmt: skip
    """Clusters for one subset (cluster members as query indices)."""
    n_rows, n_q = len(pool.row_query), len(pool.queries)
    k, m = params.k, params.m
    if strategy == "in_batch":
        rng = np.random.default_rng(params.seed)
        distinct = np.unique(pool.row_query)
        order = rng.permutation(distinct)
        return [Cluster(int(c[0]), [int(x) for x in c[1:]], 0)
                for c in np.array_split(order, max(1, int(np.ceil(len(order) / (k + 1)))))
                if len(c)]  # fmt: skip
    visit = np.arange(n_rows)
    if params.shuffle:
        visit = np.random.default_rng(params.seed).permutation(n_rows)
    used = np.zeros(n_q, dtype=bool)
    clusters: list[Cluster] = []
    limits = {1: k * m, 2: 2 * k * m} if strategy == "saha" else {1: k, 2: k}
    for phase in (1, 2):
        visited = np.zeros(n_q, dtype=bool)
        taken_p2 = np.zeros(n_q, dtype=bool)
        for r in visit.tolist():
            a = int(pool.row_query[r])
            if used[a] or visited[a]:
                continue
            visited[a] = True
            drop_above = None
            if strategy == "topk_margin":
                own_score = float(pool.positives[pool.row_positive[r]] @ pool.queries[a])
                drop_above = params.margin * own_score
            taken = used if phase == 1 else taken_p2
            chosen, scores = _walk(pool, a, limits[phase], taken, drop_above)
            if not chosen:
                continue
            if strategy == "saha" and not pool.classification:
                sims = pool.queries[chosen] @ pool.queries[a]
                order = np.argsort(sims, kind="stable")
                keep_pos = order[:k].tolist()
            else:
                keep_pos = list(range(min(k, len(chosen))))
            kept = [chosen[i] for i in keep_pos]
            if trace is not None:
                trace.anchor_positive.append(
                    float(pool.positives[pool.row_positive[r]] @ pool.queries[a])
                )
                dropped = set(range(len(chosen))) - set(keep_pos)
                trace.kept += [scores[i] for i in keep_pos]
                trace.filtered += [scores[i] for i in sorted(dropped)]
            clusters.append(Cluster(a, kept, phase))
            used[a] = True
            used[kept] = True
            taken_p2[a] = True
            taken_p2[kept] = True
    return clusters


@dataclass
class Diagnostics:
    coverage: float
    phase2_share: float
    clusters: int
    size_histogram: dict[int, int]
    planted_fn_pairs: int
    planted_fn_rate: float


def diagnose(pool: SubsetPool, clusters: list[Cluster], fn_groups: list[str | None]
             ) -> Diagnostics:  # fmt: skip
    """Coverage, phase-2 share, sizes and the planted false-negative rate: the share of
    ground-truth false-negative row pairs (same `fn_group`) that land in one cluster, i.e.
    that were used as negatives of each other."""
    rows_in = np.zeros(len(pool.row_query), dtype=bool)
    cluster_of_row = np.full(len(pool.row_query), -1)
    sizes: dict[int, int] = {}
    for cid, c in enumerate(clusters):
        members = [c.anchor, *c.members]
        rows = pool.query_row[members]
        rows_in[rows] = True
        cluster_of_row[rows] = cid
        sizes[len(members)] = sizes.get(len(members), 0) + 1
    groups: dict[str, list[int]] = {}
    for row, g in enumerate(fn_groups):
        if g:
            groups.setdefault(g, []).append(row)
    total = together = 0
    for rows in groups.values():
        for i in range(len(rows)):
            for j in range(i + 1, len(rows)):
                total += 1
                ci, cj = cluster_of_row[rows[i]], cluster_of_row[rows[j]]
                together += int(ci >= 0 and ci == cj)
    phase2 = sum(c.phase == 2 for c in clusters)
    return Diagnostics(
        coverage=float(rows_in.mean()) if len(rows_in) else 0.0,
        phase2_share=phase2 / len(clusters) if clusters else 0.0,
        clusters=len(clusters),
        size_histogram=dict(sorted(sizes.items())),
        planted_fn_pairs=total,
        planted_fn_rate=together / total if total else float("nan"),
    )
