"""SugarCrepe and SugarCrepe++ in their published layouts, read for ingest.

Layouts (docs/method.md section 8), one JSON file per category in a benchmark's folder:
- SugarCrepe: `<category>.json` for add_att, add_obj, replace_att, replace_obj, replace_rel,
  swap_att, swap_obj; an object mapping an entry id ("0", "1", ...) to
  {"filename", "caption", "negative_caption"};
- SugarCrepe++: `<category>.json` for replace_att, replace_obj, replace_rel, swap_att,
  swap_obj; a list of {"id", "filename", "caption", "caption2", "negative_caption"}.
`filename` is relative to one images root (COCO val2017 for both). An entry is named by its
key (SugarCrepe) or its "id" (SugarCrepe++; else its position) in messages.

Each entry becomes one row of COMPOSITIONAL_SCHEMA through ingest's rules: texts must be
proper, non-empty strings; the image must stay inside the root, exist and decode; a bad
entry is named by file and entry id, and fails the stage or goes to the rejects table
(`ingest.on_bad_rows`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from embedder.compositional import BENCHMARKS, CATEGORIES, TITLES, group_of
from embedder.datasets import sources
from embedder.datasets.catalog import SubsetInfo, normalise
from embedder.datasets.schema import row_id

SPLIT = "json"
# The fields of an entry, per benchmark (caption2: SugarCrepe++'s second caption).
FIELDS: dict[str, tuple[str, ...]] = {
    "sugarcrepe": ("filename", "caption", "negative_caption"),
    "sugarcrepe_pp": ("filename", "caption", "caption2", "negative_caption"),
}
# Columns of a chunk: the benchmark and category of its file, then the entry's fields.
COLUMNS = ("benchmark", "category", "filename", "caption", "caption2", "negative_caption")


def subset_name(benchmark: str, category: str) -> str:
    """The subset a category's rows carry: "SugarCrepe/swap_att", "SugarCrepe++/swap_att"."""
    return f"{TITLES[benchmark]}/{category}"


def discover(folder: Path, benchmark: str) -> tuple[list[sources.SubsetSource], list[str]]:
    """The category files of one benchmark's folder, in CATEGORIES order, and the categories
    that have no file.

    Raises SourceError (a UserError) when `folder` is not a folder or holds none of the
    benchmark's `<category>.json` files, and ValueError for an unknown benchmark."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown compositional benchmark {benchmark!r}; known: {BENCHMARKS}")
    if not folder.is_dir():
        raise sources.SourceError(f"{TITLES[benchmark]} folder {folder} does not exist")
    found, missing = [], []
    for category in CATEGORIES[benchmark]:
        path = folder / f"{category}.json"
        if path.is_file():
            found.append(sources.SubsetSource(subset_name(benchmark, category), SPLIT, (path,)))
        else:
            missing.append(category)
    if not found:
        expected = ", ".join(f"{c}.json" for c in CATEGORIES[benchmark])
        raise sources.SourceError(
            f"{folder} holds no {TITLES[benchmark]} file; expected one or more of {expected}"
        )
    return found, missing


def sidecar(subsets: Sequence[sources.SubsetSource]) -> dict[str, SubsetInfo]:
    """Subset descriptions for ingest (its `subset_info`): compositional categories are
    neither an MMEB meta-task nor a distribution; they are scored on their own."""
    return {normalise(s.subset): SubsetInfo(s.subset, "compositional", "ood") for s in subsets}


def _benchmark_of(subset: str) -> tuple[str, str]:
    title, _, category = subset.partition("/")
    benchmark = next(b for b, t in TITLES.items() if t == title)
    return benchmark, category


def read_json(
    source: sources.SubsetSource, required: Sequence[str], batch_rows: int
) -> Iterator[sources.Chunk]:
    """Chunks of up to `batch_rows` entries of one category file, in file order, with
    COLUMNS (`required` is accepted for ingest's reader signature; every field is read).
    A field an entry lacks is None (a row problem for the converter); an entry that is not
    a JSON object is a row error. A UTF-8 byte-order mark is allowed.

    Raises SourceError (a UserError) for a file that is not JSON, that repeats a key (JSON
    readers keep the last one: an entry would vanish), or whose top level is not its
    benchmark's layout (an object for SugarCrepe, a list for SugarCrepe++: the other
    benchmark's folder given for this one)."""
    del required
    benchmark, category = _benchmark_of(source.subset)
    path = source.files[0]
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, _RepeatedKeyError) as exc:
        raise sources.SourceError(f"{path} is not a JSON file of its layout: {exc}") from None
    layout = dict if benchmark == "sugarcrepe" else list
    if not isinstance(data, layout):
        raise sources.SourceError(
            f"{path}: {TITLES[benchmark]}'s layout is a JSON "
            f"{'object of entries' if layout is dict else 'list of entries'}, this file holds "
            f"a {type(data).__name__}; is it the other benchmark's file? (ingest.sugarcrepe_dir "
            "is SugarCrepe's data/ folder, ingest.sugarcrepe_pp_dir SugarCrepe++'s)"
        )
    if isinstance(data, dict):
        entries = list(data.items())
    else:
        entries = [(_entry_name(e, i), e) for i, e in enumerate(data)]
    for start in range(0, len(entries), batch_rows):
        part = entries[start : start + batch_rows]
        columns: dict[str, list[Any]] = {c: [] for c in COLUMNS}
        errors: dict[int, str] = {}
        for i, (_, entry) in enumerate(part):
            if not isinstance(entry, dict):
                errors[i] = f"entry is {type(entry).__name__}, not a JSON object"
                entry = {}
            columns["benchmark"].append(benchmark)
            columns["category"].append(category)
            for name in COLUMNS[2:]:
                columns[name].append(entry.get(name))
        yield sources.Chunk(
            subset=source.subset,
            split=SPLIT,
            source=path.name,
            start_row=start,
            columns=columns,
            row_errors=errors,
            names=[str(name) for name, _ in part],
        )


class _RepeatedKeyError(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: an object, refused when it names a key twice."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedKeyError(f"the key {key!r} appears twice in one object")
        out[key] = value
    return out


def _entry_name(entry: Any, index: int) -> str:
    ident = entry.get("id") if isinstance(entry, dict) else None
    if isinstance(ident, str | int) and not isinstance(ident, bool):
        return str(ident)
    return str(index)


def image_paths(row: dict[str, Any]) -> list[str]:
    """The image an entry names, for ingest's image checks (none when it is not text)."""
    return [row["filename"]] if isinstance(row["filename"], str) and row["filename"] else []


def convert(
    row: dict[str, Any], info: SubsetInfo, split: str, rownum: int, images: dict[str, str | None]
) -> tuple[str, dict[str, Any] | None, str | None]:
    """One entry -> (row id, a COMPOSITIONAL_SCHEMA row or None, the reason it is bad).

    Bad: a field missing or not proper text (`sources.text_problem`), an empty caption or
    file name, an image that fails its check. Ids hash the subset and the entry's content."""
    del split
    benchmark = row["benchmark"]
    fields = FIELDS[benchmark]
    rid = row_id(info.name, *(v if isinstance(v, str) else "" for v in map(row.get, fields)))
    problems = []
    for name in fields:
        value = row[name]
        if value is None:
            problems.append(f"{name} is missing")
        elif problem := sources.text_problem(value, name):
            problems.append(problem)
        elif not value.strip():
            problems.append(f"{name} is empty")
    path = row["filename"]
    if isinstance(path, str) and path and images.get(path):
        problems.append(f"filename: {images[path]}")
    if not problems:
        # One text, one vector: the scores tie exactly, which MMEB's convention would count
        # as correct whatever the model.
        same = [n for n in fields[1:-1] if row[n].strip() == row["negative_caption"].strip()]
        if same:
            problems.append(f"negative_caption equals {same[0]}: the row cannot be scored")
    if problems:
        return rid, None, "; ".join(problems)
    return (
        rid,
        {
            "id": rid,
            "subset": info.name,
            "benchmark": benchmark,
            "category": row["category"],
            "group": group_of(row["category"]),
            "row": rownum,
            "image": path,
            "caption": row["caption"],
            "caption2": row["caption2"] if benchmark == "sugarcrepe_pp" else None,
            "negative": row["negative_caption"],
        },
        None,
    )
