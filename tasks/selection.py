"""What a run recomputes: the plan of a pipeline's stage calls and the rules of `--from`,
`--force` and `--until`.

`plan` calls the pipeline's method with a runner that only records each call, so
`gen2embed stages` and the checks here see exactly the calls a run would make, computing
nothing. `Selection` then tells each call of a run its mode (tasks.execute.Mode): recompute
what was named and everything downstream of a recomputed call, reuse-only before `--from`,
compute-or-reuse otherwise; and when `--until` is done.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from embedder.artifacts import ArtifactStore
from embedder.config import PipelineConfig
from tasks.execute import Mode, PipelineError
from tasks.stage import OutputT, StageCall, current_row, running, stage_label


@dataclass(frozen=True)
class PlannedStage:
    name: str
    fingerprint: str
    problems: tuple[str, ...] | None  # None: not checked
    upstream: tuple[str, ...] = ()  # the stages whose outputs it reads
    row: str | None = None  # the table row it belongs to (None: shared by every row)

    @property
    def label(self) -> str:
        return stage_label(self.name, self.row)

    @property
    def cached(self) -> bool:
        return self.problems == ()


def plan(
    method: Callable[[PipelineConfig], Any],
    cfg: PipelineConfig,
    store: ArtifactStore,
    *,
    verify: bool = False,
) -> list[PlannedStage]:
    """The stages `method(cfg)` would run, in order, with their fingerprints (and, with
    `verify`, whether each is published), computing nothing."""
    planned: list[PlannedStage] = []

    def record(call: StageCall[OutputT]) -> OutputT:
        name, fp = call.stage.name, call.fingerprint
        problems = tuple(store.verify(name, fp)) if verify else None
        upstream = tuple(u.stage for u in call.upstream.values() if u is not None)
        planned.append(PlannedStage(name, fp, problems, upstream, current_row()))
        # A stand-in carrying what downstream fingerprints need; nothing is read.
        return call.stage.output_type(folder=store.path(name, fp), stage=name, fingerprint=fp)

    with running(record):
        method(cfg)
    return planned


def check_selection(
    planned: list[PlannedStage],
    from_stage: str | None = None,
    force: list[str] | None = None,
    until: str | None = None,
) -> None:
    """--from / --force / --until name stages of this pipeline, and --from finds every stage
    it will not run already published. Needs only a plan: runs before any server starts.

    Raises PipelineError naming the option and the stages."""
    names = [p.name for p in planned]
    options = [("--from", from_stage), ("--until", until)]
    for option, name in options + [("--force", f) for f in force or []]:
        if name is not None and name not in names:
            raise PipelineError(
                f"{option} {name}: not part of this pipeline (stages: {', '.join(names)})"
            )
    if from_stage is None:
        return
    if until is not None:  # stages after --until's last call do not run: they need nothing
        planned = planned[: len(names) - names[::-1].index(until)]
    downstream = {from_stage}
    for p in planned:
        if downstream.intersection(p.upstream):
            downstream.add(p.name)
    missing = [p.name for p in planned if p.name not in downstream and not p.cached]
    if missing:
        raise PipelineError(
            f"--from {from_stage} needs published results of {', '.join(missing)}; "
            "run without --from first"
        )


class StopAfter(Exception):
    """Raised after the --until stage's last call; ends the run early and cleanly."""


@dataclass
class Selection:
    """The run's choice of what to recompute, applied call by call."""

    from_stage: str | None = None
    force: set[str] = field(default_factory=set)
    until: str | None = None
    until_calls: int = 0  # how many calls of the --until stage the plan holds
    recomputed: set[str] = field(default_factory=set)  # fingerprints recomputed on purpose
    done: set[str] = field(default_factory=set)  # fingerprints already run (rows share stages)

    def mode(self, call: StageCall[Any]) -> Mode:
        """How this call runs: `recompute` when its stage is forced or --from, or an upstream
        call was recomputed; `reuse` (published results only) before --from; else
        `compute`. A fingerprint a row already ran in this run is reused as computed."""
        if call.fingerprint in self.done:
            return "compute"
        upstream_recomputed = any(
            u is not None and u.fingerprint in self.recomputed for u in call.upstream.values()
        )
        name = call.stage.name
        if name in self.force or name == self.from_stage or upstream_recomputed:
            return "recompute"
        return "reuse" if self.from_stage else "compute"

    def ran(self, call: StageCall[Any], mode: Mode) -> None:
        """Record that `call` ran in `mode`; raises StopAfter after --until's last call."""
        if mode == "recompute":
            self.recomputed.add(call.fingerprint)
        self.done.add(call.fingerprint)
        if call.stage.name == self.until:
            self.until_calls -= 1
            if self.until_calls <= 0:
                raise StopAfter
