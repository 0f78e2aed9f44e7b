"""Fine-tuning on clusters: batches of whole clusters, checkpoints and an exact resume."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from embedder.config import EmbedConfig, FinetuneConfig, ModelConfig, PretrainConfig
from embedder.datasets import schema
from embedder.embed import open_backbone
from embedder.outputs import Clusters, Generator, Tables
from embedder.training.finetune import (
    CHECKPOINTS,
    TrainingDataError,
    TrainPair,
    finetune_adapter,
    train,
    training_clusters,
)

EMBED = EmbedConfig(num_workers=0, image_side=64)
FAST = FinetuneConfig(
    steps=4, warmup=1, lr=1e-2, pairs_per_batch=6, chunk_size=4, checkpoint_every=2, dora=False
)


def make_clusters(
    tables: Tables, folder: Path, size: int = 3, strategy: str = "in_batch"
) -> Clusters:
    """Consecutive pairs of each subset, `size` to a cluster."""
    pairs = pq.read_table(tables.pairs, columns=["id", "subset"]).to_pylist()
    rows: dict[str, list] = {k: [] for k in schema.CLUSTERS_SCHEMA.names}
    cluster = 0
    for subset in sorted({p["subset"] for p in pairs}):
        ids = [p["id"] for p in pairs if p["subset"] == subset]
        for start in range(0, len(ids) - size + 1, size):
            for pos, pid in enumerate(ids[start : start + size]):
                rows["cluster"].append(cluster)
                rows["subset"].append(subset)
                rows["phase"].append(1)
                rows["position"].append(pos)
                rows["id"].append(pid)
                rows["role"].append("anchor" if pos == 0 else "negative")
            cluster += 1
    out = Clusters(folder=folder, strategy=strategy)
    folder.mkdir(parents=True, exist_ok=True)
    schema.write_table(pa.table(rows), out.clusters, schema.CLUSTERS_SCHEMA)
    return out


def _weights(peft_model: object) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(
    tables: Tables, generator: Generator, tmp_path: Path
) -> None:
    clusters = make_clusters(tables, tmp_path / "mine")
    assert tables.pairs_images is not None

    def run(out: Path, stop_after: int | None = None):  # type: ignore[no-untyped-def]
        backbone = open_backbone(ModelConfig(), generator)
        groups = training_clusters(clusters, tables, "hierarchical", "<|image_pad|>", EMBED)
        return train(
            backbone,
            groups,
            FAST,
            EMBED,
            tables.pairs_images,
            out,
            stop_after=stop_after,
            progress=False,
        )

    whole, whole_result = run(tmp_path / "whole")
    first, _ = run(tmp_path / "resumed", stop_after=2)
    assert (tmp_path / "resumed" / CHECKPOINTS / "step-000002").is_dir()
    halfway = _weights(first)
    resumed, result = run(tmp_path / "resumed")
    assert result.resumed_from == 2
    final, expected = _weights(resumed), _weights(whole)
    assert final.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(final[key], expected[key], rtol=0, atol=1e-6)
    assert any(not torch.equal(halfway[k], expected[k]) for k in expected), "steps 3-4 trained"
    assert result.history.steps == [1, 2, 3, 4]
    assert result.history.loss == pytest.approx(whole_result.history.loss, abs=1e-6)


def test_pairs_of_one_query_are_not_each_others_negatives_in_training(
    tables: Tables, generator: Generator, tmp_path: Path
) -> None:
    """Every pair of the batch shares one query (rendered content): each target is a positive
    of that query, so nothing is left to contrast and the first step's loss is exactly 0."""
    clusters = make_clusters(tables, tmp_path / "mine")
    assert tables.pairs_images is not None
    groups = training_clusters(clusters, tables, "hierarchical", "<|image_pad|>", EMBED)
    one = groups[0][0].query
    same_query = [[TrainPair(one, p.target) for p in c] for c in groups]
    assert len({p.target.key for c in same_query[:2] for p in c}) > 1, "distinct positives"
    backbone = open_backbone(ModelConfig(), generator)
    cfg = FAST.model_copy(update={"steps": 1})
    _, result = train(
        backbone, same_query, cfg, EMBED, tables.pairs_images, tmp_path / "ft", progress=False
    )
    assert result.history.loss[0] == pytest.approx(0.0, abs=1e-5)


def test_finetune_stage_saves_a_safetensors_adapter_and_its_history(
    tables: Tables, generator: Generator, tmp_path: Path
) -> None:
    clusters = make_clusters(tables, tmp_path / "mine")
    out = finetune_adapter(
        ModelConfig(),
        EMBED,
        FAST.model_copy(update={"steps": 2}),
        tables,
        clusters,
        generator,
        tmp_path / "ft",
    )
    assert (out.adapter / "adapter_model.safetensors").is_file()
    assert (out.folder / "loss.png").is_file()
    assert not (out.folder / CHECKPOINTS).exists()
    assert out.rows == {"clusters": len(pq.read_table(clusters.clusters)) // 3, "steps": 2}
    assert out.metrics["pairs_per_step"] == 2 * 3
    layers = PretrainConfig().layers  # the tiny generator's
    assert out.metrics["lora_modules.language_model"] == layers * 7
    assert out.metrics["lora_modules.vision"] == 0 and out.metrics["lora_modules.other"] == 0
    assert sorted(p.name for p in out.adapter.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "gen2embed.json",  # how to prompt it (embedder.inference)
    ]
    assert out.template == "hierarchical" and out.info["strategy"] == "in_batch"
    from embedder.inference import TrainedWith

    trained = TrainedWith.read(out.adapter)
    assert trained is not None and trained.template == "hierarchical"


def test_too_few_clusters_for_one_step_is_a_clear_error(
    tables: Tables, generator: Generator, tmp_path: Path
) -> None:
    clusters = make_clusters(tables, tmp_path / "mine", size=3)
    n = pq.read_table(clusters.clusters).num_rows // 3
    cfg = FAST.model_copy(update={"pairs_per_batch": 3 * n + 1})
    with pytest.raises(
        TrainingDataError,
        match=rf"{n} clusters of {3 * n} pairs in all cannot fill one step of {3 * n + 1} pairs "
        rf"\(finetune.pairs_per_batch={3 * n + 1} x 1 ranks\)",
    ):
        finetune_adapter(ModelConfig(), EMBED, cfg, tables, clusters, generator, tmp_path / "ft")


def test_a_cluster_larger_than_a_device_s_budget_says_what_to_raise(
    tables: Tables, generator: Generator, tmp_path: Path
) -> None:
    clusters = make_clusters(tables, tmp_path / "mine", size=3)
    cfg = FAST.model_copy(update={"pairs_per_batch": 2})
    with pytest.raises(
        TrainingDataError,
        match=r"largest cluster holds 3 pairs.*raise finetune.pairs_per_batch or lower mine.k",
    ):
        finetune_adapter(ModelConfig(), EMBED, cfg, tables, clusters, generator, tmp_path / "ft")
