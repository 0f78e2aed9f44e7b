"""The miniature world: seeded Pillow-drawn scenes written in MMEB's on-disk layout.

The world exists so the whole pipeline can run, and the paper's effects can be looked for, on
a CPU in minutes. It is written exactly like an MMEB dump (one folder per subset with
`original-*.parquet` / `test-*.parquet`, images under separate roots) and goes through the
same readers as real data.

Design (docs/miniature.md): the main object is a *category with a fixed look* (an apple is always
a red circle), large and with a distinct silhouette, so a one-word summary is a category
name. Details (size, position, small dots) vary and are mentioned by captions and answers,
which open with the content-free "The image shows ...". The background's blue channel ramps
from left to right, so a patch's own pixels say where it is (POSITION_CUE). Eval lists hold
negatives of the same category that differ only in details. Train holds planted false
negatives: groups of pairs drawn from one scene spec, phrased differently, so each positive
also fits the others' queries; the group id is in the `fn_group` column so mining can be
scored.

Subsets (train = IND eval): ShapeClass (classification), ShapeVQA (vqa), ShapeCaps_t2i and
ShapeCaps_i2t (retrieval), ShapeRef (grounding: referring expression -> crop). OOD eval
subsets (Outline*) draw the same categories as outlines on striped backgrounds, a style never
seen in train.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter

from embedder.artifacts import json_text
from embedder.compositional import CATEGORIES as BENCHMARK_CATEGORIES
from embedder.config import WorldConfig
from embedder.outputs import World


@dataclass(frozen=True)
class Category:
    """A kind of main object with a fixed look (docs/miniature.md): its one-word name, its
    colour's name and RGB (0..255 each), and the silhouette `_shape_mask` draws."""

    name: str
    colour: str
    rgb: tuple[int, int, int]
    shape: str


CATEGORIES: tuple[Category, ...] = (
    Category("apple", "red", (210, 30, 30), "circle"),
    Category("tyre", "black", (25, 25, 25), "ring"),
    Category("lemon", "yellow", (240, 215, 20), "ellipse"),
    Category("leaf", "green", (30, 140, 40), "triangle"),
    Category("brick", "brown", (130, 70, 25), "rectangle"),
    Category("star", "orange", (245, 125, 0), "star"),
    Category("moon", "white", (250, 250, 250), "crescent"),
    Category("heart", "pink", (240, 90, 170), "heart"),
    Category("cross", "blue", (30, 70, 230), "plus"),
    Category("kite", "purple", (120, 30, 170), "diamond"),
    Category("house", "grey", (105, 105, 105), "house"),
    Category("bucket", "teal", (0, 135, 135), "trapezoid"),
)
SIZES = ("small", "large")
POSITIONS = ("left", "centre", "right")
MARK_COLOURS: dict[str, tuple[int, int, int]] = {
    "blue": (20, 40, 200),
    "red": (200, 20, 20),
    "green": (20, 150, 20),
    "yellow": (230, 220, 0),
    "purple": (130, 20, 160),
    "black": (0, 0, 0),
}
NUMBER_WORDS = ("no", "one", "two", "three")
# The main object's centre for each of POSITIONS, as a share of the image side.
POSITION_X = (0.3, 0.5, 0.7)
# What in the background tells a patch where it is. "blue_ramp" (the world's): the blue
# channel runs from 30 at the left edge to 230 at the right, whatever the tint, so every
# patch's own pixels say its x. Without it (None) the tiny generator never learned position
# (held-out .28, chance .33: a uniform noisy background and relative position encodings leave
# nothing that says where a patch is); "gradient" (a brightness ramp on the random tint, only
# relative) reached .38 and "frame" (a dark border) .58. bench/generator_readiness.py.
POSITION_CUE: str | None = "blue_ramp"


@dataclass(frozen=True)
class Scene:
    """What an image shows; rendering adds only noise and jitter."""

    category: int
    size: int  # index into SIZES
    position: int  # index into POSITIONS
    marks: int = 0  # number of small dots, 0-3
    mark_colour: str = "blue"

    @property
    def cat(self) -> Category:
        """The scene's main object, `CATEGORIES[self.category]`."""
        return CATEGORIES[self.category]


# ---------------------------------------------------------------------------------- text


def _marks_phrase(s: Scene, variant: int) -> str:
    if s.marks == 0:
        return ("", " and nothing else", ", alone")[variant]
    n, dots = NUMBER_WORDS[s.marks], "dot" if s.marks == 1 else "dots"
    return (
        f" with {n} small {s.mark_colour} {dots}",
        f" and {n} tiny {s.mark_colour} {dots}",
        f", next to {n} little {s.mark_colour} {dots}",
    )[variant]


def caption(s: Scene, variant: int = 0) -> str:
    """Three phrasings of the same content; all open with the content-free 'The image shows'.

    `variant`: 0, 1 or 2 (IndexError otherwise). Size, colour, name, position and the dots
    are all named."""
    c = s.cat
    size = (("small", "large"), ("little", "big"), ("small", "large"))[variant][s.size]
    pos = (
        ("on the left", "in the centre", "on the right"),
        ("at the left side", "in the middle", "at the right side"),
        ("to the left", "at the centre", "to the right"),
    )[variant][s.position]
    if variant == 2:
        return (
            f"The image shows one {c.colour} {c.name}, {size}, placed {pos}{_marks_phrase(s, 2)}."
        )
    return f"The image shows a {size} {c.colour} {c.name} {pos}{_marks_phrase(s, variant)}."


def article(word: str) -> str:
    """The article for `word`: "an" before a lower-case vowel letter, else "a" (enough for
    the category names). Raises IndexError for an empty word."""
    return "an" if word[0] in "aeiou" else "a"


QUESTION_TYPES = ("category", "colour", "position", "size", "count", "mark_colour")


def question(kind: str, s: Scene, variant: int = 0) -> str:
    """A VQA question about scene `s`: `kind` one of QUESTION_TYPES, `variant` 0 or 1 (two
    wordings). Raises KeyError for another kind, IndexError for another variant."""
    name = s.cat.name
    return {
        "category": ("What is the main object?", "Which object is shown?"),
        "colour": (f"What colour is the {name}?", f"Which colour does the {name} have?"),
        "position": (f"Where is the {name}?", f"In which part of the image is the {name}?"),
        "size": (f"How big is the {name}?", f"What size is the {name}?"),
        "count": ("How many small dots are there?", "What is the number of tiny dots?"),
        "mark_colour": ("What colour are the small dots?", "Which colour do the tiny dots have?"),
    }[kind][variant]


def answer(kind: str, s: Scene, variant: int = 0) -> str:
    """The answer to `question(kind, s, variant)`: a short sentence (never a bare word; the
    world's answers open with filler, docs/miniature.md). `variant` 0 or 1 (IndexError
    otherwise); a `kind` not in QUESTION_TYPES is answered as "mark_colour", not refused."""
    c = s.cat
    if kind == "category":
        return (f"It is {article(c.name)} {c.name}.", f"The object is {article(c.name)} {c.name}.")[
            variant
        ]
    if kind == "colour":
        return (f"It is {c.colour}.", f"The {c.name} is {c.colour}.")[variant]
    if kind == "position":
        where = ("on the left", "in the centre", "on the right")[s.position]
        return (f"It is {where}.", f"The {c.name} is {where}.")[variant]
    if kind == "size":
        return (f"It is {SIZES[s.size]}.", f"The {c.name} is {SIZES[s.size]}.")[variant]
    if kind == "count":
        n = NUMBER_WORDS[s.marks]
        return (f"There are {n} dots.", f"I count {n} dots.")[variant]
    return (f"They are {s.mark_colour}.", f"The dots are {s.mark_colour}.")[variant]


def referring_expression(s: Scene) -> str:
    """How a grounding query names the object: "the <colour> <name> on the <left|centre|
    right>"."""
    return f"the {s.cat.colour} {s.cat.name} on the {('left', 'centre', 'right')[s.position]}"


# ------------------------------------------------------------------------------ drawing


def _shape_mask(shape: str, size_px: int, cx: float, cy: float, r: float) -> Image.Image:
    mask = Image.new("L", (size_px, size_px), 0)
    d = ImageDraw.Draw(mask)

    def poly(points: list[tuple[float, float]]) -> None:
        d.polygon([(cx + x * r, cy + y * r) for x, y in points], fill=255)

    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "ring":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        d.ellipse((cx - 0.5 * r, cy - 0.5 * r, cx + 0.5 * r, cy + 0.5 * r), fill=0)
    elif shape == "ellipse":
        d.ellipse((cx - r, cy - 0.55 * r, cx + r, cy + 0.55 * r), fill=255)
    elif shape == "triangle":
        poly([(0, -1), (0.95, 0.8), (-0.95, 0.8)])
    elif shape == "rectangle":
        d.rectangle((cx - r, cy - 0.5 * r, cx + r, cy + 0.5 * r), fill=255)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = 1.0 if k % 2 == 0 else 0.42
            ang = -np.pi / 2 + k * np.pi / 5
            pts.append((rad * np.cos(ang), rad * np.sin(ang)))
        poly(pts)
    elif shape == "crescent":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        d.ellipse((cx - 0.35 * r, cy - 0.9 * r, cx + 1.45 * r, cy + 0.9 * r), fill=0)
    elif shape == "heart":
        d.ellipse((cx - r, cy - 0.8 * r, cx, cy + 0.2 * r), fill=255)
        d.ellipse((cx, cy - 0.8 * r, cx + r, cy + 0.2 * r), fill=255)
        poly([(-0.97, -0.15), (0.97, -0.15), (0, 1)])
    elif shape == "plus":
        d.rectangle((cx - r, cy - 0.3 * r, cx + r, cy + 0.3 * r), fill=255)
        d.rectangle((cx - 0.3 * r, cy - r, cx + 0.3 * r, cy + r), fill=255)
    elif shape == "diamond":
        poly([(0, -1), (0.7, 0), (0, 1), (-0.7, 0)])
    elif shape == "house":
        poly([(0, -1), (0.9, -0.2), (0.9, 0.9), (-0.9, 0.9), (-0.9, -0.2)])
    elif shape == "trapezoid":
        poly([(-1, -0.7), (1, -0.7), (0.55, 0.8), (-0.55, 0.8)])
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def _background(size_px: int, rng: np.random.Generator, style: str) -> np.ndarray:
    tint = rng.integers(140, 205, size=3)
    if style == "outline":
        other = rng.integers(140, 205, size=3)
        yy, xx = np.mgrid[0:size_px, 0:size_px]
        width = max(3, size_px // 10)
        stripes = ((xx + yy * int(rng.integers(0, 2))) // width) % 2
        img = np.where(stripes[..., None] == 0, tint, other).astype(np.float32)
    else:
        img = np.broadcast_to(tint, (size_px, size_px, 3)).astype(np.float32)
    img += rng.normal(0, 10, size=img.shape)
    if POSITION_CUE == "gradient":
        # Darker to the left, lighter to the right: every patch's own pixels say where it is.
        img += np.linspace(-30, 30, size_px, dtype=np.float32)[None, :, None]
    elif POSITION_CUE == "blue_ramp":
        # The background's blue channel alone says x, whatever the tint: absolute per patch.
        img[..., 2] = np.linspace(30, 230, size_px, dtype=np.float32)[None, :]
    elif POSITION_CUE == "frame":
        edge = max(2, size_px // 32)
        img[:edge], img[-edge:], img[:, :edge], img[:, -edge:] = 40, 40, 40, 40
    return np.clip(img, 0, 255).astype(np.uint8)


def _paint(img: Image.Image, mask: Image.Image, rgb: tuple[int, int, int], style: str) -> None:
    if style == "outline":
        # Keep a band at the silhouette's edge: the same shape, never seen drawn this way.
        mask = Image.fromarray(
            np.asarray(mask) - np.asarray(mask.filter(ImageFilter.MinFilter(5))), mode="L"
        )
    img.paste(Image.new("RGB", img.size, rgb), (0, 0), mask)


def _object_geometry(
    s: Scene, size_px: int, rng: random.Random, centre_x: float | None = None
) -> tuple[float, float, float]:
    scale = size_px / 64
    r = (rng.uniform(14, 15.5) if s.size == 0 else rng.uniform(18.5, 20)) * scale
    cx = centre_x if centre_x is not None else POSITION_X[s.position] * size_px
    cx += rng.uniform(-1.5, 1.5) * scale
    cy = size_px / 2 + rng.uniform(-2, 2) * scale
    return cx, cy, r


def _paint_marks(img: Image.Image, s: Scene, size_px: int, rng: random.Random) -> None:
    if s.marks == 0:
        return
    d = ImageDraw.Draw(img)
    scale = size_px / 64
    y = (5.5 if rng.random() < 0.5 else 58.5) * scale
    slots = rng.sample([10, 22, 34, 46, 56], s.marks)
    for x in slots:
        x *= scale
        rad = 3 * scale
        d.ellipse((x - rad, y - rad, x + rad, y + rad), fill=MARK_COLOURS[s.mark_colour])


def render(s: Scene, size_px: int, seed: int, style: str = "filled") -> Image.Image:
    """Draw one scene. Same scene and seed -> the same pixels.

    A `size_px` x `size_px` RGB image (8 bits a channel): a noisy tinted background (striped
    for `style="outline"`) whose blue channel ramps from left to right (POSITION_CUE), the
    main object (radius about 14-20 px at 64 px, scaled with the side), filled or, for
    "outline", as a band at its edge, and its dots. Raises ValueError for a category shape
    `_shape_mask` does not know."""
    rng = random.Random(seed)
    img = Image.fromarray(_background(size_px, np.random.default_rng(seed), style))
    cx, cy, r = _object_geometry(s, size_px, rng)
    _paint(img, _shape_mask(s.cat.shape, size_px, cx, cy, r), s.cat.rgb, style)
    _paint_marks(img, s, size_px, rng)
    return img


def render_pair_scene(
    left: Scene, right: Scene, size_px: int, seed: int, style: str = "filled"
) -> tuple[Image.Image, tuple[Image.Image, Image.Image]]:
    """A grounding scene with two objects side by side, and a crop around each.

    `left` is drawn at 27% and `right` at 73% of the width (their own `position` is not
    used), smaller than in `render`. Returns the `size_px` square RGB scene and (left crop,
    right crop), each a 30 px (at 64 px, scaled) square around its object resized to
    `size_px` x `size_px`."""
    rng = random.Random(seed)
    img = Image.fromarray(_background(size_px, np.random.default_rng(seed), style))
    crops = []
    boxes = []
    for s, x in ((left, 0.27), (right, 0.73)):
        # Smaller objects so two fit; size still distinguishes small from large.
        scale = size_px / 64
        r = (rng.uniform(10, 11) if s.size == 0 else rng.uniform(13, 14)) * scale
        cx, cy = x * size_px + rng.uniform(-1, 1) * scale, size_px / 2
        _paint(img, _shape_mask(s.cat.shape, size_px, cx, cy, r), s.cat.rgb, style)
        half = 15 * scale
        boxes.append((int(cx - half), int(cy - half), int(cx + half), int(cy + half)))
    for box in boxes:
        crops.append(img.crop(box).resize((size_px, size_px), Image.Resampling.BILINEAR))
    return img, (crops[0], crops[1])


# ------------------------------------------------------------------------------ subsets

CLASS_QUERY = "<|image_1|>\nRepresent the given image for classification"
VQA_QUERY = "<|image_1|>\nRepresent the given image with the following question: {q}"
T2I_QUERY = "Find me an everyday image that matches the given caption: {c}"
T2I_TARGET = "<|image_1|>\nRepresent the given image."
I2T_QUERY = "<|image_1|>\nFind an image caption describing the given everyday image."
REF_QUERY = '<|image_1|>\nSelect the portion of the image that isolates the object labeled as "{r}"'
REF_TARGET = "<|image_1|>\nRepresent the given cropped image of the object"

TRAIN_SUBSETS = {
    "ShapeClass": "classification",
    "ShapeVQA": "vqa",
    "ShapeCaps_t2i": "retrieval",
    "ShapeCaps_i2t": "retrieval",
    "ShapeRef": "grounding",
}
OOD_PREFIX = ("Shape", "Outline")


def all_scenes() -> list[Scene]:
    """Every distinct scene spec: category x size x position x (no dots, or 1-3 dots of each
    MARK_COLOURS colour), 12 x 2 x 3 x 19 = 1,368, in a fixed order."""
    out = []
    for c in range(len(CATEGORIES)):
        for size in range(len(SIZES)):
            for pos in range(len(POSITIONS)):
                out.append(Scene(c, size, pos, 0))
                for n in range(1, 4):
                    out.extend(Scene(c, size, pos, n, mc) for mc in MARK_COLOURS)
    return out


def _subset_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFFFFFF


class _Writer:
    """Writes images below an images root and remembers relative paths."""

    def __init__(self, root: Path, subset: str) -> None:
        self.root = root
        self.folder = root / subset
        self.folder.mkdir(parents=True, exist_ok=True)
        self.subset = subset
        self.count = 0

    def save(self, img: Image.Image, name: str) -> str:
        img.save(self.folder / f"{name}.png", optimize=False)
        self.count += 1
        return f"{self.subset}/{name}.png"


def _distinct_specs(rng: random.Random, n: int) -> list[Scene]:
    """n scenes, distinct while the spec space lasts, so unplanted pairs are not accidental
    false negatives of each other."""
    pool = all_scenes()
    out: list[Scene] = []
    while len(out) < n:
        rng.shuffle(pool)
        out.extend(pool[: n - len(out)])
    return out


def _train_rows(name: str, cfg: WorldConfig, writer: _Writer) -> list[dict[str, Any]]:
    rng = random.Random(_subset_seed(cfg.seed, name))
    meta = TRAIN_SUBSETS[name]
    n = cfg.train_pairs
    # Planted false-negative groups (2-3 pairs from one spec), except in classification,
    # where pairs of one label already share their positive (the owner map handles that).
    n_planted = 0 if meta == "classification" else round(n * cfg.false_negative_share)
    group_sizes: list[int] = []
    while sum(group_sizes) < n_planted:
        group_sizes.append(min(rng.choice((2, 3)), max(2, n_planted - sum(group_sizes))))
    specs = _distinct_specs(rng, (n - sum(group_sizes)) + len(group_sizes))
    units: list[tuple[Scene, str | None, int]] = []  # (scene, group, variant)
    for g, size in enumerate(group_sizes):
        spec = specs.pop()
        units.extend((spec, f"{name}:g{g}", v) for v in range(size))
    units.extend((s, None, 0) for s in specs)
    rng.shuffle(units)
    rows = []
    for i, (scene, group, variant) in enumerate(units):
        seed = rng.randrange(1 << 30)
        row = {"neg_text": "", "neg_image_path": "", "fn_group": group}
        if meta == "classification":
            path = writer.save(render(scene, cfg.image_size, seed), f"{i:06d}")
            row |= {
                "qry": CLASS_QUERY,
                "qry_image_path": path,
                "pos_text": scene.cat.name,
                "pos_image_path": "",
            }
        elif meta == "vqa":
            kind = QUESTION_TYPES[(i if group is None else int(group.split("g")[-1])) % 6]
            if kind in ("count", "mark_colour") and scene.marks == 0:
                kind = "count"  # "no dots" is a fine answer; their colour is not
            path = writer.save(render(scene, cfg.image_size, seed), f"{i:06d}")
            v = variant % 2
            row |= {
                "qry": VQA_QUERY.format(q=question(kind, scene, v)),
                "qry_image_path": path,
                "pos_text": answer(kind, scene, v),
                "pos_image_path": "",
            }
        elif name.endswith("t2i"):
            path = writer.save(render(scene, cfg.image_size, seed), f"{i:06d}")
            row |= {
                "qry": T2I_QUERY.format(c=caption(scene, variant % 3)),
                "qry_image_path": "",
                "pos_text": T2I_TARGET,
                "pos_image_path": path,
            }
        elif name.endswith("i2t"):
            path = writer.save(render(scene, cfg.image_size, seed), f"{i:06d}")
            row |= {
                "qry": I2T_QUERY,
                "qry_image_path": path,
                "pos_text": caption(scene, variant % 3),
                "pos_image_path": "",
            }
        else:  # grounding
            other = _other_scene(scene, rng)
            left, right = (scene, other) if rng.random() < 0.5 else (other, scene)
            target = replace(scene, position=0 if left is scene else 2)
            img, crops = render_pair_scene(
                replace(left, position=0), replace(right, position=2), cfg.image_size, seed
            )
            qpath = writer.save(img, f"{i:06d}")
            cpath = writer.save(crops[0 if left is scene else 1], f"{i:06d}_crop")
            row |= {
                "qry": REF_QUERY.format(r=referring_expression(target)),
                "qry_image_path": qpath,
                "pos_text": REF_TARGET,
                "pos_image_path": cpath,
            }
        rows.append(row)
    return rows


def _other_scene(scene: Scene, rng: random.Random) -> Scene:
    cat = rng.choice([k for k in range(len(CATEGORIES)) if k != scene.category])
    return Scene(cat, rng.randrange(2), 0)


def _same_category_variant(scene: Scene, rng: random.Random) -> Scene:
    """Same category, different details: the negatives category alone cannot rule out."""
    while True:
        marks = rng.randrange(4)
        other = Scene(
            scene.category,
            rng.randrange(2),
            rng.randrange(3),
            marks,
            rng.choice(list(MARK_COLOURS)) if marks else "blue",
        )
        if other != scene:
            return other


def _eval_rows(name: str, cfg: WorldConfig, writer: _Writer, style: str) -> list[dict[str, Any]]:
    rng = random.Random(_subset_seed(cfg.seed + 7919, name))
    meta = TRAIN_SUBSETS[name.replace(OOD_PREFIX[1], OOD_PREFIX[0])]
    n, k = cfg.eval_queries, cfg.eval_candidates
    scenes = _distinct_specs(rng, n)
    rows: list[dict[str, Any]] = []
    save = writer.save

    if meta == "classification":
        labels = [c.name for c in CATEGORIES]
        for i, s in enumerate(scenes):
            path = save(render(s, cfg.image_size, rng.randrange(1 << 30), style), f"{i:05d}")
            others = [lab for lab in labels if lab != s.cat.name]
            rng.shuffle(others)
            texts = [s.cat.name, *others]
            rows.append(
                {
                    "qry_text": CLASS_QUERY,
                    "qry_img_path": path,
                    "tgt_text": texts,
                    "tgt_img_path": [""] * len(texts),
                    "tgt_category": texts,  # a label is its category's name
                }
            )
    elif meta == "vqa":
        for i, s in enumerate(scenes):
            kind = QUESTION_TYPES[i % 6]
            if kind == "mark_colour" and s.marks == 0:
                kind = "count"
            path = save(render(s, cfg.image_size, rng.randrange(1 << 30), style), f"{i:05d}")
            correct = answer(kind, s)
            wrong = sorted({answer(kind, o) for o in all_scenes()} - {correct})
            rng.shuffle(wrong)
            texts = [correct, *wrong[: k - 1]]
            rows.append(
                {
                    "qry_text": VQA_QUERY.format(q=question(kind, s)),
                    "qry_img_path": path,
                    "tgt_text": texts,
                    "tgt_img_path": [""] * len(texts),
                }
            )
    elif meta == "retrieval":
        t2i = name.endswith("t2i")

        def target(s: Scene, label: str) -> str:
            if t2i:
                return writer.save(render(s, cfg.image_size, rng.randrange(1 << 30), style), label)
            return caption(s)

        # Each query's own target plus same-category variants; the other negatives are other
        # queries' targets, so candidates repeat across queries as they do in MMEB.
        targets = [target(s, f"{i:05d}") for i, s in enumerate(scenes)]
        for i, s in enumerate(scenes):
            hard = [
                target(_same_category_variant(s, rng), f"{i:05d}_h{j}")
                for j in range(cfg.same_category_negatives)
            ]
            easy_idx = [j for j in range(n) if scenes[j].category != s.category]
            easy_j = rng.sample(easy_idx, min(len(easy_idx), k - 1 - len(hard)))
            cands = [targets[i], *hard, *(targets[j] for j in easy_j)]
            cats = [s.cat.name] * (1 + len(hard)) + [scenes[j].cat.name for j in easy_j]
            if t2i:
                rows.append(
                    {
                        "qry_text": T2I_QUERY.format(c=caption(s)),
                        "qry_img_path": "",
                        "tgt_text": [T2I_TARGET] * len(cands),
                        "tgt_img_path": cands,
                        "tgt_category": cats,
                    }
                )
            else:
                qimg = render(s, cfg.image_size, rng.randrange(1 << 30), style)
                rows.append(
                    {
                        "qry_text": I2T_QUERY,
                        "qry_img_path": writer.save(qimg, f"{i:05d}q"),
                        "tgt_text": cands,
                        "tgt_img_path": [""] * len(cands),
                        "tgt_category": cats,
                    }
                )
    else:  # grounding
        crops: list[str] = []
        pending = []
        for i, s in enumerate(scenes):
            other = _other_scene(s, rng)
            target_left = rng.random() < 0.5
            left, right = (s, other) if target_left else (other, s)
            img, (lc, rc) = render_pair_scene(
                replace(left, position=0),
                replace(right, position=2),
                cfg.image_size,
                rng.randrange(1 << 30),
                style,
            )
            qpath = save(img, f"{i:05d}")
            tpath = save(lc if target_left else rc, f"{i:05d}_t")
            opath = save(rc if target_left else lc, f"{i:05d}_o")
            crops.append(tpath)
            target = replace(s, position=0 if target_left else 2)
            pending.append((i, s, qpath, tpath, opath, target, other))
        for i, s, qpath, tpath, opath, target, other in pending:
            hard = []
            # A hard negative is the same category at the other size (pair scenes draw no dots,
            # so size is the one detail a crop shows), cropped from the target's side of its
            # own pair scene: a crop keeps its side's background (POSITION_CUE), which must
            # not be what tells them apart.
            side = target.position
            for j in range(cfg.same_category_negatives):
                v = replace(target, size=1 - target.size, marks=0, mark_colour="blue")
                partner = replace(_other_scene(v, rng), position=2 - side)
                pair = (v, partner) if side == 0 else (partner, v)
                _, crops_of_pair = render_pair_scene(
                    *pair, cfg.image_size, rng.randrange(1 << 30), style
                )
                hard.append(save(crops_of_pair[0 if side == 0 else 1], f"{i:05d}_h{j}"))
            easy_idx = [j for j in range(n) if scenes[j].category != s.category]
            easy_j = rng.sample(easy_idx, min(len(easy_idx), k - 2 - len(hard)))
            cands = [tpath, opath, *hard, *(crops[j] for j in easy_j)]
            # The crop of the scene's other object is of another category (_other_scene).
            cats = [s.cat.name, other.cat.name, *[s.cat.name] * len(hard)]
            cats += [scenes[j].cat.name for j in easy_j]
            rows.append(
                {
                    "qry_text": REF_QUERY.format(r=referring_expression(target)),
                    "qry_img_path": qpath,
                    "tgt_text": [REF_TARGET] * len(cands),
                    "tgt_img_path": cands,
                    "tgt_category": cats,
                }
            )
    return rows


# ------------------------------------------------------------------ compositional set

# The second wording of sizes and positions (SugarCrepe++'s second caption).
_SIZE_WORDS = (SIZES, ("little", "big"))
_WHERE = (
    ("on the left", "in the centre", "on the right"),
    ("to the left", "at the centre", "to the right"),
)


def _object_phrase(size: int | None, category: Category, where: str, wording: int = 0) -> str:
    """ "a small red apple on the left"; `size` None leaves the size out, `wording` 1 takes
    the second size words ("little", "big")."""
    words = [category.colour, category.name]
    if size is not None:
        words.insert(0, _SIZE_WORDS[wording][size])
    return f"{article(words[0])} {' '.join(words)} {where}"


def compositional_entry(
    category: str, index: int, rng: random.Random
) -> tuple[list[Scene], dict[str, str]]:
    """One row of the world's compositional set: the scenes its image shows (one object, or
    the left and right objects of a pair scene for the swap categories; no dots) and its
    texts: `caption`, `caption2` (another wording of it, SugarCrepe++'s second caption) and
    `negative_caption`, which differs from the caption in what `category` names
    (embedder.compositional.CATEGORIES): another object name with the colour kept
    (replace_obj), another colour or the other size (replace_att, alternating with `index`),
    another position (replace_rel), another object added (add_obj), the wrong size added to a
    caption that names none (add_att), the two objects or their two sizes swapped (swap_obj,
    swap_att). Raises ValueError for another category."""
    if category in ("swap_obj", "swap_att"):
        left = Scene(rng.randrange(len(CATEGORIES)), rng.randrange(2), 0)
        right = replace(_other_scene(left, rng), position=2)
        if category == "swap_att":
            right = replace(right, size=1 - left.size)  # two sizes to swap

        def pair(a: Category, b: Category, size_a: int, size_b: int) -> str:
            return (
                f"The image shows {_object_phrase(size_a, a, 'on the left')} and "
                f"{_object_phrase(size_b, b, 'on the right')}."
            )

        texts = {
            "caption": pair(left.cat, right.cat, left.size, right.size),
            # Right first, other words: a lexically different caption that still fits.
            "caption2": "The image shows "
            f"{_object_phrase(right.size, right.cat, 'to the right', 1)} and "
            f"{_object_phrase(left.size, left.cat, 'to the left', 1)}.",
            "negative_caption": pair(right.cat, left.cat, left.size, right.size)
            if category == "swap_obj"
            else pair(left.cat, right.cat, right.size, left.size),
        }
        return [left, right], texts
    s = Scene(rng.randrange(len(CATEGORIES)), rng.randrange(2), rng.randrange(3))
    where = _WHERE[0][s.position]
    caption_text = f"The image shows {_object_phrase(s.size, s.cat, where)}."
    other = _other_scene(s, rng).cat
    if category == "replace_obj":
        negative = _object_phrase(s.size, replace(other, colour=s.cat.colour), where)
    elif category == "replace_att" and index % 2 == 0:
        negative = _object_phrase(s.size, replace(s.cat, colour=other.colour), where)
    elif category in ("replace_att", "add_att"):
        negative = _object_phrase(1 - s.size, s.cat, where)
        if category == "add_att":
            caption_text = f"The image shows {_object_phrase(None, s.cat, where)}."
    elif category == "replace_rel":
        moved = rng.choice([p for p in range(len(POSITIONS)) if p != s.position])
        negative = _object_phrase(s.size, s.cat, _WHERE[0][moved])
    elif category == "add_obj":
        added = f"{article(other.colour)} {other.colour} {other.name}"
        negative = f"{_object_phrase(s.size, s.cat, where)} and {added}"
    else:
        raise ValueError(f"unknown compositional category {category!r}")
    texts = {
        "caption": caption_text,
        "caption2": f"The image shows {_object_phrase(s.size, s.cat, _WHERE[1][s.position], 1)}.",
        "negative_caption": f"The image shows {negative}.",
    }
    return [s], texts


def _write_compositional(config: WorldConfig, out: Path) -> int:
    """The world's compositional set under `out` in SugarCrepe's and SugarCrepe++'s published
    layouts (embedder.datasets.compositional): `sugarcrepe/<category>.json` (an object of
    entries), `sugarcrepe_pp/<category>.json` (a list) and `images/` (one PNG a row, the
    COCO val2017 stand-in). A category both benchmarks have shares its rows: the same image,
    caption and negative, SugarCrepe++ adding the second caption, as the real SugarCrepe++ was
    built from SugarCrepe's. Returns the number of images written."""
    images = out / "images"
    images.mkdir(parents=True)
    files: dict[str, dict[str, Any]] = {b: {} for b in BENCHMARK_CATEGORIES}
    count = 0
    for category in sorted({c for cats in BENCHMARK_CATEGORIES.values() for c in cats}):
        rng = random.Random(_subset_seed(config.seed, f"compositional/{category}"))
        entries = []
        for i in range(config.compositional_rows):
            scenes, texts = compositional_entry(category, i, rng)
            seed = rng.randrange(1 << 30)
            if len(scenes) == 2:
                img, _ = render_pair_scene(scenes[0], scenes[1], config.image_size, seed)
            else:
                img = render(scenes[0], config.image_size, seed)
            name = f"{category}_{i:04d}.png"
            img.save(images / name, optimize=False)
            count += 1
            entries.append({"filename": name, **texts})
        for bench, cats in BENCHMARK_CATEGORIES.items():
            if category in cats:
                files[bench][category] = entries
    for bench, by_category in files.items():
        folder = out / bench
        folder.mkdir(parents=True)
        for category, entries in by_category.items():
            if bench == "sugarcrepe":
                keep = ("filename", "caption", "negative_caption")
                data: Any = {str(i): {k: e[k] for k in keep} for i, e in enumerate(entries)}
            else:
                data = [{"id": i, **e} for i, e in enumerate(entries)]
            (folder / f"{category}.json").write_text(json_text(data, indent=1))
    return count


def _write_table(folder: Path, file_name: str, rows: list[dict[str, Any]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    # Row groups of 1,024 rows, like the hub's Parquet exports, so readers stream them.
    pq.write_table(pa.Table.from_pylist(rows), folder / file_name, row_group_size=1024)


def build_world(config: WorldConfig, out: Path) -> World:
    """Write the miniature world into `out` in MMEB's layout:

    train/<Subset>/original-00000-of-00001.parquet, train_images/<Subset>/*.png,
    eval/<Subset>/test-00000-of-00001.parquet, eval_images/<Subset>/*.png,
    and train/subsets.json, eval/subsets.json describing meta-task and IND/OOD; with
    `config.compositional_rows`, compositional/ holds the world's SugarCrepe and
    SugarCrepe++ set (`_write_compositional`, `compositional_entry`).

    The `world` stage (docs/miniature.md). Train subsets (TRAIN_SUBSETS) have MMEB-train's
    columns plus `fn_group` (planted false-negative groups, null elsewhere),
    `config.train_pairs` rows each; eval subsets Shape* (IND) and Outline* (OOD) have MMEB-eval's
    columns, `config.eval_queries` rows each, the correct candidate at index 0 (12 labels
    for classification; up to `config.eval_candidates` elsewhere), plus `tgt_category` (each
    candidate's category name, parallel to `tgt_text`) in every eval subset but the VQA
    ones, whose answers have none. Images are PNGs of
    `config.image_size` px squares; paths in the tables are relative to the images roots.
    Deterministic for a given config (`config.seed`). Rows per table and the images count
    are the output's rows and metrics. Raises OSError when a file cannot be
    written; a config whose eval_candidates leave no room for the same-category negatives
    is refused before (WorldConfig's validation).
    """
    rows: dict[str, int] = {}
    images = 0
    train_meta: dict[str, dict[str, str]] = {}
    for name, meta in TRAIN_SUBSETS.items():
        writer = _Writer(out / "train_images", name)
        table = _train_rows(name, config, writer)
        _write_table(out / "train" / name, "original-00000-of-00001.parquet", table)
        rows[f"train:{name}"] = len(table)
        images += writer.count
        train_meta[name] = {"meta_task": meta, "distribution": "ind"}
    eval_meta: dict[str, dict[str, str]] = {}
    for name, meta in TRAIN_SUBSETS.items():
        for prefix, style, dist in (
            (OOD_PREFIX[0], "filled", "ind"),
            (OOD_PREFIX[1], "outline", "ood"),
        ):
            eval_name = name.replace(OOD_PREFIX[0], prefix)
            writer = _Writer(out / "eval_images", eval_name)
            table = _eval_rows(eval_name, config, writer, style)
            _write_table(out / "eval" / eval_name, "test-00000-of-00001.parquet", table)
            rows[f"eval:{eval_name}"] = len(table)
            images += writer.count
            eval_meta[eval_name] = {"meta_task": meta, "distribution": dist}
    (out / "train" / "subsets.json").write_text(json_text(train_meta, indent=2))
    (out / "eval" / "subsets.json").write_text(json_text(eval_meta, indent=2))
    if config.compositional_rows:
        images += _write_compositional(config, out / "compositional")
    return World(
        folder=out, rows=rows, metrics={"images": images}, info={"categories": len(CATEGORIES)}
    )
