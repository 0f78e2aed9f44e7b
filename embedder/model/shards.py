"""Embedding shards on disk: Parquet files of (key, fixed-size vector), read back as one
matrix. Kept free of torch so retrieval and mining can read them without it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_shard(path: Path, keys: list[str], vectors: np.ndarray) -> None:
    dim = vectors.shape[1]
    value_type = pa.float16() if vectors.dtype == np.float16 else pa.float32()
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=value_type), dim)
    table = pa.table({"key": pa.array(keys, pa.string()), "embedding": emb})
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def load_embeddings(out_dir: Path) -> tuple[list[str], np.ndarray]:
    """All shards of an encode output: keys and a (n, d) float32 matrix, in shard order."""
    tables = [pq.read_table(p) for p in sorted(out_dir.glob("shard-*.parquet"))]
    if not tables:
        return [], np.zeros((0, 0), dtype=np.float32)
    table = pa.concat_tables(tables)
    dim = table.schema.field("embedding").type.list_size
    flat = table["embedding"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return table["key"].to_pylist(), flat.reshape(-1, dim).astype(np.float32)
