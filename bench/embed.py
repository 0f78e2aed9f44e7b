"""The embed engine against a naive loop, on a mixed-length miniature corpus, same run.

Corpus: the miniature world's eval set rendered with the hierarchical template: every query
(long captions, questions, images) and every candidate (one-word labels, captions, images), as
MMEB evaluation embeds them, so candidates repeat heavily. Both paths use the same tiny model;
the check that they agree (max |difference| per key) is printed next to the speed ratio.

    .venv/bin/python bench/embed.py [--queries 60] [--batch 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from naive_embed import naive_embed

from embedder.config import EmbedConfig, PretrainConfig, WorldConfig
from embedder.generator import corpus_texts
from embedder.model.backbone import build_tiny
from embedder.model.encode import (
    EmbedItem,
    encode,
)
from embedder.model.prompts import render
from embedder.model.shards import load_embeddings
from embedder.world import build_world


def corpus(world: Path) -> list[EmbedItem]:
    items = []
    for f in sorted((world / "eval").glob("*/test-*.parquet")):
        for row in pq.read_table(f).to_pylist():
            items.append(
                EmbedItem(
                    render(
                        "hierarchical",
                        row["qry_text"],
                        has_image=bool(row["qry_img_path"]),
                        role="query",
                        image_token="<|image_pad|>",
                    ),
                    row["qry_img_path"],
                )
            )
            for text, img in zip(row["tgt_text"], row["tgt_img_path"], strict=True):
                items.append(
                    EmbedItem(
                        render(
                            "hierarchical",
                            text,
                            has_image=bool(img),
                            role="target",
                            image_token="<|image_pad|>",
                        ),
                        img,
                    )
                )
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--queries", type=int, default=60, help="eval queries per subset")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        build_world(WorldConfig(eval_queries=args.queries, train_pairs=16), world)
        items = corpus(world)
        root = world / "eval_images"
        backbone = build_tiny(corpus_texts(), PretrainConfig(), image_size=64)
        unique = len({i.key for i in items})
        print(
            f"corpus: {len(items)} items, {unique} distinct "
            f"({sum(bool(i.image) for i in items)} with an image)"
        )
        keys, naive_vecs, naive_s, naive_pad = naive_embed(
            backbone, items, root, batch_size=args.batch, image_side=64
        )
        results = {}
        for workers in (0, 2):
            out = Path(tmp) / f"ours-{workers}"
            t = time.perf_counter()
            stats = encode(
                backbone,
                items,
                root,
                out,
                EmbedConfig(batch_size=args.batch, num_workers=workers, image_side=64),
            )
            results[workers] = (time.perf_counter() - t, stats, out)
        naive = dict(zip(keys, naive_vecs, strict=False))
        print(
            f"naive loop:   {len(items) / naive_s:8.1f} items/s  ({naive_s:.1f}s, padding "
            f"efficiency {naive_pad:.2f})"
        )
        for workers, (seconds, stats, out) in results.items():
            k, v = load_embeddings(out)
            diff = max(float(np.abs(naive[key] - vec).max()) for key, vec in zip(k, v, strict=True))
            print(
                f"embed stage ({workers} workers): {len(items) / seconds:8.1f} items/s  "
                f"({seconds:.1f}s, padding efficiency "
                f"{stats.metrics()['padding_efficiency']:.2f})  x{naive_s / seconds:.2f} "
                f"vs naive; max |diff| {diff:.1e}"
            )


if __name__ == "__main__":
    main()
