"""The pipeline's stages in run order."""

from __future__ import annotations

from tasks import ingest, mining_stages, model_stages, world
from tasks.stage import StageDef

PIPELINE: list[StageDef] = [
    world.STAGE,
    ingest.STAGE,
    model_stages.PRETRAIN,
    model_stages.EMBED,
    model_stages.ZEROSHOT,
    mining_stages.RETRIEVE,
    mining_stages.MINE,
]
