"""Image resolution rules of docs/method.md section 2, applied before the backbone's processor."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from PIL import Image

from embedder.image_files import read_image

ImageMode = Literal["fixed", "eval", "native"]


def eval_size(
    width: int, height: int, *, max_long: int = 992, min_short: int = 336, max_ratio: float = 2.0
) -> tuple[int, int]:
    """Aspect ratio at most 2:1 (squashed, not cropped), long side at most 992 px, short side
    never below 336 px (that rule wins).

    Takes and returns (width, height) in pixels; the result is rounded, each side at least
    1. The limits are parameters (defaults: docs/method.md section 2). An image is never
    made larger than the short-side rule needs. Raises ZeroDivisionError for a zero side."""
    w, h = float(width), float(height)
    if w / h > max_ratio:
        w = h * max_ratio
    elif h / w > max_ratio:
        h = w * max_ratio
    scale = min(1.0, max_long / max(w, h))
    w, h = w * scale, h * scale
    short = min(w, h)
    if short < min_short:
        grow = min_short / short
        w, h = w * grow, h * grow
    return max(1, round(w)), max(1, round(h))


def load_image(root: Path, rel: str, mode: ImageMode, side: int) -> Image.Image:
    """Decode to RGB as a person sees it, then resize: `fixed` = side x side (training, 448 in
    the paper), `eval` = the evaluation rule above, `native` = untouched.

    Decoding (`embedder.image_files.read_image`) is the one the ingest check ran: the path is
    matched under Unicode normalization, EXIF orientation applied, 16-bit samples scaled and
    transparency put on white. Raises `embedder.image_files.ImagePathError` (a
    `FileNotFoundError`) and Pillow's errors for a bad file.

    `side`: pixels, used by `fixed` only. Resizing is bicubic, and skipped when the size is
    already right; a `mode` other than fixed or eval is taken as native. Returns a mode "RGB"
    image."""
    img = read_image(root, rel)
    if mode == "fixed":
        if img.size != (side, side):
            img = img.resize((side, side), Image.Resampling.BICUBIC)
    elif mode == "eval":
        size = eval_size(*img.size)
        if size != img.size:
            img = img.resize(size, Image.Resampling.BICUBIC)
    return img
