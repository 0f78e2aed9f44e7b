"""What a stage is: an embedder function, the config sections and upstream outputs its
signature names, and the fingerprint that names its published folder.

A stage function (embedder/) takes its config sections (the pydantic models of
`PipelineConfig`), its upstream stages' outputs (embedder.outputs), an output folder
`out: Path` and, when its work can be shared out over workers, `shard: ShardSlice | None`.
`Stage(name, function)` reads that shape from the signature. Calling a stage,
`stage(cfg, data=tables, generator=gen)`, gives it its upstream outputs by parameter name
and hands the resulting `StageCall` to whatever the caller is inside: a pipeline run
executes it (tasks.pipeline_run), a plan only records it (tasks.selection), the torchrun
job computes one stage and reads the others (flows.torchrun_finetune).

The fingerprint hashes the stage's sections, its upstream fingerprints, any further inputs
(a source file's content, a model's commit) and the code version (the import closure of the
function's module): docs/design.md, "Caching and resume".
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from embedder.artifacts import ArtifactStore, Manifest, code_version, fingerprint
from embedder.config import PipelineConfig
from embedder.model.shards import ShardSlice
from embedder.outputs import StageOutput

log = logging.getLogger("gen2embed.stage")
OutputT = TypeVar("OutputT", bound=StageOutput)

# The parameters a stage function may take besides sections and upstream outputs.
OUT = "out"
SHARD = "shard"


def _without_none(hint: Any) -> Any:
    """`X | None` -> X (an optional upstream stage), anything else unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


@dataclass(frozen=True)
class DatasetRef:
    """A table recorded as an MLflow dataset input: where it is, what it holds, its role."""

    name: str
    path: Path
    digest: str
    rows: int
    context: str  # MLflow's input context: train, eval


class Stage(Generic[OutputT]):
    """One pipeline stage: an embedder function plus how to cache, publish and track it.

    Raises TypeError at definition when the function's signature takes anything but config
    sections, upstream outputs, `out` and (for a fan-out stage, required there) `shard`.
    """

    def __init__(
        self,
        name: str,
        function: Callable[..., OutputT],
        *,
        resumable: bool = False,
        inputs: Callable[..., dict[str, str]] | None = None,
        headline: Callable[[Any], dict[str, float]] | None = None,
        datasets: Callable[[Any], list[DatasetRef]] | None = None,
        fan_out: bool = False,
    ) -> None:
        self.name = name
        self.function = function
        # Long stages resume inside their partial folder; others start it afresh.
        self.resumable = resumable
        # Fingerprint inputs beyond the upstream stages (ingest: the source files), called
        # with the stage's sections by parameter name.
        self.inputs = inputs
        # The results a run's parent shows (per table row) so runs compare in MLflow's table.
        self.headline = headline
        # Tables the stage read or wrote, recorded as MLflow dataset inputs of the run.
        self.datasets = datasets
        # Its shards can be computed by several workers at once (scale.engine, tasks.scale).
        self.fan_out = fan_out
        if fan_out and not resumable:
            raise ValueError(f"stage {name}: fan-out needs a resumable stage")
        hints = typing.get_type_hints(function)
        section_fields = {
            info.annotation: field
            for field, info in PipelineConfig.model_fields.items()
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)
        }
        self.sections: dict[str, str] = {}  # parameter -> PipelineConfig field
        # Parameters taking upstream outputs, with the output type each expects.
        self.upstream: dict[str, type[StageOutput]] = {}
        self.takes_shard = False
        for param in inspect.signature(function).parameters:
            hint = _without_none(hints[param])
            if param == OUT:
                continue
            if param == SHARD and hint is ShardSlice:
                self.takes_shard = True
            elif hint in section_fields:
                self.sections[param] = section_fields[hint]
            elif isinstance(hint, type) and issubclass(hint, StageOutput):
                self.upstream[param] = hint
            else:
                raise TypeError(
                    f"{function.__qualname__}({param}: {hint}): a stage function takes config "
                    "sections, upstream stage outputs, `out: Path` and (fan-out stages) "
                    "`shard: ShardSlice | None`"
                )
        if fan_out and not self.takes_shard:
            raise TypeError(f"stage {name}: a fan-out stage's function takes `shard`")
        self.output_type: type[OutputT] = hints["return"]

    @cached_property
    def code_version(self) -> str:
        return code_version(self.function)

    def __call__(self, cfg: PipelineConfig, **upstream: StageOutput | None) -> OutputT:
        """Apply the stage to `cfg` and its upstream outputs, each given by the function's
        parameter name (`stages.mine(cfg, cands=cands, emb=emb)`; None for an optional
        stage that did not run), and hand the call to the current runner (`running`).

        Raises TypeError when a name is missing or unknown or an output has the wrong type;
        RuntimeError outside a runner."""
        expected = ", ".join(f"{p}: {t.__name__}" for p, t in self.upstream.items())
        wrong = set(upstream) ^ set(self.upstream) or [
            p for p, u in upstream.items() if u is not None and not isinstance(u, self.upstream[p])
        ]
        if wrong:
            raise TypeError(
                f"stage {self.name} takes ({expected or 'no upstream outputs'}) by name; "
                f"check {', '.join(sorted(wrong))}"
            )
        sections = {f: getattr(cfg, f) for f in self.sections.values()}
        ordered = [upstream[p] for p in self.upstream]
        inputs = {u.stage: u.fingerprint for u in ordered if u is not None}
        if self.inputs is not None:
            by_param = {p: sections[f] for p, f in self.sections.items()}
            inputs.update(self.inputs(**by_param))
        call = StageCall(
            self,
            fingerprint(self.name, dump_sections(sections), inputs, self.code_version),
            sections,
            {p: upstream[p] for p in self.upstream},
            inputs,
        )
        runner = _RUNNER.get(None)
        if runner is None:
            raise RuntimeError(f"stage {self.name} called outside a PipelineRun or plan()")
        return runner(call)

    def published(self, store: ArtifactStore, fp: str) -> tuple[OutputT, Manifest] | None:
        """The published output of fingerprint `fp` (with its manifest) if its folder passes
        verification (embedder.artifacts), else None. Reads; never writes or locks."""
        manifest = store.load(self.name, fp)
        if manifest is None:
            return None
        try:
            return self.restore(store, manifest), manifest
        except ValidationError as exc:  # a folder from before its output was recorded
            log.info("%s: manifest does not describe the output (%s)", self.name, exc)
            return None

    def restore(self, store: ArtifactStore, manifest: Manifest) -> OutputT:
        """The output recorded in a published folder's manifest, paths resolved against
        the workdir. Raises pydantic.ValidationError when the manifest does not describe
        an output of this stage's type."""
        output = self.output_type.model_validate(
            {
                **manifest.output,
                "folder": store.path(self.name, manifest.fingerprint),
                "stage": self.name,
                "fingerprint": manifest.fingerprint,
                "rows": manifest.rows,
                "metrics": manifest.metrics,
                "info": manifest.info,
            }
        )
        return output.resolved(store.workdir)


@dataclass(frozen=True)
class StageCall(Generic[OutputT]):
    """A stage applied to its config sections and upstream outputs: what its task gets."""

    stage: Stage[OutputT]
    fingerprint: str
    sections: dict[str, BaseModel]  # PipelineConfig field -> section
    upstream: dict[str, StageOutput | None]  # function parameter -> output
    inputs: dict[str, str]  # what the fingerprint hashed besides the sections

    def arguments(self, out: Path, shard: ShardSlice | None = None) -> dict[str, Any]:
        """The stage function's keyword arguments, writing into `out`; `shard`: the share of
        the work this call computes (a fan-out worker), None for all of it. Raises
        ValueError for a shard given to a stage that cannot share out its work."""
        if shard is not None and not self.stage.takes_shard:
            raise ValueError(f"stage {self.stage.name} does not share out its work")
        by_param = {p: self.sections[f] for p, f in self.stage.sections.items()}
        extra = {SHARD: shard} if self.stage.takes_shard else {}
        return {**by_param, **self.upstream, OUT: out, **extra}

    def config(self) -> dict[str, Any]:
        """The sections as JSON-ready dicts: the manifest's config, the MLflow run's params."""
        return dump_sections(self.sections)


def dump_sections(sections: dict[str, BaseModel]) -> dict[str, Any]:
    return {name: section.model_dump(mode="json") for name, section in sections.items()}


def stage_label(name: str, row: str | None) -> str:
    """How the UIs and the logs name a stage call: `embed`, `finetune[saha-hierarchical]`."""
    return name if row is None else f"{name}[{row}]"


# What calling a stage does: a pipeline run executes it, a plan records it, the torchrun
# job computes one stage. It decides how a call is carried out, never what it returns.
_RUNNER: contextvars.ContextVar[Callable[[StageCall[Any]], Any]] = contextvars.ContextVar(
    "gen2embed_runner"
)
# The table row whose stages are being called (None: the shared stages): it names task runs
# and nests MLflow runs; no stage function sees it.
_ROW: contextvars.ContextVar[str | None] = contextvars.ContextVar("gen2embed_row", default=None)


@contextmanager
def running(runner: Callable[[StageCall[Any]], Any]) -> Iterator[None]:
    """Inside the block, calling a stage hands its StageCall to `runner`."""
    token = _RUNNER.set(runner)
    try:
        yield
    finally:
        _RUNNER.reset(token)


@contextmanager
def in_row(name: str) -> Iterator[None]:
    """Stage calls inside belong to table row `name` (`current_row`)."""
    token = _ROW.set(name)
    try:
        yield
    finally:
        _ROW.reset(token)


def current_row() -> str | None:
    return _ROW.get()
