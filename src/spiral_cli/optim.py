"""What the training loops (sft, train-set, train-agg) share to run fast: the optimizer, and an
optionally compiled forward.

Measured on the 2-core CPU with scratch:tiny, 16 sequences of 84 tokens per step (bf16
autocast, `bench/sft_step.py`, figures in bench/README.md): 131 ms per step with the for-each
AdamW and torch's CPU flash attention; 117 ms with the fused AdamW; 96 ms with the matmul
attention for training (models/cpu_attention.py); 68 ms with `torch.compile`, after a one-off compile of ~60 s.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from rich.console import Console

from spiral_cli import first_line


def adamw(params: list[torch.nn.Parameter], *, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step where torch has one for these parameters
    (CPU and CUDA floating-point tensors): the for-each version cost 14 ms of a 131 ms SFT step."""
    fusable = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fusable or None)


def compile_for_training(loaded, console: Console, loss_of: Callable[[Callable[..., Any]], torch.Tensor]) -> Callable[..., Any]:
    """`torch.compile(model)` for the training forward, compiled now on a real batch (forward and
    backward) so that a machine where it cannot run (no C compiler, an unsupported model) falls
    back to the plain model with a one-line warning instead of failing mid-run. `loss_of(forward)`
    runs a real batch through `forward` as the loop will call it (the same calls compile the same
    graphs) and returns a scalar to backpropagate. The warm-up's gradients are discarded. Returns
    the callable to use in place of `loaded.model`."""
    model = loaded.model
    t0 = time.time()
    try:
        # dynamic: batches come in many widths; one graph serves them all without recompiling
        compiled = torch.compile(model, dynamic=True)
        with loaded.autocast_ctx():
            loss = loss_of(compiled)
        loss.backward()
    except Exception as e:  # noqa: BLE001 - any compiler failure: train uncompiled instead
        first = first_line(e, 200)
        console.print(f"  [yellow]warning:[/] torch.compile failed ({type(e).__name__}: {first}); training uncompiled")
        compiled = model
    finally:
        model.zero_grad(set_to_none=True)
    if compiled is not model:
        console.print(f"  compiled the training forward in {time.time() - t0:.0f}s")
    return compiled


def resolve_full_determinism(setting: bool | str, device_type: str) -> bool:
    """`sft.full_determinism`: "auto" is on for the CPU (bit-identical reruns at no measured cost,
    bench/README.md) and off on CUDA, where deterministic kernels cost more (transformers' default)."""
    return device_type == "cpu" if setting == "auto" else bool(setting)


@contextmanager
def full_determinism(enabled: bool) -> Iterator[None]:
    """`torch.use_deterministic_algorithms` for a block, the previous mode restored after.

    Why on the CPU: a compiled training step accumulates the embedding's gradient with parallel
    atomic adds, whose order changes from run to run, so two compiled runs of one recipe drifted
    apart (docs/results.md, 2026-12-04); in this mode inductor lowers that scatter to torch's
    serial kernel and the runs repeat bit for bit. The compiled graph depends on the mode, so the
    compile and every step it serves must run inside the block. On CUDA cuBLAS also needs
    CUBLAS_WORKSPACE_CONFIG before its first use (set here when unset, as transformers'
    `enable_full_determinism` does); ops without a deterministic kernel warn instead of failing."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
