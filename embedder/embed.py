"""Stage function `embed`: zero-shot embeddings of the training pairs' queries and positives."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from embedder.artifacts import StageOutput
from embedder.config import EmbedConfig, ModelConfig, PipelineConfig
from embedder.model.backbone import Backbone, load_backbone
from embedder.model.encode import EmbedItem, EncodeSettings, encode
from embedder.model.prompts import PromptStrings, render

SHARDS_DIR = "shards"
KEYS_FILE = "pair_keys.parquet"


def open_backbone(model: ModelConfig, pretrain_dir: Path | None) -> Backbone:
    """The configured backbone; `tiny` means the generator the pretrain stage published."""
    if model.backbone == "tiny":
        if pretrain_dir is None:
            raise ValueError("model.backbone=tiny needs the pretrain stage's output")
        source: str | Path = pretrain_dir / "model"
    else:
        source = model.backbone
    return load_backbone(
        source,
        dtype=model.dtype,
        attn=model.attn,
        device=model.device,
        trust_remote_code=model.trust_remote_code,
        revision=model.revision,
    )


def settings_of(embed: EmbedConfig) -> EncodeSettings:
    return EncodeSettings(
        batch_size=embed.batch_size,
        shard_size=embed.shard_size,
        num_workers=embed.num_workers,
        padding_side=embed.padding_side,
        image_mode=embed.image_mode,
        image_side=embed.image_side,
        out_dtype=embed.out_dtype,
        max_pixels=embed.max_pixels,
    )


def strings_of(embed: EmbedConfig) -> PromptStrings:
    return PromptStrings(
        embed.system, embed.query_suffix_image, embed.query_suffix_text, embed.generic_system
    )


def make_item(
    text: str, image: str, *, template: str, role: str, image_token: str, strings: PromptStrings
) -> EmbedItem:
    rendered = render(
        template,
        text,
        has_image=bool(image),
        role=role,  # type: ignore[arg-type]
        image_token=image_token,
        strings=strings,
    )
    return EmbedItem(rendered, image)


def embed_pairs(
    config: PipelineConfig, ingest_dir: Path, pretrain_dir: Path | None, out_dir: Path
) -> StageOutput:
    """Embed every distinct query and positive of `pairs.parquet` into shards, and map each
    pair id to its query and positive keys (`pair_keys.parquet`)."""
    from embedder.artifacts import Manifest

    manifest = Manifest.from_json((ingest_dir / "manifest.json").read_text())
    images_root = Path(manifest.info["images_root"]["pairs"])
    backbone = open_backbone(config.model, pretrain_dir)
    token = backbone.image_token(config.model.wrapped_image_token)
    strings = strings_of(config.embed)
    pairs = pq.read_table(
        ingest_dir / "pairs.parquet",
        columns=["id", "subset", "qry_text", "qry_image", "pos_text", "pos_image"],
    ).to_pylist()
    items, qkeys, pkeys = [], [], []
    for row in pairs:
        q = make_item(
            row["qry_text"],
            row["qry_image"],
            template=config.embed.template,
            role="query",
            image_token=token,
            strings=strings,
        )
        p = make_item(
            row["pos_text"],
            row["pos_image"],
            template=config.embed.template,
            role="target",
            image_token=token,
            strings=strings,
        )
        items += [q, p]
        qkeys.append(q.key)
        pkeys.append(p.key)
    stats = encode(backbone, items, images_root, out_dir / SHARDS_DIR, settings_of(config.embed))
    pq.write_table(
        pa.table(
            {
                "id": [r["id"] for r in pairs],
                "subset": [r["subset"] for r in pairs],
                "qry_key": qkeys,
                "pos_key": pkeys,
            }
        ),
        out_dir / KEYS_FILE,
    )
    return StageOutput(
        rows={"pairs": len(pairs), "unique_items": stats.unique},
        metrics=stats.metrics(),
        info={
            "backbone": backbone.source,
            "template": config.embed.template,
            "device": str(backbone.device),
            "dtype": str(backbone.dtype),
        },
    )
