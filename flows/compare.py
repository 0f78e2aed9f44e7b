"""`gen2embed compare RUN...`: pipeline runs side by side, from MLflow.

A run is named by its MLflow run id (or a unique prefix of one) or by its name (`tiny`,
`tiny [saha-hierarchical]`: the latest run of that name). Rows: every headline metric the
runs carry (`<table row>/p1.*`, planted false-negative rate), then the settings that differ,
then the code each ran, then the model version each row registered and which version holds
the registered model's `champion` alias now (tasks.registry). The MLflow UI's compare view
shows the same (select the runs, then "Compare").
"""

from __future__ import annotations

from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from embedder.errors import UserError
from tasks.registry import CHAMPION, REASON_TAG
from tasks.tracking import PARENT_TAG, Tracker

REGISTERED = "gen2embed.registered."  # + row: "NAME/VERSION" (tasks.pipeline_run)
NOT_REGISTERED = "not registered"  # its value when registration failed (the reason follows)


class CompareError(UserError, ValueError):
    pass


def find_runs(tracker: Tracker, refs: list[str]) -> list[Run]:
    """The pipeline (parent) runs that `refs` name, in the order given."""
    parents = [
        r
        for r in tracker.client.search_runs(
            [tracker.experiment_id], order_by=["attributes.start_time DESC"], max_results=5000
        )
        if PARENT_TAG not in r.data.tags
    ]
    found = []
    for ref in refs:
        by_id = [r for r in parents if r.info.run_id.startswith(ref)]
        by_name = [r for r in parents if r.info.run_name == ref]
        if len(by_id) == 1:
            found.append(by_id[0])
        elif by_name:
            found.append(by_name[0])  # the latest of that name
        elif len(by_id) > 1:
            raise CompareError(f"run id prefix {ref!r} matches {len(by_id)} runs; give more")
        else:
            names = sorted({r.info.run_name for r in parents})[:12]
            raise CompareError(
                f"no pipeline run named or with id {ref!r}; names: {', '.join(names) or 'none'}"
            )
    return found


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    text = str(value)
    return text if len(text) <= 24 else text[:21] + "..."


def champions(tracker: Tracker, runs: list[Run]) -> dict[str, tuple[str, str]]:
    """Registered model name -> (the version holding `champion` now, why it took it), for
    every model the runs registered a version of; ("-", "no champion") when none holds it."""
    names = {
        tag.split("/")[0]
        for r in runs
        for key, tag in r.data.tags.items()
        if key.startswith(REGISTERED) and not tag.startswith(NOT_REGISTERED)
    }
    out = {}
    for name in sorted(names):
        try:
            holder = tracker.client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException:
            out[name] = ("-", "no champion")
            continue
        out[name] = (str(holder.version), holder.tags.get(REASON_TAG, ""))
    return out


def compare_table(runs: list[Run], champion: dict[str, tuple[str, str]] | None = None) -> str:
    """The runs side by side (rows described in the module docstring); `champion` from
    `champions` marks the versions holding the alias and is listed below the table."""
    headers = [f"{r.info.run_name} ({r.info.run_id[:8]})" for r in runs]
    metrics = sorted({k for r in runs for k in r.data.metrics})
    headline = [k for k in metrics if "/" in k]
    rest = [k for k in metrics if "/" not in k]
    params = sorted({k for r in runs for k in r.data.params})
    differing = [k for k in params if len({r.data.params.get(k) for r in runs}) > 1]
    lines: list[tuple[str, list[str]]] = []
    lines += [(k, [_cell(r.data.metrics.get(k)) for r in runs]) for k in headline + rest]
    if differing:
        lines.append(("", []))
        lines += [(k, [_cell(r.data.params.get(k)) for r in runs]) for k in differing]
    lines.append(("", []))
    lines.append(
        ("git commit", [r.data.tags.get("mlflow.source.git.commit", "-")[:10] for r in runs])
    )
    lines.append(("status", [r.info.status for r in runs]))
    champion = champion or {}
    rows = sorted(
        {k[len(REGISTERED) :] for r in runs for k in r.data.tags if k.startswith(REGISTERED)}
    )
    if rows:
        lines.append(("", []))

    def registered(run: Run, row: str) -> str:
        tag = run.data.tags.get(REGISTERED + row)
        if not tag or tag.startswith(NOT_REGISTERED):
            return "-"
        name, _, version = tag.rpartition("/")
        held = champion.get(name, ("", ""))[0] == version
        return f"v{version} champion" if held else f"v{version}"

    lines += [(f"registered {row}", [registered(r, row) for r in runs]) for row in rows]
    key_width = max([len(k) for k, _ in lines] + [6])
    widths = [max(len(h), *(len(c[i]) for _, c in lines if c)) for i, h in enumerate(headers)]

    def line(key: str, cells: list[str]) -> str:
        padded = (f"{c:>{w}s}" for c, w in zip(cells, widths, strict=True))
        return f"{key:{key_width}s}  " + "  ".join(padded)

    out = [line("", headers)]
    out += [line(key, cells) if cells else "" for key, cells in lines]
    if not differing:
        out.append("(all settings equal)")
    for name, (version, reason) in champion.items():
        out.append(
            f"champion of {name}: version {version} ({reason}); load models:/{name}@{CHAMPION}"
        )
    return "\n".join(out)
