"""The pipeline's stages: each one embedder function made a cached, tracked Prefect task.

A stage's name is defined here and nowhere else; `STAGE_NAMES` lists them in definition
order, which is run order. How they connect is `flows/pipeline.py`'s `method`.
"""

from __future__ import annotations

import math

from embedder.datasets.ingest import ingest as ingest_tables
from embedder.datasets.ingest import source_inputs
from embedder.embed import embed_pairs
from embedder.evaluate import AGGREGATES, evaluate_model
from embedder.generator import pretrain_generator
from embedder.mining import mine_clusters
from embedder.outputs import Clusters, EvalReport, Tables
from embedder.retrieval import retrieve_candidates
from embedder.training.finetune import finetune_adapter
from embedder.world import build_world
from tasks.contract import DatasetRef, Stage


def ingested_tables(tables: Tables) -> list[DatasetRef]:
    rows = tables.rows
    return [
        DatasetRef("pairs", tables.pairs, tables.fingerprint, rows.get("pairs", 0), "train"),
        DatasetRef("eval", tables.eval, tables.fingerprint, rows.get("eval", 0), "eval"),
    ]


def scores(report: EvalReport) -> dict[str, float]:
    """Strict P@1 overall, IND, OOD and per meta-task."""
    return {f"p1.{k}": report.metrics[f"p1.{k}"] for k in AGGREGATES if f"p1.{k}" in report.metrics}


def planted_fn_rate(clusters: Clusters) -> dict[str, float]:
    """Share of planted false-negative pairs put in one cluster (miniature world only)."""
    rate = clusters.metrics.get(f"planted_fn_rate.{clusters.strategy}")
    return {} if rate is None or math.isnan(rate) else {"planted_fn_rate": rate}


world = Stage("world", build_world)
ingest = Stage("ingest", ingest_tables, inputs=source_inputs, datasets=ingested_tables)
pretrain = Stage("pretrain", pretrain_generator)
embed = Stage("embed", embed_pairs, resumable=True, fan_out=True)
retrieve = Stage("retrieve", retrieve_candidates)
mine = Stage("mine", mine_clusters, headline=planted_fn_rate)
finetune = Stage("finetune", finetune_adapter, resumable=True)
evaluate = Stage("evaluate", evaluate_model, resumable=True, headline=scores, fan_out=True)

STAGE_NAMES: tuple[str, ...] = tuple(
    v.name for v in list(globals().values()) if isinstance(v, Stage)
)
