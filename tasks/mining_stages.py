"""Stages `retrieve` (FAISS top-R candidates per query) and `mine` (SaHa clusters)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from embedder import mining, retrieval
from embedder.artifacts import StageOutput, code_version
from embedder.config import PipelineConfig
from embedder.embed import KEYS_FILE, SHARDS_DIR
from embedder.mining import MineParams
from embedder.model import shards
from tasks.stage import StageDef, register


def _retrieve(config: PipelineConfig, out: Path, up: Mapping[str, Path]) -> StageOutput:
    r = config.retrieve
    return retrieval.retrieve_candidates(
        up["ingest"] / "pairs.parquet",
        up["embed"] / KEYS_FILE,
        up["embed"] / SHARDS_DIR,
        out,
        top_r=config.top_r,
        index=r.index,
        device=r.device,
        batch=r.batch_queries,
        recall_sample=r.recall_sample,
        ivf_nlist=r.ivf_nlist,
        ivf_nprobe=r.ivf_nprobe,
        hnsw_m=r.hnsw_m,
        hnsw_ef=r.hnsw_ef,
    )


def _mine(config: PipelineConfig, out: Path, up: Mapping[str, Path]) -> StageOutput:
    m = config.mine
    return mining.mine_clusters(
        up["retrieve"],
        up["embed"] / SHARDS_DIR,
        out,
        strategy=m.strategy,
        params=MineParams(k=m.k, m=m.m, seed=m.seed, shuffle=m.shuffle, margin=m.margin),
        compare=m.compare_strategies,
    )


RETRIEVE = register(
    StageDef(
        name="retrieve",
        code_version=code_version(retrieval, shards),
        sections=("retrieve",),
        upstream=lambda _config: ("ingest", "embed"),
        inputs=lambda config, _up: {"top_r": str(config.top_r)},
        compute=_retrieve,
    )
)

MINE = register(
    StageDef(
        name="mine",
        code_version=code_version(mining, shards),
        sections=("mine",),
        upstream=lambda _config: ("embed", "retrieve"),
        compute=_mine,
    )
)
