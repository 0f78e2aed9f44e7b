"""The trained embedder outside the pipeline: load a base model (zero-shot) or a base plus a
fine-tuned adapter, and turn texts, images or text+image pairs into unit vectors.

    from embedder.inference import Embedder
    model = Embedder.load("Qwen/Qwen2-VL-2B-Instruct", adapter="run/finetune/<fp>/adapter")
    queries = model.encode(["a red apple"], role="query", instruction="Find an image that matches")
    targets = model.encode(images=["apple.jpg"], role="target")
    scores = queries @ targets.T

It runs on the engine of the `embed` and `evaluate` stages (`embedder.model.encode.encode`:
identical inputs embedded once, batches sorted by length, images decoded by the one decoder)
and renders prompts as they do (`embedder.embed.ItemBuilder`), so an item gives the vector the
pipeline's evaluation gives it. An adapter is loaded strictly (missing or unexpected keys are
an error) with the template it was trained with, read from `gen2embed.json` beside it
(written by the finetune stage). An adapter trained elsewhere (a folder or a hub id, such as
the paper authors' released ones) has no such record: pass its template.

    model = Embedder.load(
        "Qwen/Qwen2-VL-2B-Instruct",
        adapter="Y-J-Ju/SaHa-Qwen2-VL-2B-Instruct",
        template="hierarchical",
    )
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from embedder.artifacts import json_text
from embedder.config import EmbedConfig, EvaluateConfig
from embedder.datasets.sources import text_problem
from embedder.embed import ItemBuilder
from embedder.errors import UserError
from embedder.image_files import ImagePathError, decode_image, resolve_image_path
from embedder.model.backbone import Backbone, load_backbone, text_config
from embedder.model.encode import EmbedItem, encode
from embedder.model.prompts import PROMPT_STRINGS, ROLES, Role, Template
from embedder.model.shards import load_embeddings

TRAINING_FILE = "gen2embed.json"
ImageInput = str | Path | Image.Image | None


class EmbedderError(UserError, ValueError):
    """Inputs or files the embedder cannot use; the message says which."""


@dataclass(frozen=True)
class TrainedWith:
    """What an adapter was trained with, recorded beside it (`gen2embed.json`): the prompt
    template and its strings, and the image-token form."""

    template: Template
    strings: EmbedConfig
    wrapped_image_token: bool

    def to_json(self) -> str:
        """The record as written to `gen2embed.json`: {"template", "strings" (the
        PROMPT_STRINGS settings), "wrapped_image_token"}, indented, keys sorted."""
        return json_text(
            {
                "template": self.template,
                "strings": {k: getattr(self.strings, k) for k in PROMPT_STRINGS},
                "wrapped_image_token": self.wrapped_image_token,
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def read(cls, adapter: Path) -> TrainedWith | None:
        """The record in the adapter folder `adapter`, or None when it has no
        `gen2embed.json` (an adapter trained elsewhere). Raises ValueError for a file that is
        not JSON or holds invalid strings (pydantic's ValidationError), KeyError for a
        missing field."""
        path = adapter / TRAINING_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return cls(data["template"], EmbedConfig(**data["strings"]), data["wrapped_image_token"])


def _as_text(value: object, where: int | str) -> str:
    """A text input as the engine takes it: None (and a pandas NaN) is no text; anything but a
    string is refused, as is text a tokenizer cannot read (ingest's rules)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if not isinstance(value, str):
        raise EmbedderError(f"text {where} is {type(value).__name__}, not a string")
    problem = text_problem(value, f"text {where}")
    if problem:
        raise EmbedderError(problem)
    return value


def with_instruction(text: str, instruction: str | None) -> str:
    """MMEB's layout: the task instruction first, then the example's own text on a new line
    (`Represent the given image for classification`, `Find me an everyday image that matches
    the given caption: a dog.` are instructions with no text or with it inline).

    No (or an empty) instruction: `text` unchanged; no text: the instruction alone."""
    if not instruction:
        return text
    return f"{instruction}\n{text}" if text else instruction


class Embedder:
    """A loaded backbone (+ merged adapter) and how to prompt it.

    `encode` returns float32 unit vectors, shape (N, D), in input order.

    Built by `load`, or from a Backbone: `template` and `strings` render the prompts
    (docs/method.md section 2; default strings when None), `wrapped_image_token` picks the
    image token's form, and `settings` are the engine's (batch size, image rules); None
    gives the evaluation's image rules (docs/method.md section 2) and no DataLoader
    workers."""

    def __init__(
        self,
        backbone: Backbone,
        *,
        template: Template = "hierarchical",
        strings: EmbedConfig | None = None,
        wrapped_image_token: bool = False,
        settings: EmbedConfig | None = None,
    ) -> None:
        self.backbone = backbone
        self.template = template
        self.strings = strings or EmbedConfig()
        self.image_token = backbone.image_token(wrapped_image_token)
        # The evaluation's image rules by default (docs/method.md section 2: aspect <= 2:1, long
        # side <= 992, short side >= 336, a 992 x 992 pixel cap).
        defaults = EvaluateConfig()
        self.settings = settings or EmbedConfig(
            template=template,
            image_mode=defaults.image_mode,
            image_side=defaults.image_side,
            max_pixels=defaults.max_pixels,
            num_workers=0,
        )

    @classmethod
    def load(
        cls,
        base: str | Path,
        adapter: str | Path | None = None,
        *,
        template: Template | None = None,
        settings: EmbedConfig | None = None,
        device: str = "auto",
        dtype: str = "auto",
        revision: str | None = None,
        adapter_revision: str | None = None,
    ) -> Embedder:
        """Load `base` (a hub id or a local model folder) and, when given, merge the adapter
        `adapter` into it: a peft folder, or a hub repo id (downloaded at `adapter_revision`,
        None: its main branch), ours or another trainer's (`embedder.training.adapters`).
        The template is the adapter's (its `gen2embed.json`) unless `template` says
        otherwise; a base alone uses `hierarchical`, the paper's zero-shot prompt. Raises
        AdapterError (missing or unexpected adapter keys, a refused pickle), EmbedderError.

        All of them UserErrors: AdapterError also for an adapter that is neither a folder
        nor a downloadable hub repo, or holds no config or weights (checked before the base
        loads); ModelIdentityError when the adapter's hub revision cannot be resolved;
        EmbedderError for `adapter_revision` without `adapter`, an adapter with no
        `gen2embed.json` and no `template`, or a `template` other than the recorded one;
        and what `load_backbone` raises for the base (NotAModelError, UnsafeWeightsError,
        OSError, ValueError). `settings`: the engine's settings (their template replaced by
        the chosen one); `device`, `dtype`, `revision` as `load_backbone` takes them."""
        folder = None
        if adapter is not None:  # before the base: a wrong adapter fails in seconds
            from embedder.training.adapters import adapter_folder, weights_file

            folder = adapter_folder(adapter, adapter_revision)
            weights_file(folder)
        elif adapter_revision is not None:
            raise EmbedderError("adapter_revision is set but adapter is not")
        backbone = load_backbone(base, device=device, dtype=dtype, revision=revision)
        trained = None
        if folder is not None:
            from embedder.training.adapters import load_adapter

            backbone = load_adapter(backbone, folder)
            trained = TrainedWith.read(folder)
        if adapter is not None and trained is None and template is None:
            raise EmbedderError(
                f"adapter {adapter} records no template (no {TRAINING_FILE}: trained before "
                "it was written): pass the template it was trained with (template=, or --template)"
            )
        chosen = template or (trained.template if trained else "hierarchical")
        if trained is not None and template is not None and template != trained.template:
            raise EmbedderError(
                f"template={template!r} but the adapter {adapter} was trained with "
                f"{trained.template!r}: drop template= to use the adapter's"
            )
        return cls(
            backbone,
            template=chosen,
            strings=trained.strings if trained else None,
            wrapped_image_token=trained.wrapped_image_token if trained else False,
            settings=settings.model_copy(update={"template": chosen}) if settings else None,
        )

    def items(
        self,
        texts: Sequence[str | None] | None,
        images: Sequence[ImageInput] | None,
        *,
        role: Role,
        instruction: str | None,
        images_root: Path,
        scratch: Path,
    ) -> list[EmbedItem]:
        """The rendered items the engine embeds; PIL images are written (decoded, lossless)
        into `scratch`, paths are taken relative to `images_root`.

        `scratch` must lie under `images_root`, and so must every image path (a path
        outside it raises ValueError). Raises EmbedderError when neither texts nor images
        are given, their lengths differ, a text is not a usable string, an input has neither
        text, image nor instruction, an image is not a path or PIL image, is a URL, a folder
        or missing, or a PIL image cannot be decoded."""
        if texts is None and images is None:
            raise EmbedderError("encode needs texts, images, or both")
        n = len(texts) if texts is not None else len(images or [])
        if texts is not None and images is not None and len(texts) != len(images):
            raise EmbedderError(f"{len(texts)} texts but {len(images)} images: pair them 1:1")
        build = self.builder
        out = []
        for i in range(n):
            text = _as_text(texts[i], i) if texts is not None else ""
            image = images[i] if images is not None else None
            rel = self._image_path(image, images_root, scratch)
            if not text and not rel and not instruction:
                raise EmbedderError(f"input {i} has neither text nor image")
            out.append(build.item(with_instruction(text, instruction), rel, role))
        return out

    @property
    def builder(self) -> ItemBuilder:
        """How this embedder renders its inputs: the stages' item builder, with its template,
        strings and image token."""
        return ItemBuilder(self.template, self.image_token, self.strings, self.backbone.as_text)

    def item(self, text: str, image: str, role: Role) -> EmbedItem:
        """One input rendered as this embedder prompts it; `image` a path relative to the
        images root the engine is given ("" for none)."""
        return self.builder.item(text, image, role)

    @staticmethod
    def _image_path(image: ImageInput, images_root: Path, scratch: Path) -> str:
        if image is None or (isinstance(image, str) and not image):
            return ""
        if isinstance(image, Image.Image):
            try:
                rgb = decode_image(image.copy())
            except (ValueError, OSError, AssertionError) as exc:  # a closed file, a bad mode
                raise EmbedderError(
                    f"a PIL image that cannot be read ({type(exc).__name__}: {exc}); pass it "
                    "while its file is open, or its path"
                ) from None
            digest = hashlib.blake2b(rgb.tobytes(), digest_size=12).hexdigest()
            name = f"{digest}-{rgb.size[0]}x{rgb.size[1]}.png"
            if not (scratch / name).is_file():
                rgb.save(scratch / name)  # PNG: lossless, so the path gives these pixels back
            return str((scratch / name).relative_to(images_root))
        if not isinstance(image, str | Path):
            raise EmbedderError(
                f"an image is a path or a PIL image, not {type(image).__name__}"
                + (" (use PIL.Image.fromarray)" if hasattr(image, "__array__") else "")
            )
        if isinstance(image, str) and "://" in image:
            raise EmbedderError(f"image {image}: URLs are not fetched; download it first")
        path = Path(os.path.abspath(Path(image).expanduser()))
        if path.is_dir():
            raise EmbedderError(f"image {image} is a folder, not an image file")
        try:  # the pipeline's lookup: a name spelled in another Unicode normalization is found
            found = resolve_image_path(Path("/"), path.relative_to("/").as_posix())
        except ImagePathError as exc:
            raise EmbedderError(f"image {image} not found ({exc})") from None
        return str(found.relative_to(images_root))

    def encode(
        self,
        texts: Iterable[str] | None = None,
        images: Iterable[ImageInput] | None = None,
        *,
        role: Role = "query",
        instruction: str | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        """float32 unit vectors, shape (N, D), row i for input i.

        `texts` and `images` (paths or PIL images; None or "" for none) are paired 1:1 when
        both are given. `role`: `query` inputs get the template's query suffix, `target`
        inputs none (MMEB: candidates are targets). `instruction` is prefixed to each text as
        MMEB writes it (`with_instruction`). An empty input gives shape (0, D).

        A str (or a single path or PIL image) is one input. Image paths are absolute or
        relative to the working directory. Raises EmbedderError (a UserError) for a bad
        `role` or instruction, both inputs None, and the input problems `items` names; what
        embedder.model.encode.encode raises (an image file Pillow cannot decode, out of
        memory) comes through unchanged. `progress`: show a progress bar. Runs on the
        backbone's device; nothing is kept on disk (a temporary folder)."""
        if role not in ROLES:
            raise EmbedderError(f"role={role!r}: query or target")
        # One text or one image alone is one input, not a sequence of characters.
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(images, str | Path | Image.Image):
            images = [images]
        # Any iterable (a generator, a pandas Series, a numpy array of strings): taken once.
        texts = None if texts is None else list(texts)
        images = None if images is None else list(images)
        if instruction is not None:
            _as_text(instruction, "instruction")
        if not texts and not images and (texts is not None or images is not None):
            return np.zeros((0, self.dimension), dtype=np.float32)
        with tempfile.TemporaryDirectory(prefix="gen2embed-encode-") as tmp:
            root = Path("/")
            scratch = Path(tmp) / "images"
            scratch.mkdir()
            items = self.items(
                texts,
                images,
                role=role,
                instruction=instruction,
                images_root=root,
                scratch=scratch,
            )
            return self.embed_items(items, root, Path(tmp) / "vectors", progress=progress)

    def embed_items(
        self, items: Sequence[EmbedItem], images_root: Path, folder: Path, *, progress: bool
    ) -> np.ndarray:
        """(len(items), D) float32 vectors of rendered items, through the engine's resumable
        shards in `folder` (a rerun on the same folder skips finished shards).

        Row i is item i's vector (identical items share one computation), L2-normalised.
        Image paths of the items are relative to `images_root`. `folder` keeps the shards
        (embedder.model.encode.encode's files); raises as that function does."""
        encode(self.backbone, items, images_root, folder, self.settings, progress=progress)
        keys, matrix = load_embeddings(folder)
        row = {k: i for i, k in enumerate(keys)}
        return np.ascontiguousarray(matrix[[row[it.key] for it in items]], dtype=np.float32)

    @property
    def dimension(self) -> int:
        """D, the length of every vector (the language model's hidden size)."""
        return int(text_config(self.backbone.model.config).hidden_size)
