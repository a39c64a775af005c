"""FSDP training (rl/fsdp.py, docs/scaling.md#fsdp) under 2-process torchrun on CPU (gloo), on
scratch:nano: 2 train-set steps sharded with FSDP2, the sampler on transformers' forward (so every
decoding step goes through FSDP's hooks) and checked to all-gather nothing, in the rollouts and in
rank 0's evaluation alike; identical gathered
weights on both ranks; a registered checkpoint plain transformers loads; a run SIGKILLed after the
step-1 checkpoint that resumes (triggered by the accelerate FSDP env this time) and ends at the
uninterrupted run's weights bit for bit; the same run under DDP ending at the same weights up to
float rounding; and the one-line refusals."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toy_task import toy_recipe

from spiral_cli.recipe import RecipeError, load_recipe
from spiral_cli.registry import Registry

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# The training pool's questions run 19, 20, ... (ToyTask's layout for seed 0): rank 0 draws 19-22
# and rank 1 23-26 first, so with 23-25 never right, rank 1 draws more rounds in step 1 than rank 0
RECIPE = toy_recipe(
    task={"no_signal": [23, 24, 25]},
    generation={"fast_decode": "off"},
    train_set={"steps": 2, "save_every": 1, "micro_batch_size": 16,
               "eval_problems": 4},  # rank 0 evaluates alone (at step 0 and the end), on unsharded weights
    infer=None,
)


def _torchrun(tmp: Path, name: str, port: int, overrides: list[str], env: dict[str, str] | None = None,
              expect_rc: int = 0) -> tuple[Path, list[dict]]:
    """One 2-process run of tests/fsdp_worker.py; its home and out dir are tmp/name (a rerun of the
    same name resumes). Returns the home and each rank's report."""
    recipe = tmp / "toy.yaml"
    recipe.write_text(RECIPE)
    home, out = tmp / name / "home", tmp / name / "out"
    out.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "SPIRAL_HOME": str(home), "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1", **(env or {})}
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         str(TESTS / "fsdp_worker.py"), str(recipe), str(out), *overrides],
        env=full_env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == expect_rc, p.stderr[-3000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)] if expect_rc == 0 else []
    return home, reports


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """The uninterrupted 2-step FSDP run the tests below compare with."""
    tmp = tmp_path_factory.mktemp("fsdp")
    home, reports = _torchrun(tmp, "fsdp", 29571, ["model.fsdp=true"])
    return tmp, home, reports


@pytest.mark.slow
def test_fsdp_two_processes_train_sharded_without_collectives_in_decoding(fsdp_run):
    tmp, home, (r0, r1) = fsdp_run
    assert r0["world"] == r1["world"] == 2 and r0["steps"] == r1["steps"] == 2
    assert r0["sharded"] and r1["sharded"]  # the parameters are DTensor shards
    assert r0["checksum"] == r1["checksum"]  # the gathered weights, identical on both ranks
    assert r0["gathers"] > 0 and r1["gathers"] > 0  # FSDP did all-gather (the counter works)...
    assert r0["gathers_in_generate"] == r1["gathers_in_generate"] == 0  # ...but never while sampling
    assert [e.step for e in Registry(home).ls("toy-set")] == [1, 2]  # registered once per save, by rank 0


@pytest.mark.slow
def test_dynamic_sampling_rounds_keep_the_ranks_on_one_cursor(fsdp_run):
    """Rank 1's first prompts lack signal, so in step 1 it draws more rounds than rank 0: the ranks
    still draw disjoint, consecutive questions, and step 2 starts where step 1 ended on both."""
    _, _, (r0, r1) = fsdp_run
    assert r0["drawn"][0][:4] == [19, 20, 21, 22] and r1["drawn"][0][:4] == [23, 24, 25, 26]
    assert len(r1["drawn"][0]) >= 7 > len(r0["drawn"][0])  # >= 3 more for its 3 prompts without signal
    every = [q for step in zip(r0["drawn"], r1["drawn"]) for rank in step for q in rank]
    assert sorted(every) == list(range(19, 19 + len(every)))  # no question twice, none skipped
    first_step = len(r0["drawn"][0]) + len(r1["drawn"][0])
    assert r0["drawn"][1][0] == 19 + first_step  # the old per-rank cursors diverged here


@pytest.mark.slow
def test_fsdp_checkpoint_loads_with_plain_transformers(fsdp_run):
    from transformers import AutoModelForCausalLM

    tmp, home, _ = fsdp_run
    path = Registry(home).resolve("toy-set@2").entry.path
    assert json.loads((path / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    plain = AutoModelForCausalLM.from_pretrained(str(path)).state_dict()
    gathered = torch.load(tmp / "fsdp" / "out" / "weights.pt")
    assert plain.keys() == gathered.keys()
    assert all(torch.equal(plain[k], gathered[k]) for k in gathered)
    state = torch.load(home / "runs" / "toy-set" / "state" / "trainer_state.pt", weights_only=True)
    assert state["fsdp"] is True and state["run"]["step"] == 2
    assert "model.embed_tokens.weight" in state["optimizer"]["state"]  # the full state, keyed by name


@pytest.mark.slow
def test_fsdp_resumes_after_kill_at_the_uninterrupted_weights(fsdp_run):
    """SIGKILL of every rank right after the step-1 checkpoint; the same command resumes at step 1
    (started this time by the accelerate FSDP config's env, no recipe field: both triggers agree)."""
    tmp, _, (r0, _) = fsdp_run
    env = {"ACCELERATE_USE_FSDP": "true"}
    home, _ = _torchrun(tmp, "killed", 29572, [], env={**env, "SPIRAL_TEST_KILL_AT": "1"}, expect_rc=1)
    assert [e.step for e in Registry(home).ls("toy-set")] == [1]
    home, (k0, k1) = _torchrun(tmp, "killed", 29573, [], env=env)
    assert k0["steps"] == k1["steps"] == 2 and k0["checksum"] == k1["checksum"]
    assert k0["checksum"] == r0["checksum"]  # bit for bit the uninterrupted run
    assert [e.step for e in Registry(home).ls("toy-set")] == [1, 2]
    rows = [json.loads(line) for line in (home / "runs" / "toy-set" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


@pytest.mark.slow
def test_fsdp_matches_ddp_on_the_same_data(fsdp_run):
    """The same two steps under DDP: FSDP's sharded update (reduce-scattered gradients, filler
    micro-batches where a rank has fewer, a sharded grad norm) is the same math up to rounding."""
    tmp, _, _ = fsdp_run
    _, (d0, _) = _torchrun(tmp, "ddp", 29574, [])
    assert not d0["sharded"]
    fsdp = torch.load(tmp / "fsdp" / "out" / "weights.pt")
    ddp = torch.load(tmp / "ddp" / "out" / "weights.pt")
    assert fsdp.keys() == ddp.keys()
    worst = max(float((fsdp[k] - ddp[k]).abs().max()) for k in fsdp)
    assert worst < 1e-5, worst


def _recipe(tmp_path: Path, *overrides: str):
    p = tmp_path / "toy.yaml"
    p.write_text(RECIPE)
    return load_recipe(p, ["model.fsdp=true", *overrides])


@pytest.mark.parametrize("overrides, message", [
    (["model.lora.r=4"], "model.fsdp: shards a full model; model.lora trains under DDP"),
    (["model.quantization=4bit"], "model.quantization=4bit is not supported under FSDP"),
    (["generation.backend=vllm", "generation.vllm.tensor_parallel_size=2"], "tensor_parallel_size=2 is not supported"),
    (["generation.backend=vllm_server", "generation.vllm.server.url=http://127.0.0.1:8000"],
     "backend=vllm_server is not supported under FSDP"),
])
def test_fsdp_refuses_what_it_does_not_train(tmp_path, overrides, message):
    from spiral_cli.rl.fsdp import check_recipe

    with pytest.raises(RecipeError, match=message) as e:
        check_recipe(_recipe(tmp_path, *overrides))
    assert "\n" not in str(e.value)


def test_fsdp_refuses_a_lora_checkpoint_and_a_switched_resume(tmp_path):
    from types import SimpleNamespace

    from spiral_cli.rl.fsdp import check_loaded
    from spiral_cli.rl.trainer import _check_saved_layout

    with pytest.raises(RecipeError, match="starting checkpoint x is a LoRA adapter"):
        check_loaded(_recipe(tmp_path), SimpleNamespace(is_lora=True, source="x"))
    _check_saved_layout({"run": {}}, False, tmp_path)  # a DDP state resumes under DDP
    _check_saved_layout({"fsdp": True}, True, tmp_path)
    with pytest.raises(RecipeError, match="saved under FSDP: resume it under FSDP"):
        _check_saved_layout({"fsdp": True}, False, tmp_path)
    with pytest.raises(RecipeError, match="saved without FSDP"):
        _check_saved_layout({"run": {}}, True, tmp_path)


def test_cli_refuses_fsdp_with_lora_in_one_line_exit_2(tmp_path):
    """The accelerate FSDP config's env with a LoRA recipe: one line, exit 2, before any model loads."""
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(RECIPE)
    env = {**os.environ, "SPIRAL_HOME": str(tmp_path / "home"), "PYTHONPATH": str(TESTS), "ACCELERATE_USE_FSDP": "true",
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "spiral_cli", "train-set", str(recipe), "--model", "scratch:nano",
                        "--set", "model.lora.r=4"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert "FSDP (accelerate config distributed_type: FSDP): shards a full model" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
