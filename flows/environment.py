"""Process environment for Prefect and MLflow, set before either is imported.

Prefect reads its settings when first imported, so the CLI calls `configure()` first and
imports flows afterwards. Values the user already exported win.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from embedder.artifacts import WORKDIR_ENV, create_once, resolve_workdir
from embedder.errors import UserError

SERVICES_FILE = "services.json"


def running_services(workdir: Path) -> dict[str, str] | None:
    """URLs of the servers `gen2embed up` started for this workdir, if they still run."""
    path = workdir / SERVICES_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if all(psutil.pid_exists(int(pid)) for pid in info.get("pids", [])):
        return info
    return None


class WorkdirError(UserError, OSError):
    pass


def usable_workdir(workdir: str | Path | None) -> Path:
    """The workdir, created if needed, or a WorkdirError saying why it cannot be used."""
    root = resolve_workdir(workdir)
    if root.exists() and not root.is_dir():
        raise WorkdirError(f"workdir {root} is a file, not a folder; pick another --workdir")
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as exc:
        raise WorkdirError(f"workdir {root} is not writable ({exc.strerror})") from None
    return root


def configure(workdir: str | Path | None) -> Path:
    root = usable_workdir(workdir)
    os.environ[WORKDIR_ENV] = str(root)
    defaults = {
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # A fresh machine's first SQLite migration can take long (prefect#16397).
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        # Show the embedder's own progress logs in Prefect's console and UI.
        "PREFECT_LOGGING_EXTRA_LOGGERS": "gen2embed",
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
        "GIT_PYTHON_REFRESH": "quiet",
    }
    services = running_services(root)
    if services:
        defaults["PREFECT_API_URL"] = services["prefect_api_url"]
        defaults["MLFLOW_TRACKING_URI"] = services["mlflow_url"]
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    logging.getLogger("gen2embed").setLevel(logging.INFO)
    return root


PREFECT_DB = "prefect.db"


class StoreError(UserError, RuntimeError):
    pass


def uses_own_prefect_server() -> bool:
    """Runs talk to a Prefect server or database the user configured, not the workdir's."""
    return bool(
        os.environ.get("PREFECT_API_URL") or os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL")
    )


def create_prefect_store(home: Path) -> None:
    """Create the Prefect database in `home` once (embedder.artifacts.create_once), migrated
    in a temporary file renamed into place, before any server uses it: Prefect migrates in
    place, so a kill during a first run, or two first runs at once, could leave a database
    no later run can open."""

    def build(tmp: Path) -> None:
        env = {**os.environ, "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp}"}
        done = subprocess.run(
            [str(Path(sys.executable).with_name("prefect")), "server", "database", "upgrade", "-y"],
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            full = any(m in done.stderr for m in ("No space left", "database or disk is full"))
            reason = f"the disk holding {home} is full" if full else done.stderr[-1500:]
            raise StoreError(f"could not create the Prefect database in {home}: {reason}")

    create_once(home / PREFECT_DB, build)
