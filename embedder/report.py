"""The comparison table of a run: one row per table row of the config (the paper's ablation
by default), columns the meta-tasks, IND, OOD and overall of P@1 as MMEB's reference toolkit
computes it (the headline, comparable with published tables), then strict P@1 and the tie rate
overall; chance beside it. The conventions (embedder.evaluate, docs/method.md section 5) are
written under the table, so the printed table says what each column is.

Writes `report.md` (the table, then per-subset scores in an appendix), `table.json` (the same
numbers for scripts), one bar chart per meta-task and the fine-tuned rows' loss curves, and
returns the table as text lines for the terminal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedder import compositional
from embedder.artifacts import json_text
from embedder.config import TableRow
from embedder.evaluate import AGGREGATES, TIE_EPS
from embedder.outputs import Adapter, EvalReport

COLUMNS = AGGREGATES  # the means evaluate reports, in table order
SHORT = {
    "classification": "Cls",
    "vqa": "VQA",
    "retrieval": "Ret",
    "grounding": "Grd",
    "ind": "IND",
    "ood": "OOD",
    "overall": "overall",
}
# Beside the headline columns: (header, report key of the means, which mean).
BESIDE = (("strict", "aggregate_strict", "overall"), ("ties", "aggregate_tie_rate", "overall"))
# What negatives teach, where the eval set has candidate categories (the miniature world):
# (header, report key of the means, the score's key in chance_categories).
CATEGORY_COLUMNS = (
    ("samecat", "aggregate_same_category", "p1_same_category"),
    ("cat", "aggregate_category", "category_accuracy"),
)
# SugarCrepe / SugarCrepe++ (embedder.compositional), where the eval set has them:
# (header, benchmark, score), each the mean over the benchmark's categories.
COMPOSITIONAL_COLUMNS = (
    ("SC", compositional.SUGARCREPE, "itt"),
    ("SC++itt", compositional.SUGARCREPE_PP, "itt"),
    ("SC++tot", compositional.SUGARCREPE_PP, "tot"),
)
COMPOSITIONAL_LEGEND = (
    "SC: SugarCrepe image-to-text accuracy, SC++itt / SC++tot: SugarCrepe++ image-to-text "
    "and text-only accuracies; means over their categories, ties counted as correct as MMEB "
    "counts them (strict views in report.md and table.json)."
)
LEGEND = [
    "{columns}: P@1 (MMEB argmax) as the reference toolkit computes it, mean over subsets:",
    "  numpy argmax over cosine scores, first maximum wins (a tie with the correct candidate "
    "counts as correct).",
    f"strict: P@1 overall with a tie within {TIE_EPS:g} of the correct score as a miss.",
    f"ties: tie rate overall, share of queries whose best score another candidate reaches "
    f"within {TIE_EPS:g}.",
    "samecat: P@1 (argmax) overall among the correct candidate's same-category candidates "
    "only (what hard negatives teach); cat: share of queries whose top candidate is of the "
    "correct category (what random negatives teach); both gen2embed's, over the subsets with "
    "candidate categories, '-' without them.",
    "pairs: pairs per fine-tuning step (the global batch), mean over steps.",
]


@dataclass(frozen=True)
class RowResult:
    """One table row's results: the row as configured, its evaluate stage output (whose
    report.json the table reads) and the adapter it fine-tuned (None for a zero-shot row or
    a released adapter, which the row itself names)."""

    row: TableRow
    evaluation: EvalReport
    adapter: Adapter | None


def _tuned(result: RowResult) -> str:
    """The table's `fine-tuned` cell: no, our adapter (by fingerprint), or the released
    adapter the row names (evaluated as it is)."""
    if result.adapter is not None:
        return "adapter " + result.adapter.fingerprint[:10]
    if result.row.adapter is not None:
        revision = f"@{result.row.adapter_revision}" if result.row.adapter_revision else ""
        return f"released: {result.row.adapter}{revision}"
    return "no"


def _chance(report: dict[str, Any], per_subset: dict[str, float] | None = None) -> dict[str, float]:
    """Expected P@1 of a random embedding (1 / candidates, either convention: random vectors
    do not tie), averaged like the scores; or, with `per_subset`, those chance values
    averaged the same way."""
    outside = set(report["aggregate"].get("outside_mmeb", []))
    groups: dict[str, list[float]] = {}
    for subset, value in (report["chance"] if per_subset is None else per_subset).items():
        if subset in outside:
            continue
        task, dist = report["meta"][subset]
        for name in (task, dist, "overall"):
            groups.setdefault(name, []).append(value)
    return {k: float(np.mean(v)) for k, v in groups.items()}


def _category_chance(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Chance of the samecat and cat columns (by header), averaged like the scores; a
    column is absent when the eval set names no candidate categories for it."""
    by_category = report.get("chance_categories", {})
    return {
        header: _chance(report, by_category[score])
        for header, _, score in CATEGORY_COLUMNS
        if by_category.get(score)
    }


def pairs_per_step(result: RowResult) -> float | None:
    """Mean pairs per fine-tuning step of the row's adapter (its history.json); None for a
    row that fine-tuned nothing or an adapter trained before steps recorded their pairs."""
    if result.adapter is None or not result.adapter.history.is_file():
        return None
    pairs = json.loads(result.adapter.history.read_text()).get("pairs")
    return float(np.mean(pairs)) if pairs else None


def _cell(value: float | None, digits: int = 3) -> str:
    return f"{'-':>9s}" if value is None else f"{value:9.{digits}f}"


def compositional_columns(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The compositional columns a report has scores for (COMPOSITIONAL_COLUMNS' entries
    whose benchmark it holds), in table order; [] without a compositional table."""
    found = report.get("compositional", {})
    return [c for c in COMPOSITIONAL_COLUMNS if c[1] in found]


def table_lines(results: list[RowResult], reports: list[dict[str, Any]]) -> list[str]:
    """The table as text: a header, the chance row, one row per result (P@1 means, then
    strict P@1 and the tie rate overall, P@1 among same-category candidates and the
    category-level accuracy overall, and pairs per fine-tuning step), then, after a blank
    line, what each column is and which rows have subsets tied above the warning threshold.
    With a compositional table, its columns (`compositional_columns`) come before pairs.
    A cell with nothing to show (no candidate categories, no fine-tuning) is "-".

    `reports[i]`: the parsed report.json of `results[i]` (same length; all on the same eval
    set, the first one's columns and chance used for all). Scores print with 3 decimals, in
    0..1. Raises IndexError or ValueError for empty lists and KeyError for a report without
    the keys embedder.evaluate writes."""
    columns = [c for c in COLUMNS if c in reports[0]["aggregate"]]
    comp = compositional_columns(reports[0])
    width = max(len(r.row.name) for r in results) + 2
    head = f"{'row':{width}s}" + "".join(f"{SHORT[c]:>9s}" for c in columns)
    extra = [name for name, _, _ in (*BESIDE, *CATEGORY_COLUMNS, *comp)] + ["pairs"]
    lines = [head + "".join(f"{name:>9s}" for name in extra)]
    chance = _chance(reports[0])
    category_chance = _category_chance(reports[0])
    # Random vectors never tie: strict P@1 has P@1's chance, the tie rate 0.
    lines.append(
        f"{'(chance)':{width}s}"
        + "".join(f"{chance.get(c, 0):9.3f}" for c in columns)
        + f"{chance.get('overall', 0):9.3f}{0:9.3f}"
        + "".join(
            _cell(category_chance.get(header, {}).get("overall"))
            for header, _, _ in CATEGORY_COLUMNS
        )
        + "".join(_cell(compositional.CHANCE[bench][score]) for _, bench, score in comp)
        + _cell(None)
    )
    for result, report in zip(results, reports, strict=True):
        cells = "".join(f"{report['aggregate'][c]:9.3f}" for c in columns)
        cells += "".join(f"{report[key][mean]:9.3f}" for _, key, mean in BESIDE)
        cells += "".join(
            _cell(report.get(key, {}).get("overall")) for _, key, _ in CATEGORY_COLUMNS
        )
        found = report.get("compositional", {})
        cells += "".join(
            _cell(found[bench]["mean"][score] if bench in found else None)
            for _, bench, score in comp
        )
        cells += _cell(pairs_per_step(result), 1)
        lines.append(f"{result.row.name:{width}s}{cells}")
    lines += ["", LEGEND[0].format(columns="/".join(SHORT[c] for c in columns)), *LEGEND[1:]]
    if comp:
        lines.append(COMPOSITIONAL_LEGEND)
    for result, report in zip(results, reports, strict=True):
        warn = report["tie_warning"]
        if warn["subsets"]:
            lines.append(
                f"WARNING {result.row.name}: tie rate above {warn['threshold']:g} in "
                f"{', '.join(warn['subsets'])}: its P@1 rests on ties, see strict."
            )
    return lines


def _compositional_appendix(results: list[RowResult], reports: list[dict[str, Any]]) -> list[str]:
    """report.md's compositional section: per benchmark, one line per category, group and
    mean, each cell the score by MMEB's tie convention with the strict view beside."""
    md: list[str] = []
    for bench in compositional.BENCHMARKS:
        if bench not in reports[0].get("compositional", {}):
            continue
        first = reports[0]["compositional"][bench]
        scores = compositional.SCORES[bench]
        md += [
            "",
            f"## Appendix: {compositional.TITLES[bench]}",
            "",
            "Each cell: "
            + ", ".join(f"{s} (strict)" for s in scores)
            + "; chance "
            + ", ".join(f"{s} {first['chance'][s]:.3f}" for s in scores)
            + ".",
            "",
            "| category | rows | " + " | ".join(r.row.name for r in results) + " |",
            "|---|---:|" + "---:|" * len(results),
        ]
        lines = [(c, first["categories"][c]["rows"], "categories") for c in first["categories"]]
        lines += [(g, "", "groups") for g in first["groups"]] + [("mean", "", "mean")]
        for name, rows, part in lines:
            cells = []
            for rep in reports:
                found = rep.get("compositional", {}).get(bench)
                if found is None:
                    cells.append("-")
                    continue
                v = found["mean"] if part == "mean" else found[part][name]
                cells.append(" ".join(f"{v[s]:.3f} ({v[s + '_strict']:.3f})" for s in scores))
            label = f"**{name}**" if part != "categories" else name
            md.append(f"| {label} | {rows} | " + " | ".join(cells) + " |")
    return md


def _bar_charts(results: list[RowResult], reports: list[dict[str, Any]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.row.name for r in results]
    chance = _chance(reports[0])
    written = []
    for column in COLUMNS:
        if column not in reports[0]["aggregate"]:
            continue
        values = [rep["aggregate"][column] for rep in reports]
        strict = [rep["aggregate_strict"][column] for rep in reports]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.bar(range(len(names)), values, color="#4c72b0", label="P@1 (MMEB argmax)")
        ax.scatter(
            range(len(names)), strict, marker="_", s=400, color="#c44e52", label="strict P@1"
        )
        ax.axhline(chance.get(column, 0.0), color="k", ls="--", lw=1, label="chance")
        ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
        ax.set_ylabel(f"P@1, mean over {column} subsets")
        ax.set_ylim(0, 1)
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        name = f"bars-{column}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def _loss_curves(results: list[RowResult], out: Path) -> str | None:
    tuned = [r for r in results if r.adapter is not None and r.adapter.history.is_file()]
    if not tuned:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for r in tuned:
        assert r.adapter is not None
        h = json.loads(r.adapter.history.read_text())
        ax.plot(h["steps"], h["loss"], lw=1, label=r.row.name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("InfoNCE loss (global batch mean)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    return "loss.png"


def write_report(results: list[RowResult], out: Path, title: str) -> list[str]:
    """Write report.md and the plots into `out`; return the table as text lines.

    `out` is created if needed. Files: report.md (`title`, the table of `table_lines`, each
    row's template, negatives and adapter, per-subset scores and the next tokens predicted
    at the final position), table.json (the same numbers, strict JSON), bars-<column>.png
    (one per meta-task and aggregate the reports hold) and loss.png (training loss by step
    of the fine-tuned rows; only when there is one). Every row is read from its evaluate
    output's report.json; raises as `table_lines` for an empty `results`, and OSError for a
    missing report."""
    out.mkdir(parents=True, exist_ok=True)
    reports = [json.loads(r.evaluation.report.read_text()) for r in results]
    lines = table_lines(results, reports)
    md = [
        f"# {title}",
        "",
        "Precision@1 as MMEB's reference toolkit computes it (the headline, comparable with "
        "published tables), strict P@1 and the tie rate beside it; the columns are explained "
        "under the table.",
        "",
    ]
    md += ["```", *lines, "```", ""]
    md += ["| row | template | negatives | fine-tuned |", "|---|---|---|---|"]
    md += [
        f"| {r.row.name} | {r.row.template} | {r.row.negatives} | {_tuned(r)} |" for r in results
    ]
    outside = reports[0]["aggregate"].get("outside_mmeb", [])
    if outside:
        md += ["", f"Subsets outside MMEB, not in the means: {', '.join(outside)}."]
    md += ["", "## Appendix: per subset", ""]
    subsets = sorted(reports[0]["subsets"])
    md += [
        f"Each cell: P@1 (MMEB argmax) (strict P@1, tie rate), Hit@k (strict: ties within "
        f"{TIE_EPS:g} count against the correct candidate).",
        "",
    ]
    md += ["| subset | chance | " + " | ".join(r.row.name for r in results) + " |"]
    md += ["|---|---:|" + "---:|" * len(results)]
    for s in subsets:
        cells = []
        for rep in reports:
            v = rep["subsets"][s]
            hit = next(k for k in v if k.startswith("hit@"))
            beside = f"(strict {v['p1_strict']:.3f}, ties {v['tie_rate']:.3f})"
            cells.append(f"{v['p1']:.3f} {beside}, {hit} {v[hit]:.3f}")
        md.append(f"| {s} | {reports[0]['chance'][s]:.3f} | " + " | ".join(cells) + " |")
    md += _compositional_appendix(results, reports)
    md += ["", "Next token predicted at the final position (share of sampled queries):", ""]
    for r, rep in zip(results, reports, strict=True):
        shares = ", ".join(f"`{tok}` {v:.2f}" for tok, v in rep["next_tokens"].items())
        md.append(f"- {r.row.name}: {shares}")
    charts = _bar_charts(results, reports, out)
    loss = _loss_curves(results, out)
    md += ["", *[f"![{c}]({c})" for c in charts]]
    if loss:
        md.append(f"![loss curves]({loss})")
    (out / "report.md").write_text("\n".join(md) + "\n")
    table = {
        "conventions": reports[0]["conventions"],
        "chance": _chance(reports[0]),
        # Chance of the samecat and cat columns, averaged as they are; {} without categories.
        "chance_categories": _category_chance(reports[0]),
        "rows": {
            r.row.name: {
                "template": r.row.template,
                "negatives": r.row.negatives,
                "adapter": r.row.adapter,
                # `aggregate`, `subsets`: P@1 (MMEB argmax), the headline; the others beside.
                "aggregate": {k: v for k, v in rep["aggregate"].items() if isinstance(v, float)},
                "aggregate_strict": rep["aggregate_strict"],
                "aggregate_tie_rate": rep["aggregate_tie_rate"],
                "aggregate_same_category": rep.get("aggregate_same_category", {}),
                "aggregate_category": rep.get("aggregate_category", {}),
                "pairs_per_step": pairs_per_step(r),
                "subsets": {s: v["p1"] for s, v in rep["subsets"].items()},
                "subsets_strict": {s: v["p1_strict"] for s, v in rep["subsets"].items()},
                "subsets_tie_rate": {s: v["tie_rate"] for s, v in rep["subsets"].items()},
                "tie_warning": rep["tie_warning"]["subsets"],
                # Per benchmark: categories, groups, mean (with strict views) and chance.
                "compositional": rep.get("compositional", {}),
            }
            for r, rep in zip(results, reports, strict=True)
        },
    }
    (out / "table.json").write_text(json_text(table, indent=2))
    return lines
