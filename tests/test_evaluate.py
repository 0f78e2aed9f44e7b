"""Evaluation: the metric on hand-made candidate lists (MMEB's argmax convention, strict P@1,
the tie rate), the means, the report's columns, the sanity check (content copies pass, a
pooling bug fails), and adapters that must apply (or fail loudly)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from embedder.config import EmbedConfig, EvaluateConfig, FinetuneConfig, ModelConfig, TableRow
from embedder.evaluate import (
    SanityCheckError,
    aggregate,
    content_id,
    evaluate_model,
    query_scores,
    strict_hits,
    subset_scores,
)
from embedder.model.encode import EmbedItem
from embedder.outputs import Adapter, Generator, Tables
from embedder.training.adapters import WEIGHTS, AdapterError

E = np.eye(3)


def test_correct_at_index_0_scores_and_a_tie_is_a_hit_by_argmax_and_a_miss_when_strict() -> None:
    q = E[0]
    assert query_scores(q, np.stack([E[0], E[1], E[2]]), 5) == {
        "p1": True,
        "p1_strict": True,
        "tie": False,
        "hit": True,
    }
    tie = query_scores(q, np.stack([E[0], E[0], E[1]]), 1)
    assert tie["p1"] is True, "MMEB's argmax convention resolves a tie to index 0"
    assert tie["p1_strict"] is False, "strict: a tie with the correct candidate is a miss"
    assert tie["tie"] is True
    assert tie["hit"] is False
    second = 0.6 * E[0] + 0.8 * E[1]  # the correct one, ranked second
    wrong = query_scores(q, np.stack([second, E[0], E[2]]), 2)
    assert (wrong["p1"], wrong["p1_strict"], wrong["hit"]) == (False, False, True)
    assert not strict_hits(q, np.stack([E[2], E[0]]))
    assert not strict_hits(q, np.stack([E[0], E[0]])), "strict_hits stays strict"


def _unit(*xs: float) -> np.ndarray:
    v = np.array(xs, dtype=np.float64)
    return v / np.linalg.norm(v)


def _at(score: float, axis: int) -> np.ndarray:
    """A unit vector whose cosine with E[0] is exactly `score` (the rest on `axis`)."""
    v = np.zeros(3)
    v[0], v[axis] = score, np.sqrt(1 - score**2)
    return v


ONE = _unit(1.0, 2.0, 3.0)
# (case, query, candidates with the correct one first, MMEB p1, strict p1, tie, strict hit@2;
# "above"/"below": the correct candidate's score against its best rival's):
# the values MMEB's reference toolkit (`np.argmax(scores) == 0`) and the definitions give.
CASES = [
    ("clear win", E[0], [E[0], E[1], E[2]], True, True, False, True),
    ("correct duplicated (one vector)", E[0], [E[0], E[1], E[0]], True, False, True, True),
    ("equal score, other vector", E[0], [_at(0.6, 1), _at(0.6, 2), E[1]], True, False, True, True),
    ("correct second", E[0], [_at(0.6, 1), E[0], E[2]], False, False, False, True),
    ("near-tie, 1e-7 above", E[0], [_at(0.5 + 1e-7, 1), _at(0.5, 2)], True, False, True, True),
    ("near-tie, 1e-7 below", E[0], [_at(0.5, 1), _at(0.5 + 1e-7, 2)], False, False, True, True),
    ("gap, 1e-3 above", E[0], [_at(0.5 + 1e-3, 1), _at(0.5, 2)], True, True, False, True),
    ("gap, 1e-3 below", E[0], [_at(0.5, 1), _at(0.5 + 1e-3, 2)], False, False, False, True),
    ("two wrong ones tie on top", E[0], [_at(0.6, 1), E[0], E[0]], False, False, True, False),
    ("single candidate", E[1], [E[2]], True, True, False, True),
    ("collapsed: all one vector", ONE, [ONE] * 4, True, False, True, False),
]


@pytest.mark.parametrize(
    ("query", "candidates", "p1", "strict", "tie", "hit2"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_p1_follows_mmeb_argmax_with_strict_p1_and_ties_beside(
    query: np.ndarray, candidates: list[np.ndarray], p1: bool, strict: bool, tie: bool, hit2: bool
) -> None:
    cands = np.stack(candidates)
    # The table itself against the reference toolkit's formula (VLM2Vec's eval).
    assert (int(np.argmax(np.dot(cands, query))) == 0) is p1
    got = query_scores(query, cands, 2)
    assert got == {"p1": p1, "p1_strict": strict, "tie": tie, "hit": hit2}


def test_copies_of_the_correct_vector_tie_exactly_wherever_they_stand() -> None:
    # As the shards hold them (float32, a real width): the argmax convention needs a copy of
    # the correct candidate to score bit-identically wherever it stands. A BLAS product need
    # not: with OpenBLAS on x86, `cands @ query` scores the copy at row 15 2e-7 above row 0.
    rng = np.random.default_rng(76)
    n, d = int(rng.integers(2, 300)), int(rng.integers(3, 2000))  # 170, 1613
    cands = rng.standard_normal((n, d)).astype(np.float32)
    cands /= np.linalg.norm(cands, axis=1, keepdims=True)
    query = cands[0] + np.float32(0.01) * rng.standard_normal(d).astype(np.float32)
    query /= np.linalg.norm(query)
    cands[rng.integers(1, n, size=3)] = cands[0]  # rows 15, 31, 169
    assert query_scores(query, cands, 5) == {
        "p1": True,
        "p1_strict": False,
        "tie": True,
        "hit": True,
    }


def test_subset_means_over_queries_with_unequal_candidate_lists() -> None:
    # Every case above as one query of one subset (1 to 4 candidates): keys are what the
    # pipeline gives subset_scores (a duplicated candidate is one key, one vector).
    vectors: dict[str, np.ndarray] = {}
    qkeys, ckeys = [], []
    for i, (_, query, candidates, *_rest) in enumerate(CASES):
        vectors[f"q{i}"] = query
        keys = []
        for j, c in enumerate(candidates):
            same = [k for k in keys if np.array_equal(vectors[k], c)]
            keys.append(same[0] if same else f"c{i}.{j}")
            vectors.setdefault(keys[-1], c)
        qkeys.append(f"q{i}")
        ckeys.append(keys)
    got = subset_scores([{"subset": "T"}] * len(CASES), qkeys, ckeys, vectors, k=2)["T"]
    expected = np.array([c[3:] for c in CASES], dtype=float).mean(axis=0)
    assert [got["p1"], got["p1_strict"], got["tie_rate"], got["hit@2"]] == pytest.approx(
        expected.tolist()
    )
    assert got["queries"] == len(CASES)


def test_a_perfect_model_with_a_duplicated_label_and_a_collapsed_one() -> None:
    apple, pear = _unit(1, 0, 0), _unit(0, 1, 0)
    vectors = {"img:apple": apple, "img:pear": pear, "apple": apple, "pear": pear}
    rows = [{"subset": "Fruit"}, {"subset": "Fruit"}]
    # The label set has "apple" twice: each query's list is it, correct label first.
    ckeys = [["apple", "pear", "apple"], ["pear", "apple", "apple"]]
    got = subset_scores(rows, ["img:apple", "img:pear"], ckeys, vectors)["Fruit"]
    assert (got["p1"], got["p1_strict"], got["tie_rate"]) == (1.0, 0.5, 0.5)
    collapsed = dict.fromkeys(vectors, ONE)
    got = subset_scores(rows, ["img:apple", "img:pear"], ckeys, collapsed)["Fruit"]
    assert (got["p1"], got["p1_strict"], got["tie_rate"]) == (1.0, 0.0, 1.0)


def test_duplicated_and_single_modality_candidates_score_by_their_vectors() -> None:
    # Candidates are keys: a duplicated candidate shares one vector; text-only and
    # image-only items are just other keys.
    vectors = {
        "q_text": E[0],
        "q_image": E[1],
        "label_a": E[0],
        "label_b": E[2],
        "img_only": E[1],
        "txt_only": 0.6 * E[1] + 0.8 * E[2],
    }
    rows = [{"subset": "Cls"}, {"subset": "Cls"}, {"subset": "Ret"}]
    qkeys = ["q_text", "q_image", "q_image"]
    ckeys = [
        ["label_a", "label_b", "label_b"],  # duplicated wrong candidate
        ["label_b", "img_only"],  # the correct one is not the closest
        ["img_only", "txt_only", "label_a"],
    ]
    got = subset_scores(rows, qkeys, ckeys, vectors, k=2)
    assert got["Cls"] == {
        "p1": 0.5,
        "p1_strict": 0.5,
        "tie_rate": 0.0,
        "tie_rate_distinct": 0.0,
        "hit@2": 1.0,
        "queries": 2,
    }
    assert got["Ret"]["p1"] == 1.0


def test_means_per_meta_task_and_distribution_over_mmeb_subsets_only() -> None:
    p1 = {"ImageNet-1K": 0.5, "N24News": 0.3, "Place365": 0.1, "MSCOCO_i2t": 0.9, "Mine": 0.0}
    meta = {
        "ImageNet-1K": ("classification", "ind"),
        "N24News": ("classification", "ind"),
        "Place365": ("classification", "ood"),
        "MSCOCO_i2t": ("retrieval", "ind"),
        "Mine": ("retrieval", "ind"),
    }
    agg = aggregate(p1, meta)
    assert agg["classification"] == pytest.approx(0.3)
    assert agg["retrieval"] == pytest.approx(0.9), "Mine is not an MMEB subset"
    assert agg["ind"] == pytest.approx((0.5 + 0.3 + 0.9) / 3)
    assert agg["ood"] == pytest.approx(0.1)
    assert agg["overall"] == pytest.approx(0.45)
    assert agg["outside_mmeb"] == ["Mine"]
    # With no MMEB subset at all (the miniature world) the declared labels are used.
    own = aggregate({"A": 1.0, "B": 0.0}, {"A": ("vqa", "ind"), "B": ("vqa", "ood")})
    assert own["overall"] == 0.5 and own["outside_mmeb"] == []


EMBED = EmbedConfig(num_workers=0, image_side=64)
EVAL = EvaluateConfig(max_queries=3, image_mode="fixed", image_side=64)


def _adapter(tmp_path: Path, generator: Generator, *, train_b: bool) -> Adapter:
    """An adapter as the finetune stage saves it; B all zero (changes nothing) or not."""
    import torch

    from embedder.embed import open_backbone
    from embedder.training.adapters import attach

    backbone = open_backbone(ModelConfig(), generator)
    cfg = FinetuneConfig(dora=False)
    peft_model = attach(backbone, cfg)
    if train_b:
        torch.manual_seed(0)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.5)
    out = Adapter(folder=tmp_path, fingerprint=("b" if train_b else "0") * 20)
    peft_model.save_pretrained(str(out.adapter), safe_serialization=True)
    return out


def _p1(report: Adapter | object) -> dict[str, float]:
    data = json.loads(report.report.read_text())  # type: ignore[attr-defined]
    return {s: v["p1"] for s, v in data["subsets"].items()}


def test_an_adapter_that_changes_nothing_evaluates_as_zero_shot_and_a_trained_one_does_not(
    tables: Tables, generator: Generator, tmp_path: Path
) -> None:
    from embedder.model.shards import load_embeddings

    base = evaluate_model(ModelConfig(), EMBED, EVAL, tables, generator, None, tmp_path / "zs")
    zero = _adapter(tmp_path / "zero", generator, train_b=False)
    same = evaluate_model(ModelConfig(), EMBED, EVAL, tables, generator, zero, tmp_path / "a0")
    trained = _adapter(tmp_path / "trained", generator, train_b=True)
    moved = evaluate_model(ModelConfig(), EMBED, EVAL, tables, generator, trained, tmp_path / "a1")
    vec = {
        name: dict(zip(*load_embeddings(r.folder / "embeddings"), strict=True))
        for name, r in (("base", base), ("same", same), ("moved", moved))
    }
    keys = list(vec["base"])
    assert keys == list(vec["same"])
    for k in keys:
        np.testing.assert_allclose(vec["same"][k], vec["base"][k], atol=1e-5)
    assert _p1(same) == _p1(base)
    assert max(float(np.abs(vec["moved"][k] - vec["base"][k]).max()) for k in keys) > 1e-2


def test_an_adapter_missing_a_key_is_an_error_naming_it(
    tables: Tables, generator: Generator, tmp_path: Path
) -> None:
    adapter = _adapter(tmp_path / "broken", generator, train_b=False)
    weights = load_file(str(adapter.adapter / WEIGHTS))
    dropped = sorted(weights)[0]
    del weights[dropped]
    weights["base_model.model.not_a_layer.lora_A.weight"] = next(iter(weights.values())).clone()
    save_file(weights, str(adapter.adapter / WEIGHTS))
    with pytest.raises(AdapterError) as err:
        evaluate_model(ModelConfig(), EMBED, EVAL, tables, generator, adapter, tmp_path / "ev")
    assert f"missing keys {dropped}" in str(err.value)
    assert "unexpected keys base_model.model.not_a_layer.lora_A.weight" in str(err.value)


def test_a_re_evaluation_embeds_only_what_earlier_evaluations_lack(
    tables: Tables, generator: Generator, tmp_path: Path
) -> None:
    from embedder.model.shards import load_embeddings

    stage = tmp_path / "evaluate"  # the stage's folder in the store: siblings are earlier runs
    small = evaluate_model(ModelConfig(), EMBED, EVAL, tables, generator, None, stage / "a")
    assert small.metrics["reused_items"] == 0
    more = EVAL.model_copy(update={"max_queries": 5})
    bigger = evaluate_model(ModelConfig(), EMBED, more, tables, generator, None, stage / "b")
    assert bigger.metrics["reused_items"] == small.rows["unique_items"]
    fresh = evaluate_model(ModelConfig(), EMBED, more, tables, generator, None, tmp_path / "c")
    assert fresh.metrics["reused_items"] == 0
    assert (
        json.loads(bigger.report.read_text())["subsets"]
        == json.loads(fresh.report.read_text())["subsets"]
    )
    new_only = dict(zip(*load_embeddings(bigger.folder / "embeddings"), strict=True))
    assert len(new_only) == fresh.rows["unique_items"] - small.rows["unique_items"]
    # Another model (an adapter) shares nothing with the zero-shot evaluations.
    adapter = _adapter(tmp_path / "zero", generator, train_b=False)
    tuned = evaluate_model(ModelConfig(), EMBED, EVAL, tables, generator, adapter, stage / "d")
    assert tuned.metrics["reused_items"] == 0


def _collapse(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the model map every input to one vector (pooling returns a constant)."""
    import torch

    import embedder.model.encode as encode_module

    def constant(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.ones(hidden.shape[0], hidden.shape[-1], dtype=hidden.dtype)

    monkeypatch.setattr(encode_module, "pool_last_token", constant)


def test_a_collapsed_model_scores_1_by_argmax_and_the_run_and_report_say_why(
    tables: Tables, generator: Generator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from embedder.report import RowResult, write_report

    # No sanity check: it would stop this model, and what is tested is the scoring after it.
    unchecked = EVAL.model_copy(update={"sanity_items": 0})
    honest = evaluate_model(
        ModelConfig(), EMBED, unchecked, tables, generator, None, tmp_path / "a" / "ev"
    )
    _collapse(monkeypatch)
    # In a folder of its own: a sibling's embeddings of the same model would be reused.
    flat = evaluate_model(
        ModelConfig(), EMBED, unchecked, tables, generator, None, tmp_path / "b" / "ev"
    )
    subsets = sorted(json.loads(flat.report.read_text())["subsets"])
    for s in [*subsets, "overall"]:
        assert flat.metrics[f"p1.{s}"] == 1.0, "MMEB's argmax: every tie goes to index 0"
        assert flat.metrics[f"p1_strict.{s}"] == 0.0
        assert flat.metrics[f"tie_rate.{s}"] == 1.0
    assert "p1_strict.classification" in flat.metrics and "tie_rate.ind" in flat.metrics
    (summary,) = flat.info["summary"]
    assert "P@1 (MMEB argmax)" in summary and "strict P@1" in summary
    assert "WARNING: tie rate above 0.05" in summary and all(s in summary for s in subsets)
    (warning,) = flat.info["warnings"]
    assert all(s in warning for s in subsets)
    assert not honest.info["warnings"] and "WARNING" not in honest.info["summary"][0]
    # The report: the headline is P@1 (argmax), strict and ties beside it, each explained.
    rows = [
        RowResult(TableRow(name="honest", template="hierarchical", negatives="none"), honest, None),
        RowResult(TableRow(name="flat", template="hierarchical", negatives="none"), flat, None),
    ]
    lines = write_report(rows, tmp_path / "report", "t")
    md = (tmp_path / "report" / "report.md").read_text()
    block = md.split("```")[1].strip("\n")
    assert block == "\n".join(lines)
    table, legend = block.split("\n\n")
    head, chance, *cells = table.splitlines()
    beside = ["strict", "ties", "samecat", "cat", "pairs"]
    assert head.split()[-6:] == ["overall", *beside]
    assert chance.startswith("(chance)")
    # Every tie goes to index 0, so the collapsed model is "right" at both category levels
    # too; it fine-tuned nothing (pairs: "-").
    columns = len(head.split()) - 1 - len(beside)
    assert cells[1].split() == [
        "flat",
        *["1.000"] * columns,
        "0.000",
        "1.000",
        "1.000",
        "1.000",
        "-",
    ]
    assert "MMEB argmax" in legend and "first maximum wins" in legend
    assert "strict:" in legend and "ties:" in legend
    assert "WARNING flat: tie rate above 0.05" in legend and "WARNING honest" not in legend
    data = json.loads((tmp_path / "report" / "table.json").read_text())
    assert data["rows"]["flat"]["aggregate"]["overall"] == 1.0
    assert data["rows"]["flat"]["aggregate_strict"]["overall"] == 0.0
    assert data["rows"]["flat"]["aggregate_tie_rate"]["overall"] == 1.0
    assert set(data["conventions"]) >= {"p1", "p1_strict", "tie_rate"}


def _tables_with_copies(tables: Tables, root: Path) -> Tables:
    """Four classification queries of the miniature world where the second query's image is
    a byte copy of the first's and the third's a lossless re-encode of it, under other names."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from embedder.datasets.schema import EVAL_SCHEMA

    assert tables.eval_images is not None
    rows = [r for r in pq.read_table(tables.eval).to_pylist() if r["subset"] == "ShapeClass"][:4]
    images = root / "images"
    for r in rows:
        (images / r["qry_image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tables.eval_images / r["qry_image"], images / r["qry_image"])
    first = images / rows[0]["qry_image"]
    shutil.copy(first, first.with_name("copy.png"))
    with Image.open(first) as im:
        im.save(first.with_name("reencoded.png"), compress_level=0)
    assert first.read_bytes() != first.with_name("reencoded.png").read_bytes()
    rows[1]["qry_image"] = str(Path(rows[0]["qry_image"]).with_name("copy.png"))
    rows[2]["qry_image"] = str(Path(rows[0]["qry_image"]).with_name("reencoded.png"))
    out = Tables(folder=root / "tables", eval_images=images)
    out.folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=EVAL_SCHEMA), out.eval)
    return out


def test_content_identity_is_text_and_pixels_not_the_file_name(
    tables: Tables, tmp_path: Path
) -> None:
    copies = _tables_with_copies(tables, tmp_path)
    assert copies.eval_images is not None
    root: Path = copies.eval_images
    names = sorted(p.relative_to(root) for p in root.rglob("*.png"))
    by_name = {p.name: str(p) for p in names}
    first = sorted(n for n in by_name if n not in ("copy.png", "reencoded.png"))[0]

    def cid(text: str, name: str) -> str:
        return content_id(EmbedItem(text, by_name[name]), root, EMBED)

    assert cid("x", first) == cid("x", "copy.png") == cid("x", "reencoded.png")
    assert EmbedItem("x", by_name[first]).key != EmbedItem("x", by_name["copy.png"]).key
    assert cid("x", first) != cid("y", first), "same pixels, other text"
    other = next(n for n in sorted(by_name) if n not in (first, "copy.png", "reencoded.png"))
    assert cid("x", first) != cid("x", other)


def test_the_sanity_check_accepts_content_copies_under_other_names(
    tables: Tables, generator: Generator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copies = _tables_with_copies(tables, tmp_path / "data")
    cfg = EVAL.model_copy(update={"max_queries": 4})
    with caplog.at_level(logging.INFO, logger="gen2embed.evaluate"):
        got = evaluate_model(ModelConfig(), EMBED, cfg, copies, generator, None, tmp_path / "ev")
    assert got.metrics["sanity_self_min"] > got.metrics["sanity_rival_max"], "the check ran"
    assert "2 items passed over as content copies" in caplog.text, "the copy and the re-encode"
    assert got.rows["queries"] == 4


def test_the_sanity_check_still_stops_a_pooling_bug(
    tables: Tables, generator: Generator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    import embedder.model.encode as encode_module

    def first_position(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Padding on the left: every shorter row's first position is padding.
        return hidden[:, 0]

    copies = _tables_with_copies(tables, tmp_path / "data")
    cfg = EVAL.model_copy(update={"max_queries": 4})
    monkeypatch.setattr(encode_module, "pool_last_token", first_position)
    with pytest.raises(SanityCheckError, match="do not find their own embedding first"):
        evaluate_model(
            ModelConfig(), EMBED, cfg, copies, generator, None, tmp_path / "checked" / "ev"
        )
    # The check is what stops it: without the check the same run completes.
    unchecked = cfg.model_copy(update={"sanity_items": 0})
    evaluate_model(
        ModelConfig(), EMBED, unchecked, copies, generator, None, tmp_path / "unchecked" / "ev"
    )


def test_texts_the_tokenizer_reads_alike_are_one_content_for_the_sanity_check(
    tables: Tables, generator: Generator, tmp_path: Path
) -> None:
    """Composed and decomposed accents: different strings, one token sequence (the tokenizer
    normalises to NFC), one vector. The check must not call that a pooling bug."""
    import unicodedata

    import pyarrow as pa
    import pyarrow.parquet as pq

    from embedder.datasets.schema import EVAL_SCHEMA

    rows = [r for r in pq.read_table(tables.eval).to_pylist() if r["subset"] == "ShapeClass"][:4]
    text = "caf\u00e9 au lait"
    for r, spelled in zip(rows, [text, unicodedata.normalize("NFD", text)], strict=False):
        r["qry_text"], r["qry_image"] = spelled, ""
    out = Tables(folder=tmp_path / "tables", eval_images=tables.eval_images)
    out.folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=EVAL_SCHEMA), out.eval)
    cfg = EVAL.model_copy(update={"max_queries": 4})
    got = evaluate_model(ModelConfig(), EMBED, cfg, out, generator, None, tmp_path / "ev")
    assert got.metrics["sanity_self_min"] > got.metrics["sanity_rival_max"]


def test_embeddings_are_reused_only_from_the_same_images(
    tables: Tables, generator: Generator, tmp_path: Path
) -> None:
    """Other pictures under the same names (replaced in place, so re-ingested): the second
    evaluation, a sibling of the first, must embed its own images, not borrow the first's."""
    import shutil

    from PIL import Image, ImageOps

    from embedder.datasets.ingest import images_digest

    assert tables.eval_images is not None
    root = tmp_path / "images"
    shutil.copytree(tables.eval_images, root)

    def ingested() -> Tables:  # what ingest records about the root it read
        return tables.model_copy(
            update={"eval_images": root, "eval_images_digest": images_digest(root)}
        )

    before = ingested()
    stage = tmp_path / "evaluate"
    cfg = EVAL.model_copy(update={"max_queries": 2, "sanity_items": 0})
    first = evaluate_model(ModelConfig(), EMBED, cfg, before, generator, None, stage / "a")
    assert first.metrics["reused_items"] == 0
    for path in sorted(root.rglob("*.png")):
        with Image.open(path) as im:
            inverted = ImageOps.invert(im.convert("RGB"))
        inverted.save(path)
    after = ingested()
    second = evaluate_model(ModelConfig(), EMBED, cfg, after, generator, None, stage / "b")
    assert second.metrics["reused_items"] == 0, "other pictures under the same names"
    again = evaluate_model(ModelConfig(), EMBED, cfg, after, generator, None, stage / "c")
    assert again.metrics["reused_items"] > 0, "the same images are reused"


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_scores_are_float32_whatever_the_shards_hold(dtype: type) -> None:
    """float16 shards (embed.out_dtype) step by ~5e-4 near 1: scored in float16, a candidate
    1e-4 closer would tie; scored in float32 it does not."""
    from embedder.evaluate import cosine_scores

    rng = np.random.default_rng(0)
    q = _unit(*rng.normal(size=64)).astype(dtype)
    noise = _unit(*rng.normal(size=64))
    close = [_unit(*(q.astype(np.float64) + eps * noise)) for eps in (0.02, 0.03)]
    cands = np.stack(close).astype(dtype)
    scores = cosine_scores(q, cands)
    assert scores.dtype == np.float32
    got = query_scores(q, cands, 1)
    assert got["tie"] is False and got["p1_strict"] is True


def test_ties_between_copies_of_one_candidate_are_the_data_s_not_a_warning() -> None:
    """A label listed twice ties with itself whatever the model: counted in tie_rate (and a
    miss for strict P@1, as the definition says), but the warning's rate leaves it out."""
    apple, pear, plum = _unit(1, 0, 0), _unit(0, 1, 0), _unit(0, 0, 1)
    vectors = {"q": _unit(1, 0.1, 0), "apple": apple, "pear": pear, "plum": plum}
    rows = [{"subset": "Fruit"}] * 3
    ckeys = [["apple", "pear", "apple"], ["apple", "apple", "plum"], ["apple", "pear", "plum"]]
    got = subset_scores(rows, ["q"] * 3, ckeys, vectors)["Fruit"]
    assert got["tie_rate"] == pytest.approx(2 / 3) and got["p1_strict"] == pytest.approx(1 / 3)
    assert got["tie_rate_distinct"] == 0.0
    flat = dict.fromkeys(vectors, ONE)  # a collapsed model: ties between different labels
    assert subset_scores(rows, ["q"] * 3, ckeys, flat)["Fruit"]["tie_rate_distinct"] == 1.0


# (scores, correct first; categories; expected category scores): the two levels a world
# with categories has, MMEB's argmax convention (first maximum wins) at each.
CATEGORY_CASES = [
    # The top is a same-category negative: the category is right, the detail wrong.
    ([0.5, 0.9, 0.1], ["a", "a", "b"], {"category_accuracy": True, "p1_same_category": False}),
    # The top is another category; among "a" alone the correct one leads.
    ([0.8, 0.1, 0.9], ["a", "a", "b"], {"category_accuracy": False, "p1_same_category": True}),
    ([0.9, 0.1, 0.2], ["a", "a", "b"], {"category_accuracy": True, "p1_same_category": True}),
    # No same-category negative: only the category level is defined.
    ([0.2, 0.9, 0.1], ["a", "b", "c"], {"category_accuracy": False}),
    # A tie with the correct candidate counts for it, as P@1's argmax does.
    ([0.7, 0.7, 0.1], ["a", "a", "b"], {"category_accuracy": True, "p1_same_category": True}),
    # A tie won by an earlier other-category candidate.
    ([0.1, 0.7, 0.7], ["a", "b", "a"], {"category_accuracy": False, "p1_same_category": False}),
    # Unknown categories: nothing.
    ([0.9, 0.1], None, {}),
    ([0.9, 0.1], [None, "a"], {}),
    ([0.9, 0.1], ["", "a"], {}),  # "" is no category, as for fn_group
    ([0.9, 0.1, 0.5], ["a", None, "a"], {"category_accuracy": True, "p1_same_category": True}),
]


@pytest.mark.parametrize(("scores", "categories", "expected"), CATEGORY_CASES)
def test_category_scores_at_the_two_levels(
    scores: list[float], categories: list[str | None] | None, expected: dict[str, bool]
) -> None:
    from embedder.evaluate import category_scores

    assert category_scores(np.array(scores, dtype=np.float32), categories) == expected


def test_subset_means_of_category_scores_count_only_where_defined() -> None:
    vectors = {"q": _unit(1, 0, 0), "x": _unit(1, 0, 0), "y": _unit(0, 1, 0), "z": _unit(1, 1, 0)}
    rows = [
        {"subset": "A", "tgt_category": ["a", "a", "b"]},  # x first: both right
        {"subset": "A", "tgt_category": ["a", "b", "c"]},  # y, z: no same-category negative
        {"subset": "A", "tgt_category": None},  # counted by P@1 only
        {"subset": "B"},  # no column at all (MMEB data)
    ]
    ckeys = [["x", "y", "z"], ["y", "x", "z"], ["x", "y"], ["x", "y"]]
    got = subset_scores(rows, ["q"] * 4, ckeys, vectors)
    a = got["A"]
    assert a["queries"] == 3 and a["category_queries"] == 2 and a["same_category_queries"] == 1
    assert a["p1_same_category"] == 1.0
    assert a["category_accuracy"] == 0.5  # row 2's top is x, category "b" (not "a")
    assert "category_accuracy" not in got["B"] and "p1_same_category" not in got["B"]
