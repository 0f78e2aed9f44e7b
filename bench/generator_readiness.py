"""What makes the tiny generator see details: held-out VQA accuracy by variant and seed.

The miniature world can only show what hard negatives teach if the generator represents the
details its same-category negatives differ in (docs/miniature.md: "ready" is held-out category
and position accuracy >= 0.8). Each variant pretrains a fresh tiny generator exactly as the
`pretrain` stage does (embedder.generator.pretrain_generator's steps: build, pretrain,
held-out one-word VQA), per seed, and prints the accuracies, whether it is ready, and the
pretraining time as a ratio to the baseline measured in the same run (absolute times on a
shared machine are noise).

Variants change the pretrain settings (`--set`-style overrides of the pretrain section), for
the mix experiments embedder.generator.MIX (the share of each kind of example), and for the
world's own difficulty embedder.world.POSITION_X (how far apart left, centre and right are).

    .venv/bin/python bench/generator_readiness.py [--variants baseline,patch4,...]
        [--seeds 0,1,2] [--eval-per-type 64] [--json bench/.generator_readiness.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from embedder import generator, world
from embedder.config import PretrainConfig, WorldConfig
from embedder.model.backbone import build_tiny

DETAIL_MIX = (
    ("caption", 0.18),
    ("bare_image", 0.06),
    ("vqa", 0.44),
    ("one_word", 0.16),
    ("bare_text", 0.06),
    ("one_word_system", 0.10),
)
# name -> (pretrain overrides, MIX replacement or None, embedder.world constants to replace).
# The world before the blue ramp (embedder.world.POSITION_CUE) and what was tried on it.
BEFORE = {"POSITION_CUE": None}
WIDE = {"POSITION_X": (0.22, 0.5, 0.78)}
VARIANTS: dict[str, tuple[dict[str, Any], Any, dict[str, Any]]] = {
    "world": ({}, None, {}),  # the world as it is (blue ramp)
    "baseline": ({}, None, BEFORE),
    "steps2x": ({"steps": 2400}, None, BEFORE),
    "patch4": ({"patch": 4}, None, BEFORE),
    "detail_mix": ({}, DETAIL_MIX, BEFORE),
    "wide_positions": ({}, None, {**BEFORE, **WIDE}),
    "gradient": ({}, None, {"POSITION_CUE": "gradient"}),
    "frame": ({}, None, {"POSITION_CUE": "frame"}),
    "rope_theta100": ({"rope_theta": 100.0}, None, BEFORE),
}


def run(name: str, seed: int, eval_per_type: int) -> dict[str, Any]:
    overrides, mix, world_constants = VARIANTS[name]
    cfg = PretrainConfig(**{**overrides, "seed": seed, "eval_per_type": eval_per_type})
    image_size = WorldConfig().image_size
    saved = generator.MIX, {k: getattr(world, k) for k in world_constants}
    generator.MIX = mix or saved[0]
    for key, value in world_constants.items():
        setattr(world, key, value)
    try:
        backbone = build_tiny(generator.corpus_texts(), cfg, image_size=image_size)
        tic = time.perf_counter()
        generator.pretrain(backbone, cfg, image_size=image_size, log_every=10**9)
        seconds = time.perf_counter() - tic
        # Held out: fresh scenes, drawn as the variant's world draws them.
        acc = generator.vqa_accuracy(
            backbone, per_type=eval_per_type, seed=seed, image_size=image_size
        )
    finally:
        generator.MIX = saved[0]
        for key, value in saved[1].items():
            setattr(world, key, value)
    return {
        "variant": name,
        "seed": seed,
        "seconds": seconds,
        "accuracy": acc,
        "ready": acc["category"] >= 0.8 and acc["position"] >= 0.8,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="world,baseline")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--eval-per-type", type=int, default=64)
    parser.add_argument("--json", default=str(Path(__file__).parent / ".generator_readiness.json"))
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    results = []
    for name in names:
        for seed in (int(s) for s in args.seeds.split(",")):
            r = run(name, seed, args.eval_per_type)
            results.append(r)
            a = r["accuracy"]
            print(
                f"{name:22s} seed {seed}: "
                + " ".join(f"{k} {v:.2f}" for k, v in a.items())
                + f"  ready {'yes' if r['ready'] else 'NO'}  {r['seconds']:.0f}s",
                flush=True,
            )
            Path(args.json).write_text(json.dumps(results, indent=2))
    base = [r["seconds"] for r in results if r["variant"] == "baseline"]
    if base:
        ref = sum(base) / len(base)
        print("\nPretraining time against the baseline of this run:")
        for name in names:
            mine = [r["seconds"] for r in results if r["variant"] == name]
            print(f"  {name:22s} x{sum(mine) / len(mine) / ref:.2f}")


if __name__ == "__main__":
    main()
