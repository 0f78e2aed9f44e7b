"""The pipeline's stages: each one embedder function made a cached, tracked Prefect task.

A stage's name is defined here and nowhere else; `STAGE_NAMES` lists them in definition
order, which is run order. How they connect is `flows/pipeline.py`'s `method`.
"""

from __future__ import annotations

import math
from typing import Any

from embedder import compositional
from embedder.config import EvaluateConfig, ModelConfig
from embedder.datasets.ingest import ingest as ingest_tables
from embedder.datasets.ingest import source_inputs
from embedder.embed import embed_pairs
from embedder.evaluate import AGGREGATES, evaluate_model
from embedder.generator import pretrain_generator
from embedder.mining import mine_clusters
from embedder.model.identity import adapter_identity, model_identity, workdir_cache
from embedder.outputs import Clusters, EvalReport, Tables
from embedder.retrieval import retrieve_candidates
from embedder.training.finetune import finetune_adapter
from embedder.world import build_world
from tasks.stage import DatasetRef, Stage


def ingested_tables(tables: Tables) -> list[DatasetRef]:
    rows = tables.rows
    refs = [
        DatasetRef("pairs", tables.pairs, tables.fingerprint, rows.get("pairs", 0), "train"),
        DatasetRef("eval", tables.eval, tables.fingerprint, rows.get("eval", 0), "eval"),
    ]
    if tables.compositional_images is not None:
        count = rows.get("compositional", 0)
        refs.append(
            DatasetRef("compositional", tables.compositional, tables.fingerprint, count, "eval")
        )
    return refs


def scores(report: EvalReport) -> dict[str, float]:
    """P@1 overall, IND, OOD and per meta-task as MMEB's reference computes it (`p1.*`, argmax:
    a tie with the correct candidate counts), strict P@1 beside it (`p1_strict.*`), and the
    overall tie rate (`tie_rate.overall`), so a collapsed model's high `p1` shows for what it
    is, and where the eval set names candidate categories P@1 among same-category candidates
    and the category-level accuracy overall (`p1_same_category.overall`,
    `category_accuracy.overall`), and with a compositional table SugarCrepe's and
    SugarCrepe++'s means (`sugarcrepe.itt.mean`, `sugarcrepe_pp.itt.mean`,
    `sugarcrepe_pp.tot.mean`, strict views beside). Conventions: embedder.evaluate,
    embedder.compositional."""
    wanted = [f"{name}.{k}" for name in ("p1", "p1_strict") for k in AGGREGATES]
    beside = ["tie_rate.overall", "p1_same_category.overall", "category_accuracy.overall"]
    beside += [
        f"{bench}.{s}{view}.mean"
        for bench, found in compositional.SCORES.items()
        for s in found
        for view in ("", "_strict")
    ]
    return {k: report.metrics[k] for k in [*wanted, *beside] if k in report.metrics}


def planted_fn_rate(clusters: Clusters) -> dict[str, float]:
    """Share of planted false-negative pairs put in one cluster (miniature world only)."""
    rate = clusters.metrics.get(f"planted_fn_rate.{clusters.strategy}")
    return {} if rate is None or math.isnan(rate) else {"planted_fn_rate": rate}


def model_inputs(model: ModelConfig, **_: Any) -> dict[str, str]:
    """The backbone's identity in the fingerprint of every stage that runs it: a local
    folder's content, a hub model's resolved commit (embedder.model.identity). The tiny
    generator enters as the pretrain stage's fingerprint instead. File digests are remembered
    in the workdir, so an unchanged multi-GB folder costs a `stat` per file, not a read."""
    if model.backbone == "tiny":
        return {}
    return model_identity(model.backbone, model.revision, workdir_cache()).as_inputs()


def evaluate_inputs(model: ModelConfig, cfg: EvaluateConfig, **_: Any) -> dict[str, str]:
    """`model_inputs`, and the identity of the released adapter a table row names
    (`evaluate.adapter`, filled in from `table.rows[].adapter`) the same way: a folder's
    content (`adapter:content`), a hub repo's resolved commit (`adapter:commit`). A
    fine-tuned adapter enters as the finetune stage's fingerprint instead."""
    inputs = model_inputs(model)
    if cfg.adapter is not None:
        found = adapter_identity(cfg.adapter, cfg.adapter_revision, workdir_cache())
        inputs.update(found.as_inputs("adapter"))
    return inputs


world = Stage("world", build_world)
ingest = Stage("ingest", ingest_tables, inputs=source_inputs, datasets=ingested_tables)
pretrain = Stage("pretrain", pretrain_generator)
embed = Stage("embed", embed_pairs, resumable=True, fan_out=True, inputs=model_inputs)
retrieve = Stage("retrieve", retrieve_candidates)
mine = Stage("mine", mine_clusters, headline=planted_fn_rate)
finetune = Stage("finetune", finetune_adapter, resumable=True, inputs=model_inputs)
evaluate = Stage(
    "evaluate",
    evaluate_model,
    resumable=True,
    headline=scores,
    fan_out=True,
    inputs=evaluate_inputs,
)

STAGE_NAMES: tuple[str, ...] = tuple(
    v.name for v in list(globals().values()) if isinstance(v, Stage)
)
