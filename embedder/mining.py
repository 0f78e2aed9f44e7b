"""Self-aware hard negative mining (SaHa) and the baselines that show what it buys.

SaHa follows docs/method.md section 3 step by step, per training subset:

1. identity is content: distinct queries and distinct positives (the `retrieve` stage);
2. the owner map: each distinct positive -> the distinct queries whose positive it is; each
   query -> its training row (the last row with that content);
3. phase 1: visit rows in dataset order (or a seeded shuffle), skip used anchors, take the
   top R = 2km retrieved positives minus every positive of the anchor's query (the authors'
   code drops only the visited row's: a departure, so an anchor never meets its own pairs);
4. walk them in rank order, mapping each to one unused owner, never the anchor and never one
   already chosen in this walk (the authors' code allows both: the second departure): one ->
   take it, several -> the one most similar to the anchor (query-query cosine), none -> skip;
   stop at C = km owners;
5. false-negative filter: outside classification, keep the k owners *least* similar to the
   anchor (stable sort: ties keep retrieval order); classification keeps the first k;
6. a cluster = the visited anchor row (a repeated query's first row) + the chosen owners'
   rows (each owner's last row); mark them used; no owner -> phase 2;
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
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from embedder.artifacts import json_text
from embedder.config import COMPARED, MineConfig, Strategy
from embedder.datasets import schema
from embedder.errors import UserError
from embedder.model.shards import load_embeddings
from embedder.outputs import Candidates, Clusters, Embeddings

log = logging.getLogger("gen2embed.mining")


class MiningError(UserError, ValueError):
    """A strategy that cannot apply to these pairs (saha_oracle without planted groups)."""


@dataclass
class SubsetPool:
    """One subset's mining inputs, all indices local to the subset.

    Index arrays are int64 (`load_pools` casts them), vectors float32 with unit-norm rows.
    Built from `row_query` and `row_positive`: the owner map (positive -> the distinct queries
    whose positive it is, docs/method.md section 3 step 2) and its inverse (query -> its own
    positives), both CSR with sorted, distinct entries."""

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
        """(n,) int64, ascending: the distinct queries whose positive is positive `p` (a
        view into the CSR arrays: do not write to it)."""
        return self.owner_idx[self.owner_ptr[p] : self.owner_ptr[p + 1]]

    def own_positives(self, q: int) -> np.ndarray:
        """(n,) int64, ascending: the distinct positives of query `q`'s rows (a view, as
        `owners`)."""
        return self.own_idx[self.own_ptr[q] : self.own_ptr[q + 1]]


def _csr(keys: np.ndarray, values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(keys, kind="stable")
    counts = np.bincount(keys, minlength=n)
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    return ptr, values[order].astype(np.int64)


@dataclass
class Cluster:
    """One mined cluster of a subset: an anchor query and the owner queries whose positives
    serve as its hard negatives (docs/method.md section 3 step 6), as query indices local to
    the subset. `phase` is 1 or 2 (step 7); 0 for `in_batch`'s random clusters."""

    anchor: int  # query index
    members: list[int]  # owner query indices, in kept order
    phase: int
    anchor_row: int  # the row visited (a repeated query's first row), heading the cluster

    def rows(self, pool: SubsetPool) -> list[int]:
        """The cluster's training rows: the visited anchor row, then each owner's row (the
        last with its content, docs/method.md section 3 steps 2 and 6)."""
        return [self.anchor_row, *pool.query_row[self.members].tolist()]


@dataclass
class MineTrace:
    """What the filter saw, for the score histograms: query-positive cosines of each
    anchor with its own positive, of the candidates kept and of those filtered out."""

    anchor_positive: list[float] = field(default_factory=list)
    kept: list[float] = field(default_factory=list)
    filtered: list[float] = field(default_factory=list)


def _walk(
    pool: SubsetPool, a: int, limit: int, taken: np.ndarray, drop_above: float | None
) -> tuple[list[int], list[float]]:
    """Map the anchor's retrieved positives (rank order) to owners; see step 4.

    `taken` is the caller's boolean mask of unavailable queries; the anchor and the owners
    chosen so far are masked in it for the duration of the walk (and unmasked after), so each
    candidate costs one vectorised look at its owners."""
    own = set(pool.own_positives(a).tolist())
    qa = pool.queries[a]
    chosen: list[int] = []
    chosen_scores: list[float] = []
    was_taken = bool(taken[a])
    taken[a] = True
    try:
        for p, score in zip(pool.candidates[a].tolist(), pool.scores[a].tolist(), strict=True):
            if p < 0 or p in own:
                continue
            if drop_above is not None and score > drop_above:
                continue
            owners = pool.owners(p)
            free = owners[~taken[owners]]
            if len(free) == 0:
                continue
            o = int(free[0]) if len(free) == 1 else int(free[np.argmax(pool.queries[free] @ qa)])
            chosen.append(o)
            chosen_scores.append(score)
            taken[o] = True
            if len(chosen) == limit:
                break
    finally:
        taken[chosen] = False
        taken[a] = was_taken
    return chosen, chosen_scores


def mine_subset(
    pool: SubsetPool, strategy: Strategy, params: MineConfig, trace: MineTrace | None = None
) -> list[Cluster]:
    """Clusters for one subset (cluster members as query indices).

    `strategy`: saha (docs/method.md section 3, C = km owners in phase 1 and 2km in phase 2,
    then the false-negative filter), topk and topk_margin (C = k owners in both phases, no
    filter; topk_margin skips candidates scoring above `params.margin` x the anchor row's
    own query-positive cosine), or in_batch (the distinct queries in a seeded permutation, cut
    into clusters of at most k + 1, `pool.candidates` unused). Each cluster has at most
    `params.k` members; an anchor for which no owner is found is left out, so some rows may
    be in no cluster. With `trace`, the scores the filter kept and dropped are appended to
    it (not for in_batch). Deterministic for given inputs and `params.seed`."""
    n_rows, n_q = len(pool.row_query), len(pool.queries)
    k, m = params.k, params.m
    if strategy == "in_batch":
        rng = np.random.default_rng(params.seed)
        distinct, first_row = np.unique(pool.row_query, return_index=True)
        order = rng.permutation(distinct)
        return [
            Cluster(int(c[0]), [int(x) for x in c[1:]], 0, int(first_row[c[0]]))
            for c in np.array_split(order, max(1, int(np.ceil(len(order) / (k + 1)))))
            if len(c)
        ]
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
            clusters.append(Cluster(a, kept, phase, r))
            used[a] = True
            used[kept] = True
            taken_p2[a] = True
            taken_p2[kept] = True
    return clusters


def oracle_filter(
    pool: SubsetPool, clusters: list[Cluster], fn_groups: list[str | None]
) -> list[Cluster]:
    """The clusters without their planted false negatives: a member whose row shares an
    `fn_group` with the anchor's row or an earlier kept member's is dropped (and trains in no
    cluster). What a perfect false-negative filter would leave of SaHa's clusters: the bound
    `saha_oracle` measures, not a method (real data has no ground truth).

    `fn_groups`: each row's group (None or "" for none), in the pool's row order. Clusters
    keep their order, anchor and phase; none is dropped (the anchor stays)."""
    out = []
    for c in clusters:
        rows = c.rows(pool)
        seen = {fn_groups[rows[0]]} - {None, ""}
        kept = []
        for member, row in zip(c.members, rows[1:], strict=True):
            group = fn_groups[row]
            if group and group in seen:
                continue
            if group:
                seen.add(group)
            kept.append(member)
        out.append(Cluster(c.anchor, kept, c.phase, c.anchor_row))
    return out


@dataclass
class Diagnostics:
    """What `diagnose` measured for one subset: `coverage` (share of rows in some cluster,
    0..1), `phase2_share` (share of clusters made in phase 2), `clusters`, `size_histogram`
    (rows per cluster -> clusters of that size), `planted_fn_pairs` (row pairs sharing an
    `fn_group`) and `planted_fn_rate` (share of those pairs put in one cluster)."""

    coverage: float
    phase2_share: float
    clusters: int
    size_histogram: dict[int, int]
    planted_fn_pairs: int
    planted_fn_rate: float | None  # None: no planted pairs, so no rate (not NaN: JSON has none)


def diagnose(pool: SubsetPool, clusters: list[Cluster], fn_groups: list[str | None]) -> Diagnostics:
    """Coverage, phase-2 share, sizes and the planted false-negative rate: the share of
    ground-truth false-negative row pairs (same `fn_group`) that land in one cluster, i.e.
    that were used as negatives of each other.

    `fn_groups`: each row's `fn_group` (None or "" for none), in the pool's row order; a
    group of n rows counts n(n-1)/2 pairs."""
    rows_in = np.zeros(len(pool.row_query), dtype=bool)
    cluster_of_row = np.full(len(pool.row_query), -1)
    sizes: dict[int, int] = {}
    for cid, c in enumerate(clusters):
        rows = c.rows(pool)
        rows_in[rows] = True
        cluster_of_row[rows] = cid
        sizes[len(rows)] = sizes.get(len(rows), 0) + 1
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
        planted_fn_rate=together / total if total else None,
    )


# ------------------------------------------------------------------------- the stage


def _read(path: Path, table_schema: pa.Schema) -> pl.DataFrame:
    frame = pl.from_arrow(schema.read_table(path, table_schema))
    assert isinstance(frame, pl.DataFrame)
    return frame


def load_pools(cands: Candidates, emb: Embeddings) -> list[tuple[SubsetPool, pl.DataFrame]]:
    """Rebuild each subset's pool (and its rows table) from the retrieve stage's output.

    One (pool, rows) per subset in the order of rows.parquet; the rows frame holds the
    POOL_ROWS_SCHEMA columns sorted by `row`. The pool's vectors are float32 rows of the
    embed stage's shards. Raises embedder.datasets.schema.SchemaError (a UserError) when a
    table does not match its schema, and KeyError when a key is missing from the shards."""
    rows = _read(cands.pair_rows, schema.POOL_ROWS_SCHEMA)
    queries = _read(cands.queries, schema.POOL_QUERIES_SCHEMA)
    positives = _read(cands.positives, schema.POOL_POSITIVES_SCHEMA)
    found = _read(cands.candidates, schema.CANDIDATES_SCHEMA)
    keys, matrix = load_embeddings(emb.shards)
    position = {k: i for i, k in enumerate(keys)}
    out = []
    for subset in rows["subset"].unique(maintain_order=True).to_list():
        r = rows.filter(pl.col("subset") == subset).sort("row")
        q = queries.filter(pl.col("subset") == subset).sort("query")
        p = positives.filter(pl.col("subset") == subset).sort("positive")
        c = found.filter(pl.col("subset") == subset).sort("query")
        width = int(c["candidates"].list.len().max() or 0)
        # Every query of a subset has the same number of candidates (R capped by the pool).
        cand = c["candidates"].list.to_array(width).to_numpy().astype(np.int64)
        score = c["scores"].list.to_array(width).to_numpy().astype(np.float32)
        pool = SubsetPool(
            name=subset,
            classification=r["meta_task"][0] == "classification",
            row_query=r["query"].to_numpy().astype(np.int64),
            row_positive=r["positive"].to_numpy().astype(np.int64),
            query_row=q["row"].to_numpy().astype(np.int64),
            queries=matrix[[position[k] for k in q["qry_key"].to_list()]],
            positives=matrix[[position[k] for k in p["pos_key"].to_list()]],
            candidates=cand.reshape(len(q), width),
            scores=score.reshape(len(q), width),
        )
        out.append((pool, r))
    return out


def _score_plot(traces: dict[str, MineTrace], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(traces), figsize=(5 * len(traces), 3.5), squeeze=False)
    for ax, (name, t) in zip(axes[0], traces.items(), strict=True):
        bins = np.linspace(-1, 1, 81)
        for values, label in (
            (t.anchor_positive, "anchor's positive"),
            (t.kept, "kept negatives"),
            (t.filtered, "filtered candidates"),
        ):
            if values:
                ax.hist(
                    values, bins=bins, alpha=0.55, label=f"{label} ({len(values)})", density=True
                )
        ax.set_title(name)
        ax.set_xlabel("cosine(query, positive)")
        ax.set_ylabel("density (area 1 per series)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mine_clusters(cfg: MineConfig, cands: Candidates, emb: Embeddings, out: Path) -> Clusters:
    """Clusters for `cfg.strategy` (clusters.parquet), diagnostics for it and, with
    `cfg.compare_strategies`, for every method (COMPARED: the planted false-negative rate
    side by side). `saha_oracle` is SaHa's clusters through `oracle_filter`.

    The `mine` stage (docs/method.md section 3). Writes under `out`:

    - clusters.parquet (CLUSTERS_SCHEMA): one row per cluster member of `cfg.strategy`'s
      clusters, `position` 0 the anchor (role "anchor"), then its negatives (role
      "negative"), `id` the pair's id in pairs.parquet; cluster ids run from 0 over all
      subsets;
    - diagnostics.json: per strategy, coverage, clusters, phase2_share, planted_fn_pairs,
      planted_fn_rate (null without planted pairs) and `subsets` (each subset's
      Diagnostics fields);
    - scores.png: histograms of the cosine of anchor-positive, kept and filtered candidates
      per strategy (in_batch left out; no file when in_batch is the only strategy mined).

    Metrics: coverage, clusters and phase2_share of the chosen strategy, coverage.<name>
    and planted_fn_rate.<name> of each strategy mined. Raises
    embedder.datasets.schema.SchemaError (a UserError) when an input table does not match
    its schema, and MiningError (a UserError) for saha_oracle on pairs with no fn_group."""
    pools = load_pools(cands, emb)
    strategy = cfg.strategy
    if strategy == "saha_oracle" and not any(
        rows["fn_group"].drop_nulls().str.len_chars().gt(0).any() for _, rows in pools
    ):
        raise MiningError(
            "mine.strategy=saha_oracle removes the planted false negatives by their ground "
            "truth (the fn_group column), and these pairs have none: it is a bound for the "
            "miniature world (ingest.source=world), not a method for real data"
        )
    strategies = list(COMPARED) if cfg.compare_strategies else [strategy]
    if strategy in strategies:
        strategies.remove(strategy)
    strategies.insert(0, strategy)
    report: dict[str, dict[str, Any]] = {}
    traces: dict[str, MineTrace] = {}
    frames = []
    for name in strategies:
        trace = MineTrace()
        per_subset = {}
        totals = {
            "rows": 0,
            "covered": 0.0,
            "clusters": 0,
            "phase2": 0,
            "fn_pairs": 0,
            "fn_together": 0.0,
        }
        next_id = 0
        for pool, rows in pools:
            fn_groups = rows["fn_group"].to_list()
            if name == "saha_oracle":
                clusters = oracle_filter(pool, mine_subset(pool, "saha", cfg, trace), fn_groups)
            else:
                clusters = mine_subset(pool, name, cfg, trace)  # type: ignore[arg-type]
            diag = diagnose(pool, clusters, fn_groups)
            per_subset[pool.name] = diag.__dict__
            n = len(pool.row_query)
            totals["rows"] += n
            totals["covered"] += diag.coverage * n
            totals["clusters"] += diag.clusters
            totals["phase2"] += round(diag.phase2_share * diag.clusters)
            if diag.planted_fn_pairs:
                totals["fn_pairs"] += diag.planted_fn_pairs
                totals["fn_together"] += (diag.planted_fn_rate or 0.0) * diag.planted_fn_pairs
            if name == strategy:
                ids = rows["id"].to_list()
                for c in clusters:
                    rows_of = c.rows(pool)
                    frames.append(
                        {
                            "cluster": [next_id] * len(rows_of),
                            "subset": [pool.name] * len(rows_of),
                            "phase": [c.phase] * len(rows_of),
                            "position": list(range(len(rows_of))),
                            "id": [ids[r] for r in rows_of],
                            "role": ["anchor"] + ["negative"] * (len(rows_of) - 1),
                        }
                    )
                    next_id += 1
        traces[name] = trace
        report[name] = {
            "coverage": totals["covered"] / max(1, totals["rows"]),
            "clusters": totals["clusters"],
            "phase2_share": totals["phase2"] / max(1, totals["clusters"]),
            "planted_fn_pairs": totals["fn_pairs"],
            "planted_fn_rate": (
                totals["fn_together"] / totals["fn_pairs"] if totals["fn_pairs"] else None
            ),
            "subsets": per_subset,
        }
    output = Clusters(folder=out, strategy=strategy)
    columns = {k: [x for f in frames for x in f[k]] for k in schema.CLUSTERS_SCHEMA.names}
    schema.write_table(
        pa.table(columns, schema=schema.CLUSTERS_SCHEMA), output.clusters, schema.CLUSTERS_SCHEMA
    )
    output.diagnostics.write_text(json_text(report, indent=2))
    plotted = {k: traces[k] for k in strategies if k != "in_batch"}
    if plotted:  # in_batch alone (the paper presets' in-batch rows) has no scores to plot
        _score_plot(plotted, out / "scores.png")
    summary = [
        f"Mining (k={cfg.k}, m={cfg.m}): clusters and planted false negatives "
        "(share of ground-truth FN pairs that became negatives of each other)",
        f"{'strategy':12s} {'coverage':>9s} {'clusters':>9s} {'phase 2':>8s} "
        f"{'planted FN rate':>16s}",
    ]
    for name, r in report.items():
        summary.append(
            f"{name:12s} {r['coverage']:9.3f} {r['clusters']:9d} "
            f"{r['phase2_share']:8.3f} "
            + (
                f"{r['planted_fn_rate']:16.3f}"
                if r["planted_fn_rate"] is not None
                else f"{'n/a':>16s}"
            )
        )
    if report[strategy]["planted_fn_pairs"]:
        summary.append(f"({report[strategy]['planted_fn_pairs']} planted FN pairs)")
    log.info("\n".join(summary))
    chosen = report[strategy]
    metrics = {
        "coverage": chosen["coverage"],
        "clusters": chosen["clusters"],
        "phase2_share": chosen["phase2_share"],
    }
    for name, r in report.items():
        if r["planted_fn_rate"] is not None:
            metrics[f"planted_fn_rate.{name}"] = r["planted_fn_rate"]
        metrics[f"coverage.{name}"] = r["coverage"]
    return output.model_copy(
        update={
            "rows": {"cluster_members": len(columns["id"]), "clusters": chosen["clusters"]},
            "metrics": metrics,
            "info": {"summary": summary},
        }
    )
