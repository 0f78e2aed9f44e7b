"""Stage `evaluate`: MMEB-style scores of one model (zero-shot, or with a fine-tuned
adapter) and one prompt template (docs/method.md section 5).

Every distinct query and candidate is embedded once (classification subsets share their
label candidates across all queries), into shards that resume; each query is scored against
its own candidate list. Reported per subset (`query_scores` defines each precisely):
- P@1 (`p1`), the headline: as MMEB's reference toolkit (VLM2Vec's eval) and the authors
  compute it, numpy argmax over the cosine scores, first maximum wins, so an exact tie with
  the correct candidate (index 0) counts as correct. Our numbers then compare with published
  tables (docs/method.md section 5);
- strict P@1 (`p1_strict`): the correct candidate must beat every other by more than
  `TIE_EPS`. An untrained model maps everything to nearly one vector; with the correct
  candidate first, the argmax convention calls that a perfect score, strict P@1 calls it 0;
- the tie rate (`tie_rate`): share of queries whose best score is shared, within `TIE_EPS`.
  Above `EvaluateConfig.tie_warning` in a subset it is a warning of the run (log, summary
  line, the run's warnings), so a collapsed model never looks good silently;
- Hit@k (strict, as `p1_strict`: the correct one among the k best with ties counted against
  it).
Means per meta-task, IND, OOD and overall, of each of the three, are over MMEB subsets;
subsets outside MMEB are reported on their own (unless the eval set has no MMEB subset at
all, like the miniature world's, which is then averaged by the meta-tasks and distributions
it declares).

Before the long run, a sanity check embeds a few content-distinct items twice, in different
batches and order: each must find itself first. It catches broken pooling under padding, a
collapsed model, and non-determinism, in seconds rather than after hours of wrong scores.
Items with the same content (rendered text and decoded pixels: byte copies of an image under
another name, lossless re-encodes) legitimately share one vector, so only one of them is
checked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from embedder import compositional
from embedder.artifacts import json_text, sha256_file
from embedder.config import EmbedConfig, EvaluateConfig, ModelConfig
from embedder.datasets.catalog import MMEB_SUBSETS, normalise
from embedder.datasets.ingest import images_digest
from embedder.datasets.schema import COMPOSITIONAL_SCHEMA, EVAL_SCHEMA, read_table
from embedder.embed import ItemBuilder, open_backbone
from embedder.errors import UserError
from embedder.model.backbone import Backbone
from embedder.model.encode import EmbedItem, EncodeStats, encode
from embedder.model.identity import ModelIdentity, adapter_identity, model_identity, workdir_cache
from embedder.model.images import load_image
from embedder.model.shards import ShardSlice, load_embeddings
from embedder.outputs import Adapter, EvalReport, Generator, Tables

log = logging.getLogger("gen2embed.evaluate")
TIE_EPS = 1e-6
AGGREGATES = ("classification", "vqa", "retrieval", "grounding", "ind", "ood", "overall")


class SanityCheckError(UserError, RuntimeError):
    """The model fails the pre-evaluation check: its scores would be meaningless."""


def cosine_scores(query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Scores of one query against its candidates: (d,) and (n, d) L2-normalised vectors (any
    float dtype) -> (n,) float32 dot products.

    Row by row (multiply, then numpy's sum over each row) rather than a BLAS matrix-vector
    product: BLAS kernels may round rows at different positions differently, and the
    reference convention rests on identical vectors giving bit-identical scores."""
    # float32 even for float16 shards (embed.out_dtype): float16 scores step by ~5e-4 near 1,
    # so unequal vectors would tie within TIE_EPS.
    return (candidates.astype(np.float32) * query.astype(np.float32)[None, :]).sum(axis=1)


def query_scores(query: np.ndarray, candidates: np.ndarray, k: int) -> dict[str, bool]:
    """One query against its own candidates, the correct one at index 0 (docs/method.md section 5).

    `query` (d,), `candidates` (n, d) with n >= 1, both L2-normalised. Returns:
    - `p1`: MMEB's reference convention (VLM2Vec's eval, the published tables): `np.argmax`
      of the scores is 0. The first maximum wins, so an exact tie with the correct candidate
      counts as correct (a duplicate of it shares its vector, so always ties);
    - `p1_strict`: the correct candidate scores more than `TIE_EPS` above every other;
    - `tie`: the best score is reached, within `TIE_EPS`, by at least two candidates (the
      correct one or not): the top-1 is then decided by candidate order, not by the model;
    - `hit` (Hit@k, strict as `p1_strict`): fewer than k other candidates score at least the
      correct one's score minus `TIE_EPS`.
    A single candidate is a hit on all three and no tie."""
    return _judge(cosine_scores(query, candidates), k)


def _judge(scores: np.ndarray, k: int) -> dict[str, bool]:
    """`query_scores` from the (n,) scores, correct candidate first."""
    others = scores[1:]
    if len(others) == 0:
        return {"p1": True, "p1_strict": True, "tie": False, "hit": True}
    beaten_or_tied = int((others >= scores[0] - TIE_EPS).sum())
    return {
        "p1": int(np.argmax(scores)) == 0,
        "p1_strict": bool(scores[0] > others.max() + TIE_EPS),
        "tie": int((scores >= scores.max() - TIE_EPS).sum()) > 1,
        "hit": beaten_or_tied < k,
    }


def strict_hits(query: np.ndarray, candidates: np.ndarray) -> bool:
    """Strict P@1 of one query (`query_scores`' `p1_strict`)."""
    return query_scores(query, candidates, 1)["p1_strict"]


SCORES = ("p1", "p1_strict", "tie_rate")  # per subset, each averaged by `aggregate`


def subset_scores(
    rows: list[dict[str, Any]],
    qkeys: list[str],
    ckeys: list[list[str]],
    vectors: dict[str, np.ndarray],
    k: int = 5,
) -> dict[str, dict[str, float]]:
    """Per subset, means over its queries of `query_scores`: `p1` (MMEB argmax), `p1_strict`,
    `tie_rate` (share of tied queries), `hit@k` (strict); `tie_rate_distinct`, the share tied
    between candidates of different content (keys), what the tie warning reads; and
    `queries`, their number.
    Candidate lists may differ in length across queries; `ckeys[i]` are row i's candidates,
    correct first, keys of `vectors` (a duplicated candidate is one key, so one vector).

    Where a row has `tgt_category` (each candidate's category; gen2embed's column, see
    `category_scores`), also `category_accuracy` and, over the queries that have a
    same-category negative, `p1_same_category`, with `category_queries` and
    `same_category_queries` counting them; a subset without categories has none of these."""
    hits: dict[str, list[dict[str, bool]]] = defaultdict(list)
    for row, qk, cks in zip(rows, qkeys, ckeys, strict=True):
        cand = np.stack([vectors[c] for c in cks])
        scores = cosine_scores(vectors[qk], cand)
        got = _judge(scores, k)
        top = np.flatnonzero(scores >= scores.max() - TIE_EPS)
        # A tie between candidates of different content is the model's; one between copies
        # of one item (a label listed twice) is the data's, which ingest counts.
        got["tie_distinct"] = len({cks[i] for i in top}) > 1
        got.update(category_scores(scores, row.get("tgt_category")))
        hits[row["subset"]].append(got)
    out: dict[str, dict[str, float]] = {}
    for s, hs in sorted(hits.items()):
        out[s] = {
            "p1": float(np.mean([h["p1"] for h in hs])),
            "p1_strict": float(np.mean([h["p1_strict"] for h in hs])),
            "tie_rate": float(np.mean([h["tie"] for h in hs])),
            "tie_rate_distinct": float(np.mean([h["tie_distinct"] for h in hs])),
            f"hit@{k}": float(np.mean([h["hit"] for h in hs])),
            "queries": len(hs),
        }
        for score, count in CATEGORY_SCORES.items():
            defined = [h[score] for h in hs if score in h]
            if defined:
                out[s][score] = float(np.mean(defined))
                out[s][count] = len(defined)
    return out


# Category scores (`category_scores`) -> the per-subset count of queries each is defined for.
CATEGORY_SCORES = {
    "p1_same_category": "same_category_queries",
    "category_accuracy": "category_queries",
}


def category_scores(scores: np.ndarray, categories: list[str | None] | None) -> dict[str, bool]:
    """What one query's scores say at the two levels a world with categories has
    (gen2embed's view, beside MMEB's P@1; docs/method.md section 5).

    `scores`: (n,) the query's candidate scores, correct first; `categories`: each
    candidate's category (None entries: unknown), or None. Returns, with MMEB's argmax
    convention (first maximum wins):
    - `category_accuracy`: the top candidate is of the correct one's category (what random
      negatives teach: telling categories apart);
    - `p1_same_category`: among the candidates of the correct one's category only, the
      correct one is first (what same-category hard negatives teach: the details); only when
      there is at least one such negative.
    Neither when the correct candidate's category is unknown (None or "", as for fn_group;
    an empty dict)."""
    if not categories or not categories[0]:
        return {}
    top = int(np.argmax(scores))
    got = {"category_accuracy": categories[top] == categories[0]}
    same = [j for j, c in enumerate(categories) if c == categories[0]]
    if len(same) > 1:
        got["p1_same_category"] = int(np.argmax(scores[same])) == 0
    return got


def aggregate(scores: dict[str, float], meta: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """Means of one per-subset score (`p1`, `p1_strict` or `tie_rate`) per meta-task, IND, OOD
    and overall over MMEB subsets, as MMEB reports them (docs/method.md section 5); `outside_mmeb`
    lists the others (averaged by their declared labels only when no MMEB subset is present).
    """
    mmeb = [s for s in scores if normalise(s) in MMEB_SUBSETS]
    counted = mmeb or list(scores)
    groups: dict[str, list[float]] = defaultdict(list)
    for subset in counted:
        task, dist = meta[subset]
        for name in (task, dist, "overall"):
            groups[name].append(scores[subset])
    out: dict[str, Any] = {name: float(np.mean(v)) for name, v in groups.items()}
    out["outside_mmeb"] = sorted(set(scores) - set(mmeb)) if mmeb else []
    return out


def content_id(
    item: EmbedItem, images_root: Path, settings: EmbedConfig, tokenizer: Any | None = None
) -> str:
    """What the model sees of `item`, as a hex digest: its tokens (with `tokenizer`, as the
    engine encodes them: two spellings the tokenizer normalises alike, say composed and
    decomposed accents, are one input; without one, the rendered text) and its image's pixels
    as `load_image` decodes and resizes them under `settings`' image rules (the processor
    works from those pixels alone). Byte copies and lossless re-encodes of one picture share
    it whatever their file names; `item.key`, which hashes the path, does not.

    Raises what `load_image` raises for an unreadable image (OSError, PIL's errors)."""
    if tokenizer is not None:
        ids = tokenizer(item.text, sanitize_control_tokens=True)["input_ids"]
        text = ",".join(map(str, ids))
    else:
        text = item.text
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16)
    if item.image:
        img = load_image(images_root, item.image, settings.image_mode, settings.image_side)
        # Mode and size too: equal bytes in another shape are another picture.
        digest.update(f"\x1f{img.mode}{img.size}\x1f".encode())
        digest.update(img.tobytes())
    return digest.hexdigest()


def content_distinct(
    items: list[EmbedItem],
    images_root: Path,
    settings: EmbedConfig,
    limit: int | None = None,
    tokenizer: Any | None = None,
) -> tuple[list[EmbedItem], int]:
    """The first `limit` items (all: None) of distinct content (`content_id`), in order, and
    how many content copies were passed over on the way. Images are decoded lazily: only as
    far into `items` as the `limit` needs."""
    chosen: list[EmbedItem] = []
    seen: set[str] = set()
    copies = 0
    for item in items:
        if limit is not None and len(chosen) >= limit:
            break
        cid = content_id(item, images_root, settings, tokenizer)
        if cid in seen:
            copies += 1
            continue
        seen.add(cid)
        chosen.append(item)
    return chosen, copies


def sanity_check(
    backbone: Backbone,
    items: list[EmbedItem],
    images_root: Path,
    settings: EmbedConfig,
    folder: Path,
    limit: int | None = None,
) -> dict[str, float]:
    """Embed the first `limit` content-distinct `items` (all: None) twice, in other batches
    and order: each must find its own embedding first, more than `TIE_EPS` above any other.

    Content-identical items (same rendered text and decoded pixels, `content_id`) are left
    out: they legitimately share one vector, so they would tie, and a real pooling bug still
    shows on the distinct ones. Returns the self-similarity minimum and best-rival maximum
    ({} when fewer than two distinct items are checked); raises SanityCheckError."""
    items, copies = content_distinct(
        items, images_root, settings, limit, backbone.processor.tokenizer
    )
    if copies:
        log.info(
            "sanity check: %d items passed over as content copies of others (same text and "
            "pixels under another file name): they may share one vector",
            copies,
        )
    if len(items) < 2:
        return {}
    first, second = folder / "a", folder / "b"
    encode(backbone, items, images_root, first, settings, progress=False)
    other = settings.model_copy(update={"batch_size": max(1, min(3, settings.batch_size - 1))})
    encode(backbone, items[::-1], images_root, second, other, progress=False)
    a = dict(zip(*load_embeddings(first), strict=True))
    b = dict(zip(*load_embeddings(second), strict=True))
    keys = [i.key for i in items]
    ma, mb = np.stack([a[k] for k in keys]), np.stack([b[k] for k in keys])
    sims = ma @ mb.T
    own = np.diag(sims)
    rivals = np.where(np.eye(len(keys), dtype=bool), -np.inf, sims).max(axis=1)
    failing = [keys[i] for i in range(len(keys)) if not own[i] > rivals[i] + TIE_EPS]
    shutil.rmtree(folder, ignore_errors=True)
    if failing:
        raise SanityCheckError(
            f"sanity check failed: {len(failing)} of {len(keys)} items do not find their own "
            f"embedding first when embedded in another batch (keys {failing[:4]}; self "
            f"similarity min {own.min():.6f}, best rival max {rivals.max():.6f}). Pooling, "
            "padding or the adapter is wrong, or the model maps inputs to one vector"
        )
    return {"sanity_self_min": float(own.min()), "sanity_rival_max": float(rivals.max())}


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


IDENTITY_FILE = "vectors.json"


def evaluation_settings(embed: EmbedConfig, cfg: EvaluateConfig) -> EmbedConfig:
    """The engine settings the evaluation embeds with: the embed section's prompt strings and
    batching, the evaluation's template and image rules. A registered model records them, so
    it gives the evaluation's vectors (tasks.pyfunc_model)."""
    return embed.model_copy(
        update={
            "template": cfg.template,
            "image_mode": cfg.image_mode,
            "image_side": cfg.image_side,
            "max_pixels": cfg.max_pixels,
        }
    )


def evaluation_inputs(data: Tables, cfg: EvaluateConfig) -> str:
    """What two scores must share to be compared (the registry's champion rule): the eval
    table's bytes, the images under its root (ingest's digest), the per-subset query cap and
    the image rules. Not the model, template or prompt strings: those are what is compared.
    A 20-hex-digit sha256."""
    if data.eval_images is None:
        raise EvalDataError("the ingest output holds no eval table (set ingest.eval_dir)")
    parts = {
        "table": sha256_file(data.eval),
        "images": data.eval_images_digest or images_digest(data.eval_images),
        "max_queries": cfg.max_queries,
        "image": [cfg.image_mode, cfg.image_side, cfg.max_pixels],
    }
    return hashlib.sha256(json_text(parts, sort_keys=True).encode()).hexdigest()[:20]


def vectors_identity(
    model: ModelConfig,
    generator: Generator | None,
    adapter: Adapter | None,
    settings: EmbedConfig,
    backbone_loaded: Backbone,
    data: Tables,
    released: ModelIdentity | None = None,
    table: str = "eval",
) -> str:
    """What an embedding depends on besides its item key (which hashes the rendered prompt
    and the image path *relative to its root*): the weights (backbone content or commit,
    generator, adapter: fine-tuned, or `released` as a table row names it), the dtype and
    device they ran in (as loaded: `auto` means bfloat16 on a GPU), the attention kernel, the
    image rules, and the images the paths point at (the root of `table`'s images, "eval" or
    "compositional", and the `stat` of every file in it: another root holding other pictures
    under the same names must not lend its vectors: the digest ingest recorded, else a fresh
    walk)."""
    root, digest = (
        (data.eval_images, data.eval_images_digest)
        if table == "eval"
        else (data.compositional_images, data.compositional_images_digest)
    )
    if root is None:
        where = " (set ingest.eval_dir)" if table == "eval" else ""
        raise EvalDataError(f"the ingest output holds no {table} table{where}")
    if generator is not None:
        backbone, revision = f"tiny:{generator.fingerprint}", None
    else:  # the content or resolved commit: a replaced weights file is another model
        found = model_identity(model.backbone, model.revision, workdir_cache())
        backbone, revision = f"{model.backbone}:{found.digest}", found.revision
    parts = {
        "backbone": backbone,
        "revision": revision,
        "dtype": str(backbone_loaded.dtype),
        "device": backbone_loaded.device.type,
        "attn": getattr(backbone_loaded.model.config, "_attn_implementation", model.attn),
        "images": [str(root), digest or images_digest(root)],
        "adapter": _adapter_name(adapter, released),
        "image": [settings.image_mode, settings.image_side, settings.max_pixels],
        "out_dtype": settings.out_dtype,
    }
    return hashlib.sha256(json_text(parts, sort_keys=True).encode()).hexdigest()[:20]


def _adapter_name(adapter: Adapter | None, released: ModelIdentity | None) -> str | None:
    """The adapter evaluated: a finetune output's fingerprint, or a released adapter as
    `source@digest` (its folder's content or hub commit), or None."""
    if adapter is not None:
        return adapter.fingerprint
    return None if released is None else f"{released.source}@{released.digest}"


def _write_identity(folder: Path, identity: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / IDENTITY_FILE).write_text(json_text({"identity": identity}))


def reusable_vectors(
    out: Path, identity: str, wanted: set[str], folder: str = "embeddings"
) -> dict[str, np.ndarray]:
    """Embeddings another published evaluation of the same model and image rules already
    holds (the stage's sibling folders' `folder`: "embeddings", or "compositional" for the
    compositional table's): a re-evaluation with more queries, another subset selection or
    the same candidates under another row embeds only what is new."""
    found: dict[str, np.ndarray] = {}
    for sibling in sorted(out.parent.iterdir()) if out.parent.is_dir() else []:
        marker = sibling / folder / IDENTITY_FILE
        if sibling == out or sibling.suffix or not marker.is_file():  # .partial, .lock, ...
            continue
        try:
            if json.loads(marker.read_text()).get("identity") != identity:
                continue
            keys, matrix = load_embeddings(sibling / folder)
        except (OSError, ValueError) as exc:  # a damaged sibling is not a cache
            log.info("evaluate: not reusing %s (%s)", sibling, exc)
            continue
        for key, vector in zip(keys, matrix, strict=True):
            if key in wanted and key not in found:
                found[key] = vector
    if found:
        log.info(
            "evaluate: %d of %d items already embedded by earlier evaluations",
            len(found),
            len(wanted),
        )
    return found


def evaluate_model(
    model: ModelConfig,
    embed: EmbedConfig,
    cfg: EvaluateConfig,
    data: Tables,
    generator: Generator | None,
    adapter: Adapter | None,
    out: Path,
    shard: ShardSlice | None = None,
) -> EvalReport:
    """Stage `evaluate`: scores of the backbone (with `adapter` merged in, when given, or the
    released adapter `cfg.adapter` a table row names) on the eval table with `cfg.template`
    prompts, scored as MMEB's reference toolkit scores (module docstring; docs/method.md,
    "MMEB scoring").

    Writes under `out`: `embeddings/` (every distinct query and candidate, resumable shards
    of (key: string, embedding: d float32, L2-normalised), embedder.model.encode, with an
    identity file naming what made them), `compositional/` (the same for the compositional
    table's images and captions, when ingest wrote one), `sanity/` (the order-independence
    check's two encodings) and `report.json` (per subset and aggregated: P@1 (argmax), strict
    P@1, tie rates, hit@k, chance, next-token samples; with candidate categories, P@1 among
    the same-category candidates and the category-level accuracy (`category_scores`); under
    `compositional`, SugarCrepe's and SugarCrepe++'s accuracies per category, group and
    benchmark (embedder.compositional); scores are fractions in [0, 1]). Metrics: `p1.*`,
    `p1_strict.*`, `tie_rate.*`, `hit<k>.*`, `p1_same_category.*` and
    `category_accuracy.*` (where defined), `sugarcrepe.*` and `sugarcrepe_pp.*`
    (`compositional.metrics`), items/s. With `shard`
    (one fan-out worker, tasks.scale) only that worker's shards of the embeddings are
    written (the first worker also runs the sanity check) and nothing is scored: the whole
    call that follows assembles and scores.

    Raises ValueError when both a fine-tuned and a released adapter are given;
    EvalDataError (a UserError) for an eval table that is missing or empty; the adapter
    loaders' errors (embedder.training.adapters); encode's errors."""
    if adapter is not None and cfg.adapter is not None:
        raise ValueError("evaluate: a fine-tuned adapter and evaluate.adapter are both given")
    images_root = data.eval_images
    if images_root is None:
        raise EvalDataError("the ingest output holds no eval table (set ingest.eval_dir)")
    table = read_table(data.eval, EVAL_SCHEMA).to_pylist()
    if cfg.max_queries:
        kept: dict[str, int] = defaultdict(int)
        rows = []
        for r in table:
            if kept[r["subset"]] < cfg.max_queries:
                kept[r["subset"]] += 1
                rows.append(r)
        table = rows
    if not table:
        raise EvalDataError("the eval table is empty")
    comp_rows = compositional_rows(data, cfg.max_queries)
    meta = {r["subset"]: (r["meta_task"], r["distribution"]) for r in table}
    chance: dict[str, list[float]] = defaultdict(list)
    # Random vectors' category scores: 1 / same-category candidates, their share of all.
    chance_cat: dict[str, dict[str, list[float]]] = {k: defaultdict(list) for k in CATEGORY_SCORES}
    for r in table:
        chance[r["subset"]].append(1 / len(r["tgt_text"]))
        cats = r.get("tgt_category")
        if cats and cats[0]:
            same = sum(c == cats[0] for c in cats)
            chance_cat["category_accuracy"][r["subset"]].append(same / len(cats))
            if same > 1:
                chance_cat["p1_same_category"][r["subset"]].append(1 / same)
    released = None
    if cfg.adapter is not None:  # the commit the stage's fingerprint holds, for a hub id
        released = adapter_identity(cfg.adapter, cfg.adapter_revision, workdir_cache())
    backbone = open_backbone(model, generator)
    if adapter is not None or released is not None:
        from embedder.training.adapters import adapter_folder, load_adapter

        folder = (
            adapter.adapter
            if adapter is not None
            else adapter_folder(
                cfg.adapter, released.revision, setting="table.rows[].adapter_revision"
            )
        )
        backbone = load_adapter(backbone, folder)
    token = backbone.image_token(model.wrapped_image_token)
    settings = evaluation_settings(embed, cfg)
    build = ItemBuilder(cfg.template, token, embed, backbone.as_text)
    items, qkeys, ckeys = build.eval_table(table)
    distinct = list({it.key: it for it in items}.values())
    checks = {}
    # Before the long part: in one process, or in the first of several workers (whole, not
    # sliced; the assembling pass checks again, in seconds).
    if shard is None or shard.index == 0:
        checks = sanity_check(
            backbone, distinct, images_root, settings, out / "sanity", cfg.sanity_items
        )
    output = EvalReport(folder=out, template=cfg.template)
    identity = vectors_identity(model, generator, adapter, settings, backbone, data, released)
    reused = reusable_vectors(out, identity, {it.key for it in items})
    folder = out / "embeddings"
    todo = [it for it in items if it.key not in reused]
    stats = (
        encode(backbone, todo, images_root, folder, settings, share=shard)
        if todo
        else EncodeStats()
    )
    # SugarCrepe / SugarCrepe++ (docs/method.md section 8): their own images root, so their
    # own folder of vectors, reused across evaluations the same way.
    comp_items, comp_keys = build.compositional_table(comp_rows)
    comp_folder = out / COMPOSITIONAL_FOLDER
    comp_reused: dict[str, np.ndarray] = {}
    comp_identity = ""
    if comp_rows:
        assert data.compositional_images is not None  # compositional_rows checked it
        comp_identity = vectors_identity(
            model, generator, adapter, settings, backbone, data, released, "compositional"
        )
        comp_reused = reusable_vectors(
            out, comp_identity, {it.key for it in comp_items}, COMPOSITIONAL_FOLDER
        )
        comp_todo = [it for it in comp_items if it.key not in comp_reused]
        if comp_todo:
            encode(
                backbone, comp_todo, data.compositional_images, comp_folder, settings, share=shard
            )
    if shard is not None:
        return output
    _write_identity(folder, identity)
    keys, matrix = load_embeddings(folder)
    vectors = {**reused, **dict(zip(keys, matrix, strict=True))}
    comp_scores: dict[str, dict[str, Any]] = {}
    if comp_rows:
        _write_identity(comp_folder, comp_identity)
        comp_keys_found, comp_matrix = load_embeddings(comp_folder)
        comp_vectors = {**comp_reused, **dict(zip(comp_keys_found, comp_matrix, strict=True))}
        comp_scores = compositional.benchmark_scores(comp_rows, comp_keys, comp_vectors, TIE_EPS)
    per_subset = subset_scores(table, qkeys, ckeys, vectors, cfg.hit_k)
    means = {name: aggregate({s: v[name] for s, v in per_subset.items()}, meta) for name in SCORES}
    agg = means["p1"]
    # Over the subsets that define them (none for real MMEB data, which has no categories).
    cat_means = {
        name: aggregate({s: v[name] for s, v in per_subset.items() if name in v}, meta)
        for name in CATEGORY_SCORES
    }
    # Ties between copies of one candidate are the data's (ingest counts them), not a sign of
    # a collapsed model: the warning reads ties between different candidates only.
    tied = {
        s: v["tie_rate_distinct"]
        for s, v in per_subset.items()
        if v["tie_rate_distinct"] > cfg.tie_warning
    }
    warnings = []
    if tied:
        warnings.append(
            f"tie rate above {cfg.tie_warning:g} in {len(tied)} subsets ("
            + ", ".join(f"{s} {r:.2f}" for s, r in tied.items())
            + "): their queries' best score is shared by different candidates, so P@1 (MMEB "
            "argmax) credits the correct candidate for coming first; see strict P@1. The model "
            "may map different inputs to one vector"
        )
        log.warning("evaluate: %s", warnings[-1])
    step = max(1, len(table) // NEXT_TOKEN_QUERIES)
    wanted = set(qkeys[::step])
    sample = list({it.key: it for it in items if it.key in wanted}.values())
    report = {
        "template": cfg.template,
        "adapter": _adapter_name(adapter, released),
        "conventions": {
            "p1": "P@1 as MMEB's reference toolkit computes it: numpy argmax over cosine "
            "scores, first maximum wins (a tie with the correct candidate counts as correct)",
            "p1_strict": f"P@1 with a tie within {TIE_EPS:g} of the correct score as a miss",
            "tie_rate": f"share of queries whose best score another candidate reaches within "
            f"{TIE_EPS:g}",
            f"hit@{cfg.hit_k}": f"strict: fewer than k other candidates score at least the "
            f"correct one's score minus {TIE_EPS:g}",
            "p1_same_category": "P@1 (argmax) among the candidates of the correct one's "
            "category only, over queries with at least one such negative (gen2embed's)",
            "category_accuracy": "share of queries whose top candidate (argmax) is of the "
            "correct one's category (gen2embed's)",
        },
        "chance": {s: float(np.mean(v)) for s, v in chance.items()},
        "subsets": per_subset,
        "meta": {s: list(m) for s, m in meta.items()},
        "aggregate": agg,
        "aggregate_strict": {k: v for k, v in means["p1_strict"].items() if k != "outside_mmeb"},
        "aggregate_tie_rate": {k: v for k, v in means["tie_rate"].items() if k != "outside_mmeb"},
        # gen2embed's view beside MMEB's (category_scores): empty without tgt_category.
        "aggregate_same_category": {
            k: v for k, v in cat_means["p1_same_category"].items() if k != "outside_mmeb"
        },
        "aggregate_category": {
            k: v for k, v in cat_means["category_accuracy"].items() if k != "outside_mmeb"
        },
        "chance_categories": {
            name: {s: float(np.mean(v)) for s, v in sorted(by.items())}
            for name, by in chance_cat.items()
        },
        "tie_warning": {"threshold": cfg.tie_warning, "subsets": sorted(tied)},
        "next_tokens": next_tokens(backbone, sample, images_root, settings),
        # SugarCrepe / SugarCrepe++ per benchmark (embedder.compositional.benchmark_scores);
        # {} without a compositional table.
        "compositional": comp_scores,
    }
    output.report.write_text(json_text(report, indent=2))
    metrics: dict[str, float] = {}
    for name in SCORES:  # p1.<subset|mean>, p1_strict.<...>, tie_rate.<...>
        values = {**{s: v[name] for s, v in per_subset.items()}, **means[name]}
        metrics.update({f"{name}.{k}": v for k, v in values.items() if isinstance(v, float)})
    metrics.update({f"hit{cfg.hit_k}.{s}": v[f"hit@{cfg.hit_k}"] for s, v in per_subset.items()})
    for name in CATEGORY_SCORES:  # p1_same_category.<...>, category_accuracy.<...>
        values = {
            **{s: v[name] for s, v in per_subset.items() if name in v},
            **cat_means[name],
        }
        metrics.update({f"{name}.{k}": v for k, v in values.items() if isinstance(v, float)})
    # Timings go to metrics only: the report holds results, equal for equal runs.
    metrics.update(compositional.metrics(comp_scores))
    metrics["items_per_s"] = stats.metrics()["items_per_s"]
    metrics["reused_items"] = len(reused)
    if comp_rows:
        metrics["reused_compositional_items"] = len(comp_reused)
    metrics.update(checks)
    model_name = "zero-shot" if adapter is None else f"adapter {adapter.fingerprint[:8]}"
    summary = (
        f"evaluate ({model_name}, {cfg.template}): P@1 (MMEB argmax) {_means_line(agg)}; "
        f"strict P@1 {_means_line(means['p1_strict'])}; "
        f"tie rate overall {means['tie_rate']['overall']:.3f}"
    )
    for bench, found in comp_scores.items():
        summary += f"; {compositional.TITLES[bench]} " + " ".join(
            f"{score} {found['mean'][score]:.3f} (strict {found['mean'][score + '_strict']:.3f})"
            for score in compositional.SCORES[bench]
        )
    if tied:
        summary += f" - WARNING: tie rate above {cfg.tie_warning:g} in {', '.join(tied)}"
    return output.model_copy(
        update={
            "rows": {
                "queries": len(table),
                "unique_items": stats.unique,
                "compositional_rows": len(comp_rows),
            },
            "metrics": metrics,
            "info": {
                "summary": [summary],
                "warnings": warnings,
                "eval_inputs": evaluation_inputs(data, cfg),
            },
        }
    )


COMPOSITIONAL_FOLDER = "compositional"


def compositional_rows(data: Tables, max_queries: int | None) -> list[dict[str, Any]]:
    """The compositional table's rows (COMPOSITIONAL_SCHEMA), the first `max_queries` of
    each category (all: None or 0), in table order; [] when ingest wrote none."""
    if data.compositional_images is None or not data.compositional.is_file():
        return []
    rows = read_table(data.compositional, COMPOSITIONAL_SCHEMA).to_pylist()
    if not max_queries:
        return rows
    kept: dict[str, int] = defaultdict(int)
    out = []
    for r in rows:
        if kept[r["subset"]] < max_queries:
            kept[r["subset"]] += 1
            out.append(r)
    return out


def _means_line(means: dict[str, Any]) -> str:
    return " ".join(f"{k} {means[k]:.3f}" for k in AGGREGATES if k in means)


class EvalDataError(UserError, ValueError):
    """The ingest output holds no usable eval table (none configured, or empty)."""
