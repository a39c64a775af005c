"""What the training loops (sft, train-set, train-agg) share to run fast: the optimizer, and an
optionally compiled forward.

Measured on the 2-core CPU with scratch:tiny, 16 sequences of 84 tokens per step (bf16
autocast, `bench/sft_step.py`, figures in bench/README.md): 131 ms per step with the for-each
AdamW and torch's CPU flash attention; 117 ms with the fused AdamW; 96 ms with the matmul
attention for training (models/cpu_attention.py); 68 ms with `torch.compile`, after a one-off compile of ~60 s.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console


def adamw(params: list[torch.nn.Parameter], *, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step where torch has one for these parameters
    (CPU and CUDA floating-point tensors): the for-each version cost 14 ms of a 131 ms SFT step."""
    fusable = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fusable or None)


def compile_for_training(loaded, sample: dict[str, torch.Tensor], console: Console,
                         loss_of: Callable[[Any], torch.Tensor] = lambda out: out.loss) -> Callable[..., Any]:
    """`torch.compile(model)` for the training forward, compiled now on a real batch (forward and
    backward) so that a machine where it cannot run (no C compiler, an unsupported model) falls
    back to the plain model with a one-line warning instead of failing mid-run. `sample` holds the
    keyword arguments the loop will call the model with (the same call compiles the same graph),
    `loss_of` turns the output into a scalar to backpropagate. The sample's gradients are
    discarded. Returns the callable to use in place of `loaded.model`."""
    model = loaded.model
    t0 = time.time()
    try:
        # dynamic: batches come in many widths; one graph serves them all without recompiling
        compiled = torch.compile(model, dynamic=True)
        with loaded.autocast_ctx():
            loss = loss_of(compiled(**sample))
        loss.backward()
    except Exception as e:  # noqa: BLE001 - any compiler failure: train uncompiled instead
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        console.print(f"  [yellow]warning:[/] torch.compile failed ({type(e).__name__}: {first}); training uncompiled")
        compiled = model
    finally:
        model.zero_grad(set_to_none=True)
    if compiled is not model:
        console.print(f"  compiled the training forward in {time.time() - t0:.0f}s")
    return compiled
