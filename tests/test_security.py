"""Security defaults: weights load from safetensors only, remote code is off by default."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from embedder.config import ModelConfig
from embedder.model.backbone import UnsafeWeightsError, load_backbone
from embedder.outputs import Generator


def test_a_model_folder_with_pickled_weights_only_is_refused(
    generator: Generator, tmp_path: Path
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(generator.model_dir, folder)
    backbone = load_backbone(folder, device="cpu")  # safetensors: loads
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    torch.save(backbone.model.state_dict(), folder / "pytorch_model.bin")  # a pickle
    with pytest.raises(UnsafeWeightsError, match="safetensors"):
        load_backbone(folder, device="cpu")


def test_remote_code_is_off_unless_asked() -> None:
    assert ModelConfig().trust_remote_code is False
