"""Stage `world`: draw the miniature world (only when ingest reads it)."""

from __future__ import annotations

from embedder.datasets.synthetic import CODE_VERSION, build_world
from tasks.stage import StageDef, register

STAGE = register(
    StageDef(
        name="world",
        code_version=CODE_VERSION,
        upstream=lambda _config: (),
        inputs=lambda _section, _upstream: {},
        compute=lambda section, out, _upstream: build_world(section, out),  # type: ignore[arg-type]
        enabled=lambda config: config.ingest.source == "world",
    )
)
