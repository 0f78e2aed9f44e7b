"""Every owed GPU measurement in one run (issue 19): under 8 minutes on one H100/H200.

The Qwen2-VL-2B architecture with random bf16 weights (`gpu_embed.build_2b`: the published
configuration, no download), 448x448 images, five sections, each timed and each checking its
own result against a baseline of the same run:

- `embed`: the embed engine (`embedder.model.encode.encode`) against the naive loop
  (`naive_embed.naive_embed`) on the same items: items/s, MFU, the same vectors.
- `retrieve`: exact top-k with faiss-gpu's own path (`exact_search(device="gpu")` when its
  probe passes) against the torch one (`embedder.retrieval._torch_topk`), both against
  faiss-cpu on a sample: queries/s and the same top-k.
- `evaluate`: MMEB-shaped evaluation as the evaluate stage does it (every distinct item
  embedded once by the engine, then `embedder.evaluate.subset_scores`): 1,000 queries against
  1,000 shared label candidates (classification: the labels are embedded once), and queries
  each with their own 1,000 candidates (text answers, or images), of which a few queries are
  measured. From the seconds per query of each shape: the GPU-hours of the full 36-subset
  MMEB at 2B and 7B, against the 10-20 GPU-hours reported for the reference toolkit.
- `dask`: the fan-out of tasks/scale.py (`tasks.scale._compute_slice`, one slice of the
  shards per task) on `dask_cuda.LocalCUDACluster` (one worker per GPU), then the assembling
  pass, against one process embedding the same items.
- `finetune_step`: the paper's LoRA (DoRA, r 8, on the language model) on the architecture,
  one GradCache step (`embedder.training.contrastive.grad_cache_step`) at 256 pairs: pairs/s,
  MFU, peak memory; on a smaller batch GradCache's loss and gradients against `plain_step`'s.

MFU counts linear-layer FLOPs only, as bench/gpu_embed.py does: 2 x (vision tower linear
parameters) per image patch plus 2 x (language model linear parameters) per real token for a
forward pass, attention score terms left out, over the GPU's dense bf16 peak (989 TFLOP/s for
H100 SXM and H200). A training step counts 4 x LM parameters per token (forward and the
backward pass through the frozen weights to reach the LoRA ones; the vision tower has no
backward pass); GradCache's extra forward pass without a graph is not model work, so it is
counted in HFU (hardware FLOP utilisation) only.

MMEB-hours: hours = sum over the 36 subsets of 1,000 queries x (seconds per query of the
subset's shape) / 3600, with seconds per query = (embed seconds + scoring seconds) / queries
measured. Shapes (stated assumptions, see `MMEB_SHAPES`): classification subsets = shared
label candidates; VQA and image-to-text subsets = each query its own 1,000 text candidates;
the other retrieval and grounding subsets = each query its own 1,000 image candidates. No
overlap between the candidate lists of different queries is assumed (an upper bound: the
reference toolkit embeds each distinct candidate once per subset, and real lists overlap),
and every image is 448x448 (256 image tokens; the paper's eval rule allows up to 992 px, so
larger images cost more). 7B: the same measured times scaled by the ratio of linear-layer
FLOPs of the measured items at 7B and 2B (Qwen2-VL-7B: hidden 3584, intermediate 18944, 28
layers, 28 heads, 4 KV heads, the same vision tower with its merger projecting to 3584), i.e.
assuming the 7B model runs at the 2B model's MFU; the scoring time by the ratio of widths.

Run on a GPU box (the repo root on PYTHONPATH, or the project installed):

    python3 bench/gpu_check.py [--out bench/gpu_check.json] [--only embed,retrieve]

It prints each section's figures and wall time, writes the JSON (`--out`) and, beside it, a
block for bench/RESULTS.md (`<out>.md`, also printed). The exit status is 1 when a section
failed or a check did not hold, 0 otherwise. `--dry-run` runs every path on the CPU at toy
shapes (`gpu_embed.build_2b`'s 1-layer, 1-block sliver with a 4,096-token vocabulary, in
float32, 56x56 images, tens of items, LoRA without DoRA; faiss-gpu reported as not available,
the torch top-k run on the CPU, a `distributed.LocalCluster` worker in place of
LocalCUDACluster) in well under a minute; `make test`
runs it (tests/test_gpu_check.py), so the script works the day a GPU is lent.

Wheels for a GPU box without internet. The box keeps its own CUDA build of torch; it needs
the project's other dependencies (`pip check` and an `import embedder.evaluate` there say
which are missing; on the device box of 2026-11-26 it was transformers alone), faiss-gpu (the
`gpu` extra of pyproject.toml) and dask-cuda. On a machine with internet (add `--platform
manylinux_2_28_x86_64 --python-version 3.11 --only-binary=:all:` when its platform or Python
differs from the box's):

    pip download -d wheels -c constraints.txt transformers        # + whatever else is missing
    pip download -d wheels faiss-gpu==1.15.1 dask-cuda==26.10.0   # with their dependencies

carry `wheels/` over and, on the box:

    pip uninstall -y faiss-cpu    # faiss-gpu ships the same `faiss` module
    pip install --no-index --find-links wheels transformers faiss-gpu dask-cuda
    PYTHONPATH=. python3 bench/gpu_check.py --out gpu_check.json

dask-cuda is installed without `-c constraints.txt`: dask-cuda 26.10 requires
rapids-dask-dependency 26.10, which pins dask and distributed to 2026.7.1 (constraints.txt
has 2026.8.0), so pip moves both back; with cuda-core, cuda-pathfinder, nvidia-ml-py, bokeh <
3.10 and xyzservices that is about 16 MB of wheels beyond the project's. faiss-gpu 1.15.1 is
a 135 MB wheel and needs the CUDA 12 runtime wheels (nvidia-cuda-runtime-cu12,
nvidia-cublas-cu12, nvidia-curand-cu12: several hundred MB more). Where either cannot be
carried the run still ends and says so: faiss-gpu "not available" in the `retrieve` section
(the torch path is still measured against faiss-cpu), dask-cuda's ImportError as the `dask`
section's error. Leave OMP_NUM_THREADS unset: faiss-cpu's reference sample is sized for 16
threads (it shrinks with fewer).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import random
import resource
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _path in (str(ROOT), str(BENCH)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from gpu_embed import PEAK_BF16_DENSE, QWEN2VL_2B, build_2b, linear_params  # noqa: E402
from naive_embed import naive_embed  # noqa: E402

from embedder import world  # noqa: E402
from embedder.config import EmbedConfig, EvaluateConfig, FinetuneConfig  # noqa: E402
from embedder.datasets.catalog import MMEB_SUBSETS  # noqa: E402
from embedder.embed import ItemBuilder  # noqa: E402
from embedder.evaluate import evaluation_settings, subset_scores  # noqa: E402
from embedder.model.backbone import Backbone  # noqa: E402
from embedder.model.encode import STATS_SUFFIX, EmbedItem, encode, image_tokens  # noqa: E402
from embedder.model.shards import load_embeddings  # noqa: E402

# Qwen2-VL-7B-Instruct's published architecture: the 2B's vision tower, whose merger projects
# to the 7B's hidden size.
QWEN2VL_7B = {
    **QWEN2VL_2B,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vision": {**QWEN2VL_2B["vision"], "hidden_size": 3584},
}
DEFAULT_PEAK = 989e12  # dense bf16, H100 SXM / H200
MMEB_QUERIES = 1000  # per subset (docs/method.md section 5)
MMEB_CANDIDATES = 1000  # per query (MMEB's convention; classification: the label set)
REFERENCE_GPU_HOURS = (10.0, 20.0)  # the reference toolkit's full MMEB evaluation (issue 19)
# Which candidates each MMEB-eval subset's queries have (VLM2Vec's task definitions; the
# repo's data does not hold MMEB-eval): classification = one shared label set; VQA answers
# and image-to-text captions = text; the other retrieval and grounding subsets = images.
OWN_TEXT = {
    "OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W",
    "ScienceQA", "VizWiz", "GQA", "TextVQA", "VisualNews_i2t", "MSCOCO_i2t",
}  # fmt: skip
MMEB_SHAPES = {
    info.name: (
        "shared"
        if info.meta_task == "classification"
        else "own_text"
        if info.name in OWN_TEXT
        else "own_image"
    )
    for info in MMEB_SUBSETS.values()
}
DRY_VOCAB = 4096
SECTIONS = ("embed", "retrieve", "evaluate", "dask", "finetune_step")


@dataclass(frozen=True)
class Sizes:
    """Every size a run uses: the GPU run's (`GPU`) or the dry run's toy ones (`DRY`)."""

    side: int  # image side in pixels
    images: int  # distinct images rendered (paths beyond that are hard links to them)
    embed_items: int
    batch: int
    workers: int  # DataLoader processes of the engine
    pool: int  # retrieval: positives
    queries: int
    dim: int
    top_k: int
    cpu_queries: int  # faiss-cpu reference sample
    shared_queries: int  # evaluate: queries against one shared label set
    labels: int
    own_text_queries: int  # queries each with its own text candidates
    own_image_queries: int  # queries each with its own image candidates
    candidates: int  # per query, own-candidate shapes
    dask_items: int
    dask_tasks_per_worker: int
    ft_pairs: int  # the GradCache step
    ft_chunk: int
    ft_steps: int
    eq_pairs: int  # GradCache vs plain
    eq_chunk: int
    budget_s: float
    plan_s: dict[str, float] = field(default_factory=dict)  # expected wall time per section


GPU = Sizes(
    side=448, images=128, embed_items=1024, batch=64, workers=8,
    pool=1_000_000, queries=50_000, dim=1536, top_k=90, cpu_queries=500,
    shared_queries=1000, labels=1000, own_text_queries=5, own_image_queries=3, candidates=1000,
    dask_items=512, dask_tasks_per_worker=2,
    ft_pairs=256, ft_chunk=32, ft_steps=2, eq_pairs=32, eq_chunk=8,
    budget_s=480.0,
    plan_s={"setup": 40, "embed": 60, "retrieve": 60, "evaluate": 110, "dask": 80,
            "finetune_step": 90},
)  # fmt: skip
DRY = Sizes(
    side=56, images=8, embed_items=12, batch=4, workers=0,
    pool=2000, queries=200, dim=64, top_k=10, cpu_queries=100,
    shared_queries=6, labels=6, own_text_queries=2, own_image_queries=2, candidates=6,
    dask_items=8, dask_tasks_per_worker=2,
    ft_pairs=4, ft_chunk=2, ft_steps=1, eq_pairs=4, eq_chunk=2,
    budget_s=300.0,
    plan_s={"setup": 10, "embed": 5, "retrieve": 2, "evaluate": 5, "dask": 20,
            "finetune_step": 5},
)  # fmt: skip


# ----------------------------------------------------------------------- FLOP accounting


def vision_linear_params(arch: dict[str, Any]) -> int:
    """Weights of the Linear layers of Qwen2-VL's vision tower (patch embedding, a Conv3d,
    not counted): per block qkv, proj, fc1, fc2; the merger's two layers."""
    v = arch["vision"]
    e, mlp = v["embed_dim"], v["embed_dim"] * v["mlp_ratio"]
    merged = e * v["spatial_merge_size"] ** 2
    return v["depth"] * (4 * e * e + 2 * e * mlp) + merged * merged + merged * v["hidden_size"]


def lm_linear_params(arch: dict[str, Any]) -> int:
    """Weights of the Linear layers of the language model (LM head excluded: embedding
    pools the last hidden state): q, k, v, o and the gated MLP per layer."""
    h, heads, kv = arch["hidden_size"], arch["num_attention_heads"], arch["num_key_value_heads"]
    head_dim = h // heads
    attention = 2 * h * heads * head_dim + 2 * h * kv * head_dim
    return arch["num_hidden_layers"] * (attention + 3 * h * arch["intermediate_size"])


def sliver(arch: dict[str, Any]) -> dict[str, Any]:
    """The dry run's architecture: one layer, one vision block (`build_2b(smoke=True)`)."""
    return {**arch, "num_hidden_layers": 1, "vision": {**arch["vision"], "depth": 1}}


def forward_flops(vision_params: int, lm_params: int, patches: float, tokens: float) -> float:
    """Linear-layer FLOPs of a forward pass over `patches` image patches and `tokens` real
    language-model tokens (bench/gpu_embed.py's formula)."""
    return 2.0 * vision_params * patches + 2.0 * lm_params * tokens


def mmeb_hours(shapes: dict[str, dict[str, Any]], scale: str) -> float:
    """GPU-hours of the full MMEB from the measured shapes: sum over the 36 subsets of
    MMEB_QUERIES x seconds per query of the subset's shape, at 2B (`scale`="2b") or 7B (the
    embedding time x the shape's 7B/2B FLOP ratio, the scoring time x the width ratio)."""
    total = 0.0
    for shape in MMEB_SHAPES.values():
        s = shapes[shape]
        embed_s, score_s = s["embed_s"], s["score_s"]
        if scale == "7b":
            embed_s *= s["flops_7b"] / s["flops_2b"]
            score_s *= QWEN2VL_7B["hidden_size"] / QWEN2VL_2B["hidden_size"]
        total += MMEB_QUERIES * (embed_s + score_s) / s["queries"]
    return total / 3600


# ----------------------------------------------------------------------------- the run


@dataclass
class Context:
    """What the sections share: sizes, device, a temporary images root, the backbone."""

    sizes: Sizes
    dry_run: bool
    device: torch.device
    device_name: str
    root: Path
    peak: float
    _backbone: Backbone | None = None
    _images: list[str] = field(default_factory=list)
    _links: int = 0

    def backbone(self) -> Backbone:
        """The 2B architecture (the dry run's float32 sliver), built once."""
        if self._backbone is None:
            self._backbone = make_backbone(self.device, self.dry_run, self.sizes.side)
        return self._backbone

    def images(self) -> list[str]:
        """`sizes.images` distinct rendered scenes (paths relative to `root`)."""
        if not self._images:
            scenes = world.all_scenes()
            rng = random.Random(0)
            for i in range(self.sizes.images):
                world.render(rng.choice(scenes), self.sizes.side, i).save(self.root / f"{i}.png")
                self._images.append(f"{i}.png")
        return self._images

    def distinct_paths(self, n: int) -> list[str]:
        """`n` new image paths, hard links to the rendered images: the engine tells items
        apart by path, so each is a distinct item (decoded and embedded on its own)."""
        images = self.images()
        out = []
        for _ in range(n):
            name = f"link-{self._links}.png"
            src, dst = self.root / images[self._links % len(images)], self.root / name
            try:
                os.link(src, dst)
            except OSError:
                dst.write_bytes(src.read_bytes())
            self._links += 1
            out.append(name)
        return out

    def sync(self) -> None:
        """Wait for the GPU's queued work (timings)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def make_backbone(device: torch.device, dry_run: bool, side: int) -> Backbone:
    """`gpu_embed.build_2b` on `device`. The dry run's sliver (`smoke`) also gets a
    DRY_VOCAB-token vocabulary (the tokenizer has about 2,000; a CPU spends most of the
    build's 10 s drawing the 151,936 x 1,536 embedding in bf16), runs in float32 (bf16
    matmuls on a CPU are slow and round the naive-vs-engine comparison) and on `side` x
    `side` images."""
    if not dry_run:
        return build_2b(device)
    import gpu_embed

    full = gpu_embed.QWEN2VL_2B
    gpu_embed.QWEN2VL_2B = {**full, "vocab_size": DRY_VOCAB}
    try:
        backbone = build_2b(device, smoke=True)
    finally:
        gpu_embed.QWEN2VL_2B = full
    if len(backbone.processor.tokenizer) > DRY_VOCAB:
        raise ValueError(f"the tokenizer outgrew the dry run's {DRY_VOCAB}-token vocabulary")
    backbone.model.float()
    size = backbone.processor.image_processor.size
    size["shortest_edge"] = size["longest_edge"] = side * side
    return dataclasses.replace(backbone, dtype=torch.float32)


def builder(backbone: Backbone, strings: EmbedConfig) -> ItemBuilder:
    """How the pipeline renders items for this backbone (hierarchical template)."""
    return ItemBuilder("hierarchical", backbone.image_token(), strings, backbone.as_text)


def query_items(build: ItemBuilder, paths: list[str], n: int, seed: int) -> list[EmbedItem]:
    """`n` image queries of the miniature world (VQA, and every third a caption query), as
    bench/gpu_embed.py makes them; images drawn from `paths`, so some items repeat."""
    rng = random.Random(seed)
    scenes = world.all_scenes()
    items = []
    for i in range(n):
        s = rng.choice(scenes)
        q = world.VQA_QUERY.format(q=world.question(rng.choice(world.QUESTION_TYPES), s))
        if i % 3 == 0:
            q = world.T2I_QUERY.format(c=world.caption(s, rng.randrange(3))) + " <|image_1|>"
        items.append(build.item(q, rng.choice(paths), "query"))
    return items


def patches_per_image(backbone: Backbone, settings: EmbedConfig, side: int) -> int:
    """Vision-tower patches of one `side` x `side` image (merged tokens x merge^2)."""
    merge = backbone.processor.image_processor.merge_size
    return image_tokens(backbone, settings, (side, side)) * merge * merge


def model_params(backbone: Backbone) -> tuple[int, int]:
    """Measured Linear weights of the built model: (vision tower, language model)."""
    return (
        linear_params(backbone.model.model.visual),
        linear_params(backbone.model.model.language_model),
    )


def peak_memory_mib(ctx: Context) -> float | None:
    """Peak CUDA memory allocated since the last reset, MiB (None on the CPU)."""
    if ctx.device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(ctx.device) / 2**20


# ------------------------------------------------------------------------------ sections


def section_embed(ctx: Context) -> dict[str, Any]:
    """The embed engine against the naive loop on the same items: items/s, MFU, agreement."""
    sz, backbone = ctx.sizes, ctx.backbone()
    settings = EmbedConfig(
        batch_size=sz.batch, num_workers=sz.workers, image_side=sz.side, image_mode="fixed"
    )
    items = query_items(builder(backbone, settings), ctx.images(), sz.embed_items, seed=0)
    unique = len({i.key for i in items})
    naive_embed(backbone, items[: 2 * sz.batch], ctx.root, batch_size=sz.batch, image_side=sz.side)
    keys, naive_vecs, naive_s, naive_pad = naive_embed(
        backbone, items, ctx.root, batch_size=sz.batch, image_side=sz.side
    )
    ctx.sync()
    started = time.perf_counter()
    stats = encode(backbone, items, ctx.root, ctx.root / "embed", settings, progress=False)
    ctx.sync()
    engine_s = time.perf_counter() - started
    engine_keys, engine_vecs = load_embeddings(ctx.root / "embed")
    naive = dict(zip(keys, naive_vecs, strict=False))
    cos = [float(np.dot(naive[k], v)) for k, v in zip(engine_keys, engine_vecs, strict=True)]
    vision, lm = model_params(backbone)
    patches = patches_per_image(backbone, settings, sz.side)
    tokens = stats.real_tokens / max(1, stats.encoded)  # per distinct item, image tokens incl.
    flops_item = forward_flops(vision, lm, patches, tokens)
    min_cos = min(cos)
    return {
        "items": len(items),
        "distinct": unique,
        "batch": sz.batch,
        "workers": sz.workers,
        "tokens_per_item": tokens,
        "patches_per_image": patches,
        "linear_params": {"vision": vision, "lm": lm},
        "flops_per_item": flops_item,
        "naive": {
            "seconds": naive_s,
            "items_per_s": len(items) / naive_s,
            "mfu": len(items) * flops_item / naive_s / ctx.peak,
            "padding_efficiency": naive_pad,
        },
        "engine": {
            "seconds": engine_s,
            "items_per_s": len(items) / engine_s,
            "encoded": stats.encoded,
            "mfu": stats.encoded * flops_item / engine_s / ctx.peak,
            "padding_efficiency": stats.metrics()["padding_efficiency"],
            "peak_memory_mib": peak_memory_mib(ctx),
        },
        "speedup": naive_s / engine_s,
        "min_cosine": min_cos,
        "checks": {
            "same_keys": sorted(engine_keys) == sorted(set(keys)),
            "same_vectors": min_cos >= (0.999 if ctx.device.type == "cuda" else 0.9999),
            "dedup": stats.encoded == unique,
        },
    }


def _cpu_topk(queries: np.ndarray, pool: np.ndarray, k: int, batch: int = 1024) -> np.ndarray:
    """The dry run's stand-in for `embedder.retrieval._torch_topk`, which is CUDA-only: the
    same blocked float32 matrix product and `torch.topk`, on the CPU. Returns indices."""
    p = torch.from_numpy(pool)
    out = []
    for i in range(0, len(queries), batch):
        out.append(torch.topk(torch.from_numpy(queries[i : i + batch]) @ p.T, k, dim=1)[1])
    return torch.cat(out).numpy().astype(np.int64)


def section_retrieve(ctx: Context) -> dict[str, Any]:
    """Exact top-k: faiss-gpu's path and the torch path, each against faiss-cpu on a sample,
    and against each other on every query."""
    import faiss

    from embedder.retrieval import _faiss_gpu_ok, _torch_topk, exact_search, recall_at_k

    sz = ctx.sizes
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    pool_t = torch.randn(sz.pool, sz.dim, device=ctx.device, generator=gen)
    pool_t = torch.nn.functional.normalize(pool_t, dim=1)
    pick = torch.randint(0, sz.pool, (sz.queries,), device=ctx.device, generator=gen)
    noise = torch.randn(sz.queries, sz.dim, device=ctx.device, generator=gen)
    queries_t = torch.nn.functional.normalize(pool_t[pick] + 0.05 * noise, dim=1)
    pool, queries = pool_t.cpu().numpy(), queries_t.cpu().numpy()
    del pool_t, queries_t, noise
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()

    # faiss-cpu runs ~0.2 TFLOP/s on 16 threads: a smaller sample where fewer are allowed
    # (OMP_NUM_THREADS), so the reference stays within its planned seconds.
    threads = faiss.omp_get_max_threads()
    sample = queries[: max(min(50, sz.cpu_queries), sz.cpu_queries * min(threads, 16) // 16)]
    started = time.perf_counter()
    reference = exact_search(sample, pool, sz.top_k, device="cpu")
    cpu_s = time.perf_counter() - started
    out: dict[str, Any] = {
        "pool": sz.pool,
        "queries": sz.queries,
        "dim": sz.dim,
        "top_k": sz.top_k,
        "faiss_version": faiss.__version__,
        "faiss_gpus": faiss.get_num_gpus(),
        "faiss_cpu": {
            "backend": reference.backend,
            "threads": threads,
            "sample": len(sample),
            "queries_per_s": len(sample) / cpu_s,
        },
    }
    checks: dict[str, bool] = {}

    def timed(search: Callable[[np.ndarray], np.ndarray], name: str) -> np.ndarray:
        search(queries[:256])  # warm-up: kernels, allocator
        ctx.sync()
        t = time.perf_counter()
        found = search(queries)
        ctx.sync()
        seconds = time.perf_counter() - t
        recall = recall_at_k(found[: len(sample)], reference.indices)
        top1 = float((found[: len(sample), 0] == reference.indices[:, 0]).mean())
        out[name] |= {
            "seconds": seconds,
            "queries_per_s": sz.queries / seconds,
            "recall_vs_faiss_cpu": recall,
            "top1_vs_faiss_cpu": top1,
        }
        checks[f"{name}_equals_reference"] = recall >= 0.999 and top1 >= 0.999
        return found

    # torch: the pipeline's path on CUDA; a CPU stand-in in the dry run.
    if ctx.device.type == "cuda":
        out["torch"] = {"path": "embedder.retrieval._torch_topk (CUDA)"}
        by_torch = timed(lambda q: _torch_topk(q, pool, sz.top_k, 8192).indices, "torch")
    else:
        out["torch"] = {
            "path": "CPU stand-in for embedder.retrieval._torch_topk (which is CUDA-only): "
            "the same float32 matmul + torch.topk"
        }
        by_torch = timed(lambda q: _cpu_topk(q, pool, sz.top_k), "torch")

    if ctx.device.type == "cuda" and _faiss_gpu_ok(pool):
        out["faiss_gpu"] = {"available": True}

        def faiss_gpu(q: np.ndarray) -> np.ndarray:
            res = exact_search(q, pool, sz.top_k, device="gpu")
            assert res.backend == "faiss-gpu", res.backend
            return res.indices

        by_faiss = timed(faiss_gpu, "faiss_gpu")
        out["faiss_gpu_vs_torch"] = {
            "recall": recall_at_k(by_faiss, by_torch),
            "top1": float((by_faiss[:, 0] == by_torch[:, 0]).mean()),
            "rows_identical": float((by_faiss == by_torch).all(axis=1).mean()),
        }
        out["speedup_faiss_gpu_vs_torch"] = out["torch"]["seconds"] / out["faiss_gpu"]["seconds"]
        checks["faiss_gpu_same_topk_as_torch"] = out["faiss_gpu_vs_torch"]["recall"] >= 0.999
    else:
        why = (
            "no CUDA device (dry run)"
            if ctx.device.type != "cuda"
            else f"faiss sees {faiss.get_num_gpus()} GPUs or its probe search failed "
            "(faiss-cpu installed, or a faiss-gpu wheel without kernels for this GPU)"
        )
        out["faiss_gpu"] = {"available": False, "note": f"faiss-gpu not available: {why}"}
    out["speedup_torch_vs_faiss_cpu"] = (
        out["torch"]["queries_per_s"] / out["faiss_cpu"]["queries_per_s"]
    )
    out["checks"] = checks
    return out


def _eval_rows(
    ctx: Context, shape: str, queries: int, candidates: int, seed: int
) -> list[dict[str, Any]]:
    """Eval-table rows (embedder.datasets.schema.EVAL_SCHEMA's fields the stage reads) of one
    MMEB shape, the correct candidate first as in MMEB."""
    rng = random.Random(seed)
    scenes = world.all_scenes()
    rows = []
    if shape == "shared":  # ImageNet-1K-like: image queries, one label set for all
        labels = [f"{world.caption(rng.choice(scenes))} ({j})" for j in range(candidates)]
        for q, path in enumerate(ctx.distinct_paths(queries)):
            first = q % candidates
            order = [first, *(j for j in range(candidates) if j != first)]
            rows.append(
                {
                    "subset": "ImageNet-1K",
                    "qry_text": world.CLASS_QUERY,
                    "qry_image": path,
                    "tgt_text": [labels[j] for j in order],
                    "tgt_image": [""] * candidates,
                }
            )
    elif shape == "own_text":  # OK-VQA-like: image + question, its own text answers
        for q, path in enumerate(ctx.distinct_paths(queries)):
            s = rng.choice(scenes)
            kind = rng.choice(world.QUESTION_TYPES)
            rows.append(
                {
                    "subset": "OK-VQA",
                    "qry_text": world.VQA_QUERY.format(q=world.question(kind, s)),
                    "qry_image": path,
                    "tgt_text": [f"{world.answer(kind, s)} {q}-{j}" for j in range(candidates)],
                    "tgt_image": [""] * candidates,
                }
            )
    else:  # MSCOCO_t2i-like: a caption, its own candidate images
        for q in range(queries):
            caption = f"{world.caption(rng.choice(scenes))} ({q})"
            rows.append(
                {
                    "subset": "MSCOCO_t2i",
                    "qry_text": world.T2I_QUERY.format(c=caption),
                    "qry_image": "",
                    "tgt_text": [world.T2I_TARGET] * candidates,
                    "tgt_image": ctx.distinct_paths(candidates),
                }
            )
    return rows


def section_evaluate(ctx: Context) -> dict[str, Any]:
    """MMEB-shaped evaluation throughput and, from it, the full MMEB's GPU-hours."""
    sz, backbone = ctx.sizes, ctx.backbone()
    # The stage's settings; images fixed at the run's side (the eval rule leaves a 448x448
    # image as it is, and would blow the dry run's 56 px up to 336).
    settings = evaluation_settings(
        EmbedConfig(batch_size=sz.batch, num_workers=sz.workers), EvaluateConfig()
    ).model_copy(update={"image_mode": "fixed", "image_side": sz.side})
    build = builder(backbone, settings)
    vision, lm = model_params(backbone)
    vision_2b, lm_2b = vision_linear_params(QWEN2VL_2B), lm_linear_params(QWEN2VL_2B)
    vision_7b, lm_7b = vision_linear_params(QWEN2VL_7B), lm_linear_params(QWEN2VL_7B)
    patches = patches_per_image(backbone, settings, sz.side)
    plan = {
        "shared": (sz.shared_queries, sz.labels),
        "own_text": (sz.own_text_queries, sz.candidates),
        "own_image": (sz.own_image_queries, sz.candidates),
    }
    shapes: dict[str, dict[str, Any]] = {}
    checks: dict[str, bool] = {}
    for n, (shape, (queries, candidates)) in enumerate(plan.items()):
        rows = _eval_rows(ctx, shape, queries, candidates, seed=n)
        items, qkeys, ckeys = build.eval_table(rows)
        images = len({it.image for it in items if it.image})
        ctx.sync()
        started = time.perf_counter()
        folder = ctx.root / f"eval-{shape}"
        stats = encode(backbone, items, ctx.root, folder, settings, progress=False)
        ctx.sync()
        embed_s = time.perf_counter() - started
        started = time.perf_counter()
        keys, matrix = load_embeddings(folder)
        scores = subset_scores(rows, qkeys, ckeys, dict(zip(keys, matrix, strict=True)))
        score_s = time.perf_counter() - started
        shared = shape == "shared"
        expected = queries + candidates if shared else queries * (1 + candidates)
        total_patches = images * patches
        shapes[shape] = {
            "queries": queries,
            "candidates_per_query": candidates,
            "shared_candidates": shared,
            "items": len(items),
            "distinct_items": stats.unique,
            "expected_distinct": expected,
            "images": images,
            "real_tokens": stats.real_tokens,
            "embed_s": embed_s,
            "score_s": score_s,
            "items_per_s": stats.encoded / embed_s,
            "seconds_per_query": (embed_s + score_s) / queries,
            "mfu": forward_flops(vision, lm, total_patches, stats.real_tokens) / embed_s / ctx.peak,
            "flops_2b": forward_flops(vision_2b, lm_2b, total_patches, stats.real_tokens),
            "flops_7b": forward_flops(vision_7b, lm_7b, total_patches, stats.real_tokens),
            "scored_queries": sum(v["queries"] for v in scores.values()),
        }
        checks[f"{shape}_dedup"] = stats.unique == expected
        checks[f"{shape}_scored"] = shapes[shape]["scored_queries"] == queries
    hours_2b, hours_7b = mmeb_hours(shapes, "2b"), mmeb_hours(shapes, "7b")
    counts = {s: list(MMEB_SHAPES.values()).count(s) for s in plan}
    checks["mmeb_36_subsets"] = len(MMEB_SHAPES) == 36
    built = sliver(QWEN2VL_2B) if ctx.dry_run else QWEN2VL_2B
    checks["flop_model_matches_model"] = (vision, lm) == (
        vision_linear_params(built),
        lm_linear_params(built),
    )
    return {
        "shapes": shapes,
        "linear_params": {
            "measured": {"vision": vision, "lm": lm},
            "2b": {"vision": vision_2b, "lm": lm_2b},
            "7b": {"vision": vision_7b, "lm": lm_7b},
        },
        "mmeb": {
            "subsets": MMEB_SHAPES,
            "subsets_per_shape": counts,
            "queries_per_subset": MMEB_QUERIES,
            "candidates_per_query": MMEB_CANDIDATES,
            "hidden_2b": QWEN2VL_2B["hidden_size"],
            "hidden_7b": QWEN2VL_7B["hidden_size"],
            "hours_2b": hours_2b,
            "hours_7b": hours_7b,
            "reference_gpu_hours": list(REFERENCE_GPU_HOURS),
            "formula": "hours = sum over the 36 subsets of queries_per_subset * (embed_s + "
            "score_s) / queries of the subset's shape / 3600; 7B: embed_s * flops_7b / "
            "flops_2b, score_s * hidden_7b / hidden_2b",
            "assumptions": [
                "1,000 queries per subset; classification: one shared label set of up to "
                "1,000 candidates embedded once; every other subset: each query its own "
                "1,000 candidates, no overlap between queries (an upper bound)",
                "candidates: VQA and image-to-text subsets text, the other retrieval and "
                "grounding subsets images (MMEB_SHAPES)",
                "448x448 images (256 image tokens); larger eval images cost more",
                "7B at the 2B run's MFU (linear-layer FLOPs of the same items)",
                "no sanity check, no next-token sample (seconds each)",
            ],
        },
        "checks": checks,
    }


def _fan_out_share(out: Path, shard: Any, spec: dict[str, Any]) -> None:
    """One Dask task: this worker's slice of the shards (the stage function's role in
    tasks.scale). The backbone is built once per worker process and kept on the worker."""
    from distributed import get_worker

    worker = get_worker()
    started = time.perf_counter()
    backbone = getattr(worker, "gpu_check_backbone", None)
    built = backbone is None
    if backbone is None:
        device = torch.device("cuda" if spec["cuda"] else "cpu")
        backbone = spec["make_backbone"](device, not spec["cuda"], spec["side"])
        worker.gpu_check_backbone = backbone
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    stats = encode(
        backbone, spec["items"], Path(spec["root"]), out, spec["settings"], share=shard,
        progress=False,
    )  # fmt: skip
    # This task's shards (the stats count every shard in the folder): their own records.
    mine = [
        json.loads((out / f"shard-{s:05d}{STATS_SUFFIX}").read_text())
        for s in range(stats.shards)
        if shard.owns(s)
    ]
    info = {
        "task": shard.index,
        "pid": os.getpid(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "device": torch.cuda.get_device_name() if spec["cuda"] else "cpu",
        "built_model": built,
        "build_s": build_s,
        "encode_s": time.perf_counter() - started,
        "shards": len(mine),
        "encoded": sum(m["items"] for m in mine),
    }
    Path(spec["info"], f"task-{shard.index}.json").write_text(json.dumps(info))


@dataclass
class _SliceCall:
    """What tasks.scale._compute_slice calls: `stage.function(**arguments(out, shard))`."""

    stage: Any
    spec: dict[str, Any]

    def arguments(self, out: Path, shard: Any) -> dict[str, Any]:
        """The share function's arguments: the partial folder, the slice, the job."""
        return {"out": out, "shard": shard, "spec": self.spec}


@contextlib.contextmanager
def _cluster(cuda: bool) -> Iterator[tuple[Any, int, str]]:
    """A started local Dask cluster and its client: (client, workers, what it is).

    CUDA: dask-cuda's LocalCUDACluster, one worker per visible GPU (tasks.scale's own
    default of 2 workers would not start on a 1-GPU box); otherwise one LocalCluster worker.
    Settings as tasks.scale.shard_runner's: one thread a worker, workers that may start
    DataLoader processes (not daemons); PYTHONPATH names the repo and bench/ so the workers
    can unpickle this script's functions."""
    import dask
    from distributed import Client, LocalCluster

    dask.config.set({"distributed.worker.daemon": False})
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(BENCH), *([old_path] if old_path else [])]
    )
    try:
        if cuda:
            from dask_cuda import LocalCUDACluster

            workers = torch.cuda.device_count()
            cluster: Any = LocalCUDACluster(
                n_workers=workers, threads_per_worker=1, dashboard_address=None
            )
            what = "dask_cuda.LocalCUDACluster"
        else:
            workers = 1
            cluster = LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
            )
            what = "distributed.LocalCluster (dry run: no CUDA)"
        with cluster, Client(cluster) as client:
            yield client, workers, what
    finally:
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path


def section_dask(ctx: Context) -> dict[str, Any]:
    """tasks/scale.py's fan-out of an embedding job on LocalCUDACluster (LocalCluster in the
    dry run), then the assembling pass, against one process embedding the same items."""
    import types

    import cloudpickle

    from tasks.scale import _compute_slice

    sz, backbone = ctx.sizes, ctx.backbone()
    settings = EmbedConfig(
        batch_size=sz.batch, num_workers=sz.workers, image_side=sz.side, image_mode="fixed",
        shard_size=sz.batch,
    )  # fmt: skip
    items = query_items(
        builder(backbone, settings), ctx.distinct_paths(sz.dask_items), sz.dask_items, 7
    )
    ctx.sync()
    started = time.perf_counter()
    single = encode(backbone, items, ctx.root, ctx.root / "dask-single", settings, progress=False)
    ctx.sync()
    single_s = time.perf_counter() - started

    cuda = ctx.device.type == "cuda"
    started = time.perf_counter()
    with _cluster(cuda) as (client, workers, cluster_class):
        cluster_s = time.perf_counter() - started
        tasks = workers * sz.dask_tasks_per_worker
        partial, info = ctx.root / "dask-partial", ctx.root / "dask-info"
        partial.mkdir()
        info.mkdir()
        spec = {
            "items": items, "root": str(ctx.root), "settings": settings, "side": sz.side,
            "cuda": cuda, "info": str(info), "make_backbone": make_backbone,
        }  # fmt: skip
        call = _SliceCall(types.SimpleNamespace(function=_fan_out_share), spec)
        blob = cloudpickle.dumps(call)
        started = time.perf_counter()
        futures = [
            client.submit(_compute_slice, blob, str(partial), k, tasks, pure=False)
            for k in range(tasks)
        ]
        client.gather(futures)
        fan_out_s = time.perf_counter() - started
    started = time.perf_counter()
    assembled = encode(backbone, items, ctx.root, partial, settings, progress=False)
    assemble_s = time.perf_counter() - started
    keys_a, vecs_a = load_embeddings(ctx.root / "dask-single")
    keys_b, vecs_b = load_embeddings(partial)
    task_info = [json.loads(p.read_text()) for p in sorted(info.glob("task-*.json"))]
    encode_s = sum(t["encode_s"] for t in task_info)
    diff = float(np.abs(vecs_a - vecs_b).max()) if keys_a == keys_b else float("inf")
    return {
        "cluster_class": cluster_class,
        "workers": workers,
        "tasks": tasks,
        "items": len(items),
        "shards": assembled.shards,
        "resumed_shards": assembled.resumed_shards,
        "cluster_start_s": cluster_s,
        "fan_out_s": fan_out_s,
        "worker_build_s": sum(t["build_s"] for t in task_info),
        "worker_encode_s": encode_s,
        "assemble_s": assemble_s,
        "single_process_s": single_s,
        "single_items_per_s": single.encoded / single_s,
        "fan_out_items_per_s": len(items) / fan_out_s,
        "worker_items_per_s": sum(t["encoded"] for t in task_info) / max(encode_s, 1e-9),
        "task_info": task_info,
        "main_pid": os.getpid(),
        "max_abs_diff": diff,
        "pipeline_default_workers_fit": not cuda or workers >= 2,
        "checks": {
            "every_shard_by_workers": assembled.resumed_shards == assembled.shards > 1,
            "every_task_ran": len(task_info) == tasks,
            "same_vectors": keys_a == keys_b and diff <= (2e-2 if cuda else 1e-5),
        },
    }


def section_finetune_step(ctx: Context) -> dict[str, Any]:
    """The paper's LoRA on the architecture: GradCache vs plain on a small batch (loss and
    gradients), then GradCache steps at 256 pairs: pairs/s, MFU, peak memory."""
    from embedder.model.encode import embed_inputs, process_items
    from embedder.training.adapters import attach
    from embedder.training.contrastive import grad_cache_step, info_nce, plain_step
    from embedder.training.finetune import content_ids

    sz, backbone = ctx.sizes, ctx.backbone()
    # The paper's recipe: r 8, alpha 64, dropout 0.1, DoRA, on the LM's projections. The
    # dry run leaves DoRA out: peft's DoRA recomputes each weight's norm through an identity
    # matrix of the layer's input width on every forward pass (~20 s on a CPU here).
    cfg = FinetuneConfig(chunk_size=sz.ft_chunk, dora=not ctx.dry_run)
    settings = EmbedConfig(image_side=sz.side, image_mode="fixed", num_workers=0)
    build = builder(backbone, settings)
    rng = random.Random(3)
    scenes = world.all_scenes()
    pairs = []
    for path in ctx.distinct_paths(sz.ft_pairs):
        s, kind = rng.choice(scenes), rng.choice(world.QUESTION_TYPES)
        row = {
            "qry_text": world.VQA_QUERY.format(q=world.question(kind, s)),
            "qry_image": path,
            "pos_text": f"{world.answer(kind, s)}: {world.caption(s, rng.randrange(3))}",
            "pos_image": "",
        }
        pairs.append(build.pair(row))
    vision, lm = model_params(backbone)
    peft_model = attach(backbone, cfg)
    model = backbone.model
    counts = {"patches": 0, "tokens": 0}

    def encode_chunk(chunk: list[EmbedItem]) -> torch.Tensor:
        inputs = process_items(backbone.processor, chunk, ctx.root, settings)
        if torch.is_grad_enabled():  # one pass's work: the pass with a graph
            counts["patches"] += (
                int(inputs["pixel_values"].shape[0]) if "pixel_values" in inputs else 0
            )
            counts["tokens"] += int(inputs["attention_mask"].sum())
        return embed_inputs(backbone, inputs)

    def step(fn: Callable[..., torch.Tensor], chosen: list[Any], chunk: int) -> torch.Tensor:
        queries, targets = [p[0] for p in chosen], [p[1] for p in chosen]
        q_ids = content_ids(queries, backbone.device)
        t_ids = content_ids(targets, backbone.device)

        def loss_fn(q: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return info_nce(q, t, cfg.temperature, target_ids=t_ids, query_ids=q_ids)

        q_chunks = [queries[i : i + chunk] for i in range(0, len(queries), chunk)]
        t_chunks = [targets[i : i + chunk] for i in range(0, len(targets), chunk)]
        return fn(encode_chunk, q_chunks, t_chunks, loss_fn)

    try:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr)
        # 1. The same small batch, the same RNG: plain vs GradCache, loss and gradients.
        small = pairs[: sz.eq_pairs]
        results = {}
        for name, fn in (("plain", plain_step), ("grad_cache", grad_cache_step)):
            opt.zero_grad(set_to_none=True)
            torch.manual_seed(1)
            if ctx.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(ctx.device)
            loss = float(step(fn, small, sz.eq_chunk))
            grads = torch.cat([p.grad.detach().float().flatten() for p in params])
            results[name] = (loss, grads, peak_memory_mib(ctx))
        opt.zero_grad(set_to_none=True)
        (loss_p, grad_p, mem_p), (loss_g, grad_g, mem_g) = results["plain"], results["grad_cache"]
        grad_rel = float((grad_g - grad_p).norm() / grad_p.norm().clamp_min(1e-30))
        loss_rel = abs(loss_g - loss_p) / max(abs(loss_p), 1e-30)
        # 2. GradCache at full size: a warm-up step on one chunk, then timed steps.
        step(grad_cache_step, pairs[: sz.ft_chunk], sz.ft_chunk)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ctx.sync()
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        before = (
            torch.cuda.memory_allocated(ctx.device) / 2**20 if ctx.device.type == "cuda" else None
        )
        counts.update(patches=0, tokens=0)
        losses = []
        started = time.perf_counter()
        for _ in range(sz.ft_steps):
            losses.append(float(step(grad_cache_step, pairs, sz.ft_chunk)))
            opt.step()
            opt.zero_grad(set_to_none=True)
        ctx.sync()
        seconds = time.perf_counter() - started
        peak = peak_memory_mib(ctx)
    finally:
        model.eval()
        peft_model.unload()  # the base model's own layers back, for whatever runs next
    patches, tokens = counts["patches"] / sz.ft_steps, counts["tokens"] / sz.ft_steps
    model_flops = 2.0 * vision * patches + 4.0 * lm * tokens
    hardware_flops = model_flops + forward_flops(vision, lm, patches, tokens)
    per_step = seconds / sz.ft_steps
    cuda = ctx.device.type == "cuda"
    return {
        "pairs": sz.ft_pairs,
        "chunk": sz.ft_chunk,
        "steps": sz.ft_steps,
        "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dora": cfg.dora},
        "trainable_params": sum(p.numel() for p in params),
        "seconds_per_step": per_step,
        "pairs_per_s": sz.ft_pairs / per_step,
        "patches_per_step": patches,
        "tokens_per_step": tokens,
        "model_flops_per_step": model_flops,
        "mfu": model_flops / per_step / ctx.peak,
        "hfu": hardware_flops / per_step / ctx.peak,
        "losses": losses,
        "memory_before_mib": before,
        "peak_memory_mib": peak,
        "equality": {
            "pairs": sz.eq_pairs,
            "chunk": sz.eq_chunk,
            "loss_plain": loss_p,
            "loss_grad_cache": loss_g,
            "loss_rel_diff": loss_rel,
            "grad_rel_diff": grad_rel,
            "peak_memory_mib_plain": mem_p,
            "peak_memory_mib_grad_cache": mem_g,
        },
        "checks": {
            "loss_equal": loss_rel <= (1e-2 if cuda else 1e-5),
            "grads_equal": grad_rel <= (5e-2 if cuda else 1e-4),
            "finite_losses": all(np.isfinite(losses)),
        },
    }


RUNNERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "embed": section_embed,
    "retrieve": section_retrieve,
    "evaluate": section_evaluate,
    "dask": section_dask,
    "finetune_step": section_finetune_step,
}


# ------------------------------------------------------------------------------ reporting


def versions() -> dict[str, str | None]:
    """Versions of what the measurements depend on (None: not installed)."""
    import importlib.metadata as md

    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "faiss-gpu", "faiss-cpu", "dask", "distributed",
                 "dask-cuda"):  # fmt: skip
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    out["cuda"] = torch.version.cuda
    return out


def _f(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def results_block(report: dict[str, Any]) -> str:
    """The markdown block for bench/RESULTS.md: date, machine, versions, command, figures."""
    m, s = report["meta"], report["sections"]
    v = m["versions"]
    lines = [
        f"## GPU check (issue 19): {m['date']}, {m['device']}",
        "",
        f"{m['date']}, {m['device']} ({m['cpu_count']} CPU cores), torch {v['torch']} (CUDA "
        f"{v['cuda']}), transformers {v['transformers']}, peft {v['peft']}, faiss "
        f"{v['faiss-gpu'] or v['faiss-cpu']} ({'faiss-gpu' if v['faiss-gpu'] else 'faiss-cpu'}), "
        f"dask {v['dask']}, dask-cuda {v['dask-cuda']}. Command: `{m['command']}`"
        + (" (dry run: CPU, toy shapes; the figures mean nothing)." if m["dry_run"] else "."),
        "",
        "```",
    ]
    for name in SECTIONS:
        r = s.get(name)
        if r is None:
            continue
        if "error" in r or "skipped" in r:
            lines.append(f"{name}: {r.get('skipped') or r['error'].strip().splitlines()[-1]}")
            continue
        lines.append(f"{name} ({r['seconds']:.1f}s): " + _summary(name, r))
    lines += [
        "```",
        "",
        f"Total {report['total_s']:.0f} s of a {report['budget_s']:.0f} s budget; checks "
        + ("all held." if report["ok"] else "FAILED: " + ", ".join(report["failed"])),
    ]
    return "\n".join(lines) + "\n"


def _summary(name: str, r: dict[str, Any]) -> str:
    if name == "embed":
        return (
            f"naive {r['naive']['items_per_s']:.1f} items/s (MFU {r['naive']['mfu']:.1%}), "
            f"engine {r['engine']['items_per_s']:.1f} items/s (MFU {r['engine']['mfu']:.1%}), "
            f"x{r['speedup']:.2f}; {r['items']} items ({r['distinct']} distinct), "
            f"{r['tokens_per_item']:.0f} tokens/item; min cosine {r['min_cosine']:.4f}"
        )
    if name == "retrieve":
        fg = r["faiss_gpu"]
        gpu = (
            f"faiss-gpu {fg['queries_per_s']:.0f} q/s (vs torch: recall "
            f"{r['faiss_gpu_vs_torch']['recall']:.4f}, x{r['speedup_faiss_gpu_vs_torch']:.2f})"
            if fg["available"]
            else fg["note"]
        )
        return (
            f"{r['pool']} x {r['dim']}, {r['queries']} queries, top {r['top_k']}: torch "
            f"{r['torch']['queries_per_s']:.0f} q/s (recall vs faiss-cpu "
            f"{r['torch']['recall_vs_faiss_cpu']:.4f}); faiss-cpu "
            f"{r['faiss_cpu']['queries_per_s']:.0f} q/s; {gpu}"
        )
    if name == "evaluate":
        shapes = "; ".join(
            f"{k} {v['queries']} q x {v['candidates_per_query']} cands: {v['distinct_items']} "
            f"distinct, {v['items_per_s']:.1f} items/s, {v['seconds_per_query']:.2f} s/query"
            for k, v in r["shapes"].items()
        )
        mm = r["mmeb"]
        return (
            f"{shapes}. Full MMEB (36 x 1,000 queries, no candidate overlap): "
            f"{mm['hours_2b']:.1f} GPU-h at 2B, {mm['hours_7b']:.1f} at 7B; reference "
            f"toolkit {mm['reference_gpu_hours'][0]:.0f}-{mm['reference_gpu_hours'][1]:.0f}"
        )
    if name == "dask":
        return (
            f"{r['cluster_class']}, {r['workers']} workers, {r['tasks']} tasks, "
            f"{r['shards']} shards: start {r['cluster_start_s']:.1f}s, fan-out "
            f"{r['fan_out_s']:.1f}s (model builds {r['worker_build_s']:.1f}s, encode "
            f"{r['worker_items_per_s']:.1f} items/s) vs one process "
            f"{r['single_items_per_s']:.1f} items/s; max |diff| {r['max_abs_diff']:.1e}"
        )
    eq = r["equality"]
    return (
        f"GradCache {r['pairs']} pairs (chunk {r['chunk']}): {r['pairs_per_s']:.1f} pairs/s, "
        f"MFU {r['mfu']:.1%} (HFU {r['hfu']:.1%}), peak {_f(r['peak_memory_mib'], '.0f')} MiB; "
        f"vs plain at {eq['pairs']} pairs: loss rel diff {eq['loss_rel_diff']:.1e}, grads "
        f"{eq['grad_rel_diff']:.1e}, peak {_f(eq['peak_memory_mib_plain'], '.0f')} vs "
        f"{_f(eq['peak_memory_mib_grad_cache'], '.0f')} MiB"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the sections, write the JSON and the RESULTS.md block; 1 if any check failed."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy shapes (make test)")
    ap.add_argument(
        "--out", type=Path, help="JSON path (default bench/gpu_check.json; dry run: temp)"
    )
    ap.add_argument("--only", help=f"comma-separated sections of {', '.join(SECTIONS)}")
    ap.add_argument("--budget-s", type=float, help="skip what is left past this (GPU: 480)")
    args = ap.parse_args(argv)
    only = SECTIONS if not args.only else tuple(args.only.split(","))
    unknown = set(only) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA device here: run with --dry-run, or on a GPU box")
    sizes = DRY if args.dry_run else GPU
    budget = args.budget_s or sizes.budget_s
    out = args.out or (
        Path(tempfile.gettempdir()) / "gpu_check-dry-run.json"
        if args.dry_run
        else BENCH / "gpu_check.json"
    )
    started = time.perf_counter()
    device = torch.device("cpu" if args.dry_run else "cuda")
    name = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name()
    peak = next((p for n, p in PEAK_BF16_DENSE.items() if n in name), DEFAULT_PEAK)
    meta = {
        "date": dt.date.today().isoformat(),
        "device": name,
        "dry_run": args.dry_run,
        "cpu_count": os.cpu_count(),
        "peak_flops": peak,
        "versions": versions(),
        "command": shlex.join(["python3", "bench/gpu_check.py", *(argv or sys.argv[1:])]),
    }
    print(f"device: {name}; peak {peak / 1e12:.0f} TFLOP/s (dense bf16); budget {budget:.0f}s")
    sections: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ctx = Context(sizes, args.dry_run, device, name, Path(tmp), peak)
        t = time.perf_counter()
        try:
            if set(only) - {"retrieve"}:  # the one section without the model
                ctx.backbone()
                ctx.images()
        except Exception:
            traceback.print_exc()
            sections["setup"] = {"error": traceback.format_exc()}
        setup_s = time.perf_counter() - t
        print(f"setup (model, images): {setup_s:.1f}s (planned {sizes.plan_s['setup']:.0f}s)")
        for section in SECTIONS:
            if section not in only or "setup" in sections:
                continue
            elapsed = time.perf_counter() - started
            if elapsed > budget:
                sections[section] = {"skipped": f"skipped: {elapsed:.0f}s past the budget"}
                print(f"{section}: {sections[section]['skipped']}")
                continue
            t = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                result = RUNNERS[section](ctx)
            except Exception:
                traceback.print_exc()
                result = {"error": traceback.format_exc()}
            result["seconds"] = time.perf_counter() - t
            sections[section] = result
            line = (
                _summary(section, result)
                if "error" not in result
                else result["error"].strip().splitlines()[-1]
            )
            print(f"{section}: {result['seconds']:.1f}s (planned {sizes.plan_s[section]:.0f}s)")
            print(f"  {line}")
            failed = [k for k, ok in result.get("checks", {}).items() if not ok]
            if failed:
                print(f"  CHECKS FAILED: {', '.join(failed)}")
    total = time.perf_counter() - started
    failed = [
        f"{name}.{check}"
        for name, r in sections.items()
        for check, ok in r.get("checks", {}).items()
        if not ok
    ] + [f"{name} ({'error' if 'error' in r else 'skipped'})" for name, r in sections.items()
         if "error" in r or "skipped" in r]  # fmt: skip
    report = {
        "meta": meta,
        "sections": sections,
        "setup_s": setup_s,
        "total_s": total,
        "budget_s": budget,
        "within_budget": total <= budget,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "failed": failed,
        "ok": not failed,
    }
    block = results_block(report)
    report["results_md"] = block
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(block)
    print(f"\ntotal {total:.1f}s (budget {budget:.0f}s{'' if total <= budget else ', OVER'})")
    print(f"wrote {out} and {out.with_suffix('.md')}\n")
    print(block)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
