"""Stage `ingest`: raw tables (MMEB dump, JSONL, hub, or the miniature world) -> Parquet."""

from __future__ import annotations

from embedder.datasets.ingest import CODE_VERSION, ingest, source_inputs
from tasks.stage import StageDef, register

STAGE = register(
    StageDef(
        name="ingest",
        code_version=CODE_VERSION,
        upstream=lambda config: ("world",) if config.ingest.source == "world" else (),
        inputs=lambda section, upstream: source_inputs(section, upstream.get("world")),  # type: ignore[arg-type]
        compute=lambda section, out, upstream: ingest(section, out, upstream.get("world")),  # type: ignore[arg-type]
    )
)
