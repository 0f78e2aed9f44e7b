"""A cache key names what it stands for (issue 15, item 3): every file or setting that
changes a stage's output moves its fingerprint, and nothing else does."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from embedder.artifacts import ArtifactStore
from embedder.config import IngestConfig, load_config
from embedder.datasets.ingest import source_inputs
from embedder.model import identity
from embedder.model.identity import DigestCache, ModelIdentityError, model_identity
from flows.pipeline import method
from tasks.selection import plan

MODEL_FILES = {
    "model.safetensors": b"weights v1",
    "config.json": b'{"model_type": "qwen2_vl"}',
    "tokenizer.json": b'{"model": {}}',
    "tokenizer_config.json": b"{}",
    "preprocessor_config.json": b'{"patch_size": 14}',
    "chat_template.jinja": b"{{ messages }}",
    "generation_config.json": b"{}",
}


def _model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in MODEL_FILES.items():
        (folder / name).write_bytes(data)
    (folder / "README.md").write_text("# a model")
    return folder


def _fingerprints(cfg_model: Path, workdir: Path, eval_dir: Path) -> dict[str, str]:
    cfg = load_config(
        "tiny",
        overrides=[
            f"model.backbone={cfg_model}",
            "ingest.source=mmeb",
            f"ingest.train_dir={eval_dir / 'train'}",
            f"ingest.train_images={eval_dir / 'img'}",
            f"ingest.eval_dir={eval_dir / 'eval'}",
            f"ingest.eval_images={eval_dir / 'img'}",
        ],
    ).with_rows(["zeroshot-hierarchical", "saha-hierarchical"])
    os.environ["GEN2EMBED_HOME"] = str(workdir)
    try:
        return {p.label: p.fingerprint for p in plan(method, cfg, ArtifactStore(workdir))}
    finally:
        del os.environ["GEN2EMBED_HOME"]


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    for sub in ("train/VOC2007", "eval/VOC2007", "img"):
        (tmp_path / sub).mkdir(parents=True)
    (tmp_path / "train/VOC2007/original-0.parquet").write_bytes(b"t")
    (tmp_path / "eval/VOC2007/test-0.parquet").write_bytes(b"e")
    (tmp_path / "img/a.png").write_bytes(b"png")
    return tmp_path


# (file changed, whether the model stages must move)
MODEL_CHANGES = [
    ("model.safetensors", True),
    ("config.json", True),
    ("tokenizer.json", True),
    ("tokenizer_config.json", True),
    ("preprocessor_config.json", True),
    ("chat_template.jinja", True),
    ("model-00002-of-00002.safetensors", True),  # a new shard
    ("README.md", False),
]


@pytest.mark.parametrize(("name", "moves"), MODEL_CHANGES)
def test_a_local_model_is_its_content(
    tmp_path: Path, sources: Path, name: str, moves: bool
) -> None:
    model = _model(tmp_path / "model")
    before = _fingerprints(model, tmp_path / "w", sources)
    # Same path, new bytes of the same length, and the old mtime put back: only content
    # (or ctime, which nothing can put back) tells them apart.
    target = model / name
    stat = target.stat() if target.exists() else None
    data = target.read_bytes() if target.exists() else b""
    target.write_bytes(data[:-1] + b"X" if data else b"new shard")
    if stat is not None:
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = _fingerprints(model, tmp_path / "w", sources)
    for stage in ("embed", "retrieve", "mine[saha-hierarchical]", "finetune[saha-hierarchical]"):
        assert (before[stage] != after[stage]) is moves, stage
    for stage in ("evaluate[zeroshot-hierarchical]", "evaluate[saha-hierarchical]"):
        assert (before[stage] != after[stage]) is moves, stage
    assert before["ingest"] == after["ingest"]


def test_an_unchanged_folder_is_not_read_again(tmp_path: Path) -> None:
    model = _model(tmp_path / "model")
    cache = tmp_path / "cache.json"
    first = DigestCache(cache)
    a = model_identity(str(model), None, first)
    assert first.hashed_bytes == sum(len(v) for v in MODEL_FILES.values())
    second = DigestCache(cache)
    assert model_identity(str(model), None, second) == a
    assert second.hashed_bytes == 0
    # A copy of the folder elsewhere is the same model.
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    assert model_identity(str(copy), None, DigestCache(None)).digest == a.digest


def test_a_hub_model_is_its_resolved_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity.resolve_hub_commit.cache_clear()
    heads = {"main": "a" * 40, "v2": "b" * 40}

    class Hub:
        def model_info(self, repo: str, revision: str | None = None) -> object:
            return type("Info", (), {"sha": heads[revision or "main"]})

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", Hub)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cache = DigestCache(None)
    main = model_identity("Qwen/Qwen2-VL-2B-Instruct", None, cache)
    assert main.revision == main.digest == "a" * 40
    assert model_identity("Qwen/Qwen2-VL-2B-Instruct", "v2", cache).digest == "b" * 40
    # A pinned commit needs no network at all.
    pinned = "c" * 40
    assert model_identity("Qwen/Qwen2-VL-2B-Instruct", pinned, cache).revision == pinned
    identity.resolve_hub_commit.cache_clear()


def test_offline_a_hub_model_resolves_in_the_local_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity.resolve_hub_commit.cache_clear()
    commit = "d" * 40
    repo = tmp_path / "hub" / "models--Qwen--Qwen2-VL-2B-Instruct"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    got = model_identity("Qwen/Qwen2-VL-2B-Instruct", None, DigestCache(None))
    assert got.revision == commit
    with pytest.raises(ModelIdentityError, match=r"set model\.revision to a 40-character"):
        model_identity("Qwen/Qwen2-VL-7B-Instruct", None, DigestCache(None))
    identity.resolve_hub_commit.cache_clear()


@pytest.mark.parametrize(
    ("backbone", "revision", "message"),
    [
        ("/no/such/folder", None, "no such folder"),
        ("./models/x", None, "no such folder"),
        ("FOLDER", "main", "has no revisions"),
    ],
)
def test_model_settings_that_cannot_apply_are_errors(
    tmp_path: Path, backbone: str, revision: str | None, message: str
) -> None:
    backbone = str(_model(tmp_path / "m")) if backbone == "FOLDER" else backbone
    with pytest.raises(ModelIdentityError, match=message):
        model_identity(backbone, revision, DigestCache(None))


# ----------------------------------------------------------------- ingest's own inputs


def _jsonl_config(tmp_path: Path) -> IngestConfig:
    (tmp_path / "img").mkdir(exist_ok=True)
    (tmp_path / "img" / "a.png").write_bytes(b"png")
    f = tmp_path / "A.jsonl"
    f.write_text('{"qry": "q", "pos_text": "p"}\n')
    return IngestConfig(source="jsonl", jsonl_files=[f], jsonl_images=tmp_path / "img")


def _edit(path: Path, data: bytes | None) -> None:
    """Rewrite (or create, or delete) a file, keeping a same-length change honest: bump the
    mtime so a same-second write is seen as the filesystem would see it a second later."""
    if data is None:
        path.unlink()
        return
    path.write_bytes(data)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


INGEST_CHANGES = [
    ("subsets.json", b'{"A": {"meta_task": "retrieval"}}'),  # the sidecar appears
    ("A.jsonl", b'{"qry": "q2", "pos_text": "p"}\n'),
    ("img/a.png", b"png2"),  # an image replaced in place
    ("img/b.png", b"new"),  # a new image
    ("img/a.png", None),  # an image removed
]


@pytest.mark.parametrize(("name", "data"), INGEST_CHANGES)
def test_every_ingest_source_file_is_in_its_fingerprint(
    tmp_path: Path, name: str, data: bytes | None
) -> None:
    cfg = _jsonl_config(tmp_path)
    (tmp_path / "subsets.json").write_text(json.dumps({"A": {"meta_task": "vqa"}}))
    if name == "subsets.json":  # a sidecar relabelling the subset's meta-task
        before = source_inputs(cfg)
        _edit(tmp_path / "subsets.json", data)
    else:
        before = source_inputs(cfg)
        _edit(tmp_path / name, data)
    assert source_inputs(cfg) != before
    assert source_inputs(cfg) == source_inputs(cfg)


def test_an_images_root_with_a_symlink_loop_and_dot_files_is_fingerprinted(
    tmp_path: Path,
) -> None:
    from embedder.datasets.ingest import images_digest

    root = tmp_path / "img"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(b"1")
    (root / "a" / "up").symlink_to(root)  # a link back up the tree
    (root / ".hidden.png").write_bytes(b"h")  # ingest accepts it, so it counts
    before = images_digest(root)
    _edit(root / ".hidden.png", b"h2")
    assert images_digest(root) != before
    middle = images_digest(root)
    (root / "._x.png").write_bytes(b"macOS litter")  # ingest refuses it: not an input
    assert images_digest(root) == middle


def test_new_bytes_under_an_old_mtime_are_seen(tmp_path: Path) -> None:
    """`cp -p`, `rsync -a`, `tar x`: same size, the old mtime put back on new bytes."""
    cfg = _jsonl_config(tmp_path)
    image = tmp_path / "img" / "a.png"
    before = source_inputs(cfg)
    st = image.stat()
    image.write_bytes(b"PNG")  # same length, other bytes
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert source_inputs(cfg) != before
