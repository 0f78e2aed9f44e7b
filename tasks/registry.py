"""MLflow model registry: each fine-tuned adapter as a model version, with what it is for.

Only the adapter is registered (a few MB; the base weights stay where they came from, named by
id and revision in the version's tags), pointing at the adapter folder already logged on its
`finetune` run. The same adapter evaluated the same way is registered once: a rerun whose
stages are cache hits finds its version instead of adding a copy.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from mlflow.exceptions import MlflowException

from embedder.config import PipelineConfig, TableRow
from embedder.errors import UserError
from embedder.evaluate import AGGREGATES
from embedder.outputs import Adapter, EvalReport
from tasks.tracking import Tracker

log = logging.getLogger("gen2embed.registry")


def adapter_sha256(folder: Path) -> str:
    """One digest over the adapter folder's files (names and bytes, in name order)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def model_name(cfg: PipelineConfig, row: TableRow) -> str:
    return cfg.registry.model_name.format(preset=cfg.preset, row=row.name)


def register_adapter(
    tracker: Tracker,
    cfg: PipelineConfig,
    row: TableRow,
    adapter: Adapter,
    evaluation: EvalReport,
    run_id: str,
) -> tuple[str, str]:
    """Register `adapter` (scored by `evaluation`) under the config's name; returns the name
    and the version (an existing one if this adapter and evaluation are registered already)."""
    client = tracker.client
    name = model_name(cfg, row)
    sha = adapter_sha256(adapter.adapter)
    with_scores = {f"p1.{k}": evaluation.metrics.get(f"p1.{k}") for k in AGGREGATES}
    tags = {
        "base_model": cfg.model.backbone,
        "base_revision": cfg.model.revision or "unpinned",
        "adapter_sha256": sha,
        "row": row.name,
        "template": row.template,
        "negatives": row.negatives,
        "preset": cfg.preset,
        "finetune_fingerprint": adapter.fingerprint,
        "evaluate_fingerprint": evaluation.fingerprint,
        **{k: f"{v:.4f}" for k, v in with_scores.items() if v is not None},
    }
    if cfg.model.backbone == "tiny":  # the base is the pretrained generator of this workdir
        tags["base_revision"] = adapter.base
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, description=f"gen2embed LoRA adapters: table row {row.name} ({row.template})"
        )
    for version in client.search_model_versions(f"name = '{name}'"):
        same = version.tags.get("adapter_sha256") == sha
        if same and version.tags.get("evaluate_fingerprint") == evaluation.fingerprint:
            return name, str(version.version)
    source_run = adapter.info.get("mlflow_run_id") or run_id
    try:
        artifact_uri = client.get_run(source_run).info.artifact_uri
    except MlflowException:  # made under another tracking store (torchrun, a moved workdir)
        source_run = run_id
        tracker.log_folder(run_id, adapter.adapter)
        artifact_uri = client.get_run(run_id).info.artifact_uri
    source = f"{artifact_uri}/{adapter.adapter.name}"
    version = client.create_model_version(
        name, source, run_id=source_run, tags=tags, description=f"adapter {sha[:12]}"
    )
    log.info("registered %s version %s (adapter sha256 %s)", name, version.version, sha[:12])
    return name, str(version.version)


def resolve_model_uri(
    uri: str, tracker: Tracker, dst: Path
) -> tuple[str, str | None, Path, str | None]:
    """`models:/NAME/VERSION` or `models:/NAME@ALIAS` -> (base model, base revision or None,
    the adapter folder downloaded into `dst`, the template it was trained with), from the
    version's tags (`register_adapter`). Raises RegistryError naming what is missing."""
    import mlflow

    spec = uri.removeprefix("models:/")
    name, _, version = spec.partition("/")
    alias = None
    if "@" in name and not version:
        name, _, alias = name.partition("@")
    if not name or not (version or alias):
        raise RegistryError(f"{uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    client = tracker.client
    try:
        found = (
            client.get_model_version_by_alias(name, alias)
            if alias
            else client.get_model_version(name, version)
        )
    except MlflowException as exc:
        raise RegistryError(
            f"{uri}: not in the registry at {tracker.tracking_uri} ({exc.message})"
        ) from None
    base = found.tags.get("base_model")
    if not base:
        raise RegistryError(f"{uri}: version {found.version} records no base_model tag")
    revision = found.tags.get("base_revision")
    if base == "tiny":  # the workdir's pretrained generator, recorded by path
        base, revision = revision or "", None
    elif revision == "unpinned":
        revision = None
    folder = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=found.source, dst_path=str(dst), tracking_uri=tracker.tracking_uri
        )
    )
    return base, revision, folder, found.tags.get("template")


class RegistryError(UserError, LookupError):
    """A registered model that cannot be found or used."""
