"""Rendered prompts equal docs/method.md's strings character for character."""

import pytest

from embedder.model.prompts import render

SYSTEM = (
    "Given an image, summarize the provided image in one word. "
    "Given only text, describe the text in one word."
)


def test_query_with_image() -> None:
    got = render(
        "hierarchical",
        "<|image_1|>\nRepresent the given image for classification",
        has_image=True,
        role="query",
        image_token="<|image_pad|>",
    )
    assert got == (
        "<|im_start|>system\n" + SYSTEM + "<|im_end|>\n"
        "<|im_start|>user\n<|image_pad|>\nRepresent the given image for classification"
        "\nRepresent the given text/image in one word.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_query_text_only() -> None:
    got = render(
        "hierarchical",
        "Find me an everyday image that matches the given caption: A dog.",
        has_image=False,
        role="query",
        image_token="<|image_pad|>",
    )
    assert got == (
        "<|im_start|>system\n" + SYSTEM + "<|im_end|>\n"
        "<|im_start|>user\nFind me an everyday image that matches the given caption: A dog."
        "\nRepresent the given text in one word.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_target_gets_no_suffix() -> None:
    got = render(
        "hierarchical",
        "<|image_1|>\nRepresent the given image.",
        has_image=True,
        role="target",
        image_token="<|image_pad|>",
    )
    assert got == (
        "<|im_start|>system\n" + SYSTEM + "<|im_end|>\n"
        "<|im_start|>user\n<|image_pad|>\nRepresent the given image.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert (
        render(
            "hierarchical", "apple", has_image=False, role="target", image_token="<|image_pad|>"
        ).count("one word")
        == 2
    )  # only the system's


def test_plain_chat_and_wrapped_image_token() -> None:
    wrapped = "<|vision_start|><|image_pad|><|vision_end|>"
    assert (
        render("plain", "<|image_1|>\nq", has_image=True, role="query", image_token=wrapped)
        == f"{wrapped}\nq"
    )
    assert render("chat", "q", has_image=False, role="query", image_token="x") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    )
    # An image whose text has no placeholder still gets its token.
    assert render("plain", "", has_image=True, role="target", image_token="<I>") == "<I>"
    with pytest.raises(ValueError, match="unknown template"):
        render("fancy", "q", has_image=False, role="query", image_token="x")
