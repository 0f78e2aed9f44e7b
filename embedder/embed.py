"""Stage `embed`: zero-shot embeddings of the training pairs' queries and positives."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from embedder.config import EmbedConfig, ModelConfig
from embedder.datasets.schema import PAIR_KEYS_SCHEMA, PAIRS_SCHEMA, read_table, write_table
from embedder.model.backbone import Backbone, load_backbone
from embedder.model.encode import EmbedItem, current_slice, encode
from embedder.model.identity import resolve_hub_commit
from embedder.model.prompts import render
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


def make_item(
    text: str,
    image: str,
    *,
    template: str,
    role: str,
    image_token: str,
    strings: EmbedConfig,
    literal: Callable[[str], str] | None = None,
) -> EmbedItem:
    """One example as the model reads it; `literal` is the backbone's `as_text`, so that
    special-token strings in the data stay text (embedder.model.prompts.render)."""
    rendered = render(
        template,
        text,
        has_image=bool(image),
        role=role,  # type: ignore[arg-type]
        image_token=image_token,
        strings=strings,
        literal=literal,
    )
    return EmbedItem(rendered, image)


def embed_pairs(
    model: ModelConfig, cfg: EmbedConfig, data: Tables, generator: Generator | None, out: Path
) -> Embeddings:
    """Embed every distinct query and positive of the pairs table into shards, and map each
    pair to its query and positive keys."""
    if data.pairs_images is None:
        raise ValueError("the ingest output holds no training pairs to embed")
    backbone = open_backbone(model, generator)
    token = backbone.image_token(model.wrapped_image_token)
    pairs = read_table(
        data.pairs,
        PAIRS_SCHEMA,
        ["id", "subset", "meta_task", "fn_group", "qry_text", "qry_image", "pos_text", "pos_image"],
    ).to_pylist()
    items, qkeys, pkeys = [], [], []
    for row in pairs:
        q = make_item(
            row["qry_text"],
            row["qry_image"],
            template=cfg.template,
            role="query",
            image_token=token,
            strings=cfg,
            literal=backbone.as_text,
        )
        p = make_item(
            row["pos_text"],
            row["pos_image"],
            template=cfg.template,
            role="target",
            image_token=token,
            strings=cfg,
            literal=backbone.as_text,
        )
        items += [q, p]
        qkeys.append(q.key)
        pkeys.append(p.key)
    output = Embeddings(folder=out)
    stats = encode(backbone, items, data.pairs_images, output.shards, cfg)
    if current_slice() is not None:  # one worker of several: its shards are written
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
