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

Adapters trained elsewhere load too (docs/method.md section 7): the
paper authors' trainer (VLM2Vec's) saves a peft folder of transformers 4.x, possibly with
pickled `adapter_model.bin` weights. Pickles are read only by torch's weights-only loader
(tensors and containers, never code); the module paths of that transformers are mapped to
today's by the backbone family (`FamilyAdapter.current_name`) before the strict key check.
An adapter is a folder or a hub repo id (`adapter_folder`).
"""

from __future__ import annotations

import json
import logging
import pickle
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
from embedder.model.identity import ModelIdentityError, could_be_hub_id, resolve_hub_commit

log = logging.getLogger("gen2embed.adapters")

WEIGHTS = "adapter_model.safetensors"
# Pickled weights, as peft writes them with safe_serialization=False (the paper authors'
# trainer ran with --save_safetensors False). Read only when WEIGHTS is absent, and only by
# torch's weights-only unpickler.
PICKLED_WEIGHTS = "adapter_model.bin"
CONFIG = "adapter_config.json"
# What a hub repo's download fetches: the adapter and our training record, plus config.json to
# tell a full model (published merged) from an adapter. Never training_args.bin (a pickle).
HUB_FILES = (CONFIG, WEIGHTS, PICKLED_WEIGHTS, "gen2embed.json", "config.json")
# peft's prefix of every saved key (the PeftModel's `base_model.model`).
PEFT_PREFIX = "base_model.model."
# Wrappers a trainer may leave in front of peft's keys: VLM2Vec's MMEBModel (which the
# authors' trainer reuses) holds the peft model as `encoder`. Its trainer strips the prefix
# before saving; a state dict taken from the wrapper itself would keep it.
WRAPPER_PREFIXES = ("encoder.",)


class AdapterError(UserError, ValueError):
    """An adapter folder that does not fit the model it is loaded into."""


def lora_config(cfg: FinetuneConfig, target_modules: str | list[str]) -> LoraConfig:
    """peft's config from the finetune section; `target_modules` as `attach` resolves them.

    The paper's recipe by default (docs/method.md section 4): r 8, alpha 64, dropout 0.1,
    DoRA, Gaussian init of A (`lora_init: default` is peft's own); no bias is trained."""
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
    """Sorted names (in the base model, `named_modules()` paths) of the modules holding a
    LoRA (peft's LoraLayer)."""
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
    matches nothing there, when the family's language-model path is not in the model, or when
    peft put LoRA on other modules than the resolved ones. The new weights are peft's
    initial ones (B zero, so the model computes what it did); the adapter's parameters are
    the only trainable ones."""
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
    place, so no file of an earlier save stays behind.

    Writes, in peft's format (`PeftModel.from_pretrained` reads it): `folder`/
    adapter_model.safetensors and adapter_config.json (a non-default adapter in a
    sub-folder of its name). Works in `<folder>.tmp` first; an existing `folder` is
    replaced."""
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


def adapter_folder(
    source: str | Path, revision: str | None = None, *, setting: str = "adapter_revision"
) -> Path:
    """The local folder of adapter `source`: an existing folder as it is, else (a string) a hub
    repo id (`owner/name`) whose adapter files (`HUB_FILES`, nothing else) are downloaded from the
    commit `revision` resolves to (None: the default branch; offline, the local hub cache).

    Raises AdapterError when `source` is neither, or cannot be downloaded; ModelIdentityError
    (its message names `setting`) when the revision cannot be resolved."""
    path = Path(source).expanduser()
    if path.is_dir():
        if revision is not None:
            raise AdapterError(
                f"adapter {source} is a local folder, which has no revisions: drop {setting}"
            )
        return path
    repo = str(source)
    if isinstance(source, Path) or not could_be_hub_id(repo):  # a Path means a folder
        raise AdapterError(f"adapter {source}: no such folder")
    try:
        commit = resolve_hub_commit(repo, revision, setting)
    except ModelIdentityError as exc:
        raise ModelIdentityError(
            f"adapter {repo}: no such folder, and as a hub id: {exc}"
        ) from None
    from huggingface_hub import snapshot_download

    def complete(folder: str) -> bool:
        snapshot = Path(folder)
        weights = (snapshot / WEIGHTS).is_file() or (snapshot / PICKLED_WEIGHTS).is_file()
        return (snapshot / CONFIG).is_file() and weights

    try:  # the commit's files already in the hub cache: no network
        folder = snapshot_download(
            repo, revision=commit, allow_patterns=list(HUB_FILES), local_files_only=True
        )
        if complete(folder):
            return Path(folder)
    except Exception as exc:  # not cached (or partly): download
        log.info("adapter %s@%s not in the hub cache (%s); downloading", repo, commit, exc)
    try:
        folder = snapshot_download(repo, revision=commit, allow_patterns=list(HUB_FILES))
    except Exception as exc:  # no network, no such repo, gated, ...: the hub's own words
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise AdapterError(
            f"adapter {repo} (commit {commit[:12]}): no such folder, and the hub repo cannot be "
            f"downloaded ({type(exc).__name__}: {first})"
        ) from None
    return Path(folder)


def weights_file(folder: Path) -> Path:
    """The weights file of the adapter folder `folder`: `adapter_model.safetensors`, or only
    when there is none, `adapter_model.bin`. Both present: the safetensors file wins, as in
    peft and transformers, and the pickle is never opened.

    Raises AdapterError when the folder holds no adapter config or no weights, naming a
    full model (config.json, no adapter config) as such."""
    if not (folder / CONFIG).is_file():
        if (folder / "config.json").is_file():
            raise AdapterError(
                f"{folder} holds a full model (config.json, no {CONFIG}), not an adapter: "
                "load it as the base model (Embedder.load(it), model.backbone) with no adapter"
            )
        raise AdapterError(f"{folder}: no {CONFIG} (not a peft adapter folder)")
    safe, pickled = folder / WEIGHTS, folder / PICKLED_WEIGHTS
    if safe.is_file():
        if pickled.is_file():
            log.info("%s: reading %s; %s beside it is ignored", folder, WEIGHTS, PICKLED_WEIGHTS)
        return safe
    if pickled.is_file():
        return pickled
    raise AdapterError(f"{folder}: no adapter weights ({WEIGHTS}, or {PICKLED_WEIGHTS})")


def read_adapter_weights(
    folder: Path, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """The tensors of the adapter in `folder` (`weights_file`), keys as saved. A pickle is
    read by torch's weights-only unpickler only: one that needs anything but tensors and
    plain containers is refused, never run. Raises AdapterError naming the file.

    Tensors are placed on `device`, in the dtype they were saved in. AdapterError also when
    the folder holds no config or weights (`weights_file`), the file is unreadable or
    truncated, or a pickle holds anything but a str -> tensor dict."""
    path = weights_file(folder)
    if path.name == PICKLED_WEIGHTS:
        return _weights_only(path, device)
    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:  # a truncated or foreign file: safetensors' own words
        raise AdapterError(f"{path}: not a readable safetensors file ({exc})") from None


def _weights_only(path: Path, device: torch.device | str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message: a paragraph on the weights_only default, then the refused global.
        why = [
            line.strip()
            for line in str(exc).splitlines()
            if line.strip()
            and not line.startswith(("Weights only load failed", "Check the documentation"))
        ]
        raise AdapterError(
            f"{path}: refused: it is not a weights-only torch file ({' '.join(why[:2]) or exc}). "
            "Unpickling anything beyond tensors can run code, so only weights-only pickles are "
            "read; convert the file to safetensors where you trust it"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise AdapterError(f"{path}: not a readable torch weights file ({exc})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise AdapterError(f"{path}: holds a {type(state).__name__}, not a dict of tensors")
    return state


def current_keys(state: dict[str, torch.Tensor], family: FamilyAdapter) -> dict[str, torch.Tensor]:
    """`state` with its keys as the loaded model names them: a trainer's wrapper prefix
    (`WRAPPER_PREFIXES`) dropped, the module path after peft's prefix mapped by the family
    from older transformers' layout (`FamilyAdapter.current_name`; today's names unchanged).
    Raises AdapterError when two keys map to one."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = next((key[len(p) :] for p in WRAPPER_PREFIXES if key.startswith(p)), key)
        if name.startswith(PEFT_PREFIX):
            name = PEFT_PREFIX + family.current_name(name[len(PEFT_PREFIX) :])
        if name in out:
            raise AdapterError(f"adapter keys collide once mapped to today's names: {name}")
        out[name] = value
    return out


def read_config(folder: Path, family: FamilyAdapter) -> LoraConfig:
    """The folder's LoRA config for loading (inference mode), its `target_modules` meaning
    what they meant when it was trained.

    Ours is an anchored regex of today's module path (`target_pattern`), used as is. Others
    list module-name suffixes (peft matches those anywhere, as the trainer did: on Qwen2.5-VL a
    bare `down_proj` also hits the vision tower, and the weights for it are in the file), also
    used as is, so the key check compares the file with what its trainer built; a full module
    path in such a list is mapped like the keys (`FamilyAdapter.current_name`)."""
    weights_file(folder)  # a config and weights, or the error that says what is there
    try:
        config = LoraConfig.from_pretrained(str(folder))
    except (ValueError, TypeError, KeyError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{folder / CONFIG}: not a LoRA config peft reads ({exc})") from None
    targets = config.target_modules
    if isinstance(targets, list | set | frozenset | tuple):
        config.target_modules = sorted(family.current_name(t) if "." in t else t for t in targets)
    config.inference_mode = True
    return config


def load_adapter(backbone: Backbone, folder: Path) -> Backbone:
    """The backbone with the adapter in `folder` applied and merged into its weights (plain
    inference speed, the embedding code unchanged).

    The folder is ours (safetensors, today's module names) or another trainer's (the paper
    authors': `adapter_model.bin`, transformers 4.x names), see `read_adapter_weights` and
    `current_keys`. Missing or unexpected keys (after mapping) are an error naming them, as
    are shapes that do not fit.

    `folder`: a local peft folder (`adapter_folder` downloads a hub id). The result shares
    processor, family, device, dtype and source with `backbone`, and its model is
    `backbone.model` with the adapter merged in: the given backbone's model is changed in
    place (LoRA wrapped, then merged), so keep using the returned one only, also after an
    error. Raises AdapterError (a UserError) when the folder is missing, holds no config or
    weights, its config is not a LoRA config peft reads, its targets are not in the model, or
    the keys or shapes do not fit."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"adapter {folder}: no such folder")
    family = backbone.adapter
    config = read_config(folder, family)
    # The base it goes on now (the key check below is what proves the fit); peft otherwise
    # warns that the name "was renamed" whenever the base sits at another path than in training.
    config.base_model_name_or_path = backbone.source
    state = current_keys(read_adapter_weights(folder, backbone.device), family)
    try:
        peft_model = get_peft_model(backbone.model, config)
    except ValueError as exc:
        if "not found in the base model" not in str(exc) and "Target module" not in str(exc):
            raise
        raise AdapterError(
            f"adapter {folder} does not fit {backbone.source}: {exc}".splitlines()[0]
        ) from None
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
    try:
        result = set_peft_model_state_dict(peft_model, state)
    except RuntimeError as exc:  # torch's size-mismatch report
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
        raise AdapterError(
            f"adapter {folder} does not fit {backbone.source}: tensor shapes differ ({detail}) "
            "(a wrong base model)"
        ) from None
    if result.unexpected_keys:
        raise AdapterError(f"adapter {folder}: keys not applied: {_names(result.unexpected_keys)}")
    counts = lora_module_counts(peft_model, family)
    log.info("adapter %s: LoRA modules per component %s", folder, counts)
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
