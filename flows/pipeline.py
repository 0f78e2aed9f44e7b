"""The end-to-end pipeline flow: the stages in order, each cached by its fingerprint.

Parameters are flat and typed (enums for choices) so the Prefect UI renders a real form.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

from prefect import flow
from prefect.runtime import flow_run

from embedder.artifacts import ArtifactStore
from embedder.config import PRESETS, STAGES, load_config
from embedder.errors import UserError
from tasks.stage import (
    PlannedStage,
    log_cached_run,
    make_stage_task,
    plan_stages,
)
from tasks.stages import PIPELINE
from tasks.tracking import Tracker

log = logging.getLogger("gen2embed.pipeline")

StageName = Literal["world", "ingest", "pretrain", "embed", "zeroshot", "retrieve", "mine"]
PresetName = Literal["tiny", "qwen2vl-2b"]
assert set(StageName.__args__) == set(STAGES), "StageName must list embedder.config.STAGES"
assert set(PresetName.__args__) == set(PRESETS), "PresetName must list embedder.config.PRESETS"


class PipelineError(UserError, RuntimeError):
    pass


def stages_to_recompute(
    plan: list[PlannedStage], from_stage: str | None, force: list[str]
) -> tuple[set[str], int]:
    """Names of stages to recompute, and the index of the first stage to run at all.

    `from_stage`: stages before it must already be published (they are used, not run); it and
    everything after are recomputed. `force`: each named stage and everything downstream is
    recomputed; upstream stages run normally (from cache when they can).
    """
    names = [p.name for p in plan]
    for name in [*([from_stage] if from_stage else []), *force]:
        if name not in names:
            raise PipelineError(
                f"stage {name!r} is not part of this pipeline (stages: {', '.join(names)})"
            )
    starts = [names.index(n) for n in force]
    first_run = 0
    if from_stage:
        first_run = names.index(from_stage)
        starts.append(first_run)
        missing = [p.name for p in plan[:first_run] if not p.cached]
        if missing:
            raise PipelineError(
                f"--from {from_stage} needs published results of {', '.join(missing)}; "
                "run without --from first"
            )
    first_recompute = min(starts) if starts else len(plan)
    return set(names[first_recompute:]), first_run


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
        from_stage: recompute this stage and all after it; earlier ones must be cached.
        force: recompute these stages and everything downstream.
        until: stop after this stage (e.g. ingest only, to check new data).
        workdir: workspace folder (default $GEN2EMBED_HOME or ./data).
    """
    config = load_config(preset, config_file, overrides or [])
    store = ArtifactStore(workdir)
    tracker = Tracker.for_workdir(store.workdir)
    swept = tracker.sweep_stale_runs()
    if swept:
        log.warning("marked %d MLflow run(s) of dead processes as KILLED", len(swept))
    plan = plan_stages(config, store, PIPELINE)
    if until is not None:
        names = [p.name for p in plan]
        if until not in names:
            raise PipelineError(f"--until {until}: not part of this pipeline ({', '.join(names)})")
        plan = plan[: names.index(until) + 1]
    recompute, first_run = stages_to_recompute(plan, from_stage, list(force or []))
    by_name = {s.name: s for s in PIPELINE}
    result_dir = store.workdir / "prefect" / "results"
    paths: dict[str, str] = {}
    started = time.perf_counter()
    with tracker.run(
        "pipeline",
        tags={"prefect.flow_run_id": str(flow_run.get_id() or ""), "gen2embed.preset": preset},
        params=config.model_dump(mode="json"),
    ) as parent_id:
        cached_count = 0
        for index, planned in enumerate(plan):
            upstream_paths = {u: paths[u] for u in planned.upstream}
            if index < first_run:
                manifest = store.manifest(planned.name, planned.fingerprint)  # verified by the plan
                log_cached_run(planned.name, manifest, tracker, parent_id, planned.path)
                paths[planned.name] = str(planned.path)
                cached_count += 1
                continue
            recompute_this = planned.name in recompute
            if not planned.cached and not recompute_this:
                log.info("%s: not cached (%s)", planned.name, "; ".join(planned.problems[:3]))
            stage_task = make_stage_task(
                by_name[planned.name], result_dir, refresh=recompute_this or not planned.cached
            )
            state = stage_task(
                stage=planned.name,
                fingerprint=planned.fingerprint,
                config=config.model_dump(mode="json"),
                inputs=planned.inputs,
                upstream_paths=upstream_paths,
                workdir=str(store.workdir),
                tracking_uri=tracker.tracking_uri,
                parent_run_id=parent_id,
                recompute=recompute_this,
                return_state=True,
            )
            state.result()  # raises the stage's own error if it failed
            if state.name == "Cached":
                # Cached only if the plan verified the folder (else refresh_cache was set).
                manifest = store.manifest(planned.name, planned.fingerprint)
                log.info("%s: cached (%s)", planned.name, planned.path)
                log_cached_run(planned.name, manifest, tracker, parent_id, planned.path)
                cached_count += 1
            paths[planned.name] = str(planned.path)
        tracker.log_metrics(
            parent_id,
            {"seconds": time.perf_counter() - started, "stages_cached": cached_count},
        )
        tracker.set_tags(parent_id, {f"gen2embed.path.{k}": v for k, v in paths.items()})
    return paths
