"""The pipeline's stages: each one embedder function made a cached, tracked Prefect task.

A stage's name is defined here and nowhere else; `STAGE_NAMES` lists them in definition
order, which is run order. How they connect is `flows/pipeline.py`'s `method`.
"""

from __future__ import annotations

from embedder.datasets.ingest import ingest as ingest_tables
from embedder.datasets.ingest import source_inputs
from embedder.embed import embed_pairs
from embedder.evaluate import evaluate_model
from embedder.generator import pretrain_generator
from embedder.mining import mine_clusters
from embedder.retrieval import retrieve_candidates
from embedder.training.finetune import finetune_adapter
from embedder.world import build_world
from tasks.contract import Stage

world = Stage("world", build_world)
ingest = Stage("ingest", ingest_tables, inputs=source_inputs)
pretrain = Stage("pretrain", pretrain_generator)
embed = Stage("embed", embed_pairs, resumable=True)
retrieve = Stage("retrieve", retrieve_candidates)
mine = Stage("mine", mine_clusters)
finetune = Stage("finetune", finetune_adapter, resumable=True)
evaluate = Stage("evaluate", evaluate_model, resumable=True)

STAGE_NAMES: tuple[str, ...] = tuple(
    v.name for v in list(globals().values()) if isinstance(v, Stage)
)
