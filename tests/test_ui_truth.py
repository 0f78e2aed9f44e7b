"""What the UIs show, piece by piece (issue 17): artifact keys, inlined pictures, metric values
without float noise, links into MLflow's model-training view, the scores card's columns, the
settings a run changed."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from urllib.parse import unquote

import pytest

from embedder.config import load_config
from embedder.report import COLUMNS, SHORT
from tasks.cards import artifact_key, embed_pictures, score_rows
from tasks.tracking import compare_url, metric_value, mlflow_ui_url


@pytest.mark.parametrize(
    ("label", "kind", "key"),
    [
        ("embed", "mlflow", "embed-mlflow"),
        ("finetune[saha-hierarchical]", "progress", "finetune-saha-hierarchical-progress"),
        ("evaluate[Row_2.b]", "summary", "evaluate-row-2-b-summary"),
        ("mine[x]", "mlflow", "mine-x-mlflow"),
    ],
)
def test_artifact_keys_name_the_stage_and_row_in_prefect_s_alphabet(
    label: str, kind: str, key: str
) -> None:
    assert artifact_key(label, kind) == key


def test_pictures_linked_by_relative_path_are_inlined(tmp_path: Path) -> None:
    (tmp_path / "loss.png").write_bytes(b"\x89PNG fake")
    (tmp_path / "bars-ood.png").write_bytes(b"\x89PNG other")
    md = (
        "# t\n![loss curves](loss.png) and ![ood](bars-ood.png)\n"
        "![web](https://example.org/x.png) ![gone](missing.png) [link](loss.png)"
    )
    out = embed_pictures(md, tmp_path)
    loss = base64.b64encode(b"\x89PNG fake").decode()
    assert f"![loss curves](data:image/png;base64,{loss})" in out
    assert "![ood](data:image/png;base64," in out
    assert "![web](https://example.org/x.png)" in out, "a URL is left alone"
    assert "![gone](missing.png)" in out, "a picture that is not there is left alone"
    assert "[link](loss.png)" in out, "a plain link is not a picture"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0.07500000000000001, 0.075),
        (0.1 + 0.2, 0.3),
        (2 / 3, 0.666666666667),
        (1e-9 / 3, 3.33333333333e-10),
        (123456.0, 123456.0),
        (7, 7.0),
    ],
)
def test_metrics_are_logged_without_float_noise(value: float, shown: float) -> None:
    assert metric_value(value) == shown
    assert repr(metric_value(value)) == repr(shown)


def test_nan_and_infinity_pass_through() -> None:
    assert metric_value(float("inf")) == float("inf")
    assert metric_value(float("nan")) != metric_value(float("nan"))


def test_links_open_mlflow_in_its_model_training_view() -> None:
    run = mlflow_ui_url("http://127.0.0.1:5000/", "3", "abc")
    assert run == "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    table = mlflow_ui_url("http://h:1", "3")
    assert table.startswith("http://h:1/#/experiments/3/runs?workflowType=machine_learning&")
    assert unquote(table).endswith("searchFilter=tags.`mlflow.parentRunId` IS NULL")
    compare = compare_url("http://h:1", "3", ["a", "b"])
    assert compare.startswith("http://h:1/#/compare-runs?runs=")  # runs first: MLflow's parser
    query = unquote(compare.split("?", 1)[1])
    assert query == 'runs=["a", "b"]&experiments=["3"]&workflowType=machine_learning'


def test_the_scores_card_has_the_table_s_columns_in_its_order() -> None:
    aggregate = {c: 0.1234 + i / 10 for i, c in enumerate(reversed(COLUMNS))}  # any order
    table = {
        "rows": {
            "a": {
                "aggregate": aggregate,
                "aggregate_strict": {"overall": 0.11111},
                "aggregate_tie_rate": {"overall": 0.05},
                "aggregate_same_category": {"overall": 0.33333},
                "aggregate_category": {},  # none defined
                "pairs_per_step": 95.25,
            }
        }
    }
    (row,) = score_rows(table)
    beside = ["strict", "ties", "samecat", "cat", "pairs"]
    assert list(row) == ["row", *(SHORT[c] for c in COLUMNS), *beside]
    assert row["overall"] == round(aggregate["overall"], 3) and row["strict"] == 0.111
    assert row["samecat"] == 0.333 and row["cat"] is None and row["pairs"] == 95.2
    json.dumps(row)  # a Prefect table artifact is JSON


def test_the_settings_a_run_changed_from_its_preset() -> None:
    base = load_config("tiny")
    changed = load_config("tiny", None, ["finetune.steps=20", "evaluate.max_queries=3"])
    assert changed.changed_from(base) == {"finetune.steps": 20, "evaluate.max_queries": 3}
    assert base.changed_from(base) == {}
    assert changed.with_rows(["saha-hierarchical"]).changed_from(base) == {
        "finetune.steps": 20,
        "evaluate.max_queries": 3,
    }, "the rows are the run's name, not a setting"


def test_live_values_reach_mlflow_once_per_step() -> None:
    """The bar tells on a timer and again when it closes; both can fall on the last step."""
    from tasks.cards import ProgressArtifact

    logged: list[tuple[int, dict[str, float]]] = []

    class Tracker:
        def log_metrics(self, run_id: str, values: dict[str, float], step: int = 0) -> None:
            logged.append((step, values))

    listener = ProgressArtifact("finetune[x]", Tracker(), "run")  # type: ignore[arg-type]
    for step in (1, 2, 3, 3, 2):
        listener(50.0, "finetune: ...", step, {"train_loss": float(step)})
    listener(100.0, "finetune: done", 4, {})  # no values: nothing to log
    assert [s for s, _ in logged] == [1, 2, 3]


@pytest.mark.parametrize(
    ("history", "shown"),
    [
        ({"steps": [1, 2, 3], "pairs": [96, 94, 95]}, 95.0),
        ({"steps": [1], "loss": [1.0]}, None),  # trained before steps recorded their pairs
        (None, None),  # no history.json
    ],
)
def test_the_table_shows_pairs_per_step_from_the_adapter_history(
    tmp_path: Path, history: dict | None, shown: float | None
) -> None:
    from embedder.config import TableRow
    from embedder.outputs import Adapter, EvalReport
    from embedder.report import RowResult, pairs_per_step

    adapter = Adapter(folder=tmp_path)
    if history is not None:
        adapter.history.write_text(json.dumps(history))
    row = TableRow(name="r", template="hierarchical", negatives="saha")
    tuned = RowResult(row, EvalReport(folder=tmp_path), adapter)
    assert pairs_per_step(tuned) == shown
    assert pairs_per_step(RowResult(row, EvalReport(folder=tmp_path), None)) is None


@pytest.mark.parametrize("with_categories", [True, False])
def test_the_parent_run_s_headline_carries_the_category_columns_where_defined(
    tmp_path: Path, with_categories: bool
) -> None:
    from embedder.outputs import EvalReport
    from tasks.stages import scores

    metrics = {"p1.overall": 0.5, "p1_strict.overall": 0.4, "tie_rate.overall": 0.01}
    if with_categories:
        metrics |= {"p1_same_category.overall": 0.3, "category_accuracy.overall": 0.9}
    metrics["p1_same_category.ShapeRef"] = 0.2  # per subset: on the row run only
    compositional = {"sugarcrepe.itt.mean": 0.6, "sugarcrepe_pp.tot_strict.mean": 0.2}
    metrics |= compositional | {"sugarcrepe.itt.swap_att": 0.5}  # per category: row run only
    got = scores(EvalReport(folder=tmp_path, metrics=metrics))
    expected = {"p1.overall", "p1_strict.overall", "tie_rate.overall", *compositional}
    if with_categories:
        expected |= {"p1_same_category.overall", "category_accuracy.overall"}
    assert set(got) == expected
