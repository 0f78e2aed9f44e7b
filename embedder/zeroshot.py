"""Zero-shot Precision@1 on an eval table (MMEB format), per template.

Strict P@1: a query scores only when its correct candidate (index 0) beats every other
candidate by more than `TIE_EPS`. An untrained model maps everything to nearly the same
vector; with the correct candidate first, a plain argmax would call that a perfect score.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from embedder.config import EmbedConfig, ModelConfig, ZeroshotConfig
from embedder.datasets.schema import EVAL_SCHEMA, read_table
from embedder.embed import make_item, open_backbone
from embedder.model.encode import encode
from embedder.model.shards import load_embeddings
from embedder.outputs import Generator, Tables, ZeroShotReport

log = logging.getLogger("gen2embed.zeroshot")
TIE_EPS = 1e-6


def strict_hits(query: np.ndarray, candidates: np.ndarray) -> bool:
    scores = candidates @ query
    return bool(scores[0] > scores[1:].max() + TIE_EPS) if len(scores) > 1 else True


def precision_at_1(
    rows: list[dict[str, Any]],
    qkeys: list[str],
    ckeys: list[list[str]],
    vectors: dict[str, np.ndarray],
) -> dict[str, float]:
    """Per-subset strict P@1."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for row, qk, cks in zip(rows, qkeys, ckeys, strict=True):
        cand = np.stack([vectors[k] for k in cks])
        hits[row["subset"]].append(strict_hits(vectors[qk], cand))
    return {s: float(np.mean(h)) for s, h in sorted(hits.items())}


NEXT_TOKEN_QUERIES = 60


def next_tokens(
    backbone: Any, items: list[Any], images_root: Path, settings: Any, batch: int = 12
) -> dict[str, float]:
    """Which token the model would generate next from each query's final position, as shares:
    shows *why* a template's final state carries content (the category) or not ("The")."""
    import torch

    from embedder.model.encode import ProcessedBatches, pool_last_token

    tok_of = backbone.processor.tokenizer
    batches = ProcessedBatches(
        [items[i : i + batch] for i in range(0, len(items), batch)],
        backbone.processor,
        images_root,
        settings,
    )
    counts: dict[str, int] = defaultdict(int)
    for inputs in batches:
        inputs = {k: v.to(backbone.device) for k, v in inputs.items()}
        with torch.inference_mode():
            logits = backbone.model(**inputs, use_cache=False).logits
        last = pool_last_token(logits, inputs["attention_mask"])  # either padding side
        for tok in last.argmax(-1).tolist():
            counts[tok_of.decode([tok]).strip() or repr(tok_of.decode([tok]))] += 1
    total = sum(counts.values())
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:4]
    return {tok: n / total for tok, n in top}


def _aggregate(p1: dict[str, float], meta: dict[str, tuple[str, str]]) -> dict[str, float]:
    out: dict[str, float] = {}
    groups: dict[str, list[float]] = defaultdict(list)
    for subset, value in p1.items():
        task, dist = meta[subset]
        groups[task].append(value)
        groups[dist].append(value)
        groups["overall"].append(value)
    for name, values in groups.items():
        out[name] = float(np.mean(values))
    return out


def zeroshot_eval(
    model: ModelConfig,
    embed: EmbedConfig,
    cfg: ZeroshotConfig,
    data: Tables,
    generator: Generator | None,
    out: Path,
) -> ZeroShotReport:
    """Strict P@1 per eval subset for each template in `cfg.templates`, with the embed
    section's other settings; embeddings per template in `out/<template>/`."""
    images_root = data.eval_images
    if images_root is None:
        raise ValueError("the ingest output holds no eval table (set ingest.eval_dir)")
    table = read_table(data.eval, EVAL_SCHEMA).to_pylist()
    if cfg.max_queries:
        kept: dict[str, int] = defaultdict(int)
        rows = []
        for r in table:
            if kept[r["subset"]] < cfg.max_queries:
                kept[r["subset"]] += 1
                rows.append(r)
        table = rows
    meta = {r["subset"]: (r["meta_task"], r["distribution"]) for r in table}
    chance: dict[str, list[float]] = defaultdict(list)
    for r in table:
        chance[r["subset"]].append(1 / len(r["tgt_text"]))
    chance_by_subset = {s: float(np.mean(v)) for s, v in chance.items()}
    backbone = open_backbone(model, generator)
    token = backbone.image_token(model.wrapped_image_token)
    report: dict[str, Any] = {"chance": chance_by_subset, "templates": {}}
    metrics: dict[str, float] = {}
    for template in cfg.templates:
        items, qkeys, ckeys = [], [], []
        for r in table:
            q = make_item(
                r["qry_text"],
                r["qry_image"],
                template=template,
                role="query",
                image_token=token,
                strings=embed,
            )
            # MMEB: candidates get no suffix, except in "matching" subsets.
            role = "query" if "matching" in r["subset"].lower() else "target"
            cands = [
                make_item(t, im, template=template, role=role, image_token=token, strings=embed)
                for t, im in zip(r["tgt_text"], r["tgt_image"], strict=True)
            ]
            items += [q, *cands]
            qkeys.append(q.key)
            ckeys.append([c.key for c in cands])
        folder = out / template
        stats = encode(backbone, items, images_root, folder, embed)
        keys, matrix = load_embeddings(folder)
        vectors = dict(zip(keys, matrix, strict=True))
        p1 = precision_at_1(table, qkeys, ckeys, vectors)
        agg = _aggregate(p1, meta)
        step = max(1, len(table) // NEXT_TOKEN_QUERIES)
        wanted = set(qkeys[::step])
        sample = list({it.key: it for it in items if it.key in wanted}.values())
        report["templates"][template] = {
            "p1": p1,
            "aggregate": agg,
            "next_tokens": next_tokens(backbone, sample, images_root, embed),
        }
        metrics.update({f"p1.{template}.{k}": v for k, v in {**p1, **agg}.items()})
        # Timings go to metrics only: the report holds results, equal for equal runs.
        metrics[f"items_per_s.{template}"] = stats.metrics()["items_per_s"]
    metrics.update({f"chance.{k}": v for k, v in chance_by_subset.items()})
    summary = render_table(report)
    output = ZeroShotReport(
        folder=out, rows={"queries": len(table)}, metrics=metrics, info={"summary": summary}
    )
    output.report.write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text("\n".join(summary) + "\n")
    log.info("\n".join(summary))
    return output


def render_table(report: dict[str, Any]) -> list[str]:
    templates = list(report["templates"])
    head = f"{'subset':18s} {'chance':>7s} " + " ".join(f"{t:>12s}" for t in templates)
    lines = ["Zero-shot strict P@1 on the miniature eval (ties count as misses)", head]
    for subset, ch in sorted(report["chance"].items()):
        cells = " ".join(f"{report['templates'][t]['p1'][subset]:12.3f}" for t in templates)
        lines.append(f"{subset:18s} {ch:7.3f} {cells}")
    for agg in ("classification", "vqa", "retrieval", "grounding", "ind", "ood", "overall"):
        if agg in report["templates"][templates[0]]["aggregate"]:
            cells = " ".join(f"{report['templates'][t]['aggregate'][agg]:12.3f}" for t in templates)
            lines.append(f"{'= ' + agg:18s} {'':7s} {cells}")
    lines.append("Next token predicted at the final position (share of sampled queries):")
    for t in templates:
        shares = ", ".join(
            f"{tok!r} {v:.2f}" for tok, v in report["templates"][t]["next_tokens"].items()
        )
        lines.append(f"  {t:12s} {shares}")
    return lines
