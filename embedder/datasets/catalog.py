"""Meta-task and IND/OOD of the 36 MMEB subsets (docs/method.md section 5), and of other data.

MMEB-train and MMEB-eval spell some names differently (ImageNet_1K vs ImageNet-1K), so names
are matched after lower-casing and dropping everything but letters and digits. Data that is
not MMEB (the miniature world, a user's own dump) describes its subsets in a `subsets.json`
beside the subset folders: {"Name": {"meta_task": "retrieval", "distribution": "ind"}}.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from embedder.datasets.schema import DISTRIBUTIONS, META_TASKS
from embedder.errors import UserError

SIDECAR = "subsets.json"

_MMEB: dict[str, tuple[str, list[str], list[str]]] = {
    "classification": (
        "classification",
        ["ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397"],
        ["Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211"],
    ),
    "vqa": (
        "vqa",
        ["OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W"],
        ["ScienceQA", "VizWiz", "GQA", "TextVQA"],
    ),
    "retrieval": (
        "retrieval",
        [
            "VisDial",
            "CIRR",
            "VisualNews_t2i",
            "VisualNews_i2t",
            "MSCOCO_t2i",
            "MSCOCO_i2t",
            "NIGHTS",
            "WebQA",
        ],
        ["FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS"],
    ),
    "grounding": (
        "grounding",
        ["MSCOCO"],
        ["RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"],
    ),
}


@dataclass(frozen=True)
class SubsetInfo:
    """A subset's name as given, its meta-task (one of schema.META_TASKS:
    classification, vqa, retrieval, grounding) and distribution ("ind" or "ood"),
    docs/method.md section 5."""

    name: str
    meta_task: str
    distribution: str  # "ind" or "ood"


def normalise(name: str) -> str:
    """The key subset names are matched by: lower-cased, everything but ASCII letters and
    digits dropped ("ImageNet_1K" and "ImageNet-1K" both give "imagenet1k")."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


MMEB_SUBSETS: dict[str, SubsetInfo] = {
    normalise(name): SubsetInfo(name, meta_task, dist)
    for meta_task, ind, ood in _MMEB.values()
    for dist, names in (("ind", ind), ("ood", ood))
    for name in names
}


class UnknownSubsetError(UserError, ValueError):
    """A subset that is neither in MMEB nor described by a valid `subsets.json`."""


def read_sidecar(folder: Path) -> dict[str, SubsetInfo]:
    """The subsets described by `folder/subsets.json`, keyed by `normalise`d name; {} when
    the file is absent. `distribution` defaults to "ind". Raises UnknownSubsetError (a
    UserError) when the file is not UTF-8 JSON, not an object of objects, or an entry's
    meta_task or distribution is not a known one."""
    path = folder / SIDECAR
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UnknownSubsetError(f"{path} is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise UnknownSubsetError(
            f'{path}: expected an object {{"Subset": {{"meta_task": ...}}}}, got a '
            f"{type(raw).__name__}"
        )
    out = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict):
            raise UnknownSubsetError(
                f"{path}: subset {name!r} needs an object with meta_task, got {entry!r}"
            )
        meta_task = entry.get("meta_task")
        dist = entry.get("distribution", "ind")
        if meta_task not in META_TASKS or dist not in DISTRIBUTIONS:
            raise UnknownSubsetError(
                f"{path}: subset {name!r} needs meta_task in {META_TASKS} and distribution in "
                f"{DISTRIBUTIONS}, got {entry!r}"
            )
        out[normalise(name)] = SubsetInfo(name, meta_task, dist)
    return out


def subset_info(name: str, sidecar: dict[str, SubsetInfo]) -> SubsetInfo:
    """The sidecar wins over the MMEB table so users can relabel; unknown names are an error.

    `sidecar`: as `read_sidecar` returns it. The result carries `name` as given. Raises
    UnknownSubsetError (a UserError) for a name in neither."""
    key = normalise(name)
    found = sidecar.get(key) or MMEB_SUBSETS.get(key)
    if found is None:
        raise UnknownSubsetError(
            f"subset {name!r} is not an MMEB subset; describe it in a {SIDECAR} beside the "
            'subset folders, e.g. {"' + name + '": {"meta_task": "retrieval", '
            '"distribution": "ind"}}'
        )
    return SubsetInfo(name, found.meta_task, found.distribution)
