"""fp32 vs bf16 autocast for a scratch:tiny training step on this CPU (what `model.autocast: auto`
decides at load, shown with a larger batch).

    .venv/bin/python bench/autocast.py [--steps 12]

Each precision: a fresh model, batch 16 x 84 tokens, forward + backward + fused AdamW, median of
the steps after 2 warm-up steps, the two precisions run twice in alternation. Prints the CPU model
and the bf16-capable ISA extensions beside the figures. Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from spiral_cli.machine import cpu_isa, cpu_model
from spiral_cli.models import load_model, measure_cpu_autocast
from spiral_cli.optim import adamw
from spiral_cli.recipe import ModelSection


def step_ms(autocast: str, steps: int) -> float:
    loaded = load_model(ModelSection(name="scratch:tiny", autocast=autocast), source="scratch:tiny", for_training=True, seed=0)
    model = loaded.model
    opt = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    ids = torch.randint(3, 200, (16, 84), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :12] = -100
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        with loaded.autocast_ctx():
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    a = ap.parse_args()
    caps = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends.cpu, "get_cpu_capability") else "?"
    print(f"{cpu_model()} ({cpu_isa() or 'ISA unknown'}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"torch dispatch {caps}")
    rows = {"on": [], "off": []}
    for _ in range(2):
        for ac in ("off", "on"):
            rows[ac].append(step_ms(ac, a.steps))
    fp32, bf16 = min(rows["off"]), min(rows["on"])
    print(f"16 x 84 tokens: fp32 {fp32:.0f} ms, bf16 autocast {bf16:.0f} ms per step (ratio bf16/fp32 {bf16 / fp32:.2f})")
    loaded = load_model(ModelSection(name="scratch:tiny", autocast="off"), source="scratch:tiny", for_training=True, seed=0)
    print("what auto decides at load:", measure_cpu_autocast(loaded.model, for_training=True)[1])


if __name__ == "__main__":
    main()
