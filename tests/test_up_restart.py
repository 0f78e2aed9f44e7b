"""Issue 17.9: `gen2embed up` again right after stopping it, and `up` started in the
background of a non-interactive shell, which is born with SIGINT ignored."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from flows.services import AddressError, PortTakenError, check_ports_free
from tests.conftest import with_prefect_db
from tests.test_services import _clean_env, _free_port, _processes_mentioning

BIN = Path(sys.executable).parent
PRINT_SIGINT = "import signal as s; print('ignored' if s.getsignal(2) == s.SIG_IGN else 'not')"


def _time_wait_on(port: int) -> bool:
    return any(
        c.status == psutil.CONN_TIME_WAIT and c.laddr and c.laddr.port == port
        for c in psutil.net_connections(kind="tcp")
    )


def _wait_for_time_wait(ports: list[int]) -> None:
    deadline = time.monotonic() + 5
    while not all(_time_wait_on(p) for p in ports):
        assert time.monotonic() < deadline, "no TIME_WAIT on the ports to test with"
        time.sleep(0.05)


def _plain_bind_fails(port: int) -> bool:
    """What the check did before: bind without SO_REUSEADDR."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            assert exc.errno == errno.EADDRINUSE
            return True
    return False


def _leave_time_wait(port: int) -> None:
    """A connection to `port` whose server side closes first, as a stopped server's does."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        client = socket.create_connection(("127.0.0.1", port))
        server_side, _ = listener.accept()
        server_side.close()
    client.close()


def test_the_port_check_counts_listeners_not_closed_connections() -> None:
    port = _free_port()
    _leave_time_wait(port)
    _wait_for_time_wait([port])
    assert _plain_bind_fails(port), "the old check would pass: nothing to test"
    check_ports_free(prefect_port=port)  # free: nothing listens

    with socket.socket() as holder:  # a wildcard listener takes 127.0.0.1's port too
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the TIME_WAIT
        holder.bind(("0.0.0.0", port))
        holder.listen()
        with pytest.raises(PortTakenError, match=f"port {port} .* taken by pid {os.getpid()} "):
            check_ports_free(prefect_port=port)

    nonlocal_bind = Path("/proc/sys/net/ipv4/ip_nonlocal_bind")
    if not nonlocal_bind.exists() or nonlocal_bind.read_text().strip() == "0":
        with pytest.raises(AddressError, match=r"cannot serve on 192\.0\.2\.1 port"):
            check_ports_free("192.0.2.1", mlflow_port=port)  # TEST-NET-1: not this machine's


def _up_args(work: Path, ports: list[int]) -> list[str]:
    return [
        str(BIN / "gen2embed"), "up", "--workdir", str(work), "--no-deployments",
        "--prefect-port", str(ports[0]), "--mlflow-port", str(ports[1]),
    ]  # fmt: skip


def _wait_ready(work: Path, pid: int, proc: subprocess.Popen[str]) -> dict[str, object]:
    services = work / "services.json"
    deadline = time.monotonic() + 240
    while True:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, "servers did not come up"
        if services.exists():
            info = json.loads(services.read_text())
            assert psutil.Process(pid).is_running()
            return info
        time.sleep(0.2)


def _alive(proc: psutil.Process) -> bool:
    """Running, and not a zombie its new parent has yet to reap."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _assert_stopped(work: Path, ports: list[int]) -> None:
    assert not (work / "services.json").exists()
    assert _processes_mentioning(str(work)) == [], "servers outlived `up`"
    check_ports_free(prefect_port=ports[0], mlflow_port=ports[1])


@pytest.mark.flow
def test_up_from_a_script_stops_on_sigint_and_starts_again_at_once(tmp_path: Path) -> None:
    """One workdir, two starts (each start costs ~13 s on 2 cores): `up` as a background job
    of a script, stopped by SIGINT while clients are connected; then `up` again at once on
    the same ports, stopped by SIGTERM."""
    work = with_prefect_db(tmp_path / "work")
    # What bash does to a background job when it is not interactive (no job control).
    born = subprocess.run(
        ["bash", "-c", f'"{sys.executable}" -c "{PRINT_SIGINT}" & wait'],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert born.stdout.strip() == "ignored", born.stdout + born.stderr

    ports = [_free_port(), _free_port()]
    script = subprocess.Popen(
        ["bash", "-c", '"$@" & wait $!', "bash", *_up_args(work, ports)],
        env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not (children := psutil.Process(script.pid).children()):
        assert time.monotonic() < deadline and script.poll() is None, "bash started nothing"
        time.sleep(0.05)
    (up,) = children
    _wait_ready(work, up.pid, script)
    servers = up.children(recursive=True)
    assert servers
    # Connections open while it stops: the servers' ends close first and stay in TIME_WAIT.
    clients = []
    for port, path in zip(ports, ("/api/health", "/health"), strict=True):
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        assert client.recv(4096).startswith(b"HTTP/1.1 200")
        clients.append(client)

    up.send_signal(signal.SIGINT)
    out, _ = script.communicate(timeout=60)
    assert script.returncode == 0 and "gen2embed up: stopped" in out, out
    assert not [p for p in [up, *servers] if _alive(p)], "`up` or its servers still run"
    for client in clients:  # read to the end (the server's close), or closing resets
        client.settimeout(10)
        while client.recv(65536):
            pass
        client.close()
    _assert_stopped(work, ports)
    _wait_for_time_wait(ports)
    assert _plain_bind_fails(ports[0]), "the restart would not test the old check"

    again = subprocess.Popen(
        _up_args(work, ports), env=_clean_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    info = _wait_ready(work, again.pid, again)
    assert info["prefect_api_url"] == f"http://127.0.0.1:{ports[0]}/api"
    again.send_signal(signal.SIGTERM)
    out, _ = again.communicate(timeout=60)
    assert again.returncode == 0 and "stopped" in out, out
    _assert_stopped(work, ports)
