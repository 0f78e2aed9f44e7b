"""Arrow schemas of the tables every later stage reads, and their content-hash row ids.

Image columns hold paths relative to an images root (recorded in the ingest manifest); an
empty string means "no image", as in MMEB.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

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
    ],
    metadata={"table": "eval"},
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

_UNIT = "\x1f"  # separates fields
_RECORD = "\x1e"  # separates list items


def row_id(subset: str, *parts: str | list[str]) -> str:
    """Content hash of a row: the same content in the same subset always gets the same id.

    Exact duplicate rows share an id (MMEB's identity is content; see METHOD.md section 3).
    """
    flat = [_RECORD.join(p) if isinstance(p, list) else p for p in parts]
    digest = hashlib.blake2b(_UNIT.join([subset, *flat]).encode(), digest_size=8)
    return digest.hexdigest()
