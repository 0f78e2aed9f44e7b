"""Prefect's temporary server for one run (flows.temporary_server): started through public
means, in its own session, stopped with its run. That a SIGKILLed run leaves no server behind
is tests/test_signals.py's (a real run, killed mid-pretraining)."""

from __future__ import annotations

import ast
import contextlib
import itertools
import os
import signal
import socket
import sqlite3
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from flows import temporary_server
from flows.temporary_server import temporary_prefect_server
from flows.user_errors import BUSY_MACHINE, BusyMachine
from tests.conftest import with_prefect_db


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Prefect home with its database made (as `gen2embed run` makes it first)."""
    return with_prefect_db(tmp_path_factory.mktemp("workdir")) / "prefect"


@pytest.fixture
def home(prefect_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("PREFECT_HOME", str(prefect_home))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_UI_URL", raising=False)
    yield prefect_home
    for pid in _servers(prefect_home):  # a failed test leaves no server running
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def _servers(home: Path) -> list[int]:
    """Pids of Prefect servers running on the database in `home`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if temporary_server.APP.encode() in cmdline and f"PREFECT_HOME={home}".encode() in environ:
            found.append(int(proc.name))
    return found


def test_a_run_gets_its_own_server_and_its_records_before_the_server_goes(
    home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The server answers on a free loopback port (another one when the first is taken
    meanwhile), in its own session; Prefect points at it and at no UI (the MLflow run must
    not link to a page no server will serve); a flow run's states and logs are all stored,
    the last ones included; on exit the server is gone and the settings are as before."""
    from prefect import flow, get_run_logger, task
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    @task
    def double(x: int) -> int:
        get_run_logger().info("doubling %s", x)
        return 2 * x

    @flow(name="temporary-server-check")
    def doubled() -> int:
        return double(21)

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    free_port = temporary_server.free_port
    monkeypatch.setattr(temporary_server, "free_port", lambda: next(ports, None) or free_port())
    before = (PREFECT_API_URL.value(), PREFECT_UI_URL.value())  # a session's test server's
    with taken, temporary_prefect_server(tmp_path / "prefect-server.log") as api_url:
        (pid,) = _servers(home)
        assert api_url != f"http://127.0.0.1:{taken.getsockname()[1]}/api", "another port"
        assert os.getsid(pid) == pid != os.getsid(0), "its own session"
        with urllib.request.urlopen(f"{api_url}/health", timeout=5) as response:
            assert response.status == 200
        assert PREFECT_API_URL.value() == api_url == os.environ["PREFECT_API_URL"]
        assert PREFECT_UI_URL.value() == "" == os.environ["PREFECT_UI_URL"]
        assert doubled() == 42
    assert not psutil.pid_exists(pid), "stopped with the run"
    assert (PREFECT_API_URL.value(), PREFECT_UI_URL.value()) == before
    assert "PREFECT_API_URL" not in os.environ and "PREFECT_UI_URL" not in os.environ
    with sqlite3.connect(home / "prefect.db") as db:
        run_id, state = db.execute(
            "select id, state_type from flow_run order by created desc"
        ).fetchone()
        of_run = "where flow_run_id = ?"
        tasks = [r[0] for r in db.execute(f"select state_type from task_run {of_run}", [run_id])]
        logs = list(db.execute(f"select message, task_run_id from log {of_run}", [run_id]))
    assert state == "COMPLETED" and tasks == ["COMPLETED"], (state, tasks)
    assert any("doubling 21" in m for m, _ in logs), logs
    assert ("Finished in state Completed()", None) in logs, "the flow run's last log too"


def test_a_server_too_slow_to_start_is_the_busy_machine_message_and_is_stopped(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.settings import (
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    from flows import cli

    with (
        temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 1}),
        pytest.raises(BusyMachine) as error,
        temporary_prefect_server(tmp_path / "prefect-server.log"),
    ):
        pass
    assert str(error.value) == BUSY_MACHINE
    time.sleep(0.5)
    assert _servers(home) == []

    def slow_start(_args: object) -> int:
        raise error.value

    monkeypatch.setenv("GEN2EMBED_HOME", str(tmp_path))  # configure() sets it; restored after
    monkeypatch.setattr(cli, "cmd_stages", slow_start)
    assert cli.main(["stages", "--workdir", str(tmp_path)]) == 3
    assert capsys.readouterr().err.strip() == f"gen2embed: {BUSY_MACHINE}"


def test_runs_of_one_workdir_start_their_servers_one_at_a_time(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Servers starting together on one database race on its block types (UNIQUE constraint
    failed: block_type.slug): they start under one lock, and each comes up."""
    import threading

    spans: list[tuple[float, float]] = []
    real = temporary_server._start_healthy

    def timed(log_file: Path, timeout_s: float) -> tuple[object, str]:
        began = time.monotonic()
        got = real(log_file, timeout_s)
        spans.append((began, time.monotonic()))
        return got

    monkeypatch.setattr(temporary_server, "_start_healthy", timed)
    urls: list[str] = []
    failures: list[BaseException] = []
    release = threading.Event()

    def run() -> None:
        try:
            with temporary_prefect_server(tmp_path / "logs" / "prefect-server.log") as url:
                urls.append(url)
                release.wait(120)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while len(urls) + len(failures) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    release.set()
    for t in threads:
        t.join(60)
    assert failures == [] and len(set(urls)) == 3
    spans.sort()
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), "starts overlapped"


def test_a_health_answer_from_another_process_on_the_port_is_not_taken_for_ours(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs may be handed one free port at once: the other run's server, up first,
    answers the health check on it. The run waits for its own server, which cannot bind the
    port, and starts it on another."""
    import http.server
    import threading

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    other = http.server.HTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    taken = other.server_address[1]
    ports = iter([taken])
    real = temporary_server.free_port
    monkeypatch.setattr(temporary_server, "free_port", lambda: next(ports, None) or real())
    try:
        with temporary_prefect_server(tmp_path / "prefect-server.log") as url:
            assert f":{taken}/" not in url
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                assert response.status == 200
    finally:
        other.shutdown()


def test_only_public_prefect_names_are_used() -> None:
    """No patching of Prefect internals, no private settings (PREFECT__...)."""
    source = Path(temporary_server.__file__).read_text()
    assert "PREFECT__" not in source and "_run_uvicorn_command" not in source
    assert "SubprocessASGIServer" not in source
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prefect"):
            assert not any(part.startswith("_") for part in node.module.split(".")), node.module
            assert not any(alias.name.startswith("_") for alias in node.names), node.module
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert not any(p.startswith("_") for p in alias.name.split(".")), alias.name
