"""deployments/prefect.yaml: what it defines, how mistakes in it are reported, missed nightly
runs cancelled instead of caught up, the form Prefect renders, `gen2embed deploy`."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from embedder.config import ConfigError
from flows.deployments import (
    DEFAULT_FILE,
    NIGHTLY,
    DeploymentError,
    cancel_missed_runs,
    load_specs,
    runner_deployments,
)
from flows.pipeline import pipeline_config

BIN = Path(sys.executable).parent


def test_the_file_defines_the_demo_the_paper_recipes_and_a_nightly_retrain() -> None:
    specs = {s.name: s for s in load_specs()}
    assert list(specs) == ["demo", "qwen2vl-2b-saha", "qwen2vl-7b-saha", NIGHTLY]
    assert specs["demo"].parameters == {"preset": "tiny"}
    assert specs["demo"].to_fill is None
    for name in ("qwen2vl-2b-saha", "qwen2vl-7b-saha"):
        gpu = specs[name]
        assert gpu.parameters["rows"] == ["saha-hierarchical"]
        assert gpu.concurrency_limit is not None and gpu.concurrency_limit.limit == 1
        assert gpu.to_fill == "source=hub needs ingest.train_images"
    nightly = specs[NIGHTLY]
    assert [(s.cron, s.timezone) for s in nightly.schedules] == [("0 2 * * *", "UTC")]
    assert nightly.concurrency_limit is not None
    assert (nightly.concurrency_limit.limit, nightly.concurrency_limit.collision_strategy) == (
        1,
        "CANCEL_NEW",
    )
    # The flags given on the command line win over the file.
    assert load_specs(nightly_cron="30 3 * * 1-5")[-1].schedules[0].cron == "30 3 * * 1-5"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d[0]["parameters"].update(preset="qwen3"), "demo: parameters: .*qwen3"),
        (lambda d: d[0]["parameters"].update(stepz=3), "demo: parameters: stepz: Extra"),
        (lambda d: d[3]["parameters"].update(rows=["saha-hierarhical"]), "saha-hierarchical"),
        (lambda d: d[0]["parameters"].update(overrides=["mine.kk=3"]), "mine.kk"),
        (lambda d: d[3]["schedules"][0].update(cron="at two"), "'at two' is not a cron"),
        (lambda d: d[3]["schedules"][0].update(timezone="Mars/Olympus"), "'Mars/Olympus' is not"),
        (lambda d: d[3].update(schedule=d[3].pop("schedules")), "nightly-retrain: schedule"),
        (lambda d: d[1].update(entrypoint="flows/other.py:x"), "entrypoint must be"),
        (lambda d: d.append(dict(d[0])), "names repeat"),
    ],
)
def test_a_mistake_in_the_file_is_one_message_naming_the_deployment(
    tmp_path: Path, edit, message: str
) -> None:
    tree = yaml.safe_load(DEFAULT_FILE.read_text())
    edit(tree["deployments"])
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(DeploymentError, match=message):
        load_specs(path)


def test_nightly_cron_needs_a_nightly_deployment_and_a_cron(tmp_path: Path) -> None:
    with pytest.raises(DeploymentError, match="not a cron expression"):
        load_specs(nightly_cron="2am")
    tree = yaml.safe_load(DEFAULT_FILE.read_text())
    tree["deployments"] = tree["deployments"][:1]
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(DeploymentError, match="no nightly-retrain deployment"):
        load_specs(path, nightly_cron="0 3 * * *")


def test_a_common_setting_and_an_override_of_its_key_is_an_error_naming_both() -> None:
    cfg = pipeline_config("tiny", finetune_steps=7, eval_max_queries=5)
    assert (cfg.finetune.steps, cfg.evaluate.max_queries) == (7, 5)
    with pytest.raises(ConfigError, match=r"finetune.steps is set twice.*finetune_steps=7"):
        pipeline_config("tiny", overrides=["finetune.steps=9"], finetune_steps=7)


@pytest.mark.flow
@pytest.mark.usefixtures("prefect_server")
def test_missed_nightly_runs_are_cancelled_not_caught_up() -> None:
    from prefect.client.orchestration import get_client

    nightly = runner_deployments([s for s in load_specs() if s.name == NIGHTLY])[0]
    deployment_id = nightly.apply()
    now = dt.datetime.now(dt.UTC)
    with get_client(sync_client=True) as client:
        # What the scheduler leaves behind while nothing serves the deployment: past nights,
        # and the coming ones.
        for start, runs in ((now - dt.timedelta(days=3), 10), (now, 2)):
            body = {"start_time": start.isoformat(), "min_runs": runs, "max_runs": runs}
            client._client.post(f"/deployments/{deployment_id}/schedule", json=body)
        person = client.create_flow_run_from_deployment(deployment_id)  # started by hand
        cancelled = cancel_missed_runs([deployment_id], now)
        runs = client.read_flow_runs()
    mine = [r for r in runs if r.deployment_id == deployment_id]
    missed = [r for r in mine if r.auto_scheduled and r.expected_start_time < now]
    assert len(missed) == 3, "three nights at 02:00 were missed"
    assert sorted(cancelled) == sorted(r.name for r in missed)
    assert all(r.state.name == "Cancelled" and "missed" in r.state.message for r in missed)
    future = [r for r in mine if r.auto_scheduled and r.expected_start_time > now]
    assert future and all(r.state.name == "Scheduled" for r in future)
    assert next(r for r in mine if r.id == person.id).state.name == "Scheduled"


@pytest.mark.flow
@pytest.mark.usefixtures("prefect_server")
def test_deploy_registers_on_an_existing_server_and_pool(tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), GEN2EMBED_HOME=str(tmp_path))
    missing = subprocess.run(
        [BIN / "gen2embed", "deploy", "--pool", "gpu-pool"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert missing.returncode == 2, missing.stderr
    assert "work pool 'gpu-pool' does not exist" in missing.stderr
    assert "prefect work-pool create gpu-pool --type process" in missing.stderr

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="gpu-pool", type="process"))
    done = subprocess.run(
        [BIN / "gen2embed", "deploy", "--pool", "gpu-pool", "--nightly-cron", "15 4 * * *"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "registered gen2embed/nightly-retrain (work pool gpu-pool)" in done.stdout
    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("gen2embed/nightly-retrain")
        gpu = client.read_deployment_by_name("gen2embed/qwen2vl-7b-saha")
    assert nightly.work_pool_name == "gpu-pool"
    assert [s.schedule.cron for s in nightly.schedules] == ["15 4 * * *"]
    assert gpu.global_concurrency_limit is not None and gpu.global_concurrency_limit.limit == 1
    # The form the Prefect UI renders from the deployment: typed, enums, defaults filled.
    props = gpu.parameter_openapi_schema["properties"]
    assert props["preset"]["enum"] == ["tiny", "qwen2vl-2b", "qwen2vl-7b"]
    expected = {"preset": "qwen2vl-7b", "rows": ["saha-hierarchical"], "source": "hub"}
    assert gpu.parameters == expected
    assert props["finetune_steps"]["anyOf"][0]["type"] == "integer"


def test_deploy_without_a_server_says_what_to_set(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["GEN2EMBED_HOME"] = str(tmp_path)
    res = subprocess.run(
        [BIN / "gen2embed", "deploy", "--pool", "p"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 2
    assert "set PREFECT_API_URL" in res.stderr and "Traceback" not in res.stderr
