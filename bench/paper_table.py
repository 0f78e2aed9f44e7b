"""The paper's comparison table in miniature, over several seeds (not in CI: ~12 min a seed).

Runs the whole tiny pipeline once per seed (world, generator, mining and fine-tuning seeds all
set to it; one workdir per seed, kept, so a rerun only recomputes what changed), reads each
run's `table.json`, and prints mean +- standard error per row and column next to chance and
the category-only ceiling (an embedding that knows the main category and nothing else:
classification 1.0; retrieval and grounding 1/(1 + same-category negatives); VQA has no such
ceiling). Then it states which orderings of docs/method.md hold on every seed, on average, or not:

- hierarchical > plain, zero-shot;
- SaHa > in-batch, both fine-tuned with the hierarchical template;
- the hierarchical template lifts the in-batch fine-tune (inbatch-hierarchical > inbatch-plain).

    .venv/bin/python bench/paper_table.py [--seeds 0,1,2] [--workdir bench/.paper_table]
        [--set section.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from embedder.report import COLUMNS, SHORT

ROOT = Path(__file__).resolve().parent.parent
ORDERINGS = [
    ("hierarchical > plain (zero-shot)", "zeroshot-hierarchical", "zeroshot-plain"),
    ("SaHa > in-batch (fine-tuned, hierarchical)", "saha-hierarchical", "inbatch-hierarchical"),
    ("hierarchical lifts in-batch fine-tune", "inbatch-hierarchical", "inbatch-plain"),
    ("fine-tuning lifts hierarchical (SaHa)", "saha-hierarchical", "zeroshot-hierarchical"),
]


def run_seed(seed: int, workdir: Path, extra: list[str]) -> dict:
    sets = [f"{k}.seed={seed}" for k in ("world", "pretrain", "mine", "finetune")] + extra
    cmd = [str(Path(sys.executable).parent / "gen2embed"), "run", "--workdir", str(workdir)]
    for s in sets:
        cmd += ["--set", s]
    log = workdir.parent / f"seed{seed}.log"
    workdir.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    reports = sorted((workdir / "reports").iterdir(), key=lambda p: p.stat().st_mtime)
    return json.loads((reports[-1] / "table.json").read_text())


def ceiling(same_category_negatives: int) -> dict[str, float | None]:
    share = 1 / (1 + same_category_negatives)
    return {"classification": 1.0, "vqa": None, "retrieval": share, "grounding": share}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workdir", default=str(ROOT / "bench" / ".paper_table"))
    parser.add_argument("--set", dest="extra", action="append", default=[])
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    tables = {}
    for seed in seeds:
        print(f"seed {seed}: running the tiny pipeline ...", flush=True)
        tables[seed] = run_seed(seed, Path(args.workdir) / f"seed{seed}", args.extra)
    rows = list(tables[seeds[0]]["rows"])
    chance = {c: np.mean([t["chance"].get(c, np.nan) for t in tables.values()]) for c in COLUMNS}
    from embedder.config import load_config

    negatives = load_config("tiny", overrides=args.extra).world.same_category_negatives
    ceil = ceiling(negatives)
    width = max(len(r) for r in rows) + 2
    print(f"\nStrict P@1, mean +- SE over seeds {seeds} (tiny preset, {os.cpu_count()} CPUs)")
    print(f"{'row':{width}s}" + "".join(f"{SHORT[c]:>15s}" for c in COLUMNS))
    print(f"{'(chance)':{width}s}" + "".join(f"{chance[c]:15.3f}" for c in COLUMNS))
    print(
        f"{'(category only)':{width}s}"
        + "".join(f"{ceil[c]:15.3f}" if ceil.get(c) is not None else f"{'-':>15s}" for c in COLUMNS)
    )
    values: dict[str, dict[str, np.ndarray]] = {}
    for row in rows:
        values[row] = {
            c: np.array([t["rows"][row]["aggregate"][c] for t in tables.values()]) for c in COLUMNS
        }
        cells = []
        for c in COLUMNS:
            v = values[row][c]
            se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0
            cells.append(f"{v.mean():8.3f} +-{se:.3f}")
        print(f"{row:{width}s}" + "".join(f"{x:>15s}" for x in cells))
    print("\nOrderings of docs/method.md (overall P@1, MMEB argmax; per seed, then the mean):")
    for label, better, worse in ORDERINGS:
        if better not in values or worse not in values:
            continue
        diff = values[better]["overall"] - values[worse]["overall"]
        held = int((diff > 0).sum())
        verdict = (
            "holds on every seed"
            if held == len(diff)
            else "holds on average only"
            if diff.mean() > 0
            else "does not hold"
        )
        per_seed = ", ".join(f"{d:+.3f}" for d in diff)
        print(
            f"  {label}: {verdict} ({held}/{len(diff)} seeds; {per_seed}; mean {diff.mean():+.3f})"
        )


if __name__ == "__main__":
    main()
