"""The miniature world: deterministic, MMEB-shaped, all meta-tasks, planted false negatives."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from embedder import world
from embedder.config import WorldConfig
from embedder.world import CATEGORIES, Scene, build_world, caption, render
from tests.conftest import SMALL_WORLD


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(world_dir: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    build_world(WorldConfig(**SMALL_WORLD), again)
    assert _digest(again) == _digest(world_dir)
    other = tmp_path / "other"
    build_world(WorldConfig(**{**SMALL_WORLD, "seed": 1}), other)
    assert _digest(other) != _digest(world_dir)


def test_layout_and_coverage(world_dir: Path) -> None:
    train = json.loads((world_dir / "train" / "subsets.json").read_text())
    evals = json.loads((world_dir / "eval" / "subsets.json").read_text())
    assert {v["meta_task"] for v in train.values()} == {
        "classification",
        "vqa",
        "retrieval",
        "grounding",
    }
    for dist in ("ind", "ood"):
        tasks = {v["meta_task"] for v in evals.values() if v["distribution"] == dist}
        assert tasks == {"classification", "vqa", "retrieval", "grounding"}
    for name in train:
        assert (world_dir / "train" / name / "original-00000-of-00001.parquet").is_file()
    for name in evals:
        t = pq.read_table(world_dir / "eval" / name / "test-00000-of-00001.parquet")
        columns = ["qry_text", "qry_img_path", "tgt_text", "tgt_img_path"]
        # gen2embed's own column, beside MMEB's: each candidate's category (answers have none).
        assert t.column_names == columns + ([] if "VQA" in name else ["tgt_category"])
        assert t.num_rows == SMALL_WORLD["eval_queries"]


def test_eval_candidates_hold_hard_same_category_negatives(world_dir: Path) -> None:
    t = pq.read_table(world_dir / "eval" / "ShapeCaps_i2t" / "test-00000-of-00001.parquet")
    names = [c.name for c in CATEGORIES]
    for texts in t["tgt_text"].to_pylist():
        assert len(texts) == SMALL_WORLD["eval_candidates"]
        assert len(set(texts)) == len(texts), "candidates are distinct"
        correct_cat = next(n for n in names if f" {n} " in texts[0])
        same = [x for x in texts[1:] if f" {correct_cat} " in x]
        assert len(same) == SMALL_WORLD["same_category_negatives"]
    cls = pq.read_table(world_dir / "eval" / "ShapeClass" / "test-00000-of-00001.parquet")
    for texts in cls["tgt_text"].to_pylist():
        assert sorted(texts) == sorted(names)


def test_planted_false_negatives_are_distinct_but_interchangeable(world_dir: Path) -> None:
    for name in ("ShapeCaps_i2t", "ShapeCaps_t2i", "ShapeVQA", "ShapeRef"):
        rows = pq.read_table(
            world_dir / "train" / name / "original-00000-of-00001.parquet"
        ).to_pylist()
        groups: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            if r["fn_group"]:
                groups[r["fn_group"]].append(r)
        assert groups, name
        for members in groups.values():
            assert 2 <= len(members) <= 3
            contents = {
                (m["qry"], m["qry_image_path"], m["pos_text"], m["pos_image_path"]) for m in members
            }
            assert len(contents) == len(members), "group members are distinct pairs"
    cls = pq.read_table(world_dir / "train" / "ShapeClass" / "original-00000-of-00001.parquet")
    assert set(cls["fn_group"].to_pylist()) == {None}


def test_captions_open_with_filler_and_render_is_deterministic() -> None:
    s = Scene(0, 1, 2, 2, "blue")
    for v in range(3):
        assert caption(s, v).startswith("The image shows ")
        assert "apple" in caption(s, v) and "two" in caption(s, v)
    a, b = render(s, 64, seed=5), render(s, 64, seed=5)
    assert a.tobytes() == b.tobytes()
    assert render(s, 64, seed=6).tobytes() != a.tobytes()
    assert len(world.all_scenes()) == 12 * 2 * 3 * (1 + 3 * 6)


def test_eval_candidates_name_their_categories(world_dir: Path) -> None:
    names = [c.name for c in CATEGORIES]

    def named(text: str) -> str:
        (name,) = [n for n in names if f" {n}" in f" {text} ".replace(".", " ")]
        return name

    for subset in ("ShapeClass", "ShapeCaps_i2t", "ShapeCaps_t2i", "ShapeRef", "OutlineRef"):
        table = pq.read_table(world_dir / "eval" / subset / "test-00000-of-00001.parquet")
        for row in table.to_pylist():
            cats = row["tgt_category"]
            assert len(cats) == len(row["tgt_text"])
            if subset == "ShapeClass":
                assert cats == row["tgt_text"], "a label is its category"
            elif subset == "ShapeCaps_i2t":
                assert cats == [named(t) for t in row["tgt_text"]], "each caption's own object"
            else:  # image candidates: the query names the correct one's category
                assert cats[0] == named(row["qry_text"])
                hard = SMALL_WORLD["same_category_negatives"]
                assert cats[1:].count(cats[0]) == hard, "its same-category negatives only"
    vqa = pq.read_table(world_dir / "eval" / "ShapeVQA" / "test-00000-of-00001.parquet")
    assert "tgt_category" not in vqa.column_names, "answers have no category"


@pytest.mark.parametrize("style", ["filled", "outline"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_background_says_where_a_patch_is_whatever_the_tint(style: str, seed: int) -> None:
    """The blue channel ramps left to right, the same in every image (docs/miniature.md:
    without an absolute cue the tiny generator never learned position)."""
    import numpy as np

    top = np.asarray(render(Scene(seed % 12, 1, seed % 3), 64, seed=seed, style=style))[0]
    ramp = np.linspace(30, 230, 64).astype(np.uint8)
    assert (top[:, 2] == ramp).all(), "row 0 holds no object and no dot"
    # The other channels keep the image's own tint and noise.
    other = np.asarray(render(Scene(0, 1, 0), 64, seed=seed + 100, style=style))[0]
    assert (top[:, :2] != other[:, :2]).any()


def test_grounding_hard_negatives_differ_in_the_object_not_in_where_they_were_cut(
    world_dir: Path,
) -> None:
    """A crop keeps its side's background ramp: a hard negative cut from the other side would
    be told apart by that alone. They come from the target's side; the other object's crop
    (the opposite side) shows the cue does separate sides."""
    import numpy as np
    from PIL import Image

    hard = SMALL_WORLD["same_category_negatives"]
    for subset in ("ShapeRef", "OutlineRef"):
        table = pq.read_table(world_dir / "eval" / subset / "test-00000-of-00001.parquet")
        for row in table.to_pylist():
            paths = row["tgt_img_path"]

            def top_blue(path: str) -> float:
                image = np.asarray(Image.open(world_dir / "eval_images" / path))
                return float(image[0, :, 2].mean())  # the crop's top row: background only

            target, other = top_blue(paths[0]), top_blue(paths[1])
            assert abs(target - other) > 50, "the two sides' crops differ in the cue"
            for p in paths[2 : 2 + hard]:
                assert abs(top_blue(p) - target) < 15, (subset, row["qry_text"], p)


COLOURS = {c.colour for c in CATEGORIES}
NAMES = {c.name for c in CATEGORIES}
WHERE = {"left", "centre", "right"}


def _changed(a: str, b: str) -> tuple[list[str], list[str]]:
    """The words of `a` and of `b` that are not at the same place in the other."""
    wa, wb = a.rstrip(".").split(), b.rstrip(".").split()
    if len(wa) != len(wb):
        return wa, wb
    pairs = [(x, y) for x, y in zip(wa, wb, strict=True) if x != y]
    return [x for x, _ in pairs], [y for _, y in pairs]


def _differs_as_named(category: str, caption_text: str, negative: str) -> bool:
    """Whether the negative differs from the caption in what `category` names, and only
    there (the world's compositional set, embedder.world.compositional_entry)."""
    old, new = _changed(caption_text, negative)
    if category == "replace_obj":
        return len(old) == 1 and {old[0], new[0]} <= NAMES
    if category == "replace_att":
        return len(old) == 1 and (
            {old[0], new[0]} <= COLOURS or {old[0], new[0]} <= {"small", "large"}
        )
    if category == "replace_rel":
        return (
            len(old) >= 1
            and (set(old) | set(new)) & WHERE
            and set(caption_text.split()) != set(negative.split())
        )
    if category == "add_obj":
        added = negative.rstrip(".")[len(caption_text.rstrip(".")) :].split()
        return (
            negative.startswith(caption_text.rstrip("."))
            and added[0] == "and"
            and added[-1] in NAMES
        )
    if category == "add_att":
        # One size word more ("an orange star" -> "a small orange star": the article follows).
        extra = set(negative.split()) - set(caption_text.split())
        sizes = extra & {"small", "large"}
        longer = len(negative.split()) == len(caption_text.split()) + 1
        return longer and len(sizes) == 1 and extra - sizes <= {"a", "an"}
    # swaps: the same words, in another order
    return sorted(caption_text.split()) == sorted(negative.split()) and caption_text != negative


def test_the_compositional_set_in_both_published_layouts(world_dir: Path) -> None:
    from embedder.compositional import CATEGORIES as BENCH

    root = world_dir / "compositional"
    n = SMALL_WORLD["compositional_rows"]
    sc = {
        c: json.loads((root / "sugarcrepe" / f"{c}.json").read_text()) for c in BENCH["sugarcrepe"]
    }
    pp = {
        c: json.loads((root / "sugarcrepe_pp" / f"{c}.json").read_text())
        for c in BENCH["sugarcrepe_pp"]
    }
    for category, entries in sc.items():
        assert list(entries) == [str(i) for i in range(n)]  # an object keyed "0", "1", ...
        for e in entries.values():
            assert set(e) == {"filename", "caption", "negative_caption"}
            assert (root / "images" / e["filename"]).is_file()
            assert _differs_as_named(category, e["caption"], e["negative_caption"]), e
    for category, items in pp.items():
        assert [e["id"] for e in items] == list(range(n))  # a list
        for e, same in zip(items, sc[category].values(), strict=True):
            assert set(e) == {"id", "filename", "caption", "caption2", "negative_caption"}
            # One row for both benchmarks, as SugarCrepe++ was built from SugarCrepe.
            assert {k: e[k] for k in same} == same
            assert e["caption2"] != e["caption"]
            # The second caption fits the image: the same objects, sizes and sides.
            words = set(e["caption2"].rstrip(".").split())
            assert words & NAMES == set(e["caption"].rstrip(".").split()) & NAMES


@pytest.mark.parametrize(
    "category",
    ["add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj"],
)
def test_each_kind_of_negative_over_many_rows(category: str) -> None:
    import random

    rng = random.Random(category)
    kinds = set()
    for i in range(60):
        scenes, texts = world.compositional_entry(category, i, rng)
        assert len(scenes) == (2 if category.startswith("swap") else 1)
        assert _differs_as_named(category, texts["caption"], texts["negative_caption"]), texts
        kinds.add(tuple(_changed(texts["caption"], texts["negative_caption"])[0][:1]))
    if category == "replace_att":  # colours and sizes both
        assert any(k and k[0] in COLOURS for k in kinds) and any(
            k and k[0] in {"small", "large"} for k in kinds
        )
