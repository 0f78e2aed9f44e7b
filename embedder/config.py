"""Pipeline configuration: one pydantic model per stage, a PipelineConfig holding them.

Configs come from a named preset, optionally a YAML file on top, then dotted overrides
(`ingest.on_bad_rows=skip`). Every model forbids unknown keys, so a typo is an error that
names the key instead of a silently ignored setting. Where one setting supplies another's
default (a mining recipe gives k and m, k and m give retrieval's R), a value set explicitly
always wins, or the combination is an error naming both keys.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from embedder.errors import UserError
from embedder.model.prompts import DEFAULT_STRINGS, Template

# The mining strategies (embedder.mining), and what a table row may fine-tune on: a strategy's
# clusters, or nothing (`none`: the row evaluates the base, or a released adapter, as it is).
# saha_oracle is a bound, not a method: SaHa's clusters without the planted false negatives,
# known only where the data plants them (the miniature world's fn_group).
Strategy = Literal["saha", "topk", "topk_margin", "in_batch", "saha_oracle"]
STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)
# What `mine.compare_strategies` mines beside the chosen one (the methods, not the bound).
COMPARED: tuple[Strategy, ...] = ("saha", "topk", "topk_margin", "in_batch")
Negatives = Literal["none", Strategy]


def _given(section: BaseModel) -> list[str]:
    """The keys of `section` set explicitly to something other than their default, sorted.
    (Set and equal to the default changes nothing: a dumped config, every key present and
    most at their defaults, must load again.)"""
    fields = type(section).model_fields
    return sorted(
        k
        for k in section.model_fields_set
        if getattr(section, k) != fields[k].get_default(call_default_factory=True)
    )


class ConfigError(UserError, ValueError):
    """A configuration that cannot be used; the message names the offending key.

    `problems`: each problem's own sentence (a validator's message as it raised it), for
    callers that show one without the framing."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class WorldConfig(_Section):
    """The built-in miniature world (embedder.world)."""

    seed: int = 0
    image_size: int = Field(64, ge=32, le=512, description="Side of the square scenes, px.")
    train_pairs: int = Field(
        400, ge=16, description="Training pairs per train subset (before planted false negatives)."
    )
    eval_queries: int = Field(100, ge=4, description="Queries per eval subset.")
    eval_candidates: int = Field(
        20, ge=4, description="Candidates per retrieval/VQA/grounding eval query (index 0 correct)."
    )
    same_category_negatives: int = Field(
        5, ge=0, description="Eval negatives that share the main category but differ in details."
    )
    false_negative_share: float = Field(
        0.15,
        ge=0.0,
        le=0.5,
        description="Share of train pairs planted in false-negative groups (pairs whose "
        "positives also fit each other's queries).",
    )
    compositional_rows: int = Field(
        16,
        ge=0,
        description="Rows per category of the world's own SugarCrepe / SugarCrepe++ set (0: none).",
    )

    @model_validator(mode="after")
    def _room_for_the_hard_negatives(self) -> WorldConfig:
        # A query's candidates: its target, the same-category variants, at least one other.
        if self.eval_candidates < self.same_category_negatives + 2:
            raise ValueError(
                f"world.eval_candidates={self.eval_candidates} leaves no room for "
                f"world.same_category_negatives={self.same_category_negatives}: each query "
                "needs its target, those variants and at least one other candidate, so "
                f"eval_candidates >= {self.same_category_negatives + 2}"
            )
        return self


class IngestConfig(_Section):
    """Where training and evaluation data come from and how bad rows are handled."""

    source: Literal["world", "mmeb", "jsonl", "hub"] = "world"
    train_dir: Path | None = Field(
        None, description="Local MMEB-train copy: one folder per subset with <split>-*.parquet."
    )
    train_images: Path | None = Field(None, description="Images root for train image paths.")
    eval_dir: Path | None = Field(
        None, description="Local MMEB-eval copy: one folder per subset with test-*.parquet."
    )
    eval_images: Path | None = Field(None, description="Images root for eval image paths.")
    jsonl_files: list[Path] = Field(
        default_factory=list, description="JSONL files with MMEB-train columns (source=jsonl)."
    )
    jsonl_images: Path | None = Field(None, description="Images root for the JSONL files.")
    hub_train: str = "TIGER-Lab/MMEB-train"
    hub_eval: str = "TIGER-Lab/MMEB-eval"
    train_splits: list[str] = Field(
        default_factory=lambda: ["original"],
        description="MMEB-train splits to read: original, diverse_instruction.",
    )
    train_subsets: list[str] | None = Field(
        None, description="Train subsets to keep (None: all); for JSONL, file names without .jsonl."
    )
    eval_subsets: list[str] | None = Field(None, description="Eval subsets to keep (None: all).")
    sugarcrepe_dir: Path | None = Field(
        None,
        description="SugarCrepe's data folder (add_att.json, ..., swap_obj.json); "
        "scored beside MMEB when set.",
    )
    sugarcrepe_pp_dir: Path | None = Field(
        None,
        description="SugarCrepe++'s data folder (replace_att.json, ..., swap_obj.json); "
        "scored beside MMEB when set.",
    )
    compositional_images: Path | None = Field(
        None, description="Images root of both (COCO val2017: the folder of the .jpg files)."
    )
    on_bad_rows: Literal["error", "skip"] = Field(
        "error",
        description="error: fail naming the bad rows; skip: drop them into the rejects table.",
    )
    batch_rows: int = Field(2048, ge=1, description="Rows per streamed record batch.")
    image_workers: int = Field(8, ge=1, description="Threads checking images in parallel.")

    @model_validator(mode="after")
    def _source_has_its_paths(self) -> IngestConfig:
        needs: dict[str, list[str]] = {
            "mmeb": ["train_dir", "train_images"],
            "jsonl": ["jsonl_files", "jsonl_images"],
            "hub": ["train_images"],
        }
        missing = [k for k in needs.get(self.source, []) if not getattr(self, k)]
        if missing:
            raise ValueError(
                f"source={self.source} needs {', '.join('ingest.' + k for k in missing)}"
            )
        if self.eval_dir is not None and self.eval_images is None:
            raise ValueError("ingest.eval_dir is set but ingest.eval_images is not")
        self._every_setting_applies()
        benchmarks = [k for k in ("sugarcrepe_dir", "sugarcrepe_pp_dir") if getattr(self, k)]
        if benchmarks and self.compositional_images is None:
            raise ValueError(
                f"ingest.{benchmarks[0]} is set but ingest.compositional_images is not (the "
                "folder of the COCO val2017 images their file names point at)"
            )
        if self.compositional_images is not None and not benchmarks:
            raise ValueError(
                "ingest.compositional_images is set but neither ingest.sugarcrepe_dir nor "
                "ingest.sugarcrepe_pp_dir is: there is no compositional table for it to apply to"
            )
        if benchmarks and self.source in ("mmeb", "jsonl") and self.eval_dir is None:
            raise ValueError(
                f"ingest.{benchmarks[0]} is set but ingest.eval_dir is not: the evaluate stage "
                "scores SugarCrepe beside MMEB's eval table, and without one it does not run"
            )
        if (
            len(benchmarks) == 2
            and Path(self.sugarcrepe_dir or "").resolve()
            == Path(self.sugarcrepe_pp_dir or "").resolve()
        ):
            raise ValueError(
                "ingest.sugarcrepe_dir and ingest.sugarcrepe_pp_dir name one folder; each "
                "benchmark ships its own (SugarCrepe's data/ and SugarCrepe++'s data/)"
            )
        return self

    def _every_setting_applies(self) -> None:
        """A setting given for a source that cannot honour it is an error naming both,
        never silently ignored (`train_subsets` for JSONL files, `train_dir` for the world)."""
        given = set(_given(self))
        for key in sorted(given):
            sources = INGEST_SETTING_SOURCES.get(key)
            if sources is not None and self.source not in sources:
                used_by = ", ".join(f"source={s}" for s in sources)
                raise ValueError(
                    f"ingest.{key} does nothing with ingest.source={self.source} (it is read "
                    f"with {used_by}): drop it, or change ingest.source"
                )
        has_eval_dir = self.eval_dir is not None
        if self.source == "hub" and has_eval_dir and "hub_eval" in given:
            raise ValueError(
                "ingest.hub_eval and ingest.eval_dir are both set: the local eval_dir is read "
                "and hub_eval would do nothing; keep one"
            )
        if self.source in ("mmeb", "jsonl") and not has_eval_dir:
            for key in ("eval_images", "eval_subsets"):
                if key in given:
                    raise ValueError(
                        f"ingest.{key} is set but ingest.eval_dir is not: with "
                        f"source={self.source} there is no eval table for it to apply to"
                    )


# The sources each ingest setting is read with (settings absent here apply to every source).
# `world` is read through the MMEB-layout reader on the world's own folders, so subset
# selection and splits apply to it; its folders and images are the world stage's.
INGEST_SETTING_SOURCES: dict[str, tuple[str, ...]] = {
    "train_dir": ("mmeb",),
    "train_images": ("mmeb", "hub"),
    "eval_dir": ("mmeb", "jsonl", "hub"),
    "eval_images": ("mmeb", "jsonl", "hub"),
    "jsonl_files": ("jsonl",),
    "jsonl_images": ("jsonl",),
    "hub_train": ("hub",),
    "hub_eval": ("hub",),
    "train_splits": ("world", "mmeb", "hub"),
    # The world scores its own compositional set (world.compositional_rows).
    "sugarcrepe_dir": ("mmeb", "jsonl", "hub"),
    "sugarcrepe_pp_dir": ("mmeb", "jsonl", "hub"),
    "compositional_images": ("mmeb", "jsonl", "hub"),
}


class ModelConfig(_Section):
    """The backbone: `tiny` (built and pretrained here for the miniature world), a hub id
    (e.g. Qwen/Qwen2-VL-2B-Instruct) or a local folder."""

    backbone: str = "tiny"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on GPU, float32 on CPU."
    )
    attn: Literal["auto", "sdpa", "flash_attention_2", "eager"] = Field(
        "auto", description="auto: flash-attention when installed on GPU, else SDPA."
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    trust_remote_code: bool = False
    revision: str | None = None
    wrapped_image_token: bool = Field(
        False,
        description="Wrap the image token in <|vision_start|>/<|vision_end|> (Qwen's own "
        "template) instead of the authors' bare <|image_pad|>.",
    )


class PretrainConfig(_Section):
    """The tiny generator: architecture and next-token pretraining on the world's text."""

    steps: int = Field(1200, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0)
    warmup: int = Field(50, ge=0)
    seed: int = 0
    vocab_size: int = Field(640, ge=300)
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 512
    vision_depth: int = 2
    vision_dim: int = 64
    patch: int = 8
    rope_theta: float = Field(
        10000.0,
        gt=0,
        description="The language model's rotary base. M-RoPE gives an image token's width "
        "position the lowest frequencies; over a 4-token-wide grid they barely turn at 10,000.",
    )
    exact_system_prompt: bool = Field(
        False,
        description="Train with the exact hierarchical system prompt too. Off by default so "
        "the zero-shot check stays zero-shot (paraphrases are used).",
    )
    eval_per_type: int = Field(64, ge=1, description="Held-out VQA questions per type.")


class EmbedConfig(_Section):
    """Zero-shot embedding of the training pairs (and of the eval set by `zeroshot`)."""

    template: Template = "hierarchical"
    batch_size: int = Field(32, ge=1)
    shard_size: int = Field(4096, ge=1, description="Items per output shard (resume unit).")
    num_workers: int = Field(2, ge=0, description="DataLoader processes decoding images.")
    padding_side: Literal["left", "right"] = "left"
    image_mode: Literal["fixed", "eval", "native"] = Field(
        "fixed",
        description="fixed: image_side x image_side (training, 448); eval: aspect <= 2:1, "
        "long side <= 992, short side >= 336; native: untouched.",
    )
    image_side: int = Field(448, ge=16)
    max_pixels: int | None = Field(
        None, ge=1, description="Cap on pixels per image in the processor (None: the model's)."
    )
    out_dtype: Literal["float32", "float16"] = "float32"
    # embedder.model.prompts.PromptStrings, as settings (same names, same defaults).
    system: str = DEFAULT_STRINGS.system
    query_suffix_image: str = DEFAULT_STRINGS.query_suffix_image
    query_suffix_text: str = DEFAULT_STRINGS.query_suffix_text
    generic_system: str = DEFAULT_STRINGS.generic_system


LM_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class FinetuneConfig(_Section):
    """LoRA fine-tuning on mined clusters (docs/method.md section 4). Defaults are the paper's 7B
    recipe; presets carry the 2B and tiny ones."""

    template: Template = Field(
        "hierarchical", description="Prompt template of the training inputs (set per table row)."
    )
    steps: int = Field(1500, ge=1, description="Optimizer steps.")
    warmup: int = Field(100, ge=0, description="Linear warm-up steps, then linear decay to 0.")
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(
        None, gt=0, description="Clip the gradient norm (None: no clipping, as the paper)."
    )
    temperature: float = Field(0.02, gt=0, description="InfoNCE temperature.")
    pairs_per_batch: int = Field(
        256,
        ge=1,
        description="Pairs per device per step, filled with whole clusters (the paper's 16 "
        "clusters x 16 pairs); every row trains on this many whatever its clusters' sizes "
        "(embedder.training.batches).",
    )
    grad_cache: bool = Field(True, description="GradCache: batch size independent of memory.")
    chunk_size: int = Field(
        32, ge=1, description="Inputs per forward pass (GradCache chunk; memory knob only)."
    )
    gradient_checkpointing: bool = False
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(64, ge=1)
    lora_dropout: float = Field(0.1, ge=0, lt=1)
    dora: bool = True
    lora_init: Literal["gaussian", "default"] = Field(
        "gaussian", description="Initialisation of the LoRA A matrices (B starts at zero)."
    )
    target_modules: list[str] = Field(
        default_factory=lambda: list(LM_PROJECTIONS),
        description="Last names of the Linear layers given LoRA, under the language model "
        "only (found by the backbone family's module path: the vision tower gets none, though "
        "Qwen2.5-VL's also has gate/up/down_proj layers); by default its attention and MLP "
        "projections. A name that matches nothing there is an error.",
    )
    checkpoint_every: int = Field(100, ge=1, description="Steps between resumable checkpoints.")
    keep_checkpoints: int = Field(2, ge=1)
    merge: bool = Field(False, description="Also save the merged full model (large).")
    seed: int = 0


class EvaluateConfig(_Section):
    """MMEB-style evaluation (docs/method.md section 5), with the base model (zero-shot) or a
    fine-tuned adapter: Precision@1 per subset as MMEB's reference toolkit computes it (argmax,
    a tie with the correct candidate counts as correct), strict P@1 and the tie rate beside."""

    template: Template = Field(
        "hierarchical", description="Prompt template of the eval inputs (set per table row)."
    )
    max_queries: int | None = Field(
        None, ge=1, description="Cap per eval subset and per SugarCrepe category (None: all)."
    )
    image_mode: Literal["fixed", "eval", "native"] = Field(
        "eval",
        description="eval: aspect <= 2:1, long side <= 992, short side >= 336 (the paper); "
        "fixed: image_side square.",
    )
    image_side: int = Field(448, ge=16, description="Side for image_mode=fixed.")
    max_pixels: int = Field(
        992 * 992, ge=1, description="Hard cap on pixels per image given to the processor."
    )
    hit_k: int = Field(5, ge=1, description="Hit@k reported beside P@1.")
    tie_warning: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Warn (log, the run's warnings, the evaluate summary line) when a subset's "
        "tie rate, the share of its queries whose best score another candidate reaches within "
        "1e-6, is above this: P@1 (MMEB argmax) credits such ties to the correct candidate, "
        "so a model mapping inputs to one vector would score high.",
    )
    sanity_items: int = Field(
        16,
        ge=0,
        description="Items embedded twice in different batches before the run; each "
        "must find itself first (0: skip the check).",
    )
    adapter: str | None = Field(
        None,
        description="A released adapter evaluated with the base (set per table row: "
        "table.rows[].adapter).",
    )
    adapter_revision: str | None = Field(
        None, description="Its hub revision (set per table row: table.rows[].adapter_revision)."
    )


class TableRow(_Section):
    """One row of the comparison table: a template, and how the model was fine-tuned, or
    the released adapter it evaluates (docs/method.md section 7)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    template: Template
    negatives: Negatives = Field(
        description="none: zero-shot (no fine-tuning), or the released `adapter`; otherwise "
        "the mining strategy whose clusters make the training batches (in_batch: random "
        "clusters)."
    )
    adapter: str | None = Field(
        None,
        min_length=1,
        description="A peft adapter trained elsewhere (a folder, or a hub id such as the "
        "paper authors' Y-J-Ju/SaHa-Qwen2-VL-2B-Instruct), evaluated with the base as it is: "
        "only with negatives: none (nothing is mined or fine-tuned for the row).",
    )
    adapter_revision: str | None = Field(
        None, min_length=1, description="The hub revision of `adapter` (None: its main branch)."
    )

    @model_validator(mode="after")
    def _adapter_is_evaluated_as_is(self) -> TableRow:
        if self.adapter is not None and self.negatives != "none":
            raise ValueError(
                f"row {self.name}: adapter and negatives={self.negatives} are both set: a "
                "released adapter is evaluated as it is, not fine-tuned again; set "
                "negatives: none, or drop adapter"
            )
        if self.adapter_revision is not None and self.adapter is None:
            raise ValueError(f"row {self.name}: adapter_revision is set but adapter is not")
        return self


def _paper_rows() -> list[TableRow]:
    """The paper's ablation (docs/method.md sections 2 and 4)."""
    return [
        TableRow(name="zeroshot-plain", template="plain", negatives="none"),
        TableRow(name="zeroshot-chat", template="chat", negatives="none"),
        TableRow(name="zeroshot-hierarchical", template="hierarchical", negatives="none"),
        TableRow(name="inbatch-plain", template="plain", negatives="in_batch"),
        TableRow(name="inbatch-hierarchical", template="hierarchical", negatives="in_batch"),
        TableRow(name="saha-hierarchical", template="hierarchical", negatives="saha"),
    ]


class TableConfig(_Section):
    """The rows the run produces; each is its own MLflow run, all share cached stages."""

    rows: list[TableRow] = Field(default_factory=_paper_rows)

    @model_validator(mode="after")
    def _unique_names(self) -> TableConfig:
        names = [r.name for r in self.rows]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"table.rows: names must be unique ({', '.join(dup)} repeated)")
        if not names:
            raise ValueError("table.rows: at least one row")
        return self


class RetrieveConfig(_Section):
    """FAISS candidate retrieval: each query's top-R positives of its own subset."""

    top_r: int | None = Field(
        None,
        ge=1,
        description="Candidates per query, R. Default: 2*k*m from the mine section "
        "(docs/method.md section 3); a value set here wins.",
    )
    index: Literal["exact", "ivf", "hnsw"] = Field(
        "exact", description="exact (IndexFlatIP), or approximate for pools of millions."
    )
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="auto: faiss-gpu when it passes a probe, torch on CUDA, else CPU."
    )
    batch_queries: int = Field(8192, ge=1, description="Queries searched per batch.")
    recall_sample: int = Field(2000, ge=1, description="Queries checked against exact search.")
    ivf_nlist: int = Field(1024, ge=1)
    ivf_nprobe: int = Field(32, ge=1)
    hnsw_m: int = Field(32, ge=4)
    hnsw_ef: int = Field(256, ge=1)


MINE_RECIPES: dict[str, tuple[int, int]] = {"paper": (15, 3), "code": (7, 5)}


class MineConfig(_Section):
    """Hard negative mining into clusters (docs/method.md section 3)."""

    strategy: Strategy = "saha"
    recipe: Literal["paper", "code", "custom"] = Field(
        "paper",
        description="Defaults for k and m. paper: k=15, m=3; code: k=7, m=5 (the authors' "
        "code); custom: k and m as given. An explicit mine.k / mine.m wins over the default "
        "recipe (which then reads custom); with an explicit recipe they must agree.",
    )
    k: int = Field(15, ge=1, description="Negatives per cluster.")
    m: int = Field(3, ge=1, description="Over-retrieval factor: C = k*m owners are gathered.")
    seed: int = 0
    shuffle: bool = Field(False, description="Visit anchors in a seeded shuffle, not data order.")
    margin: float = Field(0.95, gt=0, description="topk_margin: drop scores above margin x own.")
    compare_strategies: bool = Field(
        True, description="Also mine with every other strategy, for the diagnostics only."
    )

    @model_validator(mode="after")
    def _recipe_gives_defaults(self) -> MineConfig:
        if self.recipe == "custom":
            return self
        recipe = dict(zip(("k", "m"), MINE_RECIPES[self.recipe], strict=True))
        given = [key for key in recipe if key in self.model_fields_set]
        if "recipe" in self.model_fields_set:
            for key in given:
                if getattr(self, key) != recipe[key]:
                    raise ValueError(
                        f"mine.recipe={self.recipe} means mine.{key}={recipe[key]}, but "
                        f"mine.{key}={getattr(self, key)} is set too: drop one of the two "
                        "(or set mine.recipe=custom)"
                    )
        # object.__setattr__: assignment would re-run this validator.
        for key, value in recipe.items():
            if key not in given:
                object.__setattr__(self, key, value)
        if given and "recipe" not in self.model_fields_set:
            object.__setattr__(self, "recipe", "custom")
        return self


class RegistryConfig(_Section):
    """MLflow model registry: each fine-tuned adapter (never the base weights) as a version."""

    enabled: bool = Field(True, description="Register each fine-tuned row's adapter.")
    model_name: str = Field(
        "gen2embed-{preset}-{row}",
        pattern=r"^[A-Za-z0-9_.{}-]+$",
        description="Registered model name; {preset} and {row} are filled in.",
    )
    champion_metric: Literal[
        "p1.overall", "p1.ind", "p1.ood", "p1.classification", "p1.vqa", "p1.retrieval",
        "p1.grounding",
    ] = Field(
        "p1.overall",
        description="The score a new version must match or beat (on the same evaluation "
        "inputs) to take the `champion` alias; P@1 as MMEB computes it.",
    )  # fmt: skip


class ScaleConfig(_Section):
    """Fan-out of the embed and evaluate stages over their shards, as mapped Prefect tasks on
    a Dask cluster (prefect-dask). Results equal the single-process path's."""

    engine: Literal["none", "dask"] = Field(
        "none", description="none: one process; dask: shard tasks on a Dask cluster."
    )
    address: str | None = Field(
        None, description="Scheduler of an existing cluster (tcp://host:8786); None: local."
    )
    workers: int | None = Field(
        None,
        ge=1,
        description="Workers of the local cluster (default: one per GPU for a CUDA cluster "
        "class, else 2); not with address.",
    )
    cluster_class: str | None = Field(
        None,
        description="Local cluster class, e.g. dask_cuda.LocalCUDACluster (a worker per GPU).",
    )
    tasks: int | None = Field(
        None, ge=1, description="Shard tasks per stage (default: the workers, or 4 remote)."
    )

    @model_validator(mode="after")
    def _one_cluster(self) -> ScaleConfig:
        if self.address is not None:
            for key in ("workers", "cluster_class"):
                if getattr(self, key) is not None:
                    raise ValueError(
                        f"scale.address and scale.{key} are both set: an existing cluster "
                        "has its own workers; keep one"
                    )
        return self


class PipelineConfig(_Section):
    """The whole pipeline: one section per stage that exists."""

    preset: str = "tiny"
    world: WorldConfig = Field(default_factory=WorldConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    retrieve: RetrieveConfig = Field(default_factory=RetrieveConfig)
    mine: MineConfig = Field(default_factory=MineConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    table: TableConfig = Field(default_factory=TableConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    scale: ScaleConfig = Field(default_factory=ScaleConfig)

    @model_validator(mode="after")
    def _sections_that_cannot_apply(self) -> PipelineConfig:
        """The world's settings do nothing unless the data is the world, the tiny
        generator's unless the backbone is tiny: setting them otherwise is an error."""
        checks = (
            ("world", self.ingest.source == "world", "ingest.source=world"),
            ("pretrain", self.model.backbone == "tiny", "model.backbone=tiny"),
        )
        for section, applies, needs in checks:
            if not applies and (given := _given(getattr(self, section))):
                raise ValueError(
                    f"{section}.{given[0]} does nothing unless {needs} (here "
                    f"{needs.split('=')[0]}="
                    f"{self.ingest.source if section == 'world' else self.model.backbone}): "
                    f"drop the {section} settings"
                )
        return self

    @model_validator(mode="after")
    def _a_batch_holds_a_cluster(self) -> PipelineConfig:
        """A batch takes clusters whole: one of mine.k + 1 pairs (an anchor and its k
        negatives, the largest mining makes) must fit one device's pair budget."""
        if self.finetune.pairs_per_batch < self.mine.k + 1:
            raise ValueError(
                f"finetune.pairs_per_batch={self.finetune.pairs_per_batch} cannot hold one "
                f"cluster of mine.k + 1 = {self.mine.k + 1} pairs: raise "
                "finetune.pairs_per_batch or lower mine.k"
            )
        return self

    @model_validator(mode="after")
    def _retrieval_depth_from_mining(self) -> PipelineConfig:
        if self.retrieve.top_r is None:
            object.__setattr__(self.retrieve, "top_r", 2 * self.mine.k * self.mine.m)
        return self

    def changed_from(self, base: PipelineConfig) -> dict[str, Any]:
        """The settings (`section.key`, JSON values) where this config differs from `base`,
        e.g. the preset it started from; the table's rows are left out (runs name them)."""
        mine, theirs = self.model_dump(mode="json"), base.model_dump(mode="json")
        return {
            f"{section}.{key}": value
            for section, fields in mine.items()
            if section != "table" and isinstance(fields, dict)
            for key, value in fields.items()
            if theirs.get(section, {}).get(key) != value
        }

    def with_rows(self, names: list[str] | None) -> PipelineConfig:
        """Only the named table rows (None: all), in the config's order.

        A copy; `names` may list a row twice. Raises ConfigError (a UserError) naming an
        unknown row, with the closest known name as a hint."""
        if not names:
            return self
        known = [r.name for r in self.table.rows]
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, known, 1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(
                    f"row {name!r} is not in table.rows{hint}; rows: {', '.join(known)}"
                )
        rows = [r for r in self.table.rows if r.name in names]
        return self.model_copy(update={"table": TableConfig(rows=rows)})

    def for_row(self, row: TableRow) -> PipelineConfig:
        """This config as the row runs it: the row's template, negatives and released
        adapter filled in.

        A copy: evaluate.template / adapter / adapter_revision and finetune.template from the
        row, mine.strategy the row's negatives (saha for `none`, whose row mines nothing).
        Not validated again."""
        updates = {
            "evaluate": self.evaluate.model_copy(
                update={
                    "template": row.template,
                    "adapter": row.adapter,
                    "adapter_revision": row.adapter_revision,
                }
            ),
            "finetune": self.finetune.model_copy(update={"template": row.template}),
            "mine": self.mine.model_copy(
                update={"strategy": row.negatives if row.negatives != "none" else "saha"}
            ),
        }
        return self.model_copy(update=updates)


PRESETS: dict[str, dict[str, Any]] = {
    # The miniature world and its tiny generator, sized for minutes on 2 CPU cores.
    "tiny": {
        # No DataLoader processes: the world's 64 px PNGs decode in no time, and on 2 cores two
        # worker processes slowed an evaluation down (x1.2) more than they overlapped.
        "embed": {"image_side": 64, "num_workers": 0},
        "evaluate": {"image_mode": "fixed", "image_side": 64},
        # Sized for the demo on 2 cores: 40 steps of 96 pairs (6 random clusters). GradCache
        # off: the tiny model's whole batch fits in memory, and GradCache would embed every
        # chunk twice (the demo's fine-tunes ran 1.5x longer with it; the same dropout masks
        # either way, so the same loss and gradients up to summation order).
        "finetune": {
            "steps": 40,
            "warmup": 4,
            "lr": 1e-3,
            "pairs_per_batch": 96,
            "chunk_size": 48,
            "grad_cache": False,
            "checkpoint_every": 10,
        },
    },
    # The paper's backbone on a local MMEB-train copy (set ingest.train_dir / train_images).
    "qwen2vl-2b": {
        "model": {"backbone": "Qwen/Qwen2-VL-2B-Instruct"},
        "ingest": {"source": "mmeb"},
        "embed": {"batch_size": 64, "num_workers": 8, "image_side": 448},
        "mine": {"compare_strategies": False},
    },
    # The paper's recipe (docs/method.md section 4) on the 7B backbone; the 2B one shares it.
    "qwen2vl-7b": {
        "model": {"backbone": "Qwen/Qwen2-VL-7B-Instruct"},
        "ingest": {"source": "mmeb"},
        "embed": {"batch_size": 32, "num_workers": 8, "image_side": 448},
        "finetune": {"gradient_checkpointing": True, "chunk_size": 16},
        "mine": {"compare_strategies": False},
    },
}


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted!r}: {'.'.join(keys[: i + 1])} is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`ingest.on_bad_rows=skip` -> ("ingest.on_bad_rows", "skip"); values are parsed as YAML
    so numbers, booleans, null and lists ([a, b]) work.

    Split at the first "="; an empty value is "". The key is not checked here. Raises
    ConfigError (a UserError) when there is no "=" or no key, or the value is not YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return key, value


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys valid where `loc` points (a section's fields, or the sections)."""
    model: type[BaseModel] = PipelineConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return []
        model = field.annotation
    return list(model.model_fields)


# Keys that existed once: a config that still sets one is told what replaced it.
RETIRED = {
    ("finetune", "clusters_per_batch"): "retired: a batch is now a pair budget, "
    "finetune.pairs_per_batch (clusters x cluster size; 16 x 16 = 256 in the paper)",
}


def _format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden" and tuple(map(str, err["loc"])) in RETIRED:
            lines.append(f"{where}: {RETIRED[tuple(map(str, err['loc']))]}")
        elif err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(err["loc"][-1]), _known_keys(err["loc"]), 1)
            hint = ".".join([*map(str, err["loc"][:-1]), *close])
            lines.append(f"{where}: unknown key" + (f" (did you mean {hint}?)" if close else ""))
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {json.dumps(got, default=str)})"
            lines.append(f"{where}: {err['msg']}{shown}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


# Settings each table row fills in (PipelineConfig.for_row): given in the section as well,
# they would be silently replaced, so a config that sets one is refused.
ROW_OWNED = {
    ("mine", "strategy"): "negatives",
    ("finetune", "template"): "template",
    ("evaluate", "template"): "template",
    ("evaluate", "adapter"): "adapter",
    ("evaluate", "adapter_revision"): "adapter_revision",
}


def _check_row_owned(tree: dict[str, Any]) -> None:
    for (section, key), row_key in ROW_OWNED.items():
        if isinstance(tree.get(section), dict) and key in tree[section]:
            raise ConfigError(
                f"{section}.{key} is set by each table row (table.rows[].{row_key}); "
                f"drop {section}.{key} and set the rows instead"
            )


def load_config(
    preset: str = "tiny",
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> PipelineConfig:
    """Preset, then the YAML file at `path`, then dotted overrides; validated once at the end.

    The YAML file holds a mapping of sections (PipelineConfig's fields); a section given as a
    mapping is merged key by key into the preset's, anything else replaces it. Raises
    ConfigError (a UserError; its `problems` list each validator's sentence) for an unknown
    preset, a missing, non-UTF-8 or non-YAML file, a file that is not a mapping, an override
    that does not parse or sets into a value that is not a section, a setting a table row
    owns (ROW_OWNED), and any validation error (unknown keys named with the closest known
    one, values out of range, settings that cannot apply)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
    tree: dict[str, Any] = json.loads(json.dumps(PRESETS[preset]))
    tree["preset"] = preset
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text ({exc.reason})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        for section, values in loaded.items():
            if isinstance(values, dict):
                for key, value in values.items():
                    _set_dotted(tree, f"{section}.{key}", value)
            else:
                tree[section] = values
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    _check_row_owned(tree)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        problems = [  # a validator's own sentence, from pydantic's structured error
            str(e["ctx"]["error"]) if "error" in e.get("ctx", {}) else e["msg"]
            for e in exc.errors()
        ]
        raise ConfigError(_format_validation_error(exc), problems) from None
