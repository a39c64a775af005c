"""`spiral compare`: checks before any training, arms reused and resumed, a report rebuilt from
cached arms and sweep cells, its numbers against hand computation, and one real tiny run."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from fakes import EchoTask, completion
from rich.console import Console
from toy_task import toy_recipe

from spiral_cli import compare as cmp
from spiral_cli import compare_report, sweep_cells
from spiral_cli import sweep as sweep_mod
from spiral_cli.jsonl import InputError
from spiral_cli.recipe import Recipe, RecipeError, load_recipe
from spiral_cli.registry import Registry, RegistryError

TESTS = Path(__file__).resolve().parent

# one step generates at most 2 x max(4 x 8 + 2 x 2 x 8, 4 x 16) = 128 tokens
STEP_BOUND = 128
BUDGET = 300


def make_recipe(**sections) -> Recipe:
    data = {
        "name": "toy",
        "train_set": {"prompts_per_step": 2, "num_search": 4, "num_sets": 2, "set_size": 2, "num_aggregations": 2,
                      "num_generations": 4, "steps": 5},
        "generation": {"max_new_tokens": 8, "agg_max_new_tokens": 8, "batch_size": 4},
        "infer": {"population": 2, "agg_set_size": 2},
        "sweep": {"parallel": [1, 2, 4], "seq_budget": [8], "agg_rounds": [0, 1], "max_problems": 3},
        "compare": {"parallel": [1, 2, 4], "agg_rounds": [0, 1]},  # seq_budget: the sweep's largest
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return Recipe.model_validate(data)


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def register_sft(home: Path, name: str = "toy-sft", step: int = 7) -> str:
    path = home / "checkpoints" / name / f"step-{step}"
    path.mkdir(parents=True)
    Registry(home).register(name, "sft", path, step=step, recipe=make_recipe().snapshot())
    return f"{name}@{step}"


class FakeTrainer:
    """Stands in for rl.trainer.run_train_set: per step `per_step[objective] + seed` generated
    tokens (twice that in total), 0.5 s per step, an eval point every 2 steps and at the last; it
    resumes from the latest registered step and writes what the trainer writes (registry entry with
    the recipe snapshot, metrics.jsonl, eval.jsonl). `interrupt_after`: raise after that many steps."""

    def __init__(self, per_step=None, interrupt_after=None):
        self.per_step = per_step or {"spiral": 50, "grpo": 30}
        self.interrupt_after = interrupt_after
        self.calls: list[tuple[str, int]] = []  # (name, step it started from)

    def __call__(self, recipe, *, home, name, model, console):
        registry = Registry(home)
        sft = registry.resolve(model).entry
        ts = recipe.train_set
        latest = registry.latest(name)
        step = latest.step if latest else 0
        gen = latest.metrics["generated_tokens"] if latest else 0
        self.calls.append((name, step))
        run = home / "runs" / name
        run.mkdir(parents=True, exist_ok=True)
        rows = cmp._metric_rows(home, name, step)
        evals = run / "eval.jsonl"
        history = ([json.loads(l) for l in evals.read_text().splitlines()] if latest and evals.is_file()
                   else [{"step": 0, "generated_tokens": 0, "T8/pass@1": 0.3, "T8/learned_agg@4": 0.2}])
        per = self.per_step[ts.objective] + recipe.seed
        done = 0
        while gen < ts.max_generated_tokens and step < ts.steps:
            step += 1
            gen += per
            done += 1
            rows.append({"step": step, "generated_tokens": gen, "total_tokens": 2 * gen, "seconds": {"total": 0.5}})
            last = gen >= ts.max_generated_tokens
            if step % 2 == 0 or last:
                history.append({"step": step, "generated_tokens": gen, "T8/pass@1": 0.3 + 0.01 * step,
                                "T8/learned_agg@4": 0.2 + (0.03 if ts.objective == "spiral" else 0.01) * step})
            if last or (self.interrupt_after is not None and done >= self.interrupt_after):
                path = home / "checkpoints" / name / f"step-{step}"
                path.mkdir(parents=True, exist_ok=True)
                metrics = {"generated_tokens": gen, "total_tokens": 2 * gen, "max_generated_tokens": ts.max_generated_tokens}
                if last:
                    metrics["stopped_on"] = "token_budget"
                registry.register(name, "grpo" if ts.objective == "grpo" else "set", path, step=step,
                                  parent=f"{sft.name}@{sft.step}", recipe=recipe.snapshot(), metrics=metrics)
                (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
                evals.write_text("".join(json.dumps(h) + "\n" for h in history))
                if not last:
                    raise KeyboardInterrupt("simulated interruption")
        return {"name": name, "steps": step, "generated_tokens": gen, "total_tokens": 2 * gen}


def refuse_training(*a, **k):
    raise AssertionError("training was called")


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(compare_report, "N_BOOT", 200)
    monkeypatch.setattr(sweep_cells, "EFFICIENCY_N_BOOT", 200)


# ---------------------------------------------------------------- checks before any training


@pytest.mark.parametrize("kwargs, sft, error, message", [
    ({"budget_tokens": STEP_BOUND - 1}, True, RecipeError, "less than one training step can generate"),
    ({}, True, RecipeError, "no training budget: give --budget-tokens"),
    ({"budget_tokens": BUDGET}, False, RegistryError, "--sft-model toy-sft: no checkpoint named 'toy-sft'"),
    ({"budget_tokens": BUDGET, "sft_model": "scratch:nano"}, True, RegistryError, "not a registry entry"),
    ({"budget_tokens": BUDGET, "out": "FILE"}, True, InputError, "exists and is not a directory"),
    ({"budget_tokens": BUDGET, "seeds": 0}, True, InputError, "--seeds: must be >= 1"),
    ({"budget_tokens": BUDGET, "problems": 0}, True, InputError, "--problems: must be >= 1"),
    ({"budget_tokens": BUDGET}, True, RecipeError, "sweep.parallel: values must be >= 1"),  # from compare.parallel
    ({"budget_tokens": BUDGET, "sft_model": "toy-sft"}, True, RegistryError, "invalid arm name 'toy+x-cmp-spiral-s0'"),
])
def test_bad_input_is_one_line_before_any_training(tmp_path, monkeypatch, kwargs, sft, error, message):
    home = tmp_path / "home"
    home.mkdir()
    if sft:
        register_sft(home)
    if kwargs.get("out") == "FILE":
        kwargs["out"] = tmp_path / "a-file"
        kwargs["out"].write_text("x")
    recipe = make_recipe(compare={"parallel": [0, 2]}) if "sweep.parallel" in message else make_recipe()
    if "arm name" in message:
        recipe = make_recipe(name="toy+x")  # a valid recipe name, but not a valid registry name
    monkeypatch.setattr(cmp, "_train_arm", refuse_training)
    monkeypatch.setattr(sweep_mod, "run_sweep", refuse_training)
    with pytest.raises(error) as info:
        cmp.run_compare(recipe, home=home, console=quiet(), **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (home / "compare").exists()  # nothing written either


def test_step_bound_and_steps_cap():
    recipe = make_recipe()
    bound, formula = cmp.step_bound(recipe)
    assert bound == STEP_BOUND
    assert "prompts_per_step 2" in formula and "= 64" in formula and formula.endswith("= 128")
    # GRPO's traces of 2T can be the larger side
    assert cmp.step_bound(make_recipe(train_set={"num_generations": 12}))[0] == 2 * 12 * 16
    # the cap leaves the budget to end the run unless steps average < 1/20 of the bound
    assert cmp.steps_cap(recipe, BUDGET, bound) == 20 * 3
    assert cmp.steps_cap(make_recipe(train_set={"steps": 500}), BUDGET, bound) == 500


def test_arms_are_evaluated_at_equal_token_counts(tmp_path):
    home = tmp_path / "home"
    register_sft(home)
    plan = cmp.plan_compare(make_recipe(), home=home, seeds=1, budget_tokens=BUDGET)
    assert {a.recipe.train_set.eval_every_tokens for a in plan.arms} == {BUDGET // cmp.EVAL_POINTS}
    quick = cmp.plan_compare(make_recipe(), home=home, quick=True)
    assert {a.recipe.train_set.eval_every_tokens for a in quick.arms} == {quick.budget // cmp.QUICK_EVAL_POINTS}
    mine = cmp.plan_compare(make_recipe(train_set={"eval_every_tokens": 77}), home=home, seeds=1, budget_tokens=BUDGET)
    assert {a.recipe.train_set.eval_every_tokens for a in mine.arms} == {77}  # the recipe's own cadence wins


def test_mismatched_recipe_of_an_existing_arm_is_refused(tmp_path, monkeypatch, fast):
    home = tmp_path / "home"
    sft = register_sft(home)
    trainer = FakeTrainer()
    monkeypatch.setattr(cmp, "_train_arm", trainer)
    # an arm trained earlier with another learning rate and KL coefficient
    other = make_recipe(train_set={"lr": 1e-3, "beta": 0.1, "objective": "grpo"}, seed=1)
    path = home / "checkpoints" / "toy-cmp-grpo-s1" / "step-3"
    path.mkdir(parents=True)
    Registry(home).register("toy-cmp-grpo-s1", "grpo", path, step=3, parent=sft, recipe=other.snapshot(),
                            metrics={"generated_tokens": 90})
    with pytest.raises(RecipeError) as info:
        cmp.run_compare(make_recipe(), home=home, seeds=2, budget_tokens=BUDGET, console=quiet())
    msg = str(info.value)
    assert msg.startswith("mismatched recipes between arms: toy-cmp-grpo-s1@3 was trained with ")
    assert "train_set.beta=0.1 (this compare: 0.0)" in msg and "train_set.lr=0.001 (this compare: 2e-05)" in msg
    assert "spiral registry rm toy-cmp-grpo-s1 --delete-files" in msg and "\n" not in msg
    assert trainer.calls == []
    # another start: the parent differs
    Registry(home).rm("toy-cmp-grpo-s1")
    good = cmp._with(make_recipe(), {"seed": 1, "train_set.objective": "grpo"})
    Registry(home).register("toy-cmp-grpo-s1", "grpo", path, step=3, parent="toy-sft@6", recipe=good.snapshot())
    with pytest.raises(RecipeError, match=r"parent=toy-sft@6 \(this compare: toy-sft@7\)"):
        cmp.run_compare(make_recipe(), home=home, seeds=2, budget_tokens=BUDGET, console=quiet())
    assert trainer.calls == []


def test_recipe_differences_ignore_budget_cap_and_untrained_sections():
    a = make_recipe().snapshot()
    b = cmp._with(make_recipe(), {"train_set.steps": 99, "train_set.max_generated_tokens": 1234,
                                  "sweep.parallel": [1, 8], "sft.lr": 0.5, "model.device": "cpu",
                                  "generation.batch_size": 8, "train_set.eval_every": 3,
                                  "train_set.eval_every_tokens": 50, "train_set.eval_problems": 7}).snapshot()
    assert cmp.recipe_differences(a, b) == []  # evaluating differently trains the same arm
    c = cmp._with(make_recipe(), {"seed": 3, "generation.temperature": 0.7}).snapshot()
    assert cmp.recipe_differences(a, c) == ["generation.temperature=1.0 (this compare: 0.7)",
                                            "seed=0 (this compare: 3)"]


def test_a_run_state_without_registry_entry_is_refused(tmp_path, monkeypatch):
    home = tmp_path / "home"
    register_sft(home)
    state = home / "runs" / "toy-cmp-spiral-s0" / "state"
    state.mkdir(parents=True)
    (state / "trainer_state.pt").write_bytes(b"x")
    monkeypatch.setattr(cmp, "_train_arm", refuse_training)
    with pytest.raises(RecipeError, match="a run state exists .* but the registry has no entry"):
        cmp.run_compare(make_recipe(), home=home, seeds=1, budget_tokens=BUDGET, console=quiet())


def test_an_arm_trained_past_the_budget(tmp_path):
    """A finished arm is reused under a smaller budget only if that budget ends it at the same step."""
    home = tmp_path / "home"
    sft = register_sft(home)
    arm = cmp._with(make_recipe(), {"seed": 0, "train_set.objective": "spiral"})
    path = home / "checkpoints" / "toy-cmp-spiral-s0" / "step-4"
    path.mkdir(parents=True)
    Registry(home).register("toy-cmp-spiral-s0", "set", path, step=4, parent=sft, recipe=arm.snapshot(),
                            metrics={"generated_tokens": 420, "max_generated_tokens": 400, "stopped_on": "token_budget"})
    run = home / "runs" / "toy-cmp-spiral-s0"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "generated_tokens": 105 * s}) + "\n" for s in (1, 2, 3, 4)))
    plan = cmp.plan_compare(make_recipe(), home=home, seeds=1, budget_tokens=400)
    assert plan.arms[0].status == "finished" and plan.arms[1].status == "new"
    # 320 tokens after step 3 < 410 <= 420: a budget of 410 ends the run at the same step
    assert cmp.plan_compare(make_recipe(), home=home, seeds=1, budget_tokens=410).arms[0].status == "finished"
    # a budget of 300 would have ended it at step 3
    with pytest.raises(RecipeError, match="past this compare's budget of 300: use --budget-tokens 400"):
        cmp.plan_compare(make_recipe(), home=home, seeds=1, budget_tokens=300)
    # a larger budget resumes it
    assert cmp.plan_compare(make_recipe(), home=home, seeds=1, budget_tokens=600).arms[0].status == "resume"


def test_quick_preset_and_what_flags_override(tmp_path):
    home = tmp_path / "home"
    register_sft(home)
    recipe = make_recipe(sweep={"seq_budget": [4, 8]}, compare={"parallel": [1, 2, 4, 8], "seq_budget": [4, 8],
                                                              "agg_rounds": [0, 1, 2]})
    plan = cmp.plan_compare(recipe, home=home, quick=True)
    assert (plan.seeds, plan.problems, plan.budget) == (1, 100, 8 * STEP_BOUND)
    sw = plan.recipe.sweep
    assert (sw.parallel, sw.seq_budget, sw.agg_rounds, sw.max_problems) == ([1, 4, 8], [8], [0, 1], 100)
    assert plan.quick_changes == [
        "seeds 3 -> 1", "problems 500 -> 100", "sweep.parallel [1, 2, 4, 8] -> [1, 4, 8]",
        "sweep.seq_budget [4, 8] -> [8]", "sweep.agg_rounds [0, 1, 2] -> [0, 1]",
        f"budget -> {8 * STEP_BOUND:,} generated tokens per arm (8 x the one-step bound)"]
    plan = cmp.plan_compare(recipe, home=home, quick=True, seeds=2, problems=50, budget_tokens=BUDGET)
    assert (plan.seeds, plan.problems, plan.budget) == (2, 50, BUDGET)
    assert not any(c.startswith(("seeds", "problems", "budget")) for c in plan.quick_changes)
    # without --quick: the recipe's budget and the full defaults
    plan = cmp.plan_compare(make_recipe(train_set={"max_generated_tokens": 1000}), home=home)
    assert (plan.seeds, plan.problems, plan.budget, plan.quick_changes) == (3, 500, 1000, [])
    # the grid is the compare section's (its T defaulting to the sweep's largest), not the sweep's
    own = cmp.plan_compare(make_recipe(train_set={"max_generated_tokens": 1000}, sweep={"seq_budget": [4, 8]},
                                       compare={"seeds": 2, "problems": 9, "parallel": [8, 2]}), home=home)
    sw = own.recipe.sweep
    assert (own.seeds, own.problems, sw.parallel, sw.seq_budget, sw.agg_rounds) == (2, 9, [2, 8], [8], [0, 1])
    assert [a.name for a in plan.arms][:2] == ["toy-cmp-spiral-s0", "toy-cmp-grpo-s0"]
    assert [a.recipe.seed for a in plan.arms] == [0, 0, 1, 1, 2, 2]
    assert plan.out.parent == home / "compare" and plan.out.name.startswith("toy-")


# ---------------------------------------------------------------- reuse and rebuild, real sweep on a fake model

PROBLEMS = [{"id": "p1", "target": "7"}, {"id": "p2", "target": "7"}, {"id": "p3", "target": "7"}]
RIGHT = {"sft": 1, "spiral": 3, "grpo": 2}  # right traces among the first 4 of every pool


class AnswerGenerator:
    def __init__(self, kind, log):
        self.kind, self.log = kind, log

    def generate(self, prompts, *, n=1, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, stop=None, seed=None):
        self.log.append(self.kind)
        out = []
        for prompt in prompts:
            if prompt.startswith("S "):
                pid = int(prompt.split()[1][1:])
                right = min(4, RIGHT[self.kind] + (pid == 3))
                texts = ["w" * (j + 1) + f"\nanswer: {'7' if j < right else j}" for j in range(n)]
            else:
                answers = [l.split("answer:")[-1].strip() for l in prompt.splitlines()[1:]]
                texts = [f"ok\nanswer: {max(answers, key=answers.count)}"] * n
            out.append([completion(t, prompt) for t in texts])
        return out

    def update_weights(self, model):
        pass


def _kind(ref: str) -> str:
    return "spiral" if "-cmp-spiral-" in ref else "grpo" if "-cmp-grpo-" in ref else "sft"


@pytest.fixture
def fake_models(monkeypatch):
    log: list[str] = []
    monkeypatch.setattr(sweep_mod, "_load_task", lambda recipe: EchoTask(PROBLEMS))
    monkeypatch.setattr(sweep_mod, "_open_generator", lambda recipe, ref, registry: AnswerGenerator(_kind(ref.ref), log))
    return log


def test_arms_reused_and_report_rebuilt_without_training_or_generating(tmp_path, monkeypatch, fast, fake_models):
    home = tmp_path / "home"
    register_sft(home)
    trainer = FakeTrainer()
    monkeypatch.setattr(cmp, "_train_arm", trainer)
    console = quiet()
    out = tmp_path / "report"
    first = cmp.run_compare(make_recipe(), home=home, seeds=2, budget_tokens=BUDGET, problems=3, out=out,
                            console=console, recipe_path="toy.yaml", overrides=["train_set.lr=2e-5"])
    names = ["toy-cmp-spiral-s0", "toy-cmp-grpo-s0", "toy-cmp-spiral-s1", "toy-cmp-grpo-s1"]
    assert [c[0] for c in trainer.calls] == names and first["trained"] == names and first["reused"] == []
    assert fake_models and set(fake_models) == {"sft", "spiral", "grpo"}
    text = console.file.getvalue()
    assert "[2/4] toy-cmp-grpo-s0 (GRPO, seed 0): training to 300 generated tokens, from toy-sft@7" in text
    assert "ETA: ~" in text and "arm(s) left" in text
    for name in cmp.REPORT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "accuracy_vs_inference_tokens.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "sweep" / "cells.jsonl").is_file()
    files = {name: (out / name).read_text() for name in ("report.md", "summary.json", "efficiency.json",
                                                          "recipe.yaml", "commands.txt")}

    # the recipe snapshot is the compare's recipe, and reproduces it
    snap = load_recipe(out / "recipe.yaml")
    assert snap.snapshot() == cmp.plan_compare(make_recipe(), home=home, seeds=2, budget_tokens=BUDGET,
                                               problems=3, out=out).recipe.snapshot()
    assert snap.train_set.max_generated_tokens == BUDGET and snap.sweep.max_problems == 3
    commands = files["commands.txt"]
    assert "compare toy.yaml --set train_set.lr=2e-5 --seeds 2 --budget-tokens 300 --problems 3 --out" in commands
    assert (f"train-set {out}/recipe.yaml --objective grpo --name toy-cmp-grpo-s1 --model toy-sft@7 --set seed=1 "
            f"--set train_set.max_generated_tokens=300 --set train_set.steps=60") in commands
    assert "sweep " + str(out / "recipe.yaml") + " --models toy-sft@7,toy-cmp-spiral-s0@6,toy-cmp-grpo-s0@10," in commands

    # rerun: every arm is reused, every sweep cell is cached, the report is the same
    fake_models.clear()
    monkeypatch.setattr(cmp, "_train_arm", refuse_training)
    monkeypatch.setattr(sweep_mod, "_open_generator", refuse_training)
    console = quiet()
    again = cmp.run_compare(make_recipe(), home=home, seeds=2, budget_tokens=BUDGET, problems=3, out=out,
                            console=console, recipe_path="toy.yaml", overrides=["train_set.lr=2e-5"])
    assert again["trained"] == [] and again["reused"] == names and again["sweep"]["generate_calls"] == 0
    assert "reused, finished earlier at its budget: step 6, 300 generated tokens" in console.file.getvalue()
    for name, before in files.items():
        assert (out / name).read_text() == before, name
    # and the report alone is rebuilt from the files
    (out / "report.md").unlink()
    cmp.build_report(cmp.plan_compare(make_recipe(), home=home, seeds=2, budget_tokens=BUDGET, problems=3, out=out,
                                      recipe_path="toy.yaml", overrides=["train_set.lr=2e-5"]))
    assert (out / "report.md").read_text() == files["report.md"]


def test_an_interrupted_arm_resumes_and_finished_ones_are_reused(tmp_path, monkeypatch, fast, fake_models):
    home = tmp_path / "home"
    register_sft(home)
    kw = dict(home=home, seeds=1, budget_tokens=BUDGET, problems=3, out=tmp_path / "r", console=quiet())
    first = FakeTrainer(interrupt_after=None)
    monkeypatch.setattr(cmp, "_train_arm", first)
    # the SPIRAL arm finishes, the GRPO arm is interrupted after 4 of its 10 steps
    calls = {"n": 0}

    def trainer(recipe, **k):
        calls["n"] += 1
        return (first if calls["n"] == 1 else FakeTrainer(interrupt_after=4))(recipe, **k)

    monkeypatch.setattr(cmp, "_train_arm", trainer)
    with pytest.raises(KeyboardInterrupt):
        cmp.run_compare(make_recipe(), **kw)
    assert Registry(home).latest("toy-cmp-grpo-s0").step == 4
    plan = cmp.plan_compare(make_recipe(), home=home, seeds=1, budget_tokens=BUDGET)
    assert [a.status for a in plan.arms] == ["finished", "resume"]
    again = FakeTrainer()
    monkeypatch.setattr(cmp, "_train_arm", again)
    result = cmp.run_compare(make_recipe(), **kw)
    assert again.calls == [("toy-cmp-grpo-s0", 4)]  # resumed from its step, the finished arm untouched
    assert result["reused"] == ["toy-cmp-spiral-s0"] and result["trained"] == ["toy-cmp-grpo-s0"]
    grpo = [a for a in result["arms"] if a["method"] == "GRPO"][0]
    assert (grpo["steps"], grpo["generated_tokens"], grpo["stopped_on"]) == (10, 300, "token_budget")
    assert grpo["seconds"] == pytest.approx(5.0)  # 10 steps of 0.5 s, none counted twice


def test_one_more_seed_samples_only_its_models_and_times_name_their_machine(tmp_path, monkeypatch, fast):
    from spiral_cli.machine import describe, summary_line

    home = tmp_path / "home"
    register_sft(home)
    monkeypatch.setattr(cmp, "_train_arm", FakeTrainer())
    opened: list[str] = []
    monkeypatch.setattr(sweep_mod, "_load_task", lambda recipe: EchoTask(PROBLEMS))
    monkeypatch.setattr(sweep_mod, "_open_generator",
                        lambda recipe, ref, registry: opened.append(ref.ref) or AnswerGenerator(_kind(ref.ref), []))
    kw = dict(home=home, budget_tokens=BUDGET, problems=3, console=quiet())
    one = cmp.run_compare(make_recipe(), seeds=1, out=tmp_path / "one", **kw)
    assert opened == ["toy-sft@7", "toy-cmp-spiral-s0@6", "toy-cmp-grpo-s0@10"]
    opened.clear()
    two = cmp.run_compare(make_recipe(), seeds=2, out=tmp_path / "two", **kw)
    # another report directory, the same cache: only the new seed's two models are sampled
    assert opened == ["toy-cmp-spiral-s1@6", "toy-cmp-grpo-s1@10"]
    assert (home / cmp.SWEEP_CACHE / "pools").is_dir() and not (tmp_path / "two" / "sweep" / "cache").exists()
    assert two["sweep"]["cached_units"] > 0
    cells_one = {(c["model"], c["method"], c["N"], c["R"]): c["accuracy"] for c in
                 map(json.loads, (tmp_path / "one" / "sweep" / "cells.jsonl").read_text().splitlines())}
    cells_two = {(c["model"], c["method"], c["N"], c["R"]): c["accuracy"] for c in
                 map(json.loads, (tmp_path / "two" / "sweep" / "cells.jsonl").read_text().splitlines())}
    assert cells_one and all(cells_two[k] == v for k, v in cells_one.items())

    # where the times were measured: every arm and both sweeps, from <home>/compare/machines.jsonl
    here = summary_line(describe())
    for summary in (one, two):
        assert summary["machines"]["arms"] and all(v == [here] for v in summary["machines"]["arms"].values())
        assert summary["machines"]["sweep"] == [here] and summary["machines"]["report"] == here
    log = [json.loads(line) for line in (home / cmp.MACHINE_LOG).read_text().splitlines()]
    assert [(r["kind"], r.get("arm")) for r in log] == [
        ("arm", "toy-cmp-spiral-s0"), ("arm", "toy-cmp-grpo-s0"), ("sweep", None),
        ("arm", "toy-cmp-spiral-s1"), ("arm", "toy-cmp-grpo-s1"), ("sweep", None)]
    assert f"- Machines: arms trained on {here}; sweep generated on {here}; report written on {here}." in \
        (tmp_path / "two" / "report.md").read_text()
    # an arm trained before the log existed is said to be unrecorded, not guessed
    (home / cmp.MACHINE_LOG).write_text("".join(json.dumps(r) + "\n" for r in log if r.get("arm") != "toy-cmp-grpo-s1"))
    rebuilt = cmp.build_report(cmp.plan_compare(make_recipe(), home=home, seeds=2, budget_tokens=BUDGET, problems=3,
                                                out=tmp_path / "two"))
    assert rebuilt["machines"]["arms"]["toy-cmp-grpo-s1"] == []
    assert f"arms trained on {here} (not recorded for toy-cmp-grpo-s1)" in (tmp_path / "two" / "report.md").read_text()


# ---------------------------------------------------------------- numbers against hand computation


NS = [1, 2, 4]
PASS = {  # per-problem pass@N at N = 4 per (group, seed index); SPIRAL - GRPO is 0.2 on every problem
    ("spiral", 0): [0.5, 1.0, 0.25, 0.75], ("spiral", 1): [0.7, 0.8, 0.45, 0.55],
    ("grpo", 0): [0.4, 0.8, 0.15, 0.45], ("grpo", 1): [0.4, 0.6, 0.15, 0.45],
    ("sft", 0): [0.25, 0.5, 0.0, 0.25],
}
MAJ_BASE = [0.1, 0.2, 0.3, 0.4]
MAJ_SHIFT = {("spiral", 0): -0.05, ("spiral", 1): 0.05, ("grpo", 0): 0.02, ("grpo", 1): -0.02, ("sft", 0): -0.1}
MAJ_TOKENS = {("spiral", 0): 10, ("spiral", 1): 30, ("grpo", 0): 30, ("grpo", 1): 50, ("sft", 0): 20}  # x N
LEARNED = {"spiral": [0.6, 0.7, 0.8], "grpo": [0.1, 0.2, 0.3], "sft": [0.05, 0.1, 0.15]}  # per N, every problem


def fake_cells(models, ns=NS, t=8):
    cells = []
    for label in models:
        kind = _kind(label)
        s = int(label.split("-s")[-1].split("@")[0]) if kind != "sft" else 0
        for i, n in enumerate(ns):
            scale = (i + 2) / 4  # pass@N grows with N: 0.5, 0.75, 1 x the N = 4 values
            rows = [("pass", 0, [v * scale for v in PASS[(kind, s)]], 10 * n),
                    ("majority", 0, [b + 0.2 * i + MAJ_SHIFT[(kind, s)] for b in MAJ_BASE], MAJ_TOKENS[(kind, s)] * n),
                    ("learned", 1, [LEARNED[kind][i]] * 4, 100 * n)]
            for method, r, values, tokens in rows:
                cells.append({"model": label, "method": method, "N": n, "T": t, "R": r,
                              "accuracy": sum(values) / 4, "ci_lo": 0.0, "ci_hi": 1.0, "ci_method": "bootstrap",
                              "n_problems": 4, "generated_tokens_per_problem": tokens,
                              "total_tokens_per_problem": 2 * tokens, "per_problem": values})
    return cells


@pytest.fixture
def fake_sweep(monkeypatch):
    seen = {}

    def run_sweep(recipe, *, models, out, home, console=None, cache=None):
        seen.update(models=list(models), recipe=recipe, out=out)
        out.mkdir(parents=True, exist_ok=True)
        cells = fake_cells(models, recipe.sweep.parallel, max(recipe.sweep.seq_budget))
        (out / "cells.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cells))
        return {"out": str(out), "generate_calls": 0, "cached_units": 0, "cells": 0}

    monkeypatch.setattr(sweep_mod, "run_sweep", run_sweep)
    return seen


def test_report_numbers_by_hand(tmp_path, monkeypatch, fast, fake_sweep):
    home = tmp_path / "home"
    register_sft(home)
    monkeypatch.setattr(cmp, "_train_arm", FakeTrainer())
    out = tmp_path / "r"
    cmp.run_compare(make_recipe(), home=home, seeds=2, budget_tokens=BUDGET, problems=4, out=out, console=quiet())
    assert fake_sweep["models"][0] == "toy-sft@7" and len(fake_sweep["models"]) == 5
    assert fake_sweep["recipe"].sweep.max_problems == 4 and fake_sweep["out"] == out / "sweep"
    summary = json.loads((out / "summary.json").read_text())
    report = (out / "report.md").read_text()

    # training, from the registry and metrics.jsonl: 50 + seed tokens per SPIRAL step, 30 + seed per GRPO step
    arms = {a["name"]: a for a in summary["arms"]}
    assert [(arms[n]["steps"], arms[n]["generated_tokens"], arms[n]["total_tokens"], arms[n]["seconds"])
            for n in ("toy-cmp-spiral-s0", "toy-cmp-spiral-s1", "toy-cmp-grpo-s0", "toy-cmp-grpo-s1")] == [
        (6, 300, 600, 3.0), (6, 306, 612, 3.0), (10, 300, 600, 5.0), (10, 310, 620, 5.0)]
    assert summary["training_by_method"]["GRPO"] == {"steps": 10, "generated_tokens": 305, "total_tokens": 610,
                                                     "seconds": 5.0}
    assert "| `toy-cmp-spiral-s1@6` | SPIRAL | 1 | 6 | 306 | 612 | 3.0 | token_budget |" in report

    # pass@4: SPIRAL 0.625, GRPO 0.425, a constant per-problem difference of 0.2: a zero-width interval
    p = summary["accuracy"]["pass"]
    assert (p["N"], p["T"], p["R"]) == (4, 8, 0)
    assert p["SPIRAL"]["estimate"] == pytest.approx(0.625) and p["GRPO"]["estimate"] == pytest.approx(0.425)
    assert p["SPIRAL"]["per_seed"] == pytest.approx([0.625, 0.625]) and p["GRPO"]["per_seed"] == pytest.approx([0.45, 0.4])
    assert p["SFT"]["estimate"] == pytest.approx(0.25) and p["SFT"]["n_seeds"] == 1
    d = p["SPIRAL_minus_GRPO"]
    assert d["estimate"] == pytest.approx(0.2) and d["interval"] == [pytest.approx(0.2), pytest.approx(0.2)]
    assert d["per_seed"] == pytest.approx([0.175, 0.225])
    lo, hi = p["SPIRAL"]["interval"]
    assert lo < 0.625 < hi  # the accuracy itself varies with the problems drawn
    assert "| pass@N | 25.0% " in report and "| 62.5% [" in report and "| 42.5% [" in report
    assert "| +20.0 [+20.0, +20.0] |" in report
    # majority@4: the seeds average to the same per-problem values: difference 0 [0, 0]
    m = summary["accuracy"]["majority"]
    assert m["SPIRAL"]["estimate"] == pytest.approx(0.65) and m["GRPO"]["estimate"] == pytest.approx(0.65)
    assert m["SPIRAL_minus_GRPO"]["interval"] == [pytest.approx(0.0, abs=1e-12)] * 2
    # learned (R = 1) at N = 4: 0.8 vs 0.3
    assert summary["accuracy"]["learned"]["R"] == 1
    assert summary["accuracy"]["learned"]["SPIRAL_minus_GRPO"]["estimate"] == pytest.approx(0.5)

    # efficiency on the pooled curves: majority, same accuracy at half GRPO's compute (20N vs 40N): 2x exactly
    eff = {e["method"]: e for e in summary["efficiency"]}
    assert eff["majority"]["status"] == "ok" and eff["majority"]["max"] == pytest.approx(2.0)
    assert eff["majority"]["interval"] == [pytest.approx(2.0), pytest.approx(2.0)]
    assert eff["majority"]["at_baseline_best"] == pytest.approx(2.0)
    # learned: SPIRAL's cheapest point (0.6 at 100 tokens) beats GRPO's best (0.3 at 400): > 4x, no number
    assert eff["learned"]["status"] == "candidate_dominates" and eff["learned"]["max"] is None
    assert eff["learned"]["lower_bound"] == pytest.approx(4.0)
    full = json.loads((out / "efficiency.json").read_text())
    assert full["baseline"] == "GRPO" and {c["candidate"] for c in full["comparisons"]} == {"SPIRAL"}
    maj = [c for c in full["comparisons"] if c["method"] == "majority"][0]
    assert maj["baseline_curve"] == [[pytest.approx(40.0 * n), pytest.approx(0.25 + 0.2 * i)] for i, n in enumerate(NS)]
    assert maj["candidate_curve"] == [[pytest.approx(20.0 * n), pytest.approx(0.25 + 0.2 * i)] for i, n in enumerate(NS)]
    assert "| majority@N | 8 | 0 | 2.00x [2.00, 2.00] | 2.00x [2.00, 2.00] |" in report
    assert "candidate_dominates: SPIRAL's cheapest point beats GRPO's best; efficiency > 4.00x" in report

    # the conclusion follows the numbers
    text = " ".join(summary["conclusion"])
    assert summary["conclusion"][0] == (
        "Overall, at 300 generated training tokens per arm and 2 seeds per method, SPIRAL is ahead on pass@N, "
        "learned aggregation; the difference is within noise on majority@N.")
    assert "On pass@N (N=4, T=8) SPIRAL is ahead of GRPO: 62.5% vs 42.5%, difference +20.0 points" in text
    assert "On majority@N (N=4, T=8) there is no clear difference" in text
    assert "GRPO needs up to 2.00x the inference tokens (95% CI 2.00–2.00x)" in text
    assert ("Scaling efficiency on learned aggregation: no ratio (candidate_dominates); SPIRAL's cheapest point beats "
            "GRPO's best; efficiency > 4.00x.") in text
    assert "Only 4 held-out problems were scored" in text
    assert "## Conclusion" in report and summary["conclusion"][0] in report


def test_conclusion_when_grpo_wins_and_seeds_disagree(tmp_path, monkeypatch, fast, fake_sweep):
    # swap the methods' cells: GRPO ahead; make the SPIRAL seeds straddle GRPO on pass
    monkeypatch.setitem(PASS, ("spiral", 0), [0.1, 0.2, 0.3, 0.4])
    monkeypatch.setitem(PASS, ("spiral", 1), [0.9, 0.9, 0.9, 0.9])
    monkeypatch.setitem(LEARNED, "spiral", [0.0, 0.03, 0.06])
    home = tmp_path / "home"
    register_sft(home)
    monkeypatch.setattr(cmp, "_train_arm", FakeTrainer())
    summary = cmp.run_compare(make_recipe(), home=home, seeds=2, budget_tokens=BUDGET, problems=4,
                              out=tmp_path / "r", console=quiet())
    text = " ".join(summary["conclusion"])
    assert "On learned aggregation (N=4, T=8, R=1) GRPO is ahead of SPIRAL" in text
    assert "GRPO is ahead on learned aggregation" in summary["conclusion"][0]
    assert "The seeds disagree on pass@N: per-seed differences" in text
    assert ("Scaling efficiency on learned aggregation: no ratio (baseline_dominates); GRPO's cheapest point beats "
            "SPIRAL's best; efficiency < 0.25x.") in text


def test_cli_command_errors_and_output(tmp_path, monkeypatch, fast, fake_sweep):
    """The command function as cli.py wires it: one-line errors with exit 2, the summary on stdout."""
    import typer
    from typer.testing import CliRunner

    from spiral_cli import cli

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    app.command("compare")(cli.friendly(cmp.compare_command))
    home = tmp_path / "home"
    monkeypatch.setenv("SPIRAL_HOME", str(home))
    monkeypatch.setitem(cli._state, "home", None)
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe().snapshot()))
    register_sft(home)
    trainer = FakeTrainer()
    monkeypatch.setattr(cmp, "_train_arm", trainer)
    runner = CliRunner()
    res = runner.invoke(app, ["compare", str(recipe), "--budget-tokens", "100"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --budget-tokens 100 is less than one training step")
    res = runner.invoke(app, ["compare", str(recipe), "--set", "train_set.lrr=1", "--budget-tokens", "300"])
    assert res.exit_code == 2 and "train_set.lrr: unknown field" in res.output
    assert trainer.calls == []
    res = runner.invoke(app, ["compare", str(recipe), "--quick", "--problems", "4", "--out", str(tmp_path / "q")])
    assert res.exit_code == 0, res.output
    assert "quick preset: seeds 3 -> 1; sweep.parallel [1, 2, 4] -> [1, 4, 8]" in res.output
    payload = json.loads(res.output.strip().splitlines()[-1])
    assert payload["trained"] == ["toy-cmp-spiral-s0", "toy-cmp-grpo-s0"] and payload["conclusion"]
    assert "--quick" in (tmp_path / "q" / "commands.txt").read_text()


# ---------------------------------------------------------------- end to end on a tiny model

E2E_RECIPE = toy_recipe(
    train_set={"steps": None, "prompts_per_step": 2, "num_search": 4, "num_sets": 2, "set_size": 2,
               "num_generations": 4, "dynamic_sampling": False, "eval_every": 2, "eval_problems": 4,
               "save_every": 50},
    sweep={"parallel": [1, 2], "seq_budget": [6], "agg_rounds": [0, 1]},
)


@pytest.mark.slow
def test_end_to_end_tiny_model_trains_both_arms_sweeps_and_rebuilds(tmp_path, monkeypatch, fast):
    pytest.importorskip("torch")
    from spiral_cli.checkpoints import save_registered
    from spiral_cli.models import load_model
    from spiral_cli.rl import trainer

    path = tmp_path / "toy.yaml"
    path.write_text(E2E_RECIPE)
    recipe = load_recipe(path)
    home = tmp_path / "home"
    loaded = load_model(recipe.model, seed=0)
    save_registered(loaded, Registry(home), home, name="toy-sft", stage="sft", step=0, parent="scratch:nano",
                    recipe=recipe.snapshot())
    budget = 2 * cmp.step_bound(recipe)[0]  # 2 x 96: two steps or more per arm
    out = tmp_path / "report"
    console = quiet()
    summary = cmp.run_compare(recipe, home=home, seeds=1, budget_tokens=budget, problems=4, out=out, console=console)
    assert summary["trained"] == ["toy-cmp-spiral-s0", "toy-cmp-grpo-s0"]
    for arm in summary["arms"]:
        assert arm["stopped_on"] == "token_budget" and arm["generated_tokens"] >= budget and arm["steps"] >= 2
        entry = Registry(home).latest(arm["name"])
        assert entry.parent == "toy-sft@0" and entry.metrics["max_generated_tokens"] == budget
        assert entry.recipe["train_set"]["objective"] == arm["objective"]
    assert set(summary["accuracy"]) == {"pass", "majority", "learned"}
    assert summary["problems_scored"] == 4 and summary["efficiency"]
    for name in cmp.REPORT_FILES:
        assert (out / name).is_file(), name
    assert (out / "accuracy_vs_training_tokens.png").stat().st_size > 5000  # eval points were drawn
    assert "step 1/" in console.file.getvalue()  # the trainer's per-step progress went to the console
    before = {n: (out / n).read_text() for n in ("report.md", "summary.json", "efficiency.json", "commands.txt")}

    def boom(*a, **k):
        raise AssertionError("no training, no generation on a rebuild")

    monkeypatch.setattr(trainer, "run_train_set", boom)
    monkeypatch.setattr(sweep_mod, "_open_generator", boom)
    again = cmp.run_compare(recipe, home=home, seeds=1, budget_tokens=budget, problems=4, out=out, console=quiet())
    assert again["trained"] == [] and again["sweep"]["generate_calls"] == 0
    for name, text in before.items():
        assert (out / name).read_text() == text, name
