"""Several nodes and FSDP (issue 16, items 3-4): a 2-"node" torchrun on localhost trains with
identical weights on both ranks; `accelerate launch` with the FSDP config trains sharded on CPU
(FSDP itself: tests/test_fsdp.py)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_trainer import REPO, TESTS, recipe_file

from spiral_cli import processes
from spiral_cli.recipe import RecipeError
from spiral_cli.registry import Registry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(home: Path) -> dict[str, str]:
    return {**os.environ, "SPIRAL_HOME": str(home), "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_two_node_torchrun_on_localhost_ends_with_identical_weights(tmp_path):
    """Two torchrun agents, one process each (`--nnodes 2 --node_rank 0/1`), meeting at a c10d
    rendezvous on 127.0.0.1: what two machines do, with SPIRAL_HOME a directory both see."""
    pytest.importorskip("accelerate")
    home = tmp_path / "home"
    recipe = recipe_file(tmp_path)
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
         "--rdzv_id", "spiral-test", str(TESTS / "ddp_worker.py"), str(recipe), str(tmp_path), "2"],
        env=env_for(home), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) for node in (0, 1)]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    sums = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sums[0]["world"] == sums[1]["world"] == 2
    assert sums[0]["checksum"] == sums[1]["checksum"]
    assert sums[0]["changed"]
    assert [e.step for e in Registry(home).ls("toy-set")] == [2]  # written once, by rank 0


def test_fsdp_config_parses_as_fsdp2_with_full_state_dict():
    pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(REPO / "recipes" / "accelerate" / "fsdp.yaml"))
    assert str(cfg.distributed_type) in ("FSDP", "DistributedType.FSDP")
    assert cfg.fsdp_config["fsdp_version"] == 2
    assert cfg.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_fsdp_env_is_no_longer_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # spiral shards the model itself (rl/fsdp.py)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert processes.make_accelerator(torch.device("cpu")) is None  # one process


class FakeAccelerator:
    num_processes = 2
    device = torch.device("cpu")

    def __init__(self, others_resuming: bool):
        self.others = float(others_resuming)

    def reduce(self, t, reduction):
        return t + self.others


def test_ranks_that_disagree_on_resuming_stop(tmp_path):
    processes.check_shared_home(FakeAccelerator(True), True, tmp_path)  # all resume
    processes.check_shared_home(FakeAccelerator(False), False, tmp_path)  # all start afresh
    with pytest.raises(RecipeError, match="1 of 2 processes find the run's saved state.*shared filesystem"):
        processes.check_shared_home(FakeAccelerator(False), True, tmp_path)


@pytest.mark.slow
def test_accelerate_launch_with_the_fsdp_config_trains_sharded_on_cpu(tmp_path):
    """The documented command, on 2 CPU processes: accelerate would drop its FSDP plugin on a CPU;
    spiral shards the model itself, one step, registered once."""
    pytest.importorskip("accelerate")
    home = tmp_path / "home"
    out = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "recipes/accelerate/fsdp.yaml"),
         "--main_process_port", str(free_port()),
         "-m", "spiral_cli", "train-set", str(recipe_file(tmp_path)), "--model", "scratch:nano",
         "--set", "train_set.steps=1"],
        env=env_for(home), cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 process(es) sharded (FSDP)" in out.stderr + out.stdout
    assert [e.step for e in Registry(home).ls("toy-set")] == [1]
