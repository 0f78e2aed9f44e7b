"""Images reach the model as a person sees them, under any Unicode spelling of their names.

A table of files built here with Pillow/numpy, one per mode and EXIF orientation, each against
the RGB pixels expected by the conventions in `embedder.image_files.decode_image`; where that
convention is "as transformers' convert_to_rgb" (the Qwen2-VL processor's), compared pixel for
pixel with it. Then: ingest's check, `load_image` and the batch planner's size read all go
through the one decoder and the one path resolver.
"""

from __future__ import annotations

import struct
import unicodedata
import zlib
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from embedder import image_files
from embedder.config import EmbedConfig
from embedder.datasets.images import ImageChecker, check_image
from embedder.model import encode
from embedder.model.images import load_image

Expected = np.ndarray  # (H, W, 3) uint8
Case = Callable[[Path], tuple[str, Expected]]

# 3 x 2 with six distinct colours: each of the 8 EXIF orientations gives a different picture.
PATTERN = np.array(
    [
        [(255, 0, 0), (0, 255, 0), (0, 0, 255)],
        [(255, 255, 0), (0, 255, 255), (255, 0, 255)],
    ],
    dtype=np.uint8,
)

# What the viewer shows for each EXIF orientation, written independently of Pillow's transpose
# (EXIF 2.32, tag 0x0112: the row/column that the stored 0th row/column is).
ORIENTED: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1, :],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # transposed about the main diagonal
    6: lambda a: np.rot90(a, k=-1),  # stored rotated: shown after 90 degrees clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # transposed about the anti-diagonal
    8: lambda a: np.rot90(a, k=1),  # shown after 90 degrees counter-clockwise
}


def _reference_rgb(path: Path) -> np.ndarray:
    """transformers' own conversion, which the Qwen2-VL image processor applies."""
    from transformers.image_transforms import convert_to_rgb

    with Image.open(path) as im:
        return np.asarray(convert_to_rgb(im, return_numpy=True))


def _gray3(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray.astype(np.uint8)[..., None], 3, axis=-1)


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = struct.pack(">I", zlib.crc32(kind + data))
    return struct.pack(">I", len(data)) + kind + data + crc


def _png_bytes(
    width: int, height: int, colour_type: int, rows: np.ndarray, extra: bytes = b""
) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB, RGBA or grey+alpha)."""
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rows)  # filter 0 per row
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + extra
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )


# ----------------------------------------------------------------------------- the cases


def case_orientation(orientation: int) -> Case:
    def build(tmp: Path) -> tuple[str, Expected]:
        Image.fromarray(PATTERN).save(tmp / "o.png", exif=_exif(orientation))
        return "o.png", ORIENTED[orientation](PATTERN)

    return build


def case_orientation_jpeg(orientation: int) -> Case:
    """What a camera writes: a JPEG with the orientation tag (pixels compared at the centre of
    16 x 16 blocks, JPEG being lossy)."""

    def build(tmp: Path) -> tuple[str, Expected]:
        big = PATTERN.repeat(16, axis=0).repeat(16, axis=1)
        Image.fromarray(big).save(tmp / "o.jpg", quality=95, exif=_exif(orientation))
        return "o.jpg", ORIENTED[orientation](PATTERN)

    return build


def case_gray16_ramp(tmp: Path) -> tuple[str, Expected]:
    """Fault (a): 64 x 8, left to right 0..65535."""
    ramp = np.round(np.arange(64) * 65535 / 63).astype(np.uint16)
    Image.fromarray(np.tile(ramp, (8, 1))).save(tmp / "ramp.png")
    with Image.open(tmp / "ramp.png") as im:
        assert im.mode == "I;16"  # what Pillow opens 16-bit grey PNGs as
    columns = np.array([round(v / 257) for v in ramp.tolist()], dtype=np.uint8)
    assert columns[8] == 32 and columns[0] == 0 and columns[63] == 255
    return "ramp.png", _gray3(np.tile(columns, (8, 1)))


def case_gray16_tiff(mode: str) -> Case:
    def build(tmp: Path) -> tuple[str, Expected]:
        values = np.array([[0, 128, 129, 385, 32896], [40000, 65279, 65280, 65407, 65535]])
        dtype = ">u2" if mode == "I;16B" else "<u2"
        data = values.astype(dtype).tobytes()
        Image.frombytes(mode, (5, 2), data).save(tmp / "g.tiff")
        with Image.open(tmp / "g.tiff") as im:
            assert im.mode == ("I;16B" if mode == "I;16B" else "I;16")
        # round(v / 257) by hand: 128 -> 0.498 -> 0, 129 -> 1, 385 -> 1.498 -> 1, ...
        return "g.tiff", _gray3(np.array([[0, 0, 1, 1, 128], [156, 254, 254, 255, 255]]))

    return build


def case_gray16_trns(tmp: Path) -> tuple[str, Expected]:
    """16-bit grey with a tRNS key (1000): keyed pixels are transparent, so white."""
    rows = np.array([[1000, 1001, 30000]])
    (tmp / "k.png").write_bytes(_png_bytes(3, 1, 0, rows, _chunk(b"tRNS", struct.pack(">H", 1000))))
    return "k.png", _gray3(np.array([[255, 4, 117]]))


def case_int32(tmp: Path) -> tuple[str, Expected]:
    """Mode I: the 16-bit rule after clipping to 0..65535."""
    values = np.array([[-5, 0, 1000, 65535, 70000]], dtype=np.int32)
    Image.fromarray(values).save(tmp / "i.tiff")
    return "i.tiff", _gray3(np.array([[0, 0, 4, 255, 255]]))


def case_pgm16(tmp: Path) -> tuple[str, Expected]:
    """A 16-bit PGM: Pillow opens it as I, values 0..65535."""
    data = np.array([[0, 1000, 30000, 65535]], dtype=">u2").tobytes()
    (tmp / "g.pgm").write_bytes(b"P5\n4 1\n65535\n" + data)
    with Image.open(tmp / "g.pgm") as im:
        assert im.mode == "I"
    return "g.pgm", _gray3(np.array([[0, 4, 117, 255]]))


def case_float_unit(tmp: Path) -> tuple[str, Expected]:
    """Mode F with every value in [0, 1]: scaled by 255."""
    values = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    Image.fromarray(values).save(tmp / "f.tiff")
    return "f.tiff", _gray3(np.array([[0, 64, 128, 255]]))


def case_float_wide(tmp: Path) -> tuple[str, Expected]:
    """Mode F beyond [0, 1]: taken as 0..255, clipped, rounded; NaN is black."""
    values = np.array([[-3.0, 0.4, 100.6, 254.5, 300.0, np.nan]], dtype=np.float32)
    Image.fromarray(values).save(tmp / "f.tiff")
    return "f.tiff", _gray3(np.array([[0, 0, 101, 255, 255, 0]]))


def case_rgb16(tmp: Path) -> tuple[str, Expected]:
    """16-bit RGB PNG: Pillow keeps the high byte, at most one level from round(v / 257)."""
    rows = np.array([[0, 383, 65535, 65280, 32896, 385]])
    (tmp / "c.png").write_bytes(_png_bytes(2, 1, 2, rows))
    expected = (rows >> 8).reshape(1, 2, 3).astype(np.uint8)
    assert np.abs(expected - np.round(rows / 257).reshape(1, 2, 3)).max() <= 1
    return "c.png", expected


def case_rgba16(tmp: Path) -> tuple[str, Expected]:
    """16-bit RGBA PNG, half-transparent and transparent pixels: onto white, as transformers."""
    rows = np.array([[65535, 0, 0, 65535, 0, 65535, 0, 32896, 0, 0, 65535, 0]])
    (tmp / "c.png").write_bytes(_png_bytes(3, 1, 6, rows))
    expected = _reference_rgb(tmp / "c.png")
    assert expected.tolist() == [[[255, 0, 0], [127, 255, 127], [255, 255, 255]]]
    return "c.png", expected


def case_gray_alpha16(tmp: Path) -> tuple[str, Expected]:
    """16-bit grey + alpha PNG (Pillow opens it as RGBA)."""
    rows = np.array([[0, 65535, 65535, 0]])
    (tmp / "c.png").write_bytes(_png_bytes(2, 1, 4, rows))
    return "c.png", np.array([[[0, 0, 0], [255, 255, 255]]], dtype=np.uint8)


def case_rgba_disc(tmp: Path) -> tuple[str, Expected]:
    """Fault (b): an opaque red disc, soft rim, on a fully transparent background (whose colour
    channels hold green, which must not show)."""
    yy, xx = np.mgrid[:32, :32]
    dist = np.hypot(xx - 15.5, yy - 15.5)
    alpha = np.clip((12.0 - dist) * 128, 0, 255).astype(np.uint8)
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 1] = 255
    rgba[dist < 13, :3] = (255, 0, 0)
    rgba[..., 3] = alpha
    Image.fromarray(rgba).save(tmp / "disc.png")
    expected = _reference_rgb(tmp / "disc.png")
    assert expected[0, 0].tolist() == [255, 255, 255]
    assert expected[16, 16].tolist() == [255, 0, 0]
    assert ((alpha > 0) & (alpha < 255)).any()  # the rim exercises the blend itself
    return "disc.png", expected


def case_reference(name: str, make: Callable[[Path], None]) -> Case:
    """A file whose expected pixels are transformers' convert_to_rgb of it."""

    def build(tmp: Path) -> tuple[str, Expected]:
        make(tmp / name)
        return name, _reference_rgb(tmp / name)

    return build


def _palette_image() -> Image.Image:
    """3 x 2 over four palette entries; index 3 (a dark blue-grey) is used once."""
    im = Image.frombytes("P", (3, 2), bytes([0, 1, 2, 3, 2, 1]))
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30])
    return im


def _save_la(path: Path) -> None:
    la = np.stack([np.array([[0, 80, 160, 240]] * 2), np.array([[0, 64, 128, 255]] * 2)], -1)
    Image.fromarray(la.astype(np.uint8)).save(path)  # (H, W, 2) uint8 is LA


def _save_pa(path: Path) -> None:
    pa = _palette_image().convert("PA")
    pa.putalpha(Image.fromarray(np.array([[0, 100, 255]] * 2, dtype=np.uint8)))
    pa.save(path)


def _save_gif(path: Path) -> None:
    """Two frames; the first has a transparent index, the second another picture."""
    first = _palette_image()
    second = Image.new("P", (3, 2), 1)
    second.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30])
    first.save(path, save_all=True, append_images=[second], transparency=3, disposal=2)


def _save_multi(path: Path) -> None:
    Image.fromarray(PATTERN).save(path, save_all=True, append_images=[Image.new("RGB", (3, 2))])


def _save_mode(mode: str) -> Callable[[Path], None]:
    def save(path: Path) -> None:
        Image.fromarray(PATTERN).convert(mode).save(path)

    return save


def _save_bits(path: Path) -> None:
    Image.fromarray(np.array([[True, False, True], [False, True, True]])).save(path)


def _save_rgb_key(path: Path) -> None:
    Image.fromarray(PATTERN).save(path, transparency=(0, 255, 0))


def _save_gray_key(path: Path) -> None:
    Image.fromarray(np.array([[5, 7, 5]], dtype=np.uint8)).save(path, transparency=5)


def case_orientation_tiff(orientation: int, mode: str, compression: str | None) -> Case:
    """A TIFF with the orientation tag, uncompressed (which Pillow maps from disk) or LZW."""

    def build(tmp: Path) -> tuple[str, Expected]:
        image = Image.fromarray(PATTERN).convert(mode)
        image.save(tmp / "o.tiff", exif=_exif(orientation), compression=compression)
        shown = np.asarray(image.convert("RGB"))
        return "o.tiff", ORIENTED[orientation](shown)

    return build


CASES: dict[str, Case] = {
    **{f"orientation-{o}-png": case_orientation(o) for o in range(1, 9)},
    **{
        f"orientation-{o}-tiff-{mode}-{compression or 'raw'}": case_orientation_tiff(
            o, mode, compression
        )
        for o in range(1, 9)
        for mode in ("L", "RGB", "RGBA", "CMYK")
        for compression in (None, "tiff_lzw")
    },
    "mode-I;16-png-ramp (a)": case_gray16_ramp,
    "mode-I;16B-tiff": case_gray16_tiff("I;16B"),
    "mode-I;16L-tiff": case_gray16_tiff("I;16L"),
    "mode-I;16-png-tRNS": case_gray16_trns,
    "mode-I-tiff": case_int32,
    "mode-I-pgm16": case_pgm16,
    "mode-F-unit": case_float_unit,
    "mode-F-wide": case_float_wide,
    "png-RGB-16bit": case_rgb16,
    "png-RGBA-16bit": case_rgba16,
    "png-LA-16bit": case_gray_alpha16,
    "mode-RGBA-disc (b)": case_rgba_disc,
    "mode-1": case_reference("b.png", _save_bits),
    "mode-L": case_reference("l.png", _save_mode("L")),
    "mode-LA": case_reference("la.png", _save_la),
    "mode-P": case_reference("p.png", lambda p: _palette_image().save(p)),
    "mode-P-tRNS-index": case_reference(
        "pi.png", lambda p: _palette_image().save(p, transparency=1)
    ),
    "mode-P-tRNS-bytes": case_reference(
        "pb.png", lambda p: _palette_image().save(p, transparency=bytes([255, 0, 128, 30]))
    ),
    "mode-L-tRNS-key": case_reference("lk.png", _save_gray_key),
    "mode-RGB-tRNS-key": case_reference("rk.png", _save_rgb_key),
    "mode-PA-tiff": case_reference("pa.tiff", _save_pa),
    "mode-RGB": case_reference("rgb.png", _save_mode("RGB")),
    "mode-CMYK-tiff": case_reference("c.tiff", _save_mode("CMYK")),
    "mode-YCbCr-tiff": case_reference("y.tiff", _save_mode("YCbCr")),
    "mode-LAB-tiff": case_reference("lab.tiff", _save_mode("LAB")),
    "gif-two-frames-transparent": case_reference("t.gif", _save_gif),
    "apng-two-frames": case_reference("a.png", _save_multi),
    "tiff-two-pages": case_reference("m.tiff", _save_multi),
}


@pytest.mark.parametrize("name", list(CASES))
def test_file_decodes_as_a_person_sees_it(name: str, tmp_path: Path) -> None:
    rel, expected = CASES[name](tmp_path)
    got = load_image(tmp_path, rel, "native", 16)
    assert got.mode == "RGB"
    assert np.asarray(got).tolist() == expected.tolist()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_camera_jpeg_orientation(orientation: int, tmp_path: Path) -> None:
    rel, expected = case_orientation_jpeg(orientation)(tmp_path)
    got = np.asarray(load_image(tmp_path, rel, "native", 16)).astype(int)
    assert got.shape == (expected.shape[0] * 16, expected.shape[1] * 16, 3)
    centres = got[8::16, 8::16]
    assert np.abs(centres - expected.astype(int)).max() <= 12


def test_rgb_colour_key_shows_white(tmp_path: Path) -> None:
    """The tRNS colour key marks (0, 255, 0) transparent: the pixel shows as white."""
    _save_rgb_key(tmp_path / "k.png")
    got = np.asarray(load_image(tmp_path, "k.png", "native", 16))
    assert got[0, 1].tolist() == [255, 255, 255]
    assert got[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        # Premultiplied: (100, 50, 0) at alpha 128 is (199, 100, 0) straight, then onto white.
        ("RGBa", [[[227, 177, 127]]]),
        ("La", [[[227, 227, 227]]]),
        ("RGBX", [[[100, 50, 0]]]),
        ("HSV", [[[255, 0, 0]]]),
        ("I;16N", [[[4, 4, 4]]]),
    ],
)
def test_in_memory_modes(mode: str, expected: list[object]) -> None:
    """Modes that no file opens as directly (Pillow gives them from other sources)."""
    if mode == "RGBa":
        im = Image.merge("RGBa", [Image.new("L", (1, 1), v) for v in (100, 50, 0, 128)])
    elif mode == "La":
        im = Image.merge("La", [Image.new("L", (1, 1), v) for v in (100, 128)])
    elif mode == "RGBX":
        im = Image.merge("RGBX", [Image.new("L", (1, 1), v) for v in (100, 50, 0, 0)])
    elif mode == "HSV":
        im = Image.merge("HSV", [Image.new("L", (1, 1), v) for v in (0, 255, 255)])
    else:
        im = Image.new(mode, (1, 1), 1000)
    got = image_files.decode_image(im)
    assert got.mode == "RGB" and np.asarray(got).tolist() == expected


# ------------------------------------------------------- every stage uses the one decoder


def test_check_and_load_go_through_the_decoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the decoder refuses, ingest refuses: check_image and load_image call it."""
    Image.fromarray(PATTERN).save(tmp_path / "x.png")
    calls: list[str] = []

    def refusing(im: Image.Image) -> Image.Image:
        calls.append(im.format or "")
        raise ValueError("no conversion for this mode")

    monkeypatch.setattr(image_files, "decode_image", refusing)
    reason = check_image(tmp_path, "x.png")
    assert reason is not None and "cannot be decoded" in reason and "no conversion" in reason
    with pytest.raises(ValueError, match="no conversion"):
        load_image(tmp_path, "x.png", "native", 16)
    assert calls == ["PNG", "PNG"]


def _sizes_seen_by_planner(
    root: Path, rels: list[str], monkeypatch: pytest.MonkeyPatch
) -> list[tuple[int, int]]:
    """The sizes `_estimate_lengths` passes on to the image-token count."""
    seen: list[tuple[int, int]] = []

    def tokens(backbone: object, settings: object, size: tuple[int, int]) -> int:
        seen.append(size)
        return 5

    monkeypatch.setattr(encode, "image_tokens", tokens)
    backbone = SimpleNamespace(
        processor=SimpleNamespace(
            tokenizer=lambda texts, **kw: {"input_ids": [[1, 2]] * len(texts)}
        )
    )
    items = [encode.EmbedItem("<|image_pad|>", rel) for rel in rels]
    lengths = encode._estimate_lengths(  # type: ignore[arg-type]
        backbone, items, root, EmbedConfig(image_mode="eval")
    )
    assert lengths == [2 + 5 - 1] * len(rels)
    return seen


@pytest.mark.parametrize("compression", [None, "tiff_lzw"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_tiff_size_read_is_the_decoded_size(
    orientation: int, compression: str | None, tmp_path: Path
) -> None:
    """Pillow reports a TIFF's size already oriented at open (13) or not (older): the size
    read must equal the decoded size either way."""
    Image.new("L", (30, 20)).save(
        tmp_path / "o.tiff", exif=_exif(orientation), compression=compression
    )
    decoded = load_image(tmp_path, "o.tiff", "native", 16).size
    assert decoded == ((20, 30) if orientation >= 5 else (30, 20))
    assert image_files.read_image_size(tmp_path, "o.tiff") == decoded


@pytest.mark.parametrize("orientation", range(1, 9))
def test_size_read_is_the_decoded_size(
    orientation: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch planner's size (header only) equals the decoded image's: 5..8 swap."""
    Image.new("RGB", (30, 20)).save(tmp_path / "o.jpg", exif=_exif(orientation))
    decoded = load_image(tmp_path, "o.jpg", "native", 16).size
    assert decoded == ((20, 30) if orientation >= 5 else (30, 20))
    assert _sizes_seen_by_planner(tmp_path, ["o.jpg"], monkeypatch) == [decoded]
    assert check_image(tmp_path, "o.jpg") is None


# ------------------------------------------------------------ names under any normalization

NFC_DIR, NFC_FILE = "Caf\u00e9", "\u00e9t\u00e9.png"  # "Café/été.png", composed


def _nfd(s: str) -> str:
    return unicodedata.normalize("NFD", s)


@pytest.mark.parametrize(
    ("on_disk", "in_table"),
    [(_nfd, lambda s: s), (lambda s: s, _nfd)],
    ids=["disk-NFD-table-NFC", "disk-NFC-table-NFD"],
)
def test_names_match_under_unicode_normalization(
    on_disk: Callable[[str], str],
    in_table: Callable[[str], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fault (c): what a macOS zip writes (NFD) is found from the table's spelling, by the
    ingest check, the embed stage's load_image and the size read alike."""
    folder = tmp_path / on_disk(NFC_DIR)
    folder.mkdir()
    Image.fromarray(PATTERN).save(folder / on_disk(NFC_FILE), exif=_exif(6))
    rel = f"{in_table(NFC_DIR)}/{in_table(NFC_FILE)}"
    assert not (tmp_path / rel).exists()  # the file system does not fold them itself
    assert check_image(tmp_path, rel) is None
    with ImageChecker(tmp_path, workers=1) as checker:
        assert checker.check_many([rel]) == {rel: None}
    got = load_image(tmp_path, rel, "native", 16)
    assert np.asarray(got).tolist() == ORIENTED[6](PATTERN).tolist()
    assert _sizes_seen_by_planner(tmp_path, [rel], monkeypatch) == [(2, 3)]


def test_mixed_spelling_is_found_by_listing(tmp_path: Path) -> None:
    """Neither NFC nor NFD on disk ('ê' + combining dot below for 'ệ'): the folder listing,
    compared in NFC, finds it."""
    mixed = "\u00ea\u0323.png"
    assert mixed not in (unicodedata.normalize("NFC", mixed), _nfd(mixed))
    Image.fromarray(PATTERN).save(tmp_path / mixed)
    table = unicodedata.normalize("NFC", mixed)
    assert check_image(tmp_path, table) is None
    assert load_image(tmp_path, table, "native", 16).size == (3, 2)


@pytest.mark.parametrize("in_table", [lambda s: s, _nfd], ids=["table-NFC", "table-NFD"])
def test_names_differing_only_in_normalization_are_ambiguous(
    in_table: Callable[[str], str], tmp_path: Path
) -> None:
    Image.fromarray(PATTERN).save(tmp_path / NFC_FILE)
    Image.new("RGB", (3, 2)).save(tmp_path / _nfd(NFC_FILE))
    rel = in_table(NFC_FILE)
    reason = check_image(tmp_path, rel)
    assert reason is not None and "ambiguous" in reason
    assert ascii(NFC_FILE) in reason and ascii(_nfd(NFC_FILE)) in reason  # both named
    with pytest.raises(image_files.AmbiguousImagePathError):
        load_image(tmp_path, rel, "native", 16)
    with pytest.raises(image_files.AmbiguousImagePathError):
        image_files.read_image_size(tmp_path, rel)


def test_missing_image_names_the_missing_part(tmp_path: Path) -> None:
    (tmp_path / "Odd").mkdir()
    reason = check_image(tmp_path, "Odd/missing.png")
    assert reason is not None and "not found" in reason and "'missing.png'" in reason
    reason = check_image(tmp_path, "Gone/x.png")
    assert reason is not None and "not found" in reason and "'Gone'" in reason
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image(tmp_path, "Odd/missing.png", "native", 16)


def test_symlink_escape_is_checked_on_the_resolved_name(tmp_path: Path) -> None:
    """An NFD-named symlink pointing outside the root is still refused when found by NFC."""
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(PATTERN).save(tmp_path / "outside.png")
    (root / _nfd(NFC_FILE)).symlink_to(tmp_path / "outside.png")
    reason = check_image(root, NFC_FILE)
    assert reason is not None and "resolves outside the images root" in reason
