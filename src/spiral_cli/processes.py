"""One process or several (torchrun / accelerate launch): the accelerator, this process's rank,
sums over ranks, and the check that every rank sees the same SPIRAL_HOME. Both trainers use
these (`spiral sft` and `spiral train-set` / `train-agg` run data parallel the same way)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from spiral_cli.recipe import RecipeError


def make_accelerator(device: torch.device):
    """accelerate handles DDP (torchrun / accelerate launch); a single process runs without it.
    Under FSDP it only holds the process group: the model is never `prepare`d (accelerate 1.15
    drops its FSDP plugin on CPU), rl/fsdp.py shards it with torch's fully_shard."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=device.type == "cpu")


def rank_world(accelerator) -> tuple[int, int]:
    return (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)


def is_main(accelerator) -> bool:
    return accelerator is None or accelerator.is_main_process


def all_sum(values: list[float], accelerator) -> list[float]:
    """Element-wise sum over all ranks (the values themselves in a single process)."""
    if accelerator is None:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").tolist()


def check_shared_home(accelerator, resuming: bool, state_dir: Path) -> None:
    """Every rank reads the run's state and registry from SPIRAL_HOME; only rank 0 writes them. On
    several nodes the home must be one shared directory: ranks that disagree on resuming stop."""
    if accelerator is None:
        return
    found = int(all_sum([float(resuming)], accelerator)[0])
    if 0 < found < accelerator.num_processes:
        raise RecipeError(f"{found} of {accelerator.num_processes} processes find the run's saved state "
                          f"({state_dir}): SPIRAL_HOME must be a directory every node sees at the same path "
                          "(a shared filesystem), docs/scaling.md#multi-node")
