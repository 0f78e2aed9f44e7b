from pathlib import Path

import pytest

from embedder.artifacts import (
    MANIFEST,
    ArtifactStore,
    code_version,
    fingerprint,
    import_closure,
    resolve_workdir,
)
from embedder.outputs import StageOutput


def _publish(store: ArtifactStore, fp: str, payload: bytes = b"x" * 100) -> None:
    partial = store.open_partial("demo", fp)
    (partial / "table.bin").write_bytes(payload)
    (partial / "sub").mkdir(exist_ok=True)
    (partial / "sub" / "part.txt").write_text("hello")
    store.publish(
        "demo",
        fp,
        code_version="1",
        config={"a": 1},
        inputs={},
        output=StageOutput(folder=partial, rows={"t": 1}),
    )


def test_fingerprint_is_stable_and_sensitive() -> None:
    base = fingerprint("s", {"a": 1, "b": [1, 2]}, {"up": "f"}, "v1")
    assert base == fingerprint("s", {"b": [1, 2], "a": 1}, {"up": "f"}, "v1")
    assert base != fingerprint("s", {"a": 2, "b": [1, 2]}, {"up": "f"}, "v1")
    assert base != fingerprint("s", {"a": 1, "b": [1, 2]}, {"up": "g"}, "v1")
    assert base != fingerprint("s", {"a": 1, "b": [1, 2]}, {"up": "f"}, "v2")
    assert base != fingerprint("t", {"a": 1, "b": [1, 2]}, {"up": "f"}, "v1")


def test_workdir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEN2EMBED_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_workdir() == tmp_path / "data"
    monkeypatch.setenv("GEN2EMBED_HOME", str(tmp_path / "env"))
    assert resolve_workdir() == tmp_path / "env"
    assert resolve_workdir(tmp_path / "flag") == tmp_path / "flag"


def test_crash_before_publish_leaves_no_result(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    partial = store.open_partial("demo", "fp1")
    (partial / "table.bin").write_bytes(b"half written")
    # ... the process dies here, before publish().
    assert not store.path("demo", "fp1").exists()
    assert not (partial / MANIFEST).exists()
    assert store.load("demo", "fp1") is None
    assert "does not exist" in store.verify("demo", "fp1")[0]


def test_publish_then_verify(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    _publish(store, "fp1")
    assert not store.partial_path("demo", "fp1").exists()
    manifest = store.load("demo", "fp1")
    assert manifest is not None
    assert set(manifest.files) == {"table.bin", "sub/part.txt"}
    assert manifest.files["table.bin"]["size"] == 100
    assert manifest.rows == {"t": 1}


@pytest.mark.parametrize("damage", ["delete", "truncate", "corrupt", "manifest"])
def test_damaged_folder_fails_verification_and_is_replaced(tmp_path: Path, damage: str) -> None:
    store = ArtifactStore(tmp_path)
    _publish(store, "fp1")
    folder = store.path("demo", "fp1")
    if damage == "delete":
        (folder / "sub" / "part.txt").unlink()
    elif damage == "truncate":
        (folder / "table.bin").write_bytes(b"x" * 10)
    elif damage == "corrupt":
        (folder / "table.bin").write_bytes(b"y" * 100)  # same size, other content
    else:
        (folder / MANIFEST).unlink()
    assert store.verify("demo", "fp1")
    assert store.load("demo", "fp1") is None
    # Recomputing publishes over the damaged folder.
    _publish(store, "fp1")
    assert store.verify("demo", "fp1") == []
    assert [p.name for p in (tmp_path / "artifacts" / "demo").iterdir()] == ["fp1"]


def test_partial_is_kept_for_resume_unless_fresh(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    partial = store.open_partial("demo", "fp1")
    (partial / "shard-0").write_text("done")
    (partial / MANIFEST).write_text("{}")  # stale manifest from a crash mid-publish
    again = store.open_partial("demo", "fp1")
    assert (again / "shard-0").exists()
    assert not (again / MANIFEST).exists()
    fresh = store.open_partial("demo", "fp1", fresh=True)
    assert list(fresh.iterdir()) == []


def test_lock_serialises_writers_of_one_folder(tmp_path: Path) -> None:
    import threading
    import time

    store = ArtifactStore(tmp_path)
    order: list[str] = []
    holding = threading.Event()

    def first() -> None:
        with store.lock("demo", "fp1"):
            holding.set()
            time.sleep(0.3)
            order.append("first done")

    t = threading.Thread(target=first)
    t.start()
    holding.wait()
    with store.lock("demo", "fp1"):
        order.append("second in")
    t.join()
    assert order == ["first done", "second in"]
    with store.lock("demo", "other"):  # other folders are not blocked
        pass


def test_code_version_follows_the_import_closure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Editing any module a stage imports, however indirectly (inside a function too),
    changes its code version; editing an unrelated module does not."""
    pkg = tmp_path / "toypkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "stage.py").write_text(
        "from toypkg.sub import helper\n\ndef run():\n    return helper.VALUE\n"
    )
    (pkg / "sub" / "helper.py").write_text("def _late():\n    import toypkg.deep\nVALUE = 1\n")
    (pkg / "deep.py").write_text("X = 1\n")
    (pkg / "unrelated.py").write_text("Y = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    stage = importlib.import_module("toypkg.stage")
    assert set(import_closure("toypkg.stage")) == {
        "toypkg",
        "toypkg.stage",
        "toypkg.sub",
        "toypkg.sub.helper",
        "toypkg.deep",
    }
    before = code_version(stage.run)
    (pkg / "unrelated.py").write_text("Y = 2\n")
    assert code_version(stage.run) == before
    (pkg / "deep.py").write_text("X = 2\n")
    assert code_version(stage.run) != before


def test_stage_code_versions_cover_the_modules_they_run() -> None:
    """The embed stage reads and writes shards through embedder.model.shards (a module a
    hand-kept list once left out), and nothing of the mining stage's."""
    from embedder.embed import embed_pairs

    closure = import_closure(embed_pairs.__module__)
    assert {"embedder.model.shards", "embedder.model.encode", "embedder.model.prompts"} <= set(
        closure
    )
    assert "embedder.mining" not in closure


def test_leftovers_of_a_killed_publish_are_never_published(tmp_path: Path) -> None:
    """Killed between writing manifest.json.tmp and the rename, or between retiring the old
    folder and renaming the new one (issue 8.2): the next attempt publishes a valid folder and
    no retired folder stays behind."""
    store = ArtifactStore(tmp_path)
    _publish(store, "fp1")
    partial = store.open_partial("demo", "fp1")
    (partial / "table.bin").write_bytes(b"y" * 100)
    (partial / "manifest.json.tmp").write_text('{"half": ')
    retired = store.path("demo", "fp1").with_name("fp1.retired-123-456")
    store.path("demo", "fp1").rename(retired)
    partial = store.open_partial("demo", "fp1")
    _publish(store, "fp1")
    assert store.verify("demo", "fp1") == []
    manifest = store.load("demo", "fp1")
    assert manifest is not None and "manifest.json.tmp" not in manifest.files
    assert [p.name for p in (tmp_path / "artifacts" / "demo").iterdir() if p.is_dir()] == ["fp1"]


def test_a_manifest_entry_without_size_means_recompute(tmp_path: Path) -> None:
    """A manifest that cannot be trusted makes the folder invalid; it never crashes (8.3)."""
    import json

    store = ArtifactStore(tmp_path)
    _publish(store, "fp1")
    path = store.path("demo", "fp1") / MANIFEST
    data = json.loads(path.read_text())
    del data["files"]["table.bin"]["size"]
    path.write_text(json.dumps(data))
    assert store.verify("demo", "fp1") == [
        "table.bin: manifest entry without a size ({'sha256': '"
        + data["files"]["table.bin"]["sha256"]
        + "'})"
    ]
    path.write_text(json.dumps({**data, "files": ["table.bin"]}))
    assert "unreadable" in store.verify("demo", "fp1")[0]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (float("nan"), "null"),
        (float("inf"), "null"),
        (-float("inf"), "null"),
        ({"a": [1.5, float("nan")]}, '{"a": [1.5, null]}'),
        ((1, float("-inf")), "[1, null]"),
        (__import__("numpy").float32("nan"), "null"),
        (__import__("numpy").float64(0.25), "0.25"),
        (__import__("numpy").int64(3), "3"),
        (Path("/a/b"), '"/a/b"'),
    ],
)
def test_published_json_is_strict(value: object, expected: str) -> None:
    from embedder.artifacts import json_text

    assert json_text(value) == expected


def test_a_metric_without_a_value_is_left_out_of_the_manifest(tmp_path: Path) -> None:
    import json

    store = ArtifactStore(tmp_path)
    partial = store.open_partial("demo", "fp")
    (partial / "x.txt").write_text("x")
    metrics = {"rate": float("nan"), "inf": float("inf"), "ok": 0.5}
    manifest = store.publish(
        "demo",
        "fp",
        code_version="1",
        config={"nan_setting": float("nan")},
        inputs={},
        output=StageOutput(folder=partial, metrics=metrics, info={"x": float("nan")}),
    )
    assert manifest.metrics == {"ok": 0.5}
    text = (store.path("demo", "fp") / MANIFEST).read_text()
    json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
