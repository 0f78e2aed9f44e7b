"""Recovery, proven: a failed stage is rerun with everything before it Cached and ends where
an uninterrupted run ends; a fine-tune killed with SIGKILL resumes from its last checkpoint;
two runs at once neither clobber nor duplicate each other's work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tasks import stages
from tests.conftest import SMALL_WORLD_OVERRIDES, TINY_MODEL_OVERRIDES, with_prefect_db
from tests.test_flow import _run

pytestmark = pytest.mark.flow
BIN = Path(sys.executable).parent / "gen2embed"
ROW = "saha-hierarchical"
UPSTREAM = ["world", "ingest", "pretrain", "embed", "retrieve"]


class InjectedFault(RuntimeError):
    pass


def _final_outputs(paths: dict[str, str]) -> dict[str, Any]:
    """What a run ends with: the row's scores and the adapter's bytes."""
    evaluate = Path(paths[f"evaluate[{ROW}]"])
    adapter = Path(paths[f"finetune[{ROW}]"]) / "adapter" / "adapter_model.safetensors"
    return {
        "report": json.loads((evaluate / "report.json").read_text()),
        "adapter": adapter.read_bytes(),
    }


@pytest.mark.usefixtures("prefect_server")
def test_a_failed_mine_is_rerun_with_its_upstream_cached_and_ends_like_an_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = {"overrides": TINY_MODEL_OVERRIDES, "until": None, "rows": [ROW]}
    real = stages.mine.function

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise InjectedFault("mine: injected fault")

    monkeypatch.setattr(stages.mine, "function", failing)
    with pytest.raises(InjectedFault):
        _run(tmp_path / "work", **run)
    failed_states = {_label(r): r.state.name for r in _task_runs_of_last_flow()}
    assert failed_states[f"mine[{ROW}]"] == "Failed"
    assert f"finetune[{ROW}]" not in failed_states, "nothing ran past the failure"

    monkeypatch.setattr(stages.mine, "function", real)
    paths, states = _run(tmp_path / "work", **run)
    assert {s: states[s] for s in UPSTREAM} == dict.fromkeys(UPSTREAM, "Cached")
    assert states[f"mine[{ROW}]"] == states[f"finetune[{ROW}]"] == "Completed"

    uninterrupted, _ = _run(tmp_path / "clean", **run)
    assert _final_outputs(paths) == _final_outputs(uninterrupted)


def _label(task_run: Any) -> str:
    name = task_run.name
    return name if "[" in name else name.rsplit("-", 1)[0]


def _task_runs_of_last_flow() -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        (last,) = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[last.id]))
        )


def _cli(workdir: Path, *extra: str) -> list[str]:
    with_prefect_db(workdir)
    overrides = [*SMALL_WORLD_OVERRIDES, *TINY_MODEL_OVERRIDES, *extra]
    return [str(BIN), "run", "--workdir", str(workdir), "--row", ROW] + [
        a for o in overrides for a in ("--set", o)
    ]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "GEN2EMBED_HOME")}


def test_a_finetune_killed_with_sigkill_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    longer = ["finetune.steps=24", "finetune.checkpoint_every=4"]
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(
        _cli(tmp_path, *longer),
        env=_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    checkpoints = tmp_path / "artifacts" / "finetune"

    def saved_steps() -> list[int]:  # finished checkpoints (a temporary one is not yet)
        found = checkpoints.glob("*.partial/checkpoints/step-*")
        return sorted(int(p.name[5:]) for p in found if p.name[5:].isdigit())

    deadline = time.monotonic() + 300
    while not saved_steps():
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the machine dies: no handler runs
    proc.wait()
    saved = saved_steps()
    assert saved and saved[-1] < 24, "killed before the end"

    again = subprocess.run(_cli(tmp_path, *longer), env=_env(), capture_output=True, text=True)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    (published,) = [p for p in checkpoints.iterdir() if p.is_dir() and p.suffix != ".partial"]
    manifest = json.loads((published / "manifest.json").read_text())
    assert manifest["metrics"]["resumed_from_step"] >= saved[-1], manifest["metrics"]
    assert "finetune: resuming from" in out
    history = json.loads((published / "history.json").read_text())
    assert history["steps"] == list(range(1, 25)), "every step once, none repeated or lost"


def test_runs_at_once_compute_each_stage_once_and_never_clobber(tmp_path: Path) -> None:
    """Two runs of one config and one of another, started together in one workdir: every
    stage of the shared config is computed once (the other run waits, then reuses it), the
    other config gets its own folders, and no database is ever locked."""
    until = ("--until", "embed")
    commands = {
        "a": _cli(tmp_path) + list(until),
        "b": _cli(tmp_path) + list(until),
        "other": _cli(tmp_path, "world.seed=7") + list(until),
    }
    procs = {
        name: subprocess.Popen(
            cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for name, cmd in commands.items()
    }
    outs = {name: proc.communicate(timeout=600)[0] for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}:\n{outs[name][-3000:]}"
        assert "database is locked" not in outs[name], outs[name]
    artifacts = tmp_path / "artifacts"
    for stage in ("world", "ingest", "pretrain", "embed"):
        folders = sorted(p.name for p in (artifacts / stage).iterdir() if p.is_dir())
        assert len(folders) == 2 and not any(f.endswith(".partial") for f in folders), folders

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs(["1"], max_results=1000)
    for stage in ("world", "ingest", "pretrain", "embed"):
        made = [
            r for r in runs if r.info.run_name == stage and "gen2embed.cached" not in r.data.tags
        ]
        assert len(made) == 2, f"{stage}: computed {len(made)} times for two configs"
