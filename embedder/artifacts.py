"""The caching and resume contract for stage outputs (docs/design.md, "Caching and resuming").

A stage's output lives in `<workdir>/artifacts/<stage>/<fingerprint>/`. The fingerprint hashes
the stage name, its config section, the fingerprints of its inputs and the stage's code
version, so the same inputs always land in the same folder: that folder *is* the cache.

A stage writes into `<fingerprint>.partial/` (where long stages may resume), then
`publish()` writes `manifest.json` (files, sizes, checksums of small files, row counts,
metrics) and renames the folder into place in one atomic step. A folder without a manifest is
never a result, and a published folder whose files are missing or damaged fails `verify()`
and is recomputed, never trusted.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from embedder.outputs import StageOutput

log = logging.getLogger("gen2embed.artifacts")

MANIFEST = "manifest.json"
MANIFEST_TMP = "manifest.json.tmp"
RETIRED_INFIX = ".retired-"
PARTIAL_SUFFIX = ".partial"
# Files up to this size get a sha256 in the manifest that every verification checks; bigger
# files are checked by size only, so a cache hit never re-reads gigabytes.
CHECKSUM_MAX_BYTES = 8 * 1024 * 1024
WORKDIR_ENV = "GEN2EMBED_HOME"


def resolve_workdir(workdir: str | Path | None = None) -> Path:
    """`--workdir`, else $GEN2EMBED_HOME, else ./data; returned absolute (`~` expanded,
    symlinks resolved). Nothing is created or checked on disk."""
    chosen = workdir or os.environ.get(WORKDIR_ENV) or "data"
    return Path(chosen).expanduser().resolve()


def _canonical(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def fingerprint(
    stage: str,
    config: Mapping[str, Any],
    inputs: Mapping[str, str],
    code_version: str,
) -> str:
    """Content key of a stage's output: 20 hex chars of sha256 over a canonical JSON.

    Canonical: mapping keys sorted (as strings), tuples as lists, paths as strings, so equal
    settings give equal keys whatever their order. Raises TypeError when `config` or `inputs`
    holds a value JSON has no form for."""
    payload = json.dumps(
        {
            "stage": stage,
            "config": _canonical(config),
            "inputs": _canonical(inputs),
            "code": code_version,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _module_file(name: str) -> Path | None:
    """The source file of a project module, found on disk without importing anything
    beyond its top-level package (the closure must not import torch to hash a stage)."""
    root, *rest = name.split(".")
    spec = importlib.util.find_spec(root)
    if spec is None or not spec.origin or not spec.origin.endswith("__init__.py"):
        return None
    base = Path(spec.origin).parent.joinpath(*rest)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(path: Path, package: str) -> set[str]:
    """Every module an `import` anywhere in the file may load (functions included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            # `from pkg import mod` loads pkg.mod when it is a module.
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_closure(module: str) -> dict[str, Path]:
    """The modules of `module`'s own top-level package that importing it can run: its
    imports, theirs, and so on, with the packages they sit in.

    Returns dotted name -> source file. Read from the source with `ast`, never imported; a
    name that is not a module of the package (a function, a class) is skipped, as is
    `module` itself when its package cannot be found (an empty result). Raises SyntaxError
    for a module that does not parse."""
    root = module.split(".")[0]
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or name.split(".")[0] != root:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        todo += sorted(_imported_names(path, package))
    return seen


def code_version(function: Callable[..., Any]) -> str:
    """A stage's code version: a hash of the source of every project module its function's
    module imports, however indirectly.

    Derived, never listed by hand, so an edit to any module the stage runs can never leave a
    stale cache behind; the price is that a comment-only edit also recomputes the stage.
    Returns 12 hex chars of sha256 over (module name, file bytes) in name order (see
    `import_closure`).
    """
    digest = hashlib.sha256()
    for name, path in sorted(import_closure(function.__module__).items()):
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def create_once(path: Path, build: Callable[[Path], None]) -> None:
    """Create the file `path` once, atomically: under a lock (a second creator waits, then
    finds it), built by `build` into a temporary sibling that is renamed into place. A kill
    at any point leaves no file or a complete one; a killed build's leftovers are removed by
    the next attempt, a failed build's by this one.

    `build(tmp)` must write the file at `tmp` (it is fsynced, then renamed to `path`); the
    lock file `<name>.lock` stays beside it. Whatever `build` raises is re-raised after the
    clean-up; a `build` that writes nothing makes this raise FileNotFoundError."""
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.parent / f"{path.name}.lock"):  # flock: released if we die
        if path.is_file():
            return
        for stale in path.parent.glob(f"{path.name}.tmp-*"):
            stale.unlink()
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            build(tmp)
        except BaseException:
            for leftover in path.parent.glob(f"{tmp.name}*"):  # with SQLite's -wal, -shm
                leftover.unlink(missing_ok=True)
            raise
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        tmp.replace(path)


def _strict(value: Any) -> Any:
    """`value` with every float that JSON cannot hold (NaN, +-inf) as None, numpy scalars as
    Python numbers, and mappings with string keys."""
    if isinstance(value, Mapping):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        value = value.item()  # numpy and torch scalars
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def json_text(value: Any, *, indent: int | None = None, sort_keys: bool = False) -> str:
    """Strict JSON (RFC 8259) for a published file: Python's `json` writes NaN and Infinity,
    which other readers (jq, JavaScript, Java, Go, MLflow's UI) reject, so non-finite floats
    are written as null. Raises TypeError for values JSON has no form for."""
    return json.dumps(_strict(value), indent=indent, sort_keys=sort_keys, allow_nan=False)


def stat_key(st: os.stat_result) -> str:
    """What says a file may have changed without reading it: size, mtime, ctime and inode.
    ctime too because `cp -p`, `rsync -a` and `tar x` put the old mtime back on new bytes of
    the same size, while any write moves ctime, which no tool can set back; the inode because
    a file replaced by a rename is another file."""
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 (64 chars) of the file's bytes, read `chunk` bytes at a time (1 MiB by
    default). Raises OSError (FileNotFoundError, ...) when the file cannot be read."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Manifest:
    """What a published stage folder holds; stored as manifest.json inside it.

    `files`: path relative to the folder -> {"size": bytes, "sha256": hex}, the checksum only
    for files of at most CHECKSUM_MAX_BYTES (8 MiB). `created`: Unix time, seconds."""

    stage: str
    fingerprint: str
    code_version: str
    config: dict[str, Any]
    inputs: dict[str, str]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    # The stage's typed output fields (embedder.outputs), to rebuild it on a cache hit.
    output: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0

    def to_json(self) -> str:
        """The manifest as strict JSON (`json_text`: non-finite floats as null), indented,
        keys sorted. Raises TypeError for a field value JSON has no form for."""
        return json_text(self.__dict__, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """The manifest `to_json` wrote. Raises ValueError (json.JSONDecodeError) for text
        that is not JSON and TypeError for JSON that is not a mapping of exactly the
        manifest's fields (a missing required field or an unknown one)."""
        return cls(**json.loads(text))


class ArtifactStore:
    """Stage folders under `<workdir>/artifacts`.

    `workdir` as `resolve_workdir` picks it; nothing is created until a method writes.
    Layout per stage: `<fp>/` published, `<fp>.partial/` being written, `<fp>.lock`."""

    def __init__(self, workdir: str | Path | None = None) -> None:
        self.workdir = resolve_workdir(workdir)
        self.root = self.workdir / "artifacts"

    def path(self, stage: str, fp: str) -> Path:
        """Where the published folder of `stage` at fingerprint `fp` lives (may not exist)."""
        return self.root / stage / fp

    def partial_path(self, stage: str, fp: str) -> Path:
        """Where `stage` at `fp` is written before it is published: `<fp>.partial`."""
        return self.root / stage / f"{fp}{PARTIAL_SUFFIX}"

    @contextmanager
    def lock(self, stage: str, fp: str) -> Iterator[None]:
        """Exclusive right to compute one stage folder: a nightly run and a manual run of the
        same fingerprint must not write into the same partial folder at once.

        A context manager over the file lock `<stage>/<fp>.lock`; blocks, without a time
        limit, while another process holds it."""
        path = self.root / stage / f"{fp}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        # filelock's flock-based lock: the kernel releases it when its holder dies (SIGKILL
        # included), so a crashed run never blocks the next one.
        lock = FileLock(path)
        try:
            lock.acquire(blocking=False)
        except Timeout:
            log.info("%s/%s: another process is computing it; waiting", stage, fp)
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def open_partial(self, stage: str, fp: str, *, fresh: bool = False) -> Path:
        """The folder a stage writes into. Kept across attempts so long stages can resume;
        `fresh=True` empties it first (a forced recompute must not reuse half-done work).

        Created when missing. A stale manifest in it (a crash before the rename) and folders
        retired by a killed publish are removed. Call it under `lock`."""
        partial = self.partial_path(stage, fp)
        if fresh and partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        # A manifest (or its temporary file) left by a crash before the rename is stale.
        (partial / MANIFEST).unlink(missing_ok=True)
        (partial / MANIFEST_TMP).unlink(missing_ok=True)
        # A folder retired by a publish that was killed before it could delete it.
        for retired in partial.parent.glob(f"{fp}{RETIRED_INFIX}*"):
            shutil.rmtree(retired, ignore_errors=True)
        return partial

    def verify(self, stage: str, fp: str) -> list[str]:
        """Problems with the published folder, one sentence each; empty when it can be
        trusted (see `verify_folder`)."""
        return verify_folder(self.path(stage, fp))

    def load(self, stage: str, fp: str) -> Manifest | None:
        """The manifest of a published, verified result, or None (logging why not). Checks
        every file's size, and the checksum of the small ones, so it reads up to 8 MiB a
        file."""
        problems = self.verify(stage, fp)
        if problems:
            log.info("%s/%s: not reusable (%s)", stage, fp, "; ".join(problems[:3]))
            return None
        return Manifest.from_json((self.path(stage, fp) / MANIFEST).read_text())

    def publish(
        self,
        stage: str,
        fp: str,
        *,
        code_version: str,
        config: Mapping[str, Any],
        inputs: Mapping[str, str],
        output: StageOutput,
    ) -> Manifest:
        """Write manifest.json into the partial folder and rename it into place.

        A published folder already at the destination (a damaged one, or a forced recompute)
        is moved aside first and deleted after the new one is in place.

        The manifest lists every file of the partial folder (sizes, and sha256 of files of at
        most 8 MiB), `output`'s rows, metrics (non-finite ones left out), info and own fields
        (paths relative to the workdir). Raises FileNotFoundError when the partial folder does
        not exist, and TypeError when `output.info` or `config` holds a value JSON has no form
        for (nothing is renamed then). Returns the manifest written.
        """
        partial = self.partial_path(stage, fp)
        if not partial.is_dir():
            raise FileNotFoundError(f"no partial folder to publish: {partial}")
        files: dict[str, dict[str, Any]] = {}
        for path in sorted(p for p in partial.rglob("*") if p.is_file()):
            rel = path.relative_to(partial).as_posix()
            if rel in (MANIFEST, MANIFEST_TMP):
                continue
            entry: dict[str, Any] = {"size": path.stat().st_size}
            if entry["size"] <= CHECKSUM_MAX_BYTES:
                entry["sha256"] = sha256_file(path)
            files[rel] = entry
        manifest = Manifest(
            stage=stage,
            fingerprint=fp,
            code_version=code_version,
            config=_canonical(dict(config)),
            inputs=dict(inputs),
            files=files,
            rows=dict(output.rows),
            # A metric without a value (a rate over nothing) is left out, never NaN.
            metrics={k: float(v) for k, v in output.metrics.items() if math.isfinite(float(v))},
            info=_canonical(dict(output.info)),
            output=output.own_fields(self.workdir),
            created=time.time(),
        )
        tmp = partial / MANIFEST_TMP
        tmp.write_text(manifest.to_json())
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        tmp.replace(partial / MANIFEST)

        final = self.path(stage, fp)
        retired = None
        if final.exists():
            retired = final.with_name(f"{fp}{RETIRED_INFIX}{os.getpid()}-{time.time_ns()}")
            final.rename(retired)
        partial.rename(final)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
        return manifest


def verify_folder(folder: Path) -> list[str]:
    """Check a published folder against its manifest: present, same size, same checksum.

    Returns the problems, one sentence each (empty: trustworthy). A missing folder, a
    missing or unreadable manifest is a problem, never an exception; an OSError reading a
    file is let through."""
    manifest_path = folder / MANIFEST
    if not folder.is_dir():
        return [f"{folder} does not exist"]
    if not manifest_path.is_file():
        return [f"{folder} has no {MANIFEST} (never published)"]
    try:
        manifest = Manifest.from_json(manifest_path.read_text())
        if not isinstance(manifest.files, dict):
            raise TypeError("`files` is not a mapping")
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        return [f"{manifest_path} is unreadable: {exc}"]
    problems = []
    for rel, entry in manifest.files.items():
        path = folder / rel
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int):
            problems.append(f"{rel}: manifest entry without a size ({entry!r})")
        elif not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{rel}: size {path.stat().st_size} != recorded {entry['size']}")
        elif "sha256" in entry and sha256_file(path) != entry["sha256"]:
            problems.append(f"{rel}: checksum differs from the recorded one")
    return problems
