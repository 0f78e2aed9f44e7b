"""Stages `pretrain` (the tiny generator), `embed` (zero-shot embeddings of the pairs) and
`zeroshot` (P@1 of the templates on the miniature eval)."""

from __future__ import annotations

from embedder import embed, generator, zeroshot
from embedder.artifacts import code_version
from embedder.config import PipelineConfig
from embedder.datasets import synthetic
from embedder.model import backbone, encode, images, pretrain, prompts
from tasks.stage import StageDef, register


def _uses_tiny(config: PipelineConfig) -> bool:
    return config.model.backbone == "tiny"


def _with_pretrain(config: PipelineConfig) -> tuple[str, ...]:
    return ("ingest", "pretrain") if _uses_tiny(config) else ("ingest",)


PRETRAIN = register(
    StageDef(
        name="pretrain",
        code_version=code_version(generator, pretrain, backbone, prompts, synthetic),
        sections=("pretrain", "world"),
        upstream=lambda _config: (),
        compute=lambda config, out, _up: generator.build_generator(config, out),
        enabled=_uses_tiny,
    )
)

EMBED = register(
    StageDef(
        name="embed",
        code_version=code_version(embed, encode, images, backbone, prompts),
        sections=("model", "embed"),
        upstream=_with_pretrain,
        compute=lambda config, out, up: embed.embed_pairs(
            config, up["ingest"], up.get("pretrain"), out
        ),
        resumable=True,
    )
)

ZEROSHOT = register(
    StageDef(
        name="zeroshot",
        code_version=code_version(zeroshot, embed, encode, images, backbone, prompts),
        sections=("model", "embed", "zeroshot"),
        upstream=_with_pretrain,
        compute=lambda config, out, up: zeroshot.zeroshot_eval(
            config, up["ingest"], up.get("pretrain"), out
        ),
        enabled=lambda config: config.ingest.source == "world",
        resumable=True,
    )
)
