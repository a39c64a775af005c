"""CPU attention kernels: transformers' "sdpa" attention without `repeat_kv` for grouped-query
heads, and attention as two matmuls for training (a faster backward than torch's CPU flash
attention). Same math as sdpa; `load_model` switches CPU models to it."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


CPU_ATTENTION = "spiral_sdpa_gqa"


def _sdpa_gqa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' "sdpa" attention, but grouped-query heads go to torch's `enable_gqa` even
    with a padding mask. transformers only does that without a mask (a CUDA kernel constraint)
    and otherwise copies K/V `num_key_value_groups` times per layer per step (`repeat_kv`),
    which on the CPU cost a third of the decoding time of scratch:tiny. Same math, same mask.
    With gradients on (training) and up to MATMUL_ATTENTION_MAX_LEN keys (or compiled),
    `_matmul_attention` instead: same math, a faster backward."""
    if kwargs.get("position_bias") is not None or kwargs.get("cache") is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
    if torch.is_grad_enabled() and dropout == 0.0 and (key.shape[2] <= MATMUL_ATTENTION_MAX_LEN or torch.compiler.is_compiling()):
        return _matmul_attention(query, key, value, attention_mask, scaling, causal), None
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal,
        enable_gqa=groups > 1,
    )
    return out.transpose(1, 2).contiguous(), None


# Up to this many keys the matmul attention trains faster than SDPA on the CPU; beyond it its
# L x L scores cost more than flash attention's slow backward (forward + backward of 64 sequences:
# 498 vs 601 ms at 128 tokens, 1161 vs 1103 ms at 256, 6334 vs 2861 ms at 512). Compiled, inductor
# fuses it and it stays faster (bench/sft_step.py), and one graph must serve every length.
MATMUL_ATTENTION_MAX_LEN = 192


def _matmul_attention(query, key, value, attention_mask, scaling, causal: bool) -> torch.Tensor:
    """Attention as two matmuls and a float32 softmax over float32 scores, for training on the CPU: torch's CPU
    flash-attention backward took ~7 ms per layer per step (profiled, scratch:tiny, 16x84 tokens);
    with this form a training step went 117 -> 96 ms (bench/sft_step.py). Grouped heads are folded into the query rows (no K/V copies).
    query (B, H, Lq, d); key, value (B, Hkv, Lk, d); a boolean mask (B, 1, Lq, Lk), True = attend.
    Returns (B, Lq, H, d) like the sdpa path."""
    b, h, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    groups = h // hkv
    q = query.reshape(b, hkv, groups * lq, d)  # head i uses K/V head i // groups, as repeat_kv
    # The scores in float32, as flash attention keeps them: under bf16 autocast a bf16 score matrix
    # rounds every attention logit (to ~0.06 at 10), which long aggregation prompts, where one
    # candidate's line must be picked out of ~500 tokens, did not survive (docs/results.md, session 25).
    # The scale on the queries, the mask in place: two passes over the L x L scores fewer forward,
    # one backward (the same bits at a power-of-two scale, e.g. head_dim 64; bench/README.md, session 30).
    scale = scaling if scaling is not None else d**-0.5
    with torch.autocast(query.device.type, enabled=False):
        scores = torch.matmul(q.float() * scale, key.float().transpose(-1, -2))
    keep = None
    if attention_mask is not None:
        keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        keep = keep.repeat(1, 1, groups, 1)
    elif causal:
        keep = torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril(lk - lq).repeat(groups, 1)
    if keep is not None:  # the dtype's minimum, not -inf: a fully masked (padding) row stays finite
        scores.masked_fill_(~keep, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    return torch.matmul(probs, value).view(b, h, lq, d).transpose(1, 2).contiguous()


def _register_cpu_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CPU_ATTENTION, _sdpa_gqa_forward)
    AttentionMaskInterface.register(CPU_ATTENTION, sdpa_mask)


def _use_cpu_attention(model, device: torch.device) -> None:
    """On the CPU, switch a model that uses "sdpa" to the mask-friendly GQA variant above."""
    cfg = getattr(model, "config", None)
    if device.type != "cpu" or cfg is None or getattr(cfg, "_attn_implementation", None) != "sdpa":
        return
    try:
        _register_cpu_attention()
        model.set_attn_implementation(CPU_ATTENTION)
    except Exception as e:  # noqa: BLE001 - an optimisation only; keep sdpa
        log.debug("keeping sdpa attention: %s", e)
