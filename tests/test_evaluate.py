"""Evaluation: the metric on hand-made candidate lists, the means, and adapters that must
apply (or fail loudly)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from embedder.config import EmbedConfig, EvaluateConfig, FinetuneConfig, ModelConfig
from embedder.evaluate import aggregate, evaluate_model, query_scores, strict_hits, subset_scores
from embedder.outputs import Adapter, Generator, Tables
from embedder.training.adapters import WEIGHTS, AdapterError

E = np.eye(3)


def test_correct_at_index_0_scores_and_ties_are_misses() -> None:
    q = E[0]
    assert query_scores(q, np.stack([E[0], E[1], E[2]]), 5) == {
        "p1": True,
        "p1_argmax": True,
        "hit": True,
    }
    tie = query_scores(q, np.stack([E[0], E[0], E[1]]), 1)
    assert tie["p1"] is False, "a tie with the correct candidate is a miss"
    assert tie["p1_argmax"] is True, "the argmax convention resolves it to index 0"
    assert tie["hit"] is False
    second = 0.6 * E[0] + 0.8 * E[1]  # the correct one, ranked second
    wrong = query_scores(q, np.stack([second, E[0], E[2]]), 2)
    assert (wrong["p1"], wrong["p1_argmax"], wrong["hit"]) == (False, False, True)
    assert not strict_hits(q, np.stack([E[2], E[0]]))


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
    assert got["Cls"] == {"p1": 0.5, "p1_argmax": 0.5, "hit@2": 1.0, "queries": 2}
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
