"""`Embedder.encode` (embedder.inference) against the embed stage's engine on the same items,
same run: the API adds prompt rendering, image paths and a temporary shard folder around the
engine; this measures what that costs and checks the vectors agree.

Items: the first N training pairs of a fresh miniature world, queries and positives, rendered
with the hierarchical template, on an untrained tiny generator (speed does not depend on
training). Baseline: `embedder.model.encode.encode` on the same rendered items.

    .venv/bin/python bench/embedder_api.py [--items 2000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from embedder.config import EmbedConfig, PretrainConfig, WorldConfig
from embedder.generator import corpus_texts
from embedder.inference import Embedder
from embedder.model.backbone import build_tiny
from embedder.model.encode import encode
from embedder.model.shards import load_embeddings
from embedder.world import build_world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000)
    args = parser.parse_args()
    settings = EmbedConfig(num_workers=0, image_mode="fixed", image_side=64)
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        build_world(WorldConfig(train_pairs=max(16, args.items // 10)), world)
        rows = []
        for f in sorted((world / "train").glob("*/original-*.parquet")):
            rows += pq.read_table(f).to_pylist()
        images = world / "train_images"
        model = Embedder(
            build_tiny(corpus_texts(), PretrainConfig(), image_size=64), settings=settings
        )
        pairs = rows[: args.items // 2]
        groups = [
            ("query", [r["qry"] for r in pairs], [r["qry_image_path"] for r in pairs]),
            ("target", [r["pos_text"] for r in pairs], [r["pos_image_path"] for r in pairs]),
        ]
        n = sum(len(texts) for _, texts, _ in groups)

        def api() -> np.ndarray:
            return np.concatenate(
                [
                    model.encode(texts, [str(images / p) if p else "" for p in paths], role=role)
                    for role, texts, paths in groups
                ]
            )

        def engine(out: Path) -> np.ndarray:
            items = [
                it
                for role, texts, paths in groups
                for it in model.items(
                    texts,
                    [str(images / p) if p else "" for p in paths],
                    role=role,
                    instruction=None,
                    images_root=Path("/"),
                    scratch=Path(tmp),
                )
            ]
            encode(model.backbone, items, Path("/"), out, settings, progress=False)
            keys, matrix = load_embeddings(out)
            row = {k: i for i, k in enumerate(keys)}
            return matrix[[row[it.key] for it in items]]

        times: dict[str, list[float]] = {"engine": [], "api": []}
        for attempt in range(2):  # alternate, so neither side always runs on a warm cache
            t = time.perf_counter()
            base = engine(Path(tmp) / f"engine-{attempt}")
            times["engine"].append(time.perf_counter() - t)
            t = time.perf_counter()
            got = api()
            times["api"].append(time.perf_counter() - t)
        best = {k: min(v) for k, v in times.items()}
        print(f"{n} items (queries and positives of {len(pairs)} pairs), tiny model, CPU")
        print(f"  engine (embed stage): {n / best['engine']:8.1f} items/s")
        print(f"  Embedder.encode:      {n / best['api']:8.1f} items/s")
        print(f"  ratio API / engine:   {best['engine'] / best['api']:.3f}")
        print(f"  max |difference|:     {float(np.abs(got - base).max()):.2e}")


if __name__ == "__main__":
    main()
