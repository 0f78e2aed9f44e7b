"""Prefect's temporary server, kept out of the run's signals and tied to the run's life.

Without a server (`gen2embed up`), a run starts Prefect's ephemeral API server as a child
process in the run's own process group, so Ctrl-C or a supervisor's SIGTERM to the group
killed the server first and the run then spent minutes retrying a dead API. Here the server
starts in its own session (group signals do not reach it: the run ends its MLflow and Prefect
records, then stops it) and with a parent-death signal (if the run is SIGKILLed, the server
is terminated too instead of being orphaned). Linux only; elsewhere Prefect's default stays.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def isolate_ephemeral_server(log_file: Path) -> None:
    """Make Prefect's ephemeral server start in its own session, dying with this process,
    its own output going to `log_file` rather than the run's console."""
    if not sys.platform.startswith("linux"):
        return
    from prefect.server.api import server

    start = server.SubprocessASGIServer._run_uvicorn_command
    if getattr(start, "_gen2embed", False):
        return

    def run_in_own_session(self: Any) -> subprocess.Popen[Any]:
        popen = subprocess.Popen

        def popen_isolated(*args: Any, **kwargs: Any) -> subprocess.Popen[Any]:
            kwargs.update(start_new_session=True, preexec_fn=_die_with_parent)
            log_file.parent.mkdir(parents=True, exist_ok=True)
            with log_file.open("ab") as out:
                return popen(*args, stdout=out, stderr=subprocess.STDOUT, **kwargs)

        subprocess.Popen = popen_isolated  # type: ignore[misc]
        try:
            return start(self)
        finally:
            subprocess.Popen = popen  # type: ignore[misc]

    run_in_own_session._gen2embed = True  # type: ignore[attr-defined]
    server.SubprocessASGIServer._run_uvicorn_command = run_in_own_session  # type: ignore[method-assign]
