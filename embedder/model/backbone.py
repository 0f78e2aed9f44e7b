"""Backbones: load a Qwen-VL-family generator and its processor, or build the tiny one.

What differs between model families (the image token, the model class, how to reach the last
hidden state) sits behind `FamilyAdapter`; adding a family (LLaVA-Next, Phi-3.5-V) is one
subclass and one entry in `ADAPTERS`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel, Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin
from transformers.utils.chat_template_utils import mark_control_tokens

from embedder.config import PretrainConfig
from embedder.errors import UserError

log = logging.getLogger("gen2embed.backbone")

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


class ImageOnlyQwenVLProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor without the video processor.

    The stock one builds a video processor that needs torchvision, which does not import
    beside the CPU torch here; images are all an embedder needs. (AutoProcessor, on failing,
    silently returns only the tokenizer, so the loader uses this class explicitly.)
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: Any = None,
        **_: Any,
    ) -> None:
        self.image_token = "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class FamilyAdapter:
    """Qwen2-VL and its successors share the chat format and the `<|image_pad|>` token.

    The family's knowledge: the image token in its bare form (the authors', the default)
    and wrapped in `<|vision_start|>`/`<|vision_end|>` (docs/method.md section 2), the model
    class per config `model_type`, the module paths of the language model and vision tower
    (where LoRA goes, docs/method.md section 4) and how older transformers named them
    (section 7)."""

    model_types: tuple[str, ...] = ("qwen2_vl",)
    image_token = "<|image_pad|>"
    wrapped_image_token = "<|vision_start|><|image_pad|><|vision_end|>"
    # Module paths in the loaded model (`named_modules()` names, no trailing dot). LoRA goes
    # under `language_model` only (docs/method.md section 4), resolved by path because name
    # suffixes alone also hit the vision tower on some families (Qwen2.5-VL's vision MLP has
    # gate/up/down_proj). transformers 5 lays out Qwen2-VL, Qwen2.5-VL and Qwen3-VL alike;
    # a family with another layout overrides these.
    language_model = "model.language_model"
    vision = "model.visual"
    # Module paths of older transformers (4.x before 4.52: `visual.*`, `model.layers.*`,
    # `model.embed_tokens`, `model.norm`), as adapters trained then name their weights (the
    # paper authors' among them), each (regex, replacement) mapped to today's. The rules
    # transformers itself applies to old checkpoints of these classes; today's names match
    # none of them, so mapping is safe on any key.
    legacy_paths: tuple[tuple[str, str], ...] = (
        (r"^visual\.", "model.visual."),
        (r"^model\.(?!language_model\.|visual\.)", "model.language_model."),
    )

    @property
    def components(self) -> dict[str, str]:
        """Component name -> module path, for the manifest's LoRA counts per component."""
        return {"language_model": self.language_model, "vision": self.vision}

    def current_name(self, name: str) -> str:
        """A module path (or a parameter name under one) as an older transformers named it,
        as the loaded model names it (`legacy_paths`; the first rule that matches)."""
        for pattern, replacement in self.legacy_paths:
            renamed, n = re.subn(pattern, replacement, name, count=1)
            if n:
                return renamed
        return name

    def model_class(self, model_type: str) -> type[PreTrainedModel]:
        """transformers' generation class for a config's `model_type` (qwen2_vl, qwen2_5_vl,
        qwen3_vl). Raises KeyError for any other type."""
        import transformers

        names = {
            "qwen2_vl": "Qwen2VLForConditionalGeneration",
            "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
            "qwen3_vl": "Qwen3VLForConditionalGeneration",
        }
        return getattr(transformers, names[model_type])

    def load_processor(self, path: str, **kwargs: Any) -> ProcessorMixin:
        """The processor (tokenizer and image processor) of the model at `path` (a hub id or
        a folder); `kwargs` go to `from_pretrained` (revision, trust_remote_code). When
        AutoProcessor fails or gives no image processor, `ImageOnlyQwenVLProcessor` is
        loaded instead; its errors (OSError for files it cannot find) are let through."""
        from transformers import AutoProcessor

        try:
            proc = AutoProcessor.from_pretrained(path, **kwargs)
        except (ImportError, ValueError, OSError) as exc:
            log.info("AutoProcessor failed (%s); loading the image-only processor", exc)
            proc = None
        if not isinstance(proc, ProcessorMixin) or getattr(proc, "image_processor", None) is None:
            proc = ImageOnlyQwenVLProcessor.from_pretrained(path, **kwargs)
        return proc

    def last_hidden_state(self, model: PreTrainedModel, inputs: dict[str, Any]) -> torch.Tensor:
        """Last layer's hidden states, without computing the LM head over the vocabulary.

        `inputs`: the processor's output (input_ids, attention_mask, and pixel_values with
        image_grid_thw for images), on the model's device. Returns a (batch, seq, hidden)
        tensor on that device, in the model's compute dtype; no pooling, no normalising."""
        return model.model(**inputs, use_cache=False).last_hidden_state


class Qwen25VLAdapter(FamilyAdapter):
    """Qwen2.5-VL: Qwen2-VL's chat format, image token and module layout; its vision MLP
    also has gate/up/down_proj layers (why LoRA targets are resolved by path)."""

    model_types = ("qwen2_5_vl",)


class Qwen3VLAdapter(FamilyAdapter):
    """Qwen3-VL: the same format and layout, with no older module names to map."""

    model_types = ("qwen3_vl",)
    # Added to transformers in today's layout: no older names to map.
    legacy_paths = ()


ADAPTERS: dict[str, FamilyAdapter] = {
    t: a for a in (FamilyAdapter(), Qwen25VLAdapter(), Qwen3VLAdapter()) for t in a.model_types
}


@dataclass
class Backbone:
    """A loaded generator: `model` (in eval mode, on `device`, weights in `dtype`), its
    `processor` (tokenizer and image processor), the family `adapter` and `source`, the hub
    id or folder it was loaded from ("tiny" for the tiny generator)."""

    model: PreTrainedModel
    processor: ProcessorMixin
    adapter: FamilyAdapter
    device: torch.device
    dtype: torch.dtype
    source: str

    def image_token(self, wrapped: bool = False) -> str:
        """The string that stands for an image in a prompt: `<|image_pad|>` (the authors'
        form), or wrapped in `<|vision_start|>`/`<|vision_end|>` (docs/method.md
        section 2); the processor expands it to the image's patch tokens."""
        return self.adapter.wrapped_image_token if wrapped else self.adapter.image_token

    @cached_property
    def _added_tokens(self) -> re.Pattern[str]:
        # Every added token (special or not): longest first, so `<|image_pad|>` is never read
        # as a shorter token it contains.
        tokens = sorted(self.processor.tokenizer.added_tokens_encoder, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, tokens)) or "(?!)")

    def as_text(self, text: str) -> str:
        """`text` from the data, with every added-token string in it (`<|im_end|>`,
        `<|image_pad|>`, ...) marked so that the processor encodes it as plain text and never
        as a control token or an image placeholder.

        This is transformers' own mechanism for user text inside chat templates
        (`mark_control_tokens`, read back by `processor(..., sanitize_control_tokens=True)`,
        which `embedder.model.encode.process_items` passes); a text without such strings is
        returned unchanged, so its tokens are exactly those of a plain tokenization."""
        return mark_control_tokens(text, self._added_tokens)


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The language model's part of a model config: `text_config` of a vision-language
    config (Qwen2-VL and the tiny generator nest it), else the config itself."""
    return getattr(config, "text_config", None) or config


def pick_device(device: str = "auto") -> torch.device:
    """`auto`: cuda when torch sees a GPU, else cpu; anything else as torch reads it
    ("cpu", "cuda:1", ...). Raises RuntimeError for a string torch cannot read; a valid
    device that is absent fails later, when a tensor is moved there."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """bf16 on GPU, float32 on CPU, unless asked otherwise (`float32`, `bfloat16`,
    `float16`). Raises KeyError for any other name."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def pick_attention(attn: str, device: torch.device) -> str:
    """flash-attention when installed and on GPU, else SDPA; an `attn` other than `auto`
    is returned as given (transformers' `attn_implementation` names)."""
    if attn != "auto":
        return attn
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


class UnsafeWeightsError(UserError, OSError):
    """A model with no safetensors weights: pickled weights are refused (loading a pickle
    can run code)."""


class NotAModelError(UserError, ValueError):
    """A peft adapter given where a model is expected."""


def _not_an_adapter(source: str, model: PreTrainedModel | None = None) -> None:
    """Refuse an adapter given as the model: transformers would load the base it names and
    apply it its own way (no key check, no key mapping for older trainers' files). A local
    folder is told by its adapter_config.json and no model weights; a hub repo, once
    transformers loaded it, by the adapter it attached."""
    folder = Path(source).expanduser()
    local = (folder / "adapter_config.json").is_file() and not any(
        folder.glob("model*.safetensors")
    )
    attached = model is not None and getattr(model, "_hf_peft_config_loaded", False)
    if local or attached:
        raise NotAModelError(
            f"{source} is a peft adapter, not a model: load the base it was trained on with "
            f"it as the adapter (Embedder.load(base, adapter={source!r}); gen2embed encode "
            f"{source} --base BASE)"
        )


def load_backbone(
    name_or_path: str | Path,
    *,
    dtype: str = "auto",
    attn: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> Backbone:
    """A hub id (needs network) or a local folder holding config, weights and processor.

    Returns the Backbone in eval mode on `pick_device(device)`, weights in
    `pick_dtype(dtype, device)`, attention `pick_attention(attn, device)`; safetensors
    weights only. `revision` pins a hub revision. Raises NotAModelError (a UserError) when
    the source is a peft adapter, UnsafeWeightsError (a UserError) when it has no
    safetensors weights, ValueError for a model type no FamilyAdapter covers, and
    transformers' and huggingface_hub's errors (OSError for a missing repo or folder, no
    network) unchanged."""
    source = str(name_or_path)
    _not_an_adapter(source)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    config: PretrainedConfig = AutoConfig.from_pretrained(source, **kwargs)
    adapter = ADAPTERS.get(config.model_type)
    if adapter is None:
        raise ValueError(
            f"{source}: model type {config.model_type!r} has no adapter; supported: "
            f"{', '.join(sorted(ADAPTERS))}"
        )
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    try:
        model = adapter.model_class(config.model_type).from_pretrained(
            source,
            dtype=torch_dtype,
            attn_implementation=pick_attention(attn, dev),
            # Pickled weights can run code when loaded: safetensors only.
            use_safetensors=True,
            **kwargs,
        )
    except OSError as exc:
        if "safetensors" not in str(exc):
            raise
        raise UnsafeWeightsError(
            f"{source}: no safetensors weights (pickled .bin files are refused: loading them "
            "can run code); convert them, e.g. load and save_pretrained(safe_serialization="
            "True) in a sandbox"
        ) from None
    _not_an_adapter(source, model)
    model.to(dev).eval()
    processor = adapter.load_processor(source, **kwargs)
    return Backbone(model, processor, adapter, dev, torch_dtype, source)


# ------------------------------------------------------------------ the tiny generator


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """Byte-level BPE over the world's text plus Qwen2-VL's special tokens, as a Qwen2
    tokenizer (same pre-tokenizer regex as the real one).

    `vocab_size`: the BPE vocabulary before the special tokens (QWEN_SPECIAL_TOKENS) are
    added. Padding is `<|endoftext|>`, end of sequence `<|im_end|>`."""
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges)
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    tok.pad_token = "<|endoftext|>"
    tok.eos_token = "<|im_end|>"
    return tok


def build_tiny(texts: Iterable[str], spec: PretrainConfig, *, image_size: int) -> Backbone:
    """A randomly initialised tiny Qwen2-VL (the architecture fields of `spec`) with a
    tokenizer trained on `texts`, for square images of `image_size`; no network.

    `image_size`: side in pixels; the image processor's min and max pixels are both
    image_size², so every image is processed at that area (patches of `spec.patch` px,
    merged 2 x 2). Weights are seeded by `spec.seed`, float32, on the CPU (source "tiny").
    See docs/miniature.md for the sizes that worked."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tok = train_tokenizer(texts, spec.vocab_size)
    ids = dict(
        zip(QWEN_SPECIAL_TOKENS, tok.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS)), strict=True)
    )
    head_dim = spec.hidden // spec.heads
    # M-RoPE splits the rotary half-dimensions over (time, height, width).
    t = head_dim // 2 // 4
    mrope = [t, (head_dim // 2 - t) // 2, head_dim // 2 - t - (head_dim // 2 - t) // 2]
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": spec.hidden,
            "intermediate_size": spec.intermediate,
            "num_hidden_layers": spec.layers,
            "num_attention_heads": spec.heads,
            "num_key_value_heads": spec.kv_heads,
            "max_position_embeddings": 2048,
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": mrope,
                "rope_theta": spec.rope_theta,
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": spec.vision_depth,
            "embed_dim": spec.vision_dim,
            "hidden_size": spec.hidden,
            "num_heads": max(1, spec.vision_dim // 16),
            "patch_size": spec.patch,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "mlp_ratio": 4,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(spec.seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.eval()
    side = image_size
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=spec.patch,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=side * side,
        max_pixels=side * side,
    )
    processor = ImageOnlyQwenVLProcessor(image_processor=image_processor, tokenizer=tok)
    return Backbone(model, processor, FamilyAdapter(), torch.device("cpu"), torch.float32, "tiny")


def save_backbone(backbone: Backbone, folder: Path) -> None:
    """Save model (config, safetensors weights) and processor (tokenizer, image processor)
    into `folder`, created if needed, as transformers' `save_pretrained` lays them out, so
    `load_backbone(folder)` reads them back offline."""
    folder.mkdir(parents=True, exist_ok=True)
    backbone.model.save_pretrained(folder)
    backbone.processor.save_pretrained(folder)
