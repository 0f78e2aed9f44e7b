"""Where LoRA goes (docs/method.md section 4: the language model's attention and MLP projections, by
module path, for every backbone family), and byte-reproducible adapter files."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from embedder.config import LM_PROJECTIONS, FinetuneConfig
from embedder.model.backbone import ADAPTERS, Backbone
from embedder.training import adapters

LAYERS = 2
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
CFG = FinetuneConfig(dora=False)


def tiny_model(family: str, layers: int = LAYERS, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised two-block vision tower and `layers`-layer language model of
    `family`, from the installed transformers' config classes (no download)."""
    import transformers as tf

    text: dict[str, object] = {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 128,
        "rope_parameters": {
            "rope_type": "default",
            "mrope_section": [2, 3, 3],
            "rope_theta": 10000.0,
        },
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 0,
    }
    vision: dict[str, object] = {
        "depth": 2,
        "hidden_size": 32,
        "num_heads": 2,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    ids = {"image_token_id": 60, "video_token_id": 61}
    torch.manual_seed(seed)
    if family == "qwen2_vl":
        vision |= {"embed_dim": 32, "patch_size": 14, "mlp_ratio": 2}
        config = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        return tf.Qwen2VLForConditionalGeneration(config)
    vision |= {"intermediate_size": 64, "out_hidden_size": 32}
    if family == "qwen2_5_vl":
        vision |= {"patch_size": 14, "fullatt_block_indexes": [1]}
        config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        return tf.Qwen2_5_VLForConditionalGeneration(config)
    assert family == "qwen3_vl"
    text["head_dim"] = 16
    text["rope_parameters"] |= {"mrope_interleaved": True}  # type: ignore[operator]
    vision |= {"patch_size": 16, "num_position_embeddings": 64, "deepstack_visual_indexes": [1]}
    config = tf.Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
    return tf.Qwen3VLForConditionalGeneration(config)


def tiny_backbone(family: str, layers: int = LAYERS, seed: int = 0) -> Backbone:
    model = tiny_model(family, layers, seed).eval()
    cpu = torch.device("cpu")
    return Backbone(model, None, ADAPTERS[family], cpu, torch.float32, f"tiny-{family}")  # type: ignore[arg-type]


def _lora_names(peft_model: torch.nn.Module) -> list[str]:
    """Names (in the base model) of the modules that got a LoRA, found independently of the
    code under test: a LoRA layer holds `lora_A`."""
    base = peft_model.get_base_model()  # type: ignore[operator]
    return sorted(n for n, m in base.named_modules() if hasattr(m, "lora_A"))


def _expected_names(layers: int) -> list[str]:
    attn = [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    mlp = [f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    return sorted(
        f"model.language_model.layers.{i}.{leaf}" for i in range(layers) for leaf in attn + mlp
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_goes_on_the_language_models_projections_only(family: str) -> None:
    backbone = tiny_backbone(family)
    # The module tree of all three families in transformers 5: model.visual (the vision
    # tower), model.language_model (the decoder), lm_head.
    peft_model = adapters.attach(backbone, CFG)
    names = _lora_names(peft_model)
    in_vision = [n for n in names if n.startswith("model.visual.")]
    assert in_vision == [], f"{len(in_vision)} vision modules got LoRA: {in_vision[:3]}"
    assert names == _expected_names(LAYERS)
    assert len(names) == LAYERS * len(LM_PROJECTIONS)
    counts = adapters.lora_module_counts(peft_model, backbone.adapter)
    assert counts == {"language_model": LAYERS * 7, "vision": 0, "other": 0}


def test_every_family_declares_its_components() -> None:
    for family, adapter in ADAPTERS.items():
        assert {"language_model", "vision"} <= set(adapter.components), family
        assert adapter.components["language_model"] == adapter.language_model
    assert ADAPTERS["qwen2_5_vl"].components == {
        "language_model": "model.language_model",
        "vision": "model.visual",
    }


@pytest.mark.parametrize("suffix", ["qkv", "no_such_proj"])
def test_a_suffix_matching_nothing_in_the_language_model_is_an_error(suffix: str) -> None:
    backbone = tiny_backbone("qwen2_vl")  # its vision tower names a layer `qkv`
    cfg = CFG.model_copy(update={"target_modules": ["q_proj", suffix]})
    with pytest.raises(adapters.AdapterError, match=rf"'{suffix}'.*model\.language_model"):
        adapters.attach(backbone, cfg)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_adapter_loads_into_its_family_and_refuses_another_shape(
    family: str, tmp_path: Path
) -> None:
    peft_model = adapters.attach(tiny_backbone(family), CFG)
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapter change something
            param.data.normal_(0, 0.5)
    adapters.save_adapter(peft_model, tmp_path / "adapter")
    base = tiny_backbone(family)
    before = base.model.model.language_model.layers[0].self_attn.q_proj.weight.detach().clone()
    loaded = adapters.load_adapter(base, tmp_path / "adapter")
    after = loaded.model.model.language_model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(before, after), "the adapter was merged in"
    vision = loaded.model.model.visual
    assert not any(hasattr(m, "lora_A") for m in vision.modules())
    # One more language-model layer than the adapter was trained on: its LoRA keys are missing.
    with pytest.raises(adapters.AdapterError, match="missing keys"):
        adapters.load_adapter(tiny_backbone(family, layers=LAYERS + 1), tmp_path / "adapter")


SAVE_SCRIPT = """
import sys
import torch
from embedder.config import FinetuneConfig
from embedder.training import adapters
from tests.test_lora_targets import tiny_backbone

peft_model = adapters.attach(tiny_backbone("qwen2_5_vl"), FinetuneConfig())
torch.manual_seed(3)
for name, param in peft_model.named_parameters():
    if "lora_B" in name:
        param.data.normal_(0, 0.5)
adapters.save_adapter(peft_model, sys.argv[1] + "/resolved")

# A config peft holds as a set (target_modules given as a list of suffixes) is written sorted.
from peft import LoraConfig, get_peft_model
from embedder.config import LM_PROJECTIONS

torch.manual_seed(3)
suffixes = LoraConfig(r=4, target_modules=list(LM_PROJECTIONS), init_lora_weights="gaussian")
raw = get_peft_model(tiny_backbone("qwen2_vl").model, suffixes)
adapters.save_adapter(raw, sys.argv[1] + "/suffixes")
"""


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_the_same_adapter_is_saved_to_the_same_bytes_whatever_the_hash_seed(
    tmp_path: Path,
) -> None:
    """Sets (peft holds target_modules as one) iterate in an order PYTHONHASHSEED picks: two
    processes saving the same adapter must still write identical files."""
    root = Path(__file__).resolve().parents[1]
    digests = []
    for seed in ("1", "2"):
        folder = tmp_path / f"seed{seed}"
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        subprocess.run(
            [sys.executable, "-c", SAVE_SCRIPT, str(folder)], cwd=root, env=env, check=True
        )
        digests.append(_digests(folder))
    for kind in ("resolved", "suffixes"):
        assert {f"{kind}/adapter_config.json", f"{kind}/{adapters.WEIGHTS}"} <= set(digests[0])
    assert digests[0] == digests[1]
    config = json.loads((tmp_path / "seed1" / "suffixes" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(LM_PROJECTIONS)
