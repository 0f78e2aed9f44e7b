"""What each stage hands the next: a small typed output naming the files in its folder.

A stage function writes into the folder it is given and returns one of these. The stage
machinery (tasks/) records it in the folder's manifest when it publishes, moves `folder` to
the published location, and rebuilds it from the manifest on a cache hit, so a downstream
stage only ever sees typed fields and file names, never another stage's manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    # Facts for the manifest and the run summary (backend used, printed summary lines, ...).
    info: dict[str, Any] = {}

    def own_fields(self) -> dict[str, Any]:
        """The stage-specific fields, as JSON (what the manifest records as `output`)."""
        return self.model_dump(mode="json", exclude=set(COMMON_FIELDS))


class World(StageOutput):
    """The miniature world in MMEB's on-disk layout (stage `world`)."""

    @property
    def train_dir(self) -> Path:
        return self.folder / "train"

    @property
    def train_images(self) -> Path:
        return self.folder / "train_images"

    @property
    def eval_dir(self) -> Path:
        return self.folder / "eval"

    @property
    def eval_images(self) -> Path:
        return self.folder / "eval_images"


class Tables(StageOutput):
    """Validated training pairs and eval queries (stage `ingest`); schemas in
    embedder.datasets.schema. Image paths in the tables are relative to the images roots."""

    pairs_images: Path | None = None
    eval_images: Path | None = None

    @property
    def pairs(self) -> Path:
        return self.folder / "pairs.parquet"

    @property
    def eval(self) -> Path:
        return self.folder / "eval.parquet"

    @property
    def rejects(self) -> Path:
        return self.folder / "rejects.parquet"


class Generator(StageOutput):
    """The pretrained tiny generator (stage `pretrain`): a folder `load_backbone` reads."""

    @property
    def model_dir(self) -> Path:
        return self.folder / "model"


class Embeddings(StageOutput):
    """Zero-shot embeddings of the training pairs (stage `embed`)."""

    @property
    def shards(self) -> Path:
        """Parquet shards of (key, vector), one row per distinct rendered input."""
        return self.folder / "shards"

    @property
    def pair_keys(self) -> Path:
        """Every training pair with the keys of its query and positive (PAIR_KEYS_SCHEMA)."""
        return self.folder / "pair_keys.parquet"


class ZeroShotReport(StageOutput):
    """Precision@1 of the prompt templates on the eval set (stage `zeroshot`)."""

    @property
    def report(self) -> Path:
        return self.folder / "report.json"


class Candidates(StageOutput):
    """Each distinct training query's top-R distinct positives (stage `retrieve`)."""

    @property
    def pair_rows(self) -> Path:
        """Every training pair with its distinct query and positive (POOL_ROWS_SCHEMA)."""
        return self.folder / "rows.parquet"

    @property
    def queries(self) -> Path:
        return self.folder / "queries.parquet"

    @property
    def positives(self) -> Path:
        return self.folder / "positives.parquet"

    @property
    def candidates(self) -> Path:
        return self.folder / "candidates.parquet"


class Clusters(StageOutput):
    """Hard-negative clusters for training (stage `mine`)."""

    strategy: str = "saha"

    @property
    def clusters(self) -> Path:
        return self.folder / "clusters.parquet"

    @property
    def diagnostics(self) -> Path:
        return self.folder / "diagnostics.json"
