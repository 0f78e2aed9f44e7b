"""Embedding shards on disk: Parquet files of (key, fixed-size vector), read back as one
matrix. Kept free of torch so retrieval and mining can read them without it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


@dataclass(frozen=True)
class ShardSlice:
    """One of `count` workers sharing an encoding job's shards: it computes the pending
    shards `index`, `index + count`, ... of the plan into the common folder, and the stage
    calling it stops there (assembling is a later, whole call's job; tasks.scale).

    Raises ValueError unless 0 <= index < count."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard slice {self.index} of {self.count}")

    def owns(self, shard: int) -> bool:
        """Whether shard number `shard` of the plan is this worker's."""
        return shard % self.count == self.index


def write_shard(path: Path, keys: list[str], vectors: np.ndarray) -> None:
    """Write one shard atomically: a Parquet file of `key` (string) and `embedding`
    (fixed-size list of d floats), row i holding `keys[i]` and `vectors[i]`.

    `vectors`: (n, d); float16 is stored as float16, any other dtype as float32. Written to
    `path` with suffix .tmp, then renamed over `path`, so a reader sees a whole shard or
    none. `load_embeddings` reads files named shard-*.parquet. Raises ValueError (pyarrow's
    ArrowInvalid) when len(keys) != n."""
    dim = vectors.shape[1]
    value_type = pa.float16() if vectors.dtype == np.float16 else pa.float32()
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=value_type), dim)
    table = pa.table({"key": pa.array(keys, pa.string()), "embedding": emb})
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def load_embeddings(out_dir: Path) -> tuple[list[str], np.ndarray]:
    """All shards of an encode output: keys and a (n, d) float32 matrix, in shard order.

    Shard order is the sorted file names `out_dir/shard-*.parquet` (as `write_shard` wrote
    them); row i of the matrix is keys[i]. No shards: ([], a (0, 0) matrix). Raises
    pyarrow's ArrowInvalid (a ValueError) when shards of different widths (or float16 and
    float32 ones) are mixed."""
    tables = [pq.read_table(p) for p in sorted(out_dir.glob("shard-*.parquet"))]
    if not tables:
        return [], np.zeros((0, 0), dtype=np.float32)
    table = pa.concat_tables(tables)
    dim = table.schema.field("embedding").type.list_size
    flat = table["embedding"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return table["key"].to_pylist(), flat.reshape(-1, dim).astype(np.float32)
