"""Issue 17.11: help, argument errors and config errors answer without the heavy imports
(torch, transformers, Prefect, MLflow: seconds); stage names still come from tasks/stages.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = {
    "torch",
    "transformers",
    "peft",
    "prefect",
    "mlflow",
    "faiss",
    "pandas",
    "pyarrow",
    "numpy",
    "PIL",
    "dask",
}

# main() as the `gen2embed` script calls it, then which heavy packages it imported.
PROBE = """
import json, sys
from flows.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = set(json.loads({heavy!r}))
found = sorted({{m.split(".")[0] for m in sys.modules}} & heavy)
stages = "tasks.stages" in sys.modules
print("PROBE " + json.dumps({{"code": code, "heavy": found, "stages": stages}}))
"""


def _probe(tmp_path: Path, *argv: str) -> tuple[dict[str, object], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["GEN2EMBED_HOME"] = str(tmp_path / "home")
    res = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=json.dumps(sorted(HEAVY))), *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    lines = [line for line in res.stdout.splitlines() if line.startswith("PROBE ")]
    assert lines, res.stdout + res.stderr
    return json.loads(lines[-1].removeprefix("PROBE ")), res.stdout + res.stderr


@pytest.mark.parametrize(
    ("argv", "code", "says"),
    [
        (["--help"], 0, "usage: gen2embed"),
        (["run", "--help"], 0, "--from {world,ingest,"),
        (["run", "--from", "mien"], 2, "invalid choice: 'mien'"),
        (
            ["run", "--set", "model.dtyp=x"],
            2,
            "model.dtyp: unknown key (did you mean model.dtype?)",
        ),
        (["stages", "--set", "ingest.on_bad_row=skip"], 2, "did you mean ingest.on_bad_rows?"),
    ],
    ids=["help", "run-help", "argument-error", "config-typo-run", "config-typo-stages"],
)
def test_help_argument_and_config_errors_import_nothing_heavy(
    tmp_path: Path, argv: list[str], code: int, says: str
) -> None:
    found, out = _probe(tmp_path, *argv)
    assert found["code"] == code, out
    assert says in out
    assert found["heavy"] == [] and found["stages"] is False, out


def test_help_creates_no_workdir(tmp_path: Path) -> None:
    _probe(tmp_path, "--help")
    assert not (tmp_path / "home").exists() and not (tmp_path / "data").exists()


def test_the_cli_reads_the_stage_names_tasks_stages_defines() -> None:
    from flows.cli import stage_names
    from tasks.stages import STAGE_NAMES

    assert stage_names() == STAGE_NAMES


def test_up_on_a_taken_port_answers_before_the_heavy_imports(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = str(holder.getsockname()[1])
        found, out = _probe(tmp_path, "up", "--prefect-port", port, "--mlflow-port", port)
    assert found["code"] == 2 and f"port {port} on 127.0.0.1 is taken by pid" in out, out
    assert found["heavy"] == [] and found["stages"] is False, out
