"""Streaming readers for the raw tables: local MMEB dumps, JSONL files and the hub.

Every reader yields `Chunk`s of at most `batch_rows` rows in source order, carrying where the
rows came from so a bad row can be named by file and row number. Nothing holds a whole table.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from embedder.errors import UserError

TRAIN_COLUMNS = (
    "qry",
    "qry_image_path",
    "pos_text",
    "pos_image_path",
    "neg_text",
    "neg_image_path",
)
EVAL_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
# Carried through when present, gen2embed's own (not MMEB's): the miniature world's planted
# false-negative groups (train) and each eval candidate's category (eval).
OPTIONAL_COLUMNS = ("fn_group", "tgt_category")
EVAL_SPLIT = "test"


# transformers.utils.chat_template_utils._CONTROL_TOKEN_START / _END (tested equal): the
# characters `Backbone.as_text` uses to keep special-token strings in data as text.
CONTROL_MARKERS = frozenset({"\U000f0000", "\U000f0001"})


class SourceError(UserError, ValueError):
    """The source as a whole cannot be read (missing folder, wrong columns, corrupt file)."""


@dataclass(frozen=True)
class SubsetSource:
    """One subset of one split and the files (or hub address) that hold it.

    `split` is "jsonl" for a JSONL file (`files` is that one file); `hub_repo` is set for
    the hub, and `files` is then empty."""

    subset: str
    split: str
    files: tuple[Path, ...] = ()
    hub_repo: str | None = None

    @property
    def label(self) -> str:
        """`subset/split`, for messages."""
        return f"{self.subset}/{self.split}"


@dataclass
class Chunk:
    """Up to `batch_rows` consecutive rows of one source, column-wise: `columns` maps each
    column read to one Python value a row (None for a null, or a JSONL key that is
    absent), every list the same length, `len(chunk)`."""

    subset: str
    split: str
    source: str  # a file name or hub address, for messages
    start_row: int  # row number of the first row within `source`
    columns: dict[str, list[Any]]
    # Rows that could not even be parsed (JSONL), by index within the chunk.
    row_errors: dict[int, str] = field(default_factory=dict)
    # 1-based line numbers of the rows in a text file (JSONL skips blank lines, so the row
    # index is not the line a person opens in an editor); None for tables.
    lines: list[int] | None = None
    # The rows' names in a JSON file of named entries (a key, or an entry's "id"); None else.
    names: list[str] | None = None

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def row_number(self, i: int) -> int:
        """Where row `i` of the chunk sits in its source: the line (text files) or the row."""
        return self.lines[i] if self.lines is not None else self.start_row + i

    def where(self, i: int) -> str:
        """Row `i` as a person finds it: `line 7` in a JSONL file, `entry '12'` in a JSON
        file of named entries, `row 6` in a table."""
        if self.lines is not None:
            return f"line {self.lines[i]}"
        if self.names is not None:
            return f"entry {self.names[i]!r}"
        return f"row {self.start_row + i}"


def _is_hidden(name: str) -> bool:
    return name.startswith((".", "_"))  # also catches macOS "._" files and "__MACOSX"


def discover_folder(
    root: Path, splits: Sequence[str], subsets: Sequence[str] | None
) -> list[SubsetSource]:
    """Subsets of an MMEB-layout folder: one sub-folder per subset, `<split>-*.parquet` inside.

    A subset folder with no file for a split still yields a source (with no files) so that
    an empty subset is reported rather than silently missing.

    Folders and files whose names start with "." or "_" are ignored (macOS `._` files,
    `__MACOSX`). Sources come in folder-name order, each subset's splits in `splits` order,
    files sorted by name. Raises SourceError (a UserError) when `root` is not a folder, a
    name in `subsets` is not a subset folder, there are no subset folders, or no subset has
    a file for any split.
    """
    if not root.is_dir():
        raise SourceError(f"dataset folder {root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not _is_hidden(p.name))
    names = [p.name for p in folders]
    if subsets is not None:
        unknown = [s for s in subsets if s not in names]
        if unknown:
            close = {s: difflib.get_close_matches(s, names, 1) for s in unknown}
            hints = [f"{s} -> {c[0]}" for s, c in close.items() if c]
            raise SourceError(
                f"subsets {unknown} not found in {root}; it holds: {', '.join(names) or 'nothing'}"
                + (f" (did you mean: {', '.join(hints)}?)" if hints else "")
            )
        folders = [p for p in folders if p.name in set(subsets)]
    if not folders:
        raise SourceError(f"{root} holds no subset folders")
    found = [
        SubsetSource(
            subset=folder.name,
            split=split,
            files=tuple(
                sorted(f for f in folder.glob(f"{split}-*.parquet") if not _is_hidden(f.name))
            ),
        )
        for folder in folders
        for split in splits
    ]
    if not any(source.files for source in found):
        patterns = " or ".join(f"<subset>/{split}-*.parquet" for split in splits)
        raise SourceError(
            f"no table in {root}: looked for {patterns} in its {len(folders)} subset folder(s)"
        )
    return found


def _check_columns(found: Sequence[str], required: Sequence[str], where: str) -> None:
    missing = [c for c in required if c not in found]
    if missing:
        hints = []
        for col in missing:
            close = difflib.get_close_matches(col, [f for f in found if f not in required], n=1)
            if close:
                hints.append(f"{close[0]!r} -> {col!r}?")
        hint = f"; did you mean {', '.join(hints)}" if hints else ""
        raise SourceError(
            f"{where} lacks column(s) {', '.join(missing)} (found: {', '.join(found)}){hint}"
        )


def read_parquet(source: SubsetSource, required: Sequence[str], batch_rows: int) -> Iterator[Chunk]:
    """Chunks of at most `batch_rows` rows of each of the source's Parquet files in turn,
    holding the `required` columns and any OPTIONAL_COLUMNS present; `start_row` counts from 0
    in each file. A batch with a string cell that is not UTF-8 is read row by row, such rows
    becoming `row_errors`. Raises SourceError (a UserError), lazily as the iterator reaches
    the file, when a file is not readable Parquet or lacks a required column."""
    for path in source.files:
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise SourceError(f"{path} is not a readable Parquet file: {exc}") from exc
        names = pf.schema_arrow.names
        _check_columns(names, required, str(path))
        wanted = [*required, *(c for c in OPTIONAL_COLUMNS if c in names)]
        start = 0
        for batch in pf.iter_batches(batch_size=batch_rows, columns=wanted):
            try:
                columns, errors = batch.to_pydict(), {}
            except UnicodeDecodeError:  # a string cell that is not UTF-8: find the rows
                columns, errors = _rows_one_by_one(batch)
            yield Chunk(source.subset, source.split, path.name, start, columns, errors)
            start += batch.num_rows


def _rows_one_by_one(batch: pa.RecordBatch) -> tuple[dict[str, list[Any]], dict[int, str]]:
    """A record batch whose strings are not all valid UTF-8 (Parquet writers other than Arrow
    do not always check), converted row by row: a row that cannot be read is a row error
    naming its column; the others convert as usual."""
    columns: dict[str, list[Any]] = {name: [] for name in batch.schema.names}
    errors: dict[int, str] = {}
    for i in range(batch.num_rows):
        row = batch.slice(i, 1)
        for name in batch.schema.names:
            try:
                value = row.column(name).to_pylist()[0]
            except UnicodeDecodeError as exc:
                errors.setdefault(i, f"{name} is not UTF-8 text ({exc.reason})")
                value = None
            columns[name].append(value)
    return columns, errors


def discover_jsonl(
    files: Sequence[Path], subsets: Sequence[str] | None = None
) -> list[SubsetSource]:
    """One subset per JSONL file, named by the file's stem; only `subsets` when given (each
    must name one of the files).

    Split "jsonl", in the order of `files`. Raises SourceError (a UserError) when a file does
    not exist, two files share a stem, or a name in `subsets` is no file's stem."""
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise SourceError(f"JSONL files not found: {', '.join(missing)}")
    found = [SubsetSource(subset=Path(f).stem, split="jsonl", files=(Path(f),)) for f in files]
    stems: dict[str, list[str]] = {}
    for f in files:
        stems.setdefault(Path(f).stem, []).append(str(f))
    clash = {stem: paths for stem, paths in stems.items() if len(paths) > 1}
    if clash:
        # One subset name for two files would merge them, and the sidecar of only one folder
        # would describe both.
        stem, paths = next(iter(clash.items()))
        raise SourceError(
            f"ingest.jsonl_files: {' and '.join(paths)} would both be subset {stem!r} (a JSONL "
            "file's subset is its name): rename one"
        )
    if subsets is None:
        return found
    names = [s.subset for s in found]
    unknown = [s for s in subsets if s not in names]
    if unknown:
        # A file name given for its stem ("A.jsonl" for "A") is the common slip.
        close = {s: [Path(s).stem] if Path(s).stem in names else [] for s in unknown}
        close = {s: c or difflib.get_close_matches(s, names, 1) for s, c in close.items()}
        hints = [f"{s} -> {c[0]}" for s, c in close.items() if c]
        raise SourceError(
            f"ingest.train_subsets {unknown} name no JSONL file; the files hold: "
            f"{', '.join(names)}" + (f" (did you mean: {', '.join(hints)}?)" if hints else "")
        )
    return [s for s in found if s.subset in set(subsets)]


def parse_jsonl_line(raw: bytes, first: bool) -> tuple[dict[str, Any] | None, str | None]:
    """One JSONL line -> (object, None) or (None, why it is not a usable row).

    Lines are decoded one at a time, so one line of invalid UTF-8 is a bad row, not a failed
    file; a byte-order mark is accepted on the first line only, as JSON text may carry one."""
    try:
        line = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 text (byte {exc.start}: {raw[exc.start : exc.start + 4]!r})"
    try:
        obj = json.loads(line)
    except ValueError as exc:
        return None, f"not a JSON object ({exc})"
    if not isinstance(obj, dict):
        return None, f"not a JSON object (a JSON {type(obj).__name__})"
    return obj, None


def read_jsonl(source: SubsetSource, required: Sequence[str], batch_rows: int) -> Iterator[Chunk]:
    """Chunks of at most `batch_rows` rows of the source's one JSONL file, blank lines
    skipped, with the `required` columns and OPTIONAL_COLUMNS (None where a record lacks the
    key); `lines` holds each row's 1-based line number. A line that is not a UTF-8 JSON
    object is a row error (`parse_jsonl_line`), its values None. Raises SourceError (a
    UserError) when the first parsed record lacks a required column; later records are not
    checked here."""
    (path,) = source.files
    wanted = [*required, *OPTIONAL_COLUMNS]
    checked = False

    def empty() -> dict[str, list[Any]]:
        return {c: [] for c in wanted}

    columns, errors, lines, start, n = empty(), {}, [], 0, 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            obj, problem = parse_jsonl_line(raw, lineno == 1)
            if obj is None:
                obj, errors[n] = {}, problem
            elif not checked:
                _check_columns(list(obj), required, f"{path} (first record)")
                checked = True
            for c in wanted:
                columns[c].append(obj.get(c))
            lines.append(lineno)
            n += 1
            if n == batch_rows:
                yield Chunk(source.subset, source.split, path.name, start, columns, errors, lines)
                columns, errors, lines, start, n = empty(), {}, [], start + n, 0
    if n:
        yield Chunk(source.subset, source.split, path.name, start, columns, errors, lines)


def discover_hub(
    repo: str, splits: Sequence[str], subsets: Sequence[str] | None
) -> list[SubsetSource]:
    """Subsets of a hub dataset (needs network; `pip install gen2embed[hub]`).

    One source per config of `repo` (in the hub's order) and split. Raises SourceError (a
    UserError) when a name in `subsets` is not a config, ImportError without the `datasets`
    package, and what `datasets` raises when the hub cannot be reached."""
    from datasets import get_dataset_config_names

    names = list(get_dataset_config_names(repo))
    if subsets is not None:
        unknown = [s for s in subsets if s not in names]
        if unknown:
            raise SourceError(f"subsets {unknown} are not configs of {repo}: {', '.join(names)}")
        names = [n for n in names if n in set(subsets)]
    return [SubsetSource(subset=n, split=s, hub_repo=repo) for n in names for s in splits]


def read_hub(source: SubsetSource, required: Sequence[str], batch_rows: int) -> Iterator[Chunk]:
    """Chunks of at most `batch_rows` rows streamed from the hub (`datasets`, streaming,
    nothing cached whole), with the `required` columns and any OPTIONAL_COLUMNS present.
    Raises SourceError (a UserError) when the dataset lacks a required column, and what
    `datasets` raises when it cannot be loaded; lazily, as the iterator starts."""
    from datasets import load_dataset

    assert source.hub_repo is not None
    ds = load_dataset(source.hub_repo, source.subset, split=source.split, streaming=True)
    where = f"{source.hub_repo}:{source.subset}/{source.split}"
    _check_columns(list(ds.features), required, where)
    wanted = [*required, *(c for c in OPTIONAL_COLUMNS if c in ds.features)]
    start = 0
    for batch in ds.iter(batch_size=batch_rows):
        yield Chunk(source.subset, source.split, where, start, {c: batch[c] for c in wanted})
        start += len(batch[wanted[0]])


def read_source(source: SubsetSource, required: Sequence[str], batch_rows: int) -> Iterator[Chunk]:
    """The reader for `source`: `read_hub` with a hub address, `read_jsonl` for split
    "jsonl", else `read_parquet`; raises as they do."""
    if source.hub_repo is not None:
        return read_hub(source, required, batch_rows)
    if source.split == "jsonl":
        return read_jsonl(source, required, batch_rows)
    return read_parquet(source, required, batch_rows)


def text_problem(value: Any, column: str) -> str | None:
    """Why a text cell cannot be used; None for a proper string (empty included).

    Not usable: null, NaN, a non-string, a string holding transformers' control-token markers
    (CONTROL_MARKERS) or an unpaired surrogate. The reason names `column`."""
    if value is None:
        return f"{column} is null"
    if isinstance(value, float) and math.isnan(value):
        return f"{column} is NaN"
    if not isinstance(value, str):
        return f"{column} is {type(value).__name__}, not text"
    marker = next((c for c in value if c in CONTROL_MARKERS), None)
    if marker is not None:
        # transformers marks control tokens in user text with these two characters and drops
        # any the text already holds: the text the model saw would not be this one.
        return (
            f"{column} holds {marker!a}, a private-use character that transformers reserves "
            "to mark control tokens in text"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        # JSON's \udXXX escapes can carry half of a surrogate pair: a string Python holds
        # but no UTF-8 file, tokenizer or Arrow column can.
        bad = value[exc.start]
        return (
            f"{column} holds an unpaired surrogate {bad!a} at character {exc.start} "
            "(not valid Unicode text)"
        )
    return None
