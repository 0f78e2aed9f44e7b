"""What each stage hands the next: a small typed output naming the files in its folder.

A stage function writes into the folder it is given and returns one of these. The stage
machinery (tasks/) records it in the folder's manifest when it publishes, moves `folder` to
the published location, and rebuilds it from the manifest on a cache hit, so a downstream
stage only ever sees typed fields and file names, never another stage's manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict

# Fields every output has; the rest are the stage's own (recorded as the manifest's `output`).
COMMON_FIELDS = frozenset({"folder", "stage", "fingerprint", "rows", "metrics", "info"})


class StageOutput(BaseModel):
    """A published (or being written) stage folder and what the stage measured."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    folder: Path
    # Filled in by the stage machinery when it publishes or reuses the folder.
    stage: str = ""
    fingerprint: str = ""
    rows: dict[str, int] = {}
    metrics: dict[str, float] = {}
    # Facts for the manifest and the run summary (backend used, printed `summary` lines, and
    # `warnings`: what makes the results doubtful, repeated at the end of every run).
    info: dict[str, Any] = {}

    def curves(self) -> dict[str, list[tuple[int, float]]]:
        """Per-step series (name -> [(step, value)]) the tracker logs as metric histories."""
        return {}

    def tracked_folders(self) -> list[Path]:
        """Sub-folders small and useful enough to copy to the tracker (an adapter); tables,
        shards and full weights stay in the workdir, referenced by path."""
        return []

    def own_fields(self, root: Path) -> dict[str, Any]:
        """The stage-specific fields, as JSON (what the manifest records as `output`); paths
        inside `root` (the workdir) relative to it, so a moved workdir still resolves.

        Paths relative as POSIX strings; paths outside `root` stay absolute. COMMON_FIELDS
        are left out."""
        fields = self.model_dump(mode="json", exclude=set(COMMON_FIELDS))
        for name in fields:
            value = getattr(self, name)
            if isinstance(value, Path) and value.is_relative_to(root):
                fields[name] = value.relative_to(root).as_posix()
        return fields

    def resolved(self, root: Path) -> Self:
        """The output with relative path fields (as recorded) made absolute under `root`.
        A copy; absolute paths and other fields are unchanged."""
        paths = {
            name: root / value
            for name in type(self).model_fields
            if isinstance(value := getattr(self, name), Path) and not value.is_absolute()
        }
        return self.model_copy(update=paths)


def file(name: str, doc: str = "") -> Any:
    """A property naming one file (or folder) of the output: `folder / name`."""
    return property(lambda self: self.folder / name, doc=doc or name)


class World(StageOutput):
    """The miniature world in MMEB's on-disk layout (stage `world`): `train` and `eval`
    (one folder per subset with Parquet tables, subsets.json beside them) and their images
    roots `train_images`, `eval_images` (embedder.world.build_world)."""

    train_dir = file("train")
    train_images = file("train_images")
    eval_dir = file("eval")
    eval_images = file("eval_images")
    # The compositional set (absent when world.compositional_rows is 0): SugarCrepe's and
    # SugarCrepe++'s layouts, one images root for both (embedder.datasets.compositional).
    sugarcrepe_dir = file("compositional/sugarcrepe")
    sugarcrepe_pp_dir = file("compositional/sugarcrepe_pp")
    compositional_images = file("compositional/images")


class Tables(StageOutput):
    """Validated training pairs and eval queries (stage `ingest`); schemas in
    embedder.datasets.schema. Image paths in the tables are relative to the images roots."""

    pairs_images: Path | None = None
    eval_images: Path | None = None
    # The eval images root as ingest saw it (embedder.datasets.ingest.images_digest): which
    # pictures the relative paths of the eval table point at. None: not recorded.
    eval_images_digest: str | None = None
    # The compositional table's images root and its digest; None without that table.
    compositional_images: Path | None = None
    compositional_images_digest: str | None = None

    pairs = file("pairs.parquet")
    eval = file("eval.parquet")
    rejects = file("rejects.parquet")
    compositional = file(
        "compositional.parquet", "SugarCrepe / SugarCrepe++ rows (COMPOSITIONAL_SCHEMA), if any"
    )


class Generator(StageOutput):
    """The pretrained tiny generator (stage `pretrain`)."""

    model_dir = file("model", "a folder `load_backbone` reads offline")
    losses = file("loss.json", "[(step, mean loss since the last entry)]")

    def curves(self) -> dict[str, list[tuple[int, float]]]:
        """{"pretrain_loss": [(step, mean loss)]} from loss.json; {} when it is absent."""
        if not self.losses.is_file():
            return {}
        return {
            "pretrain_loss": [(int(s), float(v)) for s, v in json.loads(self.losses.read_text())]
        }


class Embeddings(StageOutput):
    """Zero-shot embeddings of the training pairs (stage `embed`): `shards/` holds
    shard-NNNNN.parquet files of (key, d unit-norm floats: float32, or float16 with
    embed.out_dtype=float16), read as one (n, d) float32 matrix by
    embedder.model.shards.load_embeddings; pair_keys.parquet has PAIR_KEYS_SCHEMA."""

    shards = file("shards", "Parquet shards of (key, vector), one per distinct rendered input")
    pair_keys = file("pair_keys.parquet", "each pair with its query and positive keys")


class Adapter(StageOutput):
    """A LoRA adapter trained on mined clusters (stage `finetune`): `base` is the backbone's
    source (hub id or folder; for `tiny`, the pretrain output's model folder), `template`
    the prompt template it was trained with; the adapter folder is peft's format plus
    gen2embed.json (embedder.inference.TrainedWith)."""

    base: str = ""
    template: str = ""

    adapter = file("adapter", "peft adapter folder (safetensors)")
    history = file("history.json", "per-step loss, lr and pairs/s")

    def tracked_folders(self) -> list[Path]:
        """The adapter folder (small: LoRA weights and config), copied to the tracker."""
        return [self.adapter]

    def curves(self) -> dict[str, list[tuple[int, float]]]:
        """train_loss, lr, pairs_per_s (pairs per second) and pairs (the step's global
        batch) by optimizer step, from history.json; {} when it is absent (pairs is absent
        from the history of adapters trained before batches were a pair budget)."""
        if not self.history.is_file():
            return {}
        h = json.loads(self.history.read_text())
        names = (("train_loss", "loss"), ("lr", "lr"), ("pairs_per_s", "pairs_per_s"))
        return {
            name: list(zip(h["steps"], h[key], strict=True))
            for name, key in (*names, ("pairs", "pairs"))
            if key in h
        }


class EvalReport(StageOutput):
    """Precision@1 on the eval set of one model and template (stage `evaluate`)."""

    template: str = ""

    report = file("report.json")


class Candidates(StageOutput):
    """Each distinct training query's top-R distinct positives (stage `retrieve`); tables
    with schemas POOL_ROWS / POOL_QUERIES / POOL_POSITIVES / CANDIDATES."""

    pair_rows = file("rows.parquet", "every training pair with its query and positive index")
    queries = file("queries.parquet")
    positives = file("positives.parquet")
    candidates = file("candidates.parquet")


class Clusters(StageOutput):
    """Hard-negative clusters for training (stage `mine`): clusters.parquet has
    CLUSTERS_SCHEMA (one row per member, anchor first); `strategy` names the mining
    strategy that made them; diagnostics.json holds every mined strategy's coverage and
    planted false-negative rate (embedder.mining.mine_clusters)."""

    strategy: str = "saha"

    clusters = file("clusters.parquet")
    diagnostics = file("diagnostics.json")
