"""Stage function `pretrain`: build and pretrain the tiny generator of the miniature world."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from embedder.artifacts import StageOutput
from embedder.config import PipelineConfig
from embedder.model import pretrain as pt
from embedder.model.backbone import TinySpec, build_tiny, save_backbone

log = logging.getLogger("gen2embed.generator")
MODEL_DIR = "model"


def tiny_spec(config: PipelineConfig) -> TinySpec:
    """The architecture fields of the pretrain section, plus the world's image size."""
    names = {f.name for f in dataclasses.fields(TinySpec)}
    p = config.pretrain
    shared = {k: v for k, v in p.model_dump().items() if k in names}
    return TinySpec(
        **shared, vision_heads=max(1, p.vision_dim // 16), image_size=config.world.image_size
    )


def build_generator(config: PipelineConfig, out_dir: Path) -> StageOutput:
    """Tokenizer + random tiny Qwen2-VL, next-token pretraining, held-out VQA accuracy; the
    model is saved to `out_dir/model` and loads offline with `load_backbone`."""
    p = config.pretrain
    backbone = build_tiny(pt.corpus_texts(), tiny_spec(config))
    params = sum(x.numel() for x in backbone.model.parameters())
    before = pt.vqa_accuracy(
        backbone, per_type=min(p.eval_per_type, 16), seed=p.seed, image_size=config.world.image_size
    )
    result = pt.pretrain(
        backbone,
        steps=p.steps,
        batch_size=p.batch_size,
        lr=p.lr,
        warmup=p.warmup,
        seed=p.seed,
        image_size=config.world.image_size,
        exact_system_prompt=p.exact_system_prompt,
    )
    accuracy = pt.vqa_accuracy(
        backbone, per_type=p.eval_per_type, seed=p.seed, image_size=config.world.image_size
    )
    save_backbone(backbone, out_dir / MODEL_DIR)
    (out_dir / "loss.json").write_text(json.dumps(result.losses))
    ready = accuracy["category"] >= 0.8 and accuracy["position"] >= 0.8
    summary = [
        "Tiny generator: held-out one-word VQA accuracy by question type "
        f"({p.eval_per_type} each; chance ~1/12 category and colour, 1/3 position)"
    ]
    summary += [
        f"  {k:14s} {v:.2f}   (before pretraining {before[k]:.2f})" for k, v in accuracy.items()
    ]
    summary.append(
        f"  ready (category and position >= 0.8): {'yes' if ready else 'NO'}; "
        f"{p.steps} steps in {result.seconds:.0f}s, final loss {result.losses[-1][1]:.3f}"
    )
    log.info("\n".join(summary))
    return StageOutput(
        metrics={
            "parameters": params,
            "seconds": result.seconds,
            "final_loss": result.losses[-1][1],
            "first_loss": result.losses[0][1],
            **{f"vqa_acc.{k}": v for k, v in accuracy.items()},
            **{f"vqa_acc_before.{k}": v for k, v in before.items()},
            "ready": float(ready),
        },
        info={"summary": summary, "losses": result.losses},
    )
