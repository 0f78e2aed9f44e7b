"""Registered versions are MLflow Models that load, predict and serve the API's vectors, and
compete for the `champion` alias (tasks.registry, tasks.pyfunc_model; issue 16)."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import psutil
import pytest

from embedder.config import EmbedConfig, TableRow, load_config
from embedder.inference import Embedder
from embedder.outputs import Adapter, EvalReport, Generator
from tasks.pyfunc_model import ServedInputError, frame_inputs
from tasks.registry import (
    CHAMPION,
    DECISION_TAG,
    REASON_TAG,
    Registration,
    promote,
    register_adapter,
)
from tasks.tracking import Tracker

SETTINGS = EmbedConfig(num_workers=0, image_mode="fixed", image_side=64)  # tiny's evaluation
ROW = TableRow(name="saha-row", template="hierarchical", negatives="saha")


@pytest.fixture(scope="module")
def registered(
    generator: Generator, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Tracker, Registration, Path]:
    """A tiny adapter registered as the pipeline registers it; (tracker, version, adapter)."""
    from tests.test_inference import _adapter

    root = tmp_path_factory.mktemp("registry")
    folder = _adapter(generator, root / "ft" / "adapter", "hierarchical")
    tracker = Tracker.for_workdir(root / "work")
    run_id = tracker.client.create_run(tracker.experiment_id).info.run_id
    adapter = Adapter(folder=root / "ft", base=str(generator.model_dir), template="hierarchical")
    evaluation = EvalReport(
        folder=root, fingerprint="ev1", metrics={"p1.overall": 0.5}, info={"eval_inputs": "A"}
    )
    done = register_adapter(
        tracker, load_config("tiny"), ROW, adapter, evaluation, run_id, lock=root / "lock"
    )
    return tracker, done, folder


def _png(path: Path) -> bytes:
    return path.read_bytes()


def _frame(image: Path) -> pd.DataFrame:
    """One text with an instruction, one image as bytes, one by path, one text+image."""
    return pd.DataFrame(
        {
            "text": ["a red circle", None, None, "what colour?"],
            "image": [None, _png(image), None, _png(image)],
            "image_path": [None, None, str(image), None],
            "instruction": ["Find an image that matches the given caption", None, None, None],
        }
    )


def _api(embedder: Embedder, image: Path, role: str) -> np.ndarray:
    caption = "Find an image that matches the given caption\na red circle"
    return np.concatenate(
        [
            embedder.encode([caption], role=role),
            embedder.encode(images=[str(image)], role=role),
            embedder.encode(images=[str(image)], role=role),
            embedder.encode(["what colour?"], [str(image)], role=role),
        ]
    )


def test_a_registered_version_is_an_mlflow_model_with_the_api_s_vectors(
    registered: tuple[Tracker, Registration, Path],
    generator: Generator,
    world_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tracker, done, folder = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.tracking_uri)
    model = mlflow.pyfunc.load_model(done.uri)
    assert model.metadata.get_input_schema().input_names() == [
        "text",
        "image",
        "image_path",
        "instruction",
    ]
    image = sorted((world_dir / "eval_images").rglob("*.png"))[0]
    api = Embedder.load(generator.model_dir, folder, settings=SETTINGS)
    for role in ("query", "target"):
        got = model.predict(_frame(image), params={"role": role})
        assert got.dtype == np.float32 and got.shape == (4, api.dimension)
        np.testing.assert_allclose(got, _api(api, image, role), atol=1e-6)
    query, target = (
        model.predict(_frame(image).iloc[:1], params={"role": r}) for r in ("query", "target")
    )
    assert not np.allclose(query, target), "the role changes the prompt"
    # The tiny base travels inside: the model loads with the workdir's generator gone.
    version = tracker.client.get_model_version(done.name, done.version)
    files = mlflow.artifacts.download_artifacts(version.source, tracking_uri=tracker.tracking_uri)
    assert (Path(files) / "artifacts" / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (pd.DataFrame({"txt": ["a"]}), "unknown input columns ['txt']"),
        (pd.DataFrame({"text": [None, "b"]}), "row 0: no text, instruction or image"),
        (pd.DataFrame({"image": [b"not an image"]}), "row 0: image bytes are not an image"),
        (pd.DataFrame({"image": ["a.png"]}), "row 0: image is str, not an image file's bytes"),
        (
            pd.DataFrame({"image": [b"x"], "image_path": ["a.png"]}),
            "row 0: both image and image_path",
        ),
        (pd.DataFrame({"text": ["a", 3]}), "row 1: text and instruction are strings"),
    ],
)
def test_requests_the_model_cannot_embed_name_the_rows(frame: pd.DataFrame, message: str) -> None:
    with pytest.raises(ServedInputError) as err:
        frame_inputs(frame)
    assert message in str(err.value)


# (champion's score and inputs or None, the new version's score and inputs,
#  takes the alias, words of the reason)
PROMOTIONS = [
    (None, (0.241, "A"), True, "the first champion"),
    ((0.263, "A"), (0.241, "A"), False, "p1.overall 0.241 < champion v1 0.263"),
    ((0.263, "A"), (0.263, "A"), True, "p1.overall 0.263 >= champion v1 0.263"),
    ((0.263, "A"), (0.3, "A"), True, "p1.overall 0.3 >= champion v1 0.263"),
    ((0.263, "A"), (0.9, "B"), False, "other evaluation inputs (A vs B)"),
    ((0.263, "A"), (None, "A"), False, "p1.overall was not evaluated"),
    ((0.263, None), (0.1, "A"), False, "other evaluation inputs (None vs A)"),
]


@pytest.mark.parametrize(("champion", "new", "taken", "reason"), PROMOTIONS)
def test_a_version_takes_champion_only_with_a_score_at_least_the_champion_s_on_the_same_data(
    tmp_path: Path,
    champion: tuple[float, str | None] | None,
    new: tuple[float | None, str],
    taken: bool,
    reason: str,
) -> None:
    client = Tracker.for_workdir(tmp_path).client
    client.create_registered_model("m")

    def version(score: float | None, inputs: str | None) -> str:
        tags = {"champion_metric": "p1.overall"}
        if score is not None:
            tags["champion_score"] = repr(score)
        if inputs is not None:
            tags["eval_inputs"] = inputs
        return str(client.create_model_version("m", "file:///x", tags=tags).version)

    if champion is not None:
        client.set_registered_model_alias("m", CHAMPION, version(*champion))
    fresh = version(*new)
    got, why = promote(client, "m", fresh, "p1.overall", new[0], new[1])
    assert (got, reason in why) == (taken, True), why
    holder = client.get_model_version_by_alias("m", CHAMPION).version
    assert (str(holder) == fresh) == taken
    tags = client.get_model_version("m", fresh).tags
    assert tags[DECISION_TAG] == ("promoted" if taken else "not promoted")
    assert tags[REASON_TAG] == why


def test_registration_promotes_a_better_adapter_and_finds_an_old_one(
    registered: tuple[Tracker, Registration, Path], generator: Generator, tmp_path: Path
) -> None:
    """Through register_adapter: v1 (0.5) is champion; a worse adapter stays behind with the
    reason, a better one on the same evaluation inputs takes it; registering v1's adapter and
    evaluation again finds v1."""
    from tests.test_inference import _adapter

    tracker, first, folder = registered
    assert first.champion and first.version == "1"
    cfg = load_config("tiny")
    run_id = tracker.client.create_run(tracker.experiment_id).info.run_id

    def register(seed_dir: str, score: float) -> Registration:
        import torch

        torch.manual_seed(len(seed_dir))
        made = _adapter(generator, tmp_path / seed_dir / "adapter", "hierarchical")
        adapter = Adapter(folder=made.parent, base=str(generator.model_dir), fingerprint=seed_dir)
        report = EvalReport(
            folder=tmp_path,
            fingerprint=f"ev-{seed_dir}",
            metrics={"p1.overall": score},
            info={"eval_inputs": "A"},
        )
        return register_adapter(tracker, cfg, ROW, adapter, report, run_id, lock=tmp_path / "l")

    worse = register("worse", 0.25)
    assert not worse.champion and worse.reason == "p1.overall 0.25 < champion v1 0.5"
    better = register("better-one", 0.75)
    assert better.champion and better.reason == "p1.overall 0.75 >= champion v1 0.5"
    assert (
        str(tracker.client.get_model_version_by_alias(first.name, CHAMPION).version)
        == better.version
    )
    again = register_adapter(
        tracker,
        cfg,
        ROW,
        Adapter(folder=folder.parent, base=str(generator.model_dir)),
        EvalReport(folder=tmp_path, fingerprint="ev1", metrics={"p1.overall": 0.5}),
        run_id,
        lock=tmp_path / "l",
    )
    assert again.version == first.version and not again.champion


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_mlflow_models_serve_answers_with_the_api_s_vectors(
    registered: tuple[Tracker, Registration, Path],
    generator: Generator,
    world_dir: Path,
    tmp_path: Path,
) -> None:
    """`mlflow models serve -m models:/NAME/VERSION --env-manager local` on a free loopback
    port: one text and one image (base64 bytes) per request, the API's vectors back; the
    server and its workers are gone after."""
    tracker, done, folder = registered
    port = _free_port()
    bin_dir = Path(sys.executable).parent  # mlflow runs `uvicorn` from PATH
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracker.tracking_uri,
        "OMP_NUM_THREADS": "1",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    cmd = [
        str(bin_dir / "mlflow"),
        "models",
        "serve",
        "-m",
        done.uri,
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    family = psutil.Process(server.pid)
    image = sorted((world_dir / "eval_images").rglob("*.png"))[0]
    body = {
        "dataframe_split": {
            "columns": ["text", "image"],
            "data": [["a red circle", ""], [None, base64.b64encode(image.read_bytes()).decode()]],
        },
        "params": {"role": "target"},
    }
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the server did not start in 120 s"
                time.sleep(0.5)
        children = family.children(recursive=True)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                got = np.asarray(json.loads(answer.read())["predictions"], dtype=np.float32)
        except urllib.error.HTTPError as exc:
            raise AssertionError(exc.read().decode()[:2000]) from None
        api = Embedder.load(generator.model_dir, folder, settings=SETTINGS)
        expected = np.concatenate(
            [
                api.encode(["a red circle"], role="target"),
                api.encode(images=[str(image)], role="target"),
            ]
        )
        np.testing.assert_allclose(got, expected, atol=1e-6)
        # The example the model carries is a request it answers.
        version = tracker.client.get_model_version(done.name, done.version)
        files = Path(mlflow.artifacts.download_artifacts(version.source, dst_path=str(tmp_path)))
        example = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=(files / "serving_input_example.json").read_bytes(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(example, timeout=60) as answer:
            assert np.asarray(json.loads(answer.read())["predictions"]).shape == (2, api.dimension)
        bad = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"dataframe_split": {"columns": ["text"], "data": [[None]]}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(bad, timeout=60)
        assert "row 0: no text, instruction or image" in err.value.read().decode()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"orphan processes: {alive}"


def test_compare_shows_which_version_holds_champion(
    registered: tuple[Tracker, Registration, Path], tmp_path: Path
) -> None:
    from flows.compare import champions, compare_table

    tracker, first, _ = registered
    client = tracker.client
    holder = str(client.get_model_version_by_alias(first.name, CHAMPION).version)
    other = "1" if holder != "1" else "2"
    runs = []
    for version in (holder, other):
        run = client.create_run(tracker.experiment_id, run_name=f"run-v{version}")
        client.set_tag(run.info.run_id, "gen2embed.registered.saha-row", f"{first.name}/{version}")
        runs.append(client.get_run(run.info.run_id))
    table = compare_table(runs, champions(tracker, runs))
    line = next(ln for ln in table.splitlines() if ln.startswith("registered saha-row"))
    assert line.split()[2:] == [f"v{holder}", "champion", f"v{other}"]
    reason = client.get_model_version(first.name, holder).tags[REASON_TAG]
    assert f"champion of {first.name}: version {holder} ({reason})" in table


def test_an_adapter_whose_tiny_base_is_gone_says_why_it_is_not_registered(
    registered: tuple[Tracker, Registration, Path], tmp_path: Path
) -> None:
    from tasks.registry import RegistryError

    tracker, _, folder = registered
    run_id = tracker.client.create_run(tracker.experiment_id).info.run_id
    gone = Adapter(folder=folder.parent, base=str(tmp_path / "moved" / "model"))
    report = EvalReport(folder=tmp_path, fingerprint="ev9", metrics={"p1.overall": 0.9})
    with pytest.raises(RegistryError, match="tiny generator the adapter was trained on"):
        register_adapter(
            tracker, load_config("tiny"), ROW, gone, report, run_id, lock=tmp_path / "l"
        )


def test_a_rerun_of_a_bare_version_registers_a_loadable_one_and_supersedes_it(
    generator: Generator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version registered before versions were MLflow Models (the adapter folder as its
    source, no gen2embed.format tag), found again by the same adapter and evaluation."""
    from tasks.registry import FORMAT_TAG, adapter_sha256, model_name
    from tests.test_inference import _adapter

    folder = _adapter(generator, tmp_path / "ft" / "adapter", "hierarchical")
    tracker = Tracker.for_workdir(tmp_path / "work")
    client = tracker.client
    run_id = client.create_run(tracker.experiment_id).info.run_id
    tracker.log_folder(run_id, folder)
    cfg = load_config("tiny")
    name = model_name(cfg, ROW)
    client.create_registered_model(name)
    old_tags = {
        "adapter_sha256": adapter_sha256(folder),
        "evaluate_fingerprint": "ev1",
        "base_model": "tiny",
        "base_revision": str(generator.model_dir),
    }
    source = f"{client.get_run(run_id).info.artifact_uri}/adapter"
    client.create_model_version(name, source, run_id=run_id, tags=old_tags)
    adapter = Adapter(folder=folder.parent, base=str(generator.model_dir), template="hierarchical")
    report = EvalReport(folder=tmp_path, fingerprint="ev1", metrics={"p1.overall": 0.5})
    done = register_adapter(tracker, cfg, ROW, adapter, report, run_id, lock=tmp_path / "l")
    assert done.version == "2" and done.champion
    assert client.get_model_version(name, "1").tags["gen2embed.superseded_by"] == "2"
    assert FORMAT_TAG in client.get_model_version(name, "2").tags
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracker.tracking_uri)
    assert mlflow.pyfunc.load_model(done.uri).predict(pd.DataFrame({"text": ["x"]})).shape[0] == 1
    # Once loadable, the same adapter and evaluation find version 2.
    again = register_adapter(tracker, cfg, ROW, adapter, report, run_id, lock=tmp_path / "l")
    assert again.version == "2"


def test_the_adapter_digest_is_the_one_versions_have_always_been_tagged_with(
    tmp_path: Path,
) -> None:
    """Pinned: versions registered by earlier code are found again by this digest; a new
    formula would register every old adapter a second time."""
    from tasks.registry import adapter_sha256

    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.bin").write_bytes(b"\x00\x01")
    expected = "e9f3895801a7c56e195f5df569654d9b4797731d7f91cc37a8b3c0c2f0c5713e"
    assert adapter_sha256(tmp_path) == expected
