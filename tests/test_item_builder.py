"""One item builder (issue 18, item 3): the embed, finetune and evaluate stages and the
`Embedder` render a row's items through `embedder.embed.ItemBuilder`, and the rendered
strings, hence the cached vectors' item keys, are byte for byte those of the code before the
builder was shared. The table below was captured from that code (`make_item` called inline by
each stage, `Embedder.item`) for every template x role x input kind, with the default strings
and a marking `literal`, and with other strings, the wrapped image token and no `literal`."""

from __future__ import annotations

from typing import get_args

import pytest

from embedder.config import COMPARED, STRATEGIES, EmbedConfig, MineConfig, Negatives, TableRow
from embedder.embed import ItemBuilder, make_item
from embedder.inference import Embedder
from embedder.model.encode import item_key
from embedder.model.prompts import DEFAULT_STRINGS, PROMPT_STRINGS, ROLES, TEMPLATES, Template

INPUTS = {
    "text": ("a red apple <|im_end|>", ""),
    "image": ("", "img/a.png"),
    "both": ("<|image_1|>\nRepresent the given image.", "img/a.png"),
    "both_unplaced": ("a dog on <|image_pad|> grass", "img/b.png"),
}


def _mark(piece: str) -> str:
    """A `literal` that shows where it was applied (the data only, never the template)."""
    return f"[{piece}]"


VARIANTS = {
    "default": ("<|image_pad|>", EmbedConfig(), _mark),
    "custom": (
        "<|vision_start|><|image_pad|><|vision_end|>",
        EmbedConfig(
            system="SYS", query_suffix_image="+QI", query_suffix_text="+QT", generic_system="GEN"
        ),
        None,
    ),
}

EXPECTED: dict[tuple[str, str, str, str], tuple[str, str, str]] = {
    ("default", "hierarchical", "query", "text"): (
        "<|im_start|>system\n"
        "Given an image, summarize the provided image in one word. Given "
        "only text, describe the text in one word.<|im_end|>\n"
        "<|im_start|>user\n"
        "[a red apple <|im_end|>]\n"
        "Represent the given text in one word.<|im_end|>\n"
        "<|im_start|>assistant\n",
        "",
        "205b3b7afef1aadf6806",
    ),
    ("default", "hierarchical", "query", "image"): (
        "<|im_start|>system\n"
        "Given an image, summarize the provided image in one word. Given "
        "only text, describe the text in one word.<|im_end|>\n"
        "<|im_start|>user\n"
        "<|image_pad|>\n"
        "Represent the given text/image in one word.<|im_end|>\n"
        "<|im_start|>assistant\n",
        "img/a.png",
        "19f58333829bc7bf8aba",
    ),
    ("default", "hierarchical", "query", "both"): (
        "<|im_start|>system\n"
        "Given an image, summarize the provided image in one word. Given "
        "only text, describe the text in one word.<|im_end|>\n"
        "<|im_start|>user\n"
        "[]<|image_pad|>[\n"
        "Represent the given image.]\n"
        "Represent the given text/image in one word.<|im_end|>\n"
        "<|im_start|>assistant\n",
        "img/a.png",
        "a7559cf17ab1395a4e62",
    ),
    ("default", "hierarchical", "query", "both_unplaced"): (
        "<|im_start|>system\n"
        "Given an image, summarize the provided image in one word. Given "
        "only text, describe the text in one word.<|im_end|>\n"
        "<|im_start|>user\n"
        "<|image_pad|>\n"
        "[a dog on <|image_pad|> grass]\n"
        "Represent the given text/image in one word.<|im_end|>\n"
        "<|im_start|>assistant\n",
        "img/b.png",
        "5bff9942acc2e7aca1c6",
    ),
    ("default", "hierarchical", "target", "text"): (
        "<|im_start|>system\n"
        "Given an image, summarize the provided image in one word. Given "
        "only text, describe the text in one word.<|im_end|>\n"
        "<|im_start|>user\n"
        "[a red apple <|im_end|>]<|im_end|>\n"
        "<|im_start|>assistant\n",
        "",
        "2124bb9d95ee21a37ac7",
    ),
    ("default", "hierarchical", "target", "image"): (
        "<|im_start|>system\n"
        "Given an image, summarize the provided image in one word. Given "
        "only text, describe the text in one word.<|im_end|>\n"
        "<|im_start|>user\n"
        "<|image_pad|><|im_end|>\n"
        "<|im_start|>assistant\n",
        "img/a.png",
        "0d7a31735305e87da2ea",
    ),
    ("default", "hierarchical", "target", "both"): (
        "<|im_start|>system\n"
        "Given an image, summarize the provided image in one word. Given "
        "only text, describe the text in one word.<|im_end|>\n"
        "<|im_start|>user\n"
        "[]<|image_pad|>[\n"
        "Represent the given image.]<|im_end|>\n"
        "<|im_start|>assistant\n",
        "img/a.png",
        "cf070ea0fcfc9eafb9b7",
    ),
    ("default", "hierarchical", "target", "both_unplaced"): (
        "<|im_start|>system\n"
        "Given an image, summarize the provided image in one word. Given "
        "only text, describe the text in one word.<|im_end|>\n"
        "<|im_start|>user\n"
        "<|image_pad|>\n"
        "[a dog on <|image_pad|> grass]<|im_end|>\n"
        "<|im_start|>assistant\n",
        "img/b.png",
        "a4cefe2704fc594dd2d6",
    ),
    ("default", "plain", "query", "text"): (
        "[a red apple <|im_end|>]",
        "",
        "af40abaac0cc92f89b58",
    ),
    ("default", "plain", "query", "image"): (
        "<|image_pad|>",
        "img/a.png",
        "5a311a3e21c104a638c1",
    ),
    ("default", "plain", "query", "both"): (
        "[]<|image_pad|>[\nRepresent the given image.]",
        "img/a.png",
        "35373ed2cda4eb22a413",
    ),
    ("default", "plain", "query", "both_unplaced"): (
        "<|image_pad|>\n[a dog on <|image_pad|> grass]",
        "img/b.png",
        "929b0c71367bf7ed9ce1",
    ),
    ("default", "plain", "target", "text"): (
        "[a red apple <|im_end|>]",
        "",
        "af40abaac0cc92f89b58",
    ),
    ("default", "plain", "target", "image"): (
        "<|image_pad|>",
        "img/a.png",
        "5a311a3e21c104a638c1",
    ),
    ("default", "plain", "target", "both"): (
        "[]<|image_pad|>[\nRepresent the given image.]",
        "img/a.png",
        "35373ed2cda4eb22a413",
    ),
    ("default", "plain", "target", "both_unplaced"): (
        "<|image_pad|>\n[a dog on <|image_pad|> grass]",
        "img/b.png",
        "929b0c71367bf7ed9ce1",
    ),
    ("default", "chat", "query", "text"): (
        "<|im_start|>system\n"
        "You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n"
        "[a red apple <|im_end|>]<|im_end|>\n"
        "<|im_start|>assistant\n",
        "",
        "17d8e19a2b7e04bda335",
    ),
    ("default", "chat", "query", "image"): (
        "<|im_start|>system\n"
        "You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n"
        "<|image_pad|><|im_end|>\n"
        "<|im_start|>assistant\n",
        "img/a.png",
        "f00c64453f7959c5c138",
    ),
    ("default", "chat", "query", "both"): (
        "<|im_start|>system\n"
        "You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n"
        "[]<|image_pad|>[\n"
        "Represent the given image.]<|im_end|>\n"
        "<|im_start|>assistant\n",
        "img/a.png",
        "d95d43b29f3d0ddd0550",
    ),
    ("default", "chat", "query", "both_unplaced"): (
        "<|im_start|>system\n"
        "You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n"
        "<|image_pad|>\n"
        "[a dog on <|image_pad|> grass]<|im_end|>\n"
        "<|im_start|>assistant\n",
        "img/b.png",
        "5712d8dceb502751f570",
    ),
    ("default", "chat", "target", "text"): (
        "<|im_start|>system\n"
        "You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n"
        "[a red apple <|im_end|>]<|im_end|>\n"
        "<|im_start|>assistant\n",
        "",
        "17d8e19a2b7e04bda335",
    ),
    ("default", "chat", "target", "image"): (
        "<|im_start|>system\n"
        "You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n"
        "<|image_pad|><|im_end|>\n"
        "<|im_start|>assistant\n",
        "img/a.png",
        "f00c64453f7959c5c138",
    ),
    ("default", "chat", "target", "both"): (
        "<|im_start|>system\n"
        "You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n"
        "[]<|image_pad|>[\n"
        "Represent the given image.]<|im_end|>\n"
        "<|im_start|>assistant\n",
        "img/a.png",
        "d95d43b29f3d0ddd0550",
    ),
    ("default", "chat", "target", "both_unplaced"): (
        "<|im_start|>system\n"
        "You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n"
        "<|image_pad|>\n"
        "[a dog on <|image_pad|> grass]<|im_end|>\n"
        "<|im_start|>assistant\n",
        "img/b.png",
        "5712d8dceb502751f570",
    ),
    ("custom", "hierarchical", "query", "text"): (
        "<|im_start|>system\n"
        "SYS<|im_end|>\n"
        "<|im_start|>user\n"
        "a red apple <|im_end|>+QT<|im_end|>\n"
        "<|im_start|>assistant\n",
        "",
        "b40e15b79ef145f9857b",
    ),
    ("custom", "hierarchical", "query", "both"): (
        "<|im_start|>system\n"
        "SYS<|im_end|>\n"
        "<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>\n"
        "Represent the given image.+QI<|im_end|>\n"
        "<|im_start|>assistant\n",
        "img/a.png",
        "a5121d03518c9542dbd3",
    ),
    ("custom", "hierarchical", "target", "text"): (
        "<|im_start|>system\n"
        "SYS<|im_end|>\n"
        "<|im_start|>user\n"
        "a red apple <|im_end|><|im_end|>\n"
        "<|im_start|>assistant\n",
        "",
        "3d720d4837b6cf452080",
    ),
    ("custom", "hierarchical", "target", "both"): (
        "<|im_start|>system\n"
        "SYS<|im_end|>\n"
        "<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>\n"
        "Represent the given image.<|im_end|>\n"
        "<|im_start|>assistant\n",
        "img/a.png",
        "7960b84ac7df862c14a4",
    ),
    ("custom", "plain", "query", "text"): (
        "a red apple <|im_end|>",
        "",
        "a7544c7c6a34596d4a14",
    ),
    ("custom", "plain", "query", "both"): (
        "<|vision_start|><|image_pad|><|vision_end|>\nRepresent the given image.",
        "img/a.png",
        "030f792e45ec1c3215fb",
    ),
    ("custom", "plain", "target", "text"): (
        "a red apple <|im_end|>",
        "",
        "a7544c7c6a34596d4a14",
    ),
    ("custom", "plain", "target", "both"): (
        "<|vision_start|><|image_pad|><|vision_end|>\nRepresent the given image.",
        "img/a.png",
        "030f792e45ec1c3215fb",
    ),
    ("custom", "chat", "query", "text"): (
        "<|im_start|>system\n"
        "GEN<|im_end|>\n"
        "<|im_start|>user\n"
        "a red apple <|im_end|><|im_end|>\n"
        "<|im_start|>assistant\n",
        "",
        "febe68bbae3ac7542356",
    ),
    ("custom", "chat", "query", "both"): (
        "<|im_start|>system\n"
        "GEN<|im_end|>\n"
        "<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>\n"
        "Represent the given image.<|im_end|>\n"
        "<|im_start|>assistant\n",
        "img/a.png",
        "faa112ae4feaf90532c5",
    ),
    ("custom", "chat", "target", "text"): (
        "<|im_start|>system\n"
        "GEN<|im_end|>\n"
        "<|im_start|>user\n"
        "a red apple <|im_end|><|im_end|>\n"
        "<|im_start|>assistant\n",
        "",
        "febe68bbae3ac7542356",
    ),
    ("custom", "chat", "target", "both"): (
        "<|im_start|>system\n"
        "GEN<|im_end|>\n"
        "<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>\n"
        "Represent the given image.<|im_end|>\n"
        "<|im_start|>assistant\n",
        "img/a.png",
        "faa112ae4feaf90532c5",
    ),
}


def _builder(variant: str, template: Template) -> ItemBuilder:
    token, strings, literal = VARIANTS[variant]
    return ItemBuilder(template, token, strings, literal)


def test_the_table_covers_every_template_role_and_input() -> None:
    cases = {(t, r, m) for v, t, r, m in EXPECTED if v == "default"}
    assert cases == {(t, r, m) for t in TEMPLATES for r in ROLES for m in INPUTS}


@pytest.mark.parametrize("case", sorted(EXPECTED), ids="-".join)
def test_items_render_byte_for_byte_as_before(case: tuple[str, str, str, str]) -> None:
    variant, template, role, kind = case
    text, image = INPUTS[kind]
    want = EXPECTED[case]
    item = _builder(variant, template).item(text, image, role)  # type: ignore[arg-type]
    assert (item.text, item.image, item.key) == want
    assert item_key(want[0], want[1]) == want[2]
    token, strings, literal = VARIANTS[variant]
    single = make_item(
        text,
        image,
        template=template,  # type: ignore[arg-type]
        role=role,  # type: ignore[arg-type]
        image_token=token,
        strings=strings,
        literal=literal,
    )
    assert single == item


class _Backbone:
    """What `Embedder` reads of a backbone to render items."""

    def __init__(self, token: str, literal: object) -> None:
        self.token, self.literal = token, literal

    def image_token(self, wrapped: bool = False) -> str:
        return self.token

    def as_text(self, text: str) -> str:
        return self.literal(text) if callable(self.literal) else text


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("template", TEMPLATES)
def test_the_embedder_renders_as_the_stages(variant: str, template: Template) -> None:
    token, strings, literal = VARIANTS[variant]
    model = Embedder(_Backbone(token, literal), template=template, strings=strings)  # type: ignore[arg-type]
    for (v, t, role, kind), (text, image, key) in EXPECTED.items():
        if (v, t) == (variant, template):
            got = model.item(*INPUTS[kind], role)  # type: ignore[arg-type]
            assert (got.text, got.image, got.key) == (text, image, key)


@pytest.mark.parametrize("template", TEMPLATES)
def test_a_training_pair_is_a_query_and_a_target(template: Template) -> None:
    """embed and finetune: the pairs row's query in the query role, its positive a target."""
    (qt, qi), (pt, pi) = INPUTS["both"], INPUTS["text"]
    row = {"qry_text": qt, "qry_image": qi, "pos_text": pt, "pos_image": pi, "id": "x"}
    q, p = _builder("default", template).pair(row)
    assert q.key == EXPECTED["default", template, "query", "both"][2]
    assert p.key == EXPECTED["default", template, "target", "text"][2]


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize(
    ("subset", "role"), [("ImageNet-1K", "target"), ("VisualNews_Matching", "query")]
)
def test_eval_candidates_are_targets_except_in_matching_subsets(
    template: Template, subset: str, role: str
) -> None:
    kinds = ["text", "image", "both", "both_unplaced"]
    row = {
        "subset": subset,
        "qry_text": INPUTS["text"][0],
        "qry_image": INPUTS["text"][1],
        "tgt_text": [INPUTS[k][0] for k in kinds],
        "tgt_image": [INPUTS[k][1] for k in kinds],
    }
    q, cands = _builder("default", template).eval_row(row)
    assert q.key == EXPECTED["default", template, "query", "text"][2]
    assert [c.key for c in cands] == [EXPECTED["default", template, role, k][2] for k in kinds]


def test_names_are_defined_once_and_read_everywhere() -> None:
    """The template names, roles and strategies are the Literal aliases' values, and the embed
    section's prompt strings are `PromptStrings`' (same names, same defaults)."""
    assert TEMPLATES == ("hierarchical", "plain", "chat")
    assert ROLES == ("query", "target")
    assert STRATEGIES == ("saha", "topk", "topk_margin", "in_batch", "saha_oracle")
    assert STRATEGIES[:-1] == COMPARED, "the oracle bound is not a method to compare"
    assert get_args(Negatives) == ("none", *STRATEGIES)
    for name in PROMPT_STRINGS:
        assert EmbedConfig.model_fields[name].default == getattr(DEFAULT_STRINGS, name)
    for template in TEMPLATES:
        TableRow(name="r", template=template, negatives="none")
    for strategy in STRATEGIES:
        MineConfig(strategy=strategy)
        TableRow(name="r", template="plain", negatives=strategy)
    with pytest.raises(ValueError, match="'hierarchical', 'plain' or 'chat'"):
        EmbedConfig(template="fancy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'topk', 'topk_margin', 'in_batch' or 'saha_oracle'"):
        TableRow(name="r", template="plain", negatives="hard")  # type: ignore[arg-type]
