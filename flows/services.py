"""`gen2embed up`: a Prefect server and an MLflow server on 127.0.0.1, state in the workdir,
and a process serving the pipeline's deployments (flows.deployments) against them.

All run as child processes in their own process groups; Ctrl-C or SIGTERM stops every group
(SIGTERM, then SIGKILL after a grace period), so no server, runner or run is left behind. While
they run, `services.json` in the workdir tells `gen2embed run` to use them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from embedder.artifacts import WORKDIR_ENV
from embedder.errors import UserError
from flows.environment import SERVICES_FILE, create_prefect_store

HOST = "127.0.0.1"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
STARTUP_TIMEOUT_S = 120
GRACE_S = 10


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _descendants(pid: int) -> list[int]:
    """Processes below `pid`: a runner starts each flow run in a process group of its own."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _signal_groups(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            group = os.getpgid(pid)
            if group != os.getpgrp():
                os.killpg(group, sig)


def _stop(procs: list[subprocess.Popen[Any]]) -> None:
    below = [pid for proc in procs for pid in _descendants(proc.pid)]
    _signal_groups(below, signal.SIGTERM)
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    for proc in procs:
        # Kill the whole group: servers fork workers that outlive a killed parent.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _signal_groups(below, signal.SIGKILL)


class AddressError(UserError, OSError):
    pass


class PortTakenError(AddressError):
    pass


def _listener(port: int) -> str:
    """Who listens on a TCP port (psutil); a plain phrase where the system does not say."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):  # macOS without root, for one
        return "another process"
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            if conn.pid is None:
                return "a process of another user"
            try:
                cmd = " ".join(psutil.Process(conn.pid).cmdline())
            except psutil.Error:
                cmd = "?"
            return f"pid {conn.pid} ({cmd[:120]})"
    return "another process"


def check_ports_free(host: str = HOST, **ports: int) -> None:
    """Fail before starting anything when a port is taken, saying by what: a health check
    would otherwise find another workdir's server and take it for ours.

    A port is taken when a socket listens on it. The check binds as the servers will bind
    (uvicorn, and Prefect's own check, set SO_REUSEADDR), so it fails exactly when their bind
    would: a listener on the address or a wildcard one. Without SO_REUSEADDR the connections
    a just-stopped `up` left in TIME_WAIT (a minute on Linux) would count as taken too.
    """
    for name, port in ports.items():
        flag = "--" + name.replace("_", "-")
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )[0]
        except socket.gaierror as exc:
            raise AddressError(f"--host {host}: not an address ({exc.strerror})") from None
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortTakenError(
                        f"port {port} on {host} is taken by {_listener(port)}; stop it or pass "
                        f"{flag} with a free port"
                    ) from None
                raise AddressError(
                    f"cannot serve on {host} port {port} ({exc.strerror}); pass another "
                    f"--host or {flag}"
                ) from None


def serve(
    workdir: Path,
    *,
    prefect_port: int,
    mlflow_port: int,
    host: str = HOST,
    deployments: Path | None = None,
    nightly_cron: str | None = None,
    serve_deployments: bool = True,
) -> int:
    # Ctrl-C and SIGTERM stop all of it, however `up` was started: a background job of a
    # non-interactive shell (`gen2embed up &` in a script) is born with SIGINT ignored, and
    # Python then leaves it ignored. The servers get the default again at exec.
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop_requested)
    try:
        return _serve(
            workdir,
            prefect_port=prefect_port,
            mlflow_port=mlflow_port,
            host=host,
            deployments=deployments,
            nightly_cron=nightly_cron,
            serve_deployments=serve_deployments,
        )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stop_requested(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def _serve(
    workdir: Path,
    *,
    prefect_port: int,
    mlflow_port: int,
    host: str,
    deployments: Path | None,
    nightly_cron: str | None,
    serve_deployments: bool,
) -> int:
    # Before any heavy import (MLflow, Prefect: seconds): a taken port is answered at once.
    check_ports_free(host, prefect_port=prefect_port, mlflow_port=mlflow_port)
    served: list[str] = []
    to_fill: list[str] = []
    if serve_deployments:
        from flows.deployments import load_specs

        # A mistake in the file fails here, before any server starts.
        specs = load_specs(deployments, nightly_cron)
        served = [spec.name for spec in specs]
        to_fill = [f"  {s.name}: {s.to_fill} (fill it in the run form)" for s in specs if s.to_fill]
    if host not in LOOPBACK:
        print(
            f"gen2embed up: binding to {host}, not {HOST}: anyone who can reach this machine "
            "can start runs and read results (neither server checks who asks)",
            file=sys.stderr,
        )
    from tasks.tracking import create_store

    # Again, now that MLflow and Prefect are imported: a native library may have put its own
    # handler in front (polars, which MLflow imports, does; it passes the signal on to the
    # handler it found, which swallows it when that was SIG_IGN).
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop_requested)
    create_prefect_store(workdir / "prefect")
    create_store(workdir)
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (workdir / "mlartifacts").mkdir(exist_ok=True)
    url_host = HOST if host in ("0.0.0.0", "::") else host
    prefect_api = f"http://{url_host}:{prefect_port}/api"
    mlflow_url = f"http://{url_host}:{mlflow_port}"
    prefect_env = {
        **os.environ,
        "PREFECT_HOME": str(workdir / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": f"http://{url_host}:{prefect_port}/api",
    }
    prefect_env.pop("PREFECT_API_URL", None)
    mlflow_env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    commands = {
        "prefect": (
            [_bin("prefect"), "server", "start", "--host", host, "--port", str(prefect_port)],
            prefect_env,
            f"{prefect_api}/health",
        ),
        "mlflow": (
            [
                _bin("mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{workdir / 'mlflow.db'}",
                "--artifacts-destination",
                str(workdir / "mlartifacts"),
                "--host",
                host,
                "--port",
                str(mlflow_port),
                "--workers",
                "1",
            ],
            mlflow_env,
            f"{mlflow_url}/health",
        ),
    }
    if serve_deployments:
        # Runs started from the UI or the schedule run in this process's children: they
        # record to these servers and use this workdir.
        runner_env = {
            **prefect_env,
            "PREFECT_API_URL": prefect_api,
            "MLFLOW_TRACKING_URI": mlflow_url,
            WORKDIR_ENV: str(workdir),
        }
        command = [sys.executable, "-m", "flows.deployments"]
        if deployments is not None:
            command += ["--file", str(Path(deployments).resolve())]
        if nightly_cron is not None:
            command += ["--nightly-cron", nightly_cron]
        commands["deployments"] = (
            command,
            runner_env,
            f"{prefect_api}/deployments/name/gen2embed/{served[-1]}",
        )
    procs: list[subprocess.Popen[Any]] = []
    services_file = workdir / SERVICES_FILE
    interrupted = False

    def start(name: str) -> None:
        cmd, env, _health = commands[name]
        log = (logs / f"{name}.log").open("ab")
        procs.append(
            subprocess.Popen(
                cmd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        started[name] = procs[-1]

    def wait_healthy(names: list[str]) -> bool:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        pending = {n: started[n] for n in names}
        while pending:
            for name, proc in list(pending.items()):
                if proc.poll() is not None:
                    print(
                        f"gen2embed up: {name} exited early; see {logs / (name + '.log')}",
                        file=sys.stderr,
                    )
                    return False
                if _healthy(commands[name][2]):
                    del pending[name]
            if time.monotonic() > deadline:
                print(
                    f"gen2embed up: {', '.join(pending)} not healthy after "
                    f"{STARTUP_TIMEOUT_S}s; logs in {logs}",
                    file=sys.stderr,
                )
                return False
            time.sleep(0.5)
        return True

    started: dict[str, subprocess.Popen[Any]] = {}
    try:
        servers = ["prefect", "mlflow"]
        for name in servers:
            start(name)
        if not wait_healthy(servers):
            return 1
        if "deployments" in commands:  # it registers them on the Prefect server: after it
            start("deployments")
            if not wait_healthy(["deployments"]):
                return 1
        from tasks.tracking import Tracker, mlflow_ui_url

        # The link opens MLflow's model-training view on the pipeline runs (MLflow 3 opens
        # its GenAI view otherwise); the experiment exists once a Tracker has looked.
        experiment = Tracker(mlflow_url).experiment_id
        info = {
            "prefect_api_url": prefect_api,
            "prefect_ui_url": prefect_api.removesuffix("/api"),
            "mlflow_url": mlflow_url,
            "mlflow_runs_url": mlflow_ui_url(mlflow_url, experiment),
            "pids": [p.pid for p in procs],
            "deployments": served,
        }
        services_file.write_text(json.dumps(info, indent=2))
        print(
            f"Prefect UI  {info['prefect_ui_url']}\nMLflow UI   {info['mlflow_runs_url']}\n"
            f"workdir     {workdir}\n"
            + (f"serving     {', '.join(served)} (start them from the UI)\n" if served else "")
            + "".join(f"{line}\n" for line in to_fill)
            + "`gen2embed run` in another terminal now uses these servers.\nCtrl-C stops all.",
            flush=True,
        )
        while True:
            for name, proc in started.items():
                if proc.poll() is not None:
                    print(
                        f"gen2embed up: {name} stopped (exit {proc.returncode}); "
                        "stopping the others",
                        file=sys.stderr,
                    )
                    return 1
            time.sleep(1)
    except KeyboardInterrupt:
        interrupted = True
        return 0
    finally:
        # A second Ctrl-C (or a supervisor's SIGTERM after it) must not cut the stop short
        # and leave servers behind; it takes GRACE_S at most per step.
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        services_file.unlink(missing_ok=True)
        # The runner first (its runs end while the servers can still record that), then
        # the servers.
        _stop(procs[2:])
        _stop(procs[:2])
        if interrupted:
            print("gen2embed up: stopped", flush=True)
