"""Stage `embed`: zero-shot embeddings of the training pairs' queries and positives."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from embedder.config import EmbedConfig, ModelConfig
from embedder.datasets.schema import PAIR_KEYS_SCHEMA, PAIRS_SCHEMA, read_table, write_table
from embedder.model.backbone import Backbone, load_backbone
from embedder.model.encode import EmbedItem, encode
from embedder.model.identity import resolve_hub_commit
from embedder.model.prompts import CAPTION_PROMPT, PromptStrings, Role, Template, render
from embedder.model.shards import ShardSlice
from embedder.outputs import Embeddings, Generator, Tables


def open_backbone(model: ModelConfig, generator: Generator | None) -> Backbone:
    """The configured backbone; `tiny` means the generator the pretrain stage published."""
    revision = model.revision
    if model.backbone == "tiny":
        if generator is None:
            raise ValueError("model.backbone=tiny needs the pretrain stage's output")
        source: str | Path = generator.model_dir
    else:
        source = model.backbone
        if not Path(source).expanduser().is_dir():
            # The commit the stage's fingerprint holds (resolved once per process), not
            # whatever the branch points at by the time the weights download.
            revision = resolve_hub_commit(model.backbone, model.revision)
    return load_backbone(
        source,
        dtype=model.dtype,
        attn=model.attn,
        device=model.device,
        trust_remote_code=model.trust_remote_code,
        revision=revision,
    )


@dataclass(frozen=True)
class ItemBuilder:
    """How one model's inputs are rendered: the template, the backbone's image token, the
    prompt strings (the embed section, or an adapter's record of them) and `literal`, the
    backbone's `as_text`, so that special-token strings in the data stay text
    (embedder.model.prompts.render). The one place a row becomes its items: the embed,
    finetune and evaluate stages and `embedder.inference.Embedder` all build through it, so
    an item has one rendering, hence one key, wherever it is embedded."""

    template: Template
    image_token: str
    strings: PromptStrings | EmbedConfig
    literal: Callable[[str], str] | None = None

    def item(self, text: str, image: str, role: Role) -> EmbedItem:
        """One example as the model reads it; `image` a path relative to the images root
        ("" for none)."""
        rendered = render(
            self.template,
            text,
            has_image=bool(image),
            role=role,
            image_token=self.image_token,
            strings=self.strings,
            literal=self.literal,
        )
        return EmbedItem(rendered, image)

    def pair(self, row: Mapping[str, Any]) -> tuple[EmbedItem, EmbedItem]:
        """A training pair (a pairs-table row: `qry_text`, `qry_image`, `pos_text`,
        `pos_image`) as its query item and its positive, a target."""
        return (
            self.item(row["qry_text"], row["qry_image"], "query"),
            self.item(row["pos_text"], row["pos_image"], "target"),
        )

    def eval_row(self, row: Mapping[str, Any]) -> tuple[EmbedItem, list[EmbedItem]]:
        """An eval-table row (`subset`, `qry_text`, `qry_image`, and the lists `tgt_text`,
        `tgt_image`) as its query item and its candidates, in order. MMEB: candidates are
        targets (no query suffix), except in "matching" subsets, where both sides are
        queries."""
        role: Role = "query" if "matching" in row["subset"].lower() else "target"
        query = self.item(row["qry_text"], row["qry_image"], "query")
        cands = [
            self.item(t, im, role) for t, im in zip(row["tgt_text"], row["tgt_image"], strict=True)
        ]
        return query, cands

    def eval_table(
        self, rows: Sequence[Mapping[str, Any]]
    ) -> tuple[list[EmbedItem], list[str], list[list[str]]]:
        """Every row's query and candidates (`eval_row`), in table order: the items to embed
        (copies included), each row's query key and each row's candidate keys, correct first
        (what embedder.evaluate.subset_scores reads)."""
        items: list[EmbedItem] = []
        qkeys: list[str] = []
        ckeys: list[list[str]] = []
        for row in rows:
            query, cands = self.eval_row(row)
            items += [query, *cands]
            qkeys.append(query.key)
            ckeys.append([c.key for c in cands])
        return items, qkeys, ckeys

    def compositional_row(self, row: Mapping[str, Any]) -> dict[str, EmbedItem | None]:
        """A compositional-table row (`image`, `caption`, `caption2`, `negative`) as its items,
        as the authors' SugarCrepe and SugarCrepe++ scripts embed them (docs/method.md
        section 8): the image as a target with no text, every caption as a query behind
        `CAPTION_PROMPT`. Keys "image", "caption", "negative" and "caption2" (None when the
        row has no second caption)."""

        def caption(text: str) -> EmbedItem:
            return self.item(CAPTION_PROMPT + text, "", "query")

        second = row.get("caption2")
        return {
            "image": self.item("", row["image"], "target"),
            "caption": caption(row["caption"]),
            "negative": caption(row["negative"]),
            "caption2": None if second is None else caption(second),
        }

    def compositional_table(
        self, rows: Sequence[Mapping[str, Any]]
    ) -> tuple[list[EmbedItem], list[dict[str, str | None]]]:
        """Every row's items (`compositional_row`), in table order, and each row's item keys
        by role (what embedder.compositional.benchmark_scores reads). A caption or image two
        rows share is one key, so it is embedded once."""
        items: list[EmbedItem] = []
        keys: list[dict[str, str | None]] = []
        for row in rows:
            found = self.compositional_row(row)
            items += [it for it in found.values() if it is not None]
            keys.append({k: None if it is None else it.key for k, it in found.items()})
        return items, keys


def make_item(
    text: str,
    image: str,
    *,
    template: Template,
    role: Role,
    image_token: str,
    strings: PromptStrings | EmbedConfig,
    literal: Callable[[str], str] | None = None,
) -> EmbedItem:
    """One example as the model reads it (`ItemBuilder.item`, for a single item)."""
    return ItemBuilder(template, image_token, strings, literal).item(text, image, role)


def embed_pairs(
    model: ModelConfig,
    cfg: EmbedConfig,
    data: Tables,
    generator: Generator | None,
    out: Path,
    shard: ShardSlice | None = None,
) -> Embeddings:
    """Stage `embed`: embed every distinct query and positive of the pairs table with the
    `cfg.template` prompts (docs/method.md section 2) and map each pair to its keys.

    Writes under `out`: `shards/` (embedder.model.encode: `shard-NNNNN.parquet` of
    (key: string, embedding: d float32, L2-normalised), stats and plan files; resumable by
    shard) and `pair_keys.parquet` (PAIR_KEYS_SCHEMA: id, subset, meta_task, fn_group,
    qry_key, pos_key; one row per pair, table order). With `shard` (one fan-out worker,
    tasks.scale) only that worker's shards are written and the output's metadata is empty:
    the whole call that follows assembles. Metrics: encode's throughput (items/s) and
    padding share.

    Raises ValueError when the ingest output holds no pairs (or model.backbone=tiny without
    a generator), NotAModelError or UnsafeWeightsError (UserErrors) for a model folder that
    cannot be opened safely (embedder.model.backbone), and
    encode's errors (embedder.model.encode.encode)."""
    if data.pairs_images is None:
        raise ValueError("the ingest output holds no training pairs to embed")
    backbone = open_backbone(model, generator)
    token = backbone.image_token(model.wrapped_image_token)
    pairs = read_table(
        data.pairs,
        PAIRS_SCHEMA,
        ["id", "subset", "meta_task", "fn_group", "qry_text", "qry_image", "pos_text", "pos_image"],
    ).to_pylist()
    build = ItemBuilder(cfg.template, token, cfg, backbone.as_text)
    items, qkeys, pkeys = [], [], []
    for row in pairs:
        q, p = build.pair(row)
        items += [q, p]
        qkeys.append(q.key)
        pkeys.append(p.key)
    output = Embeddings(folder=out)
    stats = encode(backbone, items, data.pairs_images, output.shards, cfg, share=shard)
    if shard is not None:  # one worker of several: its shards are written
        return output
    columns = {c: [r[c] for r in pairs] for c in ("id", "subset", "meta_task", "fn_group")}
    write_table(
        pa.table({**columns, "qry_key": qkeys, "pos_key": pkeys}),
        output.pair_keys,
        PAIR_KEYS_SCHEMA,
    )
    return output.model_copy(
        update={
            "rows": {"pairs": len(pairs), "unique_items": stats.unique},
            "metrics": stats.metrics(),
            "info": {
                "backbone": backbone.source,
                "template": cfg.template,
                "device": str(backbone.device),
                "dtype": str(backbone.dtype),
            },
        }
    )
