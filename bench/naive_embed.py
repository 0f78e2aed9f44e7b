"""The baseline every embedding benchmark compares against: a plain loop in input order with
a fixed batch size, no dedupe, no length bucketing, images decoded in the main process."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from embedder.model.backbone import Backbone
from embedder.model.encode import EmbedItem, pool_last_token
from embedder.model.images import load_image


def naive_embed(
    backbone: Backbone,
    items: Sequence[EmbedItem],
    images_root: Path,
    *,
    batch_size: int,
    image_side: int,
) -> tuple[list[str], np.ndarray, float, float]:
    """Returns keys (input order, duplicates included), vectors, seconds, padding efficiency."""
    proc = backbone.processor
    proc.tokenizer.padding_side = "left"
    on_gpu = backbone.device.type == "cuda"
    out, real, padded = [], 0, 0
    if on_gpu:
        torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            images = [
                load_image(images_root, it.image, "fixed", image_side) for it in chunk if it.image
            ]
            inputs = proc(
                text=[it.text for it in chunk],
                images=images or None,
                padding=True,
                return_tensors="pt",
            )
            real += int(inputs["attention_mask"].sum())
            padded += inputs["attention_mask"].numel()
            inputs = {k: v.to(backbone.device) for k, v in inputs.items()}
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
                hidden = backbone.adapter.last_hidden_state(backbone.model, inputs)
            pooled = pool_last_token(hidden, inputs["attention_mask"]).float()
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy())
    if on_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return [it.key for it in items], np.concatenate(out), seconds, real / padded
