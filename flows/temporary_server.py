"""Prefect's API server for one run, started and owned by the run through public means.

Without a server of its own (`gen2embed up`, or an exported PREFECT_API_URL), a run starts
Prefect's server app (`prefect.server.api.server:create_app`, the app `prefect server start`
serves) under uvicorn on a free loopback port, with the workdir's database, and points
Prefect at it for the run's length. Only public means: the command line, Prefect's public
settings (UI off, analytics off, the services a one-run server does not need off) and
`prefect.settings.temporary_settings`; nothing of Prefect's is patched.

The server runs in its own session, so a signal to the run's process group (Ctrl-C, a
supervisor's SIGTERM) does not reach it: the run closes its MLflow and Prefect records
through it, then stops it. On Linux it also gets a parent-death signal (PR_SET_PDEATHSIG),
so a SIGKILLed run does not leave it orphaned; elsewhere it only gets its own session. Its
output goes to the log file given (the workdir's `logs/prefect-server.log`), not the run's
console.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
from filelock import FileLock, Timeout

from flows.user_errors import BUSY_MACHINE, BusyMachine

APP = "prefect.server.api.server:create_app"
HOST = "127.0.0.1"
# Services of a long-lived server that a server living for one run has no use for (they are
# also the ones Prefect leaves out of its own temporary server): scheduling deployments'
# runs and marking them late, expiring pauses, concurrency leases and workers' cleanup
# messages, cancelling the children of cancelled runs, watching workers' health. Kept: the
# task-run recorder (task runs' states and rows come from the events it records), the event
# persister, automations' triggers and actions, and the event and log streams.
SERVICES_OFF = (
    "SCHEDULER",
    "LATE_RUNS",
    "PAUSE_EXPIRATIONS",
    "REPOSSESSOR",
    "CANCELLATION_CLEANUP",
    "FOREMAN",
    "CLEANUP_RECONCILER",
)
SERVER_SETTINGS = {
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    **{f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false" for name in SERVICES_OFF},
}
# uvicorn's exit status when it cannot start, a taken port included.
STARTUP_FAILURE = 3
PORT_ATTEMPTS = 5
STOP_GRACE_S = 5.0
PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A loopback port nothing listens on now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return True
    return False


def _die_with_parent() -> Callable[[], None] | None:
    """The child's pre-exec step: terminated when this process dies (Linux), and gone at
    once if it already has. prctl is looked up here, before the fork: the child only calls
    it, taking no lock another thread of this process might have held when it forked. (The
    kernel sends the signal when the thread that started the child ends: the run starts it
    from its main thread.)"""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    parent = os.getpid()
    term = int(signal.SIGTERM)

    def pre_exec() -> None:
        prctl(PR_SET_PDEATHSIG, term, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return pre_exec


def _start(port: int, log_file: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "uvicorn", "--factory", APP,
        "--host", HOST, "--port", str(port),
        "--log-level", "error", "--lifespan", "on",
    ]  # fmt: skip
    with log_file.open("ab") as log:
        return subprocess.Popen(
            command,
            env={**os.environ, **SERVER_SETTINGS},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )


# Straight to the loopback server, whatever proxy the environment names.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _healthy(api_url: str) -> bool:
    try:
        with _DIRECT.open(f"{api_url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _listens(proc: subprocess.Popen[bytes], port: int) -> bool:
    """Whether `proc` itself listens on `port`. Two runs (of any workdirs) may be handed one
    free port at once; the first server to bind it answers both runs' health checks, and the
    other run must not take it for its own (its server then fails to bind, and it tries
    another port)."""
    try:
        connections = psutil.Process(proc.pid).net_connections(kind="tcp")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return any(
        c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in connections
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group, SIGKILL after STOP_GRACE_S; also when
    interrupted while waiting."""
    try:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=STOP_GRACE_S)
    finally:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()


def _signal_group(proc: subprocess.Popen[bytes], signum: int) -> None:
    proc.send_signal(signum)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signum)  # its own session: the group's id is its pid


def _start_healthy(log_file: Path, timeout_s: float) -> tuple[subprocess.Popen[bytes], str]:
    """The server process once its API answers, and the API's URL; a BusyMachine error if it
    does not answer within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    for _ in range(PORT_ATTEMPTS):
        port = free_port()
        api_url = f"http://{HOST}:{port}/api"
        logged = log_file.stat().st_size if log_file.exists() else 0
        proc = _start(port, log_file)
        try:
            while not (_healthy(api_url) and _listens(proc, port)):
                code = proc.poll()
                if code is not None:
                    if code == STARTUP_FAILURE and _port_taken(port):
                        break  # taken meanwhile by another process: another port
                    with log_file.open("rb") as log:
                        log.seek(logged)
                        said = log.read().decode(errors="replace")[-1500:]
                    raise RuntimeError(
                        f"Prefect's temporary server exited with status {code} on start "
                        f"(its output, in {log_file}):\n{said}"
                    )
                if time.monotonic() > deadline:
                    raise BusyMachine(BUSY_MACHINE)
                time.sleep(0.1)
            else:
                return proc, api_url
        except BaseException:
            stop(proc)
            raise
    raise RuntimeError(f"Prefect's temporary server found no free port in {PORT_ATTEMPTS} tries")


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def temporary_prefect_server(log_file: Path) -> Iterator[str]:
    """Start Prefect's API server for this run and yield its API URL, Prefect's settings
    pointing at it meanwhile (PREFECT_API_URL; PREFECT_UI_URL empty, as no UI serves it, so
    nothing links to a page that will not exist); the environment says the same to child
    processes. Servers of one workdir (one `log_file`) start one at a time, under the file
    lock `<log_file>.start.lock`; BusyMachine when the lock or the server takes longer than
    Prefect's ephemeral start-up timeout. On exit, however it comes (an error, Ctrl-C,
    SIGTERM), the logs and events still queued are sent and the server is stopped."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        PREFECT_UI_URL,
        temporary_settings,
    )

    log_file.parent.mkdir(parents=True, exist_ok=True)
    timeout_s = float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    # Runs of one workdir share its database. A server's start-up writes to it (Prefect
    # registers its block types), and two starting at once race there: the slower one dies
    # on "UNIQUE constraint failed: block_type.slug". So they start one after the other; once
    # a server answers, it only reads and writes what its own run does.
    try:
        with FileLock(log_file.with_name(log_file.name + ".start.lock")).acquire(timeout_s):
            proc, api_url = _start_healthy(log_file, timeout_s)
    except Timeout:
        raise BusyMachine(BUSY_MACHINE) from None
    try:
        with (
            _environ({"PREFECT_API_URL": api_url, "PREFECT_UI_URL": ""}),
            temporary_settings(updates={PREFECT_API_URL: api_url, PREFECT_UI_URL: ""}),
        ):
            try:
                yield api_url
            finally:
                _send_queued()
    finally:
        stop(proc)


def _send_queued(timeout_s: float = 3.0) -> None:
    """Send the logs and events Prefect's background workers still hold (task runs' final
    states travel as events) while the server is there to take them."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout_s)
