"""Shared fixtures: a small miniature world, and one real Prefect test server per session."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from embedder.config import IngestConfig, PretrainConfig, WorldConfig
from embedder.datasets.ingest import ingest
from embedder.generator import corpus_texts
from embedder.model.backbone import build_tiny, save_backbone
from embedder.outputs import Generator, Tables
from embedder.world import build_world

# Settings Prefect reads at import time; tests must never touch a user's ~/.prefect.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "gen2embed")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)

SMALL_WORLD = {
    "train_pairs": 40,
    "eval_queries": 8,
    "eval_candidates": 6,
    "same_category_negatives": 2,
    "compositional_rows": 3,
}
SMALL_WORLD_OVERRIDES = [f"world.{k}={v}" for k, v in SMALL_WORLD.items()]
# Seconds-long model stages: enough to exercise every code path, not to learn anything.
TINY_MODEL_OVERRIDES = [
    "pretrain.steps=3",
    "pretrain.batch_size=8",
    "pretrain.eval_per_type=2",
    "embed.num_workers=0",
    "evaluate.max_queries=3",
    "finetune.steps=2",
    "finetune.pairs_per_batch=32",
    "mine.k=5",  # over the default recipe's k=15: m stays 3, so R = 2km = 30
]


# The longest files first, longest to shortest (measured: bench/RESULTS.md, suite): with two
# workers taking whole files in collection order (`--dist loadfile`), the demo-seed facts
# file starting last would add its ten minutes to the tail; started first it runs beside
# all the others. Any file not named keeps its place after these.
SLOWEST_FIRST = (
    "test_flow.py",
    "test_services.py",
    "test_recovery.py",
    "test_signals.py",
    "test_cli.py",
    "test_scale.py",
    "test_torchrun.py",
    "test_up_restart.py",
    "test_deployments.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept


def pytest_configure(config: pytest.Config) -> None:
    home = Path(config.rootpath) / ".pytest_cache" / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    os.environ["PREFECT_HOME"] = str(home)


@functools.cache
def _prefect_db_template() -> Path:
    """A Prefect database made once per test process, as `gen2embed run` makes it."""
    from flows.environment import PREFECT_DB, create_prefect_store

    home = Path(tempfile.mkdtemp(prefix="gen2embed-prefect-template-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    create_prefect_store(home)
    return home / PREFECT_DB


def with_prefect_db(workdir: Path) -> Path:
    """`workdir` with its Prefect database already made (a copy of one made once): for the
    tests whose subject is not that first setup. Making one is a Prefect migration of about
    12 s of CPU, which a dozen fresh workdirs of the suite would each pay;
    tests/test_signals.py and tests/test_cli.py test the setup itself (a kill during it, two
    first runs at once, a full disk) on fresh workdirs."""
    from flows.environment import PREFECT_DB

    target = workdir / "prefect" / PREFECT_DB
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_prefect_db_template(), target)
    return workdir


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    build_world(WorldConfig(**SMALL_WORLD), out)
    return out


@pytest.fixture(scope="session")
def generator(tmp_path_factory: pytest.TempPathFactory) -> Generator:
    """An untrained tiny generator: enough to check what goes where."""
    out = Generator(folder=tmp_path_factory.mktemp("generator"))
    save_backbone(build_tiny(corpus_texts(), PretrainConfig(), image_size=64), out.model_dir)
    return out


@pytest.fixture(scope="session")
def tables(world_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Tables:
    cfg = IngestConfig(
        source="mmeb",
        train_dir=world_dir / "train",
        train_images=world_dir / "train_images",
        eval_dir=world_dir / "eval",
        eval_images=world_dir / "eval_images",
        train_subsets=["ShapeClass", "ShapeCaps_i2t"],
        eval_subsets=["ShapeClass", "OutlineCaps_t2i"],
    )
    return ingest(cfg, None, tmp_path_factory.mktemp("ingest"))


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield
