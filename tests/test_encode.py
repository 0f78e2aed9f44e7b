"""Batched last-token embedding: pooling, padding, dedupe and order, resume, image sizes."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from embedder.config import EmbedConfig, PretrainConfig
from embedder.generator import corpus_texts
from embedder.model.backbone import Backbone, build_tiny
from embedder.model.encode import (
    EmbedItem,
    encode,
    plan_shards,
    pool_last_token,
)
from embedder.model.images import eval_size
from embedder.model.prompts import render
from embedder.model.shards import load_embeddings


@pytest.fixture(scope="module")
def tiny() -> Backbone:
    return build_tiny(corpus_texts(), PretrainConfig(), image_size=64)


def _items(world_dir: Path, n_img: int = 12, n_txt: int = 12) -> tuple[list[EmbedItem], Path]:
    root = world_dir / "train_images"
    imgs = sorted(p.relative_to(root).as_posix() for p in (root / "ShapeCaps_t2i").glob("*.png"))
    items = [
        EmbedItem(
            render(
                "hierarchical",
                "<|image_1|>\nRepresent the given image.",
                has_image=True,
                role="target",
                image_token="<|image_pad|>",
            ),
            im,
        )
        for im in imgs[:n_img]
    ]
    texts = [
        "apple",
        "The image shows a small red apple on the left with one small blue dot.",
        "Find me an everyday image that matches the given caption: a star.",
    ]
    items += [
        EmbedItem(
            render(
                "hierarchical",
                texts[i % 3] + " " * (i // 3),
                has_image=False,
                role="query",
                image_token="<|image_pad|>",
            )
        )
        for i in range(n_txt)
    ]
    return items, root


def _run(
    tiny: Backbone, items: list[EmbedItem], root: Path, out: Path, **kw: object
) -> dict[str, np.ndarray]:
    settings = EmbedConfig(**{"num_workers": 0, "image_side": 64, **kw})
    encode(tiny, items, root, out, settings)
    keys, vecs = load_embeddings(out)
    return dict(zip(keys, vecs, strict=True))


def test_pool_last_token_left_and_right() -> None:
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert pool_last_token(hidden, right).flatten().tolist() == [1.0, 7.0]
    assert pool_last_token(hidden, left).flatten().tolist() == [3.0, 7.0]


def test_batched_equals_single_under_both_paddings(
    tiny: Backbone, world_dir: Path, tmp_path: Path
) -> None:
    items, root = _items(world_dir)
    single = _run(tiny, items, root, tmp_path / "single", batch_size=1)
    for side in ("left", "right"):
        batched = _run(tiny, items, root, tmp_path / side, batch_size=5, padding_side=side)
        assert batched.keys() == single.keys()
        for k, v in batched.items():
            np.testing.assert_allclose(v, single[k], atol=2e-5)
            assert np.isfinite(v).all()
            assert abs(np.linalg.norm(v) - 1) < 1e-5


def test_dedupe_and_order_do_not_change_vectors(
    tiny: Backbone, world_dir: Path, tmp_path: Path
) -> None:
    items, root = _items(world_dir)
    base = _run(tiny, items, root, tmp_path / "base", batch_size=4)
    shuffled = items * 3
    random.Random(1).shuffle(shuffled)
    again = _run(tiny, shuffled, root, tmp_path / "again", batch_size=7, shard_size=10)
    assert len(again) == len({i.key for i in items}) == len(items)
    for k, v in again.items():
        np.testing.assert_allclose(v, base[k], atol=2e-5)


def test_resume_after_a_crash_is_bit_identical(
    tiny: Backbone, world_dir: Path, tmp_path: Path
) -> None:
    items, root = _items(world_dir)
    settings = EmbedConfig(batch_size=4, shard_size=8, num_workers=0, image_side=64)
    full = tmp_path / "full"
    whole = encode(tiny, items, root, full, settings)

    class Crash(Exception):
        pass

    def crash_after_two(shard: int) -> None:
        if shard == 1:
            raise Crash

    part = tmp_path / "part"
    with pytest.raises(Crash):
        encode(tiny, items, root, part, settings, on_shard=crash_after_two)
    assert len(list(part.glob("shard-*.parquet"))) == 2
    stats = encode(tiny, items, root, part, settings)
    assert stats.resumed_shards == 2 and stats.shards == 3
    # The metrics cover the whole job, not just the last attempt (issue 8, minor).
    assert stats.tokens() == whole.tokens() and stats.encoded == whole.encoded == stats.unique
    assert stats.metrics()["padding_efficiency"] == whole.metrics()["padding_efficiency"]
    k1, v1 = load_embeddings(full)
    k2, v2 = load_embeddings(part)
    assert k1 == k2 and np.array_equal(v1, v2)


def test_length_buckets_cut_padding() -> None:
    lengths = [5, 100, 6, 99, 7, 98]
    shards = plan_shards(lengths, batch_size=2, shard_size=4)
    assert shards == [[[0, 2], [4, 5]], [[3, 1]]]


def test_eval_image_size_rule() -> None:
    assert eval_size(2000, 500) == (992, 496)  # squashed to 2:1, long side capped
    assert eval_size(100, 100) == (336, 336)  # short side never below 336
    assert eval_size(3000, 100) == (672, 336)  # the short-side rule wins over the cap
    assert eval_size(800, 600) == (800, 600)


def test_max_pixels_caps_image_tokens(tiny: Backbone, world_dir: Path, tmp_path: Path) -> None:
    items, root = _items(world_dir, n_img=4, n_txt=0)
    base = EmbedConfig(num_workers=0, image_side=64)
    full = encode(tiny, items, root, tmp_path / "full", base)
    capped = encode(
        tiny,
        items,
        root,
        tmp_path / "capped",
        base.model_copy(update={"max_pixels": 32 * 32}),
    )
    # 64x64 -> 16 image tokens; capped at 32x32 -> 4 tokens, for each of the 4 images.
    assert full.real_tokens - capped.real_tokens == 4 * (16 - 4)
    assert tiny.processor.image_processor.size["longest_edge"] == 64 * 64, "restored"
