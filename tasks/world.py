"""Stage `world`: draw the miniature world (only when ingest reads it)."""

from __future__ import annotations

from embedder.artifacts import code_version
from embedder.datasets import synthetic
from tasks.stage import StageDef, register

STAGE = register(
    StageDef(
        name="world",
        code_version=code_version(synthetic),
        sections=("world",),
        upstream=lambda _config: (),
        compute=lambda config, out, _upstream: synthetic.build_world(config.world, out),
        enabled=lambda config: config.ingest.source == "world",
    )
)
