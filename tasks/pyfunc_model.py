"""A fine-tuned embedder as an MLflow Model (the `python_function` flavor), so a registered
version loads with `mlflow.pyfunc.load_model("models:/NAME/VERSION")` and serves with
`mlflow models serve -m models:/NAME/VERSION --env-manager local`.

The model folder (MLflow's layout, written by `save_embedder_model`):

    MLmodel                  flavor, signature, model_config (below)
    pyfunc_entry.py          the model's code: MLflow's "models from code", no pickle
    artifacts/adapter/       the peft adapter and gen2embed.json (its template)
    artifacts/<name>/        the base weights, only for a base made in a workdir (the
                             miniature world's tiny generator, ~5 MB): it travels inside
    input_example.json, serving_input_example.json, requirements.txt, python_env.yaml

`model_config` names the base (hub id and the commit it resolved to, or "artifacts/base"),
the dtype, and the image rules and prompt strings the pipeline's evaluation embedded with, so
`predict` gives the vectors the evaluation gave (docs/design.md, "Using the embedder").

Input: a DataFrame, one row per input, columns (all optional, at least one per row)
`text` (string), `image` (binary: an image file's bytes; base64 in JSON requests, "" for
none: MLflow decodes every cell of a binary column),
`image_path` (string: a file readable where the model runs), `instruction` (string, MMEB's
task instruction, put before the text). Param `role`: `query` (default) or `target`.
Output: float32 unit vectors, shape (N, D), row i for input i.

The code runs where gen2embed is installed (`--env-manager local`); the model records the
gen2embed version and commit it was made with.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc.model import PythonModel, PythonModelContext
from PIL import Image

from embedder.config import EmbedConfig
from embedder.errors import UserError
from embedder.image_files import decode_image
from embedder.inference import Embedder, with_instruction

ENTRY = Path(__file__).with_name("pyfunc_entry.py")
COLUMNS = ("text", "image", "image_path", "instruction")
ROLES = ("query", "target")
FORMAT = "gen2embed-pyfunc-1"  # model_config["format"]: what load_context understands
BASE_ARTIFACT = "base"  # artifacts/<this>: a base that travels inside the model


class ServedInputError(UserError, ValueError):
    """A request the model cannot embed; the message names the rows."""


def _missing(value: object) -> bool:
    """No value: None, NaN, or empty bytes (MLflow base64-decodes every cell of a binary
    column, so a JSON request writes "" where a row has no image)."""
    return (
        value is None
        or (isinstance(value, float) and math.isnan(value))
        or (isinstance(value, bytes | bytearray) and not value)
    )


def frame_inputs(frame: pd.DataFrame) -> tuple[list[str], list[Image.Image | str | None]]:
    """The texts (instruction folded in, as MMEB writes it) and images of `frame`'s rows.

    Raises ServedInputError naming the rows: unknown columns, an image given twice (`image`
    and `image_path`), bytes that are not an image, a row with nothing to embed."""
    unknown = sorted(set(frame.columns) - set(COLUMNS))
    if unknown:
        raise ServedInputError(
            f"unknown input columns {unknown}; the model reads {', '.join(COLUMNS)}"
        )
    texts: list[str] = []
    images: list[Image.Image | str | None] = []
    bad: list[str] = []
    for i, row in enumerate(frame.to_dict("records")):
        text = row.get("text")
        instruction = row.get("instruction")
        data, path = row.get("image"), row.get("image_path")
        if not _missing(data) and not _missing(path):
            bad.append(f"row {i}: both image and image_path")
            continue
        image: Image.Image | str | None = None
        if not _missing(data):
            if not isinstance(data, bytes | bytearray):
                bad.append(f"row {i}: image is {type(data).__name__}, not an image file's bytes")
                continue
            try:
                with Image.open(io.BytesIO(bytes(data))) as im:
                    image = decode_image(im)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                bad.append(f"row {i}: image bytes are not an image ({exc})")
                continue
        elif not _missing(path):
            image = str(path)
        text = "" if _missing(text) else text
        if not isinstance(text, str) or not (_missing(instruction) or isinstance(instruction, str)):
            bad.append(f"row {i}: text and instruction are strings")
            continue
        folded = with_instruction(text, None if _missing(instruction) else instruction)
        if not folded and image is None:
            bad.append(f"row {i}: no text, instruction or image")
            continue
        texts.append(folded)
        images.append(image)
    if bad:
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise ServedInputError("; ".join(bad[:10]) + more)
    return texts, images


def load_embedder(
    config: Mapping[str, Any],
    adapter: Path,
    base_in_model: Path | None = None,
    *,
    settings: EmbedConfig | None = None,
    template: str | None = None,
) -> Embedder:
    """The Embedder a saved model describes: `config` its model_config, `adapter` and
    `base_in_model` its artifacts (MLflow hands their local paths to `load_context`).

    Raises ServedInputError for a model_config of another format or a local base folder that
    is not on this machine, and the errors of `Embedder.load` (a hub base needs the hub or its
    cache). `settings` and `template` replace the recorded ones (`gen2embed encode`'s flags)."""
    if config.get("format") != FORMAT:
        raise ServedInputError(
            f"model_config format {config.get('format')!r}; this gen2embed reads {FORMAT!r}"
        )
    base = str(config["base"])
    if config.get("base_in_model"):
        if base_in_model is None:
            raise ServedInputError("the model records a base inside it, but has none")
        base = str(base_in_model)
    elif config.get("base_local") and not Path(base).is_dir():
        raise ServedInputError(
            f"the base model folder {base} (content {str(config.get('base_digest'))[:12]}) is "
            "not on this machine: copy it there, or load the adapter with Embedder.load"
        )
    return Embedder.load(
        base,
        adapter=adapter,
        revision=config.get("revision"),
        dtype=config.get("dtype", "auto"),
        template=template,
        settings=settings or EmbedConfig(**config["settings"]),
    )


class EmbedderModel(PythonModel):
    """The pyfunc around `embedder.inference.Embedder`: DataFrame in, (N, D) float32 out."""

    embedder: Embedder

    def load_context(self, context: PythonModelContext) -> None:
        base = context.artifacts.get(BASE_ARTIFACT)
        self.embedder = load_embedder(
            context.model_config,
            Path(context.artifacts["adapter"]),
            Path(base) if base else None,
        )

    def predict(
        self,
        context: PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> np.ndarray:
        role = (params or {}).get("role") or "query"
        if role not in ROLES:
            raise ServedInputError(f"params.role={role!r}: query or target")
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        texts, images = frame_inputs(model_input)
        return self.embedder.encode(texts, images, role=role)


def signature(dimension: int) -> Any:
    """Inputs (the optional columns above), the `role` param, outputs float32 (-1, D)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    inputs = Schema(
        [
            ColSpec("string", "text", required=False),
            ColSpec("binary", "image", required=False),
            ColSpec("string", "image_path", required=False),
            ColSpec("string", "instruction", required=False),
        ]
    )
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, dimension))])
    params = ParamSchema([ParamSpec("role", "string", "query")])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def input_example() -> pd.DataFrame:
    """One text with an instruction, one image (a 32x32 red PNG, as bytes)."""
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(png, format="PNG")
    return pd.DataFrame(
        {
            "text": ["a red square", None],
            "image": [b"", png.getvalue()],  # b"": no image (a JSON request writes "")
            "instruction": ["Find an image that matches the given caption", None],
        }
    )


def save_embedder_model(
    folder: Path,
    *,
    adapter: Path,
    base: str,
    revision: str | None,
    base_digest: str,
    base_in_model: bool,
    dtype: str,
    settings: EmbedConfig,
    dimension: int,
    source: Mapping[str, str],
) -> Path:
    """Write the MLflow model folder `folder` (layout above; replaced if present).

    `base`: a hub id (loaded at `revision`, a commit) or a local folder; with `base_in_model`
    the folder `base` is copied into the model. `settings`: the EmbedConfig the pipeline's
    evaluation embedded with. `source`: provenance recorded in MLmodel's metadata
    (gen2embed version, git commit, run ids). Raises what MLflow raises on a bad folder."""
    import mlflow

    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    config = {
        "format": FORMAT,
        "base": "(inside the model)" if base_in_model else base,
        "base_in_model": base_in_model,
        "base_local": Path(base).is_absolute(),
        "revision": revision,
        "base_digest": base_digest,
        "dtype": dtype,
        "settings": json.loads(settings.model_dump_json()),
    }
    artifacts = {"adapter": str(adapter)}
    if base_in_model:
        artifacts[BASE_ARTIFACT] = str(base)
    mlflow.pyfunc.save_model(
        str(folder),
        python_model=str(ENTRY),
        artifacts=artifacts,
        model_config=config,
        signature=signature(dimension),
        input_example=input_example(),
        pip_requirements=requirements(),
        metadata={"gen2embed": dict(source), "dimension": dimension},
    )
    return folder


def requirements() -> list[str]:
    """The installed versions of what the model's code imports (MLflow's requirements.txt;
    gen2embed itself is not on PyPI, hence `--env-manager local`)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("torch", "transformers", "peft", "safetensors", "pillow", "numpy", "pandas"):
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:  # pragma: no cover - all are dependencies
            continue
    return out
