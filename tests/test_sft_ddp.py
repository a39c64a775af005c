"""`spiral sft` data parallel under torchrun (2 CPU processes, gloo): the same model as one
process with grad_accum 2, one registry entry and one metrics line per step written by rank 0, a
run stopped by its time budget resumes to the uninterrupted run's weights, and a batch the ranks
cannot share equally is refused in one line."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"

RECIPE = """
name: dp
seed: 0
task: {name: countdown}
model: {name: "scratch:nano", max_seq_len: 128, autocast: "off"}
generation: {max_new_tokens: 8, agg_max_new_tokens: 8, batch_size: 16}
sft: {steps: 6, batch_size: 4, num_search_examples: 24, num_aggregate_examples: 8, aggregate_after: 0.5,
      eval_problems: 0, save_every: 2, log_every: 1, max_len: 128, warmup_steps: 1, lr: 3.0e-3}
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sft(tmp: Path, home: Path, overrides: list[str], processes: int) -> subprocess.CompletedProcess:
    recipe = tmp / "dp.yaml"
    recipe.write_text(RECIPE)
    sets = [a for o in overrides for a in ("--set", o)]
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
               str(_port()), str(TESTS / "cli_then_group_state.py")] if processes > 1 else [sys.executable, "-m", "spiral_cli"])
    env = {**os.environ, "SPIRAL_HOME": str(home), "OMP_NUM_THREADS": "1"}
    return subprocess.run(launch + ["sft", str(recipe), *sets], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)


def _weights(home: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(home / "checkpoints" / "dp-sft" / f"step-{step}" / "model.safetensors"))


def _worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft-ddp")
    p = _sft(tmp, tmp / "ddp", [], 2)
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp, p


@pytest.mark.slow
def test_two_processes_train_what_one_trains_with_grad_accum_2(ddp):
    tmp, p = ddp
    one = _sft(tmp, tmp / "one", ["sft.grad_accum=2"], 1)
    assert one.returncode == 0, one.stderr[-3000:]
    worst = _worst(_weights(tmp / "ddp", 6), _weights(tmp / "one", 6))
    assert worst < 1e-5, worst
    # rank 0 alone registers, logs and speaks; every rank prints its JSON line
    results = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{") and "group_left" not in line]
    assert sorted(r.get("rank", 0) for r in results) == [0, 1] and {r["step"] for r in results} == {6}
    rows = [json.loads(line) for line in (tmp / "ddp" / "runs" / "dp-sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    ones = [json.loads(line) for line in (tmp / "one" / "runs" / "dp-sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in ones]  # both ranks' tokens counted
    assert all(abs(a["loss"] - b["loss"]) < 1e-4 for a, b in zip(rows, ones))  # the batch's loss, not rank 0's half
    assert p.stderr.count("data parallel over 2 processes") == 1
    # every rank destroyed the process group before the interpreter's teardown
    assert [json.loads(line) for line in p.stdout.splitlines() if "group_left" in line] == [{"group_left": False}] * 2


@pytest.mark.slow
def test_a_run_stopped_by_its_time_budget_resumes_to_the_same_weights(ddp):
    tmp, _ = ddp
    home = tmp / "stopped"
    first = _sft(tmp, home, ["sft.time_budget_minutes=0.0001"], 2)  # stops (loudly) after step 1, on both ranks
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped the run at step 1 of 6" in first.stderr
    rest = _sft(tmp, home, ["sft.time_budget_minutes=60"], 2)
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert "resumed from" in rest.stderr
    assert _worst(_weights(home, 6), _weights(tmp / "ddp", 6)) < 1e-6


@pytest.mark.slow
def test_a_batch_the_ranks_cannot_share_is_refused(tmp_path):
    p = _sft(tmp_path, tmp_path / "home", ["sft.batch_size=3"], 2)
    assert p.returncode != 0
    errors = {line for line in p.stderr.splitlines() if line.startswith("error:")}
    assert errors == {"error: sft.batch_size=3 must be a multiple of processes x sft.grad_accum (2 x 1): each rank "
                      "trains an equal share of every batch"}, p.stderr[-3000:]
    assert not (tmp_path / "home" / "checkpoints").exists()


@pytest.mark.slow
def test_a_failed_evaluation_on_rank_0_stops_every_rank_at_once(tmp_path):
    """Rank 0 evaluates alone after training; here it cannot build its generator. Rank 1 must not
    wait in a collective for the process group's 30-minute timeout: it stops with rank 0's reason."""
    closed = _port()  # nothing listens there
    p = _sft(tmp_path, tmp_path / "home", ["sft.eval_problems=2", "generation.backend=vllm_server",
                                           f"generation.vllm.server.url=http://127.0.0.1:{closed}",
                                           "generation.vllm.server.retries=0"], 2)
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, p.stderr[-3000:]
    own = next(e for e in errors if "rank 0 failed" not in e)
    assert own.startswith("error: generation.backend=vllm_server: ")
    assert any(e.startswith("error: rank 0 failed, so rank 1 stops too: ") and own[len("error: "):] in e
               for e in errors), errors
    assert not (tmp_path / "home" / "checkpoints" / "dp-sft").exists() or not any(
        (tmp_path / "home" / "checkpoints" / "dp-sft").glob("step-6"))  # not registered
