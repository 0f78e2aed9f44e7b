"""Adapters trained elsewhere (docs/method.md section 7): a peft folder
as the paper authors' trainer writes it (transformers 4.x module paths, pickled
`adapter_model.bin`, a bare list of target suffixes) loads through torch's weights-only
unpickler, maps onto today's model and gives the vectors of the same adapter saved our way;
by folder or hub id, in the API and as a table row; bad folders are named errors, and no
pickle ever runs code."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from embedder.config import ConfigError, EmbedConfig, EvaluateConfig, FinetuneConfig, ModelConfig
from embedder.evaluate import evaluate_model
from embedder.inference import TRAINING_FILE, Embedder, TrainedWith
from embedder.model import identity
from embedder.model.backbone import ADAPTERS, load_backbone
from embedder.model.identity import ModelIdentityError
from embedder.model.shards import load_embeddings
from embedder.outputs import Adapter, Generator, Tables
from embedder.training import adapters
from tests.test_lora_targets import tiny_backbone

SETTINGS = EmbedConfig(num_workers=0, image_mode="fixed", image_side=64)
EVAL = EvaluateConfig(max_queries=3, image_mode="fixed", image_side=64)
# The authors' trainer's default `lora_target_modules` (their README's command sets none):
# names of Phi-3-V and Qwen2-VL together; on Qwen2-VL it hits q/k/v/o_proj and down_proj.
AUTHORS_TARGETS = [
    "qkv_proj",
    "o_proj",
    "gate_up_proj",
    "down_proj",
    "k_proj",
    "q_proj",
    "out_proj",
    "v_proj",
]
HIT_ON_QWEN2_VL = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


class Payload:
    """A pickle that runs code when unpickled by an unrestricted loader (here: makes a
    folder, which the tests look for)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def legacy_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Today's peft keys as transformers 4.x (before 4.52) named Qwen2-VL's modules."""
    out = {}
    for key, value in state.items():
        key = key.replace("base_model.model.model.language_model.", "base_model.model.model.")
        key = key.replace("base_model.model.model.visual.", "base_model.model.visual.")
        out[key] = value
    return out


def legacy_config(targets: list[str], r: int, base: str = "Qwen/Qwen2-VL-2B-Instruct") -> dict:
    """adapter_config.json as peft 0.11.1 (the authors' pin) writes it for their LoRA."""
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": False,
        "init_lora_weights": "gaussian",
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": 64,
        "lora_dropout": 0.1,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": targets,
        "task_type": None,
        "use_dora": True,
        "use_rslora": False,
    }


def write_authors_folder(
    state: dict[str, torch.Tensor], targets: list[str], folder: Path, marker: Path
) -> Path:
    """A folder as the authors' trainer leaves it: legacy keys pickled in adapter_model.bin,
    the legacy config, the base's config.json, and training_args.bin (a pickle of the
    trainer's arguments: here one that runs code, to show it is never opened)."""
    folder.mkdir(parents=True)
    torch.save(legacy_keys(state), folder / adapters.PICKLED_WEIGHTS)
    r = next(v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight"))
    (folder / adapters.CONFIG).write_text(json.dumps(legacy_config(targets, r), indent=2))
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    torch.save(Payload(marker), folder / "training_args.bin")
    return folder


def randomize(peft_model: torch.nn.Module, seed: int) -> None:
    """Trained-looking LoRA weights: B away from zero, DoRA magnitudes off the weight norm."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.rand_like(param))


@pytest.fixture(scope="module")
def folders(generator: Generator, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One trained-looking DoRA adapter on the tiny generator, saved our way (`ours`) and as
    the authors' trainer saves it (`authors`)."""
    root = tmp_path_factory.mktemp("released")
    backbone = load_backbone(generator.model_dir)
    cfg = FinetuneConfig(target_modules=HIT_ON_QWEN2_VL, dora=True, lora_r=8, lora_alpha=64)
    peft_model = adapters.attach(backbone, cfg)
    randomize(peft_model, 0)
    ours = root / "finetune" / "adapter"  # laid out as the finetune stage's output
    ours.parent.mkdir()
    adapters.save_adapter(peft_model, ours)
    trained = TrainedWith("hierarchical", EmbedConfig(), False)
    (ours / TRAINING_FILE).write_text(trained.to_json())
    state = load_file(str(ours / adapters.WEIGHTS))
    write_authors_folder(state, AUTHORS_TARGETS, root / "authors", root / "ran")
    return {"ours": ours, "authors": root / "authors", "marker": root / "ran"}


def _vectors(model: Embedder, image: Path) -> np.ndarray:
    texts = model.encode(["a red circle", "a blue star"], role="query", instruction="Find it")
    pictures = model.encode(images=[image], role="target")
    return np.concatenate([texts, pictures])


def test_the_authors_format_gives_the_vectors_of_the_same_adapter_saved_our_way(
    generator: Generator, folders: dict[str, Path], world_dir: Path
) -> None:
    image = sorted((world_dir / "eval_images").rglob("*.png"))[0]
    ours = Embedder.load(generator.model_dir, adapter=folders["ours"], settings=SETTINGS)
    theirs = Embedder.load(
        generator.model_dir, adapter=folders["authors"], template="hierarchical", settings=SETTINGS
    )
    base = Embedder.load(generator.model_dir, settings=SETTINGS)
    # The merged weights are the same tensors, so the vectors are too.
    mine, other = ours.backbone.model.state_dict(), theirs.backbone.model.state_dict()
    assert mine.keys() == other.keys()
    assert all(torch.equal(mine[k], other[k]) for k in mine)
    np.testing.assert_allclose(_vectors(theirs, image), _vectors(ours, image), atol=1e-6)
    assert not np.allclose(_vectors(base, image), _vectors(ours, image), atol=1e-3), "it applies"
    assert not folders["marker"].exists(), "training_args.bin (a pickle) was never opened"


def test_an_adapter_given_as_the_model_is_refused_not_loaded_transformers_way(
    folders: dict[str, Path],
) -> None:
    """transformers would load the base an adapter folder names and apply it its own way
    (no key check): the adapter belongs in `adapter=`."""
    from embedder.model.backbone import NotAModelError

    with pytest.raises(NotAModelError, match=r"is a peft adapter, not a model.*adapter="):
        Embedder.load(folders["authors"], template="hierarchical")


def test_legacy_vision_keys_map_too_and_bare_suffixes_keep_peft_s_meaning(tmp_path: Path) -> None:
    """A suffix that also names a vision layer (`qkv`: Qwen2-VL's vision attention) put LoRA
    there when the authors' trainer ran peft; the file holds those weights under `visual.`
    and they load onto `model.visual.`, as peft would apply them."""
    targets = ["q_proj", "qkv"]
    peft_model = get_peft_model(
        tiny_backbone("qwen2_vl").model,
        LoraConfig(r=8, lora_alpha=64, target_modules=targets, use_dora=True),
    )
    randomize(peft_model, 1)
    peft_model.save_pretrained(str(tmp_path / "today"))
    state = load_file(str(tmp_path / "today" / adapters.WEIGHTS))
    assert any(".visual." in k for k in state)
    old = write_authors_folder(state, targets, tmp_path / "authors", tmp_path / "ran")
    assert any(
        k.startswith("base_model.model.visual.") for k in torch.load(old / "adapter_model.bin")
    )
    a = adapters.load_adapter(tiny_backbone("qwen2_vl"), tmp_path / "today").model.state_dict()
    b = adapters.load_adapter(tiny_backbone("qwen2_vl"), old).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = tiny_backbone("qwen2_vl").model.state_dict()
    qkv = "model.visual.blocks.0.attn.qkv.weight"
    assert not torch.equal(b[qkv], plain[qkv]), "the vision LoRA was merged in"


def test_the_family_maps_older_transformers_paths_and_leaves_today_s() -> None:
    family = ADAPTERS["qwen2_vl"]
    assert family.current_name("model.layers.3.mlp.down_proj") == (
        "model.language_model.layers.3.mlp.down_proj"
    )
    assert family.current_name("visual.blocks.0.attn.qkv") == "model.visual.blocks.0.attn.qkv"
    for today in (
        "model.language_model.layers.0.self_attn.q_proj",
        "model.visual.merger",
        "lm_head",
    ):
        assert family.current_name(today) == today
    assert ADAPTERS["qwen2_5_vl"].current_name("model.norm") == "model.language_model.norm"
    assert ADAPTERS["qwen3_vl"].current_name("model.layers.0") == "model.layers.0", "born new"
    # A trainer's wrapper prefix (VLM2Vec's MMEBModel.encoder) goes too.
    wrapped = {"encoder.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": 1}
    assert list(adapters.current_keys(wrapped, family)) == [  # type: ignore[arg-type]
        "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
    ]


def _tiny_authors_folder(folder: Path, marker: Path) -> Path:
    peft_model = get_peft_model(
        tiny_backbone("qwen2_vl").model,
        LoraConfig(r=8, lora_alpha=64, target_modules=AUTHORS_TARGETS, use_dora=True),
    )
    randomize(peft_model, 2)
    peft_model.save_pretrained(str(folder.with_name("today")))
    state = load_file(str(folder.with_name("today") / adapters.WEIGHTS))
    return write_authors_folder(state, AUTHORS_TARGETS, folder, marker)


def _edit(folder: Path, change: Any) -> None:
    path = folder / adapters.PICKLED_WEIGHTS
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def _q_key(layer: int, part: str = "lora_A.weight") -> str:
    return f"base_model.model.model.layers.{layer}.self_attn.q_proj.{part}"


def _bad(case: str, folder: Path, marker: Path) -> None:
    """Spoil the authors' folder `folder` as `case` says."""
    bin_file = folder / adapters.PICKLED_WEIGHTS
    if case == "no weights":
        bin_file.unlink()
    elif case == "a pickle that runs code":
        torch.save({_q_key(0): torch.zeros(4, 32), "x": Payload(marker)}, bin_file)
    elif case == "not a torch file":
        bin_file.write_bytes(b"PK\x03\x04 not really a zip")
    elif case == "a list, not a dict":
        torch.save([torch.zeros(2)], bin_file)
    elif case == "a key for a layer the model lacks":
        _edit(folder, lambda s: s.update({_q_key(7): torch.zeros(4, 32)}))
    elif case == "a missing key":
        _edit(folder, lambda s: s.pop(_q_key(1, "lora_B.weight")))
    elif case == "a wrong shape":
        _edit(folder, lambda s: s.update({_q_key(0): torch.zeros(4, 33)}))
    elif case == "a full model, not an adapter":
        shutil.rmtree(folder)
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        save_file({"lm_head.weight": torch.zeros(2, 2)}, folder / "model.safetensors")
    else:
        raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no weights", r"no adapter weights \(adapter_model\.safetensors, or adapter_model\.bin\)"),
        ("a pickle that runs code", r"adapter_model\.bin: refused: .*GLOBAL posix\.mkdir"),
        ("not a torch file", r"adapter_model\.bin: not a readable torch weights file"),
        ("a list, not a dict", r"adapter_model\.bin: holds a list, not a dict of tensors"),
        (
            "a key for a layer the model lacks",
            r"unexpected keys base_model\.model\.model\.language_model\.layers\.7\.self_attn",
        ),
        ("a missing key", r"missing keys .*layers\.1\.self_attn\.q_proj\.lora_B\.weight"),
        ("a wrong shape", r"tensor shapes differ .*q_proj"),
        ("a full model, not an adapter", r"holds a full model .* load it as the base model"),
    ],
)
def test_a_bad_folder_is_a_named_error_and_no_pickle_runs(
    case: str, message: str, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    folder = _tiny_authors_folder(tmp_path / "authors", marker)
    adapters.load_adapter(tiny_backbone("qwen2_vl"), folder)  # intact, it loads
    _bad(case, folder, marker)
    with pytest.raises(adapters.AdapterError, match=message):
        adapters.load_adapter(tiny_backbone("qwen2_vl"), folder)
    assert not marker.exists(), "a pickle ran code"


def test_with_both_weight_files_the_safetensors_one_wins_and_the_pickle_is_never_read(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "ran"
    folder = _tiny_authors_folder(tmp_path / "authors", marker)
    expected = adapters.load_adapter(tiny_backbone("qwen2_vl"), folder).model.state_dict()
    state = torch.load(folder / adapters.PICKLED_WEIGHTS, weights_only=True)
    save_file(state, folder / adapters.WEIGHTS)
    torch.save(Payload(marker), folder / adapters.PICKLED_WEIGHTS)
    got = adapters.load_adapter(tiny_backbone("qwen2_vl"), folder).model.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    assert not marker.exists()


def _hub_cache(tmp_path: Path, repo: str, folder: Path, commit: str) -> Path:
    """A local hub cache holding `folder` as commit `commit` of `repo` (main points at it)."""
    cache = tmp_path / "hub"
    entry = cache / f"models--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    shutil.copytree(folder, entry / "snapshots" / commit)
    return cache


@pytest.fixture
def offline_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, folders: dict[str, Path]
) -> Iterator[tuple[str, str]]:
    """The authors' folder as commit eee... of a hub repo, in a local hub cache, offline."""
    import huggingface_hub.constants

    repo, commit = "Y-J-Ju/SaHa-tiny", "e" * 40
    cache = _hub_cache(tmp_path, repo, folders["authors"], commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    identity.resolve_hub_commit.cache_clear()
    yield repo, commit
    identity.resolve_hub_commit.cache_clear()


def test_by_hub_id_from_the_local_hub_cache(
    generator: Generator, folders: dict[str, Path], offline_hub: tuple[str, str], world_dir: Path
) -> None:
    repo, commit = offline_hub
    folder = adapters.adapter_folder(repo)
    assert folder.name == commit and (folder / adapters.PICKLED_WEIGHTS).is_file()
    assert adapters.adapter_folder(repo, commit) == folder, "a pinned commit, same files"
    image = sorted((world_dir / "eval_images").rglob("*.png"))[0]
    by_id = Embedder.load(
        generator.model_dir, adapter=repo, template="hierarchical", settings=SETTINGS
    )
    by_folder = Embedder.load(
        generator.model_dir, adapter=folders["authors"], template="hierarchical", settings=SETTINGS
    )
    np.testing.assert_array_equal(_vectors(by_id, image), _vectors(by_folder, image))
    with pytest.raises(
        ModelIdentityError, match=r"Y-J-Ju/nothing: no such folder, and as a hub id"
    ):
        Embedder.load(generator.model_dir, adapter="Y-J-Ju/nothing", template="hierarchical")
    with pytest.raises(adapters.AdapterError, match="drop adapter_revision"):
        adapters.adapter_folder(folders["authors"], "main")
    with pytest.raises(adapters.AdapterError, match="no such folder"):
        adapters.adapter_folder("./not/here")


def test_a_hub_id_that_cannot_be_downloaded_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub
    import huggingface_hub.constants

    def unreachable(*args: Any, **kwargs: Any) -> str:
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    pinned = "f" * 40  # a commit needs no look-up: the download itself fails
    with pytest.raises(
        adapters.AdapterError,
        match=r"org/adapter \(commit ffffffffffff\).*cannot be downloaded \(ConnectionError",
    ):
        adapters.adapter_folder("org/adapter", pinned)


# ------------------------------------------------------------------ as a table row


def _row(adapter: str, negatives: str = "none", **more: str) -> str:
    fields = ", ".join(f"{k}: {v}" for k, v in more.items())
    extra = f", {fields}" if fields else ""
    return (
        f"table.rows=[{{name: saha-released, template: hierarchical, negatives: {negatives}, "
        f"adapter: '{adapter}'{extra}}}]"
    )


def test_a_row_s_adapter_goes_with_no_mining_only() -> None:
    from embedder.config import load_config

    with pytest.raises(ConfigError, match=r"adapter and negatives=saha are both set"):
        load_config("tiny", overrides=[_row("Y-J-Ju/SaHa-Qwen2-VL-2B-Instruct", "saha")])
    with pytest.raises(ConfigError, match=r"adapter_revision is set but adapter is not"):
        load_config(
            "tiny",
            overrides=[
                "table.rows=[{name: a, template: plain, negatives: none, adapter_revision: v1}]"
            ],
        )
    with pytest.raises(ConfigError, match=r"evaluate\.adapter is set by each table row"):
        load_config("tiny", overrides=["evaluate.adapter=org/x"])
    with pytest.raises(ConfigError, match=r"template"):  # the template stays required
        load_config("tiny", overrides=["table.rows=[{name: a, negatives: none, adapter: org/x}]"])
    cfg = load_config("tiny", overrides=[_row("org/x", adapter_revision="v1")])
    row_cfg = cfg.for_row(cfg.table.rows[0])
    assert (row_cfg.evaluate.adapter, row_cfg.evaluate.adapter_revision) == ("org/x", "v1")


def test_a_row_with_an_adapter_evaluates_it_and_its_fingerprint_holds_its_content(
    generator: Generator,
    tables: Tables,
    folders: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from embedder.config import load_config
    from flows.pipeline import method
    from tasks.stage import running

    monkeypatch.setenv("GEN2EMBED_HOME", str(tmp_path / "work"))  # the digest cache
    adapter = tmp_path / "authors"
    shutil.copytree(folders["authors"], adapter)
    rows = [
        _row(str(adapter)).removesuffix("]"),
        "{name: zeroshot, template: hierarchical, negatives: none}]",
    ]
    cfg = load_config("tiny", overrides=[", ".join(rows)])

    def planned() -> list[tuple[str, Any]]:
        calls: list[tuple[str, Any]] = []

        def record(call: Any) -> Any:
            calls.append((call.stage.name, call))
            out = call.stage.output_type
            return out(folder=tmp_path / call.stage.name, stage=call.stage.name, fingerprint="x")

        with running(record):
            method(cfg)
        return calls

    calls = planned()
    # Nothing is mined or fine-tuned, nor the training pairs embedded for it.
    assert [name for name, _ in calls] == ["world", "ingest", "pretrain", "evaluate", "evaluate"]
    released, zero_shot = calls[3][1], calls[4][1]
    assert released.upstream["adapter"] is None, "no fine-tuned adapter: nothing to register"
    assert released.sections["evaluate"].adapter == str(adapter)
    assert set(released.inputs) == {"ingest", "pretrain", "adapter:content"}
    assert "adapter:content" not in zero_shot.inputs
    # The adapter's bytes are its identity: change them, and the evaluation is another.
    _edit(adapter, lambda s: s.update({k: v + 1 for k, v in s.items() if "lora_B" in k}))
    again = planned()[3][1]
    assert again.inputs["adapter:content"] != released.inputs["adapter:content"]
    assert again.fingerprint != released.fingerprint
    assert planned()[4][1].fingerprint == zero_shot.fingerprint

    # The stage function, given the row's evaluate section, evaluates that adapter: the
    # vectors of our own save of it, evaluated as the finetune stage's output.
    row_cfg = cfg.for_row(cfg.table.rows[0]).evaluate.model_copy(update={"max_queries": 3})
    row_cfg = row_cfg.model_copy(update={"image_mode": "fixed", "image_side": 64})
    shutil.rmtree(adapter)
    shutil.copytree(folders["authors"], adapter)
    report = evaluate_model(
        ModelConfig(), SETTINGS, row_cfg, tables, generator, None, tmp_path / "released"
    )
    ours = Adapter(folder=folders["ours"].parent, base="tiny", template="hierarchical")
    assert ours.adapter == folders["ours"]
    reference = evaluate_model(
        ModelConfig(),
        SETTINGS,
        row_cfg.model_copy(update={"adapter": None}),
        tables,
        generator,
        ours,
        tmp_path / "ours",
    )
    got = dict(zip(*load_embeddings(report.folder / "embeddings"), strict=True))
    want = dict(zip(*load_embeddings(reference.folder / "embeddings"), strict=True))
    assert got.keys() == want.keys()
    for key in got:
        np.testing.assert_allclose(got[key], want[key], atol=1e-6)
    summary = json.loads(report.report.read_text())
    assert summary["adapter"].startswith(f"{adapter}@")
    assert summary["aggregate"] == json.loads(reference.report.read_text())["aggregate"]


def test_gen2embed_encode_takes_an_adapter_hub_id_with_base(
    generator: Generator,
    offline_hub: tuple[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import json

    import pyarrow.parquet as pq

    from flows.cli import main

    repo, commit = offline_hub
    monkeypatch.setenv("GEN2EMBED_HOME", str(tmp_path / "w"))
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("a red circle", "a star")))
    out = tmp_path / "out.parquet"
    args = ["--input", str(source), "--output", str(out), "--image-mode", "fixed"]
    args += ["--image-side", "64", "--template", "hierarchical", "--workdir", str(tmp_path / "w")]
    base = ["--base", str(generator.model_dir)]
    assert main(["encode", repo, *base, "--adapter-revision", commit, *args]) == 0
    got = np.stack(pq.read_table(out)["embedding"].to_numpy(zero_copy_only=False))
    model = Embedder.load(
        generator.model_dir, adapter=repo, template="hierarchical", settings=SETTINGS
    )
    np.testing.assert_allclose(got, model.encode(["a red circle", "a star"]), atol=1e-6)
    # An adapter revision for a base model is a mistake, one line, exit 2.
    out.unlink()
    assert main(["encode", str(generator.model_dir), "--adapter-revision", commit, *args]) == 2
    assert not out.exists()
