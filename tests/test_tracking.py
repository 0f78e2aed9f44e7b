"""MLflow bookkeeping on a real SQLite store: statuses, nesting, the stale-run sweep."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.exceptions import TerminationSignal

from tasks.tracking import Tracker, flatten_params


def test_run_statuses_follow_the_block(tmp_path: Path) -> None:
    tracker = Tracker.for_workdir(tmp_path)
    with tracker.run("parent", params={"a": {"b": 1}}) as parent:
        with tracker.run("ok", parent_run_id=parent) as ok:
            tracker.log_metrics(ok, {"m": 2.0})
        with pytest.raises(ValueError), tracker.run("bad", parent_run_id=parent) as bad:
            raise ValueError("boom")
        with pytest.raises(KeyboardInterrupt), tracker.run("killed", parent_run_id=parent) as k:
            raise KeyboardInterrupt
        # SIGTERM inside a flow arrives as Prefect's TerminationSignal (issue 8.9).
        with pytest.raises(TerminationSignal), tracker.run("term", parent_run_id=parent) as t:
            raise TerminationSignal(signal.SIGTERM)
    get = tracker.client.get_run
    assert get(parent).info.status == "FINISHED"
    assert get(parent).data.params == {"a.b": "1"}
    assert get(ok).info.status == "FINISHED" and get(ok).data.metrics == {"m": 2.0}
    assert get(ok).data.tags["mlflow.parentRunId"] == parent
    assert get(bad).info.status == "FAILED"
    assert get(bad).data.tags["gen2embed.error"] == "ValueError: boom"
    assert get(k).info.status == "KILLED"
    assert get(t).info.status == "KILLED", "SIGTERM ends a run KILLED, not FAILED"
    assert (tmp_path / "mlflow.db").is_file()


def test_sweep_ends_runs_of_dead_processes(tmp_path: Path) -> None:
    tracker = Tracker.for_workdir(tmp_path)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    orphan = tracker.client.create_run(
        tracker.experiment_id,
        run_name="orphan",
        tags={
            "gen2embed.host": socket.gethostname(),
            "gen2embed.pid": dead.stdout.strip(),
        },
    ).info.run_id
    with tracker.run("alive") as alive:
        assert tracker.sweep_stale_runs() == {orphan: ""}
        assert tracker.client.get_run(alive).info.status == "RUNNING"
    assert tracker.client.get_run(orphan).info.status == "KILLED"


def test_flatten_params_truncates_long_values() -> None:
    flat = flatten_params({"s": {"x": "y" * 7000, "n": None, "l": [1, 2]}})
    assert flat == {"s.x": "y" * 6000, "s.n": "null", "s.l": "[1, 2]"}


SETUP = """
import sys, time
from pathlib import Path
from tasks.tracking import Tracker
print("ready", flush=True)
Tracker.for_workdir(Path(sys.argv[1]))
"""


@pytest.mark.parametrize("delay", [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75])
def test_a_kill_during_the_first_database_setup_leaves_a_usable_workdir(
    tmp_path: Path, delay: float
) -> None:
    """Issue 8.1: SIGKILL at points through the store's creation; the next run works."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SETUP, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(delay)
    proc.kill()
    proc.wait()
    tracker = Tracker.for_workdir(tmp_path)
    with tracker.run("after") as run_id:
        pass
    assert tracker.client.get_run(run_id).info.status == "FINISHED"
    assert not list(tmp_path.glob("mlflow.db.tmp-*"))


def test_two_first_runs_at_once_share_one_database(tmp_path: Path) -> None:
    code = SETUP.replace('print("ready", flush=True)', "")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)]) for _ in range(2)]
    assert [p.wait() for p in procs] == [0, 0]
    tracker = Tracker.for_workdir(tmp_path)
    names = [e.name for e in tracker.client.search_experiments()]
    assert sorted(names) == ["Default", "gen2embed"]


def test_live_values_and_the_curves_logged_after_the_stage_count_each_step_once(
    tmp_path: Path,
) -> None:
    from tasks.cards import ProgressArtifact

    tracker = Tracker.for_workdir(tmp_path)
    with tracker.run("finetune") as run_id:
        live = ProgressArtifact("finetune", tracker, run_id)
        live(50.0, "finetune: 2/4 steps", 2, {"train_loss": 1.5, "lr": 1e-4})
        tracker.log_curves(run_id, {"train_loss": [(1, 2.0), (2, 1.5), (3, 1.2), (4, 1.1)]})
    history = tracker.client.get_metric_history(run_id, "train_loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 2.0), (2, 1.5), (3, 1.2), (4, 1.1)]
    assert [m.step for m in tracker.client.get_metric_history(run_id, "lr")] == [2]
