"""`gen2embed up`: real Prefect and MLflow servers on loopback, a run using them, Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.deployments import DEFAULT_FILE, NIGHTLY
from tasks.tracking import compare_url, mlflow_ui_url
from tests.conftest import SMALL_WORLD_OVERRIDES, TINY_MODEL_OVERRIDES, with_prefect_db

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
    for attempt in range(20):
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            # 503: Prefect's SQLite was locked by a writer (the deployments being registered
            # as `up` starts); the UI retries such calls too.
            if exc.code != 503 or attempt == 19:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


@dataclass
class Served:
    """`gen2embed up` running in a temp workdir, serving the deployments."""

    work: Path
    proc: subprocess.Popen[str]
    api: str
    ui: str
    mlflow: str
    info: dict[str, Any]


# The demo deployment as shipped, on a smaller world and model and one table row, so a run
# started from the UI takes seconds; everything else in the file is as users get it.
DEMO_PARAMETERS = {
    "preset": "tiny",
    "rows": ["saha-hierarchical"],
    "finetune_steps": 2,
    "overrides": SMALL_WORLD_OVERRIDES
    + [o for o in TINY_MODEL_OVERRIDES if not o.startswith("finetune.steps=")],
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("served")
    tree = yaml.safe_load(DEFAULT_FILE.read_text())
    tree["deployments"][0]["parameters"] = DEMO_PARAMETERS
    deployments = root / "prefect.yaml"
    deployments.write_text(yaml.safe_dump(tree))
    work = with_prefect_db(root / "work")
    ports = [_free_port(), _free_port()]
    up = subprocess.Popen(
        [
            BIN / "gen2embed", "up", "--workdir", str(work), "--deployments", str(deployments),
            "--prefect-port", str(ports[0]), "--mlflow-port", str(ports[1]),
        ],
        env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    services = work / "services.json"
    deadline = time.monotonic() + 240
    while not services.exists():
        assert up.poll() is None, up.stdout.read() if up.stdout else ""
        assert time.monotonic() < deadline, "servers did not come up"
        time.sleep(0.5)
    info = json.loads(services.read_text())
    served = Served(
        work, up, info["prefect_api_url"], info["prefect_ui_url"], info["mlflow_url"], info
    )
    try:
        yield served
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            up.communicate(timeout=60)


def _wait_for_flow_run(served: Served, flow_run_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 400
    final = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
    while (state := _rest(f"{served.api}/flow_runs/{flow_run_id}")["state"])["type"] not in final:
        assert time.monotonic() < deadline, state
        time.sleep(1)
    log = (served.work / "logs" / "deployments.log").read_text()
    assert state["type"] == "COMPLETED", log[-3000:]
    return state


def _mlflow_runs(served: Served) -> list[dict[str, Any]]:
    exp = _rest(f"{served.mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name=gen2embed")
    found = _rest(
        f"{served.mlflow}/api/2.0/mlflow/runs/search",
        {
            "experiment_ids": [exp["experiment"]["experiment_id"]],
            "max_results": 200,
            "order_by": ["attributes.start_time DESC"],
        },
    )
    return found["runs"]


def _tags(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def test_up_serves_the_deployments_and_a_run_started_through_the_api_is_recorded(
    served: Served,
) -> None:
    assert served.api.startswith("http://127.0.0.1:")
    assert served.info["deployments"] == ["demo", "qwen2vl-2b-saha", "qwen2vl-7b-saha", NIGHTLY]

    # The demo deployment, started through Prefect's REST API as the UI's button does.
    demo = _rest(f"{served.api}/deployments/name/gen2embed/demo")
    flow_run = _rest(f"{served.api}/deployments/{demo['id']}/create_flow_run", {"name": "api-saha"})
    _wait_for_flow_run(served, flow_run["id"])

    # Its records, found through MLflow's REST API: the pipeline run carries the flow run's
    # name, the settings it changed from the preset and a link back to Prefect.
    runs = {r["info"]["run_name"]: r for r in reversed(_mlflow_runs(served))}
    parent = runs["api-saha"]
    tags = _tags(parent)
    assert tags["prefect.flow_run_url"].endswith(f"/runs/flow-run/{flow_run['id']}")
    assert "finetune.steps=2" in tags["gen2embed.settings"]
    assert tags["prefect.flow_run_url"] in tags["mlflow.note.content"]
    metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    assert parent["info"]["status"] == "FINISHED"
    assert tags["prefect.flow_run_id"] == flow_run["id"]
    assert "saha-hierarchical/p1.overall" in metrics
    assert _tags(runs["saha-hierarchical"])["mlflow.parentRunId"] == parent["info"]["run_id"]
    # The Prefect run links to its MLflow run and shows the scores as a table.
    artifacts = _rest(
        f"{served.api}/artifacts/filter",
        {"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}},
    )
    by_key = {a["key"]: a for a in artifacts if a["key"]}
    link = mlflow_ui_url(served.mlflow, parent["info"]["experiment_id"], parent["info"]["run_id"])
    assert f"({link})" in by_key["mlflow-run"]["data"]
    assert by_key["scores"]["type"] == "table" and "saha-hierarchical" in by_key["scores"]["data"]
    assert {"world", "ingest", "pretrain", "embed", "retrieve", "mine", "finetune"} <= set(runs)
    # The adapter, registered with what it is for.
    name = "gen2embed-tiny-saha-hierarchical"
    assert tags["gen2embed.registered.saha-hierarchical"] == f"{name}/1"
    versions = _rest(
        f"{served.mlflow}/api/2.0/mlflow/model-versions/search?filter=name%3D%27{name}%27"
    )["model_versions"]
    (version,) = versions
    vtags = _tags({"data": {"tags": version["tags"]}})
    assert vtags["base_model"] == "tiny" and len(vtags["adapter_sha256"]) == 64
    overall = metrics["saha-hierarchical/p1.overall"]
    assert float(vtags["p1.overall"]) == pytest.approx(overall, abs=1e-4)
    # An MLflow Model (tasks.pyfunc_model), the first version of its name: the champion.
    assert version["source"].endswith(f"/registered/{vtags['evaluate_fingerprint']}")
    assert vtags["gen2embed.format"] == "gen2embed-pyfunc-1"
    assert vtags["gen2embed.champion"] == "promoted"
    champion = _rest(
        f"{served.mlflow}/api/2.0/mlflow/registered-models/alias?name={name}&alias=champion"
    )["model_version"]
    assert champion["version"] == version["version"] == "1"

    # `gen2embed run` in another terminal uses the same servers: no server of its own, and
    # every stage of the row is a cache hit.
    run = subprocess.run(
        [BIN / "gen2embed", "run", "--workdir", str(served.work), "--row", "saha-hierarchical",
         *[a for o in DEMO_PARAMETERS["overrides"] for a in ("--set", o)], "--set",
         "finetune.steps=2"],
        env=_clean_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Starting temporary server" not in run.stdout + run.stderr
    flow_runs = _rest(f"{served.api}/flow_runs/filter", {"sort": "START_TIME_ASC"})
    ran = [fr for fr in flow_runs if fr["state"]["type"] != "SCHEDULED"]  # not the nightly
    assert [fr["state"]["name"] for fr in ran] == ["Completed", "Completed"]
    nightly = [fr for fr in flow_runs if fr["state"]["type"] == "SCHEDULED"]
    assert nightly and all(fr["expected_start_time"][11:16] == "02:00" for fr in nightly)
    compared = subprocess.run(
        [BIN / "gen2embed", "compare", "--workdir", str(served.work), "tiny [saha-hierarchical]",
         parent["info"]["run_id"]],
        env=_clean_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert compared.returncode == 0, compared.stderr
    assert "saha-hierarchical/p1.overall" in compared.stdout
    assert f"champion of {name}: version 1" in compared.stdout


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)"
)
def test_a_run_started_from_the_prefect_ui_form_completes_and_shows_in_mlflow(
    served: Served,
) -> None:
    from playwright.sync_api import expect, sync_playwright

    shots = Path(os.environ.get("GEN2EMBED_SCREENSHOTS", served.work.parent / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        # Prefect: Deployments -> demo -> Run -> Custom run, one setting changed, Submit.
        page.goto(f"{served.ui}/deployments")
        page.get_by_role("link", name="demo", exact=True).first.click()
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Custom run").click()
        steps = page.locator(".schema-form-property").filter(
            has=page.get_by_text("finetune_steps (Optional)", exact=True)
        )
        steps.locator("input").fill("3")
        page.screenshot(path=shots / "prefect-run-form.png", full_page=True)
        before = {fr["id"] for fr in _rest(f"{served.api}/flow_runs/filter", {})}
        page.get_by_role("button", name="Submit").click()
        deadline = time.monotonic() + 60
        while not (new := [
            fr for fr in _rest(f"{served.api}/flow_runs/filter", {}) if fr["id"] not in before
        ]):  # fmt: skip
            assert time.monotonic() < deadline, "the form started no run"
            time.sleep(0.5)
        (flow_run,) = new
        assert flow_run["parameters"]["finetune_steps"] == 3
        _wait_for_flow_run(served, flow_run["id"])
        flow_run_id = flow_run["id"]
        page.goto(f"{served.ui}/runs/flow-run/{flow_run_id}")
        expect(page.get_by_text("Completed").first).to_be_visible()
        page.screenshot(path=shots / "prefect-completed-run.png", full_page=True)
        # Its artifacts: every card titled and described, none "No description".
        page.get_by_text("Artifacts", exact=True).first.click()
        expect(page.get_by_text("scores", exact=True).first).to_be_visible()
        assert page.get_by_text("No description").count() == 0
        page.screenshot(path=shots / "prefect-artifacts.png", full_page=True)
        # The table card: every picture (bar charts, loss curves) loads in the browser.
        (table,) = _rest(
            f"{served.api}/artifacts/filter",
            {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}, "key": {"any_": ["table"]}}},
        )
        page.goto(f"{served.ui}/artifacts/artifact/{table['id']}")
        expect(page.get_by_text("Appendix: per subset").first).to_be_visible()
        page.wait_for_function(
            "Array.from(document.images).filter(i => i.src.startsWith('data:image/')).length == 8"
        )
        loaded = page.evaluate(
            "Array.from(document.images).filter(i => i.src.startsWith('data:image/'))"
            ".map(i => i.complete && i.naturalWidth > 0)"
        )
        assert loaded == [True] * 8, loaded
        page.screenshot(path=shots / "prefect-table.png", full_page=True)

        # MLflow: the run that flow run made, with the changed setting, metrics and a plot.
        runs = _mlflow_runs(served)
        parent = next(
            r
            for r in runs
            if _tags(r).get("prefect.flow_run_id") == flow_run_id
            and "mlflow.parentRunId" not in _tags(r)
        )
        run_id = parent["info"]["run_id"]
        whole = _rest(f"{served.mlflow}/api/2.0/mlflow/runs/get?run_id={run_id}")["run"]
        params = {p["key"]: p["value"] for p in whole["data"]["params"]}
        assert params["finetune.steps"] == "3"
        # The MLflow run carries the flow run's name (the UI drew it) and links back.
        assert parent["info"]["run_name"] == flow_run["name"]
        back = _tags(parent)["prefect.flow_run_url"]
        assert back == f"{served.ui}/runs/flow-run/{flow_run_id}"
        experiment = parent["info"]["experiment_id"]
        # The links the project shows open in MLflow's model-training view, in a browser
        # that never chose a view (MLflow 3 opens its GenAI view by default).
        link = _rest(
            f"{served.api}/artifacts/filter",
            {
                "artifacts": {
                    "flow_run_id": {"any_": [flow_run_id]},
                    "key": {"any_": ["mlflow-run"]},
                }
            },
        )[0]["data"]
        url = re.search(r"\((http[^)]+)\)", link).group(1)
        assert url == mlflow_ui_url(served.mlflow, experiment, run_id)
        page.goto(url)
        expect(page.get_by_text("saha-hierarchical/p1.overall").first).to_be_visible()
        page.screenshot(path=shots / "mlflow-run.png", full_page=True)
        # The experiment's runs table lists pipeline runs (stage runs nest under them).
        page.goto(mlflow_ui_url(served.mlflow, experiment))
        expect(page.get_by_text(flow_run["name"]).first).to_be_visible()
        expect(page.get_by_text("api-saha").first).to_be_visible()
        page.screenshot(path=shots / "mlflow-runs.png", full_page=True)
        page.goto(
            f"{served.mlflow}/#/experiments/{experiment}/runs/{run_id}/artifacts?workflowType=machine_learning"
        )
        page.get_by_text("report", exact=True).first.click()
        page.get_by_text("bars-overall.png").first.click()
        expect(page.get_by_role("img", name="report/bars-overall.png")).to_be_visible()
        page.screenshot(path=shots / "mlflow-plot.png", full_page=True)
        # The comparison view of the two demo runs (the API's and the UI's).
        earlier = next(r["info"]["run_id"] for r in runs if r["info"]["run_name"] == "api-saha")
        page.goto(compare_url(served.mlflow, experiment, [earlier, run_id]))
        expect(page.get_by_text("finetune.steps").first).to_be_visible()
        page.screenshot(path=shots / "mlflow-compare.png", full_page=True)
        browser.close()


def test_cancelling_a_served_run_in_prefect_ends_it_in_seconds_with_its_records_closed(
    served: Served,
) -> None:
    """Cancel in the Prefect UI (a CANCELLING state, as its button sets) in the middle of a
    long pretraining: the runner stops the run, Prefect says Cancelled, MLflow KILLED."""
    demo = _rest(f"{served.api}/deployments/name/gen2embed/demo")
    overrides = [*DEMO_PARAMETERS["overrides"], "pretrain.steps=100000"]
    long = {**DEMO_PARAMETERS, "overrides": overrides}
    start = f"{served.api}/deployments/{demo['id']}/create_flow_run"
    flow_run = _rest(start, {"parameters": long, "name": "cancel-me"})
    log = served.work / "logs" / "deployments.log"
    deadline = time.monotonic() + 240
    while "pretrain step 25/100000" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    asked = time.monotonic()
    _rest(
        f"{served.api}/flow_runs/{flow_run['id']}/set_state",
        {"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True},
    )
    while (state := _rest(f"{served.api}/flow_runs/{flow_run['id']}")["state"])["type"] not in (
        "CANCELLED", "CRASHED", "FAILED", "COMPLETED"
    ):  # fmt: skip
        assert time.monotonic() - asked < 60, state
        time.sleep(0.5)
    took = time.monotonic() - asked
    assert state["type"] == "CANCELLED", state

    def records() -> dict[str, str]:
        mine = [r for r in _mlflow_runs(served) if _tags(r).get("prefect.flow_run_id") == ours]
        return {r["info"]["run_name"]: r["info"]["status"] for r in mine}

    ours = flow_run["id"]
    deadline = time.monotonic() + 30  # the run's own handler records the end as it unwinds
    while "RUNNING" in (statuses := records()).values():
        assert time.monotonic() < deadline, statuses
        time.sleep(0.5)
    assert statuses["cancel-me"] == "KILLED" and statuses["pretrain"] == "KILLED"
    # The interrupted task ends Cancelled, not Crashed, and its log says it was cancelled.
    (pretrain,) = _rest(
        f"{served.api}/task_runs/filter",
        {"flow_runs": {"id": {"any_": [ours]}}, "task_runs": {"name": {"any_": ["pretrain"]}}},
    )
    assert pretrain["state"]["type"] == "CANCELLED", pretrain["state"]
    logs = _rest(f"{served.api}/logs/filter", {"logs": {"task_run_id": {"any_": [pretrain["id"]]}}})
    assert any("pretrain: cancelled with its flow run" in entry["message"] for entry in logs)
    assert list((served.work / "artifacts" / "pretrain").glob("*.partial")), "kept for resume"
    assert took < 30, f"{took:.1f}s from Cancel to Cancelled"


def test_up_stops_servers_runner_and_runs_on_ctrl_c(served: Served) -> None:
    served.proc.send_signal(signal.SIGINT)
    out, _ = served.proc.communicate(timeout=60)
    assert served.proc.returncode == 0, out
    assert "stopped" in out
    assert not (served.work / "services.json").exists()
    time.sleep(0.5)
    assert _processes_mentioning(str(served.work)) == [], "servers, runner or runs outlived `up`"


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
