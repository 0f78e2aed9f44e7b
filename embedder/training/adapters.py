"""LoRA / DoRA adapters on a backbone: attach new ones for training, load saved ones strictly.

A LoRA that silently does not apply is a known trap (under transformers v5 peft only warns
about missing adapter keys): loading here compares the file's keys with the ones the model
expects and refuses any difference, naming the keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from embedder.config import FinetuneConfig
from embedder.errors import UserError
from embedder.model.backbone import Backbone

WEIGHTS = "adapter_model.safetensors"


class AdapterError(UserError, ValueError):
    """An adapter folder that does not fit the model it is loaded into."""


def lora_config(cfg: FinetuneConfig) -> LoraConfig:
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        use_dora=cfg.dora,
        init_lora_weights="gaussian" if cfg.lora_init == "gaussian" else True,
        target_modules=list(cfg.target_modules),
        bias="none",
    )


def attach(backbone: Backbone, cfg: FinetuneConfig) -> PeftModel:
    """Wrap the backbone's model with a fresh adapter (in place: `backbone.model`'s modules now
    hold the LoRA layers; the returned PeftModel saves and lists the trainable weights)."""
    try:
        peft_model = get_peft_model(backbone.model, lora_config(cfg))
    except ValueError as exc:
        if "not found in the base model" in str(exc):
            raise AdapterError(
                f"finetune.target_modules {cfg.target_modules}: {exc}".splitlines()[0]
            ) from None
        raise
    return peft_model


def _names(keys: Any, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_adapter(backbone: Backbone, folder: Path) -> Backbone:
    """The backbone with the adapter in `folder` applied and merged into its weights (plain
    inference speed, the embedding code unchanged). Missing or unexpected keys are an error."""
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise AdapterError(f"{folder}: no {WEIGHTS} (adapters are saved as safetensors)")
    config = LoraConfig.from_pretrained(str(folder))
    config.inference_mode = True
    peft_model = get_peft_model(backbone.model, config)
    state = load_file(str(weights), device=str(backbone.device))
    expected = set(get_peft_model_state_dict(peft_model))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_names(unexpected)}")
        raise AdapterError(
            f"adapter {folder} does not fit {backbone.source}: {'; '.join(parts)} "
            "(a wrong base model, or a damaged adapter file)"
        )
    result = set_peft_model_state_dict(peft_model, state)
    if result.unexpected_keys:
        raise AdapterError(f"adapter {folder}: keys not applied: {_names(result.unexpected_keys)}")
    merged = peft_model.merge_and_unload()
    merged.eval()
    return Backbone(
        merged,
        backbone.processor,
        backbone.adapter,
        backbone.device,
        backbone.dtype,
        backbone.source,
    )
