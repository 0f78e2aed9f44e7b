"""The embedder outside the pipeline (embedder.inference): the vectors the evaluation gives,
prompts by role and instruction, PIL images as their files, the adapter's template."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from embedder.config import EmbedConfig, EvaluateConfig, FinetuneConfig, ModelConfig
from embedder.evaluate import evaluate_model
from embedder.inference import TRAINING_FILE, Embedder, EmbedderError, TrainedWith
from embedder.model.backbone import load_backbone
from embedder.model.shards import load_embeddings
from embedder.outputs import Adapter, Generator, Tables
from embedder.training import adapters

SETTINGS = EmbedConfig(num_workers=0, image_mode="fixed", image_side=64)
EVAL = EvaluateConfig(max_queries=3, image_mode="fixed", image_side=64)


def _adapter(generator: Generator, folder: Path, template: str) -> Path:
    """A LoRA with random (non-zero) weights, saved as the finetune stage saves it."""
    import torch

    backbone = load_backbone(generator.model_dir)
    torch.manual_seed(0)
    peft_model = adapters.attach(backbone, FinetuneConfig(lora_init="default", dora=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    adapters.save_adapter(peft_model, folder)
    trained = TrainedWith(template, EmbedConfig(), False)
    (folder / TRAINING_FILE).write_text(trained.to_json())
    return folder


@pytest.mark.parametrize("with_adapter", [False, True], ids=["zero-shot", "adapter"])
def test_the_api_gives_the_evaluation_s_vectors(
    tables: Tables, generator: Generator, tmp_path: Path, with_adapter: bool
) -> None:
    template = "chat" if with_adapter else "hierarchical"
    adapter = None
    if with_adapter:
        _adapter(generator, tmp_path / "adapter", template)
        adapter = Adapter(folder=tmp_path, base="tiny", template=template)
    cfg = EVAL.model_copy(update={"template": template})
    report = evaluate_model(
        ModelConfig(), SETTINGS, cfg, tables, generator, adapter, tmp_path / "ev"
    )
    keys, matrix = load_embeddings(report.folder / "embeddings")
    published = dict(zip(keys, matrix, strict=True))

    model = Embedder.load(
        generator.model_dir,
        adapter=None if adapter is None else adapter.adapter,
        settings=SETTINGS,
    )
    assert model.template == template, "the adapter's template, read beside it"
    assert tables.eval_images is not None
    rows = [r for r in pq.read_table(tables.eval).to_pylist()]
    by_subset: dict[str, list[dict]] = {}
    for r in rows:
        by_subset.setdefault(r["subset"], []).append(r)
    rows = [r for part in by_subset.values() for r in part[:3]]

    def path(rel: str) -> str:
        return str(tables.eval_images / rel) if rel else ""

    queries = model.encode(
        [r["qry_text"] for r in rows], [path(r["qry_image"]) for r in rows], role="query"
    )
    assert queries.shape == (len(rows), model.dimension) and queries.dtype == np.float32
    from embedder.embed import make_item

    def key(text: str, image: str, role: str) -> str:
        return make_item(
            text,
            image,
            template=template,
            role=role,
            image_token="<|image_pad|>",
            strings=SETTINGS,
            literal=model.backbone.as_text,
        ).key

    expected = np.stack([published[key(r["qry_text"], r["qry_image"], "query")] for r in rows])
    np.testing.assert_allclose(queries, expected, atol=1e-6)
    r = next(r for r in rows if "matching" not in r["subset"].lower())
    cands = model.encode(r["tgt_text"], [path(p) for p in r["tgt_image"]], role="target")
    expected = np.stack(
        [published[key(t, p, "target")] for t, p in zip(r["tgt_text"], r["tgt_image"], strict=True)]
    )
    np.testing.assert_allclose(cands, expected, atol=1e-6)


def test_role_and_instruction_make_the_prompt(generator: Generator, tmp_path: Path) -> None:
    model = Embedder.load(generator.model_dir, settings=SETTINGS)
    root, scratch = Path("/"), tmp_path

    def rendered(role: str, instruction: str | None) -> str:
        (item,) = model.items(
            ["a dog"], None, role=role, instruction=instruction, images_root=root, scratch=scratch
        )
        return item.text

    system = (
        "<|im_start|>system\nGiven an image, summarize the provided image in one word. "
        "Given only text, describe the text in one word.<|im_end|>\n"
    )
    assert rendered("query", "Find an image that matches the caption") == (
        system + "<|im_start|>user\nFind an image that matches the caption\na dog"
        "\nRepresent the given text in one word.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert rendered("target", None) == (
        system + "<|im_start|>user\na dog<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_pil_image_and_its_file_give_one_vector(generator: Generator, world_dir: Path) -> None:
    model = Embedder.load(generator.model_dir, settings=SETTINGS)
    path = sorted((world_dir / "eval_images").rglob("*.png"))[0]
    with Image.open(path) as im:
        picture = im.copy()
    by_path = model.encode(images=[str(path)], role="target")
    by_pil = model.encode(images=[picture], role="target")
    np.testing.assert_allclose(by_pil, by_path, atol=1e-6)
    pair = model.encode(["what is this?"], [picture], role="query")
    assert not np.allclose(pair, by_pil), "the text counts"


def test_empty_and_bad_inputs(generator: Generator, tmp_path: Path) -> None:
    model = Embedder.load(generator.model_dir, settings=SETTINGS)
    assert model.encode([]).shape == (0, model.dimension)
    as_list = model.encode(["a red circle", "a blue star"])
    from_generator = model.encode(t for t in ("a red circle", "a blue star"))
    np.testing.assert_array_equal(from_generator, as_list)
    np.testing.assert_allclose(np.linalg.norm(as_list, axis=1), 1.0, atol=1e-6)
    with pytest.raises(EmbedderError, match="2 texts but 1 images"):
        model.encode(["a", "b"], [None])
    with pytest.raises(EmbedderError, match="not found"):
        model.encode(images=[tmp_path / "missing.png"])
    with pytest.raises(EmbedderError, match="neither text nor image"):
        model.encode([""])


def test_an_adapter_s_template_cannot_be_silently_replaced(
    generator: Generator, tmp_path: Path
) -> None:
    folder = _adapter(generator, tmp_path / "adapter", "chat")
    with pytest.raises(EmbedderError, match="trained with 'chat'"):
        Embedder.load(generator.model_dir, adapter=folder, template="plain")


def test_inputs_a_user_passes_by_mistake_or_by_habit(
    generator: Generator, world_dir: Path, tmp_path: Path
) -> None:
    import unicodedata

    model = Embedder.load(generator.model_dir, settings=SETTINGS)
    path = sorted((world_dir / "eval_images").rglob("*.png"))[0]
    image_only = model.encode(images=[path], role="target")
    # None (or a pandas NaN) is no text, not the word "None".
    np.testing.assert_allclose(model.encode([None], [path], role="target"), image_only, atol=1e-6)
    np.testing.assert_allclose(
        model.encode([float("nan")], [path], role="target"), image_only, atol=1e-6
    )
    # One string or one image alone is one input.
    assert model.encode("a dog").shape == (1, model.dimension)
    np.testing.assert_allclose(model.encode(images=str(path), role="target"), image_only, atol=1e-6)
    # A file name spelled in another Unicode normalization is found, as in the pipeline.
    nfd = tmp_path / unicodedata.normalize("NFD", "caf\u00e9.png")
    nfd.write_bytes(path.read_bytes())
    by_nfc = model.encode(images=[tmp_path / "caf\u00e9.png"], role="target")
    np.testing.assert_allclose(by_nfc, image_only, atol=1e-6)
    cases = [
        (dict(texts=[b"bytes"]), "is bytes, not a string"),
        (dict(texts=["caf\udcb2"]), "unpaired surrogate"),
        (dict(texts=["\U000f0000"]), "reserves to mark control tokens"),
        (dict(texts=["a"], instruction="x\ud800"), "unpaired surrogate"),
        (dict(texts=["a"], role="doc"), "query or target"),
        (dict(images=[np.zeros((4, 4, 3), np.uint8)]), "Image.fromarray"),
        (dict(images=["https://example.com/a.png"]), "URLs are not fetched"),
        (dict(images=[tmp_path]), "is a folder"),
    ]
    for kwargs, message in cases:
        with pytest.raises(EmbedderError, match=message.replace(".", r"\.")):
            model.encode(**kwargs)
    with Image.open(path) as im:
        closed = im
    with pytest.raises(EmbedderError, match="PIL image that cannot be read"):
        model.encode(images=[closed])
