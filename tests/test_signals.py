"""Ctrl-C and SIGTERM to the whole process group, as a terminal or a supervisor sends them."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import SMALL_WORLD_OVERRIDES, with_prefect_db

BIN = Path(sys.executable).parent / "gen2embed"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_group_signal_ends_the_run_in_seconds_with_its_records_closed(
    tmp_path: Path, signum: int
) -> None:
    """Issue 8.8/8.9: signalled in the middle of a long step (pretraining), the run ends
    within seconds, MLflow says KILLED, Prefect's flow run is not left Running, the
    partial folder stays for resume and no process of the run is left behind."""
    proc, server_pids = _start_pretraining(tmp_path)
    sent = time.monotonic()
    os.killpg(proc.pid, signum)
    code = proc.wait(timeout=60)
    took = time.monotonic() - sent
    out = (tmp_path / "run.log").read_text()
    assert took < 15, f"{took:.1f}s to end\n{out}"
    assert code == (130 if signum == signal.SIGINT else 143), out
    assert "Traceback" not in out
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {r.info.run_name: r.info.status for r in client.search_runs(["1"])}
    assert runs["tiny"] == "KILLED" and runs["pretrain"] == "KILLED", runs
    with sqlite3.connect(tmp_path / "prefect" / "prefect.db") as db:
        states = [row[0] for row in db.execute("select state_type from flow_run")]
    assert states and "RUNNING" not in states, states
    assert list((tmp_path / "artifacts" / "pretrain").glob("*.partial")), "kept for resume"
    time.sleep(1)
    assert server_pids and not any(_alive(pid) for pid in server_pids), "server stopped"


def _start_pretraining(workdir: Path) -> tuple[subprocess.Popen[bytes], list[int]]:
    """`gen2embed run` in its own process group, returned once it is in the middle of a long
    pretraining, with the pids of the Prefect server it started."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "GEN2EMBED_HOME")}
    overrides = [*SMALL_WORLD_OVERRIDES, "pretrain.steps=100000", "pretrain.batch_size=4"]
    args = [str(BIN), "run", "--workdir", str(with_prefect_db(workdir))]
    for o in overrides:
        args += ["--set", o]
    log = (workdir / "run.log").open("w")
    proc = subprocess.Popen(
        args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 240
    while "pretrain step" not in (workdir / "run.log").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, (
            workdir / "run.log"
        ).read_text()
        time.sleep(0.5)
    servers = [
        int(p.name)
        for p in Path("/proc").glob("[0-9]*")
        if b"prefect.server.api.server:create_app" in _cmdline(p)
        and str(workdir).encode() in _environ(p)
    ]
    return proc, servers


def test_sigkill_of_the_run_alone_leaves_no_server_and_the_next_run_ends_its_records(
    tmp_path: Path,
) -> None:
    """Issue 8.5: the server dies with its run; the next run marks the dead run's MLflow runs
    KILLED and its Prefect flow and task runs Crashed, not Running forever."""
    proc, server_pids = _start_pretraining(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in server_pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server_pids and not any(_alive(pid) for pid in server_pids), "no orphaned server"
    with sqlite3.connect(tmp_path / "prefect" / "prefect.db") as db:
        assert "RUNNING" in [r[0] for r in db.execute("select state_type from flow_run")]
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "GEN2EMBED_HOME")}
    args = [str(BIN), "run", "--workdir", str(tmp_path), "--until", "world"]
    for o in SMALL_WORLD_OVERRIDES:
        args += ["--set", o]
    subprocess.run(args, env=env, check=True, capture_output=True, timeout=240)
    with sqlite3.connect(tmp_path / "prefect" / "prefect.db") as db:
        flows = [r[0] for r in db.execute("select state_type from flow_run order by created")]
        tasks = [r[0] for r in db.execute("select state_type from task_run")]
    assert flows == ["CRASHED", "COMPLETED"], flows
    assert "RUNNING" not in tasks, tasks
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    statuses = [r.info.status for r in client.search_runs(["1"])]
    assert "RUNNING" not in statuses, statuses


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def _environ(proc: Path) -> bytes:
    try:
        return (proc / "environ").read_bytes()
    except OSError:
        return b""


PREFECT_SETUP = """
import sys
from pathlib import Path
from flows.environment import create_prefect_store
print("ready", flush=True)
create_prefect_store(Path(sys.argv[1]))
"""


def test_a_kill_during_prefect_s_first_database_setup_leaves_a_usable_home(
    tmp_path: Path,
) -> None:
    """Issue 8.1 (Prefect's store): killed at points through the migration, the next setup
    builds a complete database and leaves no temporary file."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path)}
    for delay in (1.0, 4.0):
        proc = subprocess.Popen(
            [sys.executable, "-c", PREFECT_SETUP, str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)  # the setup and its migration process
        proc.wait()
        assert not (tmp_path / "prefect.db").exists(), "nothing half-built in place"
    done = subprocess.run(
        [sys.executable, "-c", PREFECT_SETUP, str(tmp_path)], env=env, capture_output=True
    )
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(tmp_path / "prefect.db") as db:
        tables = {r[0] for r in db.execute("select name from sqlite_master where type='table'")}
    assert {"flow_run", "task_run", "alembic_version"} <= tables
    assert not list(tmp_path.glob("prefect.db.tmp-*"))


def test_two_first_runs_at_once_share_one_prefect_database(tmp_path: Path) -> None:
    code = PREFECT_SETUP.replace('print("ready", flush=True)', "")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env) for _ in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prefect.db", "prefect.db.lock"]
