"""What a model's content identity costs per run (issue 15, item 3).

The stages that run a local model fingerprint it by the sha256 of its files, remembered per
file by `stat` (embedder.model.identity). Baseline, measured in the same run: hashing every
file again (what a content key without the cache would cost on every run). Also: the `stat`
walk that fingerprints an images root (embedder.datasets.ingest.images_digest).

    .venv/bin/python bench/model_identity.py [--gib 1] [--images 100000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from embedder.datasets.ingest import images_digest
from embedder.model.identity import DigestCache, model_identity


def _timed(fn, repeat: int = 3) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="weights size, GiB")
    parser.add_argument("--images", type=int, default=100_000, help="files in the images root")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        model.mkdir()
        shards = max(1, round(args.gib * 4))  # 256 MiB shards, as hub checkpoints split them
        block = os.urandom(1 << 20)
        for i in range(shards):
            with (model / f"model-{i:05d}-of-{shards:05d}.safetensors").open("wb") as fh:
                for _ in range(256):
                    fh.write(block)
        for name in ("config.json", "tokenizer.json", "preprocessor_config.json"):
            (model / name).write_text("{}")
        cache_file = Path(tmp) / "digests.json"

        def cold() -> None:
            model_identity(str(model), None, DigestCache(None))

        model_identity(str(model), None, DigestCache(cache_file))  # fill the cache once

        def warm() -> None:
            model_identity(str(model), None, DigestCache(cache_file))

        t_cold, t_warm = _timed(cold), _timed(warm, repeat=5)
        print(f"model folder {shards * 256} MiB in {shards} shards:")
        print(f"  baseline, hash every file each run: {t_cold:8.3f} s")
        print(
            f"  digest cache (stat per file):       {t_warm:8.4f} s   ratio {t_warm / t_cold:.5f}"
        )

        images = Path(tmp) / "images"
        for i in range(args.images):
            folder = images / f"{i // 1000:04d}"
            if i % 1000 == 0:
                folder.mkdir(parents=True)
            (folder / f"{i:07d}.png").write_bytes(b"x")
        t_walk = _timed(lambda: images_digest(images))
        print(f"images root of {args.images} files: stat walk {t_walk:.3f} s")


if __name__ == "__main__":
    main()
