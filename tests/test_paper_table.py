"""bench/paper_table.py's own logic (the runs themselves are not in CI: ~15 min a seed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.paper_table import ORACLE, compositional_means, fn_rates, ordering, rows_setting
from embedder.config import load_config


def test_the_oracle_row_joins_the_preset_s_rows_unchanged() -> None:
    base = load_config("tiny").table.rows
    cfg = load_config("tiny", overrides=rows_setting("tiny", [], oracle=True))
    assert cfg.table.rows == [*base, ORACLE]
    assert cfg.for_row(ORACLE).mine.strategy == "saha_oracle"
    assert rows_setting("tiny", [], oracle=False) == []


def _mine(root: Path, fp: str, strategy: str, created: float, rates: dict[str, float]) -> None:
    folder = root / "artifacts" / "mine" / fp
    folder.mkdir(parents=True)
    manifest = {"output": {"strategy": strategy}, "created": created}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    diag = {name: {"planted_fn_rate": r} for name, r in rates.items()}
    (folder / "diagnostics.json").write_text(json.dumps(diag))


def test_fn_rates_come_from_each_strategy_s_newest_mine_output(tmp_path: Path) -> None:
    compared = {"saha": 0.2, "topk": 0.3, "in_batch": 0.04}
    _mine(tmp_path, "old", "saha", 1.0, {"saha": 0.9, "topk": 0.9, "in_batch": 0.9})
    _mine(tmp_path, "new", "saha", 2.0, compared)
    _mine(tmp_path, "rand", "in_batch", 3.0, {"in_batch": 0.05, "saha": 0.2, "topk": 0.3})
    _mine(tmp_path, "oracle", "saha_oracle", 4.0, {"saha_oracle": 0.0})
    assert fn_rates(tmp_path) == {"saha": 0.2, "topk": 0.3, "in_batch": 0.05, "saha_oracle": 0.0}


def test_compositional_means_of_a_table_row_nan_where_the_benchmark_is_absent() -> None:
    row = {
        "compositional": {
            "sugarcrepe": {"mean": {"itt": 0.7, "itt_strict": 0.6}},
            "sugarcrepe_pp": {"mean": {"itt": 0.4, "tot": 0.2}},
        }
    }
    assert compositional_means(row) == {"SC": 0.7, "SC++itt": 0.4, "SC++tot": 0.2}
    only = compositional_means({"compositional": {"sugarcrepe": {"mean": {"itt": 0.5}}}})
    assert only["SC"] == 0.5 and np.isnan(only["SC++itt"]) and np.isnan(only["SC++tot"])
    assert all(np.isnan(v) for v in compositional_means({}).values())


@pytest.mark.parametrize(
    ("diff", "verdict"),
    [
        ([0.1, 0.2, 0.05], "holds on every seed"),
        ([0.1, -0.02, 0.05], "holds on average only"),
        ([-0.1, 0.02, 0.05], "does not hold"),
    ],
)
def test_the_verdict_on_an_ordering(diff: list[float], verdict: str) -> None:
    got, line = ordering(np.array(diff))
    assert got == verdict and line.startswith(verdict)
    assert f"{sum(d > 0 for d in diff)}/3 seeds" in line
