"""The Generator protocol shared by the generation backends (hf, vllm).

Conventions every backend follows (the RL loss relies on them):

- ``Completion.token_ids`` are exactly the tokens the model sampled, in order, up to and
  including the token that ended the sequence: the EOS token when it finished by EOS, or the
  token that completed a stop string (the stop string's tokens stay in ``token_ids`` so the
  policy is trained to emit it, like EOS). Nothing after that token, and never padding.
- ``Completion.text`` is the decoded text with special tokens removed, cut *before* the first
  stop string (``stop_str`` says which one). So ``text`` may be shorter than
  ``decode(token_ids)``; use ``token_ids`` for training and ``text`` for rewards/prompts.
- ``Completion.logprobs[i]`` is the log-probability of ``token_ids[i]`` under
  ``log_softmax(logits / temperature)`` -- the model's distribution at the sampling
  temperature, *without* the top-k/top-p renormalisation (as TRL and verl compute it). With
  temperature 0 (greedy) it is the log-probability under temperature 1. A teacher-forced forward
  pass of prompt + token_ids reproduces these values (within float tolerance).
- ``finish_reason`` is ``"stop"`` (EOS or a stop string) or ``"length"`` (max_new_tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass
class Completion:
    text: str  # decoded, special tokens removed, cut before the first stop string
    token_ids: list[int]  # sampled ids, incl. the EOS / stop-string tokens that ended it
    logprobs: list[float]  # one per token id: log_softmax(logits / T), no top-k/p renorm
    prompt_tokens: int  # tokens in the (encoded) prompt
    finish_reason: str  # "stop" | "length"
    stop_str: str | None = None  # the stop string that ended it (None: EOS or length)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@runtime_checkable
class Generator(Protocol):
    def generate(
        self,
        prompts: list[str],
        *,
        n: int = 1,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> list[list[Completion]]:
        """``result[i][j]`` is sample j of prompts[i] (n per prompt)."""
        ...

    def update_weights(self, model) -> None:
        """Backends holding their own copy of the weights (vLLM, the lean hf path) reload them."""
        ...


def check_generate_args(prompts, n: int, max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> None:
    """The argument checks every backend's `generate` makes (same messages everywhere)."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a string")
    if n < 1:
        raise ValueError("n must be >= 1")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    if not 0 < top_p <= 1:
        raise ValueError("top_p must be in (0, 1]")
    if top_k < 0:
        raise ValueError("top_k must be >= 0")


def cut_at_stop(text: str, stop: list[str] | None) -> tuple[str, str | None]:
    """Cut `text` before the earliest occurrence of any stop string -> (text, matched stop)."""
    if not stop:
        return text, None
    best = -1
    which: str | None = None
    for s in stop:
        if not s:
            continue
        i = text.find(s)
        if i != -1 and (best == -1 or i < best):
            best, which = i, s
    if which is None:
        return text, None
    return text[:best], which


def teacher_forced_logprobs(loaded, prompts: list[list[int]], completions: list[list[int]], temperature: float,
                            batch_size: int = 64) -> list[list[float]]:
    """log_softmax(logits / T) of each completion token under `loaded.model` (one teacher-forced
    forward of prompt + completion, in eval mode and the model's autocast): the convention above,
    for engines whose own values differ from it (vLLM with top-k/top-p) and for checking them."""
    import torch

    model = loaded.model
    dev = loaded.device
    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else loaded.eos_token_ids[0]
    bs = max(1, int(batch_size))
    order = sorted(range(len(completions)), key=lambda k: len(prompts[k]) + len(completions[k]))
    out: list[list[float]] = [[] for _ in completions]
    training = [m for m in model.modules() if m.training]
    model.eval()
    try:
        with torch.inference_mode(), loaded.autocast_ctx():
            for s in range(0, len(order), bs):
                rows = [k for k in order[s:s + bs] if completions[k]]
                if not rows:
                    continue
                seqs = [prompts[k] + completions[k] for k in rows]
                L = max(map(len, seqs))
                ids = torch.full((len(rows), L), int(pad), dtype=torch.long)
                attn = torch.zeros((len(rows), L), dtype=torch.long)
                for r, sq in enumerate(seqs):
                    ids[r, : len(sq)] = torch.tensor(sq, dtype=torch.long)
                    attn[r, : len(sq)] = 1
                logits = model(input_ids=ids.to(dev), attention_mask=attn.to(dev)).logits.float()
                logp = torch.log_softmax(logits / temperature, dim=-1)
                for r, k in enumerate(rows):
                    p, c = len(prompts[k]), len(completions[k])
                    tgt = torch.tensor(completions[k], dtype=torch.long, device=logp.device)
                    out[k] = logp[r, p - 1 : p - 1 + c].gather(-1, tgt[:, None]).squeeze(-1).tolist()
    finally:
        for m in training:
            m.training = True
    return out


def vllm_request_seeds(seed: int | None, num_prompts: int, n: int) -> list[int]:
    """One seed per prompt for a vLLM engine or server, which seeds sample j with seed + j: prompt
    i gets base + i * n, so no two samples of a call share a seed (None: drawn from torch's RNG)."""
    import random

    import torch

    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())  # follows torch.manual_seed
    base = random.Random(int(seed)).getrandbits(62)
    return [base + i * n for i in range(num_prompts)]


def completions_from_samples(loaded, prompt_ids: list[list[int]], samples: list[list[tuple]], n: int,
                             temperature: float, top_p: float, top_k: int, stop: list[str], decode,
                             batch_size: int = 64) -> list[list[Completion]]:
    """Completions from a vLLM engine's or server's answers: `samples[i]` holds prompt i's
    (token ids, log-probs, finish reason, stop reason) tuples, one per sample (one for greedy,
    copied n times). With top-k/top-p the values are renormalised over the kept set, so they are
    re-scored under `loaded` (this module's convention); `decode` turns id lists into texts."""
    flat_ids: list[list[int]] = []
    flat_meta: list[tuple[int, list[float], str, object]] = []
    for i, choices in enumerate(samples):
        for j in range(n):
            ids, lps, finish, stop_reason = choices[j % len(choices)]
            flat_ids.append(ids)
            flat_meta.append((i, lps, finish, stop_reason))
    if temperature > 0 and (top_k > 0 or top_p < 1.0):
        rescored = teacher_forced_logprobs(loaded, [prompt_ids[i] for i, *_ in flat_meta], flat_ids, temperature,
                                           batch_size)
        flat_meta = [(i, lp, fr, sr) for (i, _, fr, sr), lp in zip(flat_meta, rescored)]
    texts = decode(flat_ids)
    results: list[list[Completion]] = []
    k = 0
    for i in range(len(samples)):
        row: list[Completion] = []
        for _ in range(n):
            _, lps, fr, sr = flat_meta[k]
            text, which = cut_at_stop(texts[k], stop)
            if which is None and isinstance(sr, str) and sr in stop:
                which = sr  # the engine saw the stop string (our decode should always agree)
            if which is not None:
                fr = "stop"
            row.append(Completion(text=text, token_ids=flat_ids[k], logprobs=lps, prompt_tokens=len(prompt_ids[i]),
                                  finish_reason=fr, stop_str=which))
            k += 1
        results.append(row)
    return results
