"""The names of the LoRA adapters a checkpoint may carry, one per role.

The search role uses peft's "default" adapter; a separate aggregator (aggregator.mode=adapter) is a
second adapter named "aggregator" on the same base, saved in `<ckpt>/aggregator/`. Both the model
loader and the generators need the names, so they live here, below both (docs/method.md).
"""
from __future__ import annotations

SEARCH_ADAPTER = "default"
AGGREGATOR_ADAPTER = "aggregator"
