"""A registered version served by `mlflow models serve` against the same model in process:
requests per second at 32 items a request, and what the HTTP round trip (JSON, base64 images,
MLflow's schema check) costs beside the embedding itself.

Setup: a fresh miniature world; an untrained tiny generator with a random LoRA, registered as
the pipeline registers it (tasks.registry.register_adapter: the MLflow Model with the tiny
base inside). Requests: 32 items each, half captions, half images (PNG bytes, base64 in the
JSON body), role target. Baseline, same run: the loaded pyfunc's `predict` on the same frames
in this process. Both sides check their vectors agree.

    .venv/bin/python bench/served_model.py [--requests 40] [--items 32]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from embedder.config import (
    EmbedConfig,
    FinetuneConfig,
    PretrainConfig,
    TableRow,
    WorldConfig,
    load_config,
)
from embedder.generator import corpus_texts
from embedder.inference import TRAINING_FILE, TrainedWith
from embedder.model.backbone import build_tiny, load_backbone, save_backbone
from embedder.outputs import Adapter, EvalReport
from embedder.training import adapters
from embedder.world import build_world
from tasks.registry import register_adapter
from tasks.tracking import Tracker


def _registered(root: Path) -> tuple[Tracker, str]:
    base = root / "generator" / "model"
    save_backbone(build_tiny(corpus_texts(), PretrainConfig(), image_size=64), base)
    torch.manual_seed(0)
    peft_model = adapters.attach(load_backbone(base), FinetuneConfig(lora_init="default"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    folder = root / "ft" / "adapter"
    adapters.save_adapter(peft_model, folder)
    (folder / TRAINING_FILE).write_text(TrainedWith("hierarchical", EmbedConfig(), False).to_json())
    tracker = Tracker.for_workdir(root / "work")
    run_id = tracker.client.create_run(tracker.experiment_id).info.run_id
    done = register_adapter(
        tracker,
        load_config("tiny"),
        TableRow(name="bench", template="hierarchical", negatives="saha"),
        Adapter(folder=folder.parent, base=str(base), template="hierarchical"),
        EvalReport(folder=root, fingerprint="bench", metrics={"p1.overall": 0.5}),
        run_id,
        lock=root / "lock",
    )
    return tracker, done.uri


def _frames(world: Path, requests: int, items: int) -> list[pd.DataFrame]:
    rows = []
    for f in sorted((world / "train").glob("*/original-*.parquet")):
        rows += pq.read_table(f).to_pylist()
    images = world / "train_images"
    pictures = [images / r["pos_image_path"] for r in rows if r["pos_image_path"]]
    frames = []
    for i in range(requests):
        texts = [r["qry"] for r in rows[i * items : i * items + items // 2]]
        files = pictures[i * items : i * items + items - len(texts)]
        frames.append(
            pd.DataFrame(
                {
                    "text": texts + [None] * len(files),
                    "image": [b""] * len(texts) + [p.read_bytes() for p in files],
                }
            )
        )
    return frames


def _body(frame: pd.DataFrame) -> bytes:
    data = [
        [text, base64.b64encode(image).decode()]
        for text, image in zip(frame["text"], frame["image"], strict=True)
    ]
    body = {"dataframe_split": {"columns": ["text", "image"], "data": data}}
    return json.dumps({**body, "params": {"role": "target"}}).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--items", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        world = root / "world"
        build_world(WorldConfig(train_pairs=args.requests * args.items), world)
        tracker, uri = _registered(root)
        frames = _frames(world, args.requests, args.items)
        os.environ["MLFLOW_TRACKING_URI"] = tracker.tracking_uri
        model = mlflow.pyfunc.load_model(uri)
        model.predict(frames[0], params={"role": "target"})  # warm up
        start = time.perf_counter()
        local = [model.predict(f, params={"role": "target"}) for f in frames]
        in_process = time.perf_counter() - start

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        bin_dir = Path(sys.executable).parent
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
        cmd = [str(bin_dir / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local"]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        server = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            while True:
                try:
                    urllib.request.urlopen(f"{url}/ping", timeout=2).close()
                    break
                except OSError:
                    assert server.poll() is None, "mlflow models serve exited"
                    time.sleep(0.5)

            def ask(frame: pd.DataFrame) -> np.ndarray:
                request = urllib.request.Request(
                    f"{url}/invocations",
                    data=_body(frame),
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=120) as answer:
                    return np.asarray(json.loads(answer.read())["predictions"], np.float32)

            ask(frames[0])  # warm up
            start = time.perf_counter()
            served = [ask(f) for f in frames]
            over_http = time.perf_counter() - start
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(local, served, strict=True))
    n = args.requests
    print(f"{n} requests of {args.items} items (half captions, half 64x64 PNG images)")
    print(f"in process (pyfunc predict): {n / in_process:.2f} requests/s")
    print(f"served (mlflow models serve): {n / over_http:.2f} requests/s")
    print(f"served / in process: {in_process / over_http:.3f}; max |difference| {diff:.2e}")


if __name__ == "__main__":
    main()
