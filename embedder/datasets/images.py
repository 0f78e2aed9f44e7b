"""Image checks for ingest: the path stays inside the images root, the file exists, decodes.

MMEB ships images apart from its tables (zip files unpacked by hand), so missing files, half
unpacked folders, macOS `._` metadata files and paths escaping the root are common; each gets
a reason a person can act on.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath, PureWindowsPath

from embedder.image_files import ImagePathError, read_image_file, resolve_image_path

# Results are remembered for recently seen paths: eval candidate lists repeat images heavily.
_MEMO_SIZE = 200_000


def path_problem(root: Path, rel: str, found: Path | None = None) -> str | None:
    """Why `rel` may not be used as an image path under `root`, without reading the file: its
    spelling (absolute, '..', a macOS '._' file), then whether the file, `found` (where
    `resolve_image_path` matched it under Unicode normalization; default `root / rel`),
    resolves outside `root` through a symlink.

    `root` must be absolute and resolved (as `ImageChecker` holds it) for the symlink check
    to mean anything. Returns None when the path may be used, else the reason, a sentence
    naming `rel`."""
    if (
        PurePosixPath(rel).is_absolute()
        or PureWindowsPath(rel).is_absolute()
        or rel.startswith("~")
    ):
        return f"absolute path {rel!r} (image paths must be relative to the images root)"
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    if ".." in parts:
        return f"path {rel!r} contains '..' (must stay inside the images root)"
    if PurePosixPath(rel).name.startswith("._"):
        return f"{rel!r} is a macOS '._' metadata file, not an image"
    full = (root / rel if found is None else found).resolve()
    if not full.is_relative_to(root):
        return f"path {rel!r} resolves outside the images root (symlink?)"
    return None


def check_image(root: Path, rel: str) -> str | None:
    """None if `rel` is a readable image inside `root`, else the reason it is not.

    The file is found and decoded exactly as the embed stage will (`read_image`: names matched
    under Unicode normalization, a full decode to RGB), so what passes here opens the same way
    there.

    `root`: absolute and resolved. Every decode error is a reason, never raised; an OSError
    listing a folder (e.g. no permission) is let through."""
    problem = path_problem(root, rel)  # spelling first: an absolute or '..' path is not looked up
    if problem:
        return problem
    try:
        full = resolve_image_path(root, rel)
    except ImagePathError as exc:  # not found, or two names differing only in normalization
        return str(exc)
    problem = path_problem(root, rel, full)
    if problem:
        return problem
    if not full.is_file():
        return f"image {rel!r} not found under {root} (not a file)"
    try:
        read_image_file(full)  # a full decode: truncated files pass open() but fail here
    except Exception as exc:
        # Pillow's plugins raise many types on malformed files (OSError, SyntaxError,
        # ValueError, DecompressionBombError, but also struct.error, IndexError, EOFError...);
        # any of them would fail the embed stage the same way, so each is a bad row here.
        return f"image {rel!r} cannot be decoded ({type(exc).__name__}: {exc})"
    return None


class ImageChecker:
    """Checks many images in parallel threads (Pillow releases the GIL while decoding).

    `root` is resolved; raises FileNotFoundError when it is not a folder. `workers`: threads.
    Results are remembered for the last 200,000 distinct paths. `checked` counts the paths
    actually checked (memo hits left out). Use it as a context manager, or call `close`."""

    def __init__(self, root: Path, workers: int = 8) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"images root {self.root} does not exist or is not a folder")
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imgcheck")
        self._memo: OrderedDict[str, str | None] = OrderedDict()
        self.checked = 0

    def check_many(self, paths: Iterable[str]) -> dict[str, str | None]:
        """Map each non-empty path to its problem (None when fine); see `check_image`. Empty
        strings ("no image") are left out of the result. Blocks until every path is checked."""
        wanted = {p for p in paths if p}
        out: dict[str, str | None] = {}
        todo = []
        for p in wanted:
            if p in self._memo:
                self._memo.move_to_end(p)
                out[p] = self._memo[p]
            else:
                todo.append(p)
        for p, problem in zip(
            todo, self._pool.map(lambda rel: check_image(self.root, rel), todo), strict=True
        ):
            out[p] = problem
            self._memo[p] = problem
        self.checked += len(todo)
        while len(self._memo) > _MEMO_SIZE:
            self._memo.popitem(last=False)
        return out

    def close(self) -> None:
        """Stop the worker threads, waiting for running checks; the checker is unusable
        after."""
        self._pool.shutdown(wait=True)

    def __enter__(self) -> ImageChecker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
