"""Recipe loading: defaults, overrides, and one-line errors naming the field."""
from pathlib import Path

import pytest

from spiral_cli.recipe import Recipe, RecipeError, apply_overrides, load_recipe, parse_override

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_paper_defaults():
    r = Recipe()
    ts = r.train_set
    assert (ts.num_search, ts.num_sets, ts.set_size, ts.num_aggregations) == (8, 4, 4, 4)
    assert r.generation.temperature == 1.0
    assert ts.beta == 0.0
    assert ts.scale_rewards is None and ts.length_target is None
    assert ts.effective_scale_rewards == "none"  # the paper does not divide by a std
    assert ts.max_generated_tokens is None and r.train_agg.max_generated_tokens is None


def test_scale_rewards_default_follows_the_objective():
    assert Recipe.model_validate({"train_set": {"objective": "grpo"}}).train_set.effective_scale_rewards == "group"
    r = Recipe.model_validate({"train_set": {"objective": "grpo", "scale_rewards": "none"}})
    assert r.train_set.effective_scale_rewards == "none"
    assert Recipe().train_agg.effective_scale_rewards == "none"
    # TRL also spells group/none as true/false
    r = Recipe.model_validate({"train_set": {"scale_rewards": True}, "train_agg": {"scale_rewards": False}})
    assert (r.train_set.scale_rewards, r.train_agg.scale_rewards) == ("group", "none")


@pytest.mark.parametrize("old, new", [(True, "group"), (False, "none")])
def test_scale_std_is_a_deprecated_alias(tmp_path, old, new):
    r = load_recipe(write(tmp_path, f"train_set: {{objective: grpo, scale_std: {str(old).lower()}}}\n"))
    assert r.train_set.scale_rewards == new and r.train_set.effective_scale_rewards == new
    assert r.train_set.deprecations == [f"scale_std is deprecated: use scale_rewards: {new} (TRL's name)"]
    assert "scale_std" not in r.snapshot()["train_set"]  # snapshots hold the canonical name only
    assert Recipe().train_set.deprecations == []


@pytest.mark.parametrize("trl, aggregation", [("grpo", "seq_mean"), ("bnpo", "token_mean"), ("dapo", "token_mean"),
                                              ("dr_grpo", "dr_grpo")])
def test_trl_loss_type_names_map_to_loss_aggregation(tmp_path, trl, aggregation):
    r = load_recipe(write(tmp_path, f"train_set: {{loss_type: {trl}}}\n"), [f"train_agg.loss_type={trl}"])
    for sec in (r.train_set, r.train_agg):
        assert (sec.loss_type, sec.loss_aggregation) == ("ppo_clip", aggregation)
    # the same value spelled twice is fine
    r = load_recipe(write(tmp_path, f"train_set: {{loss_type: {trl}, loss_aggregation: {aggregation}}}\n"))
    assert r.train_set.loss_aggregation == aggregation


@pytest.mark.parametrize("name", ["countdown.yaml", "countdown-rounds.yaml", "countdown-qwen.yaml", "math.yaml"])
def test_shipped_recipes_load(name):
    r = load_recipe(REPO / "recipes" / name)
    assert r.name == Path(name).stem


def test_rounds_recipe_is_the_measured_continuation_path():
    """countdown-rounds.yaml in one run is the default's SFT (steps view), then four 1,500-step
    rounds over the model's own candidates (docs/results.md, sessions 17-21): the phase boundaries,
    learning-rate cycles and pool shares of the measured run."""
    from spiral_cli.sft import Example, SftPhases

    rounds, default = load_recipe(REPO / "recipes/countdown-rounds.yaml"), load_recipe(REPO / "recipes/countdown.yaml")
    assert (rounds.task.agg_view, rounds.task.agg_answer, rounds.generation.agg_temperature) == ("steps", "select", 0.0)
    examples = [Example([i], [i], "search" if i % 8 < 5 else "aggregate") for i in range(128)]
    own = [Example([1000 + i], [i], "self_aggregate") for i in range(8)]
    phases = SftPhases.for_recipe(rounds.sft, examples, seed=0, build_self_agg=lambda r: own)
    d = default.sft
    assert phases.aggregate_from == int(d.steps * d.aggregate_after) == 3180
    assert phases.self_agg_starts == [d.steps, d.steps + 1500, d.steps + 3000, d.steps + 4500]
    assert rounds.sft.steps == d.steps + 6000
    assert [phases.lr_cycle(s) for s in (0, 5300, 6799, 8300, 11299)] == [
        (0, 5300), (5300, 1500), (5300, 1500), (8300, 1500), (9800, 1500)]
    pool = phases.at(5300)[1]
    assert len(pool) == 40 and pool[-8:] == own  # 6,000 own over 24,000 others: a fifth
    # it extends countdown.yaml: an edit there changes this recipe too, so the values the measured
    # runs of docs/results.md trained with are pinned here, not read from the default
    measured = {"num_search_examples": 80000, "num_aggregate_examples": 48000, "batch_size": 16, "lr": 1.0e-3,
                "warmup_steps": 100, "set_size": 4, "max_len": 512, "compile": True}
    assert {k: getattr(rounds.sft, k) for k in measured} == measured
    assert (rounds.model.name, rounds.model.autocast, rounds.task.number_rule, rounds.task.sft_max_nodes) == (
        "scratch:tiny", "auto", "at_most_once", [2, 4, 8, 16])
    assert (rounds.generation.temperature, rounds.generation.max_new_tokens, rounds.generation.agg_max_new_tokens) == (
        1.0, 256, 256)


def test_a_recipe_extends_another_section_by_section(tmp_path):
    """`extends: base.yaml` (relative to the file): the base's fields, then the file's over them,
    mappings merged key by key and lists replaced; the name is the file's own; a task section
    naming another task replaces the base's (its options are the other task's)."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text(
        "name: base\nseed: 3\ntask: {name: countdown, max_value: 25, sft_max_nodes: [2, 4]}\n"
        "sft: {steps: 100, lr: 1.0e-3, self_aggregate_after: [0.2, 0.4]}\ntrain_set: {steps: 7}\n")
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("extends: ../base.yaml\ntask: {sft_max_nodes: [8]}\nsft: {steps: 200, self_aggregate_after: [0.5]}\n")
    r = load_recipe(child)
    assert (r.name, r.seed, r.train_set.steps) == ("child", 3, 7)
    assert (r.task.max_value, r.task.sft_max_nodes) == (25, [8])
    assert (r.sft.steps, r.sft.lr, r.sft.self_aggregate_after) == (200, 1.0e-3, [0.5])
    assert load_recipe(child, ["sft.lr=5e-4"]).sft.lr == 5e-4  # overrides act on the merged recipe
    # a base that leaves the task's name out means the default task: the same task, merged
    (tmp_path / "plain.yaml").write_text("task: {max_value: 25}\n")
    (tmp_path / "same.yaml").write_text("extends: plain.yaml\ntask: {name: countdown, min_value: 2}\n")
    same = load_recipe(tmp_path / "same.yaml")
    assert (same.task.max_value, same.task.min_value) == (25, 2)
    # an error in an inherited field names the chain it came through
    (tmp_path / "bad.yaml").write_text("sft: {lr: -1}\n")
    (tmp_path / "uses_bad.yaml").write_text("extends: bad.yaml\nseed: 1\n")
    with pytest.raises(RecipeError, match=r"uses_bad.yaml \(extends bad.yaml\): sft.lr: Input should be greater than 0"):
        load_recipe(tmp_path / "uses_bad.yaml")
    grandchild = tmp_path / "g.yaml"
    grandchild.write_text("extends: sub/child.yaml\nname: g2\ntask: {name: math, data: x.jsonl}\n")
    g = load_recipe(grandchild)
    assert (g.name, g.task.name, g.sft.steps, g.seed) == ("g2", "math", 200, 3)
    with pytest.raises(RecipeError, match=r"g.yaml \(extends sub/child.yaml -> ../base.yaml\)"):
        load_recipe(grandchild, ["sft.lr=0"])
    assert "max_value" not in g.task.options()  # countdown's options did not leak into math


@pytest.mark.parametrize("text, expected", [
    ("extends: nope.yaml\n", "recipe file not found: "),
    ("extends: 3\n", "extends: expected the path of another recipe file, got 3"),
    ("extends: r.yaml\n", "extends: r.yaml extends this recipe again (a cycle)"),
    ("extends: loop.yaml\n", "extends this recipe again (a cycle)"),
    ("extends: sub\n", "is a directory, not a YAML file"),
])
def test_a_bad_extends_is_one_line(tmp_path, text, expected):
    (tmp_path / "sub").mkdir()
    (tmp_path / "loop.yaml").write_text("extends: r.yaml\n")
    with pytest.raises(RecipeError) as exc:
        load_recipe(write(tmp_path, text))
    assert expected in str(exc.value) and "\n" not in str(exc.value)


def test_name_defaults_to_file_stem(tmp_path):
    assert load_recipe(write(tmp_path, "seed: 3\n")).name == "r"


def test_overrides_parse_yaml_values():
    assert parse_override("train_set.lr=1e-5") == (["train_set", "lr"], 1e-5)
    assert parse_override("model.lora={r: 8}") == (["model", "lora"], {"r": 8})
    assert parse_override("infer.aggregate=majority") == (["infer", "aggregate"], "majority")
    data = apply_overrides({"train_set": {"lr": 1.0}}, ["train_set.lr=3e-4", "sft.steps=7"])
    assert data == {"train_set": {"lr": 3e-4}, "sft": {"steps": 7}}


def test_override_applies_and_validates(tmp_path):
    r = load_recipe(write(tmp_path, "train_set: {lr: 1.0e-4}\n"), ["train_set.lr=1e-5", "sft.steps=10"])
    assert r.train_set.lr == 1e-5 and r.sft.steps == 10
    assert r.generation.vllm.tensor_parallel_size == 1  # one engine per rank unless asked
    r = load_recipe(write(tmp_path, ""), ["generation.vllm.tensor_parallel_size=2"])
    assert r.generation.vllm.tensor_parallel_size == 2
    assert Recipe().sft.full_determinism == "auto"
    for value, parsed in (("true", True), ("false", False), ("auto", "auto")):
        assert load_recipe(write(tmp_path, ""), [f"sft.full_determinism={value}"]).sft.full_determinism == parsed


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        ("train_set: {lrr: 1}\n", [], "train_set.lrr: unknown field (allowed: "),
        ("train_set: {lr: abc}\n", [], "train_set.lr: Input should be a valid number"),
        ("train_set: {lr: -1}\n", [], "train_set.lr: Input should be greater than 0"),
        ("generation: {backend: tgi}\n", [], "generation.backend: Input should be 'hf', 'vllm' or 'vllm_server'"),
        ("", ["infer.aggregate=best"], "infer.aggregate: Input should be 'learned', 'majority' or 'none'"),
        ("bogus: 1\n", [], "bogus: unknown field"),
        ("extend: countdown.yaml\n", [], "extend: unknown field (allowed: compare, extends, "),
        ("task: {name: countdown, max_valu: 3}\n", [], "task.max_valu"),
        ("task: {name: no_such_task}\n", [], "no_such_task"),
        ("train_set: {set_size: 9}\n", [], "set_size"),
        ("- a\n- b\n", [], "a recipe must be a mapping"),
        ("a: [1\n", [], "not valid YAML"),
        ("", ["nolvalue"], "expected FIELD=VALUE"),
        ("train_set: {max_generated_tokens: 0}\n", [], "train_set.max_generated_tokens: Input should be greater than 0"),
        ("", ["train_agg.max_generated_tokens=-5"], "train_agg.max_generated_tokens: Input should be greater than 0"),
        ("train_set: {scale_rewards: std}\n", [], "train_set.scale_rewards: Input should be 'group', 'batch' or 'none'"),
        ("train_set: {loss_type: cispo}\n", [], "train_set: loss_type: 'cispo' is not supported; use is | ppo_clip, or TRL's"),
        ("train_set: {loss_type: grpo, loss_aggregation: token_mean}\n", [],
         "loss_type grpo means loss_aggregation seq_mean, not token_mean"),
        ("train_set: {scale_std: true, scale_rewards: batch}\n", [], "scale_std (true) contradicts scale_rewards ('batch')"),
        ("train_agg: {scale_std: true}\n", [], "train_agg.scale_std: unknown field"),
        ("", ["sft.full_determinism=sometimes"], "sft.full_determinism: Input should be 'auto', True or False"),
        ("", ["generation.vllm.tensor_parallel_size=0"],
         "generation.vllm.tensor_parallel_size: Input should be greater than or equal to 1"),
        ("", ["sft.restart_lr_each_round=true"],
         "r.yaml: sft.restart_lr_each_round acts on self-aggregation rounds: set sft.self_aggregate_examples too"),
        ("", ["sft.self_aggregate_others=search"],
         "r.yaml: sft.self_aggregate_others acts on self-aggregation rounds: set sft.self_aggregate_examples too"),
        ("", ["sft.self_aggregate_examples=10", "sft.self_aggregate_others=everything"],
         "sft.self_aggregate_others: Input should be 'all' or 'search'"),
    ],
)
def test_errors_are_one_line_and_name_the_field(tmp_path, text, overrides, expected):
    with pytest.raises(RecipeError) as exc:
        load_recipe(write(tmp_path, text), overrides)
    msg = str(exc.value)
    assert expected in msg
    assert "\n" not in msg and "Value error" not in msg  # pydantic's prefix stripped


def test_missing_file():
    with pytest.raises(RecipeError, match="recipe file not found: /nope.yaml"):
        load_recipe("/nope.yaml")


def test_hash_is_stable_and_sensitive():
    a, b = Recipe(), Recipe()
    assert a.hash() == b.hash()
    b.train_set.lr = 1e-3
    assert a.hash() != b.hash()


def test_rl_sections_share_one_base_and_their_defaults():
    """train_set and train_agg read their shared fields from one base class: same names, same
    defaults; only the stage-specific fields differ."""
    from spiral_cli.recipe import TrainAggSection, TrainSetSection, _RLSection

    shared = set(_RLSection.model_fields)
    assert {"steps", "lr", "beta", "loss_type", "scale_rewards", "max_grad_norm", "warmup_steps"} <= shared
    for name in shared:
        assert TrainSetSection.model_fields[name].default == TrainAggSection.model_fields[name].default, name
    assert set(TrainSetSection.model_fields) - shared >= {"objective", "dynamic_sampling", "updates_per_batch"}
    assert set(TrainAggSection.model_fields) - shared == {"search_model", "balance"}
    from pydantic import ValidationError

    with pytest.raises(ValidationError):  # the deprecated alias belongs to train_set only
        TrainAggSection(scale_std=True)
