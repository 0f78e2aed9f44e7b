"""Stage `pretrain`: the tiny generator of the miniature world, built and pretrained here.

The paper's zero-shot claim rests on a generator that has learned to answer "in one word". To
check it in miniature, the tiny Qwen2-VL is first made a real (if small) generator: next-token
prediction, loss on the assistant turn only, on the world's captions, VQA answers, one-word
answers and bare texts, in the chat format with the system message varied (docs/miniature.md's mix).
Uninstructed answers open with content-free filler ("The image shows ..."), one-word
instructions get the bare word. The exact query suffixes of docs/method.md never appear, and by
default neither does the exact hierarchical system prompt (paraphrases do): zero-shot stays
zero-shot.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from embedder import world
from embedder.artifacts import json_text
from embedder.config import PretrainConfig, WorldConfig
from embedder.model.backbone import Backbone, build_tiny, save_backbone
from embedder.model.prompts import (
    GENERIC_SYSTEM,
    HIERARCHICAL_SYSTEM,
    QUERY_SUFFIX_IMAGE,
    QUERY_SUFFIX_TEXT,
    chat,
)
from embedder.outputs import Generator
from embedder.progress import Progress

log = logging.getLogger("gen2embed.pretrain")

IMAGE = "<|image_pad|>"
DESCRIBE = (
    "Describe the image.",
    "What does the image show?",
    "Give a caption for the image.",
    "Write a sentence about this picture.",
)
ONE_WORD_IMAGE = (
    "What is in the image? Answer in one word.",
    "Name the main object with a single word.",
    "Which object is this? One word.",
    "Summarize the picture in one word.",
)
ONE_WORD_TEXT = (
    "Which object does the text mention? Answer in one word.",
    "Sum up the text in one word.",
    "Name the object in the text with one word.",
)
ONE_WORD_SYSTEMS = (
    "Summarize any image or text you are given with a single word.",
    "Answer every input with one word that sums it up.",
    "Reply with one word: the main thing in the picture or the text.",
)
ONE_WORD_SUFFIX = " Answer in one word."
# Mix from docs/miniature.md (the one that worked in the prototypes).
MIX = (
    ("caption", 0.22),
    ("bare_image", 0.10),
    ("vqa", 0.26),
    ("one_word", 0.22),
    ("bare_text", 0.08),
    ("one_word_system", 0.12),
)


@dataclass(frozen=True)
class Example:
    """One chat example for the tiny generator: the system message (None: no system turn),
    the user turn (`<|image_pad|>` where the image goes), the assistant's answer (the only
    tokens with a loss) and the image (None for text only)."""

    system: str | None
    user: str
    answer: str
    image: Image.Image | None


def one_word(kind: str, s: world.Scene) -> str:
    """The one-word answer to a question of `kind` (world.QUESTION_TYPES) about `s`: the
    category name, colour, position, size, dot count as a word ("no" for none) or dot
    colour. Raises KeyError for another kind."""
    return {
        "category": s.cat.name,
        "colour": s.cat.colour,
        "position": world.POSITIONS[s.position],
        "size": world.SIZES[s.size],
        "count": world.NUMBER_WORDS[s.marks],
        "mark_colour": s.mark_colour,
    }[kind]


def text_description(s: world.Scene) -> str:
    """The filler-first answer to a bare text: "The text describes a <size> <colour> <name>
    <where>." (the dots are not mentioned)."""
    c = s.cat
    where = ("on the left", "in the centre", "on the right")[s.position]
    return f"The text describes a {world.SIZES[s.size]} {c.colour} {c.name} {where}."


def corpus_texts() -> list[str]:
    """Every kind of text the world and its prompts use: what the tokenizer is trained on.

    Includes docs/method.md's exact prompt strings (so they tokenize well; whether they
    appear in training is the ExampleStream's choice) and, for every scene spec, its
    captions, text description, questions with answers and referring expression. The same
    list, in the same order, on every call."""
    out = [
        HIERARCHICAL_SYSTEM,
        QUERY_SUFFIX_IMAGE,
        QUERY_SUFFIX_TEXT,
        GENERIC_SYSTEM,
        *DESCRIBE,
        *ONE_WORD_IMAGE,
        *ONE_WORD_TEXT,
        *ONE_WORD_SYSTEMS,
        world.CLASS_QUERY,
        world.VQA_QUERY,
        world.T2I_QUERY,
        world.T2I_TARGET,
        world.I2T_QUERY,
        world.REF_QUERY,
        world.REF_TARGET,
    ]
    for s in world.all_scenes():
        out += [world.caption(s, v) for v in range(3)] + [text_description(s)]
        for kind in world.QUESTION_TYPES:
            out += [world.question(kind, s, v) + " " + world.answer(kind, s, v) for v in (0, 1)]
        out.append(world.referring_expression(s))
    return out


class ExampleStream:
    """An endless, seeded stream of training examples drawn from fresh random scenes.

    Kinds in MIX's proportions (docs/miniature.md); images are `image_size` px squares
    rendered anew for each example. The exact hierarchical system prompt is among the
    one-word system messages only with `exact_system_prompt`; the query lines of
    docs/method.md never appear. The same seed gives the same examples."""

    def __init__(self, seed: int, image_size: int, exact_system_prompt: bool = False) -> None:
        self.rng = random.Random(seed)
        self.image_size = image_size
        self.scenes = world.all_scenes()
        self.one_word_systems = ONE_WORD_SYSTEMS + (
            (HIERARCHICAL_SYSTEM,) if exact_system_prompt else ()
        )

    def _system(self) -> str | None:
        return self.rng.choice((None, GENERIC_SYSTEM))

    def _image(self, s: world.Scene) -> Image.Image:
        return world.render(s, self.image_size, self.rng.randrange(1 << 30))

    def sample(self) -> Example:
        """The next example (advances the stream's random state)."""
        rng = self.rng
        s = rng.choice(self.scenes)
        kind = rng.choices([k for k, _ in MIX], weights=[w for _, w in MIX])[0]
        if kind == "caption":
            return Example(
                self._system(),
                f"{IMAGE}\n{rng.choice(DESCRIBE)}",
                world.caption(s, rng.randrange(3)),
                self._image(s),
            )
        if kind == "bare_image":
            return Example(
                self._system(), IMAGE, world.caption(s, rng.randrange(3)), self._image(s)
            )
        if kind == "vqa":
            q = rng.choice(world.QUESTION_TYPES)
            if q == "mark_colour" and s.marks == 0:
                q = "count"
            v = rng.randrange(2)
            if rng.random() < 0.5:
                return Example(
                    self._system(),
                    f"{IMAGE}\n{world.question(q, s, v)}",
                    world.answer(q, s, v),
                    self._image(s),
                )
            return Example(
                self._system(),
                f"{IMAGE}\n{world.question(q, s, v)}{ONE_WORD_SUFFIX}",
                one_word(q, s),
                self._image(s),
            )
        if kind == "one_word":
            if rng.random() < 0.5:
                return Example(
                    self._system(),
                    f"{IMAGE}\n{rng.choice(ONE_WORD_IMAGE)}",
                    s.cat.name,
                    self._image(s),
                )
            text = world.caption(s, rng.randrange(3))
            return Example(self._system(), f"{text}\n{rng.choice(ONE_WORD_TEXT)}", s.cat.name, None)
        if kind == "bare_text":
            return Example(
                self._system(), world.caption(s, rng.randrange(3)), text_description(s), None
            )
        system = rng.choice(self.one_word_systems)
        if rng.random() < 0.5:
            return Example(system, IMAGE, s.cat.name, self._image(s))
        # Bare labels too, so a one-word label maps to itself (docs/miniature.md: too few of these
        # made one seed's generator collapse every label onto one word).
        text = s.cat.name if rng.random() < 0.3 else world.caption(s, rng.randrange(3))
        return Example(system, text, s.cat.name, None)

    def __iter__(self) -> Iterator[Example]:
        while True:
            yield self.sample()


def collate(backbone: Backbone, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Tokenise chat-formatted examples; labels only on the assistant's answer.

    Returns the processor's tensors (input_ids and attention_mask, (batch, seq) int64,
    right-padded; pixel_values and image_grid_thw when an example has an image) plus
    `labels`, a copy of input_ids with -100 everywhere but the answer and its closing
    `<|im_end|>`. Tensors are on the CPU. Sets the shared tokenizer's padding side to
    right."""
    proc = backbone.processor
    proc.tokenizer.padding_side = "right"
    texts = [chat(e.system, e.user) + e.answer + "<|im_end|>" for e in examples]
    images = [e.image for e in examples if e.image is not None]
    inputs = dict(proc(text=texts, images=images or None, padding=True, return_tensors="pt"))
    ids = inputs["input_ids"]
    labels = ids.clone()
    im_start = proc.tokenizer.convert_tokens_to_ids("<|im_start|>")
    prefix = len(proc.tokenizer("assistant\n")["input_ids"])
    for row in range(ids.shape[0]):
        starts = (ids[row] == im_start).nonzero()
        answer_from = int(starts[-1]) + 1 + prefix
        labels[row, :answer_from] = -100
    labels[inputs["attention_mask"] == 0] = -100
    inputs["labels"] = labels
    return inputs


@dataclass
class PretrainResult:
    """What `pretrain` did: `losses`, [(step, mean loss over the steps since the previous
    entry)] every `log_every` steps and at the last; `seconds` of wall clock; `steps`."""

    losses: list[tuple[int, float]]
    seconds: float
    steps: int


def pretrain(
    backbone: Backbone, cfg: PretrainConfig, *, image_size: int, log_every: int = 25
) -> PretrainResult:
    """Next-token pretraining on the world's text, loss on the assistant turn only.

    Trains `backbone.model` in place (left in eval mode) for `cfg.steps` steps of
    `cfg.batch_size` ExampleStream examples of `image_size` px: AdamW (weight decay 0.01,
    betas 0.9/0.98), `cfg.lr` after a linear warm-up of `cfg.warmup` steps, then a cosine
    decay to 5% of it; gradient norm clipped to 1. Seeded by `cfg.seed`. Batches stay on
    the CPU, so the backbone must be a CPU one (the tiny generator). Shows a progress bar
    (embedder.progress)."""
    steps, warmup = cfg.steps, cfg.warmup
    torch.manual_seed(cfg.seed)
    model = backbone.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    stream = iter(ExampleStream(cfg.seed, image_size, cfg.exact_system_prompt))
    losses: list[tuple[int, float]] = []
    started = time.perf_counter()
    running = 0.0
    bar = Progress("pretrain", steps, unit="step")
    for step in range(steps):
        batch = collate(backbone, [next(stream) for _ in range(cfg.batch_size)])
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running += float(loss.detach())
        bar.update(1)
        if (step + 1) % log_every == 0 or step == steps - 1:
            n = (step % log_every) + 1
            losses.append((step + 1, running / n))
            log.info(
                "pretrain step %d/%d loss %.3f (%.0fs)",
                step + 1,
                steps,
                running / n,
                time.perf_counter() - started,
            )
            running = 0.0
    bar.close()
    model.eval()
    return PretrainResult(losses, time.perf_counter() - started, steps)


def _first_word(text: str) -> str:
    words = text.strip().split()
    return words[0].strip(".,!?;:").lower() if words else ""


def generate_answers(
    backbone: Backbone, examples: list[Example], max_new_tokens: int = 4
) -> list[str]:
    """Greedy answers of the generator to each example's prompt (its `answer` is not used):
    at most `max_new_tokens` new tokens each, decoded without special tokens, in input
    order. Inputs stay on the CPU (a CPU backbone, as the tiny generator). Sets the shared
    tokenizer's padding side to left."""
    proc = backbone.processor
    proc.tokenizer.padding_side = "left"
    texts = [chat(e.system, e.user) for e in examples]
    images = [e.image for e in examples if e.image is not None]
    inputs = proc(text=texts, images=images or None, padding=True, return_tensors="pt")
    with torch.inference_mode():
        out = backbone.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=proc.tokenizer.pad_token_id,
        )
    new = out[:, inputs["input_ids"].shape[1] :]
    return proc.tokenizer.batch_decode(new, skip_special_tokens=True)


def vqa_accuracy(
    backbone: Backbone, *, per_type: int, seed: int, image_size: int, batch_size: int = 32
) -> dict[str, float]:
    """Held-out accuracy of one-word answers, by question type, on fresh random scenes;
    plus one-word category naming from an image and from a caption.

    Keys: world.QUESTION_TYPES (the "category" one names the object from an image) and
    "text_one_word" (from a caption); values 0..1 over `per_type` cases each, an answer
    counting when its first word (lower-cased, punctuation stripped) is the expected word.
    Scenes are drawn with `seed`, images of `image_size` px, generated `batch_size` at a
    time (`generate_answers`)."""
    rng = random.Random(seed + 104729)
    scenes = world.all_scenes()
    cases: dict[str, list[tuple[Example, str]]] = {}
    for kind in world.QUESTION_TYPES:
        for _ in range(per_type):
            s = rng.choice([x for x in scenes if x.marks] if kind == "mark_colour" else scenes)
            img = world.render(s, image_size, rng.randrange(1 << 30))
            ex = Example(None, f"{IMAGE}\n{world.question(kind, s)}{ONE_WORD_SUFFIX}", "", img)
            cases.setdefault(kind, []).append((ex, one_word(kind, s)))
    for _ in range(per_type):
        s = rng.choice(scenes)
        text = world.caption(s, rng.randrange(3))
        cases.setdefault("text_one_word", []).append(
            (Example(None, f"{text}\n{ONE_WORD_TEXT[0]}", "", None), s.cat.name)
        )
    accuracy = {}
    for kind, pairs in cases.items():
        hits = 0
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            answers = generate_answers(backbone, [e for e, _ in chunk])
            hits += sum(_first_word(a) == want for a, (_, want) in zip(answers, chunk, strict=True))
        accuracy[kind] = hits / len(pairs)
    return accuracy


def pretrain_generator(cfg: PretrainConfig, world_cfg: WorldConfig, out: Path) -> Generator:
    """Tokenizer + random tiny Qwen2-VL, next-token pretraining, held-out VQA accuracy; the
    model is saved to `out/model` and loads offline with `load_backbone`. The world's
    section gives the image size the generator is built for.

    The `pretrain` stage. Writes under `out`: model/ (transformers' save_pretrained of the
    model and processor: config, safetensors weights, tokenizer and image processor files)
    and loss.json ([[step, mean loss since the previous entry], ...]). Metrics: parameters,
    seconds (wall clock), first_loss, final_loss, vqa_acc.<kind> after and
    vqa_acc_before.<kind> before pretraining (`vqa_accuracy`), and ready (1.0 when held-out
    category and position accuracy both reach 0.8, docs/miniature.md); a generator that is
    not ready is a warning in the output's info, not an error. Runs on the CPU. Raises
    OSError when a file cannot be written; torch's errors pass unchanged."""
    image_size = world_cfg.image_size
    backbone = build_tiny(corpus_texts(), cfg, image_size=image_size)
    params = sum(x.numel() for x in backbone.model.parameters())
    before = vqa_accuracy(
        backbone, per_type=min(cfg.eval_per_type, 16), seed=cfg.seed, image_size=image_size
    )
    result = pretrain(backbone, cfg, image_size=image_size)
    accuracy = vqa_accuracy(
        backbone, per_type=cfg.eval_per_type, seed=cfg.seed, image_size=image_size
    )
    save_backbone(backbone, Generator(folder=out).model_dir)
    (out / "loss.json").write_text(json_text(result.losses))
    ready = accuracy["category"] >= 0.8 and accuracy["position"] >= 0.8
    summary = [
        "Tiny generator: held-out one-word VQA accuracy by question type "
        f"({cfg.eval_per_type} each; chance ~1/12 category and colour, 1/3 position)"
    ]
    summary += [
        f"  {k:14s} {v:.2f}   (before pretraining {before[k]:.2f})" for k, v in accuracy.items()
    ]
    summary.append(
        f"  ready (category and position >= 0.8): {'yes' if ready else 'NO'}; "
        f"{cfg.steps} steps in {result.seconds:.0f}s, final loss {result.losses[-1][1]:.3f}"
    )
    log.info("\n".join(summary))
    warnings = []
    if not ready:
        warnings.append(
            f"the tiny generator is not ready (held-out category {accuracy['category']:.2f}, "
            f"position {accuracy['position']:.2f}; docs/miniature.md asks >= 0.8 for both): the "
            "zero-shot and mining numbers rest on an undertrained generator"
        )
    return Generator(
        folder=out,
        metrics={
            "parameters": params,
            "seconds": result.seconds,
            "final_loss": result.losses[-1][1],
            "first_loss": result.losses[0][1],
            **{f"vqa_acc.{k}": v for k, v in accuracy.items()},
            **{f"vqa_acc_before.{k}": v for k, v in before.items()},
            "ready": float(ready),
        },
        info={"summary": summary, "losses": result.losses, "warnings": warnings},
    )
