"""Stage `finetune`: LoRA contrastive training on mined clusters (docs/method.md section 4).

A batch is whole clusters (SaHa's, or a baseline's from the `mine` stage) filled up to a pair
budget, `finetune.pairs_per_batch` per device (embedder.training.batches): every pair's hard
negatives are its cluster mates' positives, at no extra forward pass, and every table row
trains on the same number of pairs a step. The loss is InfoNCE over every query/positive pair
of the global batch (embedder.training.contrastive), computed with GradCache unless turned
off. An epoch's short tail batch is dropped.

Resuming: which clusters make step s is a pure function of (seed, s), so a checkpoint needs
only the adapter, the optimizer, the scheduler, the RNG states and s. Checkpoints are written
every `checkpoint_every` steps into the stage's partial folder (each by an atomic rename);
a rerun continues from the newest and ends where an uninterrupted run ends.

Several GPUs: run under `torchrun`; each rank takes its share of the global batch's clusters,
embeddings are gathered for the loss, and the (small) LoRA gradients are all-reduced after
each step.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file, save_file
from transformers import get_linear_schedule_with_warmup

from embedder.artifacts import json_text
from embedder.config import EmbedConfig, FinetuneConfig, ModelConfig
from embedder.datasets.schema import CLUSTERS_SCHEMA, PAIRS_SCHEMA, read_table
from embedder.embed import ItemBuilder, open_backbone
from embedder.errors import UserError
from embedder.inference import TRAINING_FILE, TrainedWith
from embedder.model.backbone import Backbone
from embedder.model.encode import EmbedItem, embed_inputs, process_items
from embedder.model.prompts import Template
from embedder.outputs import Adapter, Clusters, Generator, Tables
from embedder.progress import Progress
from embedder.training import adapters
from embedder.training.batches import BatchPlan
from embedder.training.contrastive import grad_cache_step, info_nce, plain_step, world

log = logging.getLogger("gen2embed.finetune")

CHECKPOINTS = "checkpoints"


class TrainingDataError(UserError, ValueError):
    """Training data that cannot make a run: cluster members missing from the pairs table,
    too few clusters for one step, no training pairs."""


@dataclass(frozen=True)
class TrainPair:
    """One training pair as the model reads it: the rendered query (with the template's
    query line) and its positive, rendered as a target."""

    query: EmbedItem
    target: EmbedItem


def training_clusters(
    clusters: Clusters,
    data: Tables,
    template: Template,
    image_token: str,
    strings: EmbedConfig,
    literal: Callable[[str], str] | None = None,
) -> list[list[TrainPair]]:
    """The clusters as lists of rendered (query, positive) pairs, in cluster order;
    `literal` is the backbone's `as_text` (special-token strings in the data stay text).

    Within a cluster, pairs in `position` order (the anchor first). Image paths stay
    relative to the pairs' images root. Raises TrainingDataError (a UserError) when a
    cluster member's id is not in pairs.parquet (mine and ingest outputs of different
    runs), and embedder.datasets.schema.SchemaError (a UserError) when either table does
    not match its schema."""
    members = read_table(clusters.clusters, CLUSTERS_SCHEMA, ["cluster", "position", "id"])
    pairs = read_table(
        data.pairs, PAIRS_SCHEMA, ["id", "qry_text", "qry_image", "pos_text", "pos_image"]
    )
    frame = (
        pl.from_arrow(members)
        .join(pl.from_arrow(pairs).unique("id", keep="first"), on="id", how="left")
        .sort("cluster", "position")
    )
    lost = frame.filter(pl.col("qry_text").is_null())["id"].to_list()
    if lost:
        raise TrainingDataError(
            f"{len(lost)} cluster members are not in the pairs table (ids {lost[:5]}): the "
            "mine and ingest outputs do not belong together"
        )
    build = ItemBuilder(template, image_token, strings, literal)
    return [
        [TrainPair(*build.pair(r)) for r in part.iter_rows(named=True)]
        for _, part in frame.group_by(["cluster"], maintain_order=True)
    ]


@dataclass
class History:
    """Per-step training records, parallel lists: the step (1-based), the logged InfoNCE
    loss (global batch mean), the learning rate the step used, pairs per second (wall
    clock of the step, all ranks' pairs) and the pairs of the step's global batch. Written
    as history.json."""

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    pairs_per_s: list[float] = field(default_factory=list)
    pairs: list[int] = field(default_factory=list)

    def add(self, step: int, loss: float, lr: float, pairs_per_s: float, pairs: int) -> None:
        """Append one step's record."""
        self.steps.append(step)
        self.loss.append(loss)
        self.lr.append(lr)
        self.pairs_per_s.append(pairs_per_s)
        self.pairs.append(pairs)

    def until(self, step: int) -> History:
        """A new History of the records of steps up to and including `step`."""
        keep = [i for i, s in enumerate(self.steps) if s <= step]
        return History(*([getattr(self, f)[i] for i in keep] for f in self.__dataclass_fields__))


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


class Checkpoints:
    """`folder/step-NNNNNN/` with the adapter weights and the training state; written into a
    temporary sibling and renamed, so a kill never leaves a half checkpoint behind."""

    def __init__(self, folder: Path, keep: int) -> None:
        self.folder, self.keep = folder, keep

    def _done(self) -> list[Path]:
        """Finished checkpoints, oldest first (a `.tmp` one was cut short)."""
        return sorted(p for p in self.folder.glob("step-*") if p.name[5:].isdigit())

    def latest(self) -> Path | None:
        """The newest finished checkpoint folder, or None (none yet, or the folder is
        absent)."""
        done = self._done()
        return done[-1] if done else None

    def save(self, step: int, peft_model: Any, state: dict[str, Any]) -> None:
        """Called on every rank: each saves its own RNG state (dropout differs by rank),
        rank 0 the weights and the rest, then renames.

        Files in `step-NNNNNN/`: adapter_model.safetensors (peft's adapter state dict, on the
        CPU), state.pt (`state`, a torch pickle: step, optimizer, scheduler, history) and
        rng-<rank>.pt per rank. Only the newest `keep` checkpoints stay. A collective under
        torchrun (barriers): every rank must call it."""
        from peft.utils import get_peft_model_state_dict

        rank, size = world()
        final = self.folder / f"step-{step:06d}"
        tmp = self.folder / f"step-{step:06d}.tmp"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier(size)
        torch.save(_rng_state(), tmp / f"rng-{rank}.pt")
        _barrier(size)
        if rank == 0:
            weights = {
                k: v.detach().cpu().contiguous()
                for k, v in get_peft_model_state_dict(peft_model).items()
            }
            save_file(weights, tmp / adapters.WEIGHTS)
            torch.save(state, tmp / "state.pt")
            tmp.rename(final)
            for old in self._done()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier(size)

    def load(self, path: Path, peft_model: Any) -> dict[str, Any]:
        """Put the checkpoint's adapter weights into `peft_model` and return its training
        state (what `save` was given) with "rng", this rank's RNG states, added. The
        pickles are read with `weights_only=False`: they are this pipeline's own files,
        never load a checkpoint folder from elsewhere. Raises FileNotFoundError for a
        missing file."""
        from peft.utils import set_peft_model_state_dict

        weights = load_file(str(path / adapters.WEIGHTS))
        set_peft_model_state_dict(peft_model, weights)
        # Our own files (optimizer state, RNG states, numpy's included): not foreign pickles.
        state = torch.load(path / "state.pt", weights_only=False)
        state["rng"] = torch.load(path / f"rng-{world()[0]}.pt", weights_only=False)
        return state


def _loss(
    temperature: float,
    query_ids: torch.Tensor,
    target_ids: torch.Tensor,
    q: torch.Tensor,
    t: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return info_nce(q, t, temperature, target_ids=target_ids, query_ids=query_ids)


def content_ids(items: list[EmbedItem], device: torch.device) -> torch.Tensor:
    """(len(items),) int64: each rendered item's content identity (the first 60 bits of its
    `item_key`, so it fits a signed int64 and travels through all_gather)."""
    return torch.tensor([int(item.key[:15], 16) for item in items], device=device)


def _barrier(size: int) -> None:
    if size > 1:
        torch.distributed.barrier()


@dataclass
class TrainResult:
    """What `train` did: the full History (restored steps included), the step it resumed
    from (0 for a fresh run), `seconds` of wall clock in this call, and pairs in the last
    step's global batch (0 when no step ran in this call)."""

    history: History
    resumed_from: int
    seconds: float
    pairs_per_step: int


def train(
    backbone: Backbone,
    clusters: list[list[TrainPair]],
    cfg: FinetuneConfig,
    settings: EmbedConfig,
    images_root: Path,
    out: Path,
    *,
    stop_after: int | None = None,
    progress: bool = True,
) -> tuple[Any, TrainResult]:
    """Train a fresh adapter on `clusters`; returns (PeftModel, result). Resumes from the
    newest checkpoint under `out/checkpoints`. `stop_after` ends early after that many steps
    in total (a checkpoint is written there): how tests interrupt a run.

    The recipe of `cfg` (docs/method.md section 4): AdamW at `cfg.lr`, linear warm-up then
    linear decay to 0 over `cfg.steps`, InfoNCE at `cfg.temperature` with equal contents
    masked (`info_nce`), GradCache in chunks of `cfg.chunk_size` inputs unless turned off.
    Each step takes whole clusters up to `cfg.pairs_per_batch` pairs per rank
    (embedder.training.batches.BatchPlan).
    `backbone.model` is wrapped with LoRA in place (`adapters.attach`) and left in eval
    mode; `images_root` is where the pairs' image paths point; `settings` decode and size
    the images and pick the padding side (image_mode, image_side, padding_side, as
    embedder.model.encode.process_items reads them). Checkpoints (see `Checkpoints.save`)
    every `cfg.checkpoint_every` steps and at the end. Raises TrainingDataError (a
    UserError) when the clusters hold fewer pairs than one step takes or one is larger than
    a device's `cfg.pairs_per_batch`, AdapterError (a
    UserError) from `attach`, and FloatingPointError when a step's loss is not finite (that
    step's update already applied, no checkpoint written)."""
    rank, size = world()
    sizes = [len(c) for c in clusters]
    try:
        plan = BatchPlan(sizes, cfg.pairs_per_batch, cfg.seed, size)
    except ValueError as exc:
        advice = (
            "raise finetune.pairs_per_batch or lower mine.k"
            if max(sizes, default=0) > cfg.pairs_per_batch
            else "lower finetune.pairs_per_batch or mine more data"
        )
        raise TrainingDataError(
            f"{exc} (finetune.pairs_per_batch={cfg.pairs_per_batch} x {size} ranks): {advice}"
        ) from None
    torch.manual_seed(cfg.seed)
    peft_model = adapters.attach(backbone, cfg)
    model = backbone.model
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup, cfg.steps)
    checkpoints = Checkpoints(out / CHECKPOINTS, cfg.keep_checkpoints)
    history, start = History(), 0
    latest = checkpoints.latest()
    if latest is not None:
        state = checkpoints.load(latest, peft_model)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start = state["step"]
        history = History(**state["history"])
        log.info("finetune: resuming from %s (step %d of %d)", latest, start, cfg.steps)
    else:
        torch.manual_seed(cfg.seed + 1 + rank)  # dropout draws; ranks differ

    def encode(items: list[EmbedItem]) -> torch.Tensor:
        return embed_inputs(
            backbone, process_items(backbone.processor, items, images_root, settings)
        )

    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = Progress(
        "finetune", cfg.steps, unit="step", initial=start, enabled=progress and rank == 0
    )
    started = time.perf_counter()
    pairs_per_step = 0
    for step in range(start, end):
        tic = time.perf_counter()
        pairs = [p for c in plan.share(step, rank) for p in clusters[c]]
        pairs_per_step = plan.pairs(step)
        queries = [p.query for p in pairs]
        targets = [p.target for p in pairs]
        # Equal positives (one class label in two clusters) are not each other's negatives,
        # nor are two positives of one query content (VQA, classification, SaHa's phase 2).
        q_ids = content_ids(queries, backbone.device)
        t_ids = content_ids(targets, backbone.device)
        n = cfg.chunk_size
        q_chunks = [queries[i : i + n] for i in range(0, len(queries), n)]
        t_chunks = [targets[i : i + n] for i in range(0, len(targets), n)]
        run_step = grad_cache_step if cfg.grad_cache else plain_step
        loss = run_step(encode, q_chunks, t_chunks, partial(_loss, cfg.temperature, q_ids, t_ids))
        if size > 1:
            for p in params:
                torch.distributed.all_reduce(p.grad)
                p.grad /= size
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"finetune: loss is {loss.item()} at step {step + 1}")
        rate = pairs_per_step / (time.perf_counter() - tic)
        history.add(step + 1, float(loss), lr, rate, pairs_per_step)
        # Named as the curves the tracker logs (outputs.Adapter.curves), so a listener can
        # chart them live.
        bar.update(1, train_loss=float(loss), lr=lr, pairs_per_s=rate, pairs=pairs_per_step)
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == end:
            checkpoints.save(
                done,
                peft_model,
                {
                    "step": done,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "history": history.__dict__,
                },
            )
    bar.close()
    model.eval()
    return peft_model, TrainResult(history, start, time.perf_counter() - started, pairs_per_step)


def _loss_plot(history: History, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(history.steps, history.loss, lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("InfoNCE loss (global batch mean)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finetune_adapter(
    model: ModelConfig,
    embed: EmbedConfig,
    cfg: FinetuneConfig,
    data: Tables,
    clusters: Clusters,
    generator: Generator | None,
    out: Path,
) -> Adapter:
    """Train a LoRA adapter on the clusters with `cfg.template` prompts; training images as
    the embed section says (fixed 448 x 448 in the paper).

    The `finetune` stage (docs/method.md section 4). Writes under `out` (rank 0):
    adapter/ (peft's format, `adapters.save_adapter`: adapter_model.safetensors and
    adapter_config.json, plus gen2embed.json, the TrainedWith record of template, prompt
    strings and image-token form), history.json (`History` as {"steps", "loss", "lr",
    "pairs_per_s", "pairs"}), loss.png, and with `cfg.merge` merged/ (the full merged model and
    processor, transformers' save_pretrained). checkpoints/ is used while training and
    removed at the end. Metrics: loss_first, loss_last_tenth (mean of the last tenth of
    steps), pairs_per_step (mean over steps) with pairs_per_step_min and _max,
    pairs_per_s_median, resumed_from_step and lora_modules.<part>
    per component. Raises TrainingDataError (a UserError) when the ingest output has no
    pairs or the clusters are too few or do not match it, ValueError for backbone `tiny`
    without `generator`, and what `open_backbone` and `train` raise."""
    if data.pairs_images is None:
        raise TrainingDataError("the ingest output holds no training pairs")
    backbone = open_backbone(model, generator)
    token = backbone.image_token(model.wrapped_image_token)
    groups = training_clusters(clusters, data, cfg.template, token, embed, backbone.as_text)
    settings = embed.model_copy(update={"template": cfg.template})
    peft_model, result = train(backbone, groups, cfg, settings, data.pairs_images, out)
    output = Adapter(folder=out, base=backbone.source, template=cfg.template)
    lora_modules = adapters.lora_module_counts(peft_model, backbone.adapter)
    if world()[0] == 0:
        adapters.save_adapter(peft_model, output.adapter)  # same adapter, same bytes
        # How to prompt it, for whoever loads it outside the pipeline (embedder.inference).
        trained = TrainedWith(cfg.template, embed, model.wrapped_image_token)
        (output.adapter / TRAINING_FILE).write_text(trained.to_json() + "\n")
        if cfg.merge:
            merged = peft_model.merge_and_unload()
            merged.save_pretrained(out / "merged")
            backbone.processor.save_pretrained(out / "merged")
        output.history.write_text(json_text(result.history.__dict__))
        _loss_plot(
            result.history,
            out / "loss.png",
            f"finetune ({clusters.strategy} clusters, {cfg.template} template)",
        )
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # the adapter is what remains
    h = result.history
    tail = h.loss[-max(1, len(h.loss) // 10) :]
    pairs = f"{min(h.pairs)}-{max(h.pairs)}" if min(h.pairs) < max(h.pairs) else str(h.pairs[0])
    return output.model_copy(
        update={
            "rows": {"clusters": len(groups), "steps": cfg.steps},
            "metrics": {
                "loss_first": h.loss[0],
                "loss_last_tenth": float(np.mean(tail)),
                # Over every step of the run (restored ones included); the budget is the
                # most a step holds.
                "pairs_per_step": float(np.mean(h.pairs)),
                "pairs_per_step_min": min(h.pairs),
                "pairs_per_step_max": max(h.pairs),
                "pairs_per_s_median": float(np.median(h.pairs_per_s)),
                "resumed_from_step": result.resumed_from,
                # Where LoRA went (docs/method.md section 4: the language model only).
                **{f"lora_modules.{part}": n for part, n in lora_modules.items()},
            },
            "info": {
                "strategy": clusters.strategy,
                "summary": [
                    f"finetune ({clusters.strategy}, {cfg.template}): {cfg.steps} steps of "
                    f"{pairs} pairs, loss {h.loss[0]:.3f} -> "
                    f"{float(np.mean(tail)):.3f}"
                ],
            },
        }
    )
