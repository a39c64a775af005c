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


def token_logprobs(model, batch: TokenBatch, with_entropy: bool = False,
                   temperature: float | None = None) -> TokenLogprobs:
    """log p(token_{t+1} | prefix) for every position, [B, L-1] (float32), optionally the entropy
    of the next-token distribution, and with `temperature` the log-probs under
    log_softmax(logits / T): the generators' convention (generation/base.py; T = 0 means T = 1),
    so the sampler-mismatch weight compares like with like (docs/method.md).

    The batch is right-padded, so under causal attention no real token sees a pad: the padding
    mask changes nothing for the positions that count and is left out (the maskless attention
    kernel is several times faster on the CPU)."""
    logits = model(input_ids=batch.input_ids).logits[:, :-1].float()
    targets = batch.input_ids[:, 1:]
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz
    entropy = logp_sampling = None
    with torch.no_grad():
        if with_entropy:
            probs = torch.softmax(logits, dim=-1)
            entropy = logz - (probs * logits).sum(-1)
        if temperature is not None:
            logp_sampling = _logp_at_temperature(logits, targets, temperature) if temperature not in (0, 1) \
                else logp.detach()
    return TokenLogprobs(logp, entropy, logp_sampling)


def _logp_at_temperature(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of the targets, one row at a time: a second [B, L, V] tensor would
    double the peak memory of the forward."""
    rows = [torch.log_softmax(row / temperature, dim=-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
            for row, t in zip(logits, targets)]
    return torch.stack(rows)


def sampler_logprobs(samples: list[Sample], batch: TokenBatch) -> torch.Tensor:
    """The sampler's log-prob of each completion token, laid out like `token_logprobs` ([B, L-1],
    0 off the completion mask): row b's completion positions, in order, hold samples[b]'s."""
    out = torch.zeros(batch.completion_mask.shape, dtype=torch.float32)
    values = [lp for s in samples for lp in s.sampling_logprobs]
    out[batch.completion_mask.cpu()] = torch.tensor(values, dtype=torch.float32)
    return out.to(batch.completion_mask.device)
