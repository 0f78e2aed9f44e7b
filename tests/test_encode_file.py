"""`gen2embed encode`: a file of texts and images -> a Parquet file of vectors (issue 16)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedder.config import EmbedConfig
from embedder.encode_file import EncodeInputError, encode_file
from embedder.inference import Embedder
from embedder.outputs import Generator

SETTINGS = EmbedConfig(num_workers=0, image_mode="fixed", image_side=64)


def _inputs(folder: Path, world_dir: Path) -> tuple[list[dict], Path]:
    images = folder / "images"
    images.mkdir(parents=True)
    for i, src in enumerate(sorted((world_dir / "eval_images").rglob("*.png"))[:3]):
        shutil.copy(src, images / f"{i}.png")
    rows = [
        {"id": "a", "text": "a red apple"},
        {"id": "b", "image": "0.png"},
        {"id": "c", "text": "what is this?", "image": "1.png", "instruction": "Answer"},
        {"id": "d", "text": "mentions <|image_pad|> as text"},
        {"id": "e", "image": "2.png", "text": ""},
    ]
    return rows, images


def _expected(model: Embedder, rows: list[dict], images: Path) -> np.ndarray:
    return np.concatenate(
        [
            model.encode(
                [r.get("text", "")],
                [str(images / r["image"]) if r.get("image") else None],
                instruction=r.get("instruction"),
            )
            for r in rows
        ]
    )


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_file_encodes_to_the_api_s_vectors_in_input_order(
    generator: Generator, world_dir: Path, tmp_path: Path, kind: str
) -> None:
    rows, images = _inputs(tmp_path, world_dir)
    source = tmp_path / f"in.{kind}"
    if kind == "jsonl":
        source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        cols = ("id", "text", "image", "instruction")
        pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in cols}), source)
    model = Embedder.load(generator.model_dir, settings=SETTINGS)
    out = tmp_path / "out.parquet"
    assert encode_file(model, source, out, images_root=images, progress=False) == {
        "rows": 5,
        "skipped": 0,
    }
    table = pq.read_table(out)
    assert table["id"].to_pylist() == ["a", "b", "c", "d", "e"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), model.dimension)
    got = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, _expected(model, rows, images), atol=1e-6)
    assert not (tmp_path / "out.parquet.partial").exists()


def test_bad_rows_are_named_and_nothing_is_written_unless_skipped(
    generator: Generator, world_dir: Path, tmp_path: Path
) -> None:
    rows, images = _inputs(tmp_path, world_dir)
    (tmp_path / "outside.png").write_bytes((images / "0.png").read_bytes())
    bad = [
        {"image": "missing.png"},
        {"image": "../outside.png"},
        {"text": "caf\udcb2"},
        {"text": ""},
        {"other": 1},
    ]
    source = tmp_path / "in.jsonl"
    lines = [json.dumps(r) for r in rows[:2] + bad] + ["not json"]
    source.write_text("\n".join(lines) + "\n")
    model = Embedder.load(generator.model_dir, settings=SETTINGS)
    out = tmp_path / "out.parquet"
    with pytest.raises(EncodeInputError) as err:
        encode_file(model, source, out, images_root=images, progress=False)
    message = str(err.value)
    for line, reason in [
        (3, "not found"),
        (4, "contains '..'"),
        (5, "unpaired surrogate"),
        (6, "neither text nor image"),
        (7, "neither a `text` nor an `image` field"),
        (8, "not a JSON object"),
    ]:
        assert f"line {line}: " in message and reason in message, (line, message)
    assert not out.exists()
    counts = encode_file(model, source, out, images_root=images, on_bad_rows="skip", progress=False)
    assert counts == {"rows": 2, "skipped": 6}
    assert pq.read_table(out)["id"].to_pylist() == ["a", "b"]
    with pytest.raises(EncodeInputError, match="no images root was given"):
        encode_file(model, source, out, images_root=None, progress=False)


def test_a_killed_encode_resumes_and_ends_with_the_same_file(
    generator: Generator, world_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import embedder.model.encode as engine

    rows, images = _inputs(tmp_path, world_dir)
    rows = rows + [{"id": f"t{i}", "text": f"text number {i}"} for i in range(7)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    small = SETTINGS.model_copy(update={"batch_size": 2, "shard_size": 2})
    model = Embedder.load(generator.model_dir, settings=small)
    real_write, written, all_shards = engine.write_shard, [], []
    whole = tmp_path / "whole.parquet"
    monkeypatch.setattr(
        engine, "write_shard", lambda p, k, v: (all_shards.append(p), real_write(p, k, v))
    )
    encode_file(model, source, whole, images_root=images, progress=False)
    assert len(all_shards) > 3

    def crash_after_two(path: Path, keys: list[str], vectors: np.ndarray) -> None:
        if len(written) == 2:
            raise KeyboardInterrupt("killed")  # what a kill leaves: two shards, no output
        real_write(path, keys, vectors)
        written.append(path)

    out = tmp_path / "out.parquet"
    monkeypatch.setattr(engine, "write_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        encode_file(model, source, out, images_root=images, progress=False)
    monkeypatch.setattr(engine, "write_shard", real_write)
    assert (
        not out.exists()
        and len(list((tmp_path / "out.parquet.partial").rglob("shard-*.parquet"))) == 2
    )
    resumed = []
    monkeypatch.setattr(
        engine, "write_shard", lambda p, k, v: (resumed.append(p), real_write(p, k, v))
    )
    encode_file(model, source, out, images_root=images, progress=False)
    assert len(resumed) == len(all_shards) - 2, "the two finished shards are kept"
    assert {p.name for p in resumed}.isdisjoint({p.name for p in written})
    assert pq.read_table(out).equals(pq.read_table(whole))


def test_the_command_line_takes_an_adapter_folder_or_a_base(
    generator: Generator, world_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEN2EMBED_HOME", str(tmp_path / "w"))  # main() configures it
    from flows.cli import main
    from tests.test_inference import _adapter

    rows, images = _inputs(tmp_path, world_dir)
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    adapter = _adapter(generator, tmp_path / "adapter", "chat")
    out = tmp_path / "out.parquet"
    work = str(tmp_path / "w")
    args = ["--input", str(source), "--output", str(out), "--images", str(images)]
    assert main(["encode", str(adapter), *args, "--workdir", work]) == 0
    loaded = Embedder.load(generator.model_dir, adapter, settings=None)
    got = np.stack(pq.read_table(out)["embedding"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, _expected(loaded, rows, images), atol=1e-6)
    assert main(["encode", str(generator.model_dir), *args, "--workdir", work]) == 0
    zero_shot = np.stack(pq.read_table(out)["embedding"].to_numpy(zero_copy_only=False))
    assert not np.allclose(zero_shot, got)
    # Mistakes are one message, exit code 2.
    assert main(["encode", str(generator.model_dir), *args, "--base", "x", "--workdir", work]) == 2
    bad_out = ["--input", str(source), "--output", str(tmp_path / "o.csv")]
    assert main(["encode", str(adapter), *bad_out, "--workdir", work]) == 2


@pytest.mark.parametrize("how", ["version", "alias", "bare version registered before"])
def test_a_registered_version_encodes_like_its_adapter(
    generator: Generator,
    world_dir: Path,
    tmp_path: Path,
    how: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Registered as the pipeline registers it (tasks.registry.register_adapter: an MLflow
    Model holding the adapter, the tiny base and the evaluation's image rules), or as it was
    registered before (a bare adapter folder, the base in the version's tags); then
    `models:/NAME/1` or `@champion`."""
    from embedder.config import TableRow, load_config
    from embedder.outputs import Adapter, EvalReport
    from flows.cli import main
    from flows.environment import configure
    from tasks.registry import register_adapter
    from tasks.tracking import Tracker
    from tests.test_inference import _adapter

    rows, images = _inputs(tmp_path, world_dir)
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = _adapter(generator, tmp_path / "ft" / "adapter", "chat")
    work = tmp_path / "w"
    monkeypatch.setenv("GEN2EMBED_HOME", str(work))  # configure() and main() set it
    configure(work)
    tracker = Tracker.for_workdir(work)
    run_id = tracker.client.create_run(tracker.experiment_id).info.run_id
    tracker.log_folder(run_id, folder)
    row = TableRow(name="chat-row", template="chat", negatives="in_batch")
    if how.startswith("bare"):  # what register_adapter wrote before versions were Models
        name, version = "gen2embed-tiny-chat-row", "1"
        tracker.client.create_registered_model(name)
        uri = tracker.client.get_run(run_id).info.artifact_uri
        tags = {"base_model": "tiny", "base_revision": str(generator.model_dir)}
        tracker.client.create_model_version(name, f"{uri}/adapter", run_id=run_id, tags=tags)
        expected = Embedder.load(generator.model_dir, folder)  # the evaluation's eval rule
    else:
        adapter = Adapter(folder=tmp_path / "ft", base=str(generator.model_dir), template="chat")
        evaluation = EvalReport(folder=tmp_path, metrics={"p1.overall": 0.5})
        done = register_adapter(
            tracker, load_config("tiny"), row, adapter, evaluation, run_id, lock=tmp_path / "l"
        )
        name, version = done.name, done.version
        assert done.champion, "the first version takes the alias"
        # The version embeds with the image rules the tiny preset evaluates with.
        expected = Embedder.load(generator.model_dir, folder, settings=SETTINGS)
    uri = f"models:/{name}/{version}" if how != "alias" else f"models:/{name}@champion"
    out = tmp_path / "out.parquet"
    args = ["--input", str(source), "--output", str(out), "--images", str(images)]
    assert main(["encode", uri, *args, "--workdir", str(work)]) == 0
    got = np.stack(pq.read_table(out)["embedding"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, _expected(expected, rows, images), atol=1e-6)
    assert main(["encode", f"models:/{name}/99", *args, "--workdir", str(work)]) == 2
