"""Training attention on the CPU: SDPA vs the matmul form, by sequence length (why
models/cpu_attention.py's MATMUL_ATTENTION_MAX_LEN is 192).

    .venv/bin/python bench/train_attention.py

scratch:tiny, bf16 autocast, left-padded batches with an attention mask as RL's scoring builds
them; forward + backward of the logits, median of 5 after one warm-up. Run it alone.
"""
from __future__ import annotations

import statistics
import time

import torch

from spiral_cli.models import cpu_attention as models
from spiral_cli.models import load_model
from spiral_cli.recipe import ModelSection


def sdpa(query, key, value, attention_mask, scaling, causal):
    """`_matmul_attention`'s signature over torch's SDPA: what training used before it."""
    groups = query.shape[1] // key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling, is_causal=causal, enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous()


def main() -> None:
    loaded = load_model(ModelSection(name="scratch:tiny", autocast="auto"), source="scratch:tiny", for_training=True, seed=0)
    model = loaded.model
    matmul = models._matmul_attention
    models.MATMUL_ATTENTION_MAX_LEN = 1 << 30  # let the swapped-in function decide alone
    for batch, length in [(64, 128), (64, 256), (64, 512), (16, 512)]:
        ids = torch.randint(3, 200, (batch, length))
        mask = torch.ones(batch, length, dtype=torch.long)
        for row in range(batch):
            mask[row, : (row * 7) % 40] = 0  # left padding of 0..39 tokens
        cells = []
        for name, fn in (("sdpa", sdpa), ("matmul", matmul)):
            models._matmul_attention = fn

            def step() -> float:
                t0 = time.perf_counter()
                with loaded.autocast_ctx():
                    logits = model(input_ids=ids, attention_mask=mask).logits  # noqa: B023 - timed in this iteration
                logits.float().logsumexp(-1).mean().backward()
                model.zero_grad(set_to_none=True)
                return time.perf_counter() - t0

            step()
            cells.append(f"{name} {statistics.median(step() for _ in range(5)) * 1000:.0f} ms")
        print(f"batch {batch} x {length} tokens: " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
