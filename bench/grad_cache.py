"""GradCache against plain contrastive steps of the same batch, on the tiny model (CPU).

For each contrastive batch size (pairs per step) and each method, a fresh process trains a
few steps and reports pairs/s and its peak resident memory above the same process's memory
right before the first step (the model, data and imports loaded). GradCache's point is the
second column: flat memory as the batch grows, for a bounded cost in speed (every input is
encoded twice, once without a graph).

    .venv/bin/python bench/grad_cache.py [--batches 24,48,96,192] [--steps 3] [--chunk 24]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def worker(pairs: int, method: str, steps: int, chunk: int) -> dict[str, float]:
    import torch
    from PIL import Image

    from embedder.config import EmbedConfig, FinetuneConfig, PretrainConfig
    from embedder.generator import corpus_texts
    from embedder.model.backbone import build_tiny
    from embedder.model.encode import EmbedItem, embed_inputs, process_items
    from embedder.model.prompts import render
    from embedder.training.adapters import attach
    from embedder.training.contrastive import grad_cache_step, info_nce, plain_step

    torch.manual_seed(0)
    root = Path(os.environ["BENCH_IMAGES"])
    backbone = build_tiny(corpus_texts(), PretrainConfig(), image_size=64)
    attach(backbone, FinetuneConfig(dora=False))
    backbone.model.train()
    settings = EmbedConfig(image_side=64, num_workers=0)
    texts = corpus_texts()[: 4 * pairs]
    queries = [
        EmbedItem(
            render(
                "hierarchical",
                f"<|image_1|>\n{t}",
                has_image=True,
                role="query",
                image_token="<|image_pad|>",
            ),
            f"{i % 8}.png",
        )
        for i, t in enumerate(texts[:pairs])
    ]
    targets = [
        EmbedItem(
            render("hierarchical", t, has_image=False, role="target", image_token="<|image_pad|>")
        )
        for t in texts[pairs : 2 * pairs]
    ]
    for i in range(8):
        Image.new("RGB", (64, 64), (30 * i, 100, 200 - 20 * i)).save(root / f"{i}.png")
    params = [p for p in backbone.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def encode(items: list[EmbedItem]) -> torch.Tensor:
        return embed_inputs(backbone, process_items(backbone.processor, items, root, settings))

    def loss_fn(q: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return info_nce(q, t, 0.02)

    step = grad_cache_step if method == "grad_cache" else plain_step
    n = chunk if method == "grad_cache" else pairs
    q_chunks = [queries[i : i + n] for i in range(0, pairs, n)]
    t_chunks = [targets[i : i + n] for i in range(0, pairs, n)]
    base = _rss_mib()
    step(encode, q_chunks, t_chunks, loss_fn)  # warm-up
    opt.step()
    opt.zero_grad()
    started = time.perf_counter()
    for _ in range(steps):
        step(encode, q_chunks, t_chunks, loss_fn)
        opt.step()
        opt.zero_grad()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"pairs_per_s": pairs * steps / seconds, "peak_above_start_mib": peak - base}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="24,48,96,192")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=24)
    parser.add_argument("--worker", nargs=2, metavar=("PAIRS", "METHOD"))
    args = parser.parse_args()
    if args.worker:
        pairs, method = int(args.worker[0]), args.worker[1]
        print(json.dumps(worker(pairs, method, args.steps, args.chunk)))
        return
    import tempfile

    print(f"tiny Qwen2-VL + LoRA, 64x64 image queries, text targets, chunk {args.chunk}")
    print(
        f"{'pairs/step':>10s} {'method':>11s} {'pairs/s':>9s} {'peak MiB':>9s} "
        f"{'speed vs plain':>15s} {'memory vs plain':>16s}"
    )
    for pairs in [int(b) for b in args.batches.split(",")]:
        results = {}
        for method in ("plain", "grad_cache"):
            with tempfile.TemporaryDirectory() as images:
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--worker",
                        str(pairs),
                        method,
                        "--steps",
                        str(args.steps),
                        "--chunk",
                        str(args.chunk),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                    cwd=ROOT,
                    env={**os.environ, "BENCH_IMAGES": images, "PYTHONPATH": str(ROOT)},
                )
            results[method] = json.loads(out.stdout.strip().splitlines()[-1])
        plain, gc = results["plain"], results["grad_cache"]
        for method, r in results.items():
            ratio = "" if method == "plain" else f"{r['pairs_per_s'] / plain['pairs_per_s']:.2f}x"
            mem = (
                ""
                if method == "plain"
                else (
                    f"{gc['peak_above_start_mib'] / max(plain['peak_above_start_mib'], 1e-9):.2f}x"
                )
            )
            print(
                f"{pairs:10d} {method:>11s} {r['pairs_per_s']:9.1f} "
                f"{r['peak_above_start_mib']:9.0f} {ratio:>15s} {mem:>16s}"
            )


if __name__ == "__main__":
    main()
