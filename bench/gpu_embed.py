"""GPU check: the embed engine vs the naive loop on the Qwen2-VL-2B architecture.

Builds Qwen2-VL-2B-Instruct's architecture from its published configuration with random
weights in bf16 (no download; the tokenizer is the miniature world's, so only token ids
differ from the real model), then embeds 448x448 image + text queries with both paths in the
same run. Prints items/s, the speed ratio, agreement of the vectors, and model FLOP
utilisation (linear-layer FLOPs of the vision tower and the language model per item, the
attention score terms left out, over the GPU's dense bf16 peak).

    python3 bench/gpu_embed.py [--items 2048] [--batch 64] [--workers 8]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from naive_embed import naive_embed

from embedder import world
from embedder.config import EmbedConfig
from embedder.generator import corpus_texts
from embedder.model.backbone import (
    QWEN_SPECIAL_TOKENS,
    Backbone,
    FamilyAdapter,
    ImageOnlyQwenVLProcessor,
    train_tokenizer,
)
from embedder.model.encode import EmbedItem, encode
from embedder.model.prompts import render
from embedder.model.shards import load_embeddings

# Qwen2-VL-2B-Instruct's published config.json (architecture fields).
QWEN2VL_2B = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "rope_parameters": {
        "rope_type": "default",
        "mrope_section": [16, 24, 24],
        "rope_theta": 1_000_000.0,
    },
    "vision": {
        "depth": 32,
        "embed_dim": 1280,
        "hidden_size": 1536,
        "num_heads": 16,
        "mlp_ratio": 4,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
}
PEAK_BF16_DENSE = {"H100": 989e12, "H200": 989e12}


def build_2b(device: torch.device, smoke: bool = False) -> Backbone:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tok = train_tokenizer(corpus_texts(), 2000)
    ids = dict(
        zip(QWEN_SPECIAL_TOKENS, tok.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS)), strict=True)
    )
    c = QWEN2VL_2B
    if smoke:  # same code path, a sliver of the model, for a CPU dry run
        c = {**c, "num_hidden_layers": 1, "vision": {**c["vision"], "depth": 1}}
    text = {k: v for k, v in c.items() if k != "vision"}
    text |= {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=c["vision"],
        tie_word_embeddings=True,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    model.eval()
    ip = Qwen2VLImageProcessorPil(
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=448 * 448,
        max_pixels=448 * 448,
    )
    proc = ImageOnlyQwenVLProcessor(image_processor=ip, tokenizer=tok)
    return Backbone(model, proc, FamilyAdapter(), device, torch.bfloat16, "qwen2-vl-2b-random")


def linear_params(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def breakdown(
    backbone: Backbone, items: list[EmbedItem], root: Path, args: argparse.Namespace
) -> None:
    """Where the time goes: the DataLoader alone (decode + preprocess in workers), then the
    model alone on batches already on the GPU (vision tower and language model apart)."""
    from embedder.model.encode import ProcessedBatches, _identity

    settings = EmbedConfig(batch_size=args.batch, num_workers=args.workers, image_side=448)
    batches = [items[i : i + args.batch] for i in range(0, len(items), args.batch)]
    loader = torch.utils.data.DataLoader(
        ProcessedBatches(batches, backbone.processor, root, settings),
        batch_size=None,
        num_workers=args.workers,
        collate_fn=_identity,
    )
    t = time.perf_counter()
    kept = list(loader)
    data_s = time.perf_counter() - t
    print(f"data only ({args.workers} workers): {len(items) / data_s:8.1f} items/s")
    ready = [{k: v.to(backbone.device) for k, v in b.items()} for b in kept[:4]]
    model = backbone.model
    on_gpu = backbone.device.type == "cuda"

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
        for b in ready:  # warm-up
            backbone.adapter.last_hidden_state(model, b)
        sync()
        t = time.perf_counter()
        for _ in range(3):
            for b in ready:
                backbone.adapter.last_hidden_state(model, b)
        sync()
        full_s = (time.perf_counter() - t) / 3
        t = time.perf_counter()
        for _ in range(3):
            for b in ready:
                model.model.visual(b["pixel_values"], grid_thw=b["image_grid_thw"])
        sync()
        vis_s = (time.perf_counter() - t) / 3
    n = sum(int(b["input_ids"].shape[0]) for b in ready)
    print(f"model only: {n / full_s:8.1f} items/s (vision tower {vis_s / full_s:.0%} of it)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--items", type=int, default=2048)
    ap.add_argument("--images", type=int, default=512, help="distinct images to render")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--smoke", action="store_true", help="CPU dry run on a 1-layer sliver")
    ap.add_argument(
        "--breakdown", action="store_true", help="also time data loading alone and the model alone"
    )
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    name = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name()
    print(f"device: {name}, torch {torch.__version__}")
    t = time.perf_counter()
    backbone = build_2b(device, smoke=args.smoke)
    print(f"built Qwen2-VL-2B architecture (random bf16) in {time.perf_counter() - t:.1f}s")
    rng = random.Random(0)
    scenes = world.all_scenes()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        paths = []
        for i in range(args.images):
            world.render(rng.choice(scenes), 448, i).save(root / f"{i}.png")
            paths.append(f"{i}.png")
        print(f"rendered {args.images} 448x448 images in {time.perf_counter() - t:.1f}s")
        items = []
        for i in range(args.items):
            s = rng.choice(scenes)
            q = world.VQA_QUERY.format(q=world.question(rng.choice(world.QUESTION_TYPES), s))
            if i % 3 == 0:
                q = world.T2I_QUERY.format(c=world.caption(s, rng.randrange(3))) + " <|image_1|>"
            items.append(
                EmbedItem(
                    render(
                        "hierarchical", q, has_image=True, role="query", image_token="<|image_pad|>"
                    ),
                    rng.choice(paths),
                )
            )
        unique = len({i.key for i in items})
        # Warm up kernels and the allocator on a few batches, outside the timings.
        naive_embed(backbone, items[: args.batch * 2], root, batch_size=args.batch, image_side=448)
        keys, naive_vecs, naive_s, naive_pad = naive_embed(
            backbone, items, root, batch_size=args.batch, image_side=448
        )
        if not args.smoke:
            torch.cuda.synchronize()
        t = time.perf_counter()
        stats = encode(
            backbone,
            items,
            root,
            root / "out",
            EmbedConfig(batch_size=args.batch, num_workers=args.workers, image_side=448),
        )
        if not args.smoke:
            torch.cuda.synchronize()
        ours_s = time.perf_counter() - t
        k, v = load_embeddings(root / "out")
        if args.breakdown:
            breakdown(backbone, items, root, args)
    naive = dict(zip(keys, naive_vecs, strict=False))
    cos = min(float(np.dot(naive[key], vec)) for key, vec in zip(k, v, strict=True))
    vit = linear_params(backbone.model.model.visual)
    lm = linear_params(backbone.model.model.language_model)
    patches = (448 // 14) ** 2
    text_tokens = stats.real_tokens / max(1, stats.encoded)  # per distinct item, image incl.
    flops_item = 2 * vit * patches + 2 * lm * text_tokens
    peak = next((p for n, p in PEAK_BF16_DENSE.items() if n in name), 989e12)
    print(
        f"items: {len(items)} ({unique} distinct), batch {args.batch}, "
        f"{text_tokens:.0f} tokens per item incl. {patches // 4} image tokens"
    )
    print(
        f"linear params: vision {vit / 1e6:.0f}M, LM {lm / 1e6:.0f}M; "
        f"{flops_item / 1e12:.2f} TFLOP per distinct item"
    )
    for label, seconds, computed in (
        ("naive loop", naive_s, len(items)),
        ("embed stage", ours_s, stats.encoded),
    ):
        mfu = computed * flops_item / seconds / peak
        print(
            f"{label:12s} {len(items) / seconds:8.1f} items/s  {seconds:6.1f}s  "
            f"MFU {mfu:.1%} of {peak / 1e12:.0f} TFLOP/s"
        )
    print(
        f"speed-up x{naive_s / ours_s:.2f}; padding efficiency naive {naive_pad:.2f} vs "
        f"{stats.metrics()['padding_efficiency']:.2f}; min cosine(naive, ours) {cos:.4f} "
        f"(bf16); peak GPU memory {stats.peak_memory_mib / 1024:.1f} GiB"
    )


if __name__ == "__main__":
    main()
