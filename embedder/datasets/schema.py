"""Arrow schemas of every table one stage writes and another reads, the checked reader
and writer for them, and the content-hash row ids.

Image columns hold paths relative to an images root (a field of the ingest stage's output);
an empty string means "no image", as in MMEB.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from embedder.errors import UserError

META_TASKS: tuple[str, ...] = ("classification", "vqa", "retrieval", "grounding")
DISTRIBUTIONS: tuple[str, ...] = ("ind", "ood")

PAIRS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("subset", pa.string(), nullable=False),
        pa.field("meta_task", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
        pa.field("qry_text", pa.string(), nullable=False),
        pa.field("qry_image", pa.string(), nullable=False),
        pa.field("pos_text", pa.string(), nullable=False),
        pa.field("pos_image", pa.string(), nullable=False),
        pa.field("neg_text", pa.string(), nullable=False),
        pa.field("neg_image", pa.string(), nullable=False),
        # Ground truth of the miniature world: pairs sharing a group are planted false
        # negatives of each other (each positive also fits the other queries). Null elsewhere.
        pa.field("fn_group", pa.string(), nullable=True),
    ],
    metadata={"table": "pairs"},
)

EVAL_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("subset", pa.string(), nullable=False),
        pa.field("meta_task", pa.string(), nullable=False),
        pa.field("distribution", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
        pa.field("qry_text", pa.string(), nullable=False),
        pa.field("qry_image", pa.string(), nullable=False),
        # Parallel candidate lists; the correct candidate is index 0 (MMEB convention).
        pa.field("tgt_text", pa.list_(pa.string()), nullable=False),
        pa.field("tgt_image", pa.list_(pa.string()), nullable=False),
        # Optional (gen2embed's, not MMEB's): each candidate's category, parallel to tgt_text,
        # for the same-category and category-level accuracies (embedder.evaluate); null
        # where the source has none.
        pa.field("tgt_category", pa.list_(pa.string()), nullable=True),
    ],
    metadata={"table": "eval"},
)

# SugarCrepe and SugarCrepe++ rows (embedder.datasets.compositional): an image, the caption
# that fits it, SugarCrepe++'s second caption (null in SugarCrepe) and the negative caption.
COMPOSITIONAL_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("subset", pa.string(), nullable=False),  # "SugarCrepe/swap_att", ...
        pa.field("benchmark", pa.string(), nullable=False),  # sugarcrepe | sugarcrepe_pp
        pa.field("category", pa.string(), nullable=False),  # swap_att, ...
        pa.field("group", pa.string(), nullable=False),  # add | replace | swap
        pa.field("row", pa.int64(), nullable=False),  # the entry's position in its file
        pa.field("image", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("caption2", pa.string(), nullable=True),
        pa.field("negative", pa.string(), nullable=False),
    ],
    metadata={"table": "compositional"},
)

REJECTS_SCHEMA = pa.schema(
    [
        pa.field("table", pa.string(), nullable=False),
        pa.field("subset", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ],
    metadata={"table": "rejects"},
)

# ------------------------------------------------------------ embed -> retrieve -> mine

PAIR_KEYS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("subset", pa.string(), nullable=False),
        pa.field("meta_task", pa.string(), nullable=False),
        pa.field("fn_group", pa.string(), nullable=True),
        # Keys of the rendered query / positive in the embedding shards.
        pa.field("qry_key", pa.string(), nullable=False),
        pa.field("pos_key", pa.string(), nullable=False),
    ],
    metadata={"table": "pair_keys"},
)

# Indices `query` / `positive` are local to the subset: the n-th distinct query (positive)
# of that subset in dataset order.
POOL_ROWS_SCHEMA = pa.schema(
    [
        pa.field("subset", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),  # position within the subset
        pa.field("id", pa.string(), nullable=False),
        pa.field("meta_task", pa.string(), nullable=False),
        pa.field("query", pa.int32(), nullable=False),
        pa.field("positive", pa.int32(), nullable=False),
        pa.field("fn_group", pa.string(), nullable=True),
    ],
    metadata={"table": "pool_rows"},
)

POOL_QUERIES_SCHEMA = pa.schema(
    [
        pa.field("subset", pa.string(), nullable=False),
        pa.field("query", pa.int32(), nullable=False),
        pa.field("qry_key", pa.string(), nullable=False),
        # The row this query maps back to: the last row with its content (docs/method.md 3.2).
        pa.field("row", pa.int64(), nullable=False),
    ],
    metadata={"table": "pool_queries"},
)

POOL_POSITIVES_SCHEMA = pa.schema(
    [
        pa.field("subset", pa.string(), nullable=False),
        pa.field("positive", pa.int32(), nullable=False),
        pa.field("pos_key", pa.string(), nullable=False),
    ],
    metadata={"table": "pool_positives"},
)

CANDIDATES_SCHEMA = pa.schema(
    [
        pa.field("subset", pa.string(), nullable=False),
        pa.field("query", pa.int32(), nullable=False),
        # The query's top-R positives by descending score (R capped by the subset's pool).
        pa.field("candidates", pa.list_(pa.int32()), nullable=False),
        pa.field("scores", pa.list_(pa.float32()), nullable=False),
    ],
    metadata={"table": "candidates"},
)

CLUSTERS_SCHEMA = pa.schema(
    [
        pa.field("cluster", pa.int64(), nullable=False),
        pa.field("subset", pa.string(), nullable=False),
        pa.field("phase", pa.int8(), nullable=False),
        pa.field("position", pa.int16(), nullable=False),
        pa.field("id", pa.string(), nullable=False),  # the pair's id in pairs.parquet
        pa.field("role", pa.string(), nullable=False),  # anchor | negative
    ],
    metadata={"table": "clusters"},
)


class SchemaError(UserError, ValueError):
    """A table does not hold the columns (or types) its schema promises."""


def write_table(table: pa.Table, path: Path, schema: pa.Schema) -> None:
    """Write `table` cast to `schema` (so, e.g., a fixed-size NumPy block becomes a list).

    Only the schema's columns are written, in its order, as one Parquet file at `path`
    (overwritten). Raises KeyError when `table` lacks a column and ValueError (pyarrow's
    ArrowInvalid among them) when a column cannot be cast to its type or holds a null where
    the schema forbids one."""
    pq.write_table(table.select(schema.names).cast(schema), path)


def read_table(path: Path, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """Read a table another stage wrote, checking it against its schema first.

    Only the schema's columns (or `columns`, the subset of them to read and check) are
    read; extra columns in the file are ignored. Raises SchemaError (a UserError) naming
    every missing column and every column of another type, FileNotFoundError when `path`
    is missing and pyarrow's ArrowInvalid (a ValueError) when it is not Parquet."""
    found = pq.read_schema(path)
    problems = []
    for field in schema:
        if columns is not None and field.name not in columns:
            continue
        if field.name not in found.names:
            problems.append(f"missing column {field.name!r}")
        elif not found.field(field.name).type.equals(field.type):
            got = found.field(field.name).type
            problems.append(f"column {field.name!r} is {got}, expected {field.type}")
    if problems:
        table = schema.metadata.get(b"table", b"?").decode() if schema.metadata else "?"
        raise SchemaError(f"{path} is not a {table} table: {'; '.join(problems)}")
    return pq.read_table(path, columns=columns or schema.names)


_UNIT = "\x1f"  # separates fields
_RECORD = "\x1e"  # separates list items


def row_id(subset: str, *parts: str | list[str]) -> str:
    """Content hash of a row: the same content in the same subset always gets the same id.

    Exact duplicate rows share an id (MMEB's identity is content; see docs/method.md section 3).
    Returns 16 hex chars (blake2b, 8 bytes) over the subset and `parts` in order, fields
    joined by the ASCII unit separator and list items by the record separator.
    """
    flat = [_RECORD.join(p) if isinstance(p, list) else p for p in parts]
    # surrogatepass: a row holding a lone surrogate is rejected, but still gets an id to name it.
    digest = hashlib.blake2b(
        _UNIT.join([subset, *flat]).encode("utf-8", "surrogatepass"), digest_size=8
    )
    return digest.hexdigest()
