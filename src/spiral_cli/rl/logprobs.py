"""Log-probabilities of sampled tokens: the token batch a micro-batch of samples becomes, the
policy's log-prob (and entropy) of each of its tokens, and the sampler's, laid out alike."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from spiral_cli.models import encode_prompts
from spiral_cli.rl.rollout import Sample


@dataclass
class PromptBlock:
    """The distinct prompts of a micro-batch laid out with a shared prefix: each prompt's forward
    pass runs once and its keys/values serve every row that continues it (`build_batch`)."""

    ids: torch.Tensor  # [U, P] the distinct prompts, right-padded
    lengths: torch.Tensor  # [U] their token counts
    of_row: torch.Tensor  # [B] the prompt each row continues


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # [B, L] prompt + completion, right-padded; with `prompts`, the completions alone
    attention_mask: torch.Tensor  # [B, L] 1 = a real token of input_ids (the forward needs none: right padding)
    # True where a logit position predicts a completion token: [B, L-1], position t predicting
    # token t+1; with `prompts` [B, L], position t predicting completion token t
    completion_mask: torch.Tensor
    advantages: torch.Tensor  # [B]
    roles: list[str]
    prompts: PromptBlock | None = None  # the shared-prefix layout (train_set.shared_prefix)

    @property
    def targets(self) -> torch.Tensor:
        """The token each logit position predicts, laid out like `completion_mask`."""
        return self.input_ids if self.prompts is not None else self.input_ids[:, 1:]


def _prompt_ids(prompt: str, tokenizer, prompt_cache: dict[str, list[int]]) -> list[int]:
    p = prompt_cache.get(prompt)
    if p is None:  # encoded exactly as the generator encoded it
        p = prompt_cache[prompt] = encode_prompts(tokenizer, [prompt])[0]
    return p


def _right_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[len(rows), longest] token ids padded on the right, and the mask of the real tokens."""
    width = max(len(x) for x in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, x in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return ids, mask


def build_batch(samples: list[Sample], tokenizer, device: torch.device, prompt_cache: dict[str, list[int]],
                shared_prefix: bool = False) -> TokenBatch:
    """The token batch of a micro-batch of samples. `shared_prefix`: the distinct prompts in a
    `PromptBlock` and the completions alone in `input_ids` (`token_logprobs` then runs each
    prompt once, however many rows continue it); else each row holds its prompt and completion."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    adv = torch.tensor([s.advantage for s in samples], dtype=torch.float32).to(device)
    roles = [s.role for s in samples]
    prompts = [_prompt_ids(s.prompt, tokenizer, prompt_cache) for s in samples]
    if shared_prefix:
        index: dict[tuple[int, ...], int] = {}
        of_row = [index.setdefault(tuple(p), len(index)) for p in prompts]
        prompt_ids, _ = _right_padded([list(p) for p in index], pad)
        lengths = torch.tensor([len(p) for p in index], dtype=torch.long)
        ids, attn = _right_padded([list(s.completion_ids) for s in samples], pad)
        block = PromptBlock(prompt_ids.to(device), lengths.to(device), torch.tensor(of_row, dtype=torch.long).to(device))
        attn = attn.to(device)
        return TokenBatch(ids.to(device), attn, attn.bool(), adv, roles, block)
    ids, attn = _right_padded([p + list(s.completion_ids) for p, s in zip(prompts, samples)], pad)
    cmask = torch.zeros((len(samples), ids.shape[1] - 1), dtype=torch.bool)
    for i, (p, s) in enumerate(zip(prompts, samples)):
        cmask[i, len(p) - 1 : len(p) + len(s.completion_ids) - 1] = True  # logits at t predict token t+1
    return TokenBatch(ids.to(device), attn.to(device), cmask.to(device), adv, roles)


class TokenLogprobs(NamedTuple):
    logp: torch.Tensor  # [B, L-1] float32, at temperature 1: what the policy gradient trains
    entropy: torch.Tensor | None  # [B, L-1] detached, with_entropy only
    logp_sampling: torch.Tensor | None  # [B, L-1] detached, at the sampling temperature (given one)


# Logit elements processed at a time (256 MB in float32): a hub model's [B, L, V] logits in float32
# (B 64, L 1024, V 152k: ~40 GB) are never made whole, only chunks of rows this size.
LOGPROB_CHUNK_ELEMENTS = 1 << 26


def token_logprobs(model, batch: TokenBatch, with_entropy: bool = False,
                   temperature: float | None = None) -> TokenLogprobs:
    """log p(token_{t+1} | prefix) for every position, laid out like `batch.completion_mask`
    (float32), optionally the entropy of the next-token distribution, and with `temperature` the
    log-probs under log_softmax(logits / T): the generators' convention (generation/base.py;
    T = 0 means T = 1), so the sampler-mismatch weight compares like with like (docs/method.md).

    The batch is right-padded, so under causal attention no real token sees a pad: the padding
    mask changes nothing for the positions that count and is left out (the maskless attention
    kernel is several times faster on the CPU). A shared-prefix batch's completions do need one
    (their prompts' padding lies between them and their prompts: `_shared_prefix_logits`)."""
    if batch.prompts is not None:
        first, rest = _shared_prefix_logits(model, batch)
        a = selective_logprobs(first, batch.targets[:, :1], with_entropy, temperature)
        b = selective_logprobs(rest, batch.targets[:, 1:], with_entropy, temperature)
        return TokenLogprobs(*(None if x is None else torch.cat([x, y], dim=1) for x, y in zip(a, b)))
    logits = model(input_ids=batch.input_ids).logits[:, :-1]
    return selective_logprobs(logits, batch.targets, with_entropy, temperature)


def _shared_prefix_logits(model, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of a shared-prefix batch in two forward passes: the distinct prompts once (their
    keys/values cached, with their autograd graph), then every row's completion over its prompt's
    cached keys/values, its positions continuing the prompt's. The same function of the weights as
    the one-pass layout, so the same log-probs and gradients (float32: to rounding, ~1e-6;
    tests/test_logprobs.py), for the prompt tokens' share of the work once per prompt instead of
    once per row (PrefixGrouper's shared-prefix forward, Liu et al. 2025).

    Returns the logits predicting each row's first completion token [B, 1, V] (at its prompt's
    last position) and those predicting the rest [B, C-1, V] (a view: the logits are not copied)."""
    block = batch.prompts
    last = block.lengths - 1
    keep = torch.unique(last)  # the prompts' last positions: the only prompt logits needed
    prompt_out = model(input_ids=block.ids, use_cache=True, logits_to_keep=keep)
    logits = prompt_out.logits  # [U, len(keep), V]
    flat = block.of_row * logits.shape[1] + torch.searchsorted(keep, last)[block.of_row]  # row -> (prompt, its last)
    first = logits.flatten(0, 1).index_select(0, flat).unsqueeze(1)  # index_select: a fixed-order backward, as below
    cache = prompt_out.past_key_values
    # each row's prompt keys/values: index_select, whose backward (index_add) sums the rows of a
    # prompt in a fixed order on the CPU (CUDA's adds atomically, as its other scatters do);
    # `batch_select_indices` indexes, and that backward's parallel adds made two CPU runs differ by ~1e-6
    cache.reorder_cache(block.of_row)  # in place
    rows, width = batch.input_ids.shape
    prompt_width = block.ids.shape[1]
    starts = block.lengths[block.of_row]  # [B] where each completion starts
    arange = torch.arange(width, device=starts.device)
    # a row's padding keeps its last real position: no position beyond the one-row layout's longest
    last_real = (batch.completion_mask.sum(1) - 1).clamp(min=0)
    prompt_keys = torch.arange(prompt_width, device=starts.device) < starts[:, None]  # [B, P]: not its padding
    causal = arange[None, :] <= arange[:, None]  # [C, C]
    mask = torch.cat([prompt_keys[:, None, :].expand(rows, width, prompt_width),
                      causal.expand(rows, width, width)], dim=-1).unsqueeze(1)  # [B, 1, C, P + C], True = attend
    out = model(input_ids=batch.input_ids, position_ids=starts[:, None] + torch.minimum(arange, last_real[:, None]),
                past_key_values=cache,
                attention_mask=mask, use_cache=True)  # a 4-D mask is used as given (transformers' masking_utils)
    return first, out.logits[:, :-1]


def selective_logprobs(logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool = False,
                       temperature: float | None = None, chunk_elements: int = 0) -> TokenLogprobs:
    """`token_logprobs` of given logits [B, P, V] and targets [B, P], a chunk of rows at a time
    (`chunk_elements`, default LOGPROB_CHUNK_ELEMENTS): the target's logit minus its row's
    logsumexp, in float32, as TRL's selective_log_softmax. Every figure is the one the
    whole-tensor computation gives (the same float32 operations on the same rows; bit for bit
    on the CPU, tests/test_logprobs.py)."""
    chunks = _row_chunks(logits.shape, chunk_elements or LOGPROB_CHUNK_ELEMENTS)
    logp, logz = _SelectiveLogSoftmax.apply(logits, targets, chunks)
    entropy = logp_sampling = None
    with torch.no_grad():
        if with_entropy:
            entropy = torch.empty_like(logz)
            for rows in chunks:
                x = logits[rows].float()
                entropy[rows] = logz[rows] - (torch.softmax(x, dim=-1) * x).sum(-1)
        if temperature is not None:
            if temperature in (0, 1):
                logp_sampling = logp.detach()
            else:  # log_softmax(logits / T), a second pass: the generators sample at T
                logp_sampling = torch.empty_like(logz)
                for rows in chunks:
                    x = torch.log_softmax(logits[rows].float() / temperature, dim=-1)
                    logp_sampling[rows] = x.gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1)
    return TokenLogprobs(logp, entropy, logp_sampling)


def _row_chunks(shape: torch.Size, elements: int) -> list[tuple[slice, slice]]:
    """(batch rows, positions) index pairs covering [B, P, V] logits in chunks of at most
    `elements` (at least one position): whole sequences when one fits, else runs of positions
    within a sequence. Each chunk is a view: the logits are never copied whole."""
    b, p, v = shape
    if p * v <= elements:
        step = max(1, elements // max(1, p * v))
        return [(slice(i, i + step), slice(None)) for i in range(0, b, step)]
    step = max(1, elements // v)
    return [(slice(i, i + 1), slice(j, j + step)) for i in range(b) for j in range(0, p, step)]


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log_softmax(logits.float()).gather(targets), chunk by chunk in both passes.

    Autograd through the plain expression would keep every chunk's float32 copy of bf16 logits
    for the backward pass, the whole [B, P, V] in float32 again; this keeps the logits as they
    came and the [B, P] logsumexp, and recomputes each chunk's softmax in the backward pass.
    The gradient is autograd's for the plain expression, operation for operation: the
    logsumexp's -g * exp(x - logz), plus g at the target (the gather's)."""

    @staticmethod
    def forward(ctx, logits, targets, chunks):
        logp = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        logz = torch.empty_like(logp)
        for rows in chunks:
            x = logits[rows].float()
            logz[rows] = torch.logsumexp(x, dim=-1)
            logp[rows] = x.gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1) - logz[rows]
        ctx.save_for_backward(logits, targets, logz)
        ctx.chunks = chunks
        ctx.mark_non_differentiable(logz)
        return logp, logz

    @staticmethod
    def backward(ctx, grad_logp, _grad_logz):
        logits, targets, logz = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for rows in ctx.chunks:
            g = grad_logp[rows]
            chunk = -g.unsqueeze(-1) * (logits[rows].float() - logz[rows].unsqueeze(-1)).exp()
            grad[rows] = chunk.scatter_add_(-1, targets[rows].unsqueeze(-1), g.unsqueeze(-1))
        return grad, None, None


def sampler_logprobs(samples: list[Sample], batch: TokenBatch) -> torch.Tensor:
    """The sampler's log-prob of each completion token, laid out like `token_logprobs` (like
    `batch.completion_mask`, 0 off it): row b's completion positions, in order, hold samples[b]'s."""
    out = torch.zeros(batch.completion_mask.shape, dtype=torch.float32)
    values = [lp for s in samples for lp in s.sampling_logprobs]
    out[batch.completion_mask.cpu()] = torch.tensor(values, dtype=torch.float32)
    return out.to(batch.completion_mask.device)
