"""`gen2embed up`: a Prefect server and an MLflow server on 127.0.0.1, state in the workdir.

Both run as child processes in their own process groups; Ctrl-C or SIGTERM stops both groups
(SIGTERM, then SIGKILL after a grace period), so no server or worker is left behind. While
they run, `services.json` in the workdir tells `gen2embed run` to use them.
"""

from __future__ import annotations

import contextlib
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

from embedder.errors import UserError
from flows.environment import SERVICES_FILE, create_prefect_store
from tasks.tracking import create_store

HOST = "127.0.0.1"
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


def _stop(procs: list[subprocess.Popen[Any]]) -> None:
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


class PortTakenError(UserError, OSError):
    pass


def _listener(port: int) -> str:
    """Who listens on a TCP port, from /proc (Linux); a plain phrase elsewhere."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    inodes.add(f"socket:[{fields[9]}]")
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
                return f"pid {proc.name} ({cmd[:120]})"
    return "another process"


def check_ports_free(**ports: int) -> None:
    """Fail before starting anything when a port is taken, saying by what: a health check
    would otherwise find another workdir's server and take it for ours."""
    for name, port in ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                flag = name.replace("_", "-")
                raise PortTakenError(
                    f"port {port} on {HOST} is taken by {_listener(port)}; stop it or pass "
                    f"--{flag} with a free port"
                ) from None


def serve(workdir: Path, *, prefect_port: int, mlflow_port: int) -> int:
    check_ports_free(prefect_port=prefect_port, mlflow_port=mlflow_port)
    create_prefect_store(workdir / "prefect")
    create_store(workdir)
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (workdir / "mlartifacts").mkdir(exist_ok=True)
    prefect_env = {
        **os.environ,
        "PREFECT_HOME": str(workdir / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": f"http://{HOST}:{prefect_port}/api",
    }
    prefect_env.pop("PREFECT_API_URL", None)
    mlflow_env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    commands = {
        "prefect": (
            [_bin("prefect"), "server", "start", "--host", HOST, "--port", str(prefect_port)],
            prefect_env,
            f"http://{HOST}:{prefect_port}/api/health",
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
                HOST,
                "--port",
                str(mlflow_port),
                "--workers",
                "1",
            ],
            mlflow_env,
            f"http://{HOST}:{mlflow_port}/health",
        ),
    }
    procs: list[subprocess.Popen[Any]] = []
    services_file = workdir / SERVICES_FILE
    interrupted = False

    def on_signal(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        for name, (cmd, env, _health) in commands.items():
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
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        pending = dict(zip(commands, procs, strict=True))
        while pending:
            for name, proc in list(pending.items()):
                if proc.poll() is not None:
                    print(
                        f"gen2embed up: {name} exited early; see {logs / (name + '.log')}",
                        file=sys.stderr,
                    )
                    return 1
                if _healthy(commands[name][2]):
                    del pending[name]
            if time.monotonic() > deadline:
                print(
                    f"gen2embed up: {', '.join(pending)} not healthy after "
                    f"{STARTUP_TIMEOUT_S}s; logs in {logs}",
                    file=sys.stderr,
                )
                return 1
            time.sleep(0.5)
        info = {
            "prefect_api_url": f"http://{HOST}:{prefect_port}/api",
            "prefect_ui_url": f"http://{HOST}:{prefect_port}",
            "mlflow_url": f"http://{HOST}:{mlflow_port}",
            "pids": [p.pid for p in procs],
        }
        services_file.write_text(json.dumps(info, indent=2))
        print(
            f"Prefect UI  {info['prefect_ui_url']}\nMLflow UI   {info['mlflow_url']}\n"
            f"workdir     {workdir}\n`gen2embed run` in another terminal now uses these servers."
            "\nCtrl-C stops both.",
            flush=True,
        )
        while True:
            for name, proc in zip(commands, procs, strict=True):
                if proc.poll() is not None:
                    print(
                        f"gen2embed up: {name} stopped (exit {proc.returncode}); "
                        "stopping the other",
                        file=sys.stderr,
                    )
                    return 1
            time.sleep(1)
    except KeyboardInterrupt:
        interrupted = True
        return 0
    finally:
        services_file.unlink(missing_ok=True)
        _stop(procs)
        if interrupted:
            print("gen2embed up: stopped", flush=True)
