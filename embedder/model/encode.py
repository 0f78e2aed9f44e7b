"""Batched embedding with a generative backbone: the last layer's hidden state at the final
token, L2-normalised (docs/method.md section 2).

What makes it fast and safe:
- identical inputs (same rendered prompt and image) are embedded once;
- batches are built from items sorted by estimated length (text + image tokens), so padding
  is small, and the result does not depend on that order (ids travel with vectors);
- images are decoded and preprocessed in DataLoader worker processes;
- `torch.inference_mode`, bf16 autocast on GPU;
- output goes to shards (key, vector) written as they finish, each by an atomic rename; a
  rerun skips finished shards and ends bit-for-bit equal to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedder.artifacts import json_text
from embedder.config import EmbedConfig
from embedder.image_files import read_image_size
from embedder.model.backbone import Backbone
from embedder.model.images import load_image
from embedder.model.shards import ShardSlice, write_shard
from embedder.progress import Progress

log = logging.getLogger("gen2embed.encode")

PLAN_FILE = "plan.json"
STATS_SUFFIX = ".stats.json"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: workers sharing a folder (ShardSlice) read only whole files."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(json_text(data))
    tmp.replace(path)


@dataclass(frozen=True)
class EmbedItem:
    """One input to embed: the rendered prompt and an image path ("" for none)."""

    text: str
    image: str = ""

    @property
    def key(self) -> str:
        """The item's identity (`item_key`): equal prompt and image path, one vector."""
        return item_key(self.text, self.image)


def item_key(text: str, image: str) -> str:
    """20 hex digits of BLAKE2b over the rendered prompt and the image path (relative to
    the images root): the key of the item's vector in the shards."""
    return hashlib.blake2b(f"{text}\x1f{image}".encode(), digest_size=10).hexdigest()


@dataclass
class EncodeStats:
    """Counts and timings of one encoding job (`encode`): items given and distinct, tokens
    (real and padded to the batch), seconds of wall clock and of model time, peak CUDA
    memory in MiB, shards planned and found finished."""

    items: int = 0
    unique: int = 0
    encoded: int = 0  # unique items encoded, over every attempt (from the per-shard stats)
    seconds: float = 0.0
    real_tokens: int = 0
    padded_tokens: int = 0
    peak_memory_mib: float = 0.0
    shards: int = 0
    resumed_shards: int = 0
    encode_seconds: float = 0.0  # model time summed over every shard, all attempts

    def tokens(self) -> tuple[int, int]:
        """(real, padded) tokens so far: a shard's share is the difference of two calls."""
        return self.real_tokens, self.padded_tokens

    def count_all_attempts(self, out_dir: Path, n_shards: int) -> None:
        """Throughput and padding over every shard, including those an earlier (crashed)
        attempt wrote, from the per-shard stats: a resumed run reports the whole job."""
        per_shard = [
            json.loads(path.read_text())
            for s in range(n_shards)
            if (path := out_dir / f"shard-{s:05d}{STATS_SUFFIX}").is_file()
        ]
        self.real_tokens = sum(x["real_tokens"] for x in per_shard)
        self.padded_tokens = sum(x["padded_tokens"] for x in per_shard)
        self.encoded = sum(x["items"] for x in per_shard)
        self.encode_seconds = sum(x["seconds"] for x in per_shard)

    def metrics(self) -> dict[str, float]:
        """The stage metrics: counts, items and real tokens per second of model time
        (wall clock when no shard was timed), padding efficiency (real / padded tokens,
        0..1), peak memory (MiB), seconds, shards and resumed shards."""
        sec = max(self.encode_seconds or self.seconds, 1e-9)
        return {
            "items": self.items,
            "unique_items": self.unique,
            "items_per_s": self.encoded / sec,
            "tokens_per_s": self.real_tokens / sec,
            "padding_efficiency": self.real_tokens / max(1, self.padded_tokens),
            "peak_memory_mib": self.peak_memory_mib,
            "seconds": self.encode_seconds or self.seconds,
            "shards": self.shards,
            "resumed_shards": self.resumed_shards,
        }


def pool_last_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of each row's last real token, whatever the padding side."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.to(torch.long) * positions).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def image_tokens(backbone: Backbone, settings: EmbedConfig, size: tuple[int, int]) -> int:
    """Tokens one image becomes, from its size (after our resize rule and the processor's)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    ip = backbone.processor.image_processor
    patch, merge = ip.patch_size, ip.merge_size
    w, h = size
    if settings.image_mode == "fixed":
        w = h = settings.image_side
    elif settings.image_mode == "eval":
        from embedder.model.images import eval_size

        w, h = eval_size(w, h)
    rh, rw = smart_resize(
        h,
        w,
        factor=patch * merge,
        min_pixels=ip.size["shortest_edge"],
        max_pixels=ip.size["longest_edge"],
    )
    return (rh // patch // merge) * (rw // patch // merge)


def _estimate_lengths(
    backbone: Backbone, items: Sequence[EmbedItem], images_root: Path, settings: EmbedConfig
) -> list[int]:
    tok = backbone.processor.tokenizer
    texts = [i.text for i in items]
    text_lengths = [len(ids) for ids in tok(texts, sanitize_control_tokens=True)["input_ids"]]
    cache: dict[str, int] = {}
    out = []
    for item, n in zip(items, text_lengths, strict=True):
        if n == 0 and not item.image:
            # Nothing to embed: its vector would be padding's, and depend on the batch.
            raise ValueError(f"embed: item {item.key} has no tokens and no image ({item.text!r})")
        if item.image:
            if settings.image_mode == "fixed":
                size = (settings.image_side, settings.image_side)
            else:
                # The size decoding will give (after EXIF orientation), pixels not converted.
                size = read_image_size(images_root, item.image)
            key = f"{size}"
            if key not in cache:
                cache[key] = image_tokens(backbone, settings, size)
            n += cache[key] - 1  # the placeholder token is replaced by the patch tokens
        out.append(n)
    return out


class ProcessedBatches(torch.utils.data.Dataset):
    """Each element is one whole batch, processed (images decoded) inside a worker."""

    def __init__(
        self,
        batches: list[list[EmbedItem]],
        processor: Any,
        images_root: Path,
        settings: EmbedConfig,
    ) -> None:
        self.batches = batches
        self.processor = processor
        self.images_root = images_root
        self.settings = settings

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return process_items(self.processor, self.batches[index], self.images_root, self.settings)


def process_items(
    processor: Any, items: Sequence[EmbedItem], images_root: Path, settings: EmbedConfig
) -> dict[str, Any]:
    """One batch as model inputs: images decoded and resized by `settings`, texts padded on
    `settings.padding_side`."""
    images = [
        load_image(images_root, i.image, settings.image_mode, settings.image_side)
        for i in items
        if i.image
    ]
    processor.tokenizer.padding_side = settings.padding_side
    # sanitize_control_tokens: special-token strings the data brought in, marked by
    # `Backbone.as_text` when the prompt was rendered, are encoded as plain text; the
    # template's own tokens (and image placeholders) as control tokens.
    inputs = processor(
        text=[i.text for i in items],
        images=images or None,
        padding=True,
        return_tensors="pt",
        sanitize_control_tokens=True,
    )
    return dict(inputs)


def embed_inputs(backbone: Backbone, inputs: dict[str, Any]) -> torch.Tensor:
    """L2-normalised last-token states of one processed batch (graph kept if grad is on)."""
    inputs = {k: v.to(backbone.device) for k, v in inputs.items()}
    on_gpu = backbone.device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
        hidden = backbone.adapter.last_hidden_state(backbone.model, inputs)
    pooled = pool_last_token(hidden, inputs["attention_mask"]).float()
    return torch.nn.functional.normalize(pooled, dim=-1)


def _identity(batch: Any) -> Any:
    return batch


def plan_shards(lengths: Sequence[int], batch_size: int, shard_size: int) -> list[list[list[int]]]:
    """Indices grouped into batches (by ascending estimated length, ties in input order) and
    batches into shards of about `shard_size` items."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    per_shard = max(1, shard_size // batch_size)
    return [batches[i : i + per_shard] for i in range(0, len(batches), per_shard)]


def encode(
    backbone: Backbone,
    items: Sequence[EmbedItem],
    images_root: Path,
    out_dir: Path,
    settings: EmbedConfig | None = None,
    on_shard: Callable[[int], None] | None = None,
    *,
    progress: bool = True,
    share: ShardSlice | None = None,
) -> EncodeStats:
    """Embed `items` into `out_dir`, one vector per distinct `EmbedItem.key`, resuming
    finished shards.

    Vectors: the last layer's hidden state at the final real token, L2-normalised, computed
    in float32 (bf16 autocast on CUDA) and stored as float32 (d = the backbone's hidden
    size). Files written in `out_dir`: `plan.json` (the shard plan; a different plan
    found there restarts the folder), `shard-NNNNN.parquet` (columns `key`: string,
    `embedding`: fixed-size list of d float32; embedder.model.shards) and
    `shard-NNNNN.stats.json` (items, real and padded tokens, seconds), each by an atomic
    rename, so a rerun skips finished shards and ends bit-for-bit equal to an
    uninterrupted run. `on_shard(i)` runs after shard i is written. `share`: compute only
    this worker's pending shards (tasks.scale), None for all of them. `progress`: show a
    progress bar (embedder.progress). Returns the job's counts and timings (seconds).

    Raises ValueError for an item with neither tokens nor image, FloatingPointError when a
    batch yields non-finite vectors, embedder.image_files.ImagePathError (a
    FileNotFoundError) or Pillow's errors for an image that cannot be read, OSError on a
    failed write (ENOSPC included), and torch's errors (out of memory) unchanged."""
    settings = settings or EmbedConfig()
    started = time.perf_counter()
    stats = EncodeStats(items=len(items))
    size = backbone.processor.image_processor.size
    model_max_pixels = size["longest_edge"]
    if settings.max_pixels is not None:
        size["longest_edge"] = settings.max_pixels
    try:
        return _encode(
            backbone,
            items,
            images_root,
            out_dir,
            settings,
            on_shard,
            stats,
            started,
            progress,
            share,
        )
    finally:
        size["longest_edge"] = model_max_pixels


def _encode(
    backbone: Backbone,
    items: Sequence[EmbedItem],
    images_root: Path,
    out_dir: Path,
    settings: EmbedConfig,
    on_shard: Callable[[int], None] | None,
    stats: EncodeStats,
    started: float,
    progress: bool,
    share: ShardSlice | None,
) -> EncodeStats:
    unique: dict[str, EmbedItem] = {}
    for item in items:
        unique.setdefault(item.key, item)
    todo = list(unique.values())
    stats.unique = len(todo)
    lengths = _estimate_lengths(backbone, todo, images_root, settings)
    shards = plan_shards(lengths, settings.batch_size, settings.shard_size)
    stats.shards = len(shards)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = {
        "settings": settings.model_dump(mode="json"),
        "keys": hashlib.sha256("".join(i.key for i in todo).encode()).hexdigest(),
        # A local model folder by name only: the path moves with the workdir, and the stage
        # folder this plan sits in is already specific to that model.
        "model": Path(backbone.source).name if Path(backbone.source).exists() else backbone.source,
        "shards": len(shards),
    }
    plan_path = out_dir / PLAN_FILE
    if plan_path.exists() and json.loads(plan_path.read_text()) != plan:
        log.warning("encode: %s holds shards of another plan; starting over", out_dir)
        for old in out_dir.glob("shard-*"):
            old.unlink()
    _write_json(plan_path, plan)

    pending = [s for s in range(len(shards)) if not (out_dir / f"shard-{s:05d}.parquet").exists()]
    stats.resumed_shards = len(shards) - len(pending)
    if share is not None:  # one of several workers: its shards only
        pending = [s for s in pending if share.owns(s)]
    model = backbone.model
    on_gpu = backbone.device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(backbone.device)
    bar = Progress(
        "embed",
        len(todo),
        unit="item",
        enabled=progress,
        initial=sum(len(b) for s in range(len(shards)) if s not in pending for b in shards[s]),
    )
    for s in pending:
        batches = [[todo[i] for i in batch] for batch in shards[s]]
        loader = torch.utils.data.DataLoader(
            ProcessedBatches(batches, backbone.processor, images_root, settings),
            batch_size=None,
            shuffle=False,
            num_workers=settings.num_workers,
            collate_fn=_identity,
        )
        keys: list[str] = []
        vectors: list[np.ndarray] = []
        shard_started, real_before, padded_before = time.perf_counter(), *stats.tokens()
        with torch.inference_mode():
            for batch_items, inputs in zip(batches, loader, strict=True):
                mask = inputs["attention_mask"]
                stats.real_tokens += int(mask.sum())
                stats.padded_tokens += mask.numel()
                inputs = {k: v.to(backbone.device) for k, v in inputs.items()}
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
                    hidden = backbone.adapter.last_hidden_state(model, inputs)
                pooled = pool_last_token(hidden, inputs["attention_mask"]).float()
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
                if not torch.isfinite(pooled).all():
                    bad = [
                        it.key
                        for it, ok in zip(batch_items, torch.isfinite(pooled).all(1), strict=True)
                        if not ok
                    ]
                    raise FloatingPointError(f"non-finite embeddings for keys {bad[:5]}")
                vectors.append(pooled.cpu().numpy().astype(settings.out_dtype))
                keys.extend(it.key for it in batch_items)
                stats.encoded += len(batch_items)
                bar.update(len(batch_items))
        real, padded = stats.tokens()
        shard_stats = {
            "items": len(keys),
            "real_tokens": real - real_before,
            "padded_tokens": padded - padded_before,
            "seconds": time.perf_counter() - shard_started,
        }
        # Stats first, then the shard: a kill in between recomputes the shard and its stats.
        _write_json(out_dir / f"shard-{s:05d}{STATS_SUFFIX}", shard_stats)
        write_shard(out_dir / f"shard-{s:05d}.parquet", keys, np.concatenate(vectors))
        if on_shard is not None:
            on_shard(s)
    bar.close()
    stats.count_all_attempts(out_dir, len(shards))
    stats.seconds = time.perf_counter() - started
    if on_gpu:
        stats.peak_memory_mib = torch.cuda.max_memory_allocated(backbone.device) / 2**20
    else:
        stats.peak_memory_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return stats
