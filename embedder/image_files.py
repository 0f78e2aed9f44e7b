"""Image files as a person sees them: found under Unicode-insensitive names, decoded to RGB.

Every stage that touches an image file goes through here: the ingest check
(`embedder.datasets.images.check_image`), `embedder.model.images.load_image` (embedding,
training, evaluation) and the length estimate that sorts batches
(`embedder.model.encode._estimate_lengths`). So an image ingest accepts is one the embed stage
can open, and the model sees the pixels a person sees in an image viewer.

Two faults this fixes: `Image.open(p).convert("RGB")` clips 16-bit samples to 255 and drops
transparency onto black; and file names that macOS zips store decomposed (NFD) do not match
tables that spell them composed (NFC), although both print the same.
"""

from __future__ import annotations

import io
import os
import unicodedata
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import ExifTags, Image, ImageOps

from embedder.errors import UserError

# Single-band modes with more than 8 bits a sample; Pillow's own convert() clips them at 255.
_DEEP_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
# EXIF orientations that swap width and height (transpose, rotations by 90 degrees).
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_WHITE = (255, 255, 255, 255)
_TIFF_WIDTH, _TIFF_LENGTH = 256, 257  # TIFF tags ImageWidth and ImageLength


class ImagePathError(UserError, FileNotFoundError):
    """An image path from a table names no single file under the images root."""


class AmbiguousImagePathError(ImagePathError):
    """Two files on disk differ only in Unicode normalization; both match the table's path."""


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def _show(name: str) -> str:
    # The printed form alone cannot tell NFC from NFD; the escaped code points can.
    return f"{name!r} ({name!a})" if not name.isascii() else repr(name)


def _distinct(paths: list[Path]) -> list[Path]:
    # A normalization-insensitive file system (macOS APFS/HFS+) answers every spelling with the
    # same file: one entry, not an ambiguity.
    seen: set[tuple[int, int]] = set()
    out = []
    for p in paths:
        st = p.lstat()
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            out.append(p)
    return out


def resolve_image_path(root: Path, rel: str) -> Path:
    """The file under `root` that the table's relative path `rel` ('/'-separated) names.

    Each path component is matched under Unicode normalization: the name as given, then its NFC
    and NFD spellings (one `lstat` each, and none for ASCII names), and only when none exists a
    listing of the folder comparing NFC forms (so mixed forms are found too, e.g. a name written
    by a tool that composes some characters only). Symlinks are returned unresolved, so the
    caller can still check that they stay inside `root`. `rel` is not checked for absolute
    paths or '..' here: `embedder.datasets.images.path_problem` does that first.

    Raises `ImagePathError` (a `FileNotFoundError`) naming the missing component, and its
    subclass `AmbiguousImagePathError` when two entries in one folder differ only in
    normalization: they print the same, so which one the table means cannot be told.
    """
    current = root
    matched: list[str] = []
    for part in PurePosixPath(rel).parts:
        if part in ("/", ".."):  # not names: nothing to normalize
            current = current / part
            matched.append(part)
            continue
        # As given, then composed, then decomposed; an ASCII name has the one spelling.
        target = _nfc(part)
        spellings = dict.fromkeys([part, target, unicodedata.normalize("NFD", part)])
        found = _distinct([current / s for s in spellings if os.path.lexists(current / s)])
        if not found:
            # Listing a folder of 100k images is slow: only on a miss, never on the common hit.
            try:
                entries = os.listdir(current)
            except (FileNotFoundError, NotADirectoryError):
                entries = []
            found = [current / e for e in sorted(entries) if _nfc(e) == target]
        if len(found) > 1:
            names = " and ".join(_show(p.name) for p in found)
            raise AmbiguousImagePathError(
                f"image {rel!r} is ambiguous under {root}: {names} differ only in Unicode "
                "normalization (e.g. composed NFC vs decomposed NFD); rename or remove one"
            )
        if not found:
            place = f"in folder {'/'.join(matched)!r}" if matched else "in the images root"
            raise ImagePathError(f"image {rel!r} not found under {root} (no {_show(part)} {place})")
        current = found[0]
        matched.append(current.name)
    return current


def _deep_to_8bit(im: Image.Image) -> Image.Image:
    """Modes I;16*, I and F as L (or LA when a transparency key is set), by the conventions
    in `decode_image`."""
    raw = np.asarray(im)
    if im.mode == "F":
        values = raw.astype(np.float64)
        finite = values[np.isfinite(values)]
        if finite.size and finite.max() <= 1.0:
            values = values * 255.0
        values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
        gray = np.floor(np.clip(values, 0.0, 255.0) + 0.5).astype(np.uint8)
    else:
        # 65535 = 255 * 257: v / 257 maps the 16-bit range onto 0..255; adding 128 before the
        # integer division rounds to nearest (257 is odd, so there are no ties).
        deep = np.clip(raw.astype(np.int64), 0, 65535)
        gray = ((deep + 128) // 257).astype(np.uint8)
    out = Image.fromarray(gray)
    key = im.info.get("transparency")
    if isinstance(key, int | float):
        # A 16-bit PNG's tRNS key is a 16-bit sample value: compare before scaling, which
        # merges 257 neighbouring values into one.
        alpha = Image.fromarray(np.where(raw == key, 0, 255).astype(np.uint8))
        out = Image.merge("LA", [out, alpha])
    return out


def decode_image(im: Image.Image) -> Image.Image:
    """An opened image as a person sees it: an RGB image (8 bits a channel), before any resize.

    Steps: the first frame of a multi-frame file (GIF, APNG, TIFF, MPO); the full decode
    (truncated files raise `OSError` here); the EXIF orientation (1..8, also PNG eXIf and XMP
    `tiff:Orientation`, read by `PIL.ImageOps.exif_transpose`: 5..8 swap width and height);
    then to RGB by mode:

    - 8-bit modes (1, L, P, RGB, RGBX, CMYK, YCbCr, LAB, HSV): `Image.convert("RGB")`.
    - Any transparency (an alpha band in LA, PA, RGBA; a palette with alpha; a tRNS key in
      `info["transparency"]`: P by index or per-index bytes, L by grey value, RGB by colour):
      composited onto opaque white with `Image.alpha_composite`, exactly as transformers'
      `image_transforms.convert_to_rgb` (the Qwen2-VL image processor's `do_convert_rgb`) does.
    - Premultiplied RGBa and La: unpremultiplied to RGBA / LA first, then as above (transformers
      does not see the lowercase 'a' as alpha and would keep them darkened towards black).
    - I;16, I;16B, I;16L, I;16N (16-bit grey, e.g. PNG): round(v / 257), so 0..65535 maps
      onto 0..255 exactly (Pillow's convert clips every value above 255 to white).
    - I (32-bit signed int): the same 16-bit rule after clipping to 0..65535; that is the range
      Pillow gives the 16-bit files that open as I (PGM/PPM with maxval above 255, which Pillow
      scales to 0..65535; 16-bit PNGs in Pillow before 10).
    - F (32-bit float): when the largest finite value is at most 1, the data is taken as
      [0, 1] and scaled by 255; otherwise as 0..255. Then clipped to 0..255 and rounded; NaN is
      0, +inf 255, -inf 0.
    - 16-bit RGB(A) and grey+alpha PNGs: Pillow opens them as RGB / RGBA keeping the high byte
      of each sample (v >> 8, at most one level below round(v / 257)); used as Pillow gives
      them, since Pillow has no 16-bit multi-channel mode to read them from.

    No ICC colour profile is applied (the reference processor applies none either): CMYK uses
    Pillow's plain inversion, and wide-gamut RGB is read as if it were sRGB.

    Raises what Pillow raises on a bad file (`OSError`, `SyntaxError`, `ValueError` for a mode
    it cannot convert, `Image.DecompressionBombError`).
    """
    if im.tell() != 0:
        im.seek(0)
    im.load()
    ImageOps.exif_transpose(im, in_place=True)
    if im.mode in _DEEP_MODES:
        im = _deep_to_8bit(im)
    elif im.mode == "La":
        im = im.convert("LA")
    elif im.mode == "RGBa":
        im = im.convert("RGBA")
    if im.has_transparency_data:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def oriented_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) that `decode_image(im)` returns, without converting the pixels: the
    first frame's size, swapped for EXIF orientations 5..8. Header only for JPEG, TIFF and
    WebP; for a PNG without EXIF before its pixel data Pillow decodes the pixels to look for an
    eXIf chunk after them."""
    if im.tell() != 0:
        im.seek(0)
    # The same lookup as ImageOps.exif_transpose, so size and pixels agree.
    orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
    w, h = im.size
    if im.format == "TIFF":
        # Pillow 13 orients TIFFs itself and already reports the swapped size at open; older
        # versions do not. The stored width and length say which, whatever the version.
        w, h = im.tag_v2.get(_TIFF_WIDTH, w), im.tag_v2.get(_TIFF_LENGTH, h)
    return (h, w) if orientation in _SWAPPING_ORIENTATIONS else (w, h)


def read_image(root: Path, rel: str) -> Image.Image:
    """The RGB image (mode "RGB", uint8, original size after EXIF orientation) at the table path
    `rel` under `root`: `resolve_image_path`, then `decode_image`. Raises `ImagePathError`
    when no single file matches, and Pillow's errors on a bad file."""
    return read_image_file(resolve_image_path(root, rel))


def read_image_file(path: Path) -> Image.Image:
    """`decode_image` of the file at `path`, found already (`resolve_image_path`).

    The file is read whole into memory first (see `_in_memory`). Raises OSError when it
    cannot be read (FileNotFoundError when missing; PIL.UnidentifiedImageError, an OSError,
    when it is no image Pillow knows), and what `decode_image` raises."""
    with Image.open(_in_memory(path)) as im:
        return decode_image(im)


def read_image_size(root: Path, rel: str) -> tuple[int, int]:
    """`read_image(root, rel).size`, mostly from the header (see `oriented_size`): the batch
    planner reads the size of every image before any is embedded, and a full decode and
    conversion there would double the work. Raises as `read_image`."""
    with Image.open(_in_memory(resolve_image_path(root, rel))) as im:
        return oriented_size(im)


def _in_memory(path: Path) -> io.BytesIO:
    """The file's bytes, for Pillow to decode from memory. Opened by file name, Pillow maps
    uncompressed files (TIFF, BMP, PPM) straight from disk, and in Pillow 13 that path gets
    EXIF orientations 5..8 of uncompressed TIFFs wrong (pixels read with the swapped size);
    decoding from memory takes the decoder path, which gets them right. Images are small
    next to the memory a batch of them takes once decoded."""
    return io.BytesIO(path.read_bytes())
