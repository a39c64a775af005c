"""The RL loop end to end on a toy task with a scratch model: it learns, it logs, it resumes exactly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from toy_task import toy_recipe

from spiral_cli.recipe import load_recipe
from spiral_cli.registry import Registry

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

RECIPE = toy_recipe(train_set={"num_generations": 8})


def recipe_file(tmp_path: Path) -> Path:
    p = tmp_path / "toy.yaml"
    p.write_text(RECIPE)
    return p


def quiet() -> Console:
    return Console(stderr=True, quiet=True)


def train(tmp_path: Path, home: Path, overrides: list[str] = (), name: str | None = None):
    from spiral_cli.rl.trainer import run_train_set

    recipe = load_recipe(recipe_file(tmp_path), list(overrides))
    return run_train_set(recipe, home=home, name=name, model="scratch:nano", console=quiet())


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def expected_reward(recipe, source: str) -> float:
    """The toy task's exact expected reward under `source`'s policy, with no sampling noise: the
    probability that a sampled answer's first byte is even, averaged over the 50 questions."""
    from spiral_cli.models import load_model

    loaded = load_model(recipe.model, source=source, for_training=False)
    tok, model = loaded.tokenizer, loaded.model
    vocab = model.get_input_embeddings().weight.shape[0]
    even = torch.zeros(vocab)
    for i in range(min(vocab, len(tok))):
        b = tok.decode([i]).encode("utf-8")[:1]
        even[i] = float(bool(b) and b[0] % 2 == 0)
    with torch.no_grad():
        probs = [model(tok(f"q{q}:", return_tensors="pt").input_ids).logits[0, -1].float().softmax(-1)
                 for q in range(50)]
    return float(sum((p * even).sum() for p in probs) / len(probs))


@pytest.mark.slow
def test_grpo_raises_reward_on_toy_task(tmp_path):
    home = tmp_path / "home"
    # T per trace, not the 2T default: the reward is the first byte's, and under token_mean 12
    # tokens per trace halve that byte's share of the gradient (the 2T default is tested below)
    overrides = ["train_set.objective=grpo", "train_set.steps=40", "train_set.save_every=40",
                 "train_set.dynamic_sampling=false", "train_set.grpo_max_new_tokens=6"]
    train(tmp_path, home, overrides)
    rows = [json.loads(l) for l in (home / "runs" / "toy-grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    # the policy's exact expected reward, before and after: 0.264 -> 0.427 after 30 steps with
    # these seeds (2026-12-02), so the bar leaves room for other seeds' slower starts
    recipe = load_recipe(recipe_file(tmp_path), overrides)
    before = expected_reward(recipe, "scratch:nano")
    after = expected_reward(recipe, str(Registry(home).resolve("toy-grpo").entry.path))
    assert after > before + 0.15, (before, after)
    first = sum(r["reward_search"] for r in rows[:5]) / 5
    last = sum(r["reward_search"] for r in rows[-5:]) / 5
    assert last > first + 0.1, (first, last)  # and the logged (sampled) reward shows it
    # generated tokens: 4 prompts x 8 samples x <= 6 tokens per step
    assert 0 < rows[0]["generated_tokens"] <= 4 * 8 * 6


@pytest.mark.slow
def test_spiral_step_logs_and_registers_with_lineage(tmp_path):
    home = tmp_path / "home"
    result = train(tmp_path, home, ["train_set.steps=2"])
    assert result["steps"] == 2 and result["stage"] == "set"
    entries = Registry(home).ls("toy-set")
    assert [(e.step, e.stage, e.parent) for e in entries] == [(2, "set", "scratch:nano")]
    row = json.loads((home / "runs" / "toy-set" / "metrics.jsonl").read_text().splitlines()[0])
    for key in ["reward_search", "reward_aggregate", "set_score", "adv_abs_mean", "entropy_search",
                "len_search", "len_aggregate", "generated_tokens", "total_tokens", "prompts_kept"]:
        assert key in row, key
    assert set(row["seconds"]) == {"generation", "scoring", "update", "sync", "total"}
    # 4 prompts x (8 search + 4 sets x 2 aggregations) = 64 sequences of <= 6 tokens, at least once
    assert row["generated_tokens"] <= row["prompts_drawn"] * 16 * 6
    assert row["total_tokens"] > row["generated_tokens"]


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    straight, split = tmp_path / "a", tmp_path / "b"
    train(tmp_path, straight, ["train_set.steps=4"])
    train(tmp_path, split, ["train_set.steps=2"])  # "crashes" after its checkpoint at step 2
    train(tmp_path, split, ["train_set.steps=4"])  # resumes from the state at step 2
    wa = weights(Registry(straight).resolve("toy-set@4").entry.path)
    wb = weights(Registry(split).resolve("toy-set@4").entry.path)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    w2 = weights(Registry(split).resolve("toy-set@2").entry.path)
    assert any(not torch.equal(wa[k], w2[k]) for k in wa)  # training did change the weights
    rows = [json.loads(l)["step"] for l in (split / "runs" / "toy-set" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4]


@pytest.mark.slow
def test_kill_9_then_resume(tmp_path):
    home = tmp_path / "home"
    recipe = recipe_file(tmp_path)
    env = {**os.environ, "SPIRAL_HOME": str(home), "PYTHONPATH": str(TESTS)}
    cmd = [sys.executable, "-m", "spiral_cli", "train-set", str(recipe), "--model", "scratch:nano",
           "--set", "train_set.steps=40", "--set", "train_set.save_every=5"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = home / "runs" / "toy-set" / "state" / "trainer_state.pt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and Registry(home).latest("toy-set") is not None and Registry(home).latest("toy-set").step >= 10:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = Registry(home).latest("toy-set").step
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "resumed at step" in out.stderr
    resumed_at = int(out.stderr.split("resumed at step")[1].split()[0])
    assert killed_at <= resumed_at <= killed_at + 5  # only steps since the last checkpoint are redone
    entries = Registry(home).ls("toy-set")
    assert [e.step for e in entries] == list(range(5, 41, 5))
    assert all(Path(e.path, "model.safetensors").is_file() for e in entries)
    leftovers = [p.name for p in (home / "checkpoints" / "toy-set").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    steps = [json.loads(l)["step"] for l in (home / "runs" / "toy-set" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))


@pytest.mark.slow
def test_two_process_ddp_ends_with_identical_weights(tmp_path):
    pytest.importorskip("accelerate")
    home = tmp_path / "home"
    recipe = recipe_file(tmp_path)
    env = {**os.environ, "SPIRAL_HOME": str(home), "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    worker = TESTS / "ddp_worker.py"
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         str(worker), str(recipe), str(tmp_path)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    sums = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sums[0]["world"] == sums[1]["world"] == 2
    assert sums[0]["checksum"] == sums[1]["checksum"]
    assert sums[0]["changed"]  # the weights did move
    assert not sums[0]["group_left"] and not sums[1]["group_left"]  # destroyed before the interpreter's teardown
    assert [e.step for e in Registry(home).ls("toy-set")] == [2, 4]  # written once, by rank 0


@pytest.mark.slow
def test_two_process_ddp_trains_the_aggregator_adapter_mode(tmp_path):
    """aggregator.mode=adapter under DDP: each micro-batch trains one role's adapter, so the synced
    one gives the other adapter a zero gradient; both adapters end identical on both ranks."""
    pytest.importorskip("accelerate")
    home = tmp_path / "home"
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(toy_recipe(model={"lora": {"r": 4, "alpha": 8}},
                                 train_set={"num_generations": 8, "aggregator": {"mode": "adapter"}}))
    env = {**os.environ, "SPIRAL_HOME": str(home), "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
         str(TESTS / "ddp_worker.py"), str(recipe), str(tmp_path), "2"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    sums = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sums[0]["checksum"] == sums[1]["checksum"] and sums[0]["world"] == 2
    path = Registry(home).resolve("toy-set@2").entry.path
    from safetensors.torch import load_file

    search = load_file(str(path / "adapter_model.safetensors"))
    agg = load_file(str(path / "aggregator" / "adapter_model.safetensors"))
    b_keys = [k for k in search if "lora_B" in k]
    assert any(search[k].abs().sum() > 0 for k in b_keys) and any(agg[k].abs().sum() > 0 for k in b_keys)
    assert any(not torch.equal(search[k], agg[k]) for k in b_keys)  # two adapters, each trained by its role


@pytest.mark.slow
def test_train_agg_trains_only_aggregations(tmp_path):
    from spiral_cli.rl.trainer import run_train_agg

    home = tmp_path / "home"
    recipe = load_recipe(recipe_file(tmp_path), ["train_agg.steps=2", "train_agg.prompts_per_step=4",
                                                 "train_agg.num_aggregations=2", "train_agg.eval_problems=0",
                                                 "train_agg.save_every=2", "train_agg.balance=true",
                                                 "train_agg.search_model=scratch:nano"])
    result = run_train_agg(recipe, home=home, model="scratch:nano", console=quiet())
    assert result["stage"] == "agg" and result["steps"] == 2
    assert [(e.step, e.stage) for e in Registry(home).ls("toy-agg")] == [(2, "agg")]
    row = json.loads((home / "runs" / "toy-agg" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["len_aggregate"] is not None and row["reward_aggregate"] is not None
    # only aggregation samples are trained: no search-trace entropy is measured (null, not NaN,
    # which is not JSON), and at most 4 prompts x 4 sets x 2 aggregations sequences
    assert row["entropy_search"] is None
    assert 0 < row["trained_sequences"] <= 4 * 4 * 2


@pytest.mark.slow
def test_aggregator_adapter_mode_trains_two_adapters_and_resumes(tmp_path):
    """aggregator.mode=adapter: search samples train peft's default adapter, aggregation samples
    the `aggregator` adapter; the checkpoint carries both (plain peft loads them) and resumes."""
    from safetensors.torch import load_file

    lora = ["model.lora.r=4", "model.lora.alpha=8", "train_set.aggregator.mode=adapter", "train_set.lr=1.0e-2"]
    home = tmp_path / "home"
    train(tmp_path, home, lora + ["train_set.steps=2"])
    path = Registry(home).resolve("toy-set@2").entry.path
    search = load_file(str(path / "adapter_model.safetensors"))
    agg = load_file(str(path / "aggregator" / "adapter_model.safetensors"))
    assert search.keys() == agg.keys()
    b_keys = [k for k in search if "lora_B" in k]
    # both started as the same (zero-B) adapter; each moved, and differently
    assert any(search[k].abs().sum() > 0 for k in b_keys) and any(agg[k].abs().sum() > 0 for k in b_keys)
    assert any(not torch.equal(search[k], agg[k]) for k in b_keys)

    # plain peft: the default adapter and the aggregator adapter, without spiral
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(path / "base"))
    model = PeftModel.from_pretrained(base, str(path))
    model.load_adapter(str(path / "aggregator"), adapter_name="aggregator")
    assert set(model.peft_config) == {"default", "aggregator"}

    # spiral loads both, and inference routes aggregation through the aggregator adapter
    from spiral_cli.generation import make_generator
    from spiral_cli.generation.roles import AdapterGenerator, for_aggregation
    from spiral_cli.models import load_model
    from spiral_cli.recipe import ModelSection

    loaded = load_model(ModelSection(name=str(path), autocast="off"), for_training=False)
    gen = make_generator(loaded, load_recipe(recipe_file(tmp_path)).generation)
    assert isinstance(for_aggregation(gen), AdapterGenerator)
    assert loaded.model.active_adapter == "default"
    prompts = ["1 2 ->", "3 4 ->"]
    a = gen.generate(prompts, max_new_tokens=6, temperature=0)
    b = for_aggregation(gen).generate(prompts, max_new_tokens=6, temperature=0)
    assert loaded.model.active_adapter == "default"  # restored after the aggregator generated
    with torch.no_grad():
        ids = loaded.tokenizer(prompts[0], return_tensors="pt").input_ids
        l_default = loaded.model(input_ids=ids).logits
        loaded.model.set_adapter("aggregator")
        l_agg = loaded.model(input_ids=ids).logits
        loaded.model.set_adapter("default")
    assert not torch.allclose(l_default, l_agg)  # two different policies
    assert len(a) == len(b) == 2

    # resume from the step-2 state to step 3: both adapters come back and keep training
    train(tmp_path, home, lora + ["train_set.steps=3"])
    path3 = Registry(home).resolve("toy-set@3").entry.path
    agg3 = load_file(str(path3 / "aggregator" / "adapter_model.safetensors"))
    assert any(not torch.equal(agg[k], agg3[k]) for k in b_keys)

    # train-agg from that checkpoint trains its aggregator adapter, not the search adapter
    from spiral_cli.rl.trainer import run_train_agg

    recipe = load_recipe(recipe_file(tmp_path), ["train_agg.steps=1", "train_agg.prompts_per_step=4",
                                                 "train_agg.num_aggregations=2", "train_agg.eval_problems=0",
                                                 "train_agg.save_every=1", "train_agg.lr=1.0e-2",
                                                 f"train_agg.search_model={path3}"])
    run_train_agg(recipe, home=home, model=str(path3), console=quiet())
    path_agg = Registry(home).resolve("toy-agg@1").entry.path
    search3 = load_file(str(path3 / "adapter_model.safetensors"))
    search_a = load_file(str(path_agg / "adapter_model.safetensors"))
    agg_a = load_file(str(path_agg / "aggregator" / "adapter_model.safetensors"))
    assert all(torch.equal(search3[k], search_a[k]) for k in search3)  # untouched
    assert any(not torch.equal(agg3[k], agg_a[k]) for k in b_keys)  # trained


def test_aggregator_adapter_mode_needs_lora(tmp_path):
    from spiral_cli.recipe import RecipeError

    with pytest.raises(RecipeError, match="aggregator.mode=adapter: needs a LoRA policy"):
        train(tmp_path, tmp_path / "home", ["train_set.aggregator.mode=adapter", "train_set.steps=1"])


@pytest.mark.slow
def test_eval_points_and_curves_are_written(tmp_path):
    home = tmp_path / "home"
    train(tmp_path, home, ["train_set.steps=2", "train_set.eval_every=1", "train_set.eval_problems=4"])
    run = home / "runs" / "toy-set"
    points = [json.loads(l) for l in (run / "eval.jsonl").read_text().splitlines()]
    assert [p["step"] for p in points] == [0, 1, 2]
    assert points[0]["generated_tokens"] == 0 < points[1]["generated_tokens"] < points[2]["generated_tokens"]
    assert any(k.endswith("/pass@1") for k in points[0])
    assert (run / "curves.png").stat().st_size > 1000
    # the CLI overlays runs; an unknown run is a one-line error
    cmd = [sys.executable, "-m", "spiral_cli", "--home", str(home), "curves", "toy-set", "-o", str(tmp_path / "c.png")]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run(cmd[:6] + ["nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no evaluations recorded for run 'nope'" in bad.stderr


# ---------------------------------------------------------------- token budgets (max_generated_tokens)

# a smaller step than RECIPE's: 2 prompts x (4 search + 2 sets x 2 aggregations) of <= 6 tokens
SMALL = ["train_set.prompts_per_step=2", "train_set.num_search=4", "train_set.num_sets=2", "train_set.set_size=2",
         "train_set.num_aggregations=2", "train_set.num_generations=4", "train_set.dynamic_sampling=false",
         "train_set.steps=50", "train_set.save_every=50"]


def metric_rows(home: Path, name: str) -> list[dict]:
    return [json.loads(l) for l in (home / "runs" / name / "metrics.jsonl").read_text().splitlines()]


def assert_stopped_within_one_step(home: Path, name: str, result: dict, budget: int) -> list[dict]:
    rows = metric_rows(home, name)
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, result["steps"] + 1)) and 1 < result["steps"] < 50  # the budget, not the cap
    last, before = rows[-1]["generated_tokens"], rows[-2]["generated_tokens"]
    # the step that crossed the budget completed; the one before had not reached it
    assert last >= budget > before
    assert result["generated_tokens"] == last and result["stopped_on"] == "token_budget"
    (entry,) = [e for e in Registry(home).ls(name) if e.step == result["steps"]]
    assert entry.metrics["generated_tokens"] == last and entry.metrics["total_tokens"] == rows[-1]["total_tokens"]
    assert entry.metrics["stopped_on"] == "token_budget" and entry.metrics["max_generated_tokens"] == budget
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["spiral", "grpo"])
def test_token_budget_stops_within_one_step(tmp_path, objective):
    # GRPO (the twin of a SPIRAL run) reads the same field; its traces get 2T = 12 tokens by default
    home = tmp_path / "home"
    budget = 150  # <= 96 tokens per SPIRAL step, <= 2 x 4 x 12 = 96 per GRPO step: at least 2 steps
    result = train(tmp_path, home, SMALL + [f"train_set.objective={objective}", f"train_set.max_generated_tokens={budget}"])
    rows = assert_stopped_within_one_step(home, f"toy-{'grpo' if objective == 'grpo' else 'set'}", result, budget)
    per_step = [b["generated_tokens"] - a["generated_tokens"] for a, b in zip([{"generated_tokens": 0}] + rows, rows)]
    assert max(per_step) <= 2 * (4 * 12 if objective == "grpo" else 8 * 6)
    if objective == "grpo":
        assert max(per_step) > 2 * 4 * 6  # the 2T default: more than T tokens per trace were allowed


def test_eval_due_by_steps_or_by_tokens():
    from types import SimpleNamespace

    from spiral_cli.rl.run_io import RunState, _eval_due

    by_steps = SimpleNamespace(eval_every=3, eval_every_tokens=None)
    assert [s for s in range(1, 10) if _eval_due(by_steps, RunState(step=s), 0)] == [3, 6, 9]
    by_tokens = SimpleNamespace(eval_every=1, eval_every_tokens=100)  # eval_every is then unused
    # (tokens before the step, after it): due when a multiple of 100 lies in (before, after]
    cases = {(0, 99): False, (0, 100): True, (99, 100): True, (100, 199): False, (150, 420): True,
             (200, 201): False, (199, 200): True}
    for (before, after), due in cases.items():
        assert _eval_due(by_tokens, RunState(step=7, generated_tokens=after), before) is due, (before, after)


@pytest.mark.slow
def test_eval_every_tokens_evaluates_at_token_counts_and_leaves_training_alone(tmp_path):
    every = 120  # a SMALL step generates <= 96 tokens: some steps cross a multiple of it, some do not
    runs = {"by-tokens": [f"train_set.eval_every_tokens={every}"], "rare": ["train_set.eval_every=100"]}
    home = tmp_path / "home"
    for name, extra in runs.items():
        train(tmp_path, home, SMALL + ["train_set.steps=6", "train_set.save_every=6", "train_set.eval_problems=4",
                                       *extra], name=name)
    rows = metric_rows(home, "by-tokens")
    tokens = [0] + [r["generated_tokens"] for r in rows]
    crossed = [s for s in range(1, 7) if tokens[s] // every > tokens[s - 1] // every]
    assert 0 < len(crossed) < 6
    evals = [json.loads(l)["step"] for l in (home / "runs" / "by-tokens" / "eval.jsonl").read_text().splitlines()]
    assert evals == sorted({0, *crossed, 6})
    rare = [json.loads(l)["step"] for l in (home / "runs" / "rare" / "eval.jsonl").read_text().splitlines()]
    assert rare == [0, 6]
    # evaluating more often changes nothing that is trained
    a, b = (weights(Registry(home).latest(n).path) for n in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["generated_tokens"] for r in metric_rows(home, "rare")] == tokens[1:]


@pytest.mark.slow
def test_token_budget_resume_is_exact_and_a_met_budget_does_nothing(tmp_path):
    import io

    budget = ["train_set.max_generated_tokens=200"]
    straight, split = tmp_path / "a", tmp_path / "b"
    a = train(tmp_path, straight, SMALL + budget)
    assert a["steps"] > 2 and a["stopped_on"] == "token_budget"
    b2 = train(tmp_path, split, SMALL + budget + ["train_set.steps=2", "train_set.save_every=1"])  # "crashes" at 2
    assert b2["steps"] == 2 and b2["stopped_on"] == "steps"
    b = train(tmp_path, split, SMALL + budget)  # resumes from step 2 under the same budget
    assert (b["steps"], b["generated_tokens"], b["total_tokens"]) == (a["steps"], a["generated_tokens"], a["total_tokens"])
    assert_stopped_within_one_step(split, "toy-set", b, 200)
    wa = weights(Registry(straight).resolve(f"toy-set@{a['steps']}").entry.path)
    wb = weights(Registry(split).resolve(f"toy-set@{b['steps']}").entry.path)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    # run again: the budget is already met, so no step is taken, and the run says so
    from spiral_cli.rl.trainer import run_train_set

    out = io.StringIO()
    again = run_train_set(load_recipe(recipe_file(tmp_path), SMALL + budget), home=split, model="scratch:nano",
                          console=Console(file=out, width=300))
    assert (again["steps"], again["generated_tokens"], again["stopped_on"]) == (b["steps"], b["generated_tokens"], "token_budget")
    assert "token budget already met" in out.getvalue()
    assert [r["step"] for r in metric_rows(split, "toy-set")] == list(range(1, b["steps"] + 1))


def test_token_budget_must_be_positive(tmp_path):
    from spiral_cli.recipe import RecipeError

    for value in (0, -1):
        with pytest.raises(RecipeError, match=r"toy.yaml: train_set.max_generated_tokens: Input should be greater than 0"):
            load_recipe(recipe_file(tmp_path), [f"train_set.max_generated_tokens={value}"])
    # the CLI flag is that field: refused before any model is loaded, exit 2, one line
    env = {**os.environ, "SPIRAL_HOME": str(tmp_path / "home"), "PYTHONPATH": str(TESTS)}
    out = subprocess.run([sys.executable, "-m", "spiral_cli", "train-agg", str(recipe_file(tmp_path)),
                          "--max-generated-tokens", "0"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.strip().endswith("toy.yaml: train_agg.max_generated_tokens: Input should be greater than 0 (got 0)")


def test_cli_flag_sets_the_budget_of_either_command(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from spiral_cli import cli
    from spiral_cli.rl import trainer

    seen = {}
    monkeypatch.setattr(trainer, "run_train_set", lambda r, **kw: seen.setdefault("set", r) and {})
    monkeypatch.setattr(trainer, "run_train_agg", lambda r, **kw: seen.setdefault("agg", r) and {})
    runner = CliRunner()
    recipe = str(recipe_file(tmp_path))
    res = runner.invoke(cli.app, ["train-set", recipe, "--objective", "grpo", "--max-generated-tokens", "5000",
                                  "--set", "train_set.scale_std=true"])
    assert res.exit_code == 0, res.output
    assert seen["set"].train_set.max_generated_tokens == 5000 and seen["set"].train_set.objective == "grpo"
    assert "train_set.scale_std is deprecated: use scale_rewards: group" in res.output
    res = runner.invoke(cli.app, ["train-agg", recipe, "--max-generated-tokens", "700"])
    assert res.exit_code == 0, res.output
    assert seen["agg"].train_agg.max_generated_tokens == 700 and seen["agg"].train_set.max_generated_tokens is None


# ---------------------------------------------------------------- Dr. GRPO normaliser in _update


class _RecordingOptimizer:
    """Stands in for AdamW: keeps the accumulated gradients of each step, changes nothing."""

    def __init__(self, params):
        self.params = list(params)
        self.param_groups = [{"lr": 0.0}]
        self.grads = []

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        self.grads.append([p.grad.clone() for p in self.params])


def test_update_dr_grpo_normaliser_and_micro_batches():
    # On-policy (one pass) every token loss is -A, so the batch loss is -sum_b A_b n_b / normaliser.
    # A = [1, -0.5, 2, 0], n = [3, 2, 1, 5] tokens, budgets L = [4, 4, 6, 6]:
    #   dr_grpo:    -(3 - 1 + 2 + 0) / (4 + 4 + 6 + 6) = -4 / 20 (the zero-advantage sequence is
    #               skipped in the backward pass but still counts in the normaliser)
    #   token_mean: -4 / (3 + 2 + 1 + 5) = -4 / 11
    from spiral_cli.models import load_model
    from spiral_cli.recipe import ModelSection, TrainSetSection
    from spiral_cli.rl.rollout import Sample
    from spiral_cli.rl.update import _update

    loaded = load_model(ModelSection(name="scratch:nano", autocast="off", max_seq_len=64), seed=0)
    samples = [Sample("q1:", [40, 41, 42], [0.0] * 3, 1.0, 1.0, "search", 4),
               Sample("q2:", [43, 44], [0.0] * 2, -0.5, 0.0, "search", 4),
               Sample("a1:", [45], [0.0], 2.0, 1.0, "aggregate", 6),
               Sample("a2:", [46] * 5, [0.0] * 5, 0.0, 1.0, "aggregate", 6)]

    class _Sched:
        def step(self):
            pass

    def run(aggregation, micro):
        sec = TrainSetSection(loss_aggregation=aggregation, micro_batch_size=micro, max_grad_norm=1e9)
        params = [p for p in loaded.model.parameters() if p.requires_grad]
        opt = _RecordingOptimizer(params)
        stats = _update(loaded.model, None, opt, _Sched(), samples, sec, loaded, {}, None)
        return stats, opt.grads[0]

    full, g_full = run("dr_grpo", 64)
    assert full["loss"] == pytest.approx(-4 / 20, rel=1e-5)
    micro, g_micro = run("dr_grpo", 1)
    assert micro["loss"] == pytest.approx(-4 / 20, rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(g_full, g_micro))
    tok, _ = run("token_mean", 2)
    assert tok["loss"] == pytest.approx(-4 / 11, rel=1e-5)


def test_length_chunks_split_where_padding_outweighs_a_pass():
    from spiral_cli.rl.update import length_chunks

    # equal lengths: one micro-batch (up to the cap); another pass would only add its overhead
    assert [len(c) for c in length_chunks(list(range(8)), [50] * 8, micro=64)] == [8]
    assert sorted(len(c) for c in length_chunks(list(range(8)), [50] * 8, micro=3)) == [2, 3, 3]
    # 12 short and 40 long: padding the short ones to 146 costs 12 x 126 > the overhead of a pass
    lengths = [20] * 12 + [146] * 40
    chunks = length_chunks(list(range(52)), lengths, micro=64, overhead=256)
    assert chunks == [list(range(12)), list(range(12, 52))]
    # ... but not when a pass costs more than the padding it saves
    assert len(length_chunks(list(range(52)), lengths, micro=64, overhead=12 * 126 + 1)) == 1
    # every item once, in order, no batch over the cap, the padded tokens + overhead minimal
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(30):
        n, micro, overhead = rng.randint(1, 9), rng.randint(1, 5), rng.choice([0, 5, 40])
        ls = sorted(rng.randint(1, 60) for _ in range(n))
        got = length_chunks(list(range(n)), ls, micro, overhead)
        assert [i for c in got for i in c] == list(range(n)) and all(0 < len(c) <= micro for c in got)

        def cost(cuts, n=n, ls=ls, overhead=overhead):
            bounds = [0, *cuts, n]
            return sum((e - s) * ls[e - 1] + overhead for s, e in zip(bounds, bounds[1:]))
        best = min(cost(cuts) for k in range(n) for cuts in itertools.combinations(range(1, n), k)
                   if all(e - s <= micro for s, e in zip([0, *cuts], [*cuts, n])))
        assert cost(list(itertools.accumulate(len(c) for c in got))[:-1]) == best
    assert length_chunks([], [], micro=4) == []


def test_update_gradient_does_not_depend_on_the_length_split(monkeypatch):
    """Micro-batches split by length (length_chunks) give the single batch's gradient."""
    from spiral_cli.models import load_model
    from spiral_cli.recipe import ModelSection, TrainSetSection
    from spiral_cli.rl import update
    from spiral_cli.rl.rollout import Sample

    loaded = load_model(ModelSection(name="scratch:nano", autocast="off", max_seq_len=64), seed=0)
    samples = [Sample(f"q{i}:", list(range(40, 40 + n)), [0.0] * n, a, 0.0, "search", 30)
               for i, (n, a) in enumerate([(2, 1.0), (25, -0.5), (3, 0.5), (27, 1.0), (1, -1.0), (26, 0.25)])]

    class _Sched:
        def step(self):
            pass

    def grads(overhead):
        monkeypatch.setattr(update, "MICRO_BATCH_OVERHEAD_TOKENS", overhead)
        seen = []
        real = update.length_chunks
        monkeypatch.setattr(update, "length_chunks", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
        opt = _RecordingOptimizer([p for p in loaded.model.parameters() if p.requires_grad])
        sec = TrainSetSection(micro_batch_size=64, max_grad_norm=1e9)
        stats = update._update(loaded.model, None, opt, _Sched(), samples, sec, loaded, {}, None)
        return stats, opt.grads[0], [len(c) for c in seen[0]]

    whole, g_whole, n_whole = grads(10_000)
    split, g_split, n_split = grads(30)
    assert n_whole == [6] and n_split == [3, 3]  # short ones apart from long ones
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(g_whole, g_split))


def test_prefix_chunks_share_prompts_where_it_computes_fewer_tokens():
    from spiral_cli.rl.rollout import Sample
    from spiral_cli.rl.update import prefix_chunks

    def sample(prompt, n):
        return Sample(prompt, [7] * n, [0.0] * n, 1.0, 1.0, "search", 64)

    # prompt p (20 tokens) x 4 with short completions, prompt q (3 tokens) once with 30; overhead 10:
    #   all five shared: 2 prompts x 20 + 5 x 30 + 2 x 10 = 210; all five plain: 5 x 33 + 10 = 175;
    #   p's four shared (1 x 20 + 4 x 6 + 20 = 64) + q plain (33 + 10 = 43) = 107, the least
    samples = [sample("p", 6), sample("q", 30), sample("p", 5), sample("p", 6), sample("p", 5)]
    got = prefix_chunks(samples, [20, 3, 20, 20, 20], micro=64, overhead=10)
    assert [([len(s.completion_ids) for s in c], shared) for c, shared in got] == [([5, 5, 6, 6], True), ([30], False)]
    # distinct prompts only: nothing to share
    assert [shared for _, shared in prefix_chunks([sample("a", 3), sample("b", 4)], [9, 9], micro=8)] == [False]
    # long and short prompts mixed, nothing shared: cut in order of completion length the best
    # split computes 956 tokens; one row per sample cut by whole length (length_chunks) 772, kept
    mixed = [sample("a", 10), sample("b", 11), sample("c", 12), sample("d", 13)]
    got = prefix_chunks(mixed, [100, 5, 100, 5], micro=2, overhead=256)
    assert [([s.prompt for s in c], shared) for c, shared in got] == [(["b", "d"], False), (["a", "c"], False)]
    # ... and in order of whole length a repeated long prompt still shares: [b, c] plain 2 x 5 + 5,
    # [a, a] shared 30 + 2 x 3 + 2 x 5: 61 (in order of completion length at best 92)
    mixed = [sample("a", 1), sample("b", 2), sample("a", 3), sample("c", 4)]
    got = prefix_chunks(mixed, [30, 1, 30, 1], micro=2, overhead=5)
    assert [([s.prompt for s in c], shared) for c, shared in got] == [(["b", "c"], False), (["a", "a"], True)]
    assert prefix_chunks([], [], micro=4) == []
    # every sample once, no batch over the cap, the least cost over every split and layout
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(40):
        n, micro, overhead = rng.randint(1, 8), rng.randint(1, 5), rng.choice([0, 5, 40])
        plen = {p: rng.randint(1, 30) for p in "abc"}
        samples = [sample(rng.choice("abc"), rng.randint(0, 20)) for _ in range(n)]
        got = prefix_chunks(samples, [plen[s.prompt] for s in samples], micro, overhead)
        flat = [s for c, _ in got for s in c]
        assert sorted(map(id, flat)) == sorted(map(id, samples)) and all(0 < len(c) <= micro for c, _ in got)

        def cost(chunk, shared, overhead=overhead, plen=plen):
            if shared:
                return len({s.prompt for s in chunk}) * max(plen[s.prompt] for s in chunk) + \
                    len(chunk) * max(len(s.completion_ids) for s in chunk) + 2 * overhead
            return len(chunk) * max(plen[s.prompt] + len(s.completion_ids) for s in chunk) + overhead

        def best_layout(chunk):
            repeats = len({s.prompt for s in chunk}) < len(chunk) and max(len(s.completion_ids) for s in chunk) > 0
            return min(cost(chunk, False), cost(chunk, True) if repeats else float("inf"))
        for c, shared in got:
            assert cost(c, shared) == best_layout(c)
        def least(order, layout, n=n, micro=micro):  # the cheapest split of `order` into runs of at most `micro`
            return min(sum(layout(order[s:e]) for s, e in zip([0, *cuts], [*cuts, n]))
                       for k in range(n) for cuts in itertools.combinations(range(1, n), k)
                       if all(e - s <= micro for s, e in zip([0, *cuts], [*cuts, n])))
        by_completion = sorted(samples, key=lambda s: (len(s.completion_ids), s.prompt))
        by_total = sorted(samples, key=lambda s: plen[s.prompt] + len(s.completion_ids))
        best = min(least(by_completion, best_layout), least(by_total, best_layout))
        assert sum(cost(c, shared) for c, shared in got) == best


@pytest.mark.parametrize("beta,passes,corrected", [(0.0, 1, False), (0.05, 2, True)])
def test_update_with_shared_prefixes_gives_the_plain_loss_and_gradient(monkeypatch, beta, passes, corrected):
    """train_set.shared_prefix: micro-batches that repeat prompts run each prompt once, and the
    update's loss, statistics and gradients are the one-pass layout's (float32, to rounding), with
    a KL reference model, two passes (the behaviour log-probs computed first, without gradients)
    and the sampler correction's weights and metrics alike."""
    import copy

    from spiral_cli.models import load_model
    from spiral_cli.recipe import ModelSection, TrainSetSection
    from spiral_cli.rl import update
    from spiral_cli.rl.rollout import Sample

    loaded = load_model(ModelSection(name="scratch:nano", autocast="off", max_seq_len=64), seed=0)
    ref = copy.deepcopy(loaded.model).eval() if beta else None
    prompts = ["problem 0:", "a longer problem 1 of the batch:", "problem 22 here:"]  # three prompt lengths
    samples = [Sample(prompts[i % 3], list(range(40, 40 + n)), [-0.1 * (j % 3) - 0.2 for j in range(n)], a, 0.0,
                      "search", 30)
               for i, (n, a) in enumerate([(2, 1.0), (12, -0.5), (3, 0.5), (9, 1.0), (1, -1.0), (11, 0.25),
                                           (4, 0.0), (7, -0.75), (5, 1.5)])]
    correction = update.SamplerCorrection(apply=True, cap=2.0, temperature=1.0) if corrected else None

    class _Sched:
        def step(self):
            pass

    monkeypatch.setattr(update, "MICRO_BATCH_OVERHEAD_TOKENS", 0)  # tiny rows: else a second pass never pays
    layouts = []
    real = update.build_batch
    monkeypatch.setattr(update, "build_batch", lambda *a, **k: layouts.append(a[-1]) or real(*a, **k))

    def run(shared):
        layouts.clear()
        opt = _RecordingOptimizer([p for p in loaded.model.parameters() if p.requires_grad])
        sec = TrainSetSection(micro_batch_size=4, max_grad_norm=1e9, beta=beta)
        stats = update._update(loaded.model, ref, opt, _Sched(), samples, sec, loaded, {}, None,
                               passes=passes, correction=correction, shared_prefix=shared)
        return stats, opt.grads, list(layouts)

    plain, g_plain, l_plain = run(False)  # (the recording optimizer leaves the weights as they are)
    shared, g_shared, l_shared = run(True)
    assert not any(l_plain) and any(l_shared)  # the shared layout ran
    assert set(plain) == set(shared)
    for k in plain:
        assert shared[k] == pytest.approx(plain[k], rel=1e-5, abs=1e-6), k
    assert len(g_plain) == len(g_shared) == passes
    for step_plain, step_shared in zip(g_plain, g_shared):
        for a, b in zip(step_plain, step_shared):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)


def test_shared_prefix_applies_where_the_model_can_take_it():
    """On where asked for and possible; elsewhere off with one line naming why, and off silently
    when not asked for."""
    from rich.console import Console

    from spiral_cli.models import load_model
    from spiral_cli.recipe import ModelSection, TrainSetSection
    from spiral_cli.rl.update import shared_prefix_applies

    loaded = load_model(ModelSection(name="scratch:nano", autocast="off", max_seq_len=64), for_training=True, seed=0)

    def check(sec=None, accelerator=None, fsdp=False):
        console = Console(record=True, width=300)
        on = shared_prefix_applies(sec or TrainSetSection(), loaded, accelerator, fsdp, console)
        return on, console.export_text().strip()

    assert check() == (True, "")
    assert check(TrainSetSection(shared_prefix=False)) == (False, "")
    on, note = check(accelerator=object())
    assert not on and note.startswith("note: shared_prefix is off: a single process only")
    assert check(fsdp=True)[0] is False
    impl = loaded.model.config._attn_implementation
    loaded.model.config._attn_implementation = "flash_attention_2"
    try:
        assert check() == (False, "note: shared_prefix is off: attention 'flash_attention_2' takes no boolean 4-D mask (sdpa does)")
    finally:
        loaded.model.config._attn_implementation = impl
    types = loaded.model.config.layer_types
    loaded.model.config.layer_types = ["sliding_attention"] + list(types[1:])
    try:
        assert check() == (False, "note: shared_prefix is off: the model has sliding-window or chunked attention layers")
    finally:
        loaded.model.config.layer_types = types
    # Mistral's form: a `sliding_window` and no layer types, which transformers reads as sliding layers
    window = loaded.model.config.sliding_window
    loaded.model.config.layer_types, loaded.model.config.sliding_window = None, 16
    try:
        assert check() == (False, "note: shared_prefix is off: the model has sliding-window or chunked attention layers")
    finally:
        loaded.model.config.layer_types, loaded.model.config.sliding_window = types, window
    loaded.model.gradient_checkpointing_enable()
    try:
        assert check() == (False, "note: shared_prefix is off: gradient checkpointing keeps no key/value cache")
    finally:
        loaded.model.gradient_checkpointing_disable()
    assert check() == (True, "")


@pytest.mark.slow
def test_compiled_update_trains_like_the_plain_one(tmp_path):
    """train_set.compile: the policy's forward is compiled at the first update (a one-line
    fallback where it cannot be); two SPIRAL steps give the plain run's weights, and a second
    compiled run gives the first one's bit for bit (the compiled CPU update runs under
    deterministic algorithms, and the mode is left as it was found)."""
    runs = {}
    for flag in ("false", "true", "true-again"):
        home = tmp_path / f"home-{flag}"
        result = train(tmp_path, home, ["train_set.steps=2", f"train_set.compile={flag.split('-')[0]}"])
        assert result["steps"] == 2
        runs[flag] = weights(Path(result["path"]))
        assert not torch.are_deterministic_algorithms_enabled()
    for k, v in runs["false"].items():
        torch.testing.assert_close(runs["true"][k], v, atol=2e-4, rtol=1e-3)
        assert torch.equal(runs["true-again"][k], runs["true"][k]), k


def test_eta_counts_steps_or_the_token_budget():
    """The step line's ETA: steps left at this process's pace, or fewer when the token budget
    will end the run first."""
    import time as _time

    from spiral_cli.progress import fmt_duration
    from spiral_cli.rl.trainer import RunState, _eta

    assert [fmt_duration(s) for s in (0, 42.4, 187, 3900, None, float("inf"))] == ["0s", "42s", "3m07s", "1h05m", "?", "?"]
    start = (_time.perf_counter() - 100.0, 0, 0)  # 10 steps took 100 s, 1,000 tokens each
    state = RunState(step=10, generated_tokens=10_000)
    assert _eta(state, 40, None, start) in ("5m00s", "5m01s")  # 30 steps left
    assert _eta(state, 40, 15_000, start) in ("50s", "51s")  # the budget ends it after 5 more
    assert _eta(RunState(step=0), 40, None, (_time.perf_counter(), 0, 0)) == "?"
