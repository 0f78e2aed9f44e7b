"""`gen2embed up`: real Prefect and MLflow servers on loopback, a run using them, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from flows.deployments import NIGHTLY
from tests.conftest import SMALL_WORLD_OVERRIDES, TINY_MODEL_OVERRIDES

pytestmark = pytest.mark.flow
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_mentioning(text: str) -> list[int]:
    """Processes whose command line or environment mention `text` (servers and the runner
    carry the workdir in their environment only)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                seen = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
            except OSError:
                continue
            if text.encode() in seen:
                found.append(int(entry.name))
    return found


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFECT_HOME", "GEN2EMBED_HOME"):
        env.pop(key, None)
    return env


def _rest(url: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    method = "GET" if body is None else "POST"
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read() or b"null")


def test_up_serves_the_deployments_and_a_run_started_through_the_api_is_recorded(
    tmp_path: Path,
) -> None:
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
        deadline = time.monotonic() + 240
        while not services.exists():
            assert up.poll() is None, up.stdout.read() if up.stdout else ""
            assert time.monotonic() < deadline, "servers did not come up"
            time.sleep(0.5)
        info = json.loads(services.read_text())
        api, mlflow = info["prefect_api_url"], info["mlflow_url"]
        assert api == f"http://127.0.0.1:{ports[0]}/api"
        assert info["deployments"] == ["demo", "qwen2vl-2b-saha", "qwen2vl-7b-saha", NIGHTLY]

        # The demo deployment, started through Prefect's REST API as the UI's button does,
        # with a smaller world and model and one table row.
        demo = _rest(f"{api}/deployments/name/gen2embed/demo")
        parameters = {
            "rows": ["saha-hierarchical"],
            "overrides": SMALL_WORLD_OVERRIDES + TINY_MODEL_OVERRIDES,
        }
        start = f"{api}/deployments/{demo['id']}/create_flow_run"
        flow_run = _rest(start, {"parameters": parameters})
        deadline = time.monotonic() + 400
        while (state := _rest(f"{api}/flow_runs/{flow_run['id']}")["state"])["type"] not in (
            "COMPLETED", "FAILED", "CRASHED", "CANCELLED"
        ):  # fmt: skip
            assert time.monotonic() < deadline, state
            time.sleep(1)
        log = (work / "logs" / "deployments.log").read_text()
        assert state["type"] == "COMPLETED", log[-3000:]

        # Its records, found through MLflow's REST API.
        exp = _rest(f"{mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name=gen2embed")
        found = _rest(
            f"{mlflow}/api/2.0/mlflow/runs/search",
            {"experiment_ids": [exp["experiment"]["experiment_id"]], "max_results": 100},
        )
        runs = {r["info"]["run_name"]: r for r in found["runs"]}
        parent = runs["tiny [saha-hierarchical]"]
        tags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
        metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
        assert parent["info"]["status"] == "FINISHED"
        assert tags["prefect.flow_run_id"] == flow_run["id"]
        assert "saha-hierarchical/p1.overall" in metrics
        row = runs["saha-hierarchical"]
        row_tags = {t["key"]: t["value"] for t in row["data"]["tags"]}
        assert row_tags["mlflow.parentRunId"] == parent["info"]["run_id"]
        assert {"world", "ingest", "pretrain", "embed", "retrieve", "mine", "finetune"} <= set(runs)
        # The adapter, registered with what it is for.
        name = "gen2embed-tiny-saha-hierarchical"
        assert tags["gen2embed.registered.saha-hierarchical"] == f"{name}/1"
        versions = _rest(
            f"{mlflow}/api/2.0/mlflow/model-versions/search?filter=name%3D%27{name}%27"
        )["model_versions"]
        (version,) = versions
        vtags = {t["key"]: t["value"] for t in version["tags"]}
        assert vtags["base_model"] == "tiny" and len(vtags["adapter_sha256"]) == 64
        overall = metrics["saha-hierarchical/p1.overall"]
        assert float(vtags["p1.overall"]) == pytest.approx(overall, abs=1e-4)
        assert version["source"].endswith("/adapter")

        # `gen2embed run` in another terminal uses the same servers: no server of its own,
        # and every stage of the row is a cache hit.
        run = subprocess.run(
            [
                BIN / "gen2embed",
                "run",
                "--workdir",
                str(work),
                "--row",
                "saha-hierarchical",
                *[a for o in parameters["overrides"] for a in ("--set", o)],
            ],
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "Starting temporary server" not in run.stdout + run.stderr
        flow_runs = _rest(f"{api}/flow_runs/filter", {"sort": "START_TIME_ASC"})
        ran = [fr for fr in flow_runs if fr["state"]["type"] != "SCHEDULED"]  # not the nightly
        assert [fr["state"]["name"] for fr in ran] == ["Completed", "Completed"]
        nightly = [fr for fr in flow_runs if fr["state"]["type"] == "SCHEDULED"]
        assert nightly and all(fr["expected_start_time"][11:16] == "02:00" for fr in nightly)
        compared = subprocess.run(
            [BIN / "gen2embed", "compare", "--workdir", str(work), "tiny [saha-hierarchical]",
             parent["info"]["run_id"]],
            env=_clean_env(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert compared.returncode == 0, compared.stderr
        assert "saha-hierarchical/p1.overall" in compared.stdout
    finally:
        up.send_signal(signal.SIGINT)
        out, _ = up.communicate(timeout=60)
    assert up.returncode == 0, out
    assert "stopped" in out
    assert not services.exists()
    time.sleep(0.5)
    assert _processes_mentioning(str(work)) == [], "servers, runner or runs outlived `up`"


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
