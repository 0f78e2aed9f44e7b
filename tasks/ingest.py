"""Stage `ingest`: raw tables (MMEB dump, JSONL, hub, or the miniature world) -> Parquet."""

from __future__ import annotations

from embedder.artifacts import code_version
from embedder.datasets import catalog, images, ingest, schema, sources
from tasks.stage import StageDef, register

STAGE = register(
    StageDef(
        name="ingest",
        code_version=code_version(ingest, sources, images, catalog, schema),
        sections=("ingest",),
        upstream=lambda config: ("world",) if config.ingest.source == "world" else (),
        inputs=lambda config, upstream: ingest.source_inputs(config.ingest, upstream.get("world")),
        compute=lambda config, out, upstream: ingest.ingest(
            config.ingest, out, upstream.get("world")
        ),
    )
)
