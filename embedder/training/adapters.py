"""LoRA / DoRA adapters on a backbone: attach new ones for training, save them as
byte-reproducible files, load saved ones strictly.

Where LoRA goes: docs/method.md section 4 puts it on the language model's attention and MLP
projections. `finetune.target_modules` are module-name suffixes, but peft matches bare suffixes
anywhere in the model, and on Qwen2.5-VL `gate_proj`/`up_proj`/`down_proj` also name the
vision tower's MLP (96 modules on the 32-block tower). So the suffixes are resolved here to
the Linear layers under the family's language-model path (`FamilyAdapter.language_model`).

A LoRA that silently does not apply is a known trap (under transformers v5 peft only warns
about missing adapter keys): loading here compares the file's keys with the ones the model
expects and refuses any difference, naming the keys.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from embedder.artifacts import json_text
from embedder.config import FinetuneConfig
from embedder.errors import UserError
from embedder.model.backbone import Backbone, FamilyAdapter

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


class AdapterError(UserError, ValueError):
    """An adapter folder that does not fit the model it is loaded into."""


def lora_config(cfg: FinetuneConfig, target_modules: str | list[str]) -> LoraConfig:
    """peft's config from the finetune section; `target_modules` as `attach` resolves them."""
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        use_dora=cfg.dora,
        init_lora_weights="gaussian" if cfg.lora_init == "gaussian" else True,
        target_modules=target_modules,
        bias="none",
    )


def resolve_targets(model: torch.nn.Module, component: str, suffixes: Sequence[str]) -> list[str]:
    """Sorted full names of the `nn.Linear` modules under `component` (a module path, e.g.
    "model.language_model") whose last name is one of `suffixes`.

    Raises AdapterError when `component` is not a module of `model`, or naming each suffix
    that matches no Linear layer under it (a typo, or a name only the vision tower uses)."""
    modules = dict(model.named_modules())
    if component not in modules:
        raise AdapterError(f"the model has no module {component!r} (the family's language model)")
    linear = {  # full name -> last name, for every Linear layer under the component
        name: name.rsplit(".", 1)[-1]
        for name, module in modules.items()
        if name.startswith(component + ".") and isinstance(module, torch.nn.Linear)
    }
    unmatched = [s for s in suffixes if s not in linear.values()]
    if unmatched:
        raise AdapterError(
            f"finetune.target_modules {unmatched} match no Linear layer under {component} "
            f"(its Linear layers are named {_names(set(linear.values())) or 'nothing'})"
        )
    return sorted(name for name, last in linear.items() if last in set(suffixes))


def target_pattern(component: str, suffixes: Sequence[str]) -> str:
    """The anchored regex handed to peft (which `re.fullmatch`es it against module names):
    a module under `component` whose last name is one of `suffixes`.

    A regex rather than the list of names: peft keeps a list as a set (its order in the saved
    config then depends on PYTHONHASHSEED) and rewrites a list of 20 or more names into the
    shortest suffixes that single them out (bare `q_proj` again in the saved config); one
    string survives both untouched, reads as the rule, and covers a model of any depth."""
    names = "|".join(re.escape(s) for s in sorted(set(suffixes)))
    return rf"^{re.escape(component)}\.(?:.+\.)?(?:{names})$"


def lora_module_names(peft_model: PeftModel) -> list[str]:
    """Sorted names (in the base model) of the modules holding a LoRA."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    return sorted(n for n, m in base.named_modules() if isinstance(m, LoraLayer))


def lora_module_counts(peft_model: PeftModel, family: FamilyAdapter) -> dict[str, int]:
    """LoRA modules per component of `family` (`FamilyAdapter.components`), plus "other" for
    those under none of them; every component is listed, zeros included."""
    counts: Counter[str] = Counter({name: 0 for name in [*family.components, "other"]})
    for module in lora_module_names(peft_model):
        owner = next(
            (c for c, path in family.components.items() if module.startswith(path + ".")),
            "other",
        )
        counts[owner] += 1
    return dict(counts)


def attach(backbone: Backbone, cfg: FinetuneConfig) -> PeftModel:
    """Wrap the backbone's model with a fresh adapter (in place: `backbone.model`'s modules now
    hold the LoRA layers; the returned PeftModel saves and lists the trainable weights).

    LoRA goes on the Linear layers under the family's language model whose last name is in
    `cfg.target_modules` (docs/method.md section 4), nowhere else. Raises AdapterError when a suffix
    matches nothing there."""
    component = backbone.adapter.language_model
    wanted = resolve_targets(backbone.model, component, cfg.target_modules)
    pattern = target_pattern(component, cfg.target_modules)
    try:
        peft_model = get_peft_model(backbone.model, lora_config(cfg, pattern))
    except ValueError as exc:
        if "not found in the base model" in str(exc):
            raise AdapterError(
                f"finetune.target_modules {cfg.target_modules}: {exc}".splitlines()[0]
            ) from None
        raise
    got = lora_module_names(peft_model)
    if got != wanted:  # the regex caught a non-Linear module of that name, or missed one
        raise AdapterError(
            f"LoRA went on {len(got)} modules, {len(wanted)} resolved: "
            f"extra {_names(set(got) - set(wanted))}; missing {_names(set(wanted) - set(got))}"
        )
    return peft_model


def save_adapter(peft_model: PeftModel, folder: Path | str) -> None:
    """Save the adapter (safetensors weights and adapter_config.json) as byte-reproducible
    files: the same adapter gives the same bytes in any process.

    peft writes the config with sorted keys but set-valued fields (target_modules and the
    like) as lists in set order, which PYTHONHASHSEED changes from process to process: those
    are written sorted. peft's README.md (a model-card template) is dropped: it holds nothing
    the config does not, its text changes with huggingface_hub's template, and peft merges it
    into a README already in the folder. The folder is written beside and renamed into
    place, so no file of an earlier save stays behind."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "README.md").unlink(missing_ok=True)
    for name, config in peft_model.peft_config.items():
        # peft's layout: the default adapter at the top, any other in a subfolder.
        path = (tmp if name == "default" else tmp / name) / CONFIG
        data = json.loads(path.read_text())
        for key, value in vars(config).items():
            if isinstance(value, set | frozenset) and isinstance(data.get(key), list):
                data[key] = sorted(data[key])
        path.write_text(json_text(data, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


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
