"""MLflow bookkeeping on a real SQLite store: statuses, nesting, the stale-run sweep."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
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
        assert tracker.sweep_stale_runs() == [orphan]
        assert tracker.client.get_run(alive).info.status == "RUNNING"
    assert tracker.client.get_run(orphan).info.status == "KILLED"


def test_flatten_params_truncates_long_values() -> None:
    flat = flatten_params({"s": {"x": "y" * 7000, "n": None, "l": [1, 2]}})
    assert flat == {"s.x": "y" * 6000, "s.n": "null", "s.l": "[1, 2]"}
