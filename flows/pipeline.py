"""The end-to-end pipeline flow: the method's stages in order, each cached by its fingerprint.

`method` is the pipeline: one line per stage, the typed output of one stage passed to the
next by the name of the parameter that takes it, then per table row (the paper's ablation
by default) mining, fine-tuning and evaluation; the flow writes the comparison table
(embedder.report) at the end.
The flow runs it inside a `PipelineRun` (MLflow parent run, --from / --force /
--until); `gen2embed stages` plans the very same calls without running them.

Parameters are flat and typed (enums for choices) so the Prefect UI renders a real form.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from prefect import flow

from embedder.config import (
    PRESETS,
    ConfigError,
    IngestConfig,
    PipelineConfig,
    load_config,
    parse_override,
)
from embedder.report import RowResult, write_report
from flows.summary import log_to_prefect, run_summary
from tasks import stages
from tasks.execute import PipelineError
from tasks.pipeline_run import PipelineRun, table_row
from tasks.stages import STAGE_NAMES

StageName = Literal[STAGE_NAMES]  # type: ignore[valid-type]
PresetName = Literal[tuple(PRESETS)]  # type: ignore[valid-type]

__all__ = ["PipelineError", "method", "pipeline", "pipeline_config"]


def method(cfg: PipelineConfig) -> list[RowResult]:
    """From generator to embedder (docs/method.md), stage by stage, then one evaluation per table
    row; rows share every stage whose inputs they share (through the cache).

    A row with `negatives: none` is evaluated with the base alone (zero-shot) or with the
    released adapter it names (`adapter:`, evaluate's `evaluate.adapter`); it mines and
    fine-tunes nothing, and its RowResult holds no adapter (nothing of ours to register). The
    training pairs are embedded and retrieved only when a row mines them."""
    world = stages.world(cfg) if cfg.ingest.source == "world" else None
    data = stages.ingest(cfg, world=world)
    generator = stages.pretrain(cfg) if cfg.model.backbone == "tiny" else None
    emb = cands = None
    if any(row.negatives != "none" for row in cfg.table.rows):
        emb = stages.embed(cfg, data=data, generator=generator)
        cands = stages.retrieve(cfg, emb=emb)
    results = []
    for row in cfg.table.rows:
        with table_row(row.name):
            row_cfg = cfg.for_row(row)
            adapter = None
            if row.negatives != "none":
                clusters = stages.mine(row_cfg, cands=cands, emb=emb)
                adapter = stages.finetune(
                    row_cfg, data=data, clusters=clusters, generator=generator
                )
            if has_eval(cfg.ingest):
                evaluation = stages.evaluate(
                    row_cfg, data=data, generator=generator, adapter=adapter
                )
                results.append(RowResult(row, evaluation, adapter))
    return results


def has_eval(ingest: IngestConfig) -> bool:
    return ingest.source in ("world", "hub") or ingest.eval_dir is not None


# Flow parameters for the settings people change most, so the UI form needs no dotted keys;
# each is one dotted key, and giving it both ways is an error naming both.
COMMON_SETTINGS = {
    "source": "ingest.source",
    "train_dir": "ingest.train_dir",
    "train_images": "ingest.train_images",
    "eval_dir": "ingest.eval_dir",
    "eval_images": "ingest.eval_images",
    "finetune_steps": "finetune.steps",
    "eval_max_queries": "evaluate.max_queries",
}


def pipeline_config(
    preset: str = "tiny",
    config_file: str | None = None,
    overrides: list[str] | None = None,
    rows: list[str] | None = None,
    **settings: Any,
) -> PipelineConfig:
    """The run's configuration from the flow's parameters: preset, file, `overrides`, then
    the common settings given (never both a setting and an override of its key)."""
    overrides = list(overrides or [])
    given = {
        name: value
        for name, value in settings.items()
        if name in COMMON_SETTINGS and value is not None
    }
    for name, value in given.items():
        key = COMMON_SETTINGS[name]
        clash = [o for o in overrides if parse_override(o)[0] == key]
        if clash:
            raise ConfigError(
                f"{key} is set twice: by the parameter {name}={value!r} and by the override "
                f"{clash[0]!r}; keep one"
            )
        overrides.append(f"{key}={json.dumps(value)}")
    return load_config(preset, config_file, overrides).with_rows(rows)


def run_name(preset: str, rows: list[str] | None) -> str:
    """The MLflow parent run's name: the preset, and the rows when only some run."""
    return f"{preset} [{', '.join(rows)}]" if rows else preset


@flow(name="gen2embed", log_prints=True)
def pipeline(
    preset: PresetName = "tiny",
    rows: list[str] | None = None,
    from_stage: StageName | None = None,
    force: list[StageName] | None = None,
    until: StageName | None = None,
    source: Literal["world", "mmeb", "jsonl", "hub"] | None = None,
    train_dir: str | None = None,
    train_images: str | None = None,
    eval_dir: str | None = None,
    eval_images: str | None = None,
    finetune_steps: int | None = None,
    eval_max_queries: int | None = None,
    overrides: list[str] | None = None,
    config_file: str | None = None,
    workdir: str | None = None,
) -> dict[str, str]:
    """Run the gen2embed pipeline; returns each stage's published folder.

    Args:
        preset: named configuration to start from.
        rows: run only these table rows (names from table.rows, e.g. saha-hierarchical);
            stages they share with other rows are reused from the cache. Empty: all rows.
        from_stage: recompute this stage and every stage reading its output, directly or
            not; the others must already be published (they are reused, never run).
        force: recompute these stages and every stage reading their output.
        until: stop after this stage (e.g. ingest only, to check new data).
        source: where the data comes from (ingest.source); empty: the preset's.
        train_dir: folder of training tables, MMEB layout (ingest.train_dir).
        train_images: images root of the training tables (ingest.train_images).
        eval_dir: folder of evaluation tables, MMEB layout (ingest.eval_dir).
        eval_images: images root of the evaluation tables (ingest.eval_images).
        finetune_steps: optimizer steps of each fine-tune (finetune.steps).
        eval_max_queries: cap on queries per evaluation subset (evaluate.max_queries).
        overrides: any other setting as KEY=VALUE, e.g. ingest.on_bad_rows=skip.
        config_file: YAML file with sections overriding the preset.
        workdir: workspace folder (default $GEN2EMBED_HOME or ./data).
    """
    settings = dict(
        source=source,
        train_dir=train_dir,
        train_images=train_images,
        eval_dir=eval_dir,
        eval_images=eval_images,
        finetune_steps=finetune_steps,
        eval_max_queries=eval_max_queries,
    )
    cfg = pipeline_config(preset, config_file, overrides, rows, **settings)
    logging.getLogger("gen2embed").setLevel(logging.INFO)  # runs started by a deployment too
    with PipelineRun(
        method,
        cfg,
        workdir,
        preset=preset,
        name=run_name(preset, rows),
        from_stage=from_stage,
        force=force,
        until=until,
    ) as run:
        results = method(cfg)
        if results:
            folder = run.store.workdir / "reports" / run.parent_id
            write_report(results, folder, f"gen2embed: {preset}")
            run.publish_report(folder)
            run.register_adapters(results)
    # The run's Logs tab in Prefect shows what `gen2embed run` prints: folders, losses and
    # scores, the table, warnings (a run started from the UI has no terminal).
    log_to_prefect(
        run_summary(
            dict(run.paths),
            run.store.workdir,
            tracking_uri=run.tracker.tracking_uri,
            experiment_id=run.tracker.experiment_id,
        )
    )
    return run.paths
