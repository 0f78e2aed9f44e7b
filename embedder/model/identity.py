"""What a backbone *is*, for cache keys: a local folder's content, a hub model's commit.

A stage that runs the model (embed, finetune, evaluate) must not reuse its output after the
weights changed. A local folder's name says nothing about that (replace `model.safetensors`
in place and the path stays the same), and a hub id without a pinned revision means "whatever
`main` is today". So:

- a local folder is identified by the sha256 of every file the model loads from it (weights,
  config, tokenizer, processor and chat-template files; not READMEs or hidden files). Hashing
  gigabytes on every run would cost seconds to minutes, so each file's digest is remembered
  in a small JSON cache keyed by its path and `stat` (size, mtime, ctime, inode): a file is
  read again only after it changed. Any write or replace moves ctime, which no tool can set
  back, so a changed file is never taken for the old one;
- a hub model is identified by the commit its revision resolves to, asked of the hub (or,
  offline, of the local hub cache, as transformers would load it). A revision that is already
  a full commit hash is used as is, with no network.

The tiny generator is neither: the pretrain stage's fingerprint stands for it. An adapter a
table row names (`table.rows[].adapter`: a released adapter, evaluated as is) is identified
the same way, as a folder's content or a hub repo's commit (`adapter_identity`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from embedder.artifacts import resolve_workdir, sha256_file, stat_key
from embedder.errors import UserError

log = logging.getLogger("gen2embed.identity")

COMMIT = re.compile(r"^[0-9a-f]{40}$")
# Files of a model folder that do not change what the model computes.
_IGNORED = re.compile(r"^(README.*|LICEN[CS]E.*|.*\.md|\.gitattributes)$", re.IGNORECASE)
_CACHE_LOCK = threading.Lock()


class ModelIdentityError(UserError, OSError):
    """The model's identity cannot be established (no network and not in the hub cache)."""


@dataclass(frozen=True)
class ModelIdentity:
    """`source` as given; `digest`: the folder's content hash or the resolved commit;
    `revision`: the commit to load (hub models), None for local folders."""

    source: str
    digest: str
    revision: str | None

    def as_inputs(self, kind: str = "model") -> dict[str, str]:
        """The fingerprint inputs this identity contributes (recorded in the manifest):
        `<kind>:content` or `<kind>:commit`."""
        if self.revision is None:
            return {f"{kind}:content": self.digest}
        return {f"{kind}:commit": self.digest}


def model_files(folder: Path) -> list[Path]:
    """The files of a local model folder that define what it computes, sorted.

    Every file under `folder` (sub-folders included) except those under a hidden name and
    READMEs, licences, Markdown and .gitattributes. Empty for a folder that does not exist."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and not _IGNORED.match(p.name)
    )


class DigestCache:
    """sha256 digests of files, remembered by path and `stat` in one JSON file.

    Concurrent writers may each rewrite the file (atomically, by rename); the worst a lost
    update costs is one more read of that file later.

    `path`: the JSON file ({resolved path: {"stat": stat_key, "sha256": hex}}), None for no
    persistence (every file is read). An unreadable or damaged cache file counts as empty.
    `hashed_bytes`: bytes this instance read to hash."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.hashed_bytes = 0  # bytes read by this instance (what the cache saved, by contrast)

    def _load(self) -> dict[str, dict[str, str]]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # a damaged cache is only a slower run
        return data if isinstance(data, dict) else {}

    def _save(self, data: dict[str, dict[str, str]]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        tmp.write_text(json.dumps(data, sort_keys=True))
        tmp.replace(self.path)

    def digests(self, files: list[Path]) -> dict[Path, str]:
        """Each file's sha256 (64 hex), keyed by the path as given: from the cache when the
        file's `stat_key` is unchanged, else read (and the cache file rewritten). Thread-safe
        within a process. Raises OSError (FileNotFoundError, ...) when a file cannot be
        stat'ed or read, or the cache cannot be written."""
        with _CACHE_LOCK:
            known = self._load()
            out, changed = {}, False
            for path in files:
                name, key = str(path.resolve()), stat_key(path.stat())
                entry = known.get(name)
                if entry is None or entry.get("stat") != key:
                    entry = {"stat": key, "sha256": sha256_file(path)}
                    self.hashed_bytes += path.stat().st_size
                    known[name] = entry
                    changed = True
                out[path] = entry["sha256"]
            if changed:
                self._save(known)
            return out


def workdir_cache() -> DigestCache:
    """The digest cache of the current workdir ($GEN2EMBED_HOME, else ./data), shared by
    every stage and process of that workdir."""
    return DigestCache(resolve_workdir() / "cache" / "file-digests.json")


def folder_digest(folder: Path, cache: DigestCache) -> str:
    """sha256 over the (relative name, sha256) of every file in `model_files(folder)`.

    Raises ModelIdentityError when the folder holds no model files. Returns 64 hex chars;
    the same files with the same bytes give the same digest wherever the folder sits."""
    files = model_files(folder)
    if not files:
        raise ModelIdentityError(f"model folder {folder} holds no files")
    digests = cache.digests(files)
    lines = [f"{p.relative_to(folder).as_posix()}\0{digests[p]}" for p in files]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def could_be_hub_id(source: str) -> bool:
    """Whether `source` (not an existing folder) can name a hub repo: `name` or `owner/name`,
    not a path (absolute, `.`/`~`-relative, or deeper than one slash)."""
    return bool(source) and not (
        Path(source).expanduser().is_absolute()
        or source.startswith((".", "~"))
        or source.count("/") > 1
    )


@lru_cache(maxsize=64)
def resolve_hub_commit(repo: str, revision: str | None, setting: str = "model.revision") -> str:
    """The commit `revision` (None: the default branch) of hub model `repo` points at now.

    Asks the hub; offline (HF_HUB_OFFLINE, or the hub unreachable) reads the local hub cache
    as transformers would load from it. Raises ModelIdentityError when neither knows; its
    message suggests pinning `setting` (the configuration key of the revision).

    Returns the 40-hex commit; a `revision` that already is one is returned with no lookup.
    Answers are remembered for the process (lru_cache), so a branch moving mid-run does
    not change it."""
    if revision is not None and COMMIT.match(revision):
        return revision
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on"):
            sha = HfApi().model_info(repo, revision=revision).sha
            if sha:
                return sha
    except Exception as exc:  # no network, proxy errors, ...: fall back to the local cache
        log.info("hub unreachable for %s (%s); reading the local hub cache", repo, exc)
    try:
        snapshot = snapshot_download(repo, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise ModelIdentityError(
            f"cannot tell which commit of {repo} revision {revision or 'main'} to use: the hub "
            f"is unreachable and the local hub cache does not hold it ({exc}). Connect, or set "
            f"{setting} to a 40-character commit hash"
        ) from None
    return Path(snapshot).name


def model_identity(backbone: str, revision: str | None, cache: DigestCache) -> ModelIdentity:
    """The identity of backbone `backbone` (a local folder or a hub id).

    Raises ModelIdentityError (see resolve_hub_commit and folder_digest). A local folder
    with `revision` set is an error: a folder has no revisions, the setting would do nothing."""
    return _identity(backbone, revision, cache, "model.backbone", "model.revision")


def adapter_identity(adapter: str, revision: str | None, cache: DigestCache) -> ModelIdentity:
    """The identity of a released adapter a table row names (`table.rows[].adapter`, a local
    peft folder or a hub id): its files' content, or the commit its revision resolves to.
    Raises ModelIdentityError as `model_identity` does."""
    return _identity(
        adapter, revision, cache, "table.rows[].adapter", "table.rows[].adapter_revision"
    )


def _identity(
    source: str, revision: str | None, cache: DigestCache, source_key: str, revision_key: str
) -> ModelIdentity:
    folder = Path(source).expanduser()
    if folder.is_dir():
        if revision is not None:
            raise ModelIdentityError(
                f"{revision_key}={revision!r} is set but {source_key} {source} is a local "
                f"folder, which has no revisions: drop {revision_key}"
            )
        return ModelIdentity(source, folder_digest(folder.resolve(), cache), None)
    if not could_be_hub_id(source):
        # Hub ids are `name` or `owner/name`: this was meant as a folder.
        raise ModelIdentityError(f"{source_key} {source}: no such folder")
    commit = resolve_hub_commit(source, revision, revision_key)
    return ModelIdentity(source, commit, commit)
