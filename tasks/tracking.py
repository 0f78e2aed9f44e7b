"""MLflow bookkeeping: one parent run per pipeline run, one nested run per stage.

Runs are driven through an explicit `MlflowClient` with explicit run ids rather than the
fluent API, whose active-run stack is per thread (Prefect runs tasks in worker threads) and
which `MLFLOW_RUN_ID` in the environment can silently redirect. Every run is ended in a
`finally`: exceptions end it FAILED, interrupts KILLED, and runs left RUNNING by a process
that died are swept to KILLED when the next pipeline starts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.time import get_current_time_millis
from prefect.exceptions import TerminationSignal

from embedder.artifacts import create_once

log = logging.getLogger("gen2embed.tracking")
EXPERIMENT = "gen2embed"
DB_FILE = "mlflow.db"
PARENT_TAG = "mlflow.parentRunId"


def default_tracking_uri(workdir: Path) -> str:
    """$MLFLOW_TRACKING_URI if set (e.g. a running server), else SQLite in the workdir."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workdir / DB_FILE}"


def create_store(workdir: Path) -> None:
    """Create the workdir's MLflow database once (embedder.artifacts.create_once): the tables
    and the experiment are built in a temporary file renamed into place, so a kill at any
    point leaves no database or a complete one (MLflow migrates in place, unlocked)."""

    def build(tmp: Path) -> None:
        location = (workdir / "mlartifacts").resolve().as_uri()
        # MLflow announces each migration step at INFO: not news for the person at the console.
        store_log = logging.getLogger("mlflow.store.db.utils")
        level = store_log.level
        store_log.setLevel(logging.WARNING)
        try:
            MlflowClient(tracking_uri=f"sqlite:///{tmp}").create_experiment(
                EXPERIMENT, artifact_location=location
            )
        finally:
            store_log.setLevel(level)

    create_once(workdir / DB_FILE, build)


CODE_ROOT = Path(__file__).resolve().parents[1]


def source_tags() -> dict[str, str]:
    """MLflow's source tags: the code's git commit (and whether the tree had changes), so a
    run can be traced to the code that made it; empty outside a git checkout."""
    tags = {"mlflow.source.name": "gen2embed", "mlflow.source.type": "PROJECT"}

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(CODE_ROOT), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        changed = git("status", "--porcelain", "--untracked-files=no")
        tags["gen2embed.git.dirty"] = str(bool(changed))
    return tags


def flatten_params(section: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in section.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:6000]  # MLflow's limit on a param value
    return out


def _first_line(exc: BaseException) -> str:
    # SQLAlchemy prefixes "(raised as a result of Query-invoked autoflush ...)": skip it.
    lines = [ln for ln in str(exc).splitlines() if ln and not ln.startswith("(raised as")]
    return lines[0] if lines else type(exc).__name__


def metric_value(value: float) -> float:
    """`value` to 12 significant digits: the float noise of sums and means (the 17th digit)
    gone, every digit a measurement carries kept. NaN and infinities pass through."""
    value = float(value)
    return float(f"{value:.12g}") if math.isfinite(value) else value


# MLflow 3 opens in its GenAI view (traces) unless told otherwise: its UI reads the query
# parameter `workflowType` (then what its sidebar switch stored in the browser), not the
# experiment's `mlflow.experimentKind` tag (3.17 reads that only with workflow-based navigation
# off). Every link this project prints or shows carries the parameter; the tag is set too, for
# MLflow versions that read it.
MODEL_TRAINING = "workflowType=machine_learning"
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# The runs table with pipeline runs only (stage and row runs are nested under them).
PIPELINE_RUNS = "searchFilter=" + quote("tags.`mlflow.parentRunId` IS NULL", safe="")


def mlflow_ui_url(base: str, experiment_id: str, run_id: str | None = None) -> str:
    """A link into the MLflow UI at `base` (http://host:port) that opens in the
    model-training view: the run's page, or the experiment's runs table showing the pipeline
    runs (stage runs nest under them)."""
    root = f"{base.rstrip('/')}/#/experiments/{experiment_id}"
    if run_id is not None:
        return f"{root}/runs/{run_id}?{MODEL_TRAINING}"
    return f"{root}/runs?{MODEL_TRAINING}&{PIPELINE_RUNS}"


def compare_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    """MLflow's compare page for `run_ids` (model-training view; `runs` must come first)."""
    runs = quote(json.dumps(run_ids), safe="")
    experiments = quote(json.dumps([experiment_id]), safe="")
    return (
        f"{base.rstrip('/')}/#/compare-runs?runs={runs}&experiments={experiments}&{MODEL_TRAINING}"
    )


class Tracker:
    def __init__(self, tracking_uri: str, artifact_root: Path | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._end_failed = False
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        location = artifact_root.resolve().as_uri() if artifact_root is not None else None
        if exp is not None and location is not None and exp.artifact_location != location:
            # The workdir moved: MLflow keeps absolute artifact paths, so carry on in a fresh
            # experiment whose artifacts land in this workdir; the old one keeps its runs.
            moved = f"{EXPERIMENT} (artifacts at {exp.artifact_location})"
            self.client.rename_experiment(exp.experiment_id, moved)
            log.warning("the workdir moved: earlier MLflow runs are in experiment %r", moved)
            exp = None
        if exp is None:
            self.experiment_id = self.client.create_experiment(
                EXPERIMENT, artifact_location=location, tags=dict([EXPERIMENT_KIND])
            )
        else:
            self.experiment_id = exp.experiment_id
            if exp.tags.get(EXPERIMENT_KIND[0]) is None:  # made before the tag was set
                self.client.set_experiment_tag(self.experiment_id, *EXPERIMENT_KIND)

    @classmethod
    def for_workdir(cls, workdir: Path, tracking_uri: str | None = None) -> Tracker:
        uri = tracking_uri or default_tracking_uri(workdir)
        if uri == f"sqlite:///{workdir / DB_FILE}":
            create_store(workdir)
        artifacts = workdir / "mlartifacts" if uri.startswith("sqlite:") else None
        return cls(uri, artifacts)

    def run_url(self, run_id: str) -> str | None:
        """The run's page in the MLflow UI (model-training view), when the tracking server
        is the UI's; None for a file or SQLite store."""
        if self.tracking_uri.startswith("http"):
            return mlflow_ui_url(self.tracking_uri, self.experiment_id, run_id)
        return None

    def sweep_stale_runs(self) -> dict[str, str]:
        """End as KILLED the RUNNING runs started on this host by processes that are gone;
        returns their ids with the Prefect flow run each belonged to ("" if none)."""
        host = socket.gethostname()
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"attributes.status = 'RUNNING' and tags.`gen2embed.host` = '{host}'",
            max_results=1000,
        )
        swept = {}
        for run in runs:
            pid = int(run.data.tags.get("gen2embed.pid", "0") or 0)
            if pid and pid != os.getpid() and not psutil.pid_exists(pid):
                self.client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
                swept[run.info.run_id] = run.data.tags.get("prefect.flow_run_id", "")
        return swept

    @contextmanager
    def run(
        self,
        name: str,
        *,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> Iterator[str]:
        """Open a run, yield its id, and end it with the status the block earned."""
        all_tags = {
            "gen2embed.host": socket.gethostname(),
            "gen2embed.pid": str(os.getpid()),
            **(tags or {}),
        }
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        run_id = run.info.run_id
        status = RunStatus.FAILED
        try:
            if params:
                self.log_params(run_id, params)
            yield run_id
            status = RunStatus.FINISHED
        except (KeyboardInterrupt, SystemExit, TerminationSignal):
            # TerminationSignal: SIGTERM inside a flow, where Prefect's handler replaces ours.
            status = RunStatus.KILLED
            raise
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"[:5000]
            self._best_effort(self.client.set_tag, run_id, "gen2embed.error", error)
            raise
        finally:
            self._best_effort(self.client.set_terminated, run_id, RunStatus.to_string(status))

    def _best_effort(self, call: Any, *args: Any) -> None:
        """Bookkeeping while a run is already failing (a full disk, say) must not replace the
        error the user needs with MLflow's; a run left RUNNING is swept by the next start.
        MLflow's store logs each failed statement with its traceback: muted here, and only the
        first failure of a run is reported (the parent and every stage hit the same wall)."""
        store_log = logging.getLogger("mlflow.store.db.utils")
        muted, store_log.disabled = store_log.disabled, True
        try:
            call(*args)
        except Exception as exc:
            if not self._end_failed:
                log.warning("MLflow: could not record the run's end (%s)", _first_line(exc))
            self._end_failed = True
        finally:
            store_log.disabled = muted

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        flat = flatten_params(params)
        items = [Param(k, v) for k, v in flat.items()]
        self.client.log_batch(run_id, params=items)  # MLflow splits into its batch limits

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        """Metrics as `metric_value` shows them (12 significant digits, below any precision a
        score carries, above float noise: a mean of P@1s is 0.075, not 0.07500000000000001)."""
        now = get_current_time_millis()
        items = [Metric(k, metric_value(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(run_id, metrics=items)  # MLflow splits into its batch limits

    def log_curves(self, run_id: str, curves: Mapping[str, list[tuple[int, float]]]) -> None:
        """Per-step series as metric histories (MLflow's charts plot them against step); the
        steps already logged live (progress listener) are not logged twice."""
        now = get_current_time_millis()
        items = []
        for key, series in curves.items():
            have = {m.step for m in self.client.get_metric_history(run_id, key)}
            items += [
                Metric(key, metric_value(v), now, int(s)) for s, v in series if int(s) not in have
            ]
        self.client.log_batch(run_id, metrics=items)  # MLflow splits into its batch limits

    def log_datasets(self, run_id: str, tables: list[Any]) -> None:
        """Tables (tasks.stage.DatasetRef) as MLflow dataset inputs: referenced by path,
        never copied; the digest is the stage fingerprint, the profile the row count."""
        inputs = [
            DatasetInput(
                Dataset(
                    name=t.name,
                    digest=t.digest[:36],
                    source_type="local",
                    source=json.dumps({"uri": t.path.resolve().as_uri()}),
                    profile=json.dumps({"num_rows": t.rows}),
                ),
                tags=[InputTag("mlflow.data.context", t.context)],
            )
            for t in tables
        ]
        if inputs:
            self.client.log_inputs(run_id, datasets=inputs)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_json(self, run_id: str, obj: dict[str, Any], name: str) -> None:
        self.client.log_dict(run_id, obj, name)

    def log_folder(self, run_id: str, path: Path) -> None:
        self.client.log_artifacts(run_id, str(path), path.name)

    def log_file(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)
