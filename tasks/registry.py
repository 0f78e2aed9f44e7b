"""MLflow model registry: each fine-tuned adapter as a model version that loads, serves and
competes for the `champion` alias.

A version is an MLflow Model (tasks.pyfunc_model): the adapter, the base named by hub id and
the commit it resolved to (a base made in the workdir, the miniature world's tiny generator,
travels inside), the evaluation's image rules and prompt strings. It is logged on the run
that trained the adapter, under `registered/<evaluation fingerprint>`, never overwritten.
The same adapter evaluated the same way is registered once: a rerun whose stages are cache
hits finds its version instead of adding a copy. A version registered before versions were
MLflow Models (a bare adapter folder, no `gen2embed.format` tag) is found by such a rerun,
which registers a loadable version and tags the old one `gen2embed.superseded_by`.

Promotion (`promote`): the alias `champion` moves to a new version only when its
`registry.champion_metric` is at least the champion's on the same evaluation inputs
(`embedder.evaluate.evaluation_inputs`); otherwise the version is tagged with why not. Scores
are compared at full precision; a tie promotes the newer version.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from embedder.config import EmbedConfig, PipelineConfig, TableRow
from embedder.errors import UserError
from embedder.evaluate import AGGREGATES, evaluation_settings
from embedder.inference import TRAINING_FILE, Embedder
from embedder.model.identity import model_identity, workdir_cache
from embedder.outputs import Adapter, EvalReport
from tasks.pyfunc_model import BASE_ARTIFACT, FORMAT, load_embedder, save_embedder_model
from tasks.tracking import Tracker, source_tags

log = logging.getLogger("gen2embed.registry")

CHAMPION = "champion"
FORMAT_TAG = "gen2embed.format"  # FORMAT on an MLflow Model version; absent: a bare adapter
DECISION_TAG = "gen2embed.champion"  # "promoted" or "not promoted"
REASON_TAG = "gen2embed.champion_reason"


def adapter_sha256(folder: Path) -> str:
    """One digest over the adapter folder's files: for each, in name order, its relative name,
    a NUL, then its bytes (64 hex digits). Kept byte for byte as versions have always been
    tagged with it: a rerun finds the versions registered before by this digest."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def model_name(cfg: PipelineConfig, row: TableRow) -> str:
    return cfg.registry.model_name.format(preset=cfg.preset, row=row.name)


@dataclass(frozen=True)
class Registration:
    """A registered version and what became of the champion alias."""

    name: str
    version: str
    champion: bool  # the version holds `champion` now
    reason: str  # why it took the alias or not

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def register_adapter(
    tracker: Tracker,
    cfg: PipelineConfig,
    row: TableRow,
    adapter: Adapter,
    evaluation: EvalReport,
    run_id: str,
    *,
    lock: Path,
) -> Registration:
    """Register `adapter` (scored by `evaluation`) under the config's name as an MLflow Model,
    then decide the `champion` alias (`promote`). An adapter already registered with this
    evaluation returns its version. `lock`: a file serializing registrations (two runs
    finishing together must not both take the alias). Raises RegistryError when the base
    cannot be named (a tiny generator folder that is gone)."""
    client = tracker.client
    name = model_name(cfg, row)
    sha = adapter_sha256(adapter.adapter)
    metric = cfg.registry.champion_metric
    eval_inputs = str(evaluation.info.get("eval_inputs") or "")
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
        "eval_inputs": eval_inputs or "unknown",
        FORMAT_TAG: FORMAT,
        **{k: f"{v:.4f}" for k, v in with_scores.items() if v is not None},
    }
    if metric in evaluation.metrics:  # full precision: what promotion compares
        tags["champion_metric"] = metric
        tags["champion_score"] = repr(float(evaluation.metrics[metric]))
    base = _base(cfg, adapter)
    if cfg.model.backbone == "tiny":  # the base is the pretrained generator of this workdir
        tags["base_revision"] = adapter.base
    elif base.revision:
        tags["base_revision"] = base.revision
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(
                name,
                description=f"gen2embed embedder: table row {row.name} ({row.template}); "
                f"use models:/{name}@{CHAMPION}",
            )
        same = [
            v
            for v in client.search_model_versions(f"name = '{name}'")
            if v.tags.get("adapter_sha256") == sha
            and v.tags.get("evaluate_fingerprint") == evaluation.fingerprint
        ]
        loadable = [v for v in same if v.tags.get(FORMAT_TAG) == FORMAT]
        if loadable:
            found = loadable[0]
            holder = _champion(client, name)
            held = holder is not None and holder.version == found.version
            return Registration(
                name, str(found.version), held, found.tags.get(REASON_TAG, "registered before")
            )
        version = _create(tracker, cfg, row, adapter, evaluation, run_id, tags, base, name)
        for old in same:  # bare adapter folders registered before versions were MLflow Models
            client.set_model_version_tag(name, old.version, "gen2embed.superseded_by", version)
            log.info("%s version %s (a bare adapter folder) is superseded by version %s, "
                     "an MLflow Model", name, old.version, version)  # fmt: skip
        score = evaluation.metrics.get(metric)
        taken, reason = promote(client, name, version, metric, score, eval_inputs or None)
    log.info("registered %s version %s (adapter sha256 %s): %s", name, version, sha[:12], reason)
    return Registration(name, version, taken, reason)


@dataclass(frozen=True)
class _Base:
    path: str  # hub id or local folder
    revision: str | None  # the commit a hub id resolved to
    digest: str
    inside: bool  # the base travels inside the model (a folder made in the workdir)


def _base(cfg: PipelineConfig, adapter: Adapter) -> _Base:
    if cfg.model.backbone == "tiny":
        folder = Path(adapter.base)
        if not (folder / "config.json").is_file():
            raise RegistryError(
                f"the tiny generator the adapter was trained on ({folder}) is gone: rerun the "
                "pretrain stage, then register"
            )
        return _Base(str(folder), None, adapter.base, inside=True)
    found = model_identity(cfg.model.backbone, cfg.model.revision, workdir_cache())
    if found.revision is None:  # a local folder: named by absolute path and content
        return _Base(str(Path(cfg.model.backbone).resolve()), None, found.digest, inside=False)
    return _Base(cfg.model.backbone, found.revision, found.digest, inside=False)


def _dimension(base: _Base) -> int:
    from transformers import AutoConfig

    from embedder.model.backbone import text_config

    config = AutoConfig.from_pretrained(base.path, revision=base.revision)
    return int(text_config(config).hidden_size)


def _create(
    tracker: Tracker,
    cfg: PipelineConfig,
    row: TableRow,
    adapter: Adapter,
    evaluation: EvalReport,
    run_id: str,
    tags: dict[str, str],
    base: _Base,
    name: str,
) -> str:
    """Write the MLflow Model, log it on the run that trained the adapter (or `run_id`, when
    that run is in another tracking store), register it; returns the version."""
    client = tracker.client
    source_run = adapter.info.get("mlflow_run_id") or run_id
    try:
        client.get_run(source_run)
    except MlflowException:  # made under another tracking store (torchrun, a moved workdir)
        source_run = run_id
    row_cfg = cfg.for_row(row)
    # Image-loading worker processes change no vector; a served model runs without them.
    settings = evaluation_settings(row_cfg.embed, row_cfg.evaluate).model_copy(
        update={"num_workers": 0}
    )
    path = f"registered/{evaluation.fingerprint or tags['adapter_sha256'][:20]}"
    with tempfile.TemporaryDirectory(prefix="gen2embed-model-") as tmp:
        folder = save_embedder_model(
            Path(tmp) / "model",
            adapter=adapter.adapter,
            base=base.path,
            revision=base.revision,
            base_digest=base.digest,
            base_in_model=base.inside,
            dtype=cfg.model.dtype,
            settings=settings,
            dimension=_dimension(base),
            source={
                **source_tags(),
                "run_id": source_run,
                "evaluate_fingerprint": evaluation.fingerprint,
            },
        )
        client.log_artifacts(source_run, str(folder), path)
    uri = client.get_run(source_run).info.artifact_uri
    version = client.create_model_version(
        name,
        f"{uri}/{path}",
        run_id=source_run,
        tags=tags,
        description=f"adapter {tags['adapter_sha256'][:12]}, {row.template} template",
    )
    return str(version.version)


def _champion(client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no alias yet, or its version was deleted
        return None


def promote(
    client: MlflowClient,
    name: str,
    version: str,
    metric: str,
    score: float | None,
    eval_inputs: str | None,
) -> tuple[bool, str]:
    """Give `version` the `champion` alias when its `metric` score is at least the champion's
    on the same evaluation inputs (or there is no champion); tag the version with the decision
    and its reason either way. Returns (promoted, reason)."""
    holder = _champion(client, name)
    theirs = None if holder is None else holder.tags.get("champion_score")
    if score is None:
        taken, reason = False, f"{metric} was not evaluated for this version"
    elif holder is None:
        taken, reason = True, f"{metric} {score:.6g}: the first champion"
    elif holder.tags.get("champion_metric") != metric or theirs is None:
        taken, reason = (
            True,
            (
                f"{metric} {score:.6g}: champion v{holder.version} records no {metric} score "
                "(registered before promotion, or under another champion_metric)"
            ),
        )
    elif eval_inputs is None or holder.tags.get("eval_inputs") != eval_inputs:
        taken, reason = (
            False,
            (
                f"{metric} {score:.6g} not compared: champion v{holder.version} was evaluated on "
                f"other evaluation inputs ({holder.tags.get('eval_inputs')} vs {eval_inputs}); "
                f"move the alias by hand to promote it"
            ),
        )
    elif score >= float(theirs):
        taken, reason = (
            True,
            (f"{metric} {score:.6g} >= champion v{holder.version} {float(theirs):.6g}"),
        )
    else:
        taken, reason = (
            False,
            f"{metric} {score:.6g} < champion v{holder.version} {float(theirs):.6g}",
        )
    if taken:
        client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(
        name, version, DECISION_TAG, "promoted" if taken else "not promoted"
    )
    client.set_model_version_tag(name, version, REASON_TAG, reason)
    return taken, reason


def load_registered(
    uri: str,
    tracker: Tracker,
    dst: Path,
    *,
    template: str | None = None,
    settings: EmbedConfig | None = None,
) -> Embedder:
    """The Embedder a registered `models:/NAME/VERSION` or `models:/NAME@ALIAS` holds, its
    files downloaded into `dst`. An MLflow Model version embeds with the image rules and
    prompt strings it records unless `settings` says otherwise; a version registered before
    (a bare adapter folder) is loaded from its tags (base, revision, template). Raises
    RegistryError naming what is missing, and the errors of `Embedder.load`."""
    import mlflow
    from mlflow.models import Model

    found = _version(uri, tracker)
    folder = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=found.source, dst_path=str(dst), tracking_uri=tracker.tracking_uri
        )
    )
    if found.tags.get(FORMAT_TAG):
        flavor = Model.load(str(folder)).flavors.get("python_function", {})
        paths = {k: folder / v["path"] for k, v in flavor.get("artifacts", {}).items()}
        return load_embedder(
            flavor.get("config", {}),
            paths["adapter"],
            paths.get(BASE_ARTIFACT),
            settings=settings,
            template=template,
        )
    base = found.tags.get("base_model")
    if not base:
        raise RegistryError(f"{uri}: version {found.version} records no base_model tag")
    revision = found.tags.get("base_revision")
    if base == "tiny":  # the workdir's pretrained generator, recorded by path
        base, revision = revision or "", None
    elif revision == "unpinned":
        revision = None
    # The version's tag is the record for adapters saved before gen2embed.json.
    if not (folder / TRAINING_FILE).is_file():
        template = template or found.tags.get("template")
    return Embedder.load(base, folder, template=template, revision=revision, settings=settings)


def _version(uri: str, tracker: Tracker) -> ModelVersion:
    spec = uri.removeprefix("models:/")
    name, _, version = spec.partition("/")
    alias = None
    if "@" in name and not version:
        name, _, alias = name.partition("@")
    if not name or not (version or alias):
        raise RegistryError(f"{uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    try:
        if alias:
            return tracker.client.get_model_version_by_alias(name, alias)
        return tracker.client.get_model_version(name, version)
    except MlflowException as exc:
        raise RegistryError(
            f"{uri}: not in the registry at {tracker.tracking_uri} ({exc.message})"
        ) from None


class RegistryError(UserError, LookupError):
    """A registered model that cannot be found or used."""
