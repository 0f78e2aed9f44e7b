"""The embedder as an mteb model (embedder.mteb_model): mteb's batches get the vectors
`Embedder.encode` gives, by role and instruction; `mteb.evaluate` on a retrieval task built in
memory scores what the vectors say; mteb's own mock tasks (offline) all run. Skipped without
the `mteb` extra."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

mteb = pytest.importorskip("mteb")

from datasets import Dataset  # noqa: E402
from mteb.abstasks.retrieval import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402
from mteb.types import PromptType  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from embedder.config import EmbedConfig  # noqa: E402
from embedder.inference import Embedder, EmbedderError  # noqa: E402
from embedder.mteb_model import MtebEmbedder, load_mteb_model, weights_digest  # noqa: E402
from embedder.outputs import Generator  # noqa: E402

SETTINGS = EmbedConfig(num_workers=0, image_mode="fixed", image_side=64)
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange"]
SHAPES = ["square", "circle", "triangle", "square", "circle", "triangle"]
QUERY_INSTRUCTION = "Find an image that matches the given caption."


def picture(i: int) -> Image.Image:
    """Image i of six: a coloured shape on grey, sizes differ (the engine resizes them)."""
    side = 40 + 8 * i
    im = Image.new("RGB", (side, side + 4 * (i % 2)), "lightgrey")
    draw = ImageDraw.Draw(im)
    box = (6, 6, side - 6, side - 6)
    if SHAPES[i] == "circle":
        draw.ellipse(box, fill=COLOURS[i])
    elif SHAPES[i] == "triangle":
        draw.polygon([(side // 2, 6), (6, side - 6), (side - 6, side - 6)], fill=COLOURS[i])
    else:
        draw.rectangle(box, fill=COLOURS[i])
    return im


def caption(i: int) -> str:
    return f"a {COLOURS[i]} {SHAPES[i]}"


def metadata(category: str, prompt: dict[str, str] | None = None) -> TaskMetadata:
    return TaskMetadata(
        name=f"Gen2EmbedTiny{category.upper()}",
        description="Four queries, six candidates (two distractors), built in memory.",
        dataset={"path": "gen2embed/in-memory", "revision": "none"},
        type="Any2AnyRetrieval",
        category=category,
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        main_score="ndcg_at_10",
        date=("2025-01-01", "2025-01-01"),
        domains=[],
        task_subtypes=[],
        license="cc-by-4.0",
        annotations_creators="derived",
        dialect=[],
        modalities=["text", "image"],
        sample_creation="created",
        bibtex_citation="",
        prompt=prompt,
    )


def columns(category: str, side: str, n: int) -> dict[str, list[Any]]:
    """The text/image columns of the queries (rows 0-3) or candidates (rows 0-5) of a task of
    `category` (`it2i`: queries caption + picture, candidates pictures)."""
    query, doc = category.split("2")
    mods = query if side == "query" else doc
    rows = range(n)
    out: dict[str, list[Any]] = {}
    if "t" in mods:
        out["text"] = [
            caption(i) if side == "doc" else f"which picture shows {caption(i)}?" for i in rows
        ]
    if "i" in mods:
        # A query's picture is its target's, flipped: related, not identical.
        out["image"] = [
            picture(i) if side == "doc" else picture(i).transpose(Image.FLIP_LEFT_RIGHT)
            for i in rows
        ]
    return out


class TinyRetrieval(AbsTaskRetrieval):
    """Query i's one relevant candidate is candidate i; candidates 4 and 5 are distractors.
    (mteb reads a task's metadata from its class.)"""

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        category = self.metadata.category
        assert category is not None
        queries = {"id": [f"q{i}" for i in range(4)], **columns(category, "query", 4)}
        corpus = {"id": [f"d{i}" for i in range(6)], **columns(category, "doc", 6)}
        self.dataset = {
            "default": {
                "test": RetrievalSplitData(
                    queries=Dataset.from_dict(queries),
                    corpus=Dataset.from_dict(corpus),
                    relevant_docs={f"q{i}": {f"d{i}": 1} for i in range(4)},
                    top_ranked=None,
                )
            }
        }
        self.data_loaded = True


class TinyIT2I(TinyRetrieval):
    metadata = metadata("it2i")  # as MMEB's CIRR, FashionIQ: text + picture -> picture


class TinyT2IT(TinyRetrieval):
    metadata = metadata("t2it")


def loader(cols: dict[str, list[Any]], batch_size: int = 2) -> DataLoader:
    """Batches as mteb's collate makes them: each column a list (texts, PIL images)."""
    n = len(next(iter(cols.values())))
    rows = [{k: v[i] for k, v in cols.items()} for i in range(n)]
    return DataLoader(
        rows,  # type: ignore[arg-type]
        batch_size=batch_size,
        collate_fn=lambda batch: {k: [row[k] for row in batch] for k in batch[0]},
    )


@pytest.fixture(scope="module")
def embedder(generator: Generator) -> Embedder:
    return Embedder.load(generator.model_dir, settings=SETTINGS)


@pytest.fixture(scope="module")
def model(embedder: Embedder) -> MtebEmbedder:
    return MtebEmbedder(embedder)


def encode(
    model: MtebEmbedder,
    cols: dict[str, list[Any]],
    prompt_type: PromptType | None,
    meta: TaskMetadata | None = None,
) -> np.ndarray:
    return model.encode(
        loader(cols),
        task_metadata=meta or metadata("it2i"),
        hf_split="test",
        hf_subset="default",
        prompt_type=prompt_type,
        batch_size=2,
    )


@pytest.mark.parametrize("mods", ["text", "image", "text+image"])
def test_encode_gives_the_embedder_s_vectors_by_role(
    model: MtebEmbedder, embedder: Embedder, mods: str
) -> None:
    assert isinstance(model, mteb.EncoderProtocol)
    cols = columns({"text": "t2t", "image": "i2i", "text+image": "it2it"}[mods], "doc", 5)
    texts, images = cols.get("text"), cols.get("image")
    by_role = {}
    for prompt_type, role in [
        (PromptType.query, "query"),
        (PromptType.document, "target"),
        (None, "query"),  # classification, clustering, STS: role_without_prompt_type
    ]:
        got = encode(model, cols, prompt_type)
        assert got.dtype == np.float32 and got.shape == (5, embedder.dimension)
        want = embedder.encode(texts, images, role=role)
        np.testing.assert_allclose(got, want, atol=1e-6)
        by_role[role] = got
    # The roles render different prompts, so a swapped role would be seen.
    assert not np.allclose(by_role["query"], by_role["target"], atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(by_role["query"], axis=1), 1.0, atol=1e-5)


def test_instructions_from_the_map_or_the_task(model: MtebEmbedder, embedder: Embedder) -> None:
    cols = columns("t2t", "query", 3)
    plain = embedder.encode(cols["text"], role="query")
    instructed = embedder.encode(cols["text"], role="query", instruction=QUERY_INSTRUCTION)
    targets = embedder.encode(cols["text"], role="target")
    task = metadata("it2i", prompt={"query": QUERY_INSTRUCTION})
    np.testing.assert_allclose(encode(model, cols, PromptType.query, task), plain, atol=1e-6)

    mapped = MtebEmbedder(
        embedder, revision="r", instructions={"Gen2EmbedTinyIT2I-query": QUERY_INSTRUCTION}
    )
    np.testing.assert_allclose(encode(mapped, cols, PromptType.query), instructed, atol=1e-6)
    np.testing.assert_allclose(encode(mapped, cols, PromptType.document), targets, atol=1e-6)
    prompted = MtebEmbedder(embedder, revision="r", task_prompts=True)
    np.testing.assert_allclose(
        encode(prompted, cols, PromptType.query, task), instructed, atol=1e-6
    )
    np.testing.assert_allclose(
        encode(prompted, cols, PromptType.document, task), targets, atol=1e-6
    )
    # A plain-string task prompt is for queries: MMEB's candidates carry none.
    as_string = metadata("it2i", prompt=QUERY_INSTRUCTION)  # type: ignore[arg-type]
    assert prompted.instruction_for(as_string, PromptType.document) is None
    assert prompted.instruction_for(as_string, PromptType.query) == QUERY_INSTRUCTION


def test_what_the_model_refuses(model: MtebEmbedder, embedder: Embedder) -> None:
    with pytest.raises(EmbedderError, match="audio"):
        encode(model, {"audio": [b"x"], "text": ["a"]}, PromptType.query)
    with pytest.raises(EmbedderError, match="neither text nor image"):
        encode(model, {"id": ["x"]}, PromptType.query)
    with pytest.raises(EmbedderError, match="role_without_prompt_type"):
        MtebEmbedder(embedder, revision="r", role_without_prompt_type="document")  # type: ignore[arg-type]
    assert encode(model, {"text": []}, PromptType.query).shape == (0, embedder.dimension)


def test_model_meta(model: MtebEmbedder, embedder: Embedder, generator: Generator) -> None:
    meta = model.mteb_model_meta
    assert meta.name == "gen2embed/model-hierarchical"
    assert meta.revision == weights_digest(embedder) and len(meta.revision) == 16
    assert meta.embed_dim == embedder.dimension
    assert meta.similarity_fn_name.value == "cosine"
    assert meta.modalities == ["text", "image"]
    assert meta.n_parameters == sum(p.numel() for p in embedder.backbone.model.parameters())
    # Another template (other prompts) is another revision, and another name.
    chat = MtebEmbedder.load(generator.model_dir, template="chat", settings=SETTINGS)
    assert chat.mteb_model_meta.revision != meta.revision
    assert chat.mteb_model_meta.name == "gen2embed/model-chat"
    # The ModelMeta's loader (mteb's CLI path) rebuilds the model, and refuses a revision
    # the files no longer give.
    cmeta = chat.mteb_model_meta
    again = cmeta.loader(cmeta.name, revision=cmeta.revision, **cmeta.loader_kwargs)
    assert again.mteb_model_meta.revision == cmeta.revision
    with pytest.raises(EmbedderError, match="files changed"):
        load_mteb_model(cmeta.name, revision="0" * 16, **cmeta.loader_kwargs)


@pytest.mark.parametrize("task_class", [TinyIT2I, TinyT2IT], ids=["it2i", "t2it"])
def test_mteb_evaluate_scores_what_the_vectors_say(
    model: MtebEmbedder, embedder: Embedder, tmp_path: Path, task_class: type[TinyRetrieval]
) -> None:
    task = task_class()
    category = task.metadata.category
    assert category is not None
    cache = mteb.ResultCache(cache_path=tmp_path / "mteb")
    result = mteb.evaluate(
        model,
        task,
        cache=cache,
        prediction_folder=tmp_path / "predictions",
        show_progress_bar=False,
        encode_kwargs={"batch_size": 3},
    )
    assert not result.exceptions
    (scores,) = result.task_results[0].scores["test"]

    # By hand: the embedder's vectors of the same inputs, queries as queries, candidates as
    # targets; cosine is the dot product of unit vectors.
    q, d = columns(category, "query", 4), columns(category, "doc", 6)
    queries = embedder.encode(q.get("text"), q.get("image"), role="query")
    docs = embedder.encode(d.get("text"), d.get("image"), role="target")
    sims = queries @ docs.T
    top1 = sims.argmax(axis=1)
    assert scores["ndcg_at_1"] == pytest.approx(float(np.mean(top1 == np.arange(4))), abs=1e-5)
    ranks = (sims > sims[np.arange(4), np.arange(4)][:, None]).sum(axis=1) + 1
    assert scores["mrr_at_10"] == pytest.approx(float(np.mean(1 / ranks)), abs=1e-5)

    saved = json.loads(
        (tmp_path / "predictions" / f"{task.metadata.name}_predictions.json").read_text()
    )
    assert saved["mteb_model_meta"]["revision"] == model.mteb_model_meta.revision
    predicted = saved["default"]["test"]
    got = np.array([[predicted[f"q{i}"][f"d{j}"] for j in range(6)] for i in range(4)])
    np.testing.assert_allclose(got, sims, atol=1e-5)
    # Filed under the model's name and revision.
    assert cache.get_task_result_path(task.metadata.name, model.mteb_model_meta).is_file()


def test_mteb_s_mock_tasks_all_run_offline(model: MtebEmbedder) -> None:
    """mteb's own check of a model: every mock task a text+image model can run (retrieval,
    classification, clustering, STS, zero-shot, ...), all built in memory."""
    run = mteb.mock_run(model)
    ran = {name for name, status in run.items() if isinstance(status, mteb.TaskResult)}
    failed = {
        name: status.exception
        for name, status in run.items()
        if status is not None and not isinstance(status, mteb.TaskResult)
    }
    assert not failed
    assert {"MockAny2AnyRetrievalT2I", "MockAny2AnyRetrievalI2T", "MockRetrievalTask"} <= ran
    assert {"MockZeroShotClassification", "MockImageClassification"} <= ran
