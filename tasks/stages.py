"""The pipeline's stages in run order."""

from __future__ import annotations

from tasks import ingest, world
from tasks.stage import StageDef

PIPELINE: list[StageDef] = [world.STAGE, ingest.STAGE]
