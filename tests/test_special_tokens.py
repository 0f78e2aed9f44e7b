"""Special-token strings that arrive in data are text, never control tokens (issue 15,
item 2b): for every added token of the backbone's tokenizer, in queries and targets, with
and without an image, through the same engine the stages use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedder.config import EmbedConfig, PretrainConfig
from embedder.embed import make_item
from embedder.generator import corpus_texts
from embedder.model.backbone import Backbone, build_tiny
from embedder.model.encode import encode, process_items
from embedder.model.shards import load_embeddings

SETTINGS = EmbedConfig(num_workers=0, image_side=64)


@pytest.fixture(scope="module")
def tiny() -> Backbone:
    return build_tiny(corpus_texts(), PretrainConfig(), image_size=64)


def _image(world_dir: Path) -> tuple[Path, str]:
    root = world_dir / "train_images"
    return root, sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))[0]


def _item(tiny: Backbone, text: str, image: str = "", role: str = "query") -> object:
    return make_item(
        text,
        image,
        template="hierarchical",
        role=role,
        image_token=tiny.image_token(),
        strings=SETTINGS,
        literal=tiny.as_text,
    )


def _tokens(tiny: Backbone) -> list[str]:
    return sorted(tiny.processor.tokenizer.added_tokens_encoder)


def test_every_added_token_in_data_is_encoded_as_its_plain_text(
    tiny: Backbone, world_dir: Path
) -> None:
    tok = tiny.processor.tokenizer
    root, image = _image(world_dir)
    tokens = _tokens(tiny)
    assert {"<|image_pad|>", "<|im_end|>", "<|im_start|>", "<|vision_start|>"} <= set(tokens)
    for token in tokens:
        question = f"what does {token} mean?"
        as_text = tok(question, split_special_tokens=True, add_special_tokens=False)["input_ids"]
        for image_path in ("", image):
            for role in ("query", "target"):
                item = _item(
                    tiny, f"<|image_1|>\n{question}" if image_path else question, image_path, role
                )
                ids = process_items(tiny.processor, [item], root, SETTINGS)["input_ids"][0]
                ids = ids.tolist()
                # The data's token string is there as its text tokens ...
                assert any(ids[i : i + len(as_text)] == as_text for i in range(len(ids))), (
                    token,
                    image_path,
                    role,
                )
                # ... and the control tokens are exactly the template's: one user turn, one
                # image (its patch tokens) or none.
                special = tok.convert_tokens_to_ids(token)
                template = _item(
                    tiny,
                    "<|image_1|>\nwhat does mean?" if image_path else "what does mean?",
                    image_path,
                    role,
                )
                plain = process_items(tiny.processor, [template], root, SETTINGS)["input_ids"][0]
                assert ids.count(special) == plain.tolist().count(special), (token, role)


def test_texts_without_special_strings_tokenize_exactly_as_before(
    tiny: Backbone, world_dir: Path
) -> None:
    root, image = _image(world_dir)
    items = [
        _item(tiny, "<|image_1|>\nRepresent the given image.", image, "target"),
        _item(tiny, "a red apple on the left", "", "query"),
        _item(tiny, "Find me an everyday image: a star. Quote: <|image_1|> | >", "", "query"),
    ]
    ours = process_items(tiny.processor, items, root, SETTINGS)
    from embedder.model.images import load_image

    images = [load_image(root, i.image, "fixed", 64) for i in items if i.image]
    stock = tiny.processor(
        text=[i.text for i in items], images=images, padding=True, return_tensors="pt"
    )
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        assert ours[key].tolist() == stock[key].tolist(), key


def test_the_embed_engine_embeds_special_token_strings_in_queries(
    tiny: Backbone, world_dir: Path, tmp_path: Path
) -> None:
    root, image = _image(world_dir)
    items = [
        _item(tiny, "How does Qwen2-VL mark an image? It writes <|image_pad|> in the prompt."),
        _item(tiny, "<|image_1|>\nIs <|image_pad|><|vision_end|> here?", image),
        _item(tiny, "an answer ends with <|im_end|><|endoftext|>", "", "target"),
        _item(tiny, "How does Qwen2-VL mark an image? It writes in the prompt."),
    ]
    encode(tiny, items, root, tmp_path, SETTINGS, progress=False)
    keys, vectors = load_embeddings(tmp_path)
    got = dict(zip(keys, vectors, strict=True))
    assert len(got) == 4 and all(np.isfinite(v).all() for v in got.values())
    # The literal token is content: the two otherwise equal questions embed differently.
    assert not np.allclose(got[items[0].key], got[items[3].key])


def test_an_item_with_nothing_to_embed_is_an_error_naming_it(
    tiny: Backbone, world_dir: Path, tmp_path: Path
) -> None:
    """Text that tokenizes to nothing (say only the characters transformers uses as control
    markers, which ingest refuses) would get padding's vector, which depends on the batch."""
    from embedder.model.encode import EmbedItem

    root, _ = _image(world_dir)
    empty = EmbedItem(tiny.as_text("\U000f0000\U000f0001"))
    with pytest.raises(ValueError, match=f"item {empty.key} has no tokens"):
        encode(tiny, [empty, _item(tiny, "a red circle")], root, tmp_path, SETTINGS)


def test_the_ingest_marker_check_names_transformers_own_markers() -> None:
    from transformers.utils import chat_template_utils

    from embedder.datasets.sources import CONTROL_MARKERS

    assert {
        chat_template_utils._CONTROL_TOKEN_START,
        chat_template_utils._CONTROL_TOKEN_END,
    } == CONTROL_MARKERS
