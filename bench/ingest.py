"""Ingest throughput and memory on the miniature world at two sizes.

Builds a small and a 10x larger world, ingests each in a fresh process and reports rows/s and
peak resident memory. Streaming means the peak should barely move while rows grow 10x: the
ratio of peaks, not absolute numbers, is the figure to watch (absolute times on shared
machines are noise).

    .venv/bin/python bench/ingest.py [--base-pairs 400] [--factor 10]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, resource, sys, time
from pathlib import Path
from embedder.config import IngestConfig
from embedder.datasets.ingest import ingest
world, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = IngestConfig(source="mmeb", train_dir=world / "train", train_images=world / "train_images",
                   eval_dir=world / "eval", eval_images=world / "eval_images")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
res = ingest(cfg, out)
print(json.dumps({"rows": res.metrics["rows"], "seconds": time.perf_counter() - t,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "start_mib": base / 1024}))
"""


def measure(pairs: int, eval_queries: int, root: Path) -> dict[str, float]:
    from embedder.config import WorldConfig
    from embedder.world import build_world

    world = root / f"world-{pairs}"
    build_world(WorldConfig(train_pairs=pairs, eval_queries=eval_queries), world)
    out = root / f"out-{pairs}"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(world), str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base-pairs", type=int, default=400)
    ap.add_argument("--factor", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        small = measure(args.base_pairs, args.base_pairs // 4, Path(tmp))
        large = measure(
            args.base_pairs * args.factor, args.base_pairs * args.factor // 4, Path(tmp)
        )
    for name, r in (("small", small), ("large", large)):
        print(
            f"{name}: {r['rows']:.0f} rows in {r['seconds']:.2f}s = "
            f"{r['rows'] / r['seconds']:.0f} rows/s, peak RSS {r['peak_mib']:.0f} MiB "
            f"(after imports {r['start_mib']:.0f} MiB)"
        )
    grow = (large["peak_mib"] - large["start_mib"]) / max(
        1e-9, small["peak_mib"] - small["start_mib"]
    )
    print(
        f"rows x{large['rows'] / small['rows']:.1f} -> ingest's own peak memory x{grow:.2f}, "
        f"rows/s x{(large['rows'] / large['seconds']) / (small['rows'] / small['seconds']):.2f}"
    )


if __name__ == "__main__":
    main()
