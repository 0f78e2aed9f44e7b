"""One run of the pipeline under Prefect and MLflow: `PipelineRun`.

It opens the MLflow parent run (named after the Prefect flow run for a deployment's run,
with the settings changed from the preset and a link back), one nested run per table row
(`table_row`), and executes each stage call as a Prefect task (tasks.stage_task) in the
mode the run's selection gives it (tasks.selection): the task's graph edges are exactly the
upstream stages. Fan-out stages get their shard tasks on a Dask cluster started on first
need (tasks.scale). Then the run's report and registry (tasks.registry).
"""

from __future__ import annotations

import contextvars
import json
import logging
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.exceptions import TerminationSignal
from prefect.runtime import deployment, flow_run
from prefect.states import State
from prefect.utilities.annotations import quote

from embedder.artifacts import ArtifactStore
from embedder.config import PipelineConfig, load_config
from embedder.report import RowResult
from tasks.cards import embed_pictures, pipeline_run_card, report_cards
from tasks.execute import RunSettings
from tasks.registry import RegistryError, register_adapter
from tasks.selection import Selection, StopAfter, check_selection, plan
from tasks.stage import OutputT, StageCall, current_row, in_row, running, stage_label
from tasks.stage_task import stage_task
from tasks.tracking import Tracker, source_tags

log = logging.getLogger("gen2embed.stage")

# How the current PipelineRun opens a table row's MLflow run (an observer: names and
# nesting, no result).
_ROW_SCOPE: contextvars.ContextVar[Callable[[str], Any]] = contextvars.ContextVar(
    "gen2embed_row_scope"
)


@contextmanager
def table_row(name: str) -> Iterator[None]:
    """Stages called inside belong to table row `name`: their task runs carry its name and
    their MLflow runs nest under the row's own run (which gets their metrics)."""
    with in_row(name):
        scope = _ROW_SCOPE.get(None)
        if scope is None:
            yield
        else:
            with scope(name):
                yield


def prefect_run_url() -> str | None:
    """The current flow run's page in the Prefect UI (the route the UI itself links to),
    when a UI serves this run's API; None for a run's own temporary server, which serves no
    UI (flows.temporary_server sets PREFECT_UI_URL empty)."""
    from prefect.settings import PREFECT_UI_URL

    ui, run_id = PREFECT_UI_URL.value(), flow_run.get_id()
    return f"{str(ui).rstrip('/')}/runs/flow-run/{run_id}" if ui and run_id else None


def _run_note(name: str, preset: str, changed: dict[str, Any], prefect_url: str | None) -> str:
    """The MLflow run's description (markdown): where it came from and what it changed."""
    lines = [f"gen2embed pipeline run **{name}**, preset `{preset}`."]
    if prefect_url:
        lines.append(f"Prefect flow run: [{name}]({prefect_url})")
    if changed:
        lines.append("Settings changed from the preset: " + ", ".join(
            f"`{k}={json.dumps(v)}`" for k, v in changed.items()
        ))  # fmt: skip
    return "\n\n".join(lines)


def crash_flow_runs(flow_run_ids: set[str]) -> None:
    """Mark Crashed the Prefect flow runs (and their task runs) of processes that died while
    running them: Prefect itself leaves them Running forever."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    message = "its process is gone (found by the next gen2embed run)"
    with get_client(sync_client=True) as client:
        for flow_run_id in flow_run_ids:
            try:
                run = client.read_flow_run(UUID(flow_run_id))
            except (ObjectNotFound, ValueError):
                continue  # another Prefect server's run, or no id
            if run.state is not None and not run.state.is_final():
                client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            only_this = FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
            for task_run in client.read_task_runs(flow_run_filter=only_this):
                if task_run.state is not None and not task_run.state.is_final():
                    client.set_task_run_state(task_run.id, Crashed(message=message), force=True)


class PipelineRun:
    """One run of the pipeline: the MLflow parent run, the choice of what to recompute
    (--from / --force / --until) and the published folder of every stage that ran."""

    def __init__(
        self,
        method: Callable[[PipelineConfig], Any],
        cfg: PipelineConfig,
        workdir: str | None,
        *,
        preset: str,
        name: str | None = None,
        from_stage: str | None = None,
        force: list[str] | None = None,
        until: str | None = None,
    ) -> None:
        self.store = ArtifactStore(workdir)
        planned = plan(method, cfg, self.store, verify=from_stage is not None)
        check_selection(planned, from_stage, force, until)
        self.tracker = Tracker.for_workdir(self.store.workdir)
        self.cfg, self.preset, self.name = cfg, preset, name or preset
        self.selection = Selection(
            from_stage, set(force or []), until, sum(p.name == until for p in planned)
        )
        self.states: dict[str, State] = {}  # fingerprint -> final state of its task run
        self.paths: dict[str, str] = {}  # stage label (with its row) -> published folder
        self.warnings: list[str] = []
        self.cached = 0
        self.row_ids: dict[str, str] = {}  # table row -> its MLflow run
        self.logged_inputs: set[str] = set()  # fingerprints whose tables are logged
        self._shard_runner: str | None = None  # the Dask task runner's key (tasks.scale)
        self._exit = ExitStack()

    def __enter__(self) -> PipelineRun:
        swept = self.tracker.sweep_stale_runs()
        if swept:
            log.warning("marked %d MLflow run(s) of dead processes as KILLED", len(swept))
            crash_flow_runs({f for f in swept.values() if f})
        self.started = time.perf_counter()
        # A run of a deployment (the UI's Run button, a schedule) carries its Prefect flow
        # run's name into MLflow (`ui-finetune20` in both); a direct call keeps the preset
        # and rows (Prefect would draw a random name; `gen2embed run` names its flow run so
        # too). Beside it: the settings that differ from the preset, and a link back.
        name = self.name
        if flow_run.get_id() and deployment.get_id():
            name = flow_run.get_name() or name
        changed = self.cfg.changed_from(load_config(self.preset))
        prefect_url = prefect_run_url()
        tags = {
            "prefect.flow_run_id": str(flow_run.get_id() or ""),
            "prefect.flow_run_name": name,
            "gen2embed.preset": self.preset,
            "gen2embed.pipeline": "true",
            **source_tags(),
        }
        if changed:
            tags["gen2embed.settings"] = ", ".join(
                f"{k}={json.dumps(v)}" for k, v in changed.items()
            )[:5000]
        if prefect_url:
            tags["prefect.flow_run_url"] = prefect_url
        tags["mlflow.note.content"] = _run_note(name, self.preset, changed, prefect_url)
        params = self.cfg.model_dump(mode="json")
        self.parent_id = self._exit.enter_context(self.tracker.run(name, tags=tags, params=params))
        self.name = name
        url = self.tracker.run_url(self.parent_id)
        if url and flow_run.get_id():
            pipeline_run_card(url, name)
        self._exit.enter_context(running(self.run))
        token = _ROW_SCOPE.set(self.row_scope)
        self._exit.callback(_ROW_SCOPE.reset, token)
        return self

    @contextmanager
    def row_scope(self, row: str) -> Iterator[None]:
        """A table row's MLflow run, nested under the pipeline's; its stages nest under it
        and their metrics are logged on it as `<stage>.<metric>`."""
        tags = {
            "gen2embed.row": row,
            "gen2embed.preset": self.preset,
            "prefect.flow_run_id": str(flow_run.get_id() or ""),
        }
        stopped: StopAfter | None = None
        with self.tracker.run(row, parent_run_id=self.parent_id, tags=tags) as run_id:
            self.row_ids[row] = run_id
            try:
                yield
            except StopAfter as stop:  # --until: the row ends FINISHED, not FAILED
                stopped = stop
            finally:
                del self.row_ids[row]
        if stopped is not None:
            raise stopped

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if kind is None or kind is StopAfter:
            elapsed = time.perf_counter() - self.started
            metrics = {"seconds": elapsed, "stages_cached": self.cached}
            self.tracker.log_metrics(self.parent_id, metrics)
            # MLflow tag keys allow no brackets: evaluate[row] -> evaluate.row
            tags = {
                f"gen2embed.path.{k.replace('[', '.').rstrip(']')}": v
                for k, v in self.paths.items()
            }
            if self.warnings:
                tags["gen2embed.warnings"] = " | ".join(self.warnings)[:5000]
            self.tracker.set_tags(self.parent_id, tags)
            self._exit.close()
            return True
        return bool(self._exit.__exit__(kind, exc, tb))

    def publish_report(self, folder: Path) -> None:
        """The run's comparison table: files on the MLflow parent run, a Prefect artifact."""
        for path in sorted(folder.iterdir()):
            self.tracker.log_file(self.parent_id, path, "report")
        self.tracker.set_tags(self.parent_id, {"gen2embed.report": str(folder)})
        markdown = embed_pictures((folder / "report.md").read_text(), folder)
        report_cards(markdown, json.loads((folder / "table.json").read_text()))
        self.paths["report"] = str(folder)

    def _shards(self, label: str) -> Any:
        """How a fan-out stage's shard tasks run, when its stage task computes: on the run's
        Dask cluster (one for the run), started when a stage first computes its shards."""
        from tasks.scale import Shards, runner_for, task_count

        if self._shard_runner is None:
            self._shard_runner = self._exit.enter_context(runner_for(self.cfg.scale))
        return Shards(self._shard_runner, label, task_count(self.cfg.scale))

    def register_adapters(self, results: list[RowResult]) -> None:
        """Each fine-tuned row's adapter as an MLflow model version (registry.*)."""
        if not self.cfg.registry.enabled:
            return
        for result in results:
            if result.adapter is None:
                continue
            row = result.row.name
            try:
                done = register_adapter(
                    self.tracker, self.cfg, result.row, result.adapter, result.evaluation,
                    self.parent_id, lock=self.store.workdir / "cache" / "registry.lock",
                )  # fmt: skip
            except RegistryError as exc:  # the run's results stand; the version is not made
                self.warnings.append(f"registry {row}: not registered: {exc}")
                log.warning("%s: not registered: %s", row, exc)
                self.tracker.set_tags(
                    self.parent_id, {f"gen2embed.registered.{row}": f"not registered: {exc}"[:5000]}
                )
                continue
            self.tracker.set_tags(
                self.parent_id,
                {
                    f"gen2embed.registered.{row}": f"{done.name}/{done.version}",
                    f"gen2embed.champion.{row}": ("champion: " if done.champion else "")
                    + done.reason,
                },
            )
            log.info("%s: %s (%s)", row, done.uri, done.reason)

    def run(self, call: StageCall[OutputT]) -> OutputT:
        """Execute `call` as its stage's Prefect task in the mode the selection gives it;
        returns its output, raises the stage's own error. Rows sharing a call share its
        folder; its metrics go to the row's run and its headline to the parent."""
        mode = self.selection.mode(call)
        row = current_row()
        label = stage_label(call.stage.name, row)
        settings = RunSettings(
            workdir=str(self.store.workdir),
            tracking_uri=self.tracker.tracking_uri,
            parent_run_id=self.row_ids.get(row or "", self.parent_id),
            mode=mode,
            from_stage=self.selection.from_stage,
            label=label,
            row=row,
        )
        fans_out = call.stage.fan_out and self.cfg.scale.engine != "none" and mode != "reuse"
        shards = self._shards(label) if fans_out else None
        # Arguments are quoted (Prefect matches results by identity, and an interned string
        # such as a stage name would draw false edges); the run graph's edges are exactly the
        # upstream stages, given as `wait_for`. One naming rule for every task run: the
        # stage label (`embed`, `mine[saha-...]`).
        upstream = [self.states[u.fingerprint] for u in call.upstream.values() if u is not None]
        task = stage_task(call.stage).with_options(task_run_name=label)
        state = task(
            quote(call), quote(settings), quote(shards), wait_for=upstream, return_state=True
        )
        if state.is_cancelled():  # the Cancel button: the flow ends the way Prefect cancels
            raise TerminationSignal(signal.SIGTERM)
        self.states[call.fingerprint] = state
        output: OutputT = state.result().unquote()  # raises the stage's own error if it failed
        self.cached += state.name == "Cached"
        self.paths[label] = str(output.folder)
        self.warnings += [f"{label}: {w}" for w in output.info.get("warnings", [])]
        if row is not None and row in self.row_ids:
            metrics = {f"{call.stage.name}.{k}": v for k, v in output.metrics.items()}
            self.tracker.log_metrics(self.row_ids[row], metrics)
        if call.stage.headline is not None:
            # On the parent, per row ("saha-hierarchical/p1.overall"): MLflow's runs table
            # and compare view then set whole runs side by side.
            prefix = f"{row}/" if row is not None else ""
            headline = {f"{prefix}{k}": v for k, v in call.stage.headline(output).items()}
            self.tracker.log_metrics(self.parent_id, headline)
        if call.stage.datasets is not None and call.fingerprint not in self.logged_inputs:
            self.logged_inputs.add(call.fingerprint)
            self.tracker.log_datasets(self.parent_id, call.stage.datasets(output))
        self.selection.ran(call, mode)  # after --until's last call: StopAfter
        return output
