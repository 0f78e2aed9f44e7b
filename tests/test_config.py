from pathlib import Path

import pytest

from embedder.config import ConfigError, IngestConfig, load_config


def test_preset_defaults() -> None:
    cfg = load_config("tiny")
    assert cfg.preset == "tiny"
    assert cfg.ingest.source == "world"
    assert cfg.ingest.on_bad_rows == "error"


def test_yaml_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("world:\n  seed: 3\n  train_pairs: 50\ningest:\n  on_bad_rows: skip\n")
    cfg = load_config("tiny", f, ["world.seed=7", "ingest.eval_subsets=[A, B]"])
    assert cfg.world.seed == 7  # the override wins over the file
    assert cfg.world.train_pairs == 50
    assert cfg.ingest.on_bad_rows == "skip"
    assert cfg.ingest.eval_subsets == ["A", "B"]


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("ingest.on_bad_row=skip", "ingest.on_bad_row: unknown key"),
        ("ingest.on_bad_rows=maybe", "ingest.on_bad_rows"),
        ("world.train_pairs=many", "world.train_pairs"),
        ("nosuch.key=1", "nosuch: unknown key"),
    ],
)
def test_bad_keys_and_types_are_named(override: str, named: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides=[override])
    assert named in str(err.value)


def test_malformed_override_and_unknown_preset(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        load_config("tiny", overrides=["ingest.on_bad_rows"])
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("huge")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("tiny", tmp_path / "nope.yaml")


def test_source_needs_its_paths() -> None:
    with pytest.raises(ValueError, match=r"ingest\.train_dir"):
        IngestConfig(source="mmeb")
    with pytest.raises(ConfigError, match=r"ingest\.jsonl_files"):
        load_config("tiny", overrides=["ingest.source=jsonl"])


def test_paper_preset_names_what_it_needs() -> None:
    with pytest.raises(ConfigError, match=r"ingest\.train_dir, ingest\.train_images"):
        load_config("qwen2vl-2b")
    cfg = load_config(
        "qwen2vl-2b", overrides=["ingest.train_dir=/data/mmeb", "ingest.train_images=/data/img"]
    )
    assert cfg.model.backbone == "Qwen/Qwen2-VL-2B-Instruct"
    assert cfg.embed.image_side == 448


def test_explicit_mining_settings_win_over_the_default_recipe() -> None:
    cfg = load_config("tiny", overrides=["mine.k=5"])
    assert (cfg.mine.k, cfg.mine.m, cfg.mine.recipe) == (5, 3, "custom")
    assert cfg.retrieve.top_r == 30, "R = 2km follows the k that was set"
    paper = load_config("tiny")
    assert (paper.mine.k, paper.mine.m, paper.retrieve.top_r) == (15, 3, 90)
    code = load_config("tiny", overrides=["mine.recipe=code"])
    assert (code.mine.k, code.mine.m, code.retrieve.top_r) == (7, 5, 70)
    explicit_r = load_config("tiny", overrides=["mine.k=5", "retrieve.top_r=12"])
    assert explicit_r.retrieve.top_r == 12
    agreeing = load_config("tiny", overrides=["mine.recipe=code", "mine.k=7"])
    assert (agreeing.mine.k, agreeing.mine.m) == (7, 5)


def test_a_recipe_and_a_contradicting_value_is_an_error_naming_both() -> None:
    with pytest.raises(ConfigError, match=r"mine\.recipe=code means mine\.k=7, but mine\.k=5"):
        load_config("tiny", overrides=["mine.recipe=code", "mine.k=5"])


def test_resolved_config_round_trips() -> None:
    cfg = load_config("tiny", overrides=["mine.k=5"])
    again = type(cfg).model_validate(cfg.model_dump(mode="json"))
    assert again == cfg


def test_an_unknown_key_suggests_the_closest_one() -> None:
    with pytest.raises(
        ConfigError, match=r"ingest\.on_bad_row: unknown key \(did you mean ingest\.on_bad_rows\?\)"
    ):
        load_config("tiny", overrides=["ingest.on_bad_row=skip"])
    with pytest.raises(ConfigError, match=r"minee: unknown key \(did you mean mine\?\)"):
        load_config("tiny", overrides=["minee.k=3"])


def test_unreadable_config_files_are_config_errors(tmp_path: Path) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("ingest:\n  source: [mmeb\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml is not valid YAML"):
        load_config("tiny", bad_yaml)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("world:\n  seed: 1 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin\.yaml is not UTF-8 text"):
        load_config("tiny", latin)


def test_table_rows_own_template_and_negatives() -> None:
    cfg = load_config("tiny")
    assert [r.name for r in cfg.table.rows] == [
        "zeroshot-plain",
        "zeroshot-chat",
        "zeroshot-hierarchical",
        "inbatch-plain",
        "inbatch-hierarchical",
        "saha-hierarchical",
    ]
    row = cfg.table.rows[3]
    as_row = cfg.for_row(row)
    assert (as_row.mine.strategy, as_row.finetune.template, as_row.evaluate.template) == (
        "in_batch",
        "plain",
        "plain",
    )
    # Set in the section too, it would be silently replaced: an error naming both keys.
    with pytest.raises(ConfigError, match=r"mine\.strategy is set by each table row"):
        load_config("tiny", overrides=["mine.strategy=topk"])
    with pytest.raises(ConfigError, match=r"evaluate\.template .*table\.rows\[\]\.template"):
        load_config("tiny", overrides=["evaluate.template=plain"])


def test_rows_are_selected_by_name_with_a_suggestion_for_typos() -> None:
    cfg = load_config("tiny").with_rows(["saha-hierarchical", "zeroshot-plain"])
    assert [r.name for r in cfg.table.rows] == ["zeroshot-plain", "saha-hierarchical"]
    with pytest.raises(ConfigError, match="did you mean saha-hierarchical"):
        load_config("tiny").with_rows(["saha-hierarchicl"])
    custom = load_config(
        "tiny", overrides=["table.rows=[{name: topk, template: hierarchical, negatives: topk}]"]
    )
    assert custom.for_row(custom.table.rows[0]).mine.strategy == "topk"
    with pytest.raises(ConfigError, match="names must be unique"):
        load_config(
            "tiny",
            overrides=[
                "table.rows=[{name: a, template: plain, negatives: none},"
                " {name: a, template: chat, negatives: none}]"
            ],
        )


# Every ingest setting against every source (issue 15, item 4): it applies, or setting it
# is an error naming the key and the source. (source, setting) -> applies?
_PATHS = {
    "world": [],
    "mmeb": ["ingest.train_dir=/d/train", "ingest.train_images=/d/img"],
    "jsonl": ["ingest.jsonl_files=[/d/A.jsonl]", "ingest.jsonl_images=/d/img"],
    "hub": ["ingest.train_images=/d/img"],
}
_SETTINGS = {
    "train_dir": ("/d/train", {"mmeb"}),
    "train_images": ("/d/img", {"mmeb", "hub"}),
    "jsonl_files": ("[/d/A.jsonl]", {"jsonl"}),
    "jsonl_images": ("/d/img", {"jsonl"}),
    "hub_train": ("org/train", {"hub"}),
    "hub_eval": ("org/eval", {"hub"}),
    "train_splits": ("[original, diverse_instruction]", {"world", "mmeb", "hub"}),
    "train_subsets": ("[A]", {"world", "mmeb", "jsonl", "hub"}),
    "eval_subsets": ("[A]", {"world", "hub"}),  # mmeb/jsonl: only with an eval_dir
    "eval_images": ("/d/eimg", {"hub"}),  # mmeb/jsonl: only with an eval_dir
    "on_bad_rows": ("skip", {"world", "mmeb", "jsonl", "hub"}),
    "batch_rows": ("64", {"world", "mmeb", "jsonl", "hub"}),
    "image_workers": ("2", {"world", "mmeb", "jsonl", "hub"}),
}


@pytest.mark.parametrize("source", list(_PATHS))
@pytest.mark.parametrize("key", list(_SETTINGS))
def test_every_ingest_setting_applies_to_its_source_or_is_an_error(source: str, key: str) -> None:
    value, applies = _SETTINGS[key]
    base = [f"ingest.source={source}", *_PATHS[source]]
    overrides = [o for o in base if not o.startswith(f"ingest.{key}=")]
    overrides.append(f"ingest.{key}={value}")
    if source in applies:
        load_config("tiny", overrides=overrides)
        return
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides=overrides)
    assert f"ingest.{key}" in str(err.value) and source in str(err.value)


@pytest.mark.parametrize("source", ["mmeb", "jsonl", "hub"])
def test_eval_settings_apply_with_an_eval_dir(source: str) -> None:
    eval_dir = ["ingest.eval_dir=/d/eval", "ingest.eval_images=/d/eimg", "ingest.eval_subsets=[A]"]
    load_config("tiny", overrides=[f"ingest.source={source}", *_PATHS[source], *eval_dir])
    if source == "hub":
        with pytest.raises(ConfigError, match=r"ingest\.hub_eval and ingest\.eval_dir"):
            load_config(
                "tiny",
                overrides=[
                    f"ingest.source={source}",
                    *_PATHS[source],
                    *eval_dir,
                    "ingest.hub_eval=o/e",
                ],
            )


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["ingest.source=jsonl", *_PATHS["jsonl"], "world.seed=7"], "world.seed"),
        (["ingest.source=mmeb", *_PATHS["mmeb"], "world.eval_queries=999"], "world.eval_queries"),
        (["model.backbone=Qwen/Qwen2-VL-2B-Instruct", "pretrain.steps=5"], "pretrain.steps"),
    ],
)
def test_world_and_pretrain_settings_that_cannot_apply_are_errors(
    overrides: list[str], named: str
) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config("tiny", overrides=overrides)
    load_config("tiny", overrides=[o for o in overrides if not o.startswith(named)])


@pytest.mark.parametrize(
    ("candidates", "hard", "ok"),
    [(4, 5, False), (6, 5, False), (7, 5, True), (4, 2, True), (4, 3, False), (4, 0, True)],
)
def test_eval_candidates_leave_room_for_the_hard_negatives(
    tmp_path: Path, candidates: int, hard: int, ok: bool
) -> None:
    overrides = [f"world.eval_candidates={candidates}", f"world.same_category_negatives={hard}"]
    if not ok:
        with pytest.raises(ConfigError, match=r"eval_candidates.*same_category_negatives"):
            load_config("tiny", overrides=overrides)
        return
    cfg = load_config("tiny", overrides=overrides)
    from embedder.world import build_world

    small = cfg.world.model_copy(update={"train_pairs": 16, "eval_queries": 4, "image_size": 32})
    world = build_world(small, tmp_path)  # every subset builds at the boundary
    assert world.rows


@pytest.mark.parametrize(
    ("overrides", "ok"),
    [
        (["finetune.pairs_per_batch=16"], True),  # mine.k=15: clusters of up to 16 pairs
        (["finetune.pairs_per_batch=15"], False),
        (["finetune.pairs_per_batch=6", "mine.k=5"], True),
        (["finetune.pairs_per_batch=5", "mine.k=5"], False),
        (["finetune.pairs_per_batch=7", "mine.recipe=code"], False),  # k=7 by the recipe
    ],
)
def test_a_batch_must_hold_the_largest_cluster(overrides: list[str], ok: bool) -> None:
    if ok:
        load_config("tiny", overrides=overrides)
        return
    with pytest.raises(ConfigError, match=r"finetune\.pairs_per_batch=\d+ cannot hold.*mine\.k"):
        load_config("tiny", overrides=overrides)


def test_a_retired_key_says_what_replaced_it(tmp_path: Path) -> None:
    f = tmp_path / "old.yaml"
    f.write_text("finetune:\n  clusters_per_batch: 16\n")
    with pytest.raises(ConfigError, match=r"per_batch: retired.*finetune\.pairs_per_batch"):
        load_config("tiny", f)
