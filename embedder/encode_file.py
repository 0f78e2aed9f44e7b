"""`gen2embed encode`: a JSONL or Parquet file of texts and images -> a Parquet file of vectors.

Input columns (any may be absent, not all): `text`, `image` (a path relative to the images
root), `instruction`, and `id` (else the row's 0-based position in the input). Rows are
checked with the ingest rules (text that is not valid Unicode, an image path that is
absolute, contains `..`, escapes the root, is missing or does not decode; a row with neither
text nor image) and bad rows are named by file and line. The output holds `id` (string)
and `embedding` (fixed_size_list<float32>[D], unit vectors), in input order.

Resumable: the vectors go to shards in `<output>.partial/` as they finish (the engine of the
embed stage); a killed run, run again with the same arguments, skips finished shards, and the
output file appears only when complete (written beside and renamed).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from embedder.datasets.images import ImageChecker
from embedder.datasets.sources import parse_jsonl_line, text_problem
from embedder.errors import UserError
from embedder.inference import Embedder, with_instruction
from embedder.model.prompts import Role

COLUMNS = ("id", "text", "image", "instruction")
MAX_NAMED = 20


class EncodeInputError(UserError, ValueError):
    """The input file cannot be encoded as given; the message names the rows."""


@dataclass
class Row:
    """One usable input row: its id (the input's `id` as a string, else its 0-based
    position among the input's records), `where` for messages, text and image ("" for
    none; the image relative to the images root) and instruction (None for none)."""

    id: str
    where: str  # "line 7" / "row 6", for messages
    text: str
    image: str
    instruction: str | None


def read_rows(path: Path) -> tuple[list[Row], list[str]]:
    """The input's rows and, for each bad one, `where: why`. Raises EncodeInputError when the
    file is of an unknown kind or holds no rows.

    `path` ends in .jsonl (blank lines skipped; a line that is not a UTF-8 JSON object is a
    bad row) or .parquet (only the COLUMNS it has are read). A record with neither a `text`
    nor an `image` field, or whose values fail ingest's text rules
    (`embedder.datasets.sources.text_problem`), is bad; a file lacking both columns makes
    every row bad rather than raising. Images are not checked here. Raises OSError when the
    file cannot be read, and pyarrow's ArrowInvalid (a ValueError) for a broken Parquet
    file."""
    if path.suffix == ".jsonl":
        records: list[tuple[str, dict[str, Any] | None, str | None]] = []
        with path.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if raw.strip():
                    obj, problem = parse_jsonl_line(raw, lineno == 1)
                    records.append((f"line {lineno}", obj, problem))
    elif path.suffix == ".parquet":
        table = pq.read_table(path, columns=[c for c in COLUMNS if c in pq.read_schema(path).names])
        records = [(f"row {i}", r, None) for i, r in enumerate(table.to_pylist())]
    else:
        raise EncodeInputError(f"{path}: the input must be .jsonl or .parquet")
    if not records:
        raise EncodeInputError(f"{path} holds no rows")
    rows, bad = [], []
    for i, (where, record, problem) in enumerate(records):
        if record is None:
            bad.append(f"{where}: {problem}")
            continue
        if not any(c in record for c in ("text", "image")):
            bad.append(f"{where}: neither a `text` nor an `image` field")
            continue
        values = {c: record.get(c) for c in ("text", "image", "instruction")}
        problems = [
            p for c, v in values.items() if v is not None and (p := text_problem(v, c)) is not None
        ]
        if not values["text"] and not values["image"]:
            problems.append("neither text nor image")
        if problems:
            bad.append(f"{where}: {'; '.join(problems)}")
            continue
        rid = record.get("id")
        rows.append(
            Row(
                id=str(rid) if rid is not None else str(i),
                where=where,
                text=values["text"] or "",
                image=values["image"] or "",
                instruction=values["instruction"] or None,
            )
        )
    return rows, bad


def encode_file(
    model: Embedder,
    source: Path,
    output: Path,
    *,
    images_root: Path | None,
    role: Role = "query",
    on_bad_rows: Literal["error", "skip"] = "error",
    progress: bool = True,
) -> dict[str, int]:
    """Embed every row of `source` into `output` (Parquet: `id`, `embedding`); returns counts
    (`rows`, `skipped`). Raises EncodeInputError naming bad rows (with `error`), or when an
    image is given without `images_root`.

    `output` holds `id` (string) and `embedding` (fixed_size_list<float32>[D], unit vectors)
    for the usable rows, in input order; it is written as `<output>.tmp` and renamed, after
    the vectors were computed into resumable shards in `<output>.partial/shards` (removed
    once `output` is in place). `role`: query rows get the template's query line, target rows
    none. Images are checked as ingest checks them (`ImageChecker`) before anything is
    embedded. EncodeInputError (a UserError) also when the file is of an unknown kind or
    has no rows (`read_rows`), `images_root` is not a folder, or no row is usable; with
    `on_bad_rows="skip"` bad rows are left out and counted in `skipped`. What the engine
    raises (embedder.model.encode.encode) comes through unchanged."""
    rows, bad = read_rows(source)
    with_images = [r for r in rows if r.image]
    if with_images and images_root is None:
        raise EncodeInputError(
            f"{source} names images ({with_images[0].where}: {with_images[0].image!r}) but no "
            "images root was given (--images DIR)"
        )
    if with_images:
        assert images_root is not None
        root = images_root.resolve()
        if not root.is_dir():
            raise EncodeInputError(f"images root {images_root} is not a folder")
        with ImageChecker(root) as checker:  # ingest's checks, in threads, each path once
            problems = checker.check_many(r.image for r in rows)
        bad += [f"{r.where}: image: {problems[r.image]}" for r in rows if problems.get(r.image)]
        rows = [r for r in rows if not problems.get(r.image)]
    else:
        root = Path("/")
    if bad and on_bad_rows == "error":
        shown = "\n  ".join(bad[:MAX_NAMED])
        more = f"\n  ... and {len(bad) - MAX_NAMED} more" if len(bad) > MAX_NAMED else ""
        raise EncodeInputError(
            f"{len(bad)} bad row(s) in {source}; nothing was written.\n  {shown}{more}\n"
            "Fix them, or pass --on-bad-rows skip to leave them out."
        )
    if not rows:
        raise EncodeInputError(f"{source}: no usable rows")
    items = [model.item(with_instruction(r.text, r.instruction), r.image, role) for r in rows]
    partial = output.with_name(output.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    vectors = model.embed_items(items, root, partial / "shards", progress=progress)
    table = pa.table(
        {
            "id": pa.array([r.id for r in rows], pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1]
            ),
        }
    )
    tmp = output.with_name(output.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(output)
    shutil.rmtree(partial, ignore_errors=True)
    return {"rows": len(rows), "skipped": len(bad)}
