"""A separate aggregator as a second LoRA adapter on the policy's base (the paper's two-model form).

The search role uses peft's "default" adapter and the aggregation role an adapter named
``aggregator`` on the same base weights: two policies for the memory of one. Checkpoints carry
it the way peft saves several adapters (``<ckpt>/aggregator/adapter_config.json`` next to the
default adapter), so `PeftModel.from_pretrained(base, ckpt)` gives the search policy and
`.load_adapter(ckpt + "/aggregator", "aggregator")` the aggregator, without spiral.
"""
from __future__ import annotations

import contextlib
import copy

from spiral_cli.adapters import AGGREGATOR_ADAPTER, SEARCH_ADAPTER
from spiral_cli.generation.base import Completion


def has_aggregator_adapter(model) -> bool:
    return AGGREGATOR_ADAPTER in (getattr(model, "peft_config", None) or {})


def add_aggregator_adapter(model) -> None:
    """Add the aggregator adapter as a copy of the default one (both roles start from the
    same warm start), both trainable."""
    import torch

    model.add_adapter(AGGREGATOR_ADAPTER, copy.deepcopy(model.peft_config[SEARCH_ADAPTER]))
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, p in params.items():
            if f".{AGGREGATOR_ADAPTER}." in name:
                p.copy_(params[name.replace(f".{AGGREGATOR_ADAPTER}.", f".{SEARCH_ADAPTER}.")])
    model.set_adapter(SEARCH_ADAPTER)
    model.set_requires_grad([SEARCH_ADAPTER, AGGREGATOR_ADAPTER], requires_grad=True)


@contextlib.contextmanager
def adapter_active(model, name: str):
    """`name` active inside the block; the previous adapter and every requires_grad flag after."""
    previous = model.active_adapter
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(previous)
        for p, flag in flags:
            p.requires_grad_(flag)


class AdapterGenerator:
    """Generates with `adapter` active on a peft model, then restores the previous adapter."""

    def __init__(self, inner, model, adapter: str = AGGREGATOR_ADAPTER):
        self.inner = inner
        self.model = model
        self.adapter = adapter

    def generate(self, prompts, **kw) -> list[list[Completion]]:
        with adapter_active(self.model, self.adapter):
            return self.inner.generate(prompts, **kw)

    def update_weights(self, model) -> None:
        self.inner.update_weights(model)


def attach_aggregator(loaded, generator) -> None:
    """When the model has an aggregator adapter, give `generator` an `aggregation_view` that
    samples with it; `for_aggregation` then routes the aggregation role there."""
    if not has_aggregator_adapter(loaded.model):
        return
    adapter_view = getattr(generator, "adapter_view", None)
    if callable(adapter_view):  # an engine holding the adapters itself (vLLM): its aggregator adapter
        # samples, and the in-memory model switches too (log-probs re-scored with top-k/top-p)
        generator.aggregation_view = AdapterGenerator(adapter_view(AGGREGATOR_ADAPTER), loaded.model)
        return
    if not hasattr(generator, "loaded"):  # e.g. a vLLM server: no adapter switch of its own
        raise ValueError("a model with an aggregator adapter needs generation.backend=hf or vllm")
    generator.aggregation_view = AdapterGenerator(generator, loaded.model)


def attach_aggregator_model(generator, aggregator) -> None:
    """A separate aggregator model (the two-model form, full weights): `aggregator`, a generator
    of its own, plays the aggregation role for `generator`."""
    generator.aggregation_view = aggregator


def for_aggregation(generator):
    """The generator that plays the aggregation role: the aggregator adapter's view when there
    is one, else the generator itself (one policy plays both roles, the paper's setting)."""
    return getattr(generator, "aggregation_view", None) or generator
