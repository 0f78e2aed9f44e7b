"""The tiny generator: pretraining loss falls; it saves and reloads offline; VQA is scored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedder import generator as pt
from embedder.config import EmbedConfig, PretrainConfig
from embedder.model.backbone import build_tiny, load_backbone, save_backbone
from embedder.model.encode import EmbedItem, encode
from embedder.model.shards import load_embeddings


def test_examples_hold_out_the_exact_prompts() -> None:
    stream = pt.ExampleStream(seed=0, image_size=64)
    texts = [(e.system or "") + e.user + e.answer for e in (stream.sample() for _ in range(3000))]
    joined = "\n".join(texts)
    assert "Represent the given text/image in one word." not in joined
    assert "Represent the given text in one word." not in joined
    assert "summarize the provided image in one word" not in joined
    assert any(t.startswith("The image shows") for t in texts)
    with_exact = pt.ExampleStream(seed=0, image_size=64, exact_system_prompt=True)
    assert any(
        "summarize the provided image in one word" in (e.system or "")
        for e in (with_exact.sample() for _ in range(2000))
    )


def test_loss_falls_and_model_reloads_offline(
    tmp_path: Path, world_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backbone = build_tiny(pt.corpus_texts(), PretrainConfig(), image_size=64)
    cfg = PretrainConfig(steps=30, batch_size=8, lr=2e-3, warmup=5, seed=0)
    result = pt.pretrain(backbone, cfg, image_size=64, log_every=10)
    first, last = result.losses[0][1], result.losses[-1][1]
    assert last < 0.7 * first, result.losses
    acc = pt.vqa_accuracy(backbone, per_type=2, seed=0, image_size=64)
    assert set(acc) == {*pt.world.QUESTION_TYPES, "text_one_word"}
    assert all(0 <= v <= 1 for v in acc.values())

    folder = tmp_path / "model"
    save_backbone(backbone, folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reloaded = load_backbone(folder, device="cpu")
    assert reloaded.processor.image_processor.patch_size == 8
    root = world_dir / "train_images"
    img = next((root / "ShapeClass").glob("*.png")).relative_to(root).as_posix()
    items = [EmbedItem("<|image_pad|>\nwhat is this?", img), EmbedItem("apple")]
    settings = EmbedConfig(num_workers=0, image_side=64)
    encode(backbone, items, root, tmp_path / "a", settings)
    encode(reloaded, items, root, tmp_path / "b", settings)
    np.testing.assert_allclose(
        load_embeddings(tmp_path / "a")[1], load_embeddings(tmp_path / "b")[1], atol=1e-5
    )


@pytest.mark.parametrize("theta", [10000.0, 100.0])
def test_the_rotary_base_is_the_configured_one(theta: float) -> None:
    spec = PretrainConfig(rope_theta=theta, layers=1, hidden=32, heads=2, kv_heads=1)
    backbone = build_tiny(["an apple"], spec, image_size=32)
    assert backbone.model.config.text_config.rope_parameters["rope_theta"] == theta
