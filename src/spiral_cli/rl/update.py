"""The optimizer update of one RL step: micro-batches split by length, the policy-gradient loss
(rl/loss.py) accumulated over them, the KL reference, the sampler-mismatch correction, and the
optional compiled forward."""
from __future__ import annotations

import inspect
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from rich.console import Console

from spiral_cli.generation.roles import adapter_active
from spiral_cli.models.cpu_attention import CPU_ATTENTION
from spiral_cli.recipe import Recipe
from spiral_cli.rl.fsdp import filler_loss, grad_norm_value, micro_batch_target
from spiral_cli.rl.logprobs import (
    TokenBatch,
    TokenLogprobs,
    _prompt_ids,
    build_batch,
    sampler_logprobs,
    token_logprobs,
)
from spiral_cli.rl.loss import policy_loss, sampler_mismatch_metrics, truncated_importance_weight
from spiral_cli.rl.rollout import Sample


@dataclass(frozen=True)
class SamplerCorrection:
    """The sampler-mismatch correction of one run (docs/method.md, "Sampler mismatch")."""

    apply: bool  # weight the loss (vllm_importance_sampling_correction); else measure only
    cap: float  # vllm_importance_sampling_cap
    temperature: float  # generation.temperature: the sampler's log-probs are at it


def sampler_correction(recipe: Recipe, sec) -> SamplerCorrection:
    return SamplerCorrection(apply=sec.vllm_importance_sampling_correction, cap=sec.vllm_importance_sampling_cap,
                             temperature=recipe.generation.temperature)


class _CompiledForward:
    """The policy's training forward under torch.compile, compiled at the first update on its
    first batch (RL has no batch before its first rollout); see optim.compile_for_training."""

    def __init__(self, loaded, console: Console):
        self.loaded, self.console, self.forward = loaded, console, None
        self.shared_prefix_ok = True  # False where only the shared-prefix layout failed to compile

    def warm_up(self, samples: list[Sample], shared_prefix: bool, prompt_cache) -> None:
        """Compile now, through every layout the update will run (`_warm_up_batches`), so that a
        graph that cannot compile falls back at once instead of failing mid-run. Where only the
        shared-prefix layout fails, the run keeps the compiled one-row layout and shares nothing."""
        from spiral_cli.optim import compile_for_training

        one_row, shared = _warm_up_batches(samples, shared_prefix, self.loaded, prompt_cache)

        def through(batches: list[TokenBatch]):
            return lambda forward: sum(token_logprobs(forward, b).logp.mean() for b in batches)
        if shared:
            self.forward = compile_for_training(self.loaded, self.console, through([one_row, *shared]))
            if self.forward is not self.loaded.model:
                return
        self.forward = compile_for_training(self.loaded, self.console, through([one_row]))
        if shared and self.forward is not self.loaded.model:
            self.shared_prefix_ok = False
            self.console.print("  [yellow]note:[/] shared_prefix is off for this run: its layout did not compile")

    def __call__(self, batch: TokenBatch):
        return self.forward


def _warm_up_batches(samples: list[Sample], shared_prefix: bool, loaded,
                     prompt_cache) -> tuple[TokenBatch, list[TokenBatch]]:
    """Small batches in each layout the update may lay a micro-batch out in: one row per sample,
    and with shared prefixes, shared over two prompts (of different lengths where there are) and
    over one. torch.compile specialises a dimension of size 1, so each has two or more rows,
    completions of two or more tokens where there are, and one distinct prompt is a graph of its own."""
    def batch(rows: list[Sample], shared: bool) -> TokenBatch:
        return build_batch(rows, loaded.tokenizer, loaded.device, prompt_cache, shared)
    longer = [s for s in samples if len(s.completion_ids) >= 2] or samples
    one_row = batch(longer[:4], False)
    if not shared_prefix:
        return one_row, []
    by_prompt: dict[str, list[Sample]] = {}
    for s in longer:
        by_prompt.setdefault(s.prompt, []).append(s)
    repeated = [rows[:2] for rows in by_prompt.values() if len(rows) >= 2]
    if not repeated:
        return one_row, []
    length = lambda rows: len(_prompt_ids(rows[0].prompt, loaded.tokenizer, prompt_cache))  # noqa: E731
    other = next((r for r in repeated[1:] if length(r) != length(repeated[0])), repeated[1] if len(repeated) > 1 else None)
    shared = [batch(repeated[0] + other, True)] if other else []
    return one_row, shared + [batch(repeated[0], True)]


def _compile_applies(sec, accelerator, adapter_roles, console: Console) -> bool:
    if not sec.compile:
        return False
    if accelerator is not None or adapter_roles:
        console.print("  [yellow]note:[/] compile is for a single process with one adapter; training uncompiled")
        return False
    return True


def shared_prefix_applies(sec, loaded, accelerator, fsdp: bool, console: Console) -> bool:
    """Whether this run lays micro-batches out with shared prefixes (train_set.shared_prefix):
    asked for, and the model can take it (`_shared_prefix_blocker`); a one-line note when not."""
    if not sec.shared_prefix:
        return False
    why = _shared_prefix_blocker(loaded.model, accelerator, fsdp)
    if why:
        console.print(f"  [yellow]note:[/] shared_prefix is off: {why}")
    return why is None


def _shared_prefix_blocker(model, accelerator, fsdp: bool) -> str | None:
    """Why the shared-prefix forward cannot run on this model, or None. It needs a key/value
    cache that keeps its autograd graph (none under gradient checkpointing), a boolean 4-D mask
    used as given (sdpa and spiral's CPU attention; flash attention takes none, eager would add
    it as 0/1), full attention in every layer, positions from `position_ids` alone (not ALiBi's
    mask, nor RoPE rescaled by the pass's longest position), and transformers'
    `past_key_values`/`logits_to_keep`."""
    if accelerator is not None or fsdp:
        return "a single process only (DDP and FSDP expect one forward pass per backward)"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    if cfg is None:
        return "not a transformers model"
    if getattr(base, "is_gradient_checkpointing", False):
        return "gradient checkpointing keeps no key/value cache"
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in ("sdpa", CPU_ATTENTION):
        return f"attention {impl!r} takes no boolean 4-D mask (sdpa does)"
    try:  # the text model's config, and the cache layers transformers builds for it
        from transformers.cache_utils import get_layer_types_and_kwargs

        text = cfg.get_text_config(decoder=True)
        layer_types = get_layer_types_and_kwargs(text)[0]  # Mistral's `sliding_window` alone: sliding layers
        alibi = getattr(text, "alibi", False) or getattr(text, "model_type", "") in ("bloom", "mpt")
        rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    except Exception:  # noqa: BLE001 - a config transformers cannot read this way (e.g. per-layer attributes)
        return "its attention layers are unknown"
    if any(t != "full_attention" for t in layer_types):
        return "the model has sliding-window or chunked attention layers"
    if alibi:
        return "ALiBi positions come from the 2-D padding mask"
    ropes = [rope, *(v for v in rope.values() if isinstance(v, dict))] if isinstance(rope, dict) else []
    kinds = [str(r.get("rope_type", r.get("type", ""))) for r in ropes]  # nested: per layer type
    if any("dynamic" in k or k == "longrope" for k in kinds):  # as transformers' dynamic_rope_update reads them
        return "its RoPE frequencies follow the longest position of each forward pass"
    if not {"past_key_values", "logits_to_keep"} <= set(inspect.signature(base.forward).parameters):
        return "the model's forward takes no past_key_values/logits_to_keep"
    return None


def _update(model, ref_model, optimizer, scheduler, samples: list[Sample], sec, loaded, prompt_cache, accelerator,
            adapter_roles: dict[str, str] | None = None, compiled: _CompiledForward | None = None,
            passes: int = 1, correction: SamplerCorrection | None = None, fsdp: bool = False,
            shared_prefix: bool = False) -> dict[str, float | None]:
    """`passes` (train_set.updates_per_batch) passes over the samples, each one optimizer step of micro-batches.
    The normaliser is the whole batch's token count (token_mean), sequence count (seq_mean) or
    sum of sequence budgets (dr_grpo), so accumulating micro-batches gives exactly the
    full-batch gradient.
    `adapter_roles` (aggregator.mode=adapter) maps each role to the LoRA adapter it trains;
    micro-batches then hold one role each.
    `correction`: measure the sampler mismatch on the trained tokens (the `sampling/...` stats)
    and, when it applies, weight each token's loss by the truncated importance weight; None = neither.
    `fsdp` (model sharded by rl/fsdp.py): every rank runs the same number of micro-batches, the
    missing ones zero-weight fillers, each backward reduce-scattering (no no_sync).
    `shared_prefix` (train_set.shared_prefix, where `shared_prefix_applies`): a micro-batch whose
    rows repeat prompts runs each distinct prompt's forward once (logprobs.build_batch)."""
    # Zero-advantage sequences contribute no policy gradient; with beta = 0 they can be skipped.
    # They still count in the normaliser so the loss scale does not depend on the skipping.
    beta = sec.beta
    active = samples if beta > 0 else [s for s in samples if s.advantage != 0.0]
    if sec.loss_aggregation == "token_mean":
        normalizer = sum(len(s.completion_ids) for s in samples)
    elif sec.loss_aggregation == "seq_mean":
        normalizer = len(samples)
    else:  # dr_grpo: sequences x max_completion_length, each sequence at the budget it was sampled
        # under (search and aggregation budgets may differ); constant in the lengths sampled
        normalizer = sum(s.max_new_tokens for s in samples)
    # entropy_search stays None (JSON null) when no search token was trained (train-agg)
    stats: dict[str, float | None] = {"loss": 0.0, "clip_frac": 0.0, "entropy_search": None, "grad_norm": 0.0}

    micro = sec.micro_batch_size
    # Sort by length so micro-batches carry little padding (and by role when roles have adapters).
    groups: list[tuple[str | None, list[Sample]]] = [(None, active)]
    if adapter_roles:
        groups = [(adapter_roles[role], [s for s in active if s.role == role]) for role in sorted(adapter_roles)]
    if compiled is not None and compiled.forward is None and active:  # (compile runs with one adapter only)
        compiled.warm_up(active, shared_prefix, prompt_cache)
    shared_prefix = shared_prefix and (compiled is None or compiled.shared_prefix_ok)
    chunks: list[tuple[str | None, list[Sample], bool]] = []  # (adapter, samples, shared-prefix layout)
    for adapter, group in groups:
        prompt_lengths = [len(_prompt_ids(s.prompt, loaded.tokenizer, prompt_cache)) for s in group]
        if shared_prefix:
            chunks += [(adapter, c, shared) for c, shared in prefix_chunks(group, prompt_lengths, micro)]
            continue
        lengths = [p + len(s.completion_ids) for p, s in zip(prompt_lengths, group)]
        order = sorted(range(len(group)), key=lengths.__getitem__)
        chunks += [(adapter, c, False) for c in length_chunks([group[i] for i in order], [lengths[i] for i in order], micro)]

    def role_adapter(adapter: str | None):
        return adapter_active(getattr(model, "module", model), adapter) if adapter else nullcontext()

    # DDP reduces the gradients in the last micro-batch's backward and waits for every trainable
    # parameter's; with one adapter per role that micro-batch trains one adapter, so the others
    # join it with zero gradients (what they accumulated under no_sync is reduced with it)
    trainable = [p for p in model.parameters() if p.requires_grad] if accelerator is not None and adapter_roles else []

    temperature = correction.temperature if correction else None
    # under FSDP each forward is a collective: every rank runs `target` micro-batches
    fillers = micro_batch_target(len(chunks), loaded.device) - len(chunks) if fsdp else 0
    old_logps: list[TokenLogprobs] | None = None
    if passes > 1 and (chunks or fillers):  # the behaviour policy's log-probs, fixed across passes
        old_logps = []
        for adapter, chunk, shared in chunks:
            with torch.no_grad(), loaded.autocast_ctx(), role_adapter(adapter):
                batch = build_batch(chunk, loaded.tokenizer, loaded.device, prompt_cache, shared)
                old_logps.append(token_logprobs(model, batch, temperature=temperature))
        for _ in range(fillers):
            with torch.no_grad(), loaded.autocast_ctx():
                filler_loss(model, loaded)
    ent_sum = ent_count = 0.0
    mismatch: list[tuple[torch.Tensor, torch.Tensor]] = []  # (trainer, sampler) log-probs of trained tokens
    for pass_index in range(passes):
        optimizer.zero_grad(set_to_none=True)
        if not chunks and not fsdp:  # nothing to learn from in this batch; keep DDP ranks in step anyway
            _zero_backward(model, accelerator)
        for ci, (adapter, chunk, shared) in enumerate(chunks):
            batch = build_batch(chunk, loaded.tokenizer, loaded.device, prompt_cache, shared)
            sync_ctx = (accelerator.no_sync(model) if accelerator is not None and ci < len(chunks) - 1 and not fsdp
                        else nullcontext())
            with sync_ctx, role_adapter(adapter):
                with loaded.autocast_ctx():
                    out = token_logprobs(compiled(batch) if compiled else model, batch, with_entropy=True,
                                         temperature=temperature if old_logps is None else None)
                    logp, ent = out.logp, out.entropy
                    logp_ref = None
                    if ref_model is not None:
                        with torch.no_grad():
                            logp_ref = _ref_logprobs(model, ref_model, batch)
                old = old_logps[ci] if old_logps is not None else out
                weight = None
                if correction is not None:  # π_old against the sampler, once per batch (docs/method.md)
                    weight = _sampler_weight(correction, old.logp_sampling, chunk, batch,
                                             mismatch if pass_index == 0 else None)
                loss, st = policy_loss(
                    logp, old.logp.detach(), batch.advantages, batch.completion_mask.float(), loss_type=sec.loss_type,
                    epsilon_low=sec.epsilon_low, epsilon_high=sec.epsilon_high, aggregation=sec.loss_aggregation,
                    logp_ref=logp_ref, beta=beta, normalizer=float(normalizer), importance_sampling_ratio=weight,
                )
                if trainable and ci == len(chunks) - 1:
                    for p in trainable:  # the role's adapter switch turned the others off; restored on exit
                        p.requires_grad_(True)
                    loss = loss + sum((p * 0).sum() for p in trainable)
                (accelerator.backward(loss) if accelerator is not None and not fsdp else loss.backward())
            stats["loss"] += float(loss.detach())
            stats["clip_frac"] += float(st.get("clip_fraction", 0.0)) * len(chunk) / max(1, len(active))
            search_rows = torch.tensor([r == "search" for r in batch.roles], device=ent.device)
            m = batch.completion_mask & search_rows.unsqueeze(1)
            ent_sum += float((ent * m).sum())
            ent_count += float(m.sum())
        for _ in range(fillers):
            with loaded.autocast_ctx():
                filler_loss(model, loaded).backward()
        params = [p for p in model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, sec.max_grad_norm)
        stats["grad_norm"] = grad_norm_value(norm) if fsdp else float(norm)
        optimizer.step()
        scheduler.step()
    if ent_count:
        stats["entropy_search"] = ent_sum / ent_count
    if mismatch:
        trainer, sampler = (torch.cat(t) for t in zip(*mismatch))
        stats.update(sampler_mismatch_metrics(trainer, sampler, correction.cap))
    stats["trained_sequences"] = float(len(active))
    stats["lr"] = float(optimizer.param_groups[0]["lr"])
    return stats


# What one more micro-batch costs beyond its tokens (a forward and backward pass's fixed overhead),
# in padded tokens: ~20 ms for scratch:tiny on one CPU core, where a token costs ~0.2 ms.
MICRO_BATCH_OVERHEAD_TOKENS = 256


def length_chunks(items: list, lengths: list[int], micro: int, overhead: int | None = None) -> list[list]:
    """Split `items`, sorted by `lengths` (ascending), into consecutive micro-batches of at most
    `micro` rows that minimise the padded tokens (rows x longest length, each batch) plus
    `overhead` per batch (default MICRO_BATCH_OVERHEAD_TOKENS): a batch of a few long and many short sequences is split where the
    padding saved is worth another forward pass. The gradient does not depend on the split (the
    loss's normaliser is the whole batch's), only the padding computed does."""
    overhead = MICRO_BATCH_OVERHEAD_TOKENS if overhead is None else overhead
    n = len(items)
    cost = [0.0] + [math.inf] * n  # cost[e]: the cheapest split of items[:e]
    start = [0] * (n + 1)  # ... and where its last micro-batch starts
    for e in range(1, n + 1):
        for s in range(max(0, e - micro), e):
            c = cost[s] + (e - s) * lengths[e - 1] + overhead
            if c < cost[e]:
                cost[e], start[e] = c, s
    return [items[s:e] for s, e in _split_runs(start)]


def _split_runs(start: list[int]) -> list[tuple[int, int]]:
    """The micro-batches of a split found by `length_chunks`' dynamic program, as (start, end)
    ranges in order: `start[e]` is where the last micro-batch of the first e items starts."""
    runs, e = [], len(start) - 1
    while e > 0:
        runs.append((start[e], e))
        e = start[e]
    return runs[::-1]


def prefix_chunks(samples: list[Sample], prompt_lengths: list[int], micro: int,
                  overhead: int | None = None) -> list[tuple[list[Sample], bool]]:
    """`length_chunks` for the shared-prefix layout: micro-batches of at most `micro` rows, each
    with whether to lay it out with its distinct prompts run once (where some prompt repeats and
    that computes fewer padded tokens). The split minimises the padded tokens computed: a shared
    micro-batch costs its distinct prompts x the longest prompt plus its rows x the longest
    completion, and two forward passes' `overhead`; a plain one its rows x the longest prompt +
    completion, and one. Rows run in order of completion length or of whole length, whichever
    splits cheaper (where long and short prompts mix, the second; with no prompt repeated it is
    `length_chunks`' split)."""
    overhead = MICRO_BATCH_OVERHEAD_TOKENS if overhead is None else overhead
    orders = (sorted(range(len(samples)), key=lambda i: (len(samples[i].completion_ids), samples[i].prompt)),
              sorted(range(len(samples)), key=lambda i: (prompt_lengths[i] + len(samples[i].completion_ids),
                                                         samples[i].prompt)))
    splits = [_cheapest_layout_split([samples[i] for i in order], [prompt_lengths[i] for i in order], micro, overhead)
              for order in orders]
    return min(splits, key=lambda split: split[0])[1]


def _cheapest_layout_split(items: list[Sample], plen: list[int], micro: int,
                           overhead: int) -> tuple[float, list[tuple[list[Sample], bool]]]:
    """The cheapest split of `items`, in this order, into runs of at most `micro` rows, each laid
    out plain or shared (`prefix_chunks`' costs); with its cost."""
    clen = [len(s.completion_ids) for s in items]
    n = len(items)
    cost = [0.0] + [math.inf] * n  # cost[e]: the cheapest split of items[:e]
    start, shared_at = [0] * (n + 1), [False] * (n + 1)
    for e in range(1, n + 1):
        seen: set[str] = set()
        longest_prompt = longest_completion = longest_row = 0
        for s in range(e - 1, max(0, e - micro) - 1, -1):  # the micro-batch items[s:e], grown leftwards
            seen.add(items[s].prompt)
            longest_prompt = max(longest_prompt, plen[s])
            longest_completion = max(longest_completion, clen[s])
            longest_row = max(longest_row, plen[s] + clen[s])
            rows = e - s
            plain = cost[s] + rows * longest_row + overhead
            shared = cost[s] + len(seen) * longest_prompt + rows * longest_completion + 2 * overhead \
                if len(seen) < rows and longest_completion > 0 else math.inf
            if min(plain, shared) < cost[e]:
                cost[e], start[e], shared_at[e] = min(plain, shared), s, shared < plain
    return cost[n], [(items[s:e], shared_at[e]) for s, e in _split_runs(start)]


def _sampler_weight(correction: SamplerCorrection, logp_old: torch.Tensor, chunk: list[Sample], batch: TokenBatch,
                   record: list | None) -> torch.Tensor | None:
    """The truncated importance weight of a micro-batch (None when the correction only measures);
    the trained tokens' (trainer, sampler) log-probs are appended to `record` for the step's stats."""
    sampler = sampler_logprobs(chunk, batch)
    mask = batch.completion_mask
    if record is not None:
        record.append((logp_old[mask], sampler[mask]))
    if not correction.apply:
        return None
    return truncated_importance_weight(logp_old, sampler, correction.cap, mask)


def _ref_logprobs(model, ref_model, batch: TokenBatch) -> torch.Tensor:
    if ref_model == "adapter-disabled":
        inner = getattr(model, "module", model)
        with inner.disable_adapter():
            return token_logprobs(inner, batch)[0]
    return token_logprobs(ref_model, batch)[0]


def _zero_backward(model, accelerator) -> None:
    loss = sum((p * 0).sum() for p in model.parameters() if p.requires_grad)
    accelerator.backward(loss) if accelerator is not None else loss.backward()
