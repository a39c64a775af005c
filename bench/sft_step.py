"""SFT step time of scratch:tiny on this machine, one speed path added at a time.

    .venv/bin/python bench/sft_step.py [--batch 16] [--lengths 40,84,250] [--steps 20] [--configs 4,5]

Each configuration: a fresh model, a batch of `--batch` random sequences per length, bf16
autocast as the countdown recipe runs it, forward + backward + clip + AdamW step. Prints the
median step time and tokens/s per length after warm-up steps, and the one-off compile time.
Run it alone: on 2 cores anything beside it skews the figures.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from rich.console import Console
from train_attention import sdpa  # bench/ is on the path when run as a script

from spiral_cli.models import load_model
from spiral_cli.optim import adamw, compile_for_training, full_determinism
from spiral_cli.recipe import ModelSection

CONFIGS = [
    ("for-each AdamW, SDPA attention", dict(fused=False, use_sdpa=True, compiled=False)),
    ("fused AdamW, SDPA attention", dict(fused=True, use_sdpa=True, compiled=False)),
    ("fused AdamW, matmul attention up to 192 tokens (default)", dict(fused=True, use_sdpa=False, compiled=False)),
    ("+ torch.compile (sft.compile)", dict(fused=True, use_sdpa=False, compiled=True)),
    ("+ deterministic algorithms (sft.full_determinism)", dict(fused=True, use_sdpa=False, compiled=True, deterministic=True)),
]


def batch(size: int, length: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 200, (size, length), generator=torch.Generator().manual_seed(length))
    labels = ids.clone()
    labels[:, :12] = -100  # a prompt
    return {"input_ids": ids, "labels": labels}


def run(name: str, fused: bool, use_sdpa: bool, compiled: bool, args, deterministic: bool = False) -> None:
    with full_determinism(deterministic):  # the compile and the timed steps alike
        _run(name, fused, use_sdpa, compiled, args)


def _run(name: str, fused: bool, use_sdpa: bool, compiled: bool, args) -> None:
    from spiral_cli.models import cpu_attention as models

    loaded = load_model(ModelSection(name="scratch:tiny", autocast="auto"), source="scratch:tiny", for_training=True, seed=0)
    model = loaded.model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0) if fused else \
        torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), foreach=True)
    lengths = [int(x) for x in args.lengths.split(",")]
    forward, compile_s = model, None
    if compiled:
        t0 = time.time()
        sample = batch(args.batch, lengths[0])
        forward = compile_for_training(loaded, Console(stderr=True), lambda f: f(**sample).loss)
        compile_s = time.time() - t0
    # the SDPA path is what the model used for training before the matmul attention
    grad_ctx = (lambda: contextlib.nullcontext()) if not use_sdpa else (lambda: _sdpa_for_training(models))
    cells = []
    for length in lengths:
        b = batch(args.batch, length)

        def step() -> float:
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with grad_ctx(), loaded.autocast_ctx():
                loss = forward(**b).loss  # noqa: B023 - step() runs within this iteration
            loss.backward()
            loss.item()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            return time.perf_counter() - t0

        for _ in range(3):
            step()  # warm-up (and, compiled, a recompile when the size crosses a guard)
        t = statistics.median(step() for _ in range(args.steps))
        cells.append(f"L={length}: {t * 1000:.0f} ms, {args.batch * length / t:,.0f} tok/s")
    extra = f" (compile {compile_s:.0f}s)" if compile_s is not None else ""
    print(f"{name}{extra}: " + "; ".join(cells), flush=True)


@contextlib.contextmanager
def _sdpa_for_training(models):
    saved = models._matmul_attention
    models._matmul_attention = sdpa
    try:
        yield
    finally:
        models._matmul_attention = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lengths", default="40,84,250")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--configs", default=None, help="which configurations, 1-based (e.g. 4,5); default all")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    chosen = [int(i) for i in args.configs.split(",")] if args.configs else range(1, len(CONFIGS) + 1)
    for i in chosen:
        name, kw = CONFIGS[i - 1]
        run(name, args=args, **kw)


if __name__ == "__main__":
    main()
