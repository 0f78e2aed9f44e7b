"""`gen2embed up`: real Prefect and MLflow servers on loopback, a run using them, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import SMALL_WORLD_OVERRIDES

pytestmark = pytest.mark.flow
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                found.append(int(entry.name))
    return found


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFECT_HOME", "GEN2EMBED_HOME"):
        env.pop(key, None)
    return env


def test_up_serves_both_and_a_run_uses_them(tmp_path: Path) -> None:
    work = tmp_path / "work"
    ports = [_free_port(), _free_port()]
    up = subprocess.Popen(
        [
            BIN / "gen2embed",
            "up",
            "--workdir",
            str(work),
            "--prefect-port",
            str(ports[0]),
            "--mlflow-port",
            str(ports[1]),
        ],
        env=_clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    services = work / "services.json"
    try:
        deadline = time.monotonic() + 180
        while not services.exists():
            assert up.poll() is None, up.stdout.read() if up.stdout else ""
            assert time.monotonic() < deadline, "servers did not come up"
            time.sleep(0.5)
        info = json.loads(services.read_text())
        assert info["prefect_api_url"] == f"http://127.0.0.1:{ports[0]}/api"

        run = subprocess.run(
            [
                BIN / "gen2embed",
                "run",
                "--workdir",
                str(work),
                "--until",
                "ingest",
                *[a for o in SMALL_WORLD_OVERRIDES for a in ("--set", o)],
            ],
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "Starting temporary server" not in run.stdout + run.stderr

        client = MlflowClient(tracking_uri=info["mlflow_url"])
        exp = client.get_experiment_by_name("gen2embed")
        names = {r.info.run_name for r in client.search_runs([exp.experiment_id])}
        assert {"pipeline", "world", "ingest"} <= names

        from prefect.client.orchestration import SyncPrefectClient

        with SyncPrefectClient(info["prefect_api_url"]) as prefect:
            flow_runs = prefect.read_flow_runs()
        assert [fr.state.name for fr in flow_runs] == ["Completed"]
    finally:
        up.send_signal(signal.SIGINT)
        out, _ = up.communicate(timeout=60)
    assert up.returncode == 0, out
    assert "stopped" in out
    assert not services.exists()
    time.sleep(0.5)
    assert _processes_mentioning(str(work)) == [], "servers or workers outlived `up`"


def test_up_on_a_taken_port_says_by_what_and_starts_nothing(tmp_path: Path) -> None:
    """Issue 8.14: another process listening on the Prefect port: exit 2, naming it."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        res = subprocess.run(
            [str(Path(sys.executable).parent / "gen2embed"), "up", "--workdir", str(tmp_path),
             "--prefect-port", str(port), "--mlflow-port", "1"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        holder.close()
    assert res.returncode == 2, res.stderr
    assert f"port {port} on 127.0.0.1 is taken by pid {os.getpid()}" in res.stderr
    assert "--prefect-port" in res.stderr and "Traceback" not in res.stderr
