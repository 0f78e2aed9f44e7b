"""The paper's comparison table in miniature, over several seeds (not in CI: ~15 min a seed).

Runs the whole tiny pipeline once per seed (world, generator, mining and fine-tuning seeds all
set to it; one workdir per seed, kept, so a rerun only recomputes what changed) with one row
more than the demo's: `saha-oracle`, SaHa's clusters without the planted false negatives
(mine.strategy=saha_oracle: the bound a perfect false-negative filter would reach). It reads
each run's `table.json` and the mining diagnostics, and prints:

- P@1 (MMEB argmax) mean +- standard error per row and column, with chance and the
  category-only ceiling (an embedding that knows the main category and nothing else, its
  ties among same-category candidates broken at random: classification 1.0; retrieval and
  grounding 1/(1 + same-category negatives); VQA has none. MMEB's argmax would credit every
  exact tie to the correct candidate, listed first: a perfectly collapsed category embedding
  would score 1.0, which the strict column and the tie rate of the demo table expose);
- per row, overall P@1, P@1 among same-category candidates (samecat: what hard negatives
  should teach), category-level accuracy (cat: what random negatives teach) and pairs per
  fine-tuning step (equal for every fine-tuned row since batches are a pair budget);
- the planted false-negative rate (share of planted pairs that became negatives of each
  other) of SaHa, top-k, top-k with margin, random clusters and the oracle (zero by
  construction within clusters; planted pairs in two clusters of one step still meet in
  the global batch, and the removed pairs train nowhere, so the oracle row bounds a perfect
  in-cluster filter, not a perfect loss);
- which orderings of docs/method.md hold on every seed, on average, or not;
- per row, the compositional columns of the world's SugarCrepe / SugarCrepe++ set (SC,
  SC++itt, SC++tot: docs/method.md section 8) with chance, and whether SaHa beats in-batch
  and hierarchical beats plain on SugarCrepe.

Each workdir holds one configuration: the newest report and mine outputs are read.

    .venv/bin/python bench/paper_table.py [--seeds 0,1,2] [--workdir bench/.paper_table]
        [--preset tiny] [--no-oracle] [--json bench/.paper_table/summary.json]
        [--set section.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from embedder.compositional import CHANCE
from embedder.config import TableRow, load_config
from embedder.report import COLUMNS, COMPOSITIONAL_COLUMNS, SHORT

ROOT = Path(__file__).resolve().parent.parent
ORACLE = TableRow(name="saha-oracle", template="hierarchical", negatives="saha_oracle")
ORDERINGS = [
    ("hierarchical > plain (zero-shot)", "zeroshot-hierarchical", "zeroshot-plain"),
    ("hierarchical lifts in-batch fine-tune", "inbatch-hierarchical", "inbatch-plain"),
    ("SaHa > in-batch (fine-tuned, hierarchical)", "saha-hierarchical", "inbatch-hierarchical"),
    ("fine-tuning lifts hierarchical (SaHa)", "saha-hierarchical", "zeroshot-hierarchical"),
    ("a perfect FN filter lifts SaHa (oracle bound)", "saha-oracle", "saha-hierarchical"),
]
FN_STRATEGIES = ("saha", "topk", "topk_margin", "in_batch", "saha_oracle")
# The orderings asked of SugarCrepe's image-to-text accuracy (the SC column).
COMPOSITIONAL_ORDERINGS = [
    ("hierarchical > plain (zero-shot, SugarCrepe)", "zeroshot-hierarchical", "zeroshot-plain"),
    ("SaHa > in-batch (SugarCrepe)", "saha-hierarchical", "inbatch-hierarchical"),
]


def compositional_means(row: dict[str, Any]) -> dict[str, float]:
    """The SC, SC++itt and SC++tot means of one table.json row (NaN for a benchmark the
    row's eval set lacks)."""
    found = row.get("compositional", {})
    return {
        header: found[bench]["mean"][score] if bench in found else float("nan")
        for header, bench, score in COMPOSITIONAL_COLUMNS
    }


def ordering(diff: np.ndarray) -> tuple[str, str]:
    """The verdict on per-seed differences (better - worse) and its line: held on every
    seed, on average only, or not; the seeds it held on, each difference, mean +- SE."""
    held = int((diff > 0).sum())
    verdict = (
        "holds on every seed"
        if held == len(diff)
        else "holds on average only"
        if diff.mean() > 0
        else "does not hold"
    )
    per_seed = ", ".join(f"{d:+.3f}" for d in diff)
    se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else 0.0
    return verdict, (
        f"{verdict} ({held}/{len(diff)} seeds; {per_seed}; mean {diff.mean():+.3f} +- {se:.3f})"
    )


def rows_setting(preset: str, extra: list[str], oracle: bool) -> list[str]:
    """The --set that adds the oracle row to the preset's (or the given) table rows."""
    if not oracle:
        return []
    rows = load_config(preset, overrides=extra).table.rows
    dumped = [r.model_dump(exclude_none=True) for r in [*rows, ORACLE]]
    return ["table.rows=" + yaml.safe_dump(dumped, default_flow_style=True, width=10**6).strip()]


def run_seed(seed: int, workdir: Path, preset: str, extra: list[str]) -> None:
    sets = [f"{k}.seed={seed}" for k in ("world", "pretrain", "mine", "finetune")] + extra
    cmd = [sys.executable, "-m", "flows.cli", "run", "--preset", preset]
    cmd += ["--workdir", str(workdir)]
    for s in sets:
        cmd += ["--set", s]
    log = workdir.parent / f"seed{seed}.log"
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)


def newest_table(workdir: Path) -> dict[str, Any]:
    reports = sorted((workdir / "reports").iterdir(), key=lambda p: p.stat().st_mtime)
    return json.loads((reports[-1] / "table.json").read_text())


def fn_rates(workdir: Path) -> dict[str, float | None]:
    """Planted false-negative rate per strategy, from the newest mine outputs of the run
    (SaHa's diagnostics hold every compared strategy; the oracle's its own)."""
    newest: dict[str, tuple[float, Path]] = {}
    for manifest in (workdir / "artifacts" / "mine").glob("*/manifest.json"):
        m = json.loads(manifest.read_text())
        strategy = m["output"]["strategy"]
        if m["created"] > newest.get(strategy, (-1.0, manifest))[0]:
            newest[strategy] = (m["created"], manifest.parent)
    diagnostics = {
        strategy: json.loads((folder / "diagnostics.json").read_text())
        for strategy, (_, folder) in sorted(newest.items(), key=lambda kv: kv[1][0])
    }
    rates: dict[str, float | None] = {}
    for diag in diagnostics.values():  # oldest first: a newer output's figure wins
        rates.update({name: d["planted_fn_rate"] for name, d in diag.items()})
    for strategy, diag in diagnostics.items():  # a strategy's own output wins over all
        rates[strategy] = diag[strategy]["planted_fn_rate"]
    return rates


def ceiling(same_category_negatives: int) -> dict[str, float | None]:
    share = 1 / (1 + same_category_negatives)
    return {"classification": 1.0, "vqa": None, "retrieval": share, "grounding": share}


def mean_se(values: np.ndarray) -> str:
    se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0
    return f"{values.mean():.3f}+-{se:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--workdir", default=str(ROOT / "bench" / ".paper_table"))
    parser.add_argument("--no-oracle", action="store_true", help="leave out the oracle row")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--set", dest="extra", action="append", default=[])
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = [*args.extra, *rows_setting(args.preset, args.extra, not args.no_oracle)]
    tables, rates = {}, {}
    for seed in seeds:
        workdir = Path(args.workdir) / f"seed{seed}"
        print(f"seed {seed}: running the {args.preset} pipeline ...", flush=True)
        run_seed(seed, workdir, args.preset, extra)
        tables[seed], rates[seed] = newest_table(workdir), fn_rates(workdir)
    rows = list(tables[seeds[0]]["rows"])
    chance = {c: np.mean([t["chance"].get(c, np.nan) for t in tables.values()]) for c in COLUMNS}
    negatives = load_config(args.preset, overrides=args.extra).world.same_category_negatives
    ceil = ceiling(negatives)
    width = max(len(r) for r in rows) + 2
    out: dict[str, Any] = {"seeds": seeds, "rows": {}, "fn_rates": {}, "orderings": {}}
    print(
        f"\nP@1 (MMEB argmax), mean +- SE over seeds {seeds} ({args.preset} preset, "
        f"{os.cpu_count()} CPUs)"
    )
    print(f"{'row':{width}s}" + "".join(f"{SHORT[c]:>14s}" for c in COLUMNS))
    print(f"{'(chance)':{width}s}" + "".join(f"{chance[c]:14.3f}" for c in COLUMNS))
    print(
        f"{'(category, ties random)':{width}s}"
        + "".join(f"{ceil[c]:14.3f}" if ceil.get(c) is not None else f"{'-':>14s}" for c in COLUMNS)
    )
    values: dict[str, dict[str, np.ndarray]] = {}
    for row in rows:
        got = [t["rows"][row] for t in tables.values()]
        values[row] = {c: np.array([g["aggregate"][c] for g in got]) for c in COLUMNS}
        for key, name in (("aggregate_same_category", "samecat"), ("aggregate_category", "cat")):
            values[row][name] = np.array([g[key].get("overall", np.nan) for g in got])
        values[row]["pairs"] = np.array([g["pairs_per_step"] or np.nan for g in got])
        print(f"{row:{width}s}" + "".join(f"{mean_se(values[row][c]):>14s}" for c in COLUMNS))
        out["rows"][row] = {k: v.tolist() for k, v in values[row].items()}
    cat_chance = {
        name: np.mean(
            [
                t.get("chance_categories", {}).get(name, {}).get("overall", np.nan)
                for t in tables.values()
            ]
        )
        for name in ("samecat", "cat")
    }
    print(
        "\nWhat the negatives teach (overall, mean +- SE): samecat = P@1 among the correct "
        "candidate's same-category candidates, cat = category-level accuracy"
    )
    print(f"{'row':{width}s}{'P@1':>14s}{'samecat':>14s}{'cat':>14s}{'pairs/step':>14s}")
    print(
        f"{'(chance)':{width}s}{chance['overall']:14.3f}{cat_chance['samecat']:14.3f}"
        f"{cat_chance['cat']:14.3f}{'-':>14s}"
    )
    for row in rows:
        v = values[row]
        pairs = "-" if np.isnan(v["pairs"]).all() else f"{np.nanmean(v['pairs']):.1f}"
        print(
            f"{row:{width}s}{mean_se(v['overall']):>14s}{mean_se(v['samecat']):>14s}"
            f"{mean_se(v['cat']):>14s}{pairs:>14s}"
        )
    print("\nPlanted false-negative rate (share of planted pairs put in one cluster), per seed:")
    for name in FN_STRATEGIES:
        per_seed = [rates[s].get(name) for s in seeds]
        if all(r is None for r in per_seed):
            continue
        out["fn_rates"][name] = per_seed
        cells = ", ".join("-" if r is None else f"{r:.3f}" for r in per_seed)
        print(f"  {name:12s} {cells}")
    print("\nOrderings of docs/method.md (overall P@1, MMEB argmax; per seed, then the mean):")
    for label, better, worse in ORDERINGS:
        if better not in values or worse not in values:
            continue
        diff = values[better]["overall"] - values[worse]["overall"]
        verdict, line = ordering(diff)
        print(f"  {label}: {line}")
        out["orderings"][label] = {"verdict": verdict, "per_seed": diff.tolist()}
    comp = {row: [compositional_means(t["rows"][row]) for t in tables.values()] for row in rows}
    headers = [h for h, _, _ in COMPOSITIONAL_COLUMNS]
    if any(not np.isnan(c[h]) for per_seed in comp.values() for c in per_seed for h in headers):
        print("\nCompositional (the world's SugarCrepe / SugarCrepe++ set; mean +- SE):")
        print(f"{'row':{width}s}" + "".join(f"{h:>14s}" for h in headers))
        chances = {h: CHANCE[b][s] for h, b, s in COMPOSITIONAL_COLUMNS}
        print(f"{'(chance)':{width}s}" + "".join(f"{chances[h]:14.3f}" for h in headers))
        for row in rows:
            for h in headers:
                values[row][h] = np.array([c[h] for c in comp[row]])
            print(f"{row:{width}s}" + "".join(f"{mean_se(values[row][h]):>14s}" for h in headers))
            out["rows"][row].update({h: values[row][h].tolist() for h in headers})
        for label, better, worse in COMPOSITIONAL_ORDERINGS:
            if better in values and worse in values and "SC" in values[better]:
                verdict, line = ordering(values[better]["SC"] - values[worse]["SC"])
                print(f"  {label}: {line}")
                out["orderings"][label] = {
                    "verdict": verdict,
                    "per_seed": (values[better]["SC"] - values[worse]["SC"]).tolist(),
                }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
