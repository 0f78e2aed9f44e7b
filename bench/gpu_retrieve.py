"""GPU check: exact top-R retrieval on the GPU vs faiss on the CPU, same run.

1M positives x 1536 dims (Qwen2-VL-2B's hidden size), 100k
queries near them, R = 90 (2*k*m for k=15, m=3). The GPU path is whatever `exact_search`
picks there (faiss-gpu if installed and its probe passes, else torch on CUDA); the CPU path is
faiss IndexFlatIP on all cores, timed on a query sample and scaled to the full set. Prints
queries/s both ways, the ratio, and how often the two agree (top-1 and recall@R).

    python3 bench/gpu_retrieve.py [--pool 1000000] [--queries 100000] [--cpu-queries 5000]
"""

from __future__ import annotations

import argparse
import time

import faiss
import torch

from embedder.retrieval import exact_search, recall_at_k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pool", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=100_000)
    ap.add_argument("--cpu-queries", type=int, default=5000)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--r", type=int, default=90)
    args = ap.parse_args()
    print(
        f"device: {torch.cuda.get_device_name()}, faiss {faiss.__version__} "
        f"(GPUs seen by faiss: {faiss.get_num_gpus()}), CPU threads {faiss.omp_get_max_threads()}"
    )
    g = torch.Generator(device="cuda").manual_seed(0)
    pool = torch.randn(args.pool, args.dim, device="cuda", generator=g)
    pool = torch.nn.functional.normalize(pool, dim=1)
    pick = torch.randint(0, args.pool, (args.queries,), device="cuda", generator=g)
    noise = torch.randn(args.queries, args.dim, device="cuda", generator=g)
    queries = torch.nn.functional.normalize(pool[pick] + 0.05 * noise, dim=1)
    pool_np, q_np = pool.cpu().numpy(), queries.cpu().numpy()
    del pool, queries, noise
    torch.cuda.empty_cache()

    exact_search(q_np[:256], pool_np, args.r, device="gpu")  # warm-up (kernels, allocator)
    torch.cuda.synchronize()
    t = time.perf_counter()
    gpu = exact_search(q_np, pool_np, args.r, device="gpu")
    torch.cuda.synchronize()
    t_gpu = time.perf_counter() - t

    sample = q_np[: args.cpu_queries]
    t = time.perf_counter()
    cpu = exact_search(sample, pool_np, args.r, device="cpu")
    t_cpu = (time.perf_counter() - t) * len(q_np) / len(sample)
    top1 = float((gpu.indices[: len(sample), 0] == cpu.indices[:, 0]).mean())
    rec = recall_at_k(gpu.indices[: len(sample)], cpu.indices)
    print(f"pool {args.pool} x {args.dim}, {args.queries} queries, top {args.r}")
    print(
        f"GPU ({gpu.backend}): {args.queries / t_gpu:10.0f} queries/s ({t_gpu:.1f}s incl. "
        f"copying the pool to the GPU)"
    )
    print(
        f"CPU ({cpu.backend}): {args.queries / t_cpu:10.0f} queries/s ({t_cpu:.1f}s, "
        f"scaled from {len(sample)} queries)"
    )
    print(
        f"GPU x{t_cpu / t_gpu:.1f} faster; agreement on the sample: top-1 {top1:.4f}, "
        f"recall@{args.r} {rec:.4f}"
    )


if __name__ == "__main__":
    main()
