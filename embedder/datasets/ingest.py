"""The ingest stage: raw training and evaluation tables -> validated Parquet tables.

Writes into the stage's output folder:
- `pairs.parquet` (PAIRS_SCHEMA): one row per training pair,
- `eval.parquet` (EVAL_SCHEMA): one row per eval query with its candidate list,
- `compositional.parquet` (COMPOSITIONAL_SCHEMA): SugarCrepe / SugarCrepe++ rows, when a
  compositional source is set (or the world has its own set),
- `rejects.parquet` (REJECTS_SCHEMA): every bad row with its reason.

Rows stream through in record batches (memory does not grow with the data); images are
checked in parallel threads. With `on_bad_rows: error` a bad row fails the stage after the
whole source was scanned, naming up to 20 rows and the total; with `skip` they go to the
rejects table and the count is logged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from embedder.artifacts import stat_key
from embedder.compositional import BENCHMARKS
from embedder.config import IngestConfig
from embedder.datasets import compositional, sources
from embedder.datasets.catalog import SIDECAR, SubsetInfo, read_sidecar, subset_info
from embedder.datasets.images import ImageChecker
from embedder.datasets.schema import (
    COMPOSITIONAL_SCHEMA,
    EVAL_SCHEMA,
    PAIRS_SCHEMA,
    REJECTS_SCHEMA,
    row_id,
)
from embedder.errors import UserError
from embedder.outputs import Tables, World

log = logging.getLogger("gen2embed.ingest")

MAX_NAMED_REJECTS = 20


class BadRowsError(UserError, ValueError):
    """Bad rows with `on_bad_rows: error`; the message names them."""


@dataclass
class _Rejects:
    writer: pq.ParquetWriter
    total: int = 0
    first: list[str] = field(default_factory=list)

    def add(self, table: str, chunk: sources.Chunk, i: int, rid: str, reason: str) -> None:
        row = chunk.row_number(i)
        self.writer.write_batch(
            pa.record_batch(
                [[table], [chunk.subset], [chunk.source], [row], [rid], [reason]],
                schema=REJECTS_SCHEMA,
            )
        )
        self.total += 1
        if len(self.first) < MAX_NAMED_REJECTS:
            self.first.append(
                f"{chunk.subset}/{chunk.source} {chunk.where(i)} [id {rid}]: {reason}"
            )


@dataclass(frozen=True)
class _Table:
    """How one kind of table (pairs or eval) is validated and converted."""

    name: str
    schema: pa.Schema
    required: tuple[str, ...]
    convert: Callable[
        [dict[str, Any], SubsetInfo, str, int, dict[str, str | None]],
        tuple[str, dict[str, Any] | None, str | None],
    ]
    image_paths: Callable[[dict[str, Any]], list[str]]


def _as_text(v: Any) -> str:
    return v if isinstance(v, str) else ""


def _pair_images(row: dict[str, Any]) -> list[str]:
    return [
        v
        for v in (row["qry_image_path"], row["pos_image_path"], row["neg_image_path"])
        if isinstance(v, str)
    ]


def _convert_pair(
    row: dict[str, Any], info: SubsetInfo, split: str, rownum: int, images: dict[str, str | None]
) -> tuple[str, dict[str, Any] | None, str | None]:
    qry, qimg = row["qry"], row["qry_image_path"]
    pos, pimg = row["pos_text"], row["pos_image_path"]
    neg, nimg = row["neg_text"], row["neg_image_path"]
    rid = row_id(info.name, *(_as_text(v) for v in (qry, qimg, pos, pimg, neg, nimg)))
    problems = [
        p
        for p in (
            sources.text_problem(qry, "qry"),
            sources.text_problem(pos, "pos_text"),
            sources.text_problem("" if qimg is None else qimg, "qry_image_path"),
            sources.text_problem("" if pimg is None else pimg, "pos_image_path"),
            # The miniature world's false-negative label; optional everywhere else.
            sources.text_problem(
                "" if row.get("fn_group") is None else row["fn_group"], "fn_group"
            ),
            # Negatives are optional in MMEB-train: null means none.
            sources.text_problem("" if neg is None else neg, "neg_text"),
            sources.text_problem("" if nimg is None else nimg, "neg_image_path"),
        )
        if p
    ]
    for col in ("qry_image_path", "pos_image_path", "neg_image_path"):
        path = row[col]
        if isinstance(path, str) and path and images.get(path):
            problems.append(f"{col}: {images[path]}")
    if not problems:
        if not qry and not qimg:
            problems.append("query has neither text nor image")
        if not pos and not pimg:
            problems.append("positive has neither text nor image")
    if problems:
        return rid, None, "; ".join(problems)
    group = row.get("fn_group")
    return (
        rid,
        {
            "id": rid,
            "subset": info.name,
            "meta_task": info.meta_task,
            "split": split,
            "row": rownum,
            "qry_text": qry,
            "qry_image": qimg or "",
            "pos_text": pos,
            "pos_image": pimg or "",
            "neg_text": neg or "",
            "neg_image": nimg or "",
            "fn_group": group if isinstance(group, str) and group else None,
        },
        None,
    )


def correct_is_duplicated(row: dict[str, Any]) -> bool:
    """An eval row whose correct candidate (index 0) appears again, same text and image,
    among its other candidates: the two embed to one vector and always tie.

    `row`: a converted row, EVAL_SCHEMA's names (`tgt_text`, `tgt_image`, equal length, at
    least one candidate); a row without `tgt_text` (a training pair) gives False."""
    if "tgt_text" not in row:
        return False
    correct = (row["tgt_text"][0], row["tgt_image"][0])
    return any(c == correct for c in zip(row["tgt_text"][1:], row["tgt_image"][1:], strict=True))


def _eval_images(row: dict[str, Any]) -> list[str]:
    paths = [row["qry_img_path"]] if isinstance(row["qry_img_path"], str) else []
    if isinstance(row["tgt_img_path"], list):
        paths.extend(p for p in row["tgt_img_path"] if isinstance(p, str))
    return paths


def _convert_eval(
    row: dict[str, Any], info: SubsetInfo, split: str, rownum: int, images: dict[str, str | None]
) -> tuple[str, dict[str, Any] | None, str | None]:
    qry, qimg = row["qry_text"], row["qry_img_path"]
    texts, imgs = row["tgt_text"], row["tgt_img_path"]
    rid = row_id(
        info.name,
        _as_text(qry),
        _as_text(qimg),
        [_as_text(t) for t in texts or []],
        [_as_text(t) for t in imgs or []],
    )
    problems = [
        p
        for p in (
            sources.text_problem(qry, "qry_text"),
            sources.text_problem("" if qimg is None else qimg, "qry_img_path"),
        )
        if p
    ]
    if not isinstance(texts, list) or not isinstance(imgs, list):
        problems.append("tgt_text and tgt_img_path must be lists")
    elif len(texts) != len(imgs):
        problems.append(f"tgt_text has {len(texts)} candidates but tgt_img_path {len(imgs)}")
    elif not texts:
        problems.append("no candidates")
    else:
        for j, (t, p) in enumerate(zip(texts, imgs, strict=True)):
            bad = sources.text_problem(t, f"tgt_text[{j}]") or sources.text_problem(
                "" if p is None else p, f"tgt_img_path[{j}]"
            )
            if bad:
                problems.append(bad)
            elif not t and not p:
                problems.append(f"candidate {j} has neither text nor image")
            elif p and images.get(p):
                problems.append(f"tgt_img_path[{j}]: {images[p]}")
    if isinstance(qimg, str) and qimg and images.get(qimg):
        problems.append(f"qry_img_path: {images[qimg]}")
    cats = row.get("tgt_category")
    if cats is not None:
        if not isinstance(cats, list) or not all(c is None or isinstance(c, str) for c in cats):
            problems.append("tgt_category must be a list of strings (or nulls)")
        elif isinstance(texts, list) and len(cats) != len(texts):
            problems.append(f"tgt_category has {len(cats)} entries but tgt_text {len(texts)}")
    if not problems and not qry and not qimg:
        problems.append("query has neither text nor image")
    if problems:
        return (
            rid,
            None,
            "; ".join(problems[:5])
            + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""),
        )
    return (
        rid,
        {
            "id": rid,
            "subset": info.name,
            "meta_task": info.meta_task,
            "distribution": info.distribution,
            "row": rownum,
            "qry_text": qry,
            "qry_image": qimg or "",
            "tgt_text": texts,
            "tgt_image": [p or "" for p in imgs],
            "tgt_category": cats,
        },
        None,
    )


PAIRS = _Table("pairs", PAIRS_SCHEMA, sources.TRAIN_COLUMNS, _convert_pair, _pair_images)
EVAL = _Table("eval", EVAL_SCHEMA, sources.EVAL_COLUMNS, _convert_eval, _eval_images)
COMPOSITIONAL = _Table(
    "compositional",
    COMPOSITIONAL_SCHEMA,
    compositional.COLUMNS,
    compositional.convert,
    compositional.image_paths,
)


@dataclass(frozen=True)
class _Plan:
    """One table to build: its sources, images root and subset descriptions."""

    table: _Table
    subsets: list[sources.SubsetSource]
    images_root: Path
    sidecar: dict[str, SubsetInfo]
    reader: Callable[[sources.SubsetSource, tuple[str, ...], int], Iterator[sources.Chunk]]


def resolve_sources(config: IngestConfig, world: World | None = None) -> IngestConfig:
    """For `source: world`, point the MMEB readers at the published miniature world.

    Returns `config` unchanged for any other source, else a copy reading source=mmeb from
    `world`'s folders. Raises ValueError for source=world without `world`."""
    if config.source != "world":
        return config
    if world is None:
        raise ValueError("ingest.source=world needs the world stage's output")
    own = world.compositional_images.is_dir()  # world.compositional_rows > 0
    return config.model_copy(
        update={
            "source": "mmeb",
            "train_dir": world.train_dir,
            "train_images": world.train_images,
            "eval_dir": world.eval_dir,
            "eval_images": world.eval_images,
            "sugarcrepe_dir": world.sugarcrepe_dir if own else None,
            "sugarcrepe_pp_dir": world.sugarcrepe_pp_dir if own else None,
            "compositional_images": world.compositional_images if own else None,
        }
    )


def compositional_dirs(config: IngestConfig) -> dict[str, Path]:
    """The compositional benchmarks' folders the config sets, by benchmark id."""
    dirs = dict(zip(BENCHMARKS, (config.sugarcrepe_dir, config.sugarcrepe_pp_dir), strict=True))
    return {b: Path(d) for b, d in dirs.items() if d is not None}


def _compositional_sources(
    config: IngestConfig,
) -> tuple[list[sources.SubsetSource], dict[str, list[str]]]:
    """Every category file of the configured benchmarks, and per benchmark the categories
    without one (raises as `compositional.discover`)."""
    found: list[sources.SubsetSource] = []
    missing: dict[str, list[str]] = {}
    for bench, folder in compositional_dirs(config).items():
        subsets, absent = compositional.discover(folder, bench)
        found += subsets
        if absent:
            missing[bench] = absent
    return found, missing


def _hub_sidecar(repo: str) -> dict[str, SubsetInfo]:
    """A local copy of a hub repository may describe its subsets like a local dump."""
    return read_sidecar(Path(repo)) if Path(repo).is_dir() else {}


def _plans(config: IngestConfig) -> list[_Plan]:
    plans: list[_Plan] = []
    if config.source == "mmeb":
        assert config.train_dir and config.train_images
        plans.append(
            _Plan(
                PAIRS,
                sources.discover_folder(
                    config.train_dir, config.train_splits, config.train_subsets
                ),
                config.train_images,
                read_sidecar(config.train_dir),
                sources.read_source,
            )
        )
    elif config.source == "jsonl":
        assert config.jsonl_images
        files = [Path(f) for f in config.jsonl_files]
        sidecar: dict[str, SubsetInfo] = {}
        for folder in sorted({f.parent for f in files}):
            sidecar.update(read_sidecar(folder))
        plans.append(
            _Plan(
                PAIRS,
                sources.discover_jsonl(files, config.train_subsets),
                config.jsonl_images,
                sidecar,
                sources.read_source,
            )
        )
    elif config.source == "hub":
        assert config.train_images
        plans.append(
            _Plan(
                PAIRS,
                sources.discover_hub(config.hub_train, config.train_splits, config.train_subsets),
                config.train_images,
                _hub_sidecar(config.hub_train),
                sources.read_source,
            )
        )
    if config.eval_dir is not None:
        assert config.eval_images
        plans.append(
            _Plan(
                EVAL,
                sources.discover_folder(config.eval_dir, [sources.EVAL_SPLIT], config.eval_subsets),
                config.eval_images,
                read_sidecar(config.eval_dir),
                sources.read_source,
            )
        )
    elif config.source == "hub":
        plans.append(
            _Plan(
                EVAL,
                sources.discover_hub(config.hub_eval, [sources.EVAL_SPLIT], config.eval_subsets),
                config.eval_images or config.train_images,  # type: ignore[arg-type]
                _hub_sidecar(config.hub_eval),
                sources.read_source,
            )
        )
    if config.compositional_images is not None:
        subsets, _ = _compositional_sources(config)
        plans.append(
            _Plan(
                COMPOSITIONAL,
                subsets,
                config.compositional_images,
                compositional.sidecar(subsets),
                compositional.read_json,
            )
        )
    return plans


def check_sources(config: IngestConfig) -> None:
    """The source's folders and files exist and hold tables for the asked splits and subsets,
    and its images roots exist: what can be checked in a second, before anything starts.
    (A hub repository that is not a local folder is checked when it is read.)

    Returns None; does nothing for source=world. Raises SourceError (a UserError) for a
    missing folder, file, subset, table or images root, and UnknownSubsetError (a
    UserError) for a `subsets.json` that is not JSON or names an unknown meta-task or
    distribution."""
    if config.source == "world":
        return
    remote_hub = config.source == "hub" and not Path(config.hub_train).is_dir()
    plans = [] if remote_hub else _plans(config)
    roots = {p.images_root for p in plans} or {config.train_images}
    if remote_hub and config.compositional_images is not None:
        _compositional_sources(config)  # local folders even when the tables are remote
        roots.add(config.compositional_images)
    for root in roots:
        if root is not None and not Path(root).is_dir():
            raise sources.SourceError(f"images root {root} does not exist")


def images_digest(root: Path) -> str:
    """sha256 over the relative path and `stat_key` of every file under an images root.

    Images change ingest's output (a replaced image may now fail its check) and everything
    downstream (its pixels), so they enter the fingerprint; by `stat`, not by content: a
    walk of a million files takes seconds where reading them would take hours. macOS litter
    (`._*`, `__MACOSX`) is skipped, as ingest refuses it; symlinked folders are followed once
    (a link back up the tree is not a loop).

    Returns "<n> files sha256:<64 hex>". Raises OSError (FileNotFoundError, ...) when `root`
    or a folder under it cannot be read."""
    digest = hashlib.sha256()
    stack = [root]
    entries: list[tuple[str, str]] = []
    seen: set[tuple[int, int]] = set()  # folders by (device, inode): a symlink loop ends here
    while stack:
        folder = stack.pop()
        st = folder.stat()
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.startswith("._") or entry.name == "__MACOSX":
                    continue
                if entry.is_dir():
                    stack.append(Path(entry.path))
                elif entry.is_file():
                    rel = Path(entry.path).relative_to(root).as_posix()
                    entries.append((rel, stat_key(entry.stat())))
    for rel, stat in sorted(entries):
        digest.update(f"{rel}\0{stat}\n".encode("utf-8", "surrogateescape"))
    return f"{len(entries)} files sha256:{digest.hexdigest()}"


def source_inputs(config: IngestConfig) -> dict[str, str]:
    """What ingest's fingerprint depends on besides its config and upstream stages: every
    file whose change changes its output.

    - local tables and everything beside them (a `subsets.json` sidecar that relabels a
      subset's meta-task included, for JSONL files too) by name and `stat_key`,
      so new data landing in a source folder changes the fingerprint and the next run
      re-ingests;
    - each images root by the `stat` of every file in it (`images_digest`);
    - a hub dataset by its current commit.
    The miniature world enters as the world stage's fingerprint, an upstream input.

    Keys: a file's resolved path, "hub:<repo>" or "images:<resolved root>"; values:
    `stat_key`, the commit sha ("unknown" when the hub gives none) or `images_digest`.
    Missing folders and files are left out, not errors (`check_sources` reports them). For
    a hub repo that is not a local folder it asks the hub (network): huggingface_hub's errors
    are let through.
    """
    if config.source == "world":
        return {}
    files: list[Path] = []
    folders = (config.train_dir, config.eval_dir, *compositional_dirs(config).values())
    for root in folders:
        if root is not None and Path(root).is_dir():
            files.extend(p for p in sorted(Path(root).rglob("*")) if p.is_file())
    for f in config.jsonl_files:
        if Path(f).is_file():
            files.append(Path(f))
            sidecar = Path(f).parent / SIDECAR
            if sidecar.is_file():
                files.append(sidecar)
    out = {str(f.resolve()): stat_key(f.stat()) for f in files}
    if config.source == "hub":
        for repo in (config.hub_train, config.hub_eval):
            if Path(repo).is_dir():  # a local copy laid out like the hub repository
                for f in sorted(p for p in Path(repo).rglob("*") if p.is_file()):
                    out[str(f.resolve())] = stat_key(f.stat())
            else:
                from huggingface_hub import HfApi

                out[f"hub:{repo}"] = HfApi().dataset_info(repo).sha or "unknown"
    roots = {
        config.train_images,
        config.eval_images,
        config.jsonl_images,
        config.compositional_images,
    } - {None}
    for root in sorted(Path(r).resolve() for r in roots if r is not None):
        if root.is_dir():
            out[f"images:{root}"] = images_digest(root)
    return out


def ingest(config: IngestConfig, world: World | None, out: Path) -> Tables:
    """Build pairs / eval / rejects tables in `out` (the stage's partial folder).

    The `ingest` stage. Writes under `out`: pairs.parquet (PAIRS_SCHEMA, one row per valid
    training pair, source order), eval.parquet (EVAL_SCHEMA, one row per valid eval query
    with its candidates, correct at index 0; only with an eval source: `eval_dir`, the
    world, or the hub), compositional.parquet (COMPOSITIONAL_SCHEMA, one row per valid
    SugarCrepe / SugarCrepe++ entry, category files in order; only with
    `compositional_images`, or the world's own set) and rejects.parquet (REJECTS_SCHEMA,
    every bad row and why, always). Ids are `row_id`s (content hashes). `world` is the
    world stage's output, needed only for source=world. The returned Tables carries the
    resolved images roots (None without that table), the eval and compositional roots'
    `images_digest`s, rows (per table, and rejects),
    metrics (rows, rejected_rows, images_checked, seconds, rows_per_s) and info (per-subset
    counts, empty subsets, eval queries whose correct candidate is listed twice, and the
    compositional categories that have no file, `compositional_missing`).

    Raises BadRowsError (a UserError) with `on_bad_rows: error` when any row is bad or a
    subset has no usable row (after scanning everything, naming up to 20 rows), and with
    either setting when a table ends up with no rows; SourceError (a UserError) as
    `check_sources`, and for a table file that is not Parquet or lacks a column;
    UnknownSubsetError (a UserError) for a bad `subsets.json` or a subset neither MMEB nor
    a `subsets.json` describes; FileNotFoundError when an images root is not a folder;
    ValueError for source=world without `world`.
    """
    config = resolve_sources(config, world)
    started = time.perf_counter()
    rows: dict[str, int] = {}
    subsets_info: dict[str, dict[str, Any]] = {}
    images_roots: dict[str, Path] = {}
    empty: list[str] = []
    checked = 0
    rejects = _Rejects(pq.ParquetWriter(out / "rejects.parquet", REJECTS_SCHEMA))
    try:
        for plan in _plans(config):
            root = Path(plan.images_root).resolve()
            images_roots[plan.table.name] = root
            written, n_checked = _ingest_table(
                plan, config, root, out, rejects, subsets_info, empty
            )
            rows[plan.table.name] = written
            checked += n_checked
    finally:
        rejects.writer.close()
    elapsed = time.perf_counter() - started
    total_rows = sum(rows.values())
    if rejects.total and config.on_bad_rows == "error":
        shown = "\n  ".join(rejects.first)
        more = rejects.total - len(rejects.first)
        raise BadRowsError(
            f"{rejects.total} bad row(s) in the input; nothing was published.\n  {shown}"
            + (f"\n  ... and {more} more" if more > 0 else "")
            + f"\nAll reasons: {out / 'rejects.parquet'}. Fix the data, or set "
            "ingest.on_bad_rows=skip to leave these rows out."
        )
    if empty and config.on_bad_rows == "error":
        how = (
            "Fix or remove their category files"
            if all(e.startswith(f"{COMPOSITIONAL.name}:") for e in empty)
            else "Remove them from the source (or list the others in ingest.train_subsets / "
            "ingest.eval_subsets; a compositional category: fix or remove its file)"
        )
        raise BadRowsError(
            f"empty subset(s) {', '.join(empty)}: no usable rows. {how}, or set "
            "ingest.on_bad_rows=skip to carry on without them."
        )
    for table, written in rows.items():
        if written == 0:  # even with on_bad_rows=skip: an empty table is no dataset
            raise BadRowsError(
                f"no usable {table} rows: all {rejects.total} row(s) were rejected; nothing was "
                f"published. Reasons: {out / 'rejects.parquet'}"
            )
    if rejects.total:
        log.warning("ingest: skipped %d bad row(s); see rejects.parquet", rejects.total)
    rows["rejects"] = rejects.total
    eval_root = images_roots.get(EVAL.name)
    comp_root = images_roots.get(COMPOSITIONAL.name)
    missing = _compositional_sources(config)[1] if comp_root is not None else {}
    for bench, categories in missing.items():
        log.warning(
            "ingest: %s has no file for %s; its means are over the others",
            bench,
            ", ".join(categories),
        )
    return Tables(
        folder=out,
        pairs_images=images_roots.get(PAIRS.name),
        eval_images=eval_root,
        eval_images_digest=None if eval_root is None else images_digest(eval_root),
        compositional_images=comp_root,
        compositional_images_digest=None if comp_root is None else images_digest(comp_root),
        rows=rows,
        metrics={
            "rows": total_rows,
            "rejected_rows": rejects.total,
            "images_checked": checked,
            "seconds": elapsed,
            "rows_per_s": total_rows / elapsed if elapsed > 0 else 0.0,
        },
        info={
            "subsets": subsets_info,
            "empty_subsets": empty,
            # Eval queries whose correct candidate is listed twice, per subset (ties by design).
            "correct_duplicated": {
                k.split(":", 1)[1]: v["correct_duplicated"]
                for k, v in subsets_info.items()
                if v.get("correct_duplicated")
            },
            # Compositional categories without a file, per benchmark ({}: none missing).
            "compositional_missing": missing,
        },
    )


def _ingest_table(
    plan: _Plan,
    config: IngestConfig,
    root: Path,
    out_dir: Path,
    rejects: _Rejects,
    subsets_info: dict[str, dict[str, Any]],
    empty: list[str],
) -> tuple[int, int]:
    table = plan.table
    written = 0
    writer = pq.ParquetWriter(out_dir / f"{table.name}.parquet", table.schema)
    per_subset: dict[str, int] = {}
    try:
        with ImageChecker(root, config.image_workers) as checker:
            for source in plan.subsets:
                t0 = time.perf_counter()
                info = subset_info(source.subset, plan.sidecar)
                kept = bad = duplicated = 0
                for chunk in plan.reader(source, table.required, config.batch_rows):
                    records = [
                        {c: chunk.columns[c][i] for c in chunk.columns} for i in range(len(chunk))
                    ]
                    images = checker.check_many(
                        p
                        for i, r in enumerate(records)
                        if i not in chunk.row_errors
                        for p in table.image_paths(r)
                    )
                    good = []
                    for i, record in enumerate(records):
                        if i in chunk.row_errors:
                            rejects.add(table.name, chunk, i, "-", chunk.row_errors[i])
                            bad += 1
                            continue
                        rid, out, reason = table.convert(
                            record, info, source.split, chunk.row_number(i), images
                        )
                        if out is None:
                            rejects.add(table.name, chunk, i, rid, reason or "invalid")
                            bad += 1
                        else:
                            good.append(out)
                            duplicated += correct_is_duplicated(out)
                    if good:
                        writer.write_table(pa.Table.from_pylist(good, schema=table.schema))
                    kept += len(good)
                per_subset[source.subset] = per_subset.get(source.subset, 0) + kept
                subsets_info[f"{table.name}:{source.label}"] = {
                    "meta_task": info.meta_task,
                    "distribution": info.distribution,
                    "rows": kept,
                    "rejected": bad,
                    **({"correct_duplicated": duplicated} if table is EVAL else {}),
                }
                written += kept
                if duplicated:
                    log.warning(
                        "ingest eval %s: %d of %d queries list their correct candidate again "
                        "among the others; such a copy ties with it (P@1 in MMEB's argmax "
                        "convention counts the tie as correct, strict P@1 as a miss)",
                        source.label,
                        duplicated,
                        kept,
                    )
                log.info(
                    "ingest %s %s: %d rows kept, %d rejected (%.1fs)",
                    table.name,
                    source.label,
                    kept,
                    bad,
                    time.perf_counter() - t0,
                )
            n_checked = checker.checked
    finally:
        writer.close()
    empty.extend(f"{table.name}:{name}" for name, n in per_subset.items() if n == 0)
    return written, n_checked
