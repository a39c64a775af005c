"""Policy-gradient loss shared by SPIRAL (search + aggregation traces) and GRPO.

One function, ``policy_loss``, turning per-token log-probs and per-sequence advantages into a
scalar loss. The paper reports an importance-sampling policy gradient −Σ exp(logp_new − logp_old)·A
(docs/method.md, "Loss"); clipping and loss normalisation are unconfirmed, so
both plain IS and PPO/DAPO-style clipping are offered, with token-mean, seq-mean or Dr. GRPO
aggregation (TRL's loss_type dapo, grpo and dr_grpo).

The sampler-mismatch correction lives here too (docs/method.md, "Sampler mismatch"):
``truncated_importance_weight`` is TRL's truncated importance sampling against the sampler's own
log-probs, which ``policy_loss`` multiplies into each token's policy-gradient loss, and
``sampler_mismatch_metrics`` measures how far the sampler and the trainer disagree.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["policy_loss", "truncated_importance_weight", "sampler_mismatch_metrics", "LOSS_TYPES", "AGGREGATIONS"]

LOSS_TYPES = ("is", "ppo_clip")
AGGREGATIONS = ("token_mean", "seq_mean", "dr_grpo")


def _check_inputs(logp_new, logp_old, advantages, mask, logp_ref, loss_type, aggregation, beta, normalizer,
                  max_completion_length, importance_sampling_ratio=None):
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if logp_new.dim() != 2:
        raise ValueError(f"logp_new must be [B, T], got shape {tuple(logp_new.shape)}")
    for name, t in (("logp_old", logp_old), ("mask", mask), ("logp_ref", logp_ref),
                    ("importance_sampling_ratio", importance_sampling_ratio)):
        if t is not None and t.shape != logp_new.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != logp_new {tuple(logp_new.shape)}")
    if advantages.shape != logp_new.shape[:1]:
        raise ValueError(f"advantages must be [B] = [{logp_new.shape[0]}], got {tuple(advantages.shape)}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and logp_ref is None:
        raise ValueError("beta > 0 needs logp_ref (reference-model log-probs)")
    if aggregation == "dr_grpo" and normalizer is None and not (max_completion_length and max_completion_length > 0):
        raise ValueError("aggregation dr_grpo needs max_completion_length > 0 (or a normalizer)")
    if normalizer is not None and float(normalizer) <= 0:
        raise ValueError(f"normalizer must be > 0 (a global token or sequence count), got {normalizer}")


def _per_token_pg_loss(ratio: Tensor, adv: Tensor, loss_type: str, eps_low: float, eps_high: float):
    """Per-token surrogate loss and a mask of tokens whose gradient the clip removed.

    "is":       −ratio · A
    "ppo_clip": −min(ratio · A, clip(ratio, 1 − ε_low, 1 + ε_high) · A)   (DAPO asymmetric ε)
    The clip is active (zero gradient) when A > 0 and ratio > 1 + ε_high, or A < 0 and
    ratio < 1 − ε_low: the update already moved the token far enough in A's direction.
    """
    unclipped = ratio * adv
    if loss_type == "is":
        return -unclipped, torch.zeros_like(ratio, dtype=torch.bool)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    active = ((adv > 0) & (ratio > 1.0 + eps_high)) | ((adv < 0) & (ratio < 1.0 - eps_low))
    return -torch.minimum(unclipped, clipped), active


def _k3(log_ratio: Tensor) -> Tensor:
    """k3 KL estimator per token: exp(d) − d − 1 ≥ 0 with d = log q(y) − log p(y), y ~ p.

    Unbiased for KL(p || q) and never negative (Schulman, "Approximating KL divergence");
    TRL's GRPO uses it with p = policy, q = reference, i.e. d = ref − new.
    """
    return torch.exp(log_ratio) - log_ratio - 1.0


def _aggregate(per_token: Tensor, mask: Tensor, aggregation: str, normalizer, max_completion_length) -> Tensor:
    """Reduce [B, T] per-token losses to a scalar.

    token_mean: Σ_{b,t} mask·loss / normalizer (default: number of valid tokens here).
    seq_mean:   Σ_b (Σ_t mask·loss / n_tokens_b) / normalizer (default: number of sequences
                here with at least one valid token; empty rows contribute 0).
    dr_grpo:    Σ_{b,t} mask·loss / normalizer (default: B · max_completion_length, a constant
                that does not depend on the lengths sampled, so no length bias; Dr. GRPO).
    """
    masked = per_token * mask
    if aggregation == "dr_grpo":
        total = masked.sum()
        count = per_token.new_tensor(float(per_token.shape[0] * (max_completion_length or 0)))
    elif aggregation == "token_mean":
        total = masked.sum()
        count = mask.sum()
    else:
        lengths = mask.sum(dim=1)
        total = (masked.sum(dim=1) / lengths.clamp(min=1.0)).sum()
        count = (lengths > 0).sum()
    # Stay on-device (no .item() sync) unless the caller passed a plain number.
    denom = count.clamp(min=1) if normalizer is None else normalizer
    return total / denom


def policy_loss(
    logp_new: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: str = "is",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    aggregation: str = "token_mean",
    logp_ref: Tensor | None = None,
    beta: float = 0.0,
    normalizer: float | int | Tensor | None = None,
    max_completion_length: int | None = None,
    importance_sampling_ratio: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped / plain importance-sampling policy-gradient loss with an optional k3 KL.

    Shapes: ``logp_new``, ``logp_old``, ``mask``, ``logp_ref`` are [B, T] (log-prob of each
    generated token; mask 1 for tokens that count); ``advantages`` is [B], one scalar per
    sequence broadcast over its tokens. Per token:

        ratio = exp(logp_new − logp_old)          (logp_old is treated as a constant)
        "is":        ℓ = −ratio · A               gradient at ratio = 1 is −A ∇logp (REINFORCE)
        "ppo_clip":  ℓ = −min(ratio·A, clip(ratio, 1 − epsilon_low, 1 + epsilon_high)·A)
        ℓ ← w · ℓ      with w = ``importance_sampling_ratio`` (detached), when given: the
                       truncated sampler-mismatch weight (``truncated_importance_weight``)
        + beta · [exp(ref − new) − (ref − new) − 1]   when beta > 0 (k3 KL, as TRL's GRPO)

    Aggregation over the batch:
        "token_mean": Σ_valid ℓ / number of valid tokens
        "seq_mean":   mean over sequences of (Σ_t ℓ / tokens in that sequence)
        "dr_grpo":    Σ_valid ℓ / (B · max_completion_length)   (TRL's dr_grpo)

    ``normalizer`` replaces the denominator, for gradient accumulation over micro-batches:
    pass the *global* count -- for token_mean the number of valid tokens in the whole batch,
    for seq_mean the number of (non-empty) sequences in the whole batch, for dr_grpo the sum
    over the whole batch's sequences of their max_completion_length (B · L when all share L)
    -- to every micro-batch call and ``backward()`` each loss; the summed gradients then equal
    those of one full-batch call (no extra division by the number of micro-batches).

    Returns ``(loss, stats)``; stats are detached floats averaged over this call's valid
    tokens: ``clip_fraction`` (tokens whose gradient the clip removed; 0 for "is"),
    ``ratio_mean``, ``ratio_min``, ``ratio_max``, ``approx_kl_old`` (k3 estimate of
    KL(π_old || π_new): how far this update has moved off-policy), ``kl_ref`` (k3 KL to the reference, when
    ``logp_ref`` is given, even with beta 0), ``num_tokens``.
    """
    _check_inputs(logp_new, logp_old, advantages, mask, logp_ref, loss_type, aggregation, beta, normalizer,
                  max_completion_length, importance_sampling_ratio)
    mask = mask.to(logp_new.dtype)
    logp_old = logp_old.detach()
    adv = advantages.detach().to(logp_new.dtype).unsqueeze(1)  # [B, 1] broadcasts over T

    ratio = torch.exp(logp_new - logp_old)
    per_token, clip_active = _per_token_pg_loss(ratio, adv, loss_type, epsilon_low, epsilon_high)
    if importance_sampling_ratio is not None:
        # after the PPO clip and before the KL term, as TRL's GRPOTrainer applies its vLLM weight:
        # it reweights samples drawn by the sampler to the trainer's distribution (docs/method.md)
        per_token = per_token * importance_sampling_ratio.detach()
    kl_ref = None
    if logp_ref is not None:
        kl_ref = _k3(logp_ref.detach() - logp_new)
        if beta > 0:
            per_token = per_token + beta * kl_ref
    loss = _aggregate(per_token, mask, aggregation, normalizer, max_completion_length)
    return loss, _stats(ratio, clip_active, kl_ref, logp_new, logp_old, mask)


@torch.no_grad()
def _stats(ratio, clip_active, kl_ref, logp_new, logp_old, mask) -> dict[str, float]:
    """Detached diagnostics, averaged over valid tokens of this call."""
    n = mask.sum()
    valid = mask > 0

    def mean(x: Tensor) -> float:
        return float((x * mask).sum() / n.clamp(min=1.0))

    stats = {
        "num_tokens": float(n),
        "clip_fraction": mean(clip_active.to(mask.dtype)),
        "ratio_mean": mean(ratio),
        "ratio_min": float(ratio[valid].min()) if valid.any() else 1.0,
        "ratio_max": float(ratio[valid].max()) if valid.any() else 1.0,
        "approx_kl_old": mean(_k3(logp_new - logp_old)),  # KL(old || new), tokens ~ old
    }
    if kl_ref is not None:
        stats["kl_ref"] = mean(kl_ref)
    return stats


# ---------------------------------------------------------------- sampler mismatch (docs/method.md)


def truncated_importance_weight(logp_old: Tensor, logp_sampler: Tensor, cap: float,
                                mask: Tensor | None = None) -> Tensor:
    """TRL's truncated importance sampling (``vllm_importance_sampling_correction``,
    ``vllm_importance_sampling_mode: token_truncate``): per token

        w = min(exp(logp_old − logp_sampler), cap)

    ``logp_old`` is the trainer's log-prob of the sampled token under the weights that sampled it,
    ``logp_sampler`` what the sampler reported for it (same temperature). The samples came from the
    sampler, the gradient is the trainer's: w reweights them to the trainer's distribution, and the
    cap bounds the variance a token the sampler found unlikely would add. Masked positions get 1.
    Detached: a weight, never a path for the gradient."""
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    diff = (logp_old.detach() - logp_sampler.detach()).float()
    if mask is not None:
        diff = diff * mask.to(diff.dtype)
    return torch.clamp(torch.exp(diff), max=cap)


@torch.no_grad()
def sampler_mismatch_metrics(logp_train: Tensor, logp_sampler: Tensor, cap: float,
                             mask: Tensor | None = None) -> dict[str, float]:
    """How far the sampler and the trainer disagree on the sampled tokens (valid ones: ``mask``).

    With d = logp_train − logp_sampler per token (tokens drawn by the sampler):
    - ``sampling/sampling_logp_difference/mean|max``: mean and max of |d| (TRL's names)
    - ``sampling/importance_sampling_ratio/min|mean|max``: the truncated weight min(e^d, cap), as
      the loss applies it (TRL's names; TRL also logs the truncated ratio)
    - ``sampling/raw_importance_sampling_ratio/mean|max``: e^d before the cap
    - ``sampling/importance_sampling_ratio/capped_fraction``: tokens whose e^d exceeded the cap
    - ``sampling/kl_sampler_trainer``: the k3 estimate e^d − d − 1 of KL(sampler ‖ trainer), ≥ 0
    No valid token: differences 0, ratios 1."""
    d = (logp_train - logp_sampler).double()  # float64: k3 ≈ d²/2 vanishes in float32 below d ~ 1e-4
    if mask is not None:
        d = d[mask.bool()]
    d = d.reshape(-1)
    if d.numel() == 0:
        d = d.new_zeros(1)
    raw = torch.exp(d)
    weight = torch.clamp(raw, max=cap)
    return {
        "sampling/sampling_logp_difference/mean": float(d.abs().mean()),
        "sampling/sampling_logp_difference/max": float(d.abs().max()),
        "sampling/importance_sampling_ratio/min": float(weight.min()),
        "sampling/importance_sampling_ratio/mean": float(weight.mean()),
        "sampling/importance_sampling_ratio/max": float(weight.max()),
        "sampling/raw_importance_sampling_ratio/mean": float(raw.mean()),
        "sampling/raw_importance_sampling_ratio/max": float(raw.max()),
        "sampling/importance_sampling_ratio/capped_fraction": float((raw > cap).float().mean()),
        "sampling/kl_sampler_trainer": float(_k3(d).mean()),
    }
