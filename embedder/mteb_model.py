"""The embedder as an `mteb` model: run `mteb.evaluate` (MTEB, and MIEB's image-text tasks,
the benchmarks that follow MMEB) on a base model (zero-shot) or a base plus a trained adapter.

    import mteb
    from embedder.mteb_model import MtebEmbedder

    model = MtebEmbedder.load("Qwen/Qwen2-VL-2B-Instruct", adapter="run/finetune/<fp>/adapter")
    results = mteb.evaluate(model, mteb.get_tasks(tasks=["CIRRIT2IRetrieval"]))

It needs the optional `mteb` extra (`pip install -e '.[mteb]'`); nothing else in `embedder`
imports this module. `MtebEmbedder` is mteb's `EncoderProtocol` (an `AbsEncoder`) over
`embedder.inference.Embedder`, so an input gets the vector `Embedder.encode` gives it:

- roles: mteb's `PromptType.query` is the embedder's `query` role, `PromptType.document` its
  `target` role (MMEB's candidates). Inputs mteb gives no prompt type (classification,
  clustering, STS: both sides alike) take `role_without_prompt_type`, `query` by default.
- inputs: a batch's `text` and `image` columns (either or both; images are PIL images) are
  paired 1:1 as `Embedder.encode` pairs them. mteb has already folded a document's title and a
  query's instruction column into `text`. Audio and video are refused.
- instructions (MMEB puts a task instruction before each query): none by default. `instructions`
  maps mteb prompt keys to instructions, looked up as mteb looks up model prompts
  (`{task}-{query|document}`, `{task}`, `{task type}-{query|document}`, `{task type}`,
  `query`/`document`, first found). With `task_prompts=True`, a task the map does not name
  uses the prompt in its own metadata (many MIEB tasks carry MMEB's instruction there): a
  per-side dict as given, a plain string for queries (and inputs without a prompt type) only,
  since MMEB's candidates carry no instruction.
- one `encode` call goes through the engine in one pass (identical inputs embedded once,
  length-sorted batches of `settings.batch_size`); mteb's `batch_size` only sets how its
  DataLoader is read. `show_progress_bar` turns on the engine's progress.

The model's `ModelMeta` (`mteb_model_meta`) names it `gen2embed/<base>-<template>` (plus
`-adapter` when `load` merged one) and gives, as its revision, a digest of what makes its
vectors: every weight (adapter merged) and the prompt and image settings. mteb files results
under name and revision, so a retrained adapter never reads an older one's cached scores.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from mteb.models.abs_encoder import AbsEncoder, get_prompt_name
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

from embedder.config import EmbedConfig
from embedder.datasets.sources import text_problem
from embedder.inference import Embedder, EmbedderError
from embedder.model.backbone import text_config
from embedder.model.encode import EmbedItem
from embedder.model.prompts import PROMPT_STRINGS, ROLES, Role

if TYPE_CHECKING:
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.types import BatchedInput, EncodeKwargs
    from torch.utils.data import DataLoader
    from typing_extensions import Unpack

NAME_PREFIX = "gen2embed"
# The batch columns this model reads; any other modality in a batch is refused.
_READ = ("text", "image")
_REFUSED = ("audio", "video")
# Engine settings that change the vectors (the others, batch size and workers, do not).
_VECTOR_SETTINGS = ("image_mode", "image_side", "max_pixels", "out_dtype", "padding_side")


def weights_digest(embedder: Embedder) -> str:
    """16 hex characters naming the vectors `embedder` makes: every tensor of its state dict
    (name, dtype, shape, bytes) with the adapter merged, its template, prompt strings, image
    token, and the engine settings that change vectors (image rules, output dtype, padding).
    Reads every weight once: about 2 s per GB on one CPU core (~10 s for a 2B model in bf16),
    which `revision=` skips."""
    h = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(embedder.backbone.model.state_dict().items()):
        t = tensor.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        flat = t.reshape(-1).contiguous().cpu()
        h.update(flat.view(torch.uint8).numpy())
    prompt = {
        "template": embedder.template,
        "image_token": embedder.image_token,
        "strings": {k: getattr(embedder.strings, k) for k in PROMPT_STRINGS},
        "settings": {k: getattr(embedder.settings, k) for k in _VECTOR_SETTINGS},
    }
    h.update(json.dumps(prompt, sort_keys=True).encode())
    return h.hexdigest()


def _short_name(source: str) -> str:
    """The last part of a hub id or folder (`Qwen/Qwen2-VL-2B` -> `Qwen2-VL-2B`)."""
    return Path(source.rstrip("/")).name or source


class MtebEmbedder(AbsEncoder):
    """mteb's encoder protocol over an `Embedder`; see the module docstring for how mteb's
    inputs, prompt types and instructions become the embedder's.

    `encode` returns float32 unit vectors, shape (N, D) with D = `Embedder.dimension`, row i
    for the i-th input the DataLoader yields; `similarity` is cosine (mteb's `cos_sim`)."""

    def __init__(
        self,
        embedder: Embedder,
        *,
        name: str | None = None,
        revision: str | None = None,
        instructions: Mapping[str, str] | None = None,
        task_prompts: bool = False,
        role_without_prompt_type: Role = "query",
        meta_fields: Mapping[str, Any] | None = None,
    ) -> None:
        """Wrap a loaded `embedder`. `name` (`org/model`) defaults to
        `gen2embed/<base>-<template>`: pass one when you merged an adapter yourself (the
        revision tells models apart either way). `revision` defaults to `weights_digest`.
        `meta_fields` sets or overrides any `ModelMeta` field (license, languages,
        training_datasets, ...), validated by mteb. Raises EmbedderError (a role that is not
        query/target, an instruction the embedder cannot read), pydantic's ValidationError (a
        bad ModelMeta field)."""
        if role_without_prompt_type not in ROLES:
            raise EmbedderError(
                f"role_without_prompt_type={role_without_prompt_type!r}: query or target"
            )
        for key, value in (instructions or {}).items():
            problem = text_problem(value, f"instruction {key!r}")
            if problem:
                raise EmbedderError(problem)
        self.embedder = embedder
        self.model = embedder
        self.instructions = dict(instructions or {})
        self.task_prompts = task_prompts
        self.role_without_prompt_type: Role = role_without_prompt_type
        default = f"{NAME_PREFIX}/{_short_name(embedder.backbone.source)}-{embedder.template}"
        self.mteb_model_meta = self.build_meta(
            name=name or default,
            revision=revision or weights_digest(embedder),
            meta_fields=meta_fields,
        )

    @classmethod
    def load(
        cls,
        base: str | Path,
        adapter: str | Path | None = None,
        *,
        template: str | None = None,
        settings: EmbedConfig | None = None,
        device: str = "auto",
        dtype: str = "auto",
        base_revision: str | None = None,
        name: str | None = None,
        instructions: Mapping[str, str] | None = None,
        task_prompts: bool = False,
        role_without_prompt_type: Role = "query",
        meta_fields: Mapping[str, Any] | None = None,
    ) -> MtebEmbedder:
        """`Embedder.load(base, adapter, ...)` (same arguments; `base_revision` is the base's
        hub revision) wrapped for mteb. The name defaults to `gen2embed/<base>-<template>`,
        with `-adapter` when one is merged; the revision is `weights_digest`. The ModelMeta's
        loader rebuilds this model (`mteb_model_meta.load_model()`, mteb's CLI path). Raises
        what `Embedder.load` raises (AdapterError, EmbedderError) and what `__init__` does."""
        embedder = Embedder.load(
            base,
            adapter,
            template=template,
            settings=settings,
            device=device,
            dtype=dtype,
            revision=base_revision,
        )
        default = f"{NAME_PREFIX}/{_short_name(str(base))}-{embedder.template}"
        loader_kwargs = {
            "base": str(base),
            "adapter": None if adapter is None else str(adapter),
            "template": template,
            "settings": settings,
            "device": device,
            "dtype": dtype,
            "base_revision": base_revision,
            "instructions": dict(instructions or {}),
            "task_prompts": task_prompts,
            "role_without_prompt_type": role_without_prompt_type,
        }
        return cls(
            embedder,
            name=name or (default if adapter is None else f"{default}-adapter"),
            instructions=instructions,
            task_prompts=task_prompts,
            role_without_prompt_type=role_without_prompt_type,
            meta_fields={
                "loader": load_mteb_model,
                "loader_kwargs": loader_kwargs,
                **(meta_fields or {}),
            },
        )

    def build_meta(
        self, *, name: str, revision: str, meta_fields: Mapping[str, Any] | None = None
    ) -> ModelMeta:
        """This model's ModelMeta: what is known of it, None where it is not (release date,
        languages, license, training data: they are the base's and the adapter's, pass them in
        `meta_fields`).

        Counts: n_parameters (every parameter, adapter merged), memory_usage_mb (MiB of the
        weights as loaded), max_tokens (the language model's max_position_embeddings),
        embed_dim D; similarity cosine. `meta_fields` override any of them. Raises pydantic's
        ValidationError (a ValueError) for fields mteb does not accept."""
        model = self.embedder.backbone.model
        params = list(model.parameters())
        max_tokens = getattr(text_config(model.config), "max_position_embeddings", None)
        fields: dict[str, Any] = {
            "loader": None,
            "name": name,
            "revision": revision,
            "release_date": None,
            "languages": None,
            "n_parameters": sum(p.numel() for p in params),
            "memory_usage_mb": round(sum(p.numel() * p.element_size() for p in params) / 2**20, 1),
            "max_tokens": None if max_tokens is None else float(max_tokens),
            "embed_dim": self.embedder.dimension,
            "license": None,
            "open_weights": None,
            "public_training_code": None,
            "public_training_data": None,
            "framework": ["PyTorch", "Transformers"],
            "similarity_fn_name": ScoringFunction.COSINE,
            # The template's role prompts are a required input format, as mteb counts it.
            "use_instructions": True,
            "training_datasets": None,
            "adapted_from": self.embedder.backbone.source,
            "modalities": ["text", "image"],
            "model_type": ["dense"],
        }
        fields.update(meta_fields or {})
        return ModelMeta(**fields)

    def role_for(self, prompt_type: PromptType | str | None) -> Role:
        """The embedder's role for mteb's prompt type: query -> query, document -> target,
        None -> `role_without_prompt_type`. Raises ValueError for a string that is not a
        PromptType value."""
        if prompt_type is None:
            return self.role_without_prompt_type
        return "query" if PromptType(prompt_type) is PromptType.query else "target"

    def instruction_for(
        self, task_metadata: TaskMetadata, prompt_type: PromptType | str | None
    ) -> str | None:
        """The instruction put before every input of this task and side (None for none): the
        `instructions` map first (mteb's prompt-key order), then, with `task_prompts`, the
        task's own prompt (a dict per side; a string for queries and untyped inputs only).

        An empty instruction in the map means none. Raises EmbedderError (a UserError) when
        the task's own prompt is text the embedder cannot read (ingest's text rules)."""
        kind = None if prompt_type is None else PromptType(prompt_type)
        key = get_prompt_name(self.instructions or None, task_metadata, kind)
        if key is not None:
            return self.instructions[key] or None
        if not self.task_prompts:
            return None
        prompt = task_metadata.prompt
        if isinstance(prompt, Mapping):
            found = prompt.get(kind.value) if kind is not None else None
        else:
            found = prompt if kind is not PromptType.document else None
        if found:
            problem = text_problem(found, f"task {task_metadata.name}'s prompt")
            if problem:
                raise EmbedderError(problem)
        return found or None

    def encode(
        self,
        inputs: DataLoader[BatchedInput],
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Unpack[EncodeKwargs],
    ) -> np.ndarray:
        """float32 unit vectors, shape (N, D), row i for the i-th input of `inputs` (batches
        of `text` and/or `image` columns, PIL images). `prompt_type` picks the role and, with
        `task_metadata`, the instruction; `hf_split`/`hf_subset` are not used. Raises
        EmbedderError (an audio or video column, an input with neither text nor image,
        unequal text and image columns, an unreadable image or text)."""
        role = self.role_for(prompt_type)
        instruction = self.instruction_for(task_metadata, prompt_type)
        progress = bool(kwargs.get("show_progress_bar", False))
        with tempfile.TemporaryDirectory(prefix="gen2embed-mteb-") as tmp:
            root = Path("/")
            scratch = Path(tmp) / "images"
            scratch.mkdir()
            items: list[EmbedItem] = []
            for batch in inputs:
                texts, images = _columns(batch)
                items += self.embedder.items(
                    texts,
                    images,
                    role=role,
                    instruction=instruction,
                    images_root=root,
                    scratch=scratch,
                )
            if not items:
                return np.zeros((0, self.embedder.dimension), dtype=np.float32)
            return self.embedder.embed_items(items, root, Path(tmp) / "vectors", progress=progress)


def _columns(batch: Mapping[str, Any]) -> tuple[list[Any] | None, list[Any] | None]:
    """The text and image columns of one collated batch (None where absent)."""
    refused = [k for k in _REFUSED if k in batch]
    if refused:
        raise EmbedderError(
            f"gen2embed embeds text and images; this batch has {', '.join(refused)}"
        )
    if not any(k in batch for k in _READ):
        raise EmbedderError(
            f"a batch with neither text nor image (columns: {', '.join(map(str, batch))})"
        )
    texts = list(batch["text"]) if "text" in batch else None
    images = list(batch["image"]) if "image" in batch else None
    return texts, images


def load_mteb_model(
    model_name: str,
    revision: str | None = None,
    *,
    base: str,
    adapter: str | None = None,
    template: str | None = None,
    settings: EmbedConfig | None = None,
    device: str | None = "auto",
    dtype: str = "auto",
    base_revision: str | None = None,
    instructions: Mapping[str, str] | None = None,
    task_prompts: bool = False,
    role_without_prompt_type: Role = "query",
    **_: Any,
) -> MtebEmbedder:
    """The ModelMeta loader (mteb calls `loader(name, revision=..., **loader_kwargs)`):
    `MtebEmbedder.load` again. Raises EmbedderError when `revision` is given and the files no
    longer make the vectors it names (a changed adapter or base)."""
    model = MtebEmbedder.load(
        base,
        adapter,
        template=template,
        settings=settings,
        device=device or "auto",
        dtype=dtype,
        base_revision=base_revision,
        name=model_name,
        instructions=instructions,
        task_prompts=task_prompts,
        role_without_prompt_type=role_without_prompt_type,
    )
    found = model.mteb_model_meta.revision
    if revision is not None and found != revision:
        raise EmbedderError(
            f"{model_name}: revision {revision} was asked for but {base}"
            + (f" + {adapter}" if adapter else "")
            + f" now give revision {found} (the files changed since)"
        )
    return model
