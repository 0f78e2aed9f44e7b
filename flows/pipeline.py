"""The end-to-end pipeline flow: the method's stages in order, each cached by its fingerprint.

`method` is the pipeline: one line per stage, the typed output of one stage passed to the
next, then per table row (the paper's ablation by default) mining, fine-tuning and
evaluation; the flow writes the comparison table (embedder.report) at the end.
The flow runs it inside a `PipelineRun` (MLflow parent run, --from / --force /
--until); `gen2embed stages` plans the very same calls without running them.

Parameters are flat and typed (enums for choices) so the Prefect UI renders a real form.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow

from embedder.config import PRESETS, IngestConfig, PipelineConfig, load_config
from embedder.report import RowResult, write_report
from tasks import stages
from tasks.contract import PipelineError, PipelineRun, table_row
from tasks.stages import STAGE_NAMES

StageName = Literal[STAGE_NAMES]  # type: ignore[valid-type]
PresetName = Literal[tuple(PRESETS)]  # type: ignore[valid-type]

__all__ = ["PipelineError", "method", "pipeline"]


def method(cfg: PipelineConfig) -> list[RowResult]:
    """From generator to embedder (METHOD.md), stage by stage, then one evaluation per table
    row; rows share every stage whose inputs they share (through the cache)."""
    world = stages.world(cfg) if cfg.ingest.source == "world" else None
    data = stages.ingest(cfg, world)
    generator = stages.pretrain(cfg) if cfg.model.backbone == "tiny" else None
    emb = stages.embed(cfg, data, generator)
    cands = stages.retrieve(cfg, emb)
    results = []
    for row in cfg.table.rows:
        with table_row(row.name):
            row_cfg = cfg.for_row(row)
            adapter = None
            if row.negatives != "none":
                clusters = stages.mine(row_cfg, cands, emb)
                adapter = stages.finetune(row_cfg, data, clusters, generator)
            if has_eval(cfg.ingest):
                evaluation = stages.evaluate(row_cfg, data, generator, adapter)
                results.append(RowResult(row, evaluation, adapter))
    return results


def has_eval(ingest: IngestConfig) -> bool:
    return ingest.source in ("world", "hub") or ingest.eval_dir is not None


@flow(name="gen2embed", log_prints=True)
def pipeline(
    preset: PresetName = "tiny",
    config_file: str | None = None,
    overrides: list[str] | None = None,
    from_stage: StageName | None = None,
    force: list[StageName] | None = None,
    until: StageName | None = None,
    rows: list[str] | None = None,
    workdir: str | None = None,
) -> dict[str, str]:
    """Run the gen2embed pipeline; returns each stage's published folder.

    Args:
        preset: named configuration to start from.
        config_file: YAML file with sections overriding the preset.
        overrides: dotted settings, e.g. ["ingest.on_bad_rows=skip"].
        from_stage: recompute this stage and every stage reading its output, directly or
            not; the others must already be published (they are reused, never run).
        force: recompute these stages and every stage reading their output.
        until: stop after this stage (e.g. ingest only, to check new data).
        rows: run only these table rows (names from table.rows); stages they share with
            other rows are reused from the cache.
        workdir: workspace folder (default $GEN2EMBED_HOME or ./data).
    """
    cfg = load_config(preset, config_file, overrides or []).with_rows(rows)
    with PipelineRun(
        method, cfg, workdir, preset=preset, from_stage=from_stage, force=force, until=until
    ) as run:
        results = method(cfg)
        if results:
            folder = run.store.workdir / "reports" / run.parent_id
            write_report(results, folder, f"gen2embed: {preset}")
            run.publish_report(folder)
    return run.paths
