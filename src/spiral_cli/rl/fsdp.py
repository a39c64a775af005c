"""FSDP2 training of a full model (`model.fsdp: true`, or an accelerate FSDP config), on torch's own
`fully_shard` and `torch.distributed.checkpoint.state_dict` (docs/scaling.md#fsdp).

Each decoder layer and then the whole model are sharded over the processes; every forward of the
policy is then a collective (each layer's weights are all-gathered from the ranks' shards, each
backward reduce-scatters the gradients). Three places of the RL loop need more than sharding:

- sampling and evaluation: each rank samples its own prompts and stops when its own sequences
  end, and rank 0 evaluates alone, so the ranks would run different numbers of forwards and hang.
  They sample from unsharded weights (`full_weights`): every FSDP module is `unshard()`ed (one
  all-gather per module, on every rank in the same order) with reshard-after-forward off, so
  FSDP2's pre-forward hook finds its parameters unsharded and gathers nothing (`unshard` returns
  at once when `is_unsharded`, `FSDPParamGroup.reshard` returns in forward when
  reshard-after-forward is off: torch 2.13, _fsdp_param_group.py); `reshard()` frees them after.
- the update: every rank runs the same number of micro-batches (`micro_batch_target`), the
  missing ones zero-weight fillers (`filler_loss`), so each all-gather and reduce-scatter has all
  ranks and the gradient is the unsharded one (FSDP2 averages the ranks' gradients, as DDP does).
- checkpoints: every rank takes part in gathering the full model and optimizer state
  (full_state_dict + cpu_offload: only rank 0 receives the tensors), rank 0 writes a plain
  transformers directory from them; a resumed run loads those full weights on every rank, shards
  them again, and scatters the full optimizer state back into shards (`load_optimizer_state`).
"""
from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from spiral_cli.recipe import Recipe, RecipeError

FSDP_ENV = "ACCELERATE_USE_FSDP"  # set by `accelerate launch` with distributed_type: FSDP


def fsdp_requested(recipe: Recipe) -> bool:
    return recipe.model.fsdp or os.environ.get(FSDP_ENV, "false").lower() in ("true", "1")


def _where(recipe: Recipe) -> str:
    return "model.fsdp" if recipe.model.fsdp else "FSDP (accelerate config distributed_type: FSDP)"


def check_recipe(recipe: Recipe, frozen_roles: bool = False) -> None:
    """What FSDP does not train, refused in one line before any model is loaded."""
    where, gen = _where(recipe), recipe.generation
    ddp = "launch without it for DDP (torchrun, or accelerate launch without the FSDP config)"
    if recipe.model.lora is not None:
        raise RecipeError(f"{where}: shards a full model; model.lora trains under DDP: {ddp}, docs/scaling.md#fsdp")
    if recipe.model.quantization != "none":
        raise RecipeError(f"{where}: model.quantization={recipe.model.quantization} is not supported under FSDP "
                          f"(a quantized model is trained with LoRA, under DDP): {ddp}")
    if gen.backend == "vllm" and gen.vllm.tensor_parallel_size > 1:
        raise RecipeError(f"{where}: generation.vllm.tensor_parallel_size={gen.vllm.tensor_parallel_size} is not "
                          "supported under FSDP; use 1 (one engine per rank, synced from the gathered weights)")
    if gen.backend == "vllm_server":
        raise RecipeError(f"{where}: generation.backend=vllm_server is not supported under FSDP "
                          "(full-weight sync to a server from sharded weights is not built); use hf or vllm")


def check_loaded(recipe: Recipe, loaded) -> None:
    if loaded.is_lora:
        raise RecipeError(f"{_where(recipe)}: the starting checkpoint {loaded.source} is a LoRA adapter; FSDP trains "
                          "full models (LoRA trains under DDP), docs/scaling.md#fsdp")


# ---------------------------------------------------------------- sharding


def shard(model: torch.nn.Module, device: torch.device) -> None:
    """fully_shard each decoder layer (the classes transformers never splits, as accelerate's
    TRANSFORMER_BASED_WRAP), then the root: embeddings, final norm and (tied) head in one group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def full_weights(model: torch.nn.Module) -> Iterator[None]:
    """Every rank: the policy's parameters unsharded for the block (its forwards run no collective),
    resharded after. Entered by all ranks at the same point (the unshards are all-gathers)."""
    modules = _fsdp_modules(model)
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
    for m in modules:
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
        for m in modules:  # FSDP's own choice: layers reshard after forward, the root does not
            m.set_reshard_after_forward(m is not model, recurse=False)


# ---------------------------------------------------------------- the update


def micro_batch_target(count: int, device: torch.device) -> int:
    """The number of micro-batches every rank runs: the largest count of any rank, at least one
    (a step with nothing to learn still steps the optimizer on zero gradients, as without FSDP)."""
    import torch.distributed as dist

    t = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return max(1, int(t.item()))


def filler_loss(model, loaded) -> torch.Tensor:
    """A zero-weight micro-batch: one forward through every layer (its all-gathers) whose loss is
    0 x the logits, so its backward reduce-scatters zero gradients with the other ranks'."""
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    ids = torch.full((1, 2), int(pad), dtype=torch.long, device=loaded.device)
    return model(input_ids=ids, use_cache=False).logits.float().sum() * 0.0


def grad_norm_value(norm: torch.Tensor) -> float:
    """clip_grad_norm_ over sharded (DTensor) gradients returns a DTensor: its full value."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if callable(full) else norm)


# ---------------------------------------------------------------- checkpoints


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def gathered_model(loaded) -> Any:
    """Every rank: gather the full weights; rank 0 gets a LoadedModel holding them in a plain
    (unsharded) transformers model, which saves as any checkpoint; the others get None."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(loaded.model, options=_options(cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    return dataclasses.replace(loaded, model=_plain_model(loaded.model, full))


def _plain_model(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The model's own transformers class (fully_shard made it a subclass), built on the meta
    device and given the gathered tensors: no second allocation, and `architectures` in the saved
    config names the real class."""
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(model).__mro__ if issubclass(c, torch.nn.Module) and not issubclass(c, FSDPModule))
    with torch.device("meta"):
        plain = cls(copy.deepcopy(model.config))
    missing, unexpected = plain.load_state_dict(full, strict=False, assign=True)
    if unexpected or any(not _tied(plain, k) for k in missing):
        raise RuntimeError(f"gathered state dict does not fit {cls.__name__}: missing {missing}, unexpected {unexpected}")
    if missing:
        plain.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def _tied(model, key: str) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False)) and key.endswith("lm_head.weight")


def optimizer_state(model, optimizer) -> dict[str, Any]:
    """Every rank: the full optimizer state, keyed by parameter name (rank 0 receives it)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict[str, Any]) -> None:
    """Every rank, with the full saved state: each keeps its own shards of it."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=_options())
