"""The `finetune` stage of one table row across several GPUs, under `torchrun`.

    torchrun --nproc-per-node 8 -m flows.torchrun_finetune --workdir DIR --row saha-hierarchical \\
        [--preset qwen2vl-7b] [--config FILE] [--set section.key=value ...]

Every stage the row's `finetune` reads (ingest, mine, ...) must already be published: run the
pipeline with `--until mine` first. Each rank trains on its share of every global batch
(embeddings gathered across ranks for the loss, LoRA gradients all-reduced); rank 0 writes the
checkpoints and publishes the stage folder under the same fingerprint the pipeline computes,
so the next `gen2embed run` finds `finetune[row]` cached and goes on to evaluate it. Rank 0
records the job as one MLflow run (`finetune[row] (torchrun xN)`: config, live loss curves,
metrics, the adapter), which the pipeline's cached stage run then points at.
Interrupted, the same command resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import torch
import torch.distributed as dist

from embedder.artifacts import ArtifactStore
from embedder.config import PRESETS, load_config
from embedder.errors import UserError
from flows.pipeline import method
from tasks.execute import Ranks, RunSettings, execute_stage
from tasks.stage import StageCall, current_row, running, stage_label
from tasks.tracking import Tracker

log = logging.getLogger("gen2embed.torchrun")


class MissingInputs(UserError, RuntimeError):
    pass


def torch_ranks() -> Ranks:
    """This job's ranks: rank 0's decision broadcast to all, torch.distributed's barrier."""

    def agree(value: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    return Ranks(
        rank=dist.get_rank(),
        size=dist.get_world_size(),
        launcher="torchrun",
        barrier=dist.barrier,
        agree=agree,
    )


class _Done(Exception):
    """The target stage is executed: the rest of the method does not run."""


def _published_or_run(store: ArtifactStore, target: str, ranks: Ranks) -> Any:
    """A runner for `method`: upstream stages come from their published folders, the target
    stage is executed here by every rank (tasks.execute: rank 0 decides and publishes under
    the pipeline's fingerprint); nothing else runs."""
    tracking_uri = Tracker.for_workdir(store.workdir).tracking_uri

    def runner(call: StageCall[Any]) -> Any:
        label = stage_label(call.stage.name, current_row())
        if label != target:
            published = call.stage.published(store, call.fingerprint)
            if published is None:
                raise MissingInputs(
                    f"{label} is not published in {store.workdir}: run the pipeline with "
                    f"`--until {call.stage.name}` first"
                )
            return published[0]
        settings = RunSettings(
            workdir=str(store.workdir),
            tracking_uri=tracking_uri,
            parent_run_id=None,
            label=label,
            row=current_row(),
        )
        done = execute_stage(call, settings, ranks=ranks)
        if done.cached and ranks.rank == 0:
            log.info("%s: already published (%s)", label, done.output.folder)
        raise _Done

    return runner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchrun -m flows.torchrun_finetune")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--row", required=True, help="the table row whose finetune to run")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--config", dest="config_file")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {rank} %(message)s")
    if torch.cuda.is_available():
        # model.device=auto then means this rank's GPU; the config (and so the fingerprint)
        # stays the pipeline's.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        cfg = load_config(args.preset, args.config_file, args.overrides).with_rows([args.row])
        if cfg.table.rows[0].negatives == "none":
            raise MissingInputs(f"row {args.row} is zero-shot: it has no finetune stage")
        store = ArtifactStore(args.workdir)
        runner = _published_or_run(store, f"finetune[{args.row}]", torch_ranks())
        try:
            with running(runner):
                method(cfg)
        except _Done:
            pass
    except UserError as exc:
        if rank == 0:
            print(f"gen2embed: {exc}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
