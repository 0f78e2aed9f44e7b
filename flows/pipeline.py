"""The end-to-end pipeline flow: the method's stages in order, each cached by its fingerprint.

`method` is the pipeline: one line per stage, the typed output of one stage passed to the
next. The flow runs it inside a `PipelineRun` (MLflow parent run, --from / --force /
--until); `gen2embed stages` plans the very same calls without running them.

Parameters are flat and typed (enums for choices) so the Prefect UI renders a real form.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow

from embedder.config import PRESETS, PipelineConfig, load_config
from tasks import stages
from tasks.contract import PipelineError, PipelineRun
from tasks.stages import STAGE_NAMES

StageName = Literal[STAGE_NAMES]  # type: ignore[valid-type]
PresetName = Literal[tuple(PRESETS)]  # type: ignore[valid-type]

__all__ = ["PipelineError", "method", "pipeline"]


def method(cfg: PipelineConfig) -> None:
    """From generator to embedder (METHOD.md), stage by stage."""
    world = stages.world(cfg) if cfg.ingest.source == "world" else None
    data = stages.ingest(cfg, world)
    generator = stages.pretrain(cfg) if cfg.model.backbone == "tiny" else None
    emb = stages.embed(cfg, data, generator)
    if world is not None:  # the miniature world's eval set: P@1 of the prompt templates
        stages.zeroshot(cfg, data, generator)
    cands = stages.retrieve(cfg, emb)
    stages.mine(cfg, cands, emb)


@flow(name="gen2embed", log_prints=True)
def pipeline(
    preset: PresetName = "tiny",
    config_file: str | None = None,
    overrides: list[str] | None = None,
    from_stage: StageName | None = None,
    force: list[StageName] | None = None,
    until: StageName | None = None,
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
        workdir: workspace folder (default $GEN2EMBED_HOME or ./data).
    """
    cfg = load_config(preset, config_file, overrides or [])
    with PipelineRun(
        method, cfg, workdir, preset=preset, from_stage=from_stage, force=force, until=until
    ) as run:
        method(cfg)
    return run.paths
