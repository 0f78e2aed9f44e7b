"""Compositional scores: SugarCrepe and SugarCrepe++ beside MMEB (docs/method.md section 8).

Both benchmarks ask whether an embedding notices a replaced, swapped or added object,
attribute or relation: an image comes with a caption that fits it and a negative caption
that differs from it in one such detail.

- SugarCrepe (Hsieh et al., 2023), image-to-text accuracy (`itt`): the caption scores above
  the negative against the image.
- SugarCrepe++ (Dumpala et al., 2024) gives each image two captions that fit it, worded
  differently, and one negative. Image-to-text (`itt`): both captions score above the
  negative against the image. Text-only (`tot`): the two captions are closer to each other
  than either is to the negative.

The comparisons follow MMEB's convention (embedder.evaluate): numpy argmax over the scores
with the correct side first, so an exact tie counts as correct; the strict view
(`itt_strict`, `tot_strict`: the correct side wins by more than the tie margin) is reported
beside, never instead. The benchmarks' own scripts use strict `>`; with real weights the two
differ only on exact ties.

Per category the share of rows judged correct; per category group (add, replace, swap) and
over all categories of a benchmark the mean of the category scores (each category counts
once, as the benchmarks report their averages). The embedding side is in embedder.evaluate:
images are embedded as candidates (the image alone, no instruction) and captions as
queries behind embedder.model.prompts.CAPTION_PROMPT, as the authors' evaluation scripts do
(embedder.embed.ItemBuilder.compositional_row).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Benchmark ids (also the metric prefixes: MLflow metric names cannot hold "+").
SUGARCREPE = "sugarcrepe"
SUGARCREPE_PP = "sugarcrepe_pp"
BENCHMARKS: tuple[str, ...] = (SUGARCREPE, SUGARCREPE_PP)
TITLES = {SUGARCREPE: "SugarCrepe", SUGARCREPE_PP: "SugarCrepe++"}
# Each benchmark's categories, as its published files name them (<category>.json).
CATEGORIES: dict[str, tuple[str, ...]] = {
    SUGARCREPE: (
        "add_att",
        "add_obj",
        "replace_att",
        "replace_obj",
        "replace_rel",
        "swap_att",
        "swap_obj",
    ),
    SUGARCREPE_PP: ("replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj"),
}
GROUPS: tuple[str, ...] = ("add", "replace", "swap")
# The scores of each benchmark (the strict views are `<score>_strict`).
SCORES: dict[str, tuple[str, ...]] = {SUGARCREPE: ("itt",), SUGARCREPE_PP: ("itt", "tot")}
# A random embedding's expected score: SugarCrepe's positive beats the negative half the time;
# in SugarCrepe++ the negative is the lowest of three scores (itt), or the captions' own
# similarity the highest of the three pairwise ones (tot), a third of the time.
CHANCE: dict[str, dict[str, float]] = {
    SUGARCREPE: {"itt": 0.5},
    SUGARCREPE_PP: {"itt": 1 / 3, "tot": 1 / 3},
}


def group_of(category: str) -> str:
    """The category's group: "add", "replace" or "swap" (the part before the first "_").
    Raises ValueError for a category outside GROUPS."""
    group = category.split("_", 1)[0]
    if group not in GROUPS:
        raise ValueError(f"compositional category {category!r} is not in a group of {GROUPS}")
    return group


def _similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two L2-normalised (d,) vectors, in float32 (as evaluate scores MMEB)."""
    return float((a.astype(np.float32) * b.astype(np.float32)).sum())


def _beats(correct: float, other: float, eps: float) -> tuple[bool, bool]:
    """(MMEB's argmax with `correct` first: a tie counts as correct, strict: more than `eps`
    above)."""
    return correct >= other, correct > other + eps


def row_scores(
    benchmark: str,
    image: np.ndarray,
    caption: np.ndarray,
    negative: np.ndarray,
    caption2: np.ndarray | None,
    eps: float,
) -> dict[str, bool]:
    """One row's judgements: `itt` and `itt_strict`, and for SugarCrepe++ `tot` and
    `tot_strict` (module docstring). Vectors are (d,) L2-normalised embeddings; `caption2`
    is SugarCrepe++'s second caption (None for SugarCrepe); `eps` the tie margin of the
    strict views (embedder.evaluate.TIE_EPS). Raises ValueError for an unknown benchmark
    or a missing `caption2` in SugarCrepe++."""
    neg = _similarity(image, negative)
    first = _beats(_similarity(image, caption), neg, eps)
    if benchmark == SUGARCREPE:
        return {"itt": first[0], "itt_strict": first[1]}
    if benchmark != SUGARCREPE_PP:
        raise ValueError(f"unknown compositional benchmark {benchmark!r}; known: {BENCHMARKS}")
    if caption2 is None:
        raise ValueError("a SugarCrepe++ row needs its second caption")
    second = _beats(_similarity(image, caption2), neg, eps)
    both = _similarity(caption, caption2)
    t1 = _beats(both, _similarity(caption, negative), eps)
    t2 = _beats(both, _similarity(caption2, negative), eps)
    return {
        "itt": first[0] and second[0],
        "itt_strict": first[1] and second[1],
        "tot": t1[0] and t2[0],
        "tot_strict": t1[1] and t2[1],
    }


def benchmark_scores(
    rows: Sequence[Mapping[str, Any]],
    keys: Sequence[Mapping[str, str | None]],
    vectors: Mapping[str, np.ndarray],
    eps: float,
) -> dict[str, dict[str, Any]]:
    """Scores of every benchmark present in `rows`.

    `rows`: compositional-table rows (`benchmark`, `category`); `keys[i]`: row i's embedding
    keys under "image", "caption", "negative" and "caption2" (None for SugarCrepe), keys of
    `vectors` ((d,) unit vectors). Returns, per benchmark id: `categories` (per category: each
    score and its strict view, shares in [0, 1], and `rows`), `groups` (per group present: the
    mean of its categories' scores), `mean` (over all its categories) and `chance`
    (`CHANCE`). Raises as `row_scores`."""
    judged: dict[str, dict[str, list[dict[str, bool]]]] = defaultdict(lambda: defaultdict(list))
    for row, k in zip(rows, keys, strict=True):
        c2 = k.get("caption2")
        judged[row["benchmark"]][row["category"]].append(
            row_scores(
                row["benchmark"],
                vectors[k["image"]],
                vectors[k["caption"]],
                vectors[k["negative"]],
                None if c2 is None else vectors[c2],
                eps,
            )
        )
    out: dict[str, dict[str, Any]] = {}
    for bench in (b for b in BENCHMARKS if b in judged):
        names = [n for s in SCORES[bench] for n in (s, f"{s}_strict")]
        cats = {
            cat: {
                **{n: float(np.mean([j[n] for j in judged[bench][cat]])) for n in names},
                "rows": len(judged[bench][cat]),
            }
            for cat in sorted(judged[bench])
        }
        by_group: dict[str, list[str]] = defaultdict(list)
        for cat in cats:
            by_group[group_of(cat)].append(cat)
        out[bench] = {
            "categories": cats,
            "groups": {
                g: {n: float(np.mean([cats[c][n] for c in by_group[g]])) for n in names}
                for g in GROUPS
                if g in by_group
            },
            "mean": {n: float(np.mean([v[n] for v in cats.values()])) for n in names},
            "chance": CHANCE[bench],
        }
    return out


def metrics(scores: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """`benchmark_scores`' numbers as flat metric names: `<benchmark>.<score>.<category |
    group | mean>`, e.g. `sugarcrepe.itt.swap_att`, `sugarcrepe_pp.tot_strict.mean`."""
    out: dict[str, float] = {}
    for bench, found in scores.items():
        for part in ("categories", "groups"):
            for name, values in found[part].items():
                out.update({f"{bench}.{s}.{name}": v for s, v in values.items() if s != "rows"})
        out.update({f"{bench}.{s}.mean": v for s, v in found["mean"].items()})
    return out
