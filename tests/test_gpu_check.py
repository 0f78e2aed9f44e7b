"""bench/gpu_check.py's dry run: every section of the GPU check runs on the CPU at toy shapes
and its JSON states facts that hold whatever the hardware, so the script works the day a GPU
is lent. Each test reads one section; a section that breaks (raises, or measures the wrong
thing) fails here rather than on the GPU box."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"
SECTIONS = ("embed", "retrieve", "evaluate", "dask", "finetune_step")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("gpu-check") / "gpu_check.json"
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.is_file(), f"no JSON written (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
    report = json.loads(out.read_text())
    report["_exit"] = done.returncode
    report["_output"] = done.stdout + done.stderr
    report["_md"] = out.with_suffix(".md").read_text()
    return report


def test_every_section_ran_and_its_checks_held(dry_run: dict[str, Any]) -> None:
    sections = dry_run["sections"]
    assert list(sections) == list(SECTIONS), dry_run["_output"]
    for name in SECTIONS:
        assert "error" not in sections[name], sections[name].get("error")
        assert "skipped" not in sections[name]
        assert sections[name]["checks"], name
        assert all(sections[name]["checks"].values()), (name, sections[name]["checks"])
        assert sections[name]["seconds"] > 0
    assert dry_run["ok"] and dry_run["failed"] == []
    assert dry_run["_exit"] == 0, dry_run["_output"]
    assert dry_run["meta"]["dry_run"] is True


def test_engine_and_naive_loop_give_the_same_vectors(dry_run: dict[str, Any]) -> None:
    embed = dry_run["sections"]["embed"]
    assert embed["min_cosine"] > 0.9999  # float32 on the CPU
    assert embed["engine"]["encoded"] == embed["distinct"] <= embed["items"]
    assert embed["naive"]["items_per_s"] > 0 and embed["engine"]["items_per_s"] > 0
    # MFU as documented: FLOPs per item x items computed / seconds / peak.
    peak = dry_run["meta"]["peak_flops"]
    naive = embed["naive"]
    assert naive["mfu"] == pytest.approx(
        embed["items"] * embed["flops_per_item"] / naive["seconds"] / peak
    )
    params = embed["linear_params"]
    assert embed["flops_per_item"] == pytest.approx(
        2 * params["vision"] * embed["patches_per_image"]
        + 2 * params["lm"] * embed["tokens_per_item"]
    )


def test_torch_top_k_equals_faiss_cpu_and_faiss_gpu_is_reported_missing(
    dry_run: dict[str, Any],
) -> None:
    r = dry_run["sections"]["retrieve"]
    assert r["torch"]["recall_vs_faiss_cpu"] == 1.0
    assert r["torch"]["top1_vs_faiss_cpu"] == 1.0
    assert r["faiss_cpu"]["backend"] == "faiss-cpu"
    assert r["faiss_gpu"]["available"] is False
    assert "not available" in r["faiss_gpu"]["note"]


def test_grad_cache_step_equals_the_plain_step(dry_run: dict[str, Any]) -> None:
    ft = dry_run["sections"]["finetune_step"]
    eq = ft["equality"]
    assert eq["loss_grad_cache"] == pytest.approx(eq["loss_plain"], rel=1e-5)
    assert eq["grad_rel_diff"] < 1e-4
    assert ft["pairs_per_s"] > 0 and ft["tokens_per_step"] > 0 and ft["patches_per_step"] > 0
    assert 0 < ft["mfu"] < ft["hfu"]


def test_eval_embeds_each_distinct_item_once(dry_run: dict[str, Any]) -> None:
    shapes = dry_run["sections"]["evaluate"]["shapes"]
    shared = shapes["shared"]
    # Shared labels are embedded once for all queries; own candidates once per query.
    assert shared["shared_candidates"] is True
    assert shared["distinct_items"] == shared["queries"] + shared["candidates_per_query"]
    assert shared["items"] == shared["queries"] * (1 + shared["candidates_per_query"])
    for name in ("own_text", "own_image"):
        own = shapes[name]
        assert own["distinct_items"] == own["queries"] * (1 + own["candidates_per_query"])
        assert own["distinct_items"] == own["items"]
    assert (
        shapes["own_image"]["images"]
        == shapes["own_image"]["distinct_items"] - (shapes["own_image"]["queries"])
    )


def test_mmeb_hours_follow_the_documented_formula(dry_run: dict[str, Any]) -> None:
    ev = dry_run["sections"]["evaluate"]
    mmeb, shapes = ev["mmeb"], ev["shapes"]
    assert len(mmeb["subsets"]) == 36
    assert mmeb["subsets_per_shape"] == {"shared": 10, "own_text": 12, "own_image": 14}
    q = mmeb["queries_per_subset"]
    hours_2b = hours_7b = 0.0
    for shape in mmeb["subsets"].values():
        s = shapes[shape]
        hours_2b += q * (s["embed_s"] + s["score_s"]) / s["queries"] / 3600
        embed_7b = s["embed_s"] * s["flops_7b"] / s["flops_2b"]
        score_7b = s["score_s"] * mmeb["hidden_7b"] / mmeb["hidden_2b"]
        hours_7b += q * (embed_7b + score_7b) / s["queries"] / 3600
    assert mmeb["hours_2b"] == pytest.approx(hours_2b)
    assert mmeb["hours_7b"] == pytest.approx(hours_7b)
    assert mmeb["hours_7b"] > mmeb["hours_2b"] > 0
    # The FLOP model: 2B and 7B linear weights from the published architectures.
    params = ev["linear_params"]
    assert params["2b"] == {"vision": 663_224_320, "lm": 1_310_195_712}
    assert params["7b"]["lm"] > 4 * params["2b"]["lm"]
    for s in shapes.values():
        patches = s["images"] * dry_run["sections"]["embed"]["patches_per_image"]
        assert s["flops_2b"] == pytest.approx(
            2 * params["2b"]["vision"] * patches + 2 * params["2b"]["lm"] * s["real_tokens"]
        )
    assert mmeb["reference_gpu_hours"] == [10.0, 20.0]


def test_dask_workers_wrote_every_shard_with_the_same_vectors(dry_run: dict[str, Any]) -> None:
    d = dry_run["sections"]["dask"]
    assert d["cluster_class"].startswith("distributed.LocalCluster")
    assert d["resumed_shards"] == d["shards"] > 1
    assert len(d["task_info"]) == d["tasks"] >= 2
    assert all(t["pid"] != d["main_pid"] for t in d["task_info"])  # worker processes
    assert sum(t["encoded"] for t in d["task_info"]) == d["items"]
    assert d["max_abs_diff"] <= 1e-5


def test_results_block_names_date_machine_versions_and_command(dry_run: dict[str, Any]) -> None:
    md = dry_run["_md"]
    meta = dry_run["meta"]
    assert md == dry_run["results_md"]
    assert meta["date"] in md and meta["device"] in md
    assert f"torch {meta['versions']['torch']}" in md
    assert "bench/gpu_check.py --dry-run" in md
    for name in SECTIONS:
        assert f"\n{name} (" in md, name
