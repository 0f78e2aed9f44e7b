"""Prefect deployments of the pipeline, defined once in `deployments/prefect.yaml`.

`gen2embed up` serves them (a child process running `python -m flows.deployments`, next to
the servers it starts: the UI's "Run" button and the nightly schedule then start runs with
no worker to set up); `gen2embed deploy` registers them on a Prefect server and work pool the
user runs. Both validate the file, every deployment's parameters included (preset, rows,
settings), before touching any server, so a typo fails in seconds with one message.

Missed schedules are never caught up: Prefect's runner starts every past-due scheduled run
it finds (after a weekend off, one run per missed night, all at once); on start-up the
auto-scheduled runs already past due are cancelled instead, saying why.
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import sys
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from embedder.config import ConfigError
from embedder.errors import UserError

DEFAULT_FILE = Path(__file__).resolve().parents[1] / "deployments" / "prefect.yaml"
ENTRYPOINT = "flows/pipeline.py:pipeline"
NIGHTLY = "nightly-retrain"
# Flow parameters that say where the data is: a deployment may leave them to the run form.
DATA_LOCATION = ("source", "train_dir", "train_images", "eval_dir", "eval_images")
# A scheduled run this far past its time when the runner starts is a missed one.
MISSED_AFTER = dt.timedelta(minutes=10)


class DeploymentError(UserError, ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CronSpec(_Strict):
    cron: str
    timezone: str = "UTC"
    active: bool = True


class ConcurrencySpec(_Strict):
    limit: int = Field(ge=1)
    collision_strategy: Literal["ENQUEUE", "CANCEL_NEW"] = "ENQUEUE"


class DeploymentSpec(_Strict):
    """One entry of prefect.yaml's `deployments` (the keys `prefect deploy` reads that we use)."""

    name: str
    entrypoint: str
    description: str | None = None
    tags: list[str] = Field(default_factory=list)
    parameters: dict[str, Any] = Field(default_factory=dict)
    schedules: list[CronSpec] = Field(default_factory=list)
    concurrency_limit: ConcurrencySpec | None = None
    work_pool: dict[str, Any] | None = None
    # Set by load_specs: what a run of it still needs in its form (a data location), if any.
    to_fill: str | None = Field(default=None, exclude=True)


def load_specs(path: Path | None = None, nightly_cron: str | None = None) -> list[DeploymentSpec]:
    """The deployments in `path`, each checked as a run would check it; `nightly_cron`
    replaces the nightly deployment's schedule (an explicit setting wins over the file)."""
    path = Path(path or DEFAULT_FILE)
    if not path.is_file():
        raise DeploymentError(f"deployments file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DeploymentError(f"deployments file {path} is not valid YAML: {exc}") from None
    entries = tree.get("deployments") if isinstance(tree, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DeploymentError(f"{path} has no `deployments:` list")
    specs = []
    for i, entry in enumerate(entries):
        label = entry.get("name", f"#{i + 1}") if isinstance(entry, dict) else f"#{i + 1}"
        try:
            spec = DeploymentSpec.model_validate(entry)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()
            )
            raise DeploymentError(f"{path}: deployment {label}: {problems}") from None
        if spec.entrypoint != ENTRYPOINT:
            raise DeploymentError(
                f"{path}: deployment {label}: entrypoint must be {ENTRYPOINT} (the pipeline)"
            )
        _check_parameters(path, spec)
        specs.append(spec)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise DeploymentError(f"{path}: deployment names repeat: {', '.join(names)}")
    if nightly_cron is not None:
        nightly = next((s for s in specs if s.name == NIGHTLY), None)
        if nightly is None:
            raise DeploymentError(f"--nightly-cron given but {path} has no {NIGHTLY} deployment")
        nightly.schedules = [CronSpec(cron=nightly_cron)]
    for spec in specs:
        for schedule in spec.schedules:
            _check_schedule(schedule, f"{path}: deployment {spec.name}: ")
    return specs


def _check_schedule(schedule: CronSpec, where: str) -> None:
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=schedule.cron, timezone=schedule.timezone)
    except ValidationError as exc:
        if any("timezone" in map(str, e["loc"]) for e in exc.errors()):
            raise DeploymentError(
                f"{where}timezone {schedule.timezone!r} is not known (e.g. UTC, Europe/Paris)"
            ) from None
        raise DeploymentError(
            f"{where}{schedule.cron!r} is not a cron expression (five fields, e.g. '0 2 * * *')"
        ) from None


def _check_parameters(path: Path, spec: DeploymentSpec) -> None:
    """The parameters as the flow's form would validate them, then as the run would load its
    configuration: an unknown preset, row or setting fails here, not at 2 a.m."""
    from flows.pipeline import pipeline, pipeline_config

    hints = typing.get_type_hints(pipeline.fn)
    form = create_model(  # the flow's signature as a strict model: unknown names refused
        "PipelineParameters",
        __config__=ConfigDict(extra="forbid"),
        **{
            name: (hints[name], param.default)
            for name, param in inspect.signature(pipeline.fn).parameters.items()
        },
    )
    try:
        form.model_validate(spec.parameters)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e['input']!r})" for e in exc.errors()
        )
        raise DeploymentError(f"{path}: deployment {spec.name}: parameters: {problems}") from None
    try:
        pipeline_config(**spec.parameters)
    except ConfigError as exc:
        # The paper's recipes cannot know where a user's MMEB images are: if the rest holds
        # (checked on the built-in world), the form must only be completed before a run.
        local = {k: v for k, v in spec.parameters.items() if k not in DATA_LOCATION}
        try:
            pipeline_config(**local, source="world")
        except ConfigError:
            raise DeploymentError(f"{path}: deployment {spec.name}: {exc}") from None
        spec.to_fill = exc.problems[-1]


def runner_deployments(specs: list[DeploymentSpec]) -> list[Any]:
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Schedule

    from flows.pipeline import pipeline

    out = []
    for spec in specs:
        limit = None
        if spec.concurrency_limit is not None:
            limit = ConcurrencyLimitConfig(
                limit=spec.concurrency_limit.limit,
                collision_strategy=ConcurrencyLimitStrategy(
                    spec.concurrency_limit.collision_strategy
                ),
            )
        schedules = [
            Schedule(cron=s.cron, timezone=s.timezone, active=s.active) for s in spec.schedules
        ]
        out.append(
            pipeline.to_deployment(
                name=spec.name,
                description=spec.description,
                tags=spec.tags,
                parameters=spec.parameters,
                schedules=schedules or None,
                concurrency_limit=limit,
                # By module, not by file: runs import the installed package, from any folder.
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        )
    return out


def cancel_missed_runs(deployment_ids: list[Any], now: dt.datetime | None = None) -> list[str]:
    """Cancel the auto-scheduled runs of these deployments that are past due by more than
    MISSED_AFTER (nothing served them); returns their names."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    cutoff = (now or dt.datetime.now(dt.UTC)) - MISSED_AFTER
    cancelled = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=deployment_ids)),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
                expected_start_time=FlowRunFilterExpectedStartTime(before_=cutoff),
            ),
        )
        for run in (r for r in runs if r.auto_scheduled):  # not runs a person started
            when = run.expected_start_time
            message = f"missed: due {when:%Y-%m-%d %H:%M %Z} while nothing served it (no catch-up)"
            client.set_flow_run_state(run.id, Cancelled(message=message), force=True)
            cancelled.append(run.name)
    return cancelled


def serve_deployments(path: Path | None, nightly_cron: str | None) -> None:
    """Apply the deployments to the server in PREFECT_API_URL and serve them until stopped."""
    from prefect import serve

    deployments = runner_deployments(load_specs(path, nightly_cron))
    ids = [d.apply() for d in deployments]
    missed = cancel_missed_runs(ids)
    if missed:
        print(f"cancelled {len(missed)} missed scheduled run(s): {', '.join(missed)}", flush=True)
    serve(*deployments, print_starting_message=False)


def register(pool: str, path: Path | None, nightly_cron: str | None) -> list[str]:
    """Register the deployments on the Prefect server in PREFECT_API_URL for work pool `pool`."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    specs = load_specs(path, nightly_cron)  # before any server is contacted
    api = PREFECT_API_URL.value()
    if not api:
        raise DeploymentError(
            "gen2embed deploy registers on your own Prefect server: set PREFECT_API_URL "
            "(or use `gen2embed up`, which serves the deployments itself)"
        )
    try:
        with get_client(sync_client=True) as client:
            client.read_work_pool(pool)
    except ObjectNotFound:
        raise DeploymentError(
            f"work pool {pool!r} does not exist on {api}; create it with "
            f"`prefect work-pool create {pool} --type process`"
        ) from None
    except Exception as exc:
        raise DeploymentError(f"cannot reach the Prefect server at {api} ({exc})") from None
    names = []
    for deployment in runner_deployments(specs):
        deployment.apply(work_pool_name=pool)
        names.append(f"gen2embed/{deployment.name}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deployments", description=__doc__)
    parser.add_argument("--file", type=Path, default=None)
    parser.add_argument("--nightly-cron", default=None)
    args = parser.parse_args(argv)
    try:
        serve_deployments(args.file, args.nightly_cron)
    except UserError as exc:
        print(f"gen2embed deployments: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
