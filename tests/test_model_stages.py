"""The model stage functions on files: pretrain_generator, embed_pairs, evaluate_model.

Each is called as the pipeline calls it (its config sections, upstream outputs, a folder) and
its output is checked against what the test computes itself from the same inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedder.config import EmbedConfig, EvaluateConfig, ModelConfig, PretrainConfig, WorldConfig
from embedder.embed import embed_pairs
from embedder.evaluate import evaluate_model, strict_hits
from embedder.generator import pretrain_generator
from embedder.model.backbone import load_backbone
from embedder.model.encode import EmbedItem, encode
from embedder.model.prompts import render
from embedder.model.shards import load_embeddings
from embedder.outputs import Generator, Tables

EMBED = EmbedConfig(num_workers=0, image_side=64)


def _item(text: str, image: str, template: str, role: str) -> EmbedItem:
    rendered = render(template, text, has_image=bool(image), role=role, image_token="<|image_pad|>")  # type: ignore[arg-type]
    return EmbedItem(rendered, image)


def test_embed_pairs_keys_each_pair_to_its_own_rendered_query_and_positive(
    tables: Tables, generator: Generator, tmp_path: Path
) -> None:
    emb = embed_pairs(ModelConfig(), EMBED, tables, generator, tmp_path / "embed")
    pairs = pq.read_table(tables.pairs).to_pylist()
    keys = pq.read_table(emb.pair_keys).to_pylist()
    assert [k["id"] for k in keys] == [p["id"] for p in pairs]
    assert [k["subset"] for k in keys] == [p["subset"] for p in pairs]
    wanted = []
    for pair, k in zip(pairs, keys, strict=True):
        q = _item(pair["qry_text"], pair["qry_image"], "hierarchical", "query")
        p = _item(pair["pos_text"], pair["pos_image"], "hierarchical", "target")
        assert (k["qry_key"], k["pos_key"]) == (q.key, p.key)
        wanted += [q, p]
    shard_keys, matrix = load_embeddings(emb.shards)
    assert len(shard_keys) == len({i.key for i in wanted}) == emb.rows["unique_items"]
    # The vectors are the encoder's own for those inputs (images from the pairs' root).
    sample = [wanted[0], wanted[1], wanted[-2], wanted[-1]]
    assert tables.pairs_images is not None
    backbone = load_backbone(generator.model_dir)
    encode(backbone, sample, tables.pairs_images, tmp_path / "direct", EMBED)
    direct = dict(zip(*load_embeddings(tmp_path / "direct"), strict=True))
    stored = dict(zip(shard_keys, matrix, strict=True))
    for item in sample:
        np.testing.assert_allclose(stored[item.key], direct[item.key], atol=1e-5)


def test_evaluate_scores_each_query_against_its_own_candidates(
    tables: Tables, generator: Generator, tmp_path: Path
) -> None:
    for template in ("plain", "hierarchical"):
        cfg = EvaluateConfig(template=template, max_queries=4, image_mode="fixed", image_side=64)
        report = evaluate_model(
            ModelConfig(), EMBED, cfg, tables, generator, None, tmp_path / template
        )
        got = json.loads(report.report.read_text())
        rows = pq.read_table(tables.eval).to_pylist()
        kept: dict[str, list[dict]] = {}
        for r in rows:
            if len(kept.setdefault(r["subset"], [])) < 4:
                kept[r["subset"]].append(r)
        assert report.rows["queries"] == 8
        vectors = dict(zip(*load_embeddings(report.folder / "embeddings"), strict=True))
        for subset, subset_rows in kept.items():
            hits = []
            for r in subset_rows:
                q = vectors[_item(r["qry_text"], r["qry_image"], template, "query").key]
                cands = np.stack(
                    [
                        vectors[_item(t, im, template, "target").key]
                        for t, im in zip(r["tgt_text"], r["tgt_image"], strict=True)
                    ]
                )
                hits.append(strict_hits(q, cands))
            strict = got["subsets"][subset]["p1_strict"]  # as strict_hits: ties are misses
            assert strict == pytest.approx(np.mean(hits)), (template, subset)
        assert report.metrics["p1.overall"] == got["aggregate"]["overall"]
        assert "sanity_self_min" in report.metrics, "the sanity check ran"
        again = evaluate_model(
            ModelConfig(), EMBED, cfg, tables, generator, None, tmp_path / f"{template}-again"
        )
        assert again.report.read_bytes() == report.report.read_bytes(), "no timings in report"


def test_pretrain_generator_saves_a_loadable_seeded_model(tmp_path: Path) -> None:
    cfg = PretrainConfig(steps=3, batch_size=4, eval_per_type=1, warmup=1)
    first = pretrain_generator(cfg, WorldConfig(), tmp_path / "a")
    again = pretrain_generator(cfg, WorldConfig(), tmp_path / "b")
    other = pretrain_generator(cfg.model_copy(update={"seed": 1}), WorldConfig(), tmp_path / "c")
    weights = [(o.model_dir / "model.safetensors").read_bytes() for o in (first, again, other)]
    assert weights[0] == weights[1], "same seed, same generator"
    assert weights[0] != weights[2]
    model = load_backbone(first.model_dir, device="cpu")
    text = model.model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers) == (cfg.hidden, cfg.layers)
    assert model.processor.image_processor.patch_size == cfg.patch
    assert [step for step, _ in json.loads((first.folder / "loss.json").read_text())] == [3]
    assert {"vqa_acc.category", "final_loss", "parameters"} <= set(first.metrics)
    assert first.metrics["final_loss"] == first.info["losses"][-1][1]
