"""Log-probabilities of sampled tokens: the token batch a micro-batch of samples becomes, the
policy's log-prob (and entropy) of each of its tokens, and the sampler's, laid out alike."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from spiral_cli.models import encode_prompts
from spiral_cli.rl.rollout import Sample


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # [B, L] prompt + completion, right-padded
    attention_mask: torch.Tensor  # [B, L]
    completion_mask: torch.Tensor  # [B, L-1] True where position t predicts a completion token
    advantages: torch.Tensor  # [B]
    roles: list[str]


def _prompt_ids(prompt: str, tokenizer, prompt_cache: dict[str, list[int]]) -> list[int]:
    p = prompt_cache.get(prompt)
    if p is None:  # encoded exactly as the generator encoded it
        p = prompt_cache[prompt] = encode_prompts(tokenizer, [prompt])[0]
    return p


def build_batch(samples: list[Sample], tokenizer, device: torch.device, prompt_cache: dict[str, list[int]]) -> TokenBatch:
    seqs, starts = [], []
    for s in samples:
        p = _prompt_ids(s.prompt, tokenizer, prompt_cache)
        seqs.append(p + list(s.completion_ids))
        starts.append(len(p))
    width = max(len(x) for x in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    cmask = torch.zeros((len(seqs), width - 1), dtype=torch.bool)
    for i, (x, st) in enumerate(zip(seqs, starts)):
        ids[i, : len(x)] = torch.tensor(x)
        attn[i, : len(x)] = 1
        cmask[i, st - 1 : len(x) - 1] = True  # logits at t predict token t+1
    adv = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
    return TokenBatch(ids.to(device), attn.to(device), cmask.to(device), adv.to(device), [s.role for s in samples])


class TokenLogprobs(NamedTuple):
    logp: torch.Tensor  # [B, L-1] float32, at temperature 1: what the policy gradient trains
    entropy: torch.Tensor | None  # [B, L-1] detached, with_entropy only
    logp_sampling: torch.Tensor | None  # [B, L-1] detached, at the sampling temperature (given one)


# Logit elements processed at a time (256 MB in float32): a hub model's [B, L, V] logits in float32
# (B 64, L 1024, V 152k: ~40 GB) are never made whole, only chunks of rows this size.
LOGPROB_CHUNK_ELEMENTS = 1 << 26


def token_logprobs(model, batch: TokenBatch, with_entropy: bool = False,
                   temperature: float | None = None) -> TokenLogprobs:
    """log p(token_{t+1} | prefix) for every position, [B, L-1] (float32), optionally the entropy
    of the next-token distribution, and with `temperature` the log-probs under
    log_softmax(logits / T): the generators' convention (generation/base.py; T = 0 means T = 1),
    so the sampler-mismatch weight compares like with like (docs/method.md).

    The batch is right-padded, so under causal attention no real token sees a pad: the padding
    mask changes nothing for the positions that count and is left out (the maskless attention
    kernel is several times faster on the CPU)."""
    logits = model(input_ids=batch.input_ids).logits[:, :-1]
    return selective_logprobs(logits, batch.input_ids[:, 1:], with_entropy, temperature)


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
    """The sampler's log-prob of each completion token, laid out like `token_logprobs` ([B, L-1],
    0 off the completion mask): row b's completion positions, in order, hold samples[b]'s."""
    out = torch.zeros(batch.completion_mask.shape, dtype=torch.float32)
    values = [lp for s in samples for lp in s.sampling_logprobs]
    out[batch.completion_mask.cpu()] = torch.tensor(values, dtype=torch.float32)
    return out.to(batch.completion_mask.device)
