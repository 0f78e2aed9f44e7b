"""Readers and the ingest stage on MMEB-layout folders the tests write themselves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from embedder.config import IngestConfig
from embedder.datasets.ingest import BadRowsError, ingest
from embedder.datasets.schema import EVAL_SCHEMA, PAIRS_SCHEMA, REJECTS_SCHEMA
from embedder.datasets.sources import SourceError
from tests.conftest import SMALL_WORLD


def _world_config(world: Path, **kw: object) -> IngestConfig:
    return IngestConfig(
        source="mmeb",
        train_dir=world / "train",
        train_images=world / "train_images",
        eval_dir=world / "eval",
        eval_images=world / "eval_images",
        **kw,
    )


def test_world_ingest_counts_schema_and_flags(world_dir: Path, tmp_path: Path) -> None:
    out = ingest(_world_config(world_dir), None, tmp_path)
    pairs = pq.read_table(tmp_path / "pairs.parquet")
    evals = pq.read_table(tmp_path / "eval.parquet")
    assert pairs.schema.equals(PAIRS_SCHEMA, check_metadata=False)
    assert evals.schema.equals(EVAL_SCHEMA, check_metadata=False)
    assert pq.read_table(tmp_path / "rejects.parquet").num_rows == 0
    assert pairs.num_rows == 5 * SMALL_WORLD["train_pairs"] == out.rows["pairs"]
    assert evals.num_rows == 10 * SMALL_WORLD["eval_queries"] == out.rows["eval"]
    assert set(pairs["meta_task"].to_pylist()) == {
        "classification",
        "vqa",
        "retrieval",
        "grounding",
    }
    dist = {
        (s, d)
        for s, d in zip(evals["subset"].to_pylist(), evals["distribution"].to_pylist(), strict=True)
    }
    assert ("ShapeClass", "ind") in dist and ("OutlineClass", "ood") in dist
    assert {d for _, d in dist} == {"ind", "ood"}
    groups = [g for g in pairs["fn_group"].to_pylist() if g is not None]
    assert groups, "the world plants false-negative groups"
    assert out.metrics["rows_per_s"] > 0
    assert out.pairs_images == (world_dir / "train_images").resolve()


def test_ids_are_stable_across_ingests_and_batch_sizes(world_dir: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    ingest(_world_config(world_dir), None, a)
    ingest(_world_config(world_dir, batch_rows=7, image_workers=2), None, b)
    for table in ("pairs", "eval"):
        ta, tb = pq.read_table(a / f"{table}.parquet"), pq.read_table(b / f"{table}.parquet")
        assert ta.equals(tb)
    assert len(set(pq.read_table(a / "eval.parquet")["id"].to_pylist())) > 1


# --------------------------------------------------------------- a hand-made, odd dump

GOOD_ROW = {
    "qry": "<|image_1|>\nRepresent the given image for classification",
    "pos_text": "apple",
    "pos_image_path": "",
    "neg_text": "",
    "neg_image_path": "",
}


def _png(path: Path, colour: str = "red") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)


@pytest.fixture
def odd_dump(tmp_path: Path) -> tuple[Path, Path]:
    """An MMEB-train layout with one good subset, one with every kind of bad row, and an
    empty one; plus macOS litter that must be ignored."""
    root, images = tmp_path / "train", tmp_path / "images"
    _png(images / "Odd" / "ok.png")
    _png(images / "Odd" / "ok2.png", "blue")
    (images / "Odd" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    truncated = images / "Odd" / "truncated.png"
    _png(truncated)
    truncated.write_bytes(truncated.read_bytes()[:40])
    _png(images / "Odd" / "._ok.png")
    _png(tmp_path / "outside.png")
    (images / "Odd" / "escape.png").symlink_to(tmp_path / "outside.png")
    rows = [
        {**GOOD_ROW, "qry_image_path": "Odd/ok.png"},
        {**GOOD_ROW, "qry_image_path": "Odd/ok2.png", "pos_text": "pear"},
        {**GOOD_ROW, "qry_image_path": "Odd/missing.png"},
        {**GOOD_ROW, "qry_image_path": "Odd/corrupt.png"},
        {**GOOD_ROW, "qry_image_path": "Odd/truncated.png"},
        {**GOOD_ROW, "qry_image_path": "../outside.png"},
        {**GOOD_ROW, "qry_image_path": str(tmp_path / "outside.png")},
        {**GOOD_ROW, "qry_image_path": "Odd/._ok.png"},
        {**GOOD_ROW, "qry_image_path": "Odd/escape.png"},
        {**GOOD_ROW, "qry_image_path": "Odd/ok.png", "pos_text": None},
        {**GOOD_ROW, "qry": "", "qry_image_path": ""},
    ]
    table = pa.Table.from_pylist(rows)
    (root / "Odd").mkdir(parents=True)
    pq.write_table(table, root / "Odd" / "original-00000-of-00001.parquet")
    (root / "Odd" / "._original-00000-of-00001.parquet").write_bytes(b"\x00\x05\x16\x07junk")
    good = pa.Table.from_pylist([{**GOOD_ROW, "qry_image_path": "Odd/ok.png"}] * 3)
    (root / "Good").mkdir()
    pq.write_table(good, root / "Good" / "original-00000-of-00001.parquet")
    (root / "Empty").mkdir()
    pq.write_table(good.slice(0, 0), root / "Empty" / "original-00000-of-00001.parquet")
    (root / "__MACOSX").mkdir()
    (root / "._Good").write_bytes(b"junk")
    meta = {n: {"meta_task": "classification"} for n in ("Odd", "Good", "Empty")}
    (root / "subsets.json").write_text(json.dumps(meta))
    return root, images


EXPECTED_REASONS = {
    2: "not found",
    3: "cannot be decoded",
    4: "cannot be decoded",
    5: "contains '..'",
    6: "absolute path",
    7: "'._' metadata file",
    8: "resolves outside the images root",
    9: "pos_text is null",
    10: "query has neither text nor image",
}


def test_bad_rows_fail_naming_every_row(odd_dump: tuple[Path, Path], tmp_path: Path) -> None:
    root, images = odd_dump
    out = tmp_path / "out"
    out.mkdir()
    cfg = IngestConfig(source="mmeb", train_dir=root, train_images=images)
    with pytest.raises(BadRowsError) as err:
        ingest(cfg, None, out)
    msg = str(err.value)
    assert f"{len(EXPECTED_REASONS)} bad row(s)" in msg
    for row, reason in EXPECTED_REASONS.items():
        line = next(
            ln for ln in msg.splitlines() if f"original-00000-of-00001.parquet row {row} " in ln
        )
        assert reason in line, (row, line)
    assert "on_bad_rows=skip" in msg


def test_skip_writes_rejects_and_keeps_good_rows(
    odd_dump: tuple[Path, Path], tmp_path: Path
) -> None:
    root, images = odd_dump
    cfg = IngestConfig(source="mmeb", train_dir=root, train_images=images, on_bad_rows="skip")
    result = ingest(cfg, None, tmp_path)
    pairs = pq.read_table(tmp_path / "pairs.parquet").to_pylist()
    assert sorted((p["subset"], p["row"]) for p in pairs) == [
        ("Good", 0),
        ("Good", 1),
        ("Good", 2),
        ("Odd", 0),
        ("Odd", 1),
    ]
    rejects = pq.read_table(tmp_path / "rejects.parquet")
    assert rejects.schema.equals(REJECTS_SCHEMA, check_metadata=False)
    got = {r["row"]: r["reason"] for r in rejects.to_pylist()}
    assert set(got) == set(EXPECTED_REASONS)
    for row, reason in EXPECTED_REASONS.items():
        assert reason in got[row]
    assert result.metrics["rejected_rows"] == len(EXPECTED_REASONS)
    assert result.info["empty_subsets"] == ["pairs:Empty"]


def test_empty_subset_is_an_error(odd_dump: tuple[Path, Path], tmp_path: Path) -> None:
    root, images = odd_dump
    cfg = IngestConfig(
        source="mmeb", train_dir=root, train_images=images, train_subsets=["Good", "Empty"]
    )
    with pytest.raises(BadRowsError, match=r"empty subset.*pairs:Empty"):
        ingest(cfg, None, tmp_path)


def test_wrong_column_name_is_named(tmp_path: Path) -> None:
    root = tmp_path / "train"
    (root / "ImageNet_1K").mkdir(parents=True)
    row = {**GOOD_ROW, "qry_image_path": "", "query": "x"}
    del row["qry"]
    pq.write_table(pa.Table.from_pylist([row]), root / "ImageNet_1K" / "original-0.parquet")
    (tmp_path / "img").mkdir()
    cfg = IngestConfig(source="mmeb", train_dir=root, train_images=tmp_path / "img")
    with pytest.raises(SourceError, match=r"lacks column\(s\) qry .*'query' -> 'qry'"):
        ingest(cfg, None, tmp_path)


def test_unknown_subset_and_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "train"
    (root / "MySet").mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist([{**GOOD_ROW, "qry": "text", "qry_image_path": ""}]),
        root / "MySet" / "original-0.parquet",
    )
    (tmp_path / "img").mkdir()
    cfg = IngestConfig(source="mmeb", train_dir=root, train_images=tmp_path / "img")
    with pytest.raises(ValueError, match=r"describe it in a subsets\.json"):
        ingest(cfg, None, tmp_path)
    cfg = IngestConfig(source="mmeb", train_dir=root, train_images=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="images root"):
        ingest(cfg, None, tmp_path)
    with pytest.raises(SourceError, match=r"subsets \['Other'\] not found"):
        ingest(cfg.model_copy(update={"train_subsets": ["Other"]}), None, tmp_path)


def test_mmeb_names_get_their_meta_task(tmp_path: Path) -> None:
    root = tmp_path / "train"
    for name in ("ImageNet_1K", "MSCOCO_t2i", "OK-VQA", "MSCOCO"):
        (root / name).mkdir(parents=True)
        pq.write_table(
            pa.Table.from_pylist([{**GOOD_ROW, "qry": f"q {name}", "qry_image_path": ""}]),
            root / name / "original-0.parquet",
        )
    (tmp_path / "img").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    ingest(IngestConfig(source="mmeb", train_dir=root, train_images=tmp_path / "img"), None, out)
    got = {r["subset"]: r["meta_task"] for r in pq.read_table(out / "pairs.parquet").to_pylist()}
    assert got == {
        "ImageNet_1K": "classification",
        "MSCOCO_t2i": "retrieval",
        "OK-VQA": "vqa",
        "MSCOCO": "grounding",
    }


def test_jsonl_reader(tmp_path: Path) -> None:
    images = tmp_path / "img"
    _png(images / "a.png")
    f = tmp_path / "mine.jsonl"
    lines = [
        json.dumps({**GOOD_ROW, "qry_image_path": "a.png"}),
        "{not json",
        json.dumps({**GOOD_ROW, "qry_image_path": "a.png", "pos_text": float("nan")}),
        "",
        json.dumps({**GOOD_ROW, "qry_image_path": "a.png", "pos_text": "pear"}),
    ]
    f.write_text("\n".join(lines) + "\n")
    (tmp_path / "subsets.json").write_text(json.dumps({"mine": {"meta_task": "classification"}}))
    cfg = IngestConfig(
        source="jsonl", jsonl_files=[f], jsonl_images=images, on_bad_rows="skip", batch_rows=2
    )
    ingest(cfg, None, tmp_path)
    pairs = pq.read_table(tmp_path / "pairs.parquet").to_pylist()
    assert [(p["subset"], p["pos_text"]) for p in pairs] == [("mine", "apple"), ("mine", "pear")]
    reasons = [r["reason"] for r in pq.read_table(tmp_path / "rejects.parquet").to_pylist()]
    assert any("not a JSON object" in r for r in reasons)
    assert any("pos_text is NaN" in r for r in reasons)


def test_eval_rows_check_every_candidate(world_dir: Path, tmp_path: Path) -> None:
    world = tmp_path / "w"
    shutil.copytree(world_dir, world)
    table = pq.read_table(world / "eval" / "ShapeCaps_t2i" / "test-00000-of-00001.parquet")
    victim = table["tgt_img_path"][1].as_py()[3]
    (world / "eval_images" / victim).unlink()
    users = sum(victim in lst for lst in table["tgt_img_path"].to_pylist())
    out = tmp_path / "out"
    out.mkdir()
    result = ingest(_world_config(world, on_bad_rows="skip"), None, out)
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert len(rejects) == users == result.rows["rejects"]
    assert all(r["table"] == "eval" and victim in r["reason"] for r in rejects)


def test_hub_reader_on_a_local_copy_of_the_repo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, world_dir: Path
) -> None:
    """The `hub` source goes through `datasets` (real code); here on a local folder laid out
    like the hub repository (subset folders + README configs), with the network off."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))

    def as_repo(src: Path, dest: Path, split: str) -> None:
        configs = []
        for sub in sorted(p for p in src.iterdir() if p.is_dir()):
            shutil.copytree(sub, dest / sub.name)
            configs.append(
                f"- config_name: {sub.name}\n  data_files:\n  - split: {split}\n"
                f"    path: {sub.name}/{split}-*.parquet\n"
            )
        (dest / "README.md").write_text("---\nconfigs:\n" + "".join(configs) + "---\n")

    as_repo(world_dir / "train", tmp_path / "train_repo", "original")
    as_repo(world_dir / "eval", tmp_path / "eval_repo", "test")
    cfg = IngestConfig(
        source="hub",
        hub_train=str(tmp_path / "train_repo"),
        hub_eval=str(tmp_path / "eval_repo"),
        train_images=world_dir / "train_images",
        eval_images=world_dir / "eval_images",
        train_subsets=["ShapeCaps_t2i", "ShapeClass"],
        eval_subsets=["ShapeVQA"],
    )
    # Subsets that are not MMEB's need a description, as for a local dump.
    with pytest.raises(ValueError, match="not an MMEB subset"):
        ingest(cfg, None, tmp_path)
    shutil.copy(world_dir / "train" / "subsets.json", tmp_path / "train_repo")
    shutil.copy(world_dir / "eval" / "subsets.json", tmp_path / "eval_repo")
    out = tmp_path / "out"
    out.mkdir()
    result = ingest(cfg, None, out)
    local = tmp_path / "local"
    local.mkdir()
    ingest(
        _world_config(
            world_dir, train_subsets=["ShapeCaps_t2i", "ShapeClass"], eval_subsets=["ShapeVQA"]
        ),
        None,
        local,
    )
    for table in ("pairs", "eval"):
        assert pq.read_table(out / f"{table}.parquet").equals(
            pq.read_table(local / f"{table}.parquet")
        ), "the hub path and the local-folder path give the same table"
    assert result.rows["pairs"] == 2 * SMALL_WORLD["train_pairs"]


def test_no_split_file_is_an_error_naming_the_pattern_even_with_skip(
    world_dir: Path, tmp_path: Path
) -> None:
    """Issue 8.12: train_splits=[train] finds no file; `skip` must not publish 0 pairs."""
    cfg = _world_config(world_dir, train_splits=["train"], on_bad_rows="skip")
    with pytest.raises(SourceError, match=r"looked for <subset>/train-\*\.parquet in its 5"):
        ingest(cfg, None, tmp_path)


def test_every_row_rejected_is_an_error_even_with_skip(tmp_path: Path) -> None:
    root = tmp_path / "train" / "VOC2007"
    root.mkdir(parents=True)
    (tmp_path / "img").mkdir()
    row = {"qry": "<|image_1|>\nx", "qry_image_path": "gone.png", "pos_text": "a",
           "pos_image_path": "", "neg_text": "", "neg_image_path": ""}  # fmt: skip
    pq.write_table(pa.Table.from_pylist([row]), root / "original-0.parquet")
    cfg = IngestConfig(
        source="mmeb", train_dir=tmp_path / "train", train_images=tmp_path / "img",
        on_bad_rows="skip",
    )  # fmt: skip
    with pytest.raises(BadRowsError, match="no usable pairs rows: all 1 row"):
        ingest(cfg, None, tmp_path)


def test_an_unknown_subset_suggests_the_folder_name(world_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"did you mean: Shape-Class -> ShapeClass"):
        ingest(_world_config(world_dir, train_subsets=["Shape-Class"]), None, tmp_path)


# ------------------------------------------------- text that is not text (issue 15, item 2)

# Each line is one JSONL row; the bad ones must be named by file and line, the rest published.
BAD_TEXT_LINES = [
    # (raw line bytes, expected reason fragment)
    (rb'{"qry": "caf\udcb2", "pos_text": "apple"}', "unpaired surrogate '\\udcb2'"),
    (rb'{"qry": "ok", "pos_text": "\ud83d"}', "pos_text holds an unpaired surrogate"),
    (rb'{"qry": "ok", "pos_text": "x\udfff y"}', "unpaired surrogate '\\udfff'"),
    (rb'{"qry": "ok", "pos_text": "apple", "qry_image_path": "a\udc80.png"}', "qry_image_path"),
    (b'{"qry": "caf\xe9", "pos_text": "apple"}', "not UTF-8 text"),
    (b'{"qry": "\xff\xfe", "pos_text": "apple"}', "not UTF-8 text"),
    (b"[1, 2]", "not a JSON object"),
    (rb'{"qry": "ok", "pos_text": "apple", "fn_group": "g\ud800"}', "fn_group holds an unpaired"),
    # transformers' markers for control tokens: as_text would silently drop them.
    ('{"qry": "\U000f0000", "pos_text": "apple"}'.encode(), "reserves to mark control tokens"),
    ('{"qry": "ok", "pos_text": "a\U000f0001b"}'.encode(), "'\\U000f0001'"),
]


@pytest.mark.parametrize("skip", [True, False])
def test_text_a_utf8_file_cannot_hold_is_a_bad_row_named_by_file_and_line(
    tmp_path: Path, skip: bool
) -> None:
    images = tmp_path / "img"
    _png(images / "a.png")
    good = {**GOOD_ROW, "qry_image_path": "a.png"}
    lines = [json.dumps(good).encode()]
    for raw, _ in BAD_TEXT_LINES:
        lines += [raw, b""]  # blank lines between: line numbers are not row numbers
    lines.append(json.dumps({**good, "pos_text": "pear"}, ensure_ascii=False).encode())
    f = tmp_path / "mine.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "subsets.json").write_text(json.dumps({"mine": {"meta_task": "classification"}}))
    cfg = IngestConfig(
        source="jsonl",
        jsonl_files=[f],
        jsonl_images=images,
        on_bad_rows="skip" if skip else "error",
        batch_rows=3,
    )
    out = tmp_path / "out"
    out.mkdir()
    if not skip:
        with pytest.raises(BadRowsError) as err:
            ingest(cfg, None, out)
        for k, (_, reason) in enumerate(BAD_TEXT_LINES):
            assert f"mine/mine.jsonl line {2 + 2 * k} " in str(err.value)
            assert reason in str(err.value)
        return
    ingest(cfg, None, out)
    pairs = pq.read_table(out / "pairs.parquet").to_pylist()
    assert [p["pos_text"] for p in pairs] == ["apple", "pear"]
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert [(r["row"], r["source"]) for r in rejects] == [
        (2 + 2 * k, "mine.jsonl") for k in range(len(BAD_TEXT_LINES))
    ]
    for r, (_, reason) in zip(rejects, BAD_TEXT_LINES, strict=True):
        assert reason in r["reason"], r


def test_jsonl_train_subsets_keep_only_the_named_files(tmp_path: Path) -> None:
    images = tmp_path / "img"
    images.mkdir()
    files = []
    for name in ("A", "B"):
        f = tmp_path / f"{name}.jsonl"
        f.write_text(json.dumps({**GOOD_ROW, "qry": f"from {name}", "qry_image_path": ""}) + "\n")
        files.append(f)
    meta = {n: {"meta_task": "retrieval"} for n in ("A", "B")}
    (tmp_path / "subsets.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    out.mkdir()
    cfg = IngestConfig(source="jsonl", jsonl_files=files, jsonl_images=images, train_subsets=["A"])
    ingest(cfg, None, out)
    assert [p["qry_text"] for p in pq.read_table(out / "pairs.parquet").to_pylist()] == ["from A"]
    wrong = cfg.model_copy(update={"train_subsets": ["A.jsonl"]})
    with pytest.raises(SourceError, match=r"name no JSONL file.*did you mean: A.jsonl -> A"):
        ingest(wrong, None, out)


def test_eval_lists_whose_correct_candidate_is_duplicated_are_counted(tmp_path: Path) -> None:
    root, images = tmp_path / "eval", tmp_path / "img"
    images.mkdir()
    rows = [  # (candidates, duplicated?)
        (["apple", "pear", "apple"], True),
        (["apple", "pear", "plum"], False),
        (["apple", "apple"], True),
        (["apple"], False),
        (["pear", "apple", "apple"], False),  # a duplicated wrong one does not count
    ]
    table = [
        {"qry_text": "q", "qry_img_path": "", "tgt_text": c, "tgt_img_path": [""] * len(c)}
        for c, _ in rows
    ]
    (root / "VOC2007").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(table), root / "VOC2007" / "test-0.parquet")
    train = tmp_path / "train" / "VOC2007"
    train.mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist([{**GOOD_ROW, "qry_image_path": ""}]), train / "original-0.parquet"
    )
    cfg = IngestConfig(
        source="mmeb",
        train_dir=tmp_path / "train",
        train_images=images,
        eval_dir=root,
        eval_images=images,
    )
    out = tmp_path / "out"
    out.mkdir()
    tables = ingest(cfg, None, out)
    expected = sum(dup for _, dup in rows)
    assert tables.info["correct_duplicated"] == {"VOC2007/test": expected}
    assert tables.info["subsets"]["eval:VOC2007/test"]["correct_duplicated"] == expected


def test_a_parquet_string_that_is_not_utf8_is_a_bad_row(tmp_path: Path) -> None:
    """Arrow checks UTF-8 when it writes, other Parquet writers do not: a table written with
    a binary column holding invalid UTF-8, read as strings, names the row."""
    images = tmp_path / "img"
    images.mkdir()
    good = {**GOOD_ROW, "qry_image_path": ""}
    columns = {k: pa.array([v] * 3, pa.string()) for k, v in good.items() if k != "pos_text"}
    raw = pa.array([b"apple", b"caf\xe9", b"plum"], pa.binary())
    # The binary buffers relabelled as strings, unchecked, as a foreign writer leaves them.
    columns["pos_text"] = pa.Array.from_buffers(pa.string(), 3, raw.buffers())
    bad = pa.table(columns)
    (tmp_path / "train" / "VOC2007").mkdir(parents=True)
    pq.write_table(bad, tmp_path / "train" / "VOC2007" / "original-0.parquet")
    cfg = IngestConfig(
        source="mmeb", train_dir=tmp_path / "train", train_images=images, on_bad_rows="skip"
    )
    out = tmp_path / "out"
    out.mkdir()
    ingest(cfg, None, out)
    assert [p["pos_text"] for p in pq.read_table(out / "pairs.parquet").to_pylist()] == [
        "apple",
        "plum",
    ]
    (reject,) = pq.read_table(out / "rejects.parquet").to_pylist()
    assert reject["row"] == 1 and "pos_text is not UTF-8 text" in reject["reason"]


def test_two_jsonl_files_of_one_name_are_an_error(tmp_path: Path) -> None:
    files = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        f = tmp_path / folder / "mine.jsonl"
        f.write_text(json.dumps({**GOOD_ROW, "qry_image_path": ""}) + "\n")
        files.append(f)
    cfg = IngestConfig(source="jsonl", jsonl_files=files, jsonl_images=tmp_path)
    with pytest.raises(SourceError, match="would both be subset 'mine'"):
        ingest(cfg, None, tmp_path)


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (b"{not json", "is not valid UTF-8 JSON"),
        (b'{"A": {"meta_task": "vqa"}}\xff', "is not valid UTF-8 JSON"),
        (b'[{"A": "vqa"}]', "expected an object"),
        (b'"vqa"', "expected an object"),
        (b'{"A": "vqa"}', "subset 'A' needs an object with meta_task"),
        (b'{"A": ["vqa"]}', "subset 'A' needs an object with meta_task"),
        (b'{"A": {"meta_task": "dancing"}}', "subset 'A' needs meta_task in"),
        (b'{"A": {"meta_task": "vqa", "distribution": "mars"}}', "subset 'A' needs meta_task in"),
    ],
    ids=[
        "not json",
        "not utf-8",
        "a list",
        "a string",
        "entry a string",
        "entry a list",
        "unknown meta-task",
        "unknown distribution",
    ],
)
def test_a_malformed_sidecar_is_one_clear_error(tmp_path: Path, content: bytes, error: str) -> None:
    from embedder.datasets.catalog import SIDECAR, UnknownSubsetError, read_sidecar

    (tmp_path / SIDECAR).write_bytes(content)
    with pytest.raises(UnknownSubsetError, match=error) as caught:
        read_sidecar(tmp_path)
    assert str(tmp_path / SIDECAR) in str(caught.value)


@pytest.mark.parametrize(
    ("category", "reason"),
    [
        (lambda cats: cats[:-1], "tgt_category has 11 entries but tgt_text 12"),
        (lambda cats: [*cats, "extra"], "tgt_category has 13 entries but tgt_text 12"),
        (lambda cats: None, None),  # no categories for this row: fine, scored by P@1 only
        (lambda cats: [None, *cats[1:]], None),  # an unknown entry: fine
    ],
)
def test_candidate_categories_are_carried_and_checked(
    world_dir: Path, tmp_path: Path, category: object, reason: str | None
) -> None:
    world = tmp_path / "w"
    shutil.copytree(world_dir, world)
    path = world / "eval" / "ShapeClass" / "test-00000-of-00001.parquet"
    rows = pq.read_table(path).to_pylist()
    rows[1]["tgt_category"] = category(rows[1]["tgt_category"])  # type: ignore[operator]
    pq.write_table(pa.Table.from_pylist(rows), path)
    out = tmp_path / "out"
    out.mkdir()
    ingest(_world_config(world, on_bad_rows="skip"), None, out)
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    evals = pq.read_table(out / "eval.parquet").to_pylist()
    if reason is None:
        assert not rejects
        carried = [r["tgt_category"] for r in evals if r["subset"] == "ShapeClass"]
        assert carried[1] == rows[1]["tgt_category"] and carried[0] == rows[0]["tgt_category"]
        vqa = [r["tgt_category"] for r in evals if r["subset"] == "ShapeVQA"]
        assert vqa and all(c is None for c in vqa), "a subset without the column: null"
        return
    assert [r["row"] for r in rejects if r["table"] == "eval"][:1] == [1]
    assert reason in rejects[0]["reason"]
