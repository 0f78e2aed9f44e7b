"""bench/paper_table.py's own logic (the runs themselves are not in CI: ~15 min a seed)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.paper_table import ORACLE, fn_rates, rows_setting
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
