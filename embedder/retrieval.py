"""Candidate retrieval: for every training query, the top-R positives of its own subset by
inner product (cosine: vectors are unit-norm), exact by default.

Backends, picked at run time and named in the output: faiss on GPU when faiss sees GPUs and a
probe search agrees with the CPU result; else, on a CUDA machine without working faiss-gpu, an
exact chunked top-k with torch on the GPU (PyPI's faiss-gpu wheels have lacked H100 kernels,
faiss-gpu-wheels#119); else faiss on CPU. Queries are searched in batches so memory stays
bounded. An approximate index (IVF or HNSW) is an option for pools of millions, with its
recall@R against exact search measured on a sample of queries.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import faiss
import numpy as np
import pyarrow as pa

from embedder.config import RetrieveConfig
from embedder.datasets import schema
from embedder.model.shards import load_embeddings
from embedder.outputs import Candidates, Embeddings

log = logging.getLogger("gen2embed.retrieval")

IndexKind = Literal["exact", "ivf", "hnsw"]


@dataclass(frozen=True)
class SearchResult:
    """Top-k of each query: `scores` (n_queries, k) float32, descending per row; `indices`
    (n_queries, k) int64 rows of the pool, -1 where an approximate index found fewer than k;
    `backend` names what searched (faiss-gpu, torch-cuda, faiss-cpu, faiss-ivf, faiss-hnsw,
    or none for an empty search)."""

    scores: np.ndarray  # (n_queries, k) float32, descending
    indices: np.ndarray  # (n_queries, k) int64 into the pool
    backend: str


def check_unit_norm(x: np.ndarray, what: str) -> None:
    """Inner-product search on unnormalised or non-finite vectors gives nonsense.

    `x`: (n, d) floats. Raises ValueError, naming `what`, when a value is NaN or infinite or
    a row's L2 norm is off 1 by more than 0.01; returns None otherwise."""
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: non-finite values in the embeddings")
    norms = np.linalg.norm(x, axis=1)
    if len(norms) and np.abs(norms - 1).max() > 1e-2:
        raise ValueError(
            f"{what}: vectors are not unit-norm (norms {norms.min():.3f}..{norms.max():.3f})"
        )


def _faiss_gpu_ok(pool: np.ndarray) -> bool:
    if faiss.get_num_gpus() == 0:
        return False
    try:
        probe_q, probe_p = pool[:64], pool[: min(len(pool), 4096)]
        k = min(8, len(probe_p))
        cpu = faiss.IndexFlatIP(pool.shape[1])
        cpu.add(probe_p)
        gpu = faiss.index_cpu_to_all_gpus(cpu)
        _, i_cpu = cpu.search(probe_q, k)
        _, i_gpu = gpu.search(probe_q, k)
        return bool((i_cpu[:, 0] == i_gpu[:, 0]).mean() > 0.99)
    except Exception as exc:  # a wheel without kernels for this GPU raises here
        log.warning("faiss GPU probe failed (%s); not using faiss-gpu", exc)
        return False


def _torch_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _torch_topk(queries: np.ndarray, pool: np.ndarray, k: int, batch: int) -> SearchResult:
    import torch

    dev = torch.device("cuda")
    p = torch.from_numpy(pool).to(
        dev, torch.float16 if pool.shape[0] > 2_000_000 else torch.float32
    )
    # The (batch x pool) score block is the big allocation: keep it near 4 GB.
    batch = max(1, min(batch, int(4e9 // (4 * len(pool)))))
    scores, idx = [], []
    for i in range(0, len(queries), batch):
        q = torch.from_numpy(queries[i : i + batch]).to(dev, p.dtype)
        s, j = torch.topk(q @ p.T, k, dim=1)
        scores.append(s.float().cpu().numpy())
        idx.append(j.cpu().numpy())
    return SearchResult(np.concatenate(scores), np.concatenate(idx).astype(np.int64), "torch-cuda")


def exact_search(
    queries: np.ndarray, pool: np.ndarray, k: int, *, batch: int = 8192, device: str = "auto"
) -> SearchResult:
    """Exact top-k by inner product. `device`: auto, cpu or gpu.

    `queries` (n, d) and `pool` (m, d), any float dtype (searched as float32; torch on a GPU
    searches pools over 2M rows in float16). k is capped at m; with k = 0 or no queries the
    result is (n, 0). `batch`: queries per search call (the torch path also caps it so a
    score block stays near 4 GB). auto and gpu use faiss on the GPU when a probe search
    agrees with the CPU, else torch on CUDA; auto falls back to faiss on the CPU. Raises
    RuntimeError for device="gpu" when neither GPU path is usable. Ties may come back in
    either order."""
    k = min(k, len(pool))
    if k == 0 or len(queries) == 0:
        empty = np.zeros((len(queries), 0))
        return SearchResult(empty.astype(np.float32), empty.astype(np.int64), "none")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    pool = np.ascontiguousarray(pool, dtype=np.float32)
    use_gpu = device in ("auto", "gpu")
    if use_gpu and _faiss_gpu_ok(pool):
        index = faiss.index_cpu_to_all_gpus(_flat(pool))
        backend = "faiss-gpu"
    elif use_gpu and _torch_cuda():
        return _torch_topk(queries, pool, k, batch)
    else:
        if device == "gpu":
            raise RuntimeError("retrieve.device=gpu but no GPU is usable (faiss-gpu or CUDA)")
        index = _flat(pool)
        backend = "faiss-cpu"
    scores, idx = [], []
    for i in range(0, len(queries), batch):
        s, j = index.search(queries[i : i + batch], k)
        scores.append(s)
        idx.append(j)
    return SearchResult(np.concatenate(scores), np.concatenate(idx), backend)


def _flat(pool: np.ndarray) -> faiss.Index:
    index = faiss.IndexFlatIP(pool.shape[1])
    index.add(pool)
    return index


def approximate_search(
    queries: np.ndarray,
    pool: np.ndarray,
    k: int,
    *,
    kind: IndexKind,
    nlist: int = 1024,
    nprobe: int = 32,
    hnsw_m: int = 32,
    ef_search: int = 256,
    batch: int = 8192,
) -> SearchResult:
    """IVF-flat or HNSW over inner product, for pools too large for exact search.

    `queries` (n, d) and `pool` (m, d), searched as float32; k is capped at m. IVF uses
    min(`nlist`, m // 39) lists (at least 1; it is trained on the pool) and probes
    min(`nprobe`, lists); HNSW has `hnsw_m` links a node and searches max(`ef_search`, k).
    Indices are -1 where fewer than k were found. Raises ValueError for an unknown `kind`
    and for zero queries (nothing to concatenate)."""
    d = pool.shape[1]
    k = min(k, len(pool))
    pool = np.ascontiguousarray(pool, dtype=np.float32)
    if kind == "ivf":
        nlist = max(1, min(nlist, len(pool) // 39))  # faiss wants >= 39 points per centroid
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(pool)
        index.add(pool)
        index.nprobe = min(nprobe, nlist)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.add(pool)
        index.hnsw.efSearch = max(ef_search, k)
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    scores, idx = [], []
    for i in range(0, len(queries), batch):
        s, j = index.search(np.ascontiguousarray(queries[i : i + batch], dtype=np.float32), k)
        scores.append(s)
        idx.append(j)
    return SearchResult(np.concatenate(scores), np.concatenate(idx), f"faiss-{kind}")


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Share of the exact top-k found by the approximate search (order ignored).

    `approx` and `exact`: (n, k) index arrays of the same queries. 0..1; 1.0 when `exact`
    is empty."""
    if exact.size == 0:
        return 1.0
    hits = sum(len(set(a) & set(e)) for a, e in zip(approx.tolist(), exact.tolist(), strict=True))
    return hits / exact.size


# ------------------------------------------------------------------------- the stage


def _lists(block: np.ndarray) -> pa.ListArray:
    """Rows of a (n, R) block as an Arrow list column (the schema's type for every R)."""
    flat = pa.array(block.reshape(-1))
    fixed = pa.FixedSizeListArray.from_arrays(flat, block.shape[1])
    return fixed.cast(pa.list_(flat.type))


def retrieve_candidates(cfg: RetrieveConfig, emb: Embeddings, out: Path) -> Candidates:
    """Per subset: distinct queries, distinct positives, and each query's top-R positives.

    Writes (schemas in embedder.datasets.schema) rows.parquet (every pair with its query and
    positive index, dataset order), queries.parquet (with the row each query maps back to),
    positives.parquet and candidates.parquet; indices are local to the subset.

    The `retrieve` stage (docs/method.md section 3 steps 1-3): a query and a positive are
    distinct by content (their keys in the embed stage's shards). candidates.parquet holds,
    per query, R = min(`cfg.top_r`, the subset's distinct positives) positive indices by
    descending inner product and their float32 scores (index -1 where an approximate index
    found fewer). For
    an approximate `cfg.index`, recall@R against exact search on up to `cfg.recall_sample`
    queries per subset is measured; its mean over subsets is the `recall_at_r` metric.
    Other metrics: seconds (wall clock), queries, positives, queries_per_s, top_r.

    Raises embedder.datasets.schema.SchemaError (a UserError) when pair_keys.parquet does
    not match its schema, ValueError (`check_unit_norm`) when a subset's vectors are not
    finite unit vectors, KeyError when a key is missing from the shards, and RuntimeError
    for `cfg.device` = gpu without a usable GPU.
    """
    import polars as pl  # here, so the search functions above run where polars is absent

    assert cfg.top_r is not None, "PipelineConfig fills retrieve.top_r"
    table = pl.from_arrow(schema.read_table(emb.pair_keys, schema.PAIR_KEYS_SCHEMA))
    assert isinstance(table, pl.DataFrame)
    vec_keys, matrix = load_embeddings(emb.shards)
    position = {k: i for i, k in enumerate(vec_keys)}
    rows_out, q_out, p_out, cand_out = [], [], [], []
    backends: set[str] = set()
    recalls: list[float] = []
    started = time.perf_counter()
    # Duplicate content shares an id, so rows are told apart by position, never by id.
    for (subset,), part in table.group_by(["subset"], maintain_order=True):
        q_keys = part["qry_key"].unique(maintain_order=True).to_list()
        p_keys = part["pos_key"].unique(maintain_order=True).to_list()
        q_index = {k: i for i, k in enumerate(q_keys)}
        p_index = {k: i for i, k in enumerate(p_keys)}
        q_vec = matrix[[position[k] for k in q_keys]]
        p_vec = matrix[[position[k] for k in p_keys]]
        check_unit_norm(q_vec, f"{subset} queries")
        check_unit_norm(p_vec, f"{subset} positives")
        row_q = np.array([q_index[k] for k in part["qry_key"].to_list()], dtype=np.int32)
        row_p = np.array([p_index[k] for k in part["pos_key"].to_list()], dtype=np.int32)
        # A query maps back to the last row with its content.
        last_row = np.zeros(len(q_keys), dtype=np.int64)
        last_row[row_q] = np.arange(len(row_q))
        r = min(cfg.top_r, len(p_keys))
        if cfg.index == "exact":
            res = exact_search(q_vec, p_vec, r, batch=cfg.batch_queries, device=cfg.device)
        else:
            res = approximate_search(
                q_vec,
                p_vec,
                r,
                kind=cfg.index,
                nlist=cfg.ivf_nlist,
                nprobe=cfg.ivf_nprobe,
                hnsw_m=cfg.hnsw_m,
                ef_search=cfg.hnsw_ef,
                batch=cfg.batch_queries,
            )
            sample = np.random.default_rng(0).choice(
                len(q_vec), min(cfg.recall_sample, len(q_vec)), replace=False
            )
            exact = exact_search(
                q_vec[sample], p_vec, r, batch=cfg.batch_queries, device=cfg.device
            )
            recalls.append(recall_at_k(res.indices[sample], exact.indices))
        backends.add(res.backend)
        name = str(subset)
        n = len(row_q)
        rows_out.append(
            pa.table(
                {
                    "subset": [name] * n,
                    "row": np.arange(n),
                    "id": part["id"].to_list(),
                    "meta_task": part["meta_task"].to_list(),
                    "query": row_q,
                    "positive": row_p,
                    "fn_group": part["fn_group"].to_list(),
                },
                schema=schema.POOL_ROWS_SCHEMA,
            )
        )
        queries = np.arange(len(q_keys), dtype=np.int32)
        q_out.append(
            pa.table(
                {
                    "subset": [name] * len(q_keys),
                    "query": queries,
                    "qry_key": q_keys,
                    "row": last_row,
                },
                schema=schema.POOL_QUERIES_SCHEMA,
            )
        )
        p_out.append(
            pa.table(
                {
                    "subset": [name] * len(p_keys),
                    "positive": np.arange(len(p_keys), dtype=np.int32),
                    "pos_key": p_keys,
                },
                schema=schema.POOL_POSITIVES_SCHEMA,
            )
        )
        cand_out.append(
            pa.table(
                {
                    "subset": [name] * len(q_keys),
                    "query": queries,
                    "candidates": _lists(res.indices.astype(np.int32)),
                    "scores": _lists(res.scores.astype(np.float32)),
                },
                schema=schema.CANDIDATES_SCHEMA,
            )
        )
        log.info(
            "retrieve %s: %d queries x %d positives, top %d (%s)",
            name,
            len(q_keys),
            len(p_keys),
            r,
            res.backend,
        )
    seconds = time.perf_counter() - started
    output = Candidates(folder=out)
    for tables, path, table_schema in (
        (rows_out, output.pair_rows, schema.POOL_ROWS_SCHEMA),
        (q_out, output.queries, schema.POOL_QUERIES_SCHEMA),
        (p_out, output.positives, schema.POOL_POSITIVES_SCHEMA),
        (cand_out, output.candidates, schema.CANDIDATES_SCHEMA),
    ):
        schema.write_table(pa.concat_tables(tables), path, table_schema)
    n_q = sum(t.num_rows for t in q_out)
    metrics = {
        "seconds": seconds,
        "queries": n_q,
        "positives": sum(t.num_rows for t in p_out),
        "queries_per_s": n_q / seconds if seconds else 0.0,
        "top_r": cfg.top_r,
    }
    if recalls:
        metrics["recall_at_r"] = float(np.mean(recalls))
    return output.model_copy(
        update={
            "rows": {"rows": sum(t.num_rows for t in rows_out), "queries": n_q},
            "metrics": metrics,
            "info": {"backend": sorted(backends), "index": cfg.index},
        }
    )
