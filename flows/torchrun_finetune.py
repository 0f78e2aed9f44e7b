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
from contextlib import ExitStack
from typing import Any

import torch
import torch.distributed as dist

from embedder.artifacts import ArtifactStore
from embedder.config import PRESETS, load_config
from embedder.errors import UserError
from embedder.outputs import StageOutput
from embedder.progress import listening
from flows.pipeline import method
from tasks.contract import (
    ProgressArtifact,
    StageCall,
    current_row,
    running,
    stage_label,
    track_published,
)
from tasks.tracking import Tracker, source_tags

log = logging.getLogger("gen2embed.torchrun")


class MissingInputs(UserError, RuntimeError):
    pass


def _published_or_run(store: ArtifactStore, target: str, rank: int) -> Any:
    """A runner for `method`: upstream stages come from their published folders, the target
    stage is computed here (on every rank) and published by rank 0; nothing else runs."""

    class _Done(Exception):
        pass

    def runner(call: StageCall[Any]) -> Any:
        label = stage_label(call.stage.name, current_row())
        published = call.stage.published(store, call.fingerprint)
        if label != target:
            if published is None:
                raise MissingInputs(
                    f"{label} is not published in {store.workdir}: run the pipeline with "
                    f"`--until {call.stage.name}` first"
                )
            return published[0]
        if published is not None:
            log.info("%s: already published (%s)", label, published[0].folder)
            raise _Done
        out = store.partial_path(call.stage.name, call.fingerprint)
        config = {k: v.model_dump(mode="json") for k, v in call.sections.items()}
        with ExitStack() as stack:
            run_id = None
            if rank == 0:  # one MLflow run for the whole job, with the pipeline's tags
                tracker = Tracker.for_workdir(store.workdir)
                run_id = stack.enter_context(
                    tracker.run(
                        f"{label} (torchrun x{dist.get_world_size()})",
                        tags={
                            "gen2embed.stage": call.stage.name,
                            "gen2embed.fingerprint": call.fingerprint,
                            "gen2embed.row": current_row() or "",
                            "gen2embed.world_size": str(dist.get_world_size()),
                            **source_tags(),
                        },
                        params=config,
                    )
                )
                # Loss, lr and pairs/s reach it while it trains, as in the pipeline.
                stack.enter_context(listening(ProgressArtifact(label, tracker, run_id)))
                store.open_partial(call.stage.name, call.fingerprint)
            dist.barrier()
            output: StageOutput = call.stage.function(**call.arguments(out))
            dist.barrier()
            if rank == 0:
                info = {**output.info, "mlflow_run_id": run_id}
                output = output.model_copy(update={"info": info})
                manifest = store.publish(
                    call.stage.name,
                    call.fingerprint,
                    code_version=call.stage.code_version,
                    config=config,
                    inputs=call.inputs,
                    output=output,
                )
                folder = store.path(call.stage.name, call.fingerprint)
                moved = output.model_copy(update={"folder": folder})
                track_published(tracker, run_id, manifest, moved)
                log.info("%s: published %s", label, folder)
        raise _Done

    return runner, _Done


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
        runner, done = _published_or_run(store, f"finetune[{args.row}]", rank)
        try:
            with running(runner):
                method(cfg)
        except done:
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
