"""`gen2embed`: run the pipeline, show stage fingerprints, start the local servers."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import signal
import sys
from pathlib import Path
from typing import Any

from embedder.config import PRESETS, load_config
from embedder.errors import UserError
from embedder.model.prompts import ROLES, TEMPLATES
from flows.user_errors import BusyMachine, quiet_user_errors, user_cause


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--config", dest="config_file", help="YAML file with config sections")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. --set ingest.on_bad_rows=skip (repeatable)",
    )


def stage_names() -> tuple[str, ...]:
    """The pipeline's stage names in run order, as tasks/stages.py defines them (one
    `name = Stage("name", ...)` line each), read from its source: importing it imports torch,
    transformers, Prefect and MLflow (seconds), and help and argument errors answer at once.
    A test checks this equals `tasks.stages.STAGE_NAMES`; the import is the fallback."""
    spec = importlib.util.find_spec("tasks.stages")
    names: list[str] = []
    if spec is not None and spec.origin is not None and spec.origin.endswith(".py"):
        for node in ast.parse(Path(spec.origin).read_text()).body:
            value = node.value if isinstance(node, ast.Assign) else None
            if (
                isinstance(value, ast.Call)
                and isinstance(value.func, ast.Name)
                and value.func.id == "Stage"
                and value.args
                and isinstance(value.args[0], ast.Constant)
            ):
                names.append(value.args[0].value)
    if names:
        return tuple(names)
    from tasks.stages import STAGE_NAMES

    return STAGE_NAMES


def build_parser() -> argparse.ArgumentParser:
    names = stage_names()

    parser = argparse.ArgumentParser(prog="gen2embed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    # Flags every command shares, declared once (argparse parents).
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="show tracebacks of every error")
    workdir = argparse.ArgumentParser(add_help=False, parents=[debug])
    workdir.add_argument(
        "--workdir",
        help="workspace: artifacts, MLflow runs and registry, Prefect state (default: "
        "$GEN2EMBED_HOME or ./data)",
    )

    run = sub.add_parser(
        "run", help="run the pipeline (cached stages are reused)", parents=[workdir]
    )
    _config_args(run)
    run.add_argument(
        "--from",
        dest="from_stage",
        choices=names,
        help="recompute this stage and every stage downstream; reuse the others",
    )
    run.add_argument(
        "--force",
        action="append",
        default=[],
        choices=names,
        help="recompute this stage and everything downstream (repeatable)",
    )

    run.add_argument("--until", choices=names, help="stop after this stage (in every row)")
    run.add_argument(
        "--row",
        dest="rows",
        action="append",
        metavar="NAME",
        help="run only this table row (repeatable); shared stages come from the cache",
    )

    stages = sub.add_parser(
        "stages", help="each stage's fingerprint and whether it is cached", parents=[workdir]
    )
    _config_args(stages)
    stages.add_argument(
        "--row", dest="rows", action="append", metavar="NAME", help="only this table row"
    )

    up = sub.add_parser(
        "up",
        help="start Prefect and MLflow servers on 127.0.0.1 and serve the deployments",
        parents=[workdir],
    )
    up.add_argument("--prefect-port", type=int, default=4200)
    up.add_argument("--mlflow-port", type=int, default=5000)
    up.add_argument(
        "--host",
        default="127.0.0.1",
        help="address both servers bind to (default 127.0.0.1: this machine only; neither "
        "server authenticates, so another address exposes runs and results)",
    )
    _deployment_args(up)
    up.add_argument(
        "--no-deployments",
        dest="serve_deployments",
        action="store_false",
        help="start the servers only (no UI-started or scheduled runs)",
    )

    compare = sub.add_parser(
        "compare", help="pipeline runs side by side (from MLflow)", parents=[workdir]
    )
    compare.add_argument("runs", nargs="+", metavar="RUN", help="MLflow run id (or prefix) or name")

    enc = sub.add_parser(
        "encode",
        help="embed a JSONL or Parquet file of texts and images into a Parquet file",
        parents=[workdir],
    )
    enc.add_argument(
        "model",
        help="an adapter folder (its base is the one it names, or --base), an adapter hub id "
        "(with --base), a base model (hub id or folder: zero-shot), or a registered "
        "models:/NAME/VERSION or models:/NAME@ALIAS",
    )
    enc.add_argument(
        "--input", required=True, type=Path, help="JSONL or Parquet: text, image, instruction, id"
    )
    enc.add_argument(
        "--output", required=True, type=Path, help="Parquet file to write (id, embedding)"
    )
    enc.add_argument("--images", type=Path, help="images root the `image` paths are relative to")
    enc.add_argument(
        "--base",
        help="base model; MODEL is then an adapter (a folder, or a hub id such as the paper "
        "authors' Y-J-Ju/SaHa-Qwen2-VL-2B-Instruct). Default: the base an adapter folder names",
    )
    enc.add_argument("--adapter-revision", help="hub revision of an adapter given by id")
    enc.add_argument("--role", choices=ROLES, default="query")
    enc.add_argument(
        "--template",
        choices=TEMPLATES,
        help="default: the adapter's, else hierarchical",
    )
    enc.add_argument("--on-bad-rows", choices=("error", "skip"), default="error")
    enc.add_argument(
        "--image-mode",
        choices=("eval", "fixed", "native"),
        help="resize rule (default: a registered version's own, which its evaluation used; "
        "otherwise the paper's evaluation rule, eval; the tiny preset evaluates with fixed "
        "and --image-side 64)",
    )
    enc.add_argument(
        "--image-side", type=int, help="side for --image-mode fixed (implies it; default 448)"
    )

    deploy = sub.add_parser(
        "deploy",
        help="register the deployments on your own Prefect server (PREFECT_API_URL) and pool",
        parents=[debug],
    )
    deploy.add_argument("--pool", required=True, help="work pool whose workers run them")
    _deployment_args(deploy)
    return parser


def _deployment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--deployments",
        metavar="FILE",
        help="prefect.yaml with the deployments (default: deployments/prefect.yaml)",
    )
    p.add_argument(
        "--nightly-cron",
        metavar="CRON",
        help="when nightly-retrain runs, e.g. '30 3 * * *' (default in the file: 0 2 * * *, UTC)",
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwinding like Ctrl-C so open MLflow runs are ended as KILLED."""


def _terminate_as_interrupt(_signum: int, _frame: Any) -> None:
    raise Terminated


def cmd_run(args: argparse.Namespace) -> int:
    # Ctrl-C ends a run however it was started: a background job of a script is born with
    # SIGINT ignored, and a native library loaded later (polars, under MLflow) passes the
    # signal on to the handler it found. Installed before those imports.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from flows.environment import configure

    workdir = configure(args.workdir)
    # Fail fast, before Prefect's server starts: config, source paths, stage options.
    cfg = load_config(args.preset, args.config_file, args.overrides).with_rows(args.rows)
    from embedder.artifacts import ArtifactStore
    from embedder.datasets.ingest import check_sources
    from flows.pipeline import method, pipeline, run_name
    from tasks.selection import check_selection, plan

    check_sources(cfg.ingest)
    planned = plan(method, cfg, ArtifactStore(workdir), verify=args.from_stage is not None)
    check_selection(planned, args.from_stage, args.force, args.until)
    if not args.debug:
        quiet_user_errors()

    from contextlib import AbstractContextManager, nullcontext

    from flows.environment import create_prefect_store, uses_own_prefect_server
    from flows.temporary_server import temporary_prefect_server

    if not uses_own_prefect_server():
        create_prefect_store(Path(os.environ["PREFECT_HOME"]))
    server: AbstractContextManager[object] = nullcontext()
    if not os.environ.get("PREFECT_API_URL"):
        # Prefect's server for this run alone, on the workdir's database (or the one in
        # PREFECT_API_DATABASE_CONNECTION_URL), stopped when the run ends however it ends.
        server = temporary_prefect_server(workdir / "logs" / "prefect-server.log")
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    # The flow run's name is the MLflow run's (tasks.pipeline_run.PipelineRun): the preset and rows.
    named = pipeline.with_options(flow_run_name=run_name(args.preset, args.rows))
    with server:
        paths = named(
            preset=args.preset,
            config_file=args.config_file,
            overrides=args.overrides,
            from_stage=args.from_stage,
            force=args.force,
            until=args.until,
            rows=args.rows,
            workdir=str(workdir),
        )
    from flows.summary import run_summary
    from tasks.tracking import Tracker

    tracker = Tracker.for_workdir(workdir, os.environ.get("MLFLOW_TRACKING_URI"))
    print(
        run_summary(
            paths, workdir, tracking_uri=tracker.tracking_uri, experiment_id=tracker.experiment_id
        )
    )
    return 0


def cmd_stages(args: argparse.Namespace) -> int:
    from flows.environment import configure

    workdir = configure(args.workdir)
    config = load_config(args.preset, args.config_file, args.overrides).with_rows(args.rows)
    from embedder.artifacts import ArtifactStore
    from flows.pipeline import method
    from tasks.selection import plan

    print(f"workdir {workdir}")
    print(f"{'stage[row]':32s} {'fingerprint':22s} status")
    for p in plan(method, config, ArtifactStore(workdir), verify=True):
        status = "cached" if p.cached else f"to compute ({(p.problems or ('',))[0]})"
        print(f"{p.label:32s} {p.fingerprint:22s} {status}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    # Stoppable while it imports MLflow and Prefect, even when born with SIGINT ignored (a
    # background job of a non-interactive shell); serve() then takes both signals over.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    from flows.environment import configure
    from flows.services import serve

    workdir = configure(args.workdir)
    return serve(
        workdir,
        prefect_port=args.prefect_port,
        mlflow_port=args.mlflow_port,
        host=args.host,
        deployments=args.deployments,
        nightly_cron=args.nightly_cron,
        serve_deployments=args.serve_deployments,
    )


def cmd_compare(args: argparse.Namespace) -> int:
    from flows.compare import champions, compare_table, find_runs
    from flows.environment import configure
    from tasks.tracking import Tracker

    workdir = configure(args.workdir)
    tracker = Tracker.for_workdir(workdir)
    runs = find_runs(tracker, args.runs)
    print(compare_table(runs, champions(tracker, runs)))
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    """Load the model MODEL names, then embed the input file (embedder.encode_file)."""
    import json
    import tempfile

    from embedder.config import EmbedConfig, EvaluateConfig
    from embedder.encode_file import EncodeInputError, encode_file
    from embedder.inference import Embedder
    from flows.environment import configure

    if not args.input.is_file():
        raise EncodeInputError(f"--input {args.input} does not exist")
    if args.output.suffix != ".parquet":
        raise EncodeInputError(f"--output {args.output}: the output is a .parquet file")
    workdir = configure(args.workdir)
    settings = None
    if args.image_mode is not None or args.image_side is not None:
        if args.image_side is not None and args.image_mode not in (None, "fixed"):
            raise EncodeInputError(
                f"--image-side is the side of --image-mode fixed, not of {args.image_mode}"
            )
        settings = EmbedConfig(
            image_mode=args.image_mode or "fixed",
            image_side=args.image_side or EmbedConfig().image_side,
            max_pixels=EvaluateConfig().max_pixels,
        )
    with tempfile.TemporaryDirectory(prefix="gen2embed-model-") as tmp:
        base, adapter, template = args.base, None, args.template
        if args.model.startswith("models:/"):
            from tasks.registry import load_registered
            from tasks.tracking import Tracker

            if args.base:
                raise EncodeInputError(
                    f"--base and {args.model} both name a base: a registered version records "
                    "its own; drop --base"
                )
            tracker = Tracker.for_workdir(workdir, os.environ.get("MLFLOW_TRACKING_URI"))
            model = load_registered(
                args.model, tracker, Path(tmp), template=template, settings=settings
            )
        else:
            if args.base:  # MODEL is an adapter: a folder, or a hub id (the authors' ones)
                adapter = args.model
            elif (Path(args.model) / "adapter_config.json").is_file():
                adapter = args.model
                config = json.loads((Path(adapter) / "adapter_config.json").read_text())
                base = config.get("base_model_name_or_path")
                if not base:
                    raise EncodeInputError(f"{adapter} names no base model: pass --base")
            else:
                base = args.model
            if args.adapter_revision and adapter is None:
                raise EncodeInputError(
                    f"--adapter-revision is for adapters; {args.model} is a base model (an "
                    "adapter hub id needs --base)"
                )
            model = Embedder.load(
                base,
                adapter,
                template=template,
                settings=settings,
                adapter_revision=args.adapter_revision,
            )
        counts = encode_file(
            model,
            args.input,
            args.output,
            images_root=args.images,
            role=args.role,
            on_bad_rows=args.on_bad_rows,
        )
    skipped = f", {counts['skipped']} bad rows skipped" if counts["skipped"] else ""
    print(f"wrote {counts['rows']} vectors of {model.dimension} to {args.output}{skipped}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from flows.deployments import register

    for name in register(args.pool, args.deployments, args.nightly_cron):
        print(f"registered {name} (work pool {args.pool})")
    print(f"start a worker to run them: prefect worker start --pool {args.pool}")
    return 0


def main(argv: list[str] | None = None) -> int:
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--workdir")
    early.add_argument("--debug", action="store_true")
    known = early.parse_known_args(argv)[0]
    command = None
    try:
        # Help and argument errors need neither the workdir nor any heavy import.
        args = build_parser().parse_args(argv)
        command = args.command
        from flows.environment import configure

        # Prefect reads its settings when first imported: set up the workdir's environment
        # before any command imports it.
        configure(known.workdir)
        return {
            "run": cmd_run,
            "stages": cmd_stages,
            "up": cmd_up,
            "encode": cmd_encode,
            "deploy": cmd_deploy,
            "compare": cmd_compare,
        }[args.command](args)
    except UserError as exc:
        if known.debug:
            raise
        print(f"gen2embed: {exc}", file=sys.stderr)
        return 3 if isinstance(exc, BusyMachine) else 2
    except KeyboardInterrupt as exc:
        how, code = ("terminated", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
        kept = "; finished stages are kept, rerun to resume" if command == "run" else ""
        print(f"gen2embed: {how}{kept}", file=sys.stderr)
        return code
    except Exception as exc:
        # Bookkeeping failing in turn (a full disk breaks MLflow's and Prefect's databases
        # too) can bury the error that says what to do: report the first one a user can fix.
        cause = user_cause(exc)
        if cause is None or known.debug:
            raise
        print(f"gen2embed: {cause}", file=sys.stderr)
        return 2
    except BaseException as exc:
        # SIGTERM inside a flow arrives as Prefect's TerminationSignal.
        if type(exc).__name__ != "TerminationSignal":
            raise
        print("gen2embed: terminated; finished stages are kept, rerun to resume", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
