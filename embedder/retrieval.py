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

from embedder.artifacts import StageOutput
from embedder.model.shards import load_embeddings

log = logging.getLogger("gen2embed.retrieval")

IndexKind = Literal["exact", "ivf", "hnsw"]


@dataclass(frozen=True)
class SearchResult:
    scores: np.ndarray  # (n_queries, k) float32, descending
    indices: np.ndarray  # (n_queries, k) int64 into the pool
    backend: str


def check_unit_norm(x: np.ndarray, what: str) -> None:
    """Inner-product search on unnormalised or non-finite vectors gives nonsense."""
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
    """Exact top-k by inner product. `device`: auto, cpu or gpu."""
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
    """IVF-flat or HNSW over inner product, for pools too large for exact search."""
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
    """Share of the exact top-k found by the approximate search (order ignored)."""
    if exact.size == 0:
        return 1.0
    hits = sum(len(set(a) & set(e)) for a, e in zip(approx.tolist(), exact.tolist(), strict=True))
    return hits / exact.size


# ------------------------------------------------------------------------- the stage


def retrieve_candidates(
    pairs_path: Path,
    keys_path: Path,
    shards_dir: Path,
    out_dir: Path,
    *,
    top_r: int,
    index: IndexKind = "exact",
    device: str = "auto",
    batch: int = 8192,
    recall_sample: int = 2000,
    ivf_nlist: int = 1024,
    ivf_nprobe: int = 32,
    hnsw_m: int = 32,
    hnsw_ef: int = 256,
) -> StageOutput:
    """Per subset: distinct queries, distinct positives, and each query's top-R positives.

    Writes rows.parquet (every pair with its query/positive index, dataset order),
    queries.parquet, positives.parquet, owners.parquet (positive -> owner queries) and
    candidates.parquet (indices local to the subset).
    """
    import polars as pl  # here, so the search functions above run where polars is absent

    pairs = pl.read_parquet(pairs_path, columns=["id", "subset", "meta_task", "row", "fn_group"])
    keys = pl.read_parquet(keys_path).select("id", "qry_key", "pos_key")
    # Duplicate content shares an id, so join on the position in the table, not on the id.
    table = pl.concat([pairs, keys.drop("id")], how="horizontal").with_row_index("order")
    vec_keys, matrix = load_embeddings(shards_dir)
    position = {k: i for i, k in enumerate(vec_keys)}
    rows_out, q_out, p_out, cand_out = [], [], [], []
    backends: set[str] = set()
    recalls: list[float] = []
    started = time.perf_counter()
    for (subset,), part in table.sort("order").group_by(["subset"], maintain_order=True):
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
        r = min(top_r, len(p_keys))
        if index == "exact":
            res = exact_search(q_vec, p_vec, r, batch=batch, device=device)
        else:
            res = approximate_search(
                q_vec,
                p_vec,
                r,
                kind=index,
                nlist=ivf_nlist,
                nprobe=ivf_nprobe,
                hnsw_m=hnsw_m,
                ef_search=hnsw_ef,
                batch=batch,
            )
            sample = np.random.default_rng(0).choice(
                len(q_vec), min(recall_sample, len(q_vec)), replace=False
            )
            exact = exact_search(q_vec[sample], p_vec, r, batch=batch, device=device)
            recalls.append(recall_at_k(res.indices[sample], exact.indices))
        backends.add(res.backend)
        name = str(subset)
        ids = part["id"].to_list()
        rows_out.append(
            pl.DataFrame(
                {
                    "subset": name,
                    "row": np.arange(len(row_q)),
                    "id": ids,
                    "meta_task": part["meta_task"].to_list(),
                    "q": row_q,
                    "p": row_p,
                    "fn_group": part["fn_group"].to_list(),
                },
                schema_overrides={"fn_group": pl.String},
            )
        )
        q_out.append(
            pl.DataFrame(
                {
                    "subset": name,
                    "q": np.arange(len(q_keys), dtype=np.int32),
                    "qry_key": q_keys,
                    "row": last_row,
                }
            )
        )
        p_out.append(
            pl.DataFrame(
                {"subset": name, "p": np.arange(len(p_keys), dtype=np.int32), "pos_key": p_keys}
            )
        )
        cand_out.append(
            pl.DataFrame(
                {
                    "subset": name,
                    "q": np.arange(len(q_keys), dtype=np.int32),
                    "cand": res.indices.astype(np.int32),
                    "score": res.scores.astype(np.float32),
                }
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
    rows_all = pl.concat(rows_out, how="vertical_relaxed")
    # The owner map: each distinct positive -> the distinct queries whose positive it is.
    owners = rows_all.group_by("subset", "p", maintain_order=True).agg(
        pl.col("q").unique(maintain_order=True).alias("owners")
    )
    owners.write_parquet(out_dir / "owners.parquet")
    rows_all.write_parquet(out_dir / "rows.parquet")
    for name, frames in (
        ("queries", q_out),
        ("positives", p_out),
        ("candidates", cand_out),
    ):
        pl.concat(frames, how="vertical_relaxed").write_parquet(out_dir / f"{name}.parquet")
    n_q = sum(len(f) for f in q_out)
    metrics = {
        "seconds": seconds,
        "queries": n_q,
        "positives": sum(len(f) for f in p_out),
        "queries_per_s": n_q / seconds if seconds else 0.0,
        "top_r": top_r,
    }
    if recalls:
        metrics["recall_at_r"] = float(np.mean(recalls))
    return StageOutput(
        rows={"rows": sum(len(f) for f in rows_out), "queries": n_q},
        metrics=metrics,
        info={"backend": sorted(backends), "index": index},
    )
