"""Prompt templates that turn an MMEB text (+ image) into the string the backbone reads.

`hierarchical` is the paper's zero-shot embedding prompt (docs/method.md section 2): a system
instruction asking for a one-word summary, the example's own text as the user turn, one more
line for queries, and the generation prompt, so the final token is where the model would
start its one-word answer. `plain` is the raw text (VLM2Vec V1 style); `chat` is the chat
template with a generic system message and no embedding instruction, the ablation that
separates the template's effect from the instruction's.

This module is the one home of the templates' vocabulary: their names (`Template`,
`TEMPLATES`), the roles an item plays (`Role`, `ROLES`) and the strings the templates add
(`PromptStrings`, whose defaults are docs/method.md's exact text). It imports nothing from
the project, so the config (whose embed section carries the strings as settings), the
stages, the command line and the Prefect forms all take them from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Literal, get_args

MMEB_IMAGE_PLACEHOLDER = "<|image_1|>"
HIERARCHICAL_SYSTEM = (
    "Given an image, summarize the provided image in one word. "
    "Given only text, describe the text in one word."
)
QUERY_SUFFIX_IMAGE = "\nRepresent the given text/image in one word."
QUERY_SUFFIX_TEXT = "\nRepresent the given text in one word."
GENERIC_SYSTEM = "You are a helpful assistant."
# What a caption reads before it in SugarCrepe and SugarCrepe++ (the authors' evaluation
# scripts; docs/method.md section 8): data-side text, like MMEB's instructions, whatever the
# template. The image side has no text.
CAPTION_PROMPT = "Find me an image that matches the given caption: "

# typing.Literal aliases, so pydantic validates them and Prefect's forms show them as enums;
# the tuples (argparse choices, messages) are read off the aliases.
Template = Literal["hierarchical", "plain", "chat"]
TEMPLATES: tuple[Template, ...] = get_args(Template)
Role = Literal["query", "target"]
ROLES: tuple[Role, ...] = get_args(Role)


@dataclass(frozen=True)
class PromptStrings:
    """The strings the templates put around an example. `render` reads these four attributes
    from whatever it is given: the embed section (`embedder.config.EmbedConfig`, whose
    fields of the same names default to these) or an adapter's record of them."""

    system: str = HIERARCHICAL_SYSTEM
    query_suffix_image: str = QUERY_SUFFIX_IMAGE
    query_suffix_text: str = QUERY_SUFFIX_TEXT
    generic_system: str = GENERIC_SYSTEM


DEFAULT_STRINGS = PromptStrings()
# Their names: what an adapter's record and a model's digest copy from the embed section.
PROMPT_STRINGS: tuple[str, ...] = tuple(f.name for f in fields(PromptStrings))


def chat(system: str | None, user: str) -> str:
    """Qwen2-VL's chat format with the generation prompt added.

    The string of docs/method.md section 2 (a system turn, the user turn, then
    `<|im_start|>assistant` and a newline), so it ends where the answer would start.
    `system` None: no system turn at all (not Qwen's default one). Nothing in `user` is
    escaped: mark data text with `Backbone.as_text` first."""
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
    return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def render(
    template: str,
    text: str,
    *,
    has_image: bool,
    role: Role,
    image_token: str,
    strings: PromptStrings | None = None,
    literal: Callable[[str], str] | None = None,
) -> str:
    """The full input string for one example.

    `image_token` replaces MMEB's `<|image_1|>` placeholder (Qwen2-VL: `<|image_pad|>`, which
    the processor expands to the image's patch tokens). An image without a placeholder in the
    text gets the token prepended, so the image is never silently dropped. The strings come
    from `strings` (any object with `PromptStrings`' attributes: the embed section), else
    docs/method.md's exact text.

    `literal` (the backbone's `Backbone.as_text`) is applied to the example's own text, the
    data, and never to the template: a special-token string in the data (a question about
    prompt formats that mentions `<|image_pad|>` or `<|im_end|>`) is then read as ordinary
    text, while the template's own tokens stay control tokens.

    Only the first `<|image_1|>` is replaced; without an image the text is kept as it is,
    placeholder included. `role`: only `hierarchical` queries get a line (the image or the
    text suffix); targets and the other templates get none. Raises ValueError for a
    `template` that is not one of TEMPLATES.
    """
    lit = literal or (lambda piece: piece)
    if has_image:
        if MMEB_IMAGE_PLACEHOLDER in text:
            before, _, after = text.partition(MMEB_IMAGE_PLACEHOLDER)
            text = f"{lit(before)}{image_token}{lit(after)}"
        else:
            text = f"{image_token}\n{lit(text)}" if text else image_token
    else:
        text = lit(text)
    if template == "plain":
        return text
    if strings is None:
        strings = DEFAULT_STRINGS
    if template == "chat":
        return chat(strings.generic_system, text)
    if template == "hierarchical":
        if role == "query":
            text += strings.query_suffix_image if has_image else strings.query_suffix_text
        return chat(strings.system, text)
    raise ValueError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
