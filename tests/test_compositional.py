"""SugarCrepe and SugarCrepe++: the scores as their papers define them, MMEB's tie convention
with the strict view beside, and the published layouts read through ingest's rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from embedder.compositional import (
    CATEGORIES,
    CHANCE,
    SUGARCREPE,
    SUGARCREPE_PP,
    benchmark_scores,
    group_of,
    metrics,
    row_scores,
)
from embedder.config import IngestConfig
from embedder.datasets.ingest import BadRowsError, ingest
from embedder.datasets.schema import COMPOSITIONAL_SCHEMA
from embedder.datasets.sources import SourceError
from embedder.evaluate import TIE_EPS
from embedder.model.prompts import CAPTION_PROMPT
from embedder.outputs import Tables


def unit(*xs: float) -> np.ndarray:
    v = np.array(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


# Vectors whose cosines with IMG are known: IMG = e0; a vector at angle t from it has cos t.
IMG = unit(1, 0, 0)


def at(cos: float, side: float = 1.0) -> np.ndarray:
    """A unit vector with cosine `cos` to IMG, on the `side` of the second axis."""
    return unit(cos, side * float(np.sqrt(max(0.0, 1 - cos * cos))), 0)


# (caption cos, negative cos) -> (itt by argmax, itt strict)
SUGARCREPE_CASES = [
    ((0.9, 0.5), (True, True)),  # the caption wins
    ((0.5, 0.9), (False, False)),  # the negative wins
    ((0.7, 0.7), (True, False)),  # an exact tie: argmax with the caption first, not strict
    ((0.7 + TIE_EPS / 4, 0.7), (True, False)),  # within the tie margin
    ((0.7 + 20 * TIE_EPS, 0.7), (True, True)),  # beyond it
]


@pytest.mark.parametrize(("cosines", "expected"), SUGARCREPE_CASES)
def test_sugarcrepe_image_to_text(
    cosines: tuple[float, float], expected: tuple[bool, bool]
) -> None:
    got = row_scores(SUGARCREPE, IMG, at(cosines[0]), at(cosines[1], -1), None, TIE_EPS)
    assert (got["itt"], got["itt_strict"]) == expected
    assert set(got) == {"itt", "itt_strict"}


def _pp(c1: np.ndarray, c2: np.ndarray, neg: np.ndarray) -> dict[str, bool]:
    return row_scores(SUGARCREPE_PP, IMG, c1, neg, c2, TIE_EPS)


# Text vectors in 3-d (image e0): (caption, caption2, negative) -> itt, tot (argmax; strict).
PP_CASES = [
    # both captions above the negative for the image, and closer to each other: all correct
    (unit(1, 0.1, 0), unit(1, -0.1, 0), unit(0, 1, 1), (True, True, True, True)),
    # both captions below the negative for the image, yet close to each other: tot holds
    (unit(0.2, 1, 0), unit(0.3, 1, 0.1), unit(0.5, -1, 1), (False, False, True, True)),
    # one caption below the negative for the image: itt fails, whatever the other
    (unit(1, 0, 0.1), unit(0.2, 1, 0), unit(0.5, -1, 1), (False, False, False, False)),
    # the captions far apart, the negative close to the first: tot fails, itt holds
    (unit(1, 1, 0), unit(1, -1, 0), unit(0.2, 1, 0.2), (True, True, False, False)),
    # the negative the second caption's mirror image about the first (and the image): exact
    # ties with it, for the image and for the first caption; argmax counts them, strict not
    (unit(1, 0, 0), unit(0.6, 0.8, 0), unit(0.6, -0.8, 0), (True, False, True, False)),
    # the negative equal to the second caption: tot fails (they are closer than the captions)
    (unit(1, 0.2, 0), unit(1, -0.3, 0.1), unit(1, -0.3, 0.1), (True, False, False, False)),
]


@pytest.mark.parametrize(("c1", "c2", "neg", "expected"), PP_CASES)
def test_sugarcrepe_pp_image_to_text_and_text_only(
    c1: np.ndarray, c2: np.ndarray, neg: np.ndarray, expected: tuple[bool, ...]
) -> None:
    got = _pp(c1, c2, neg)
    assert (got["itt"], got["itt_strict"], got["tot"], got["tot_strict"]) == expected


def test_the_scores_match_the_definitions_on_random_vectors() -> None:
    """The benchmarks' own definitions, written out with strict comparisons, agree with
    ours wherever nothing ties (random vectors never do)."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        img, c1, c2, neg = (unit(*rng.normal(size=8)) for _ in range(4))
        got = row_scores(SUGARCREPE_PP, img, c1, neg, c2, TIE_EPS)
        assert got["itt"] == got["itt_strict"] == (img @ c1 > img @ neg and img @ c2 > img @ neg)
        tot = c1 @ c2 > c1 @ neg and c1 @ c2 > c2 @ neg
        assert got["tot"] == got["tot_strict"] == tot
        one = row_scores(SUGARCREPE, img, c1, neg, None, TIE_EPS)
        assert one["itt"] == one["itt_strict"] == (img @ c1 > img @ neg)


def test_random_vectors_score_near_chance() -> None:
    rng = np.random.default_rng(1)
    rows, keys, vectors = [], [], {}
    for i in range(3000):
        for name in ("i", "c", "c2", "n"):
            vectors[f"{name}{i}"] = unit(*rng.normal(size=64))
        rows.append({"benchmark": SUGARCREPE_PP, "category": "swap_att"})
        keys.append(
            {"image": f"i{i}", "caption": f"c{i}", "caption2": f"c2{i}", "negative": f"n{i}"}
        )
        rows.append({"benchmark": SUGARCREPE, "category": "add_obj"})
        keys.append({"image": f"i{i}", "caption": f"c{i}", "caption2": None, "negative": f"n{i}"})
    got = benchmark_scores(rows, keys, vectors, TIE_EPS)
    for bench in (SUGARCREPE, SUGARCREPE_PP):
        for score, chance in CHANCE[bench].items():
            assert abs(got[bench]["mean"][score] - chance) < 0.035, (bench, score)


def test_means_per_category_group_and_benchmark_count_each_category_once() -> None:
    good = {"image": "img", "caption": "pos", "caption2": None, "negative": "neg"}
    bad = {"image": "img", "caption": "neg", "caption2": None, "negative": "pos"}
    vectors = {"img": IMG, "pos": at(0.9), "neg": at(0.1, -1)}
    # swap_att: 3 rows, all right; swap_obj: 1 row, wrong; add_obj: 2 rows, one right.
    layout = [("swap_att", good)] * 3 + [("swap_obj", bad), ("add_obj", good), ("add_obj", bad)]
    rows = [{"benchmark": SUGARCREPE, "category": c} for c, _ in layout]
    got = benchmark_scores(rows, [k for _, k in layout], vectors, TIE_EPS)[SUGARCREPE]
    assert got["categories"]["swap_att"] == {"itt": 1.0, "itt_strict": 1.0, "rows": 3}
    assert got["categories"]["swap_obj"]["itt"] == 0.0
    assert got["groups"] == {
        "swap": {"itt": 0.5, "itt_strict": 0.5},  # (1 + 0) / 2, not 3 of 4 rows
        "add": {"itt": 0.5, "itt_strict": 0.5},
    }
    assert got["mean"]["itt"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert got["chance"] == {"itt": 0.5}
    flat = metrics({SUGARCREPE: got})
    assert flat["sugarcrepe.itt.swap_att"] == 1.0
    assert flat["sugarcrepe.itt_strict.swap"] == 0.5
    assert flat["sugarcrepe.itt.mean"] == pytest.approx(0.5)
    assert not any(k.endswith(".rows") or "+" in k for k in flat)


@pytest.mark.parametrize(
    ("category", "group"),
    [(c, c.split("_")[0]) for b in CATEGORIES.values() for c in b],
)
def test_every_published_category_has_its_group(category: str, group: str) -> None:
    assert group_of(category) == group


def test_an_unknown_category_or_benchmark_is_refused() -> None:
    with pytest.raises(ValueError, match="not in a group"):
        group_of("negate_obj")
    with pytest.raises(ValueError, match="unknown compositional benchmark"):
        row_scores("winoground", IMG, IMG, IMG, None, TIE_EPS)
    with pytest.raises(ValueError, match="second caption"):
        row_scores(SUGARCREPE_PP, IMG, IMG, IMG, None, TIE_EPS)


def test_the_caption_prompt_is_the_authors_string() -> None:
    assert CAPTION_PROMPT == "Find me an image that matches the given caption: "


# ------------------------------------------------------------------ the published layouts


def _png(path: Path, colour: str = "red") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def write_fixture(root: Path, images: int = 4) -> tuple[Path, Path, Path]:
    """A SugarCrepe folder (one object per category file, keyed "0", "1", ...), a
    SugarCrepe++ folder (a list per file) and a COCO-like images root, in the published
    layouts. Returns (sugarcrepe folder, sugarcrepe++ folder, images root)."""
    coco, sc, pp = root / "val2017", root / "sugar-crepe" / "data", root / "scpp" / "data"
    for i in range(images):
        _png(coco / f"{i:012d}.jpg", ("red", "blue", "green", "white")[i % 4])
    sc.mkdir(parents=True)
    pp.mkdir(parents=True)
    for cat in CATEGORIES[SUGARCREPE]:
        entries = {
            str(i): {
                "filename": f"{i:012d}.jpg",
                "caption": f"A photo number {i} for {cat}.",
                "negative_caption": f"A photo not number {i} for {cat}.",
            }
            for i in range(images)
        }
        (sc / f"{cat}.json").write_text(json.dumps(entries))
    for cat in CATEGORIES[SUGARCREPE_PP]:
        items = [
            {
                "id": i,
                "filename": f"{i:012d}.jpg",
                "caption": f"A photo number {i} for {cat}.",  # shared with SugarCrepe
                "caption2": f"Number {i}, photographed, for {cat}.",
                "negative_caption": f"A photo not number {i} for {cat}.",
            }
            for i in range(images)
        ]
        (pp / f"{cat}.json").write_text(json.dumps(items))
    return sc, pp, coco


def _config(world: Path, sc: Path | None, pp: Path | None, coco: Path, **kw: Any) -> IngestConfig:
    return IngestConfig(
        source="mmeb",
        train_dir=world / "train",
        train_images=world / "train_images",
        train_subsets=["ShapeClass"],
        eval_dir=world / "eval",
        eval_images=world / "eval_images",
        eval_subsets=["ShapeClass"],
        sugarcrepe_dir=sc,
        sugarcrepe_pp_dir=pp,
        compositional_images=coco,
        **kw,
    )


def _run(config: IngestConfig, out: Path) -> Tables:
    out.mkdir(parents=True)
    return ingest(config, None, out)


def test_both_layouts_ingest_into_one_table(world_dir: Path, tmp_path: Path) -> None:
    sc, pp, coco = write_fixture(tmp_path / "data")
    out = _run(_config(world_dir, sc, pp, coco), tmp_path / "out")
    table = pq.read_table(out.compositional)
    assert table.schema.equals(COMPOSITIONAL_SCHEMA, check_metadata=False)
    rows = table.to_pylist()
    assert len(rows) == 4 * (7 + 5) == out.rows["compositional"]
    assert out.compositional_images == coco.resolve()
    by = {(r["benchmark"], r["category"], r["row"]): r for r in rows}
    first = by[(SUGARCREPE, "swap_att", 0)]
    assert (first["image"], first["group"], first["caption2"]) == (
        "000000000000.jpg",
        "swap",
        None,
    )
    assert first["caption"] == "A photo number 0 for swap_att."
    assert first["negative"] == "A photo not number 0 for swap_att."
    assert first["subset"] == "SugarCrepe/swap_att"
    second = by[(SUGARCREPE_PP, "replace_rel", 3)]
    assert second["caption2"] == "Number 3, photographed, for replace_rel."
    assert second["subset"] == "SugarCrepe++/replace_rel"
    assert {r["group"] for r in rows if r["benchmark"] == SUGARCREPE_PP} == {"replace", "swap"}
    # File order within a category; ids are content hashes, stable across ingests.
    again = _run(_config(world_dir, sc, pp, coco), tmp_path / "again")
    assert pq.read_table(again.compositional)["id"].to_pylist() == table["id"].to_pylist()


def test_one_benchmark_alone_and_missing_categories_are_reported(
    world_dir: Path, tmp_path: Path
) -> None:
    sc, _, coco = write_fixture(tmp_path / "data")
    (sc / "add_att.json").unlink()
    out = _run(_config(world_dir, sc, None, coco), tmp_path / "out")
    rows = pq.read_table(out.compositional).to_pylist()
    assert {r["benchmark"] for r in rows} == {SUGARCREPE}
    assert out.info["compositional_missing"] == {SUGARCREPE: ["add_att"]}


# Bad entries of every kind: (benchmark, category, entry index, replacement) -> the reason.
BAD_ENTRIES = [
    (SUGARCREPE, "swap_obj", 1, {"filename": "nope.jpg"}, "not found"),
    (SUGARCREPE, "add_att", 2, {"filename": "../val2017/000000000001.jpg"}, "'..'"),
    (SUGARCREPE, "add_att", 0, {"filename": "/etc/passwd"}, "absolute path"),
    (SUGARCREPE, "add_obj", 1, {"filename": "._000000000001.jpg"}, "macOS '._' metadata file"),
    (SUGARCREPE_PP, "swap_obj", 3, {"filename": "escape.jpg"}, "resolves outside the images root"),
    (SUGARCREPE, "replace_rel", 3, {"caption": ""}, "caption is empty"),
    (SUGARCREPE, "replace_rel", 0, {"negative_caption": None}, "negative_caption is missing"),
    (SUGARCREPE, "swap_att", 0, {"caption": 7}, "caption is int"),
    (SUGARCREPE_PP, "replace_obj", 2, {"caption2": None}, "caption2 is missing"),
    (SUGARCREPE_PP, "swap_att", 1, {"caption2": "   "}, "caption2 is empty"),
    (SUGARCREPE_PP, "replace_att", 0, {"filename": ""}, "filename is empty"),
    # One text, one vector: an exact tie MMEB's convention would count as correct.
    (
        SUGARCREPE,
        "swap_att",
        2,
        {"negative_caption": "A photo number 2 for swap_att."},
        "equals caption",
    ),
    (
        SUGARCREPE_PP,
        "swap_obj",
        0,
        {"negative_caption": "Number 0, photographed, for swap_obj."},
        "equals caption2",
    ),
]


@pytest.mark.parametrize(("bench", "category", "index", "change", "reason"), BAD_ENTRIES)
def test_a_bad_entry_is_named_by_file_and_entry_and_nothing_is_published(
    world_dir: Path,
    tmp_path: Path,
    bench: str,
    category: str,
    index: int,
    change: dict[str, Any],
    reason: str,
) -> None:
    sc, pp, coco = write_fixture(tmp_path / "data")
    _png(tmp_path / "outside.jpg")
    (coco / "escape.jpg").symlink_to(tmp_path / "outside.jpg")  # a link out of the root
    path = (sc if bench == SUGARCREPE else pp) / f"{category}.json"
    data = json.loads(path.read_text())
    entry = data[str(index)] if bench == SUGARCREPE else data[index]
    for key, value in change.items():
        if value is None:
            entry.pop(key)
        else:
            entry[key] = value
    path.write_text(json.dumps(data))
    with pytest.raises(BadRowsError) as err:
        _run(_config(world_dir, sc, pp, coco), tmp_path / "out")
    message = str(err.value)
    assert f"{category}.json" in message and f"entry '{index}'" in message
    assert reason in message and "1 bad row" in message
    skipped = _run(_config(world_dir, sc, pp, coco, on_bad_rows="skip"), tmp_path / "skip")
    assert skipped.rows["compositional"] == 4 * 12 - 1
    rejects = pq.read_table(skipped.rejects).to_pylist()
    assert [r["table"] for r in rejects] == ["compositional"]


@pytest.mark.parametrize(
    ("bench", "content", "error"),
    [
        (SUGARCREPE, b"{not json", "is not a JSON file"),
        (SUGARCREPE, b'"a string"', "holds a str"),
        (SUGARCREPE, b'[{"filename": "000000000000.jpg"}]', "is it the other benchmark's file"),
        (SUGARCREPE_PP, b'{"0": {"filename": "x.jpg"}}', "is it the other benchmark's file"),
        (SUGARCREPE, b'{"0": {"caption": "a"}, "0": {"caption": "b"}}', "'0' appears twice"),
        (SUGARCREPE_PP, b'[{"caption": "a", "caption": "b"}]', "'caption' appears twice"),
        (SUGARCREPE_PP, b"[1, 2]", "not a JSON object"),
    ],
)
def test_a_file_that_is_not_the_layout_is_one_clear_error(
    world_dir: Path, tmp_path: Path, bench: str, content: bytes, error: str
) -> None:
    sc, pp, coco = write_fixture(tmp_path / "data")
    ((sc if bench == SUGARCREPE else pp) / "swap_obj.json").write_bytes(content)
    with pytest.raises((SourceError, BadRowsError), match=error):
        _run(_config(world_dir, sc, pp, coco), tmp_path / "out")


def test_a_byte_order_mark_is_read(world_dir: Path, tmp_path: Path) -> None:
    sc, pp, coco = write_fixture(tmp_path / "data")
    path = sc / "swap_obj.json"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    out = _run(_config(world_dir, sc, pp, coco), tmp_path / "out")
    assert out.rows["compositional"] == 4 * 12


def test_a_folder_without_the_benchmark_files_is_refused(world_dir: Path, tmp_path: Path) -> None:
    _, pp, coco = write_fixture(tmp_path / "data")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match=r"expected one or more of add_att\.json"):
        _run(_config(world_dir, empty, pp, coco), tmp_path / "out")
    with pytest.raises(SourceError, match="does not exist"):
        _run(_config(world_dir, tmp_path / "absent", pp, coco), tmp_path / "out2")


# ------------------------------------------------------------------- prompts and evaluation

SYSTEM = (
    "Given an image, summarize the provided image in one word. "
    "Given only text, describe the text in one word."
)
IMAGE_INPUT = (
    "<|im_start|>system\n" + SYSTEM + "<|im_end|>\n"
    "<|im_start|>user\n<|image_pad|><|im_end|>\n"
    "<|im_start|>assistant\n"
)
CAPTION_INPUT = (
    "<|im_start|>system\n" + SYSTEM + "<|im_end|>\n"
    "<|im_start|>user\nFind me an image that matches the given caption: A dog sits on a bench."
    "\nRepresent the given text in one word.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def test_the_authors_prompts_character_for_character_and_as_documented() -> None:
    from embedder.embed import ItemBuilder
    from embedder.model.prompts import DEFAULT_STRINGS

    build = ItemBuilder("hierarchical", "<|image_pad|>", DEFAULT_STRINGS)
    row = {
        "image": "000000000001.jpg",
        "caption": "A dog sits on a bench.",
        "caption2": "A bench with a dog sitting on it.",
        "negative": "A cat sits on a bench.",
    }
    items = build.compositional_row(row)
    assert items["image"] is not None and items["caption"] is not None
    assert (items["image"].text, items["image"].image) == (IMAGE_INPUT, row["image"])
    assert (items["caption"].text, items["caption"].image) == (CAPTION_INPUT, "")
    assert items["negative"].text == CAPTION_INPUT.replace("A dog", "A cat")  # type: ignore[union-attr]
    assert items["caption2"].text.count(CAPTION_PROMPT + row["caption2"] + "\n") == 1  # type: ignore[union-attr]
    assert build.compositional_row({**row, "caption2": None})["caption2"] is None
    # docs/method.md section 8 shows the same two inputs.
    docs = (Path(__file__).parents[1] / "docs" / "method.md").read_text()
    assert IMAGE_INPUT + "```" in docs and CAPTION_INPUT + "```" in docs


def _world_tables(world_dir: Path, out: Path) -> Tables:
    root = world_dir / "compositional"
    return _run(
        _config(world_dir, root / "sugarcrepe", root / "sugarcrepe_pp", root / "images"), out
    )


def test_evaluation_scores_each_row_from_its_own_vectors_embedding_shared_items_once(
    world_dir: Path, generator: Any, tmp_path: Path
) -> None:
    from embedder.config import EmbedConfig, EvaluateConfig, ModelConfig
    from embedder.embed import ItemBuilder
    from embedder.evaluate import compositional_rows, evaluate_model
    from embedder.model.shards import load_embeddings

    tables = _world_tables(world_dir, tmp_path / "ingest")
    embed = EmbedConfig(num_workers=0, image_side=64)
    cfg = EvaluateConfig(max_queries=2, image_mode="fixed", image_side=64)
    stage = tmp_path / "evaluate"
    first = evaluate_model(ModelConfig(), embed, cfg, tables, generator, None, stage / "a")
    report = json.loads(first.report.read_text())["compositional"]
    rows = compositional_rows(tables, cfg.max_queries)
    assert len(rows) == 2 * 12 == first.rows["compositional_rows"]
    # Recompute every row's judgement from the stored vectors, the benchmarks' way (`>`).
    keys, matrix = load_embeddings(first.folder / "compositional")
    vec = dict(zip(keys, matrix, strict=True))
    build = ItemBuilder("hierarchical", "<|image_pad|>", embed)
    expected: dict[tuple[str, str], list[bool]] = {}
    for row in rows:
        items = build.compositional_row(row)
        img, cap, neg = (vec[items[k].key] for k in ("image", "caption", "negative"))  # type: ignore[union-attr]
        ok = bool(img @ cap > img @ neg)
        if row["benchmark"] == SUGARCREPE_PP:
            cap2 = vec[items["caption2"].key]  # type: ignore[union-attr]
            ok = ok and bool(img @ cap2 > img @ neg)
        expected.setdefault((row["benchmark"], row["category"]), []).append(ok)
    for (bench, category), oks in expected.items():
        got = report[bench]["categories"][category]
        assert got["rows"] == len(oks)
        assert got["itt_strict"] == pytest.approx(np.mean(oks), abs=1e-9)
    assert set(report) == {SUGARCREPE, SUGARCREPE_PP}
    assert set(report[SUGARCREPE]["groups"]) == {"add", "replace", "swap"}
    assert first.metrics["sugarcrepe.itt.mean"] == report[SUGARCREPE]["mean"]["itt"]
    assert "sugarcrepe_pp.tot_strict.swap_att" in first.metrics
    # SugarCrepe++ shares its images, captions and negatives with SugarCrepe: embedded once.
    items, _ = build.compositional_table(rows)
    assert len(vec) == len({it.key for it in items}) < len(items)
    # Another evaluation of the same model reuses them all; the scores are the same.
    again = evaluate_model(ModelConfig(), embed, cfg, tables, generator, None, stage / "b")
    assert again.metrics["reused_compositional_items"] == len(vec)
    assert json.loads(again.report.read_text())["compositional"] == report


def test_without_a_compositional_table_the_report_has_none(
    tables: Tables, generator: Any, tmp_path: Path
) -> None:
    from embedder.config import EmbedConfig, EvaluateConfig, ModelConfig
    from embedder.evaluate import evaluate_model

    embed = EmbedConfig(num_workers=0, image_side=64)
    cfg = EvaluateConfig(max_queries=2, image_mode="fixed", image_side=64)
    out = evaluate_model(ModelConfig(), embed, cfg, tables, generator, None, tmp_path / "a")
    assert json.loads(out.report.read_text())["compositional"] == {}
    assert not any(k.startswith("sugarcrepe") for k in out.metrics)
    assert not (out.folder / "compositional").exists()


# ------------------------------------------------------------------ settings and fingerprint

PAPER = [
    "ingest.train_dir=/d/train",
    "ingest.train_images=/d/img",
    "ingest.eval_dir=/d/eval",
    "ingest.eval_images=/d/eval_img",
]


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        (["ingest.sugarcrepe_dir=/d/sc"], "ingest.compositional_images is not"),
        (["ingest.sugarcrepe_pp_dir=/d/pp"], "ingest.compositional_images is not"),
        (["ingest.compositional_images=/d/coco"], "neither ingest.sugarcrepe_dir"),
        (
            [
                "ingest.sugarcrepe_dir=/d/x",
                "ingest.sugarcrepe_pp_dir=/d/x/",
                "ingest.compositional_images=/c",
            ],
            "name one folder",
        ),
    ],
)
def test_settings_that_cannot_apply_are_errors_naming_both_keys(
    overrides: list[str], error: str
) -> None:
    from embedder.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=error):
        load_config("qwen2vl-2b", overrides=PAPER + overrides)
    # The world has its own set: pointing it at SugarCrepe's files does nothing, so it is refused.
    with pytest.raises(ConfigError, match=r"sugarcrepe_dir does nothing with ingest.source=world"):
        load_config("tiny", overrides=["ingest.sugarcrepe_dir=/d/sc"])
    # Scored by evaluate, beside an eval table: without one, nothing would score them.
    no_eval = [*PAPER[:2], "ingest.sugarcrepe_dir=/d/sc", "ingest.compositional_images=/c"]
    with pytest.raises(ConfigError, match=r"sugarcrepe_dir is set but ingest.eval_dir is not"):
        load_config("qwen2vl-2b", overrides=no_eval)


def test_off_by_default_in_the_paper_presets_on_in_the_world() -> None:
    from embedder.config import load_config

    paper = load_config("qwen2vl-2b", overrides=PAPER)
    assert paper.ingest.sugarcrepe_dir is None and paper.ingest.compositional_images is None
    both = load_config(
        "qwen2vl-2b",
        overrides=[
            *PAPER,
            "ingest.sugarcrepe_dir=/d/sc",
            "ingest.sugarcrepe_pp_dir=/d/pp",
            "ingest.compositional_images=/d/coco",
        ],
    )
    assert both.ingest.sugarcrepe_pp_dir == Path("/d/pp")
    assert load_config("tiny").world.compositional_rows > 0
    assert (
        load_config("tiny", overrides=["world.compositional_rows=0"]).world.compositional_rows == 0
    )


def test_new_or_changed_benchmark_files_change_ingest_s_inputs(
    world_dir: Path, tmp_path: Path
) -> None:
    import os

    from embedder.datasets.ingest import check_sources, source_inputs

    sc, pp, coco = write_fixture(tmp_path / "data")
    cfg = _config(world_dir, sc, pp, coco)
    check_sources(cfg)
    before = source_inputs(cfg)
    assert str((sc / "swap_att.json").resolve()) in before
    assert f"images:{coco.resolve()}" in before
    path = pp / "replace_rel.json"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    changed = source_inputs(cfg)
    assert changed != before and changed[str(path.resolve())] != before[str(path.resolve())]
    _png(coco / "000000000099.jpg")
    assert source_inputs(cfg)[f"images:{coco.resolve()}"] != changed[f"images:{coco.resolve()}"]
    with pytest.raises(SourceError, match="does not exist"):
        check_sources(_config(world_dir, sc, pp, tmp_path / "no-coco"))
    with pytest.raises(SourceError, match="SugarCrepe\\+\\+ folder"):
        check_sources(_config(world_dir, sc, tmp_path / "no-pp", coco))


# ----------------------------------------------------------------------------- the table


def _report(comp: dict[str, Any]) -> dict[str, Any]:
    agg = {"classification": 0.5, "ind": 0.5, "overall": 0.5, "outside_mmeb": []}
    return {
        "aggregate": agg,
        "aggregate_strict": {"overall": 0.5},
        "aggregate_tie_rate": {"overall": 0.0},
        "chance": {"A": 0.25},
        "meta": {"A": ["classification", "ind"]},
        "tie_warning": {"threshold": 0.5, "subsets": []},
        "compositional": comp,
    }


def _found(bench: str, **means: float) -> dict[str, Any]:
    mean = {k: v for s, v in means.items() for k in (s, f"{s}_strict")}
    return {"categories": {}, "groups": {}, "mean": mean, "chance": CHANCE[bench]}


def test_the_table_shows_the_compositional_columns_only_with_a_compositional_table() -> None:
    from embedder.config import TableRow
    from embedder.outputs import EvalReport
    from embedder.report import RowResult, table_lines

    rows = [
        RowResult(
            TableRow(name=n, template="hierarchical", negatives="none"),
            EvalReport(folder=Path(n)),
            None,
        )
        for n in ("a", "b")
    ]
    both = {
        SUGARCREPE: _found(SUGARCREPE, itt=0.75),
        SUGARCREPE_PP: _found(SUGARCREPE_PP, itt=0.625, tot=0.875),
    }
    lines = table_lines(rows, [_report(both), _report({SUGARCREPE: _found(SUGARCREPE, itt=0.5)})])
    head = lines[0].split()
    assert head[-4:] == ["SC", "SC++itt", "SC++tot", "pairs"]
    chance = lines[1].split()
    assert chance[-4:] == ["0.500", "0.333", "0.333", "-"]
    assert lines[2].split()[-4:] == ["0.750", "0.625", "0.875", "-"]
    assert lines[3].split()[-4:] == ["0.500", "-", "-", "-"]  # a row without SugarCrepe++
    assert any(line.startswith("SC: SugarCrepe image-to-text") for line in lines)
    plain = table_lines(rows[:1], [_report({})])
    assert "SC" not in plain[0].split() and not any(line.startswith("SC:") for line in plain)


def test_a_world_without_its_compositional_set_gives_no_table(tmp_path: Path) -> None:
    from embedder.config import WorldConfig
    from embedder.datasets.ingest import resolve_sources
    from embedder.outputs import World
    from embedder.world import build_world
    from tests.conftest import SMALL_WORLD

    world = World(folder=tmp_path / "world")
    build_world(WorldConfig(**{**SMALL_WORLD, "compositional_rows": 0}), world.folder)
    assert not (world.folder / "compositional").exists()
    resolved = resolve_sources(IngestConfig(), world)
    assert (resolved.sugarcrepe_dir, resolved.compositional_images) == (None, None)
    out = _run(resolved, tmp_path / "ingest")
    assert out.compositional_images is None and not out.compositional.exists()
    assert "compositional" not in out.rows
