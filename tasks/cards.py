"""What the Prefect UI shows of a run: artifacts ("cards") on task and flow runs.

Every card has a key and a description naming its stage and row (`artifact_key`): a stage's
summary and the link to its MLflow run, a progress card for long loops, and, for the run,
the comparison table (pictures inlined: the UI resolves no relative path) and the scores.
Cards are made only inside a Prefect flow run; elsewhere (the torchrun job) they are skipped.
"""

from __future__ import annotations

import base64
import logging
import mimetypes
import re
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.runtime import flow_run

from embedder.artifacts import Manifest
from embedder.report import CATEGORY_COLUMNS, COLUMNS, COMPOSITIONAL_COLUMNS, SHORT
from tasks.tracking import Tracker

log = logging.getLogger("gen2embed.stage")


def artifact_key(label: str, kind: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for `kind` of the stage
    `label`: `finetune[saha-hierarchical]`, `mlflow` -> `finetune-saha-hierarchical-mlflow`."""
    return re.sub(r"[^a-z0-9]+", "-", f"{label}-{kind}".lower()).strip("-")


class ProgressArtifact:
    """A stage's long loops as a Prefect progress artifact (the task run's Artifacts tab):
    percent done, rate and ETA; the bar's values (training loss, lr) go to the stage's MLflow
    run as they come, so a long fine-tune can be watched. Best effort: a failed update never
    fails the stage. An observer (embedder.progress.listening): it changes no result."""

    def __init__(self, stage: str, tracker: Tracker, run_id: str) -> None:
        """`stage`: the stage's label (`evaluate[saha-hierarchical]`), which names the card."""
        self.stage, self.tracker, self.run_id = stage, tracker, run_id
        self.logged_step = -1  # each step's values reach MLflow once
        self.artifact_id: UUID | None = None
        self.failed: set[str] = set()

    def __call__(self, percent: float, line: str, step: int, values: dict[str, float]) -> None:
        # The bar tells on a timer and again when it closes: both can fall on the last step.
        if values and step > self.logged_step and "mlflow" not in self.failed:
            self.logged_step = step
            try:
                self.tracker.log_metrics(self.run_id, values, step=step)
            except Exception as exc:
                self.failed.add("mlflow")
                log.warning("%s: live metrics not logged (%s)", self.stage, exc)
        if "prefect" in self.failed or not flow_run.get_id():
            return
        # The engine names its loop ("embed: 1,200/4,000 items, ..."); the card names the
        # stage, so an evaluation's embedding reads as the evaluation's.
        _, _, how_far = line.partition(": ")
        description = f"{self.stage}: {how_far or line}"
        try:
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(
                    percent, key=artifact_key(self.stage, "progress"), description=description
                )
            else:
                update_progress_artifact(self.artifact_id, percent, description=description)
        except Exception as exc:
            self.failed.add("prefect")
            log.warning("%s: progress not shown in Prefect (%s)", self.stage, exc)


def summary_markdown(
    manifest: Manifest, path: Path, *, cached: bool, run_url: str | None, label: str = ""
) -> str:
    """A stage's summary card: fingerprint, folder, code version, its MLflow run, row
    counts and metrics of its manifest."""
    lines = [
        f"# Stage `{label or manifest.stage}` {'(cached)' if cached else ''}",
        "",
        f"- fingerprint: `{manifest.fingerprint}`",
        f"- folder: `{path}`",
        f"- code version: `{manifest.code_version}`",
    ]
    if run_url:
        lines.append(f"- MLflow run: [{run_url}]({run_url})")
    if manifest.rows:
        lines += ["", "| table | rows |", "|---|---:|"]
        lines += [f"| {k} | {v:,} |" for k, v in manifest.rows.items()]
    if manifest.metrics:
        lines += ["", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:,.4g} |" for k, v in manifest.metrics.items()]
    return "\n".join(lines)


def stage_cards(
    manifest: Manifest, path: Path, run_url: str | None, label: str, *, cached: bool
) -> None:
    """The stage's summary card and the link to its MLflow run, each keyed and described by
    the stage's label (`finetune[saha-hierarchical]`); nothing outside a flow run."""
    if not flow_run.get_id():
        return
    how = "reused from the cache" if cached else "computed"
    create_markdown_artifact(
        markdown=summary_markdown(manifest, path, cached=cached, run_url=run_url, label=label),
        key=artifact_key(label, "summary"),
        description=f"Stage {label}: {how}, fingerprint {manifest.fingerprint}",
    )
    if run_url:
        create_link_artifact(
            link=run_url,
            link_text=f"MLflow run of {label}",
            key=artifact_key(label, "mlflow"),
            description=f"Stage {label}: its MLflow run (metrics, params, files)",
        )


def pipeline_run_card(url: str, name: str) -> None:
    """The flow run's link to its MLflow pipeline run."""
    create_link_artifact(
        link=url,
        link_text=f"MLflow run {name}",
        key="mlflow-run",
        description="The pipeline's MLflow run: the table, metrics per row, each "
        "stage's run nested under it",
    )


def embed_pictures(markdown: str, folder: Path) -> str:
    """`markdown` with each picture it links by a relative path (`![loss](loss.png)`) inlined
    as a data URI: the Prefect UI resolves no relative path, and renders `data:image/` in
    markdown artifacts (both its UIs). A picture not in `folder` is left as it is."""

    def inline(match: re.Match[str]) -> str:
        alt, target = match.group(1), match.group(2)
        path = folder / target
        if "://" in target or not path.is_file():
            return match.group(0)
        kind = mimetypes.guess_type(path.name)[0] or "image/png"
        data = base64.b64encode(path.read_bytes()).decode()
        return f"![{alt}](data:{kind};base64,{data})"

    return re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", inline, markdown)


def score_rows(table: dict[str, Any]) -> list[dict[str, Any]]:
    """The `scores` artifact's rows from report table.json: the row's name, then the table's
    columns in its order (embedder.report.COLUMNS), strict P@1 and the tie rate overall, P@1
    among same-category candidates and the category-level accuracy overall (None without
    candidate categories), with a compositional table its means (SC, SC++itt, SC++tot), each
    rounded to the table's 3 decimals, and pairs per fine-tuning step (None for a row that
    fine-tuned nothing)."""
    out = []
    for name, row in table["rows"].items():
        cells: dict[str, Any] = {"row": name}
        for column in COLUMNS:
            if column in row["aggregate"]:
                cells[SHORT[column]] = round(row["aggregate"][column], 3)
        cells["strict"] = round(row["aggregate_strict"]["overall"], 3)
        cells["ties"] = round(row["aggregate_tie_rate"]["overall"], 3)
        for header, key, _ in CATEGORY_COLUMNS:
            value = row.get(key, {}).get("overall")
            cells[header] = None if value is None else round(value, 3)
        found = row.get("compositional", {})
        for header, bench, score in COMPOSITIONAL_COLUMNS:
            if bench in found:
                cells[header] = round(found[bench]["mean"][score], 3)
        pairs = row.get("pairs_per_step")
        cells["pairs"] = None if pairs is None else round(pairs, 1)
        out.append(cells)
    return out


def report_cards(markdown: str, table: dict[str, Any]) -> None:
    """The run's comparison table (markdown with pictures inlined) and its scores table."""
    create_markdown_artifact(
        markdown=markdown,
        key="table",
        description="The comparison table: P@1 per row (MMEB's convention), per subset, "
        "bar charts and loss curves",
    )
    create_table_artifact(
        table=score_rows(table),
        key="scores",
        description="P@1 per table row as MMEB scores it (argmax; a tie with the correct "
        "candidate counts), columns as in the table; strict P@1 and the tie rate beside. "
        "MLflow: ROW/p1.* and ROW/p1_strict.* on the pipeline run",
    )
