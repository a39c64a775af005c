"""One process or several (torchrun / accelerate launch): the accelerator, this process's rank,
sums over ranks, and the check that every rank sees the same SPIRAL_HOME. Both trainers use
these (`spiral sft` and `spiral train-set` / `train-agg` run data parallel the same way)."""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


def make_accelerator(device: torch.device):
    """accelerate handles DDP (torchrun / accelerate launch); a single process runs without it.
    Under FSDP it only holds the process group: the model is never `prepare`d (accelerate 1.15
    drops its FSDP plugin on CPU), rl/fsdp.py shards it with torch's fully_shard."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=device.type == "cpu")


def end_processes(accelerator) -> None:
    """After a run that every rank finished: destroy the process group (`Accelerator.end_training`).
    Left to the interpreter's teardown, its destructor now and then aborted a finished run (SIGABRT,
    'terminate called without an active exception'). Destroyed while one of gloo's worker threads
    still frees the last collective's tensors, it deadlocks instead: the destructor joins that
    thread holding the GIL, which the thread needs to free them (both seen in CI-like runs on CPU,
    torch 2.13). So the ranks meet first, and a short sleep hands the GIL to those threads."""
    import torch.distributed as dist

    if accelerator is None or not dist.is_initialized():  # a colocated vLLM engine's shutdown destroys it
        return
    accelerator.wait_for_everyone()
    time.sleep(0.05)
    accelerator.end_training()


def rank_world(accelerator) -> tuple[int, int]:
    return (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)


def is_main(accelerator) -> bool:
    return accelerator is None or accelerator.is_main_process


def all_sum(values: list[float], accelerator) -> list[float]:
    """Element-wise sum over all ranks (the values themselves in a single process)."""
    if accelerator is None:
        return list(values)
    import torch  # here: the CLI imports this module (OtherRankFailed) and must start fast

    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").tolist()


def check_shared_home(accelerator, resuming: bool, state_dir: Path) -> None:
    """Every rank reads the run's state and registry from SPIRAL_HOME; only rank 0 writes them. On
    several nodes the home must be one shared directory: ranks that disagree on resuming stop."""
    from spiral_cli.recipe import RecipeError

    if accelerator is None:
        return
    found = int(all_sum([float(resuming)], accelerator)[0])
    if 0 < found < accelerator.num_processes:
        raise RecipeError(f"{found} of {accelerator.num_processes} processes find the run's saved state "
                          f"({state_dir}): SPIRAL_HOME must be a directory every node sees at the same path "
                          "(a shared filesystem), docs/scaling.md#multi-node")


class OtherRankFailed(RuntimeError):
    """Rank 0 failed in work the other ranks were waiting for (evaluation, a checkpoint write)."""


def share_failure(accelerator, failure: BaseException | None) -> None:
    """After work rank 0 did alone: every rank learns whether it failed. Rank 0 re-raises its own
    error; the others stop with its reason at once, instead of waiting in their next collective
    until the process group times out (30 min). A collective itself: every rank must call it."""
    if accelerator is None:
        if failure is not None:
            raise failure
        return
    from accelerate.utils import broadcast_object_list

    reason = [None if failure is None else (" ".join(str(failure).split()) or type(failure).__name__)]
    broadcast_object_list(reason, from_process=0)
    if failure is not None:
        raise failure
    if reason[0] is not None:
        raise OtherRankFailed(f"rank 0 failed, so rank {accelerator.process_index} stops too: {reason[0]}")


def run_on_main(accelerator, work: Callable[[], T]) -> T | None:
    """`work()` on rank 0 while the other ranks wait for it (None there); a failure stops every rank."""
    result, failure = None, None
    if is_main(accelerator):
        try:
            result = work()
        except BaseException as e:  # noqa: BLE001 - shared, then re-raised as it was
            failure = e
    share_failure(accelerator, failure)
    return result
