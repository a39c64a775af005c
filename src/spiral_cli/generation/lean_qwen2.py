"""A lean forward pass for sampling from Qwen2-architecture models (the scratch presets included).

Why: at RL batch sizes a small model's decoding step is dominated by per-module Python overhead
in transformers (mask building, rotary recomputation, ~60 small ops per layer), not by the
matrix products. This path runs the same math with fused q/k/v and gate/up projections, a
precomputed rotary table, a preallocated KV cache and no mask machinery. On the 2-core CPU it cut
the generation time of a GRPO step with scratch:tiny at batch 64 from 0.80 s to 0.42 s (~1.9x,
bench/README.md).

It is a *sampling* engine with its own copy of the weights, like vLLM: `load_weights(model)`
copies them from the transformers model (the generator calls it after each optimizer step).
Numerics follow transformers' module under the same settings: RMSNorm in float32, the residual
stream in the parameters' dtype, matrix products in bf16 when the model runs under bf16 autocast
(as `torch.autocast` would), rotary in float32 before the cast (as autocast's SDPA would).

(For a bf16 model without autocast transformers rounds cos/sin to bf16; here rotary stays in
float32, slightly more precise, so those two differ by bf16 rounding.)

Decoding attention (one query per row) on the CPU: torch's CPU flash-attention kernel is built
for many queries and took more than half of a decoding step at one query (scratch:tiny, batch 64,
~3 ms per layer at 100 keys). Here the KV cache is held in float32 (the keys and values are
rounded to the compute dtype first, so it holds the same numbers) and a step's attention is two
float32 matmuls with a float32 softmax: the same math as SDPA's bf16 kernel, which also
accumulates the scores in float32, 3-5x faster at these shapes (bench/README.md). A cache that
would exceed `FP32_CACHE_MAX_BYTES` stays in the compute dtype and decodes through SDPA.

On a CPU with AMX the bf16 weights are held pre-packed in oneDNN's layout
(`torch.ops.mkldnn._linear_pointwise`, what inductor's CPU fusions call) instead of being re-laid
out at every call: 16-32% less time per decoding-step linear on an AMX Xeon, generation ~5%
(bench/README.md, session 30); other CPUs were not measured and keep plain tensors. The products
are F.linear's with float32 accumulation; on some shapes oneDNN picks another accumulation order,
so a result may differ in its last bf16 bit. Checked once per process against `F.linear`; a build
without the ops keeps plain tensors.

With `compile_decode` (`generation.compile`), the decoding step (one token per row over a
float32 cache: every layer, the cache writes, the attention and the logits) is one
`torch.compile`d function with inductor's C++ wrapper, its elementwise work fused: decoding is
per-op-overhead bound at these sizes (a one-row step costs about half of a 64-row one on the
2-core CPU), and fusing it made a GRPO step's generation 0.64-0.74x after a one-off compile
(bench/README.md, session 32). The compiled step holds plain bf16 weights (inductor cannot trace
oneDNN's packed ones) and its own kernels, so its samples differ from the eager path's by bf16
rounding. Batch, cache length and capacity are dynamic dimensions: one graph per model serves a
whole run (a single row, or a one-token prefill, stays eager: torch would specialise a size-1
dimension into a second graph).

Only plain `Qwen2ForCausalLM` models with default RoPE and full attention are supported
(`supports`); everything else (peft adapters, quantized weights, sliding windows, other
architectures) uses the transformers forward.
"""
from __future__ import annotations

import functools
import sys
import time

import torch
import torch.nn.functional as F

from spiral_cli import first_line
from spiral_cli.models.device import cpu_bf16_matmul_is_native

# Largest KV cache (bytes, keys + values of all layers) held in float32 for matmul decoding
# attention; a larger one (long contexts x big batches x many layers) keeps the compute dtype.
FP32_CACHE_MAX_BYTES = 1 << 30


@functools.cache
def _prepacked_linear_works() -> bool:
    """Whether this CPU has AMX (where packing was measured to pay), this torch build packs bf16
    linear weights for oneDNN, and the packed product is `F.linear`'s up to bf16 rounding (checked
    on one product)."""
    try:
        if not (torch.cpu._is_amx_tile_supported() and cpu_bf16_matmul_is_native()):
            return False
        g = torch.Generator().manual_seed(0)
        x = torch.randn(3, 5, 64, generator=g).bfloat16()
        w, b = torch.randn(96, 64, generator=g).bfloat16(), torch.randn(96, generator=g).bfloat16()
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "").float()
        ref = F.linear(x, w, b).float()
        return out.shape == ref.shape and bool(((out - ref).abs() <= 2**-7 * ref.abs().amax()).all())
    except Exception:  # noqa: BLE001 - an optimisation only: an op missing from this build
        return False


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    if w.is_mkldnn:  # pre-packed (LeanQwen2.load_weights)
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)


def supports(model) -> bool:
    """Whether `model` is a plain transformers Qwen2ForCausalLM this path reproduces exactly."""
    if type(model).__name__ != "Qwen2ForCausalLM" or hasattr(model, "peft_config"):
        return False
    cfg = model.config
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default" or getattr(cfg, "use_sliding_window", False):
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return False
    if getattr(cfg, "quantization_config", None) is not None or getattr(model, "is_quantized", False):
        return False
    return cfg.hidden_act == "silu"


class LeanQwen2:
    """Weights + forward for prefill and decoding; the KV cache is a `KVCache` it creates."""

    def __init__(self, model, compute_dtype: torch.dtype, compile_decode: bool = False):
        cfg = model.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.compute_dtype = compute_dtype
        self.device = next(model.parameters()).device
        self.residual_dtype = next(model.parameters()).dtype
        self.scale = self.head_dim ** -0.5
        rope = getattr(cfg, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).to(
            device=self.device, dtype=torch.float) / self.head_dim))
        self._cos = self._sin = torch.empty(0, self.head_dim, device=self.device)
        self.layers: list[dict[str, torch.Tensor]] = []
        # `generation.compile`: the decoding step compiled on its first call (`_decode`)
        self.compile_decode = compile_decode
        # fullgraph: a graph break raises (and falls back) instead of splitting the step silently
        self._compiled_step = torch.compile(self._decode_step, dynamic=None, fullgraph=True,
                                            options={"cpp_wrapper": True}) if compile_decode else None
        self._step_compiled = False  # set after the first compiled step ran
        self.load_weights(model)

    # -- weights --------------------------------------------------------------------------------

    @torch.no_grad()
    def load_weights(self, model) -> None:
        """(Re)copy the weights from the transformers model (fused, in the compute dtype)."""
        cd = self.compute_dtype
        rd = self.residual_dtype

        def own(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # always a copy, never an alias
            return t.detach().to(dtype, copy=True)

        # (the compiled decoding step cannot trace packed weights: it keeps plain ones)
        pack = self.device.type == "cpu" and cd == torch.bfloat16 and not self.compile_decode \
            and _prepacked_linear_works()

        def mat(t: torch.Tensor) -> torch.Tensor:  # a matrix product's weight, [out, in]
            t = t.detach().to(cd, copy=not pack)  # packing copies it anyway
            return torch.ops.mkldnn._reorder_linear_weight(t, None) if pack else t

        inner = model.model
        layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            biases = [p.bias for p in (a.q_proj, a.k_proj, a.v_proj)]
            layers.append({
                "ln1": own(layer.input_layernorm.weight, rd),
                "qkv_w": mat(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])),
                "qkv_b": torch.cat(biases).to(cd) if all(b is not None for b in biases) else None,
                "o_w": mat(a.o_proj.weight),
                "o_b": own(a.o_proj.bias, cd) if a.o_proj.bias is not None else None,
                "ln2": own(layer.post_attention_layernorm.weight, rd),
                "gu_w": mat(torch.cat([m.gate_proj.weight, m.up_proj.weight])),
                "down_w": mat(m.down_proj.weight),
            })
        self.layers = layers
        self.embed = own(inner.embed_tokens.weight, rd)
        self.norm = own(inner.norm.weight, rd)
        self.lm_head = mat(model.lm_head.weight)

    # -- pieces ---------------------------------------------------------------------------------

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and w.dtype == torch.float32:  # one fused kernel, the same float32 math
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * h.to(x.dtype)

    def _grow_rotary(self, need: int) -> None:
        """Make the float32 cos/sin tables (as transformers computes them) cover positions < need.
        sin's first half is negated, so that rotate_half(x) * sin == x.roll(D // 2, -1) * signed
        sin, exactly (one op instead of three)."""
        if need > self._cos.shape[0]:
            n = max(need, 2 * self._cos.shape[0], 256)
            freqs = torch.arange(n, device=self.device, dtype=torch.float)[:, None] * self.inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos = emb.cos()
            self._sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)
            torch._dynamo.maybe_mark_dynamic(self._cos, 0)  # a longer table is not a new graph
            torch._dynamo.maybe_mark_dynamic(self._sin, 0)

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [B, T, 1, D] of the positions (within the tables: `_grow_rotary`)."""
        return self._cos[positions].unsqueeze(2), self._sin[positions].unsqueeze(2)

    # -- forward --------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                cache: KVCache) -> torch.Tensor:
        """Logits (float32) of the last position of each row, [B, V].

        input_ids/positions: [B, T] new tokens; mask: bool [B, 1, T, S] (True = may attend),
        S = cache.length + T. The new keys/values are appended to `cache`. Positions must lie within
        the cache's capacity (as every position of its rows does)."""
        B, T = input_ids.shape
        start = cache.reserve(T)
        # positions never pass the cache's length; sized once here, no sync per step
        self._grow_rotary(cache.k[0].shape[2])
        if T == 1 and cache.matmul_attention:  # decoding: one query per row over a float32 cache
            return self._decode(input_ids, positions, mask, cache)
        cd = self.compute_dtype

        def attend(li, q, k, v):
            keys, values = cache.write(li, start, k, v)
            if keys.dtype != cd:  # a float32 cache: the same numbers in the compute dtype
                keys, values = (k, v) if start == 0 else (keys.to(cd), values.to(cd))
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale,
                                                  enable_gqa=self.num_heads != self.num_kv_heads)

        return self._layers(input_ids, positions, attend)

    def _decode(self, input_ids, positions, mask, cache: KVCache) -> torch.Tensor:
        """One decoding step, compiled where `generation.compile` asks; a compile that fails falls back to the eager step,
        once, with a one-line warning (the run goes on, slower)."""
        assert mask.shape[-1] == cache.length  # the step writes position S - 1 of the cache
        # one row, or a one-token prefill, stays eager: torch specialises a dimension of size 1
        # (a second graph to compile)
        if self._compiled_step is None or input_ids.shape[0] == 1 or mask.shape[-1] == 1:
            return self._decode_step(input_ids, positions, mask, cache.k, cache.v)
        for t in (input_ids, positions, mask):  # rows leave the batch; the cache grows by a position a step
            torch._dynamo.maybe_mark_dynamic(t, 0)
        torch._dynamo.maybe_mark_dynamic(mask, 3)
        t0 = time.time()
        try:
            out = self._compiled_step(input_ids, positions, mask, cache.k, cache.v)
        except Exception as e:  # noqa: BLE001 - any compiler failure: decode uncompiled instead
            first = first_line(e, 200)
            print(f"warning: generation.compile: the compiled decoding step failed ({type(e).__name__}: "
                  f"{first}); decoding uncompiled", file=sys.stderr)
            self._compiled_step = None
            return self._decode_step(input_ids, positions, mask, cache.k, cache.v)
        if not self._step_compiled:
            self._step_compiled = True
            seconds = time.time() - t0
            if seconds >= 1:  # (another engine of the process may have compiled the graph)
                print(f"compiled the decoding step in {seconds:.0f}s", file=sys.stderr)
        return out

    def _decode_step(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                     cache_k: list[torch.Tensor], cache_v: list[torch.Tensor]) -> torch.Tensor:
        """One token per row: input_ids/positions [B, 1], mask bool [B, 1, 1, S]; writes position
        S - 1 of the float32 cache buffers (already reserved) and attends over their first S.
        Written to compile as one graph: no Python state, no host syncs."""
        S = mask.shape[-1]
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, -torch.inf)

        def attend(li, q, k, v):
            cache_k[li][:, :, S - 1 : S] = k
            cache_v[li][:, :, S - 1 : S] = v
            return self._decode_attention(q, cache_k[li][:, :, :S], cache_v[li][:, :, :S], bias)

        return self._layers(input_ids, positions, attend)

    def _layers(self, input_ids: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """The decoder layers and the last position's logits; `attend(layer, q, k, v)` stores the
        new keys/values and returns the attention output [B, H, T, D] in the compute dtype."""
        B, T = input_ids.shape
        cd = self.compute_dtype
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        cos, sin = self._rotary(positions)
        x = F.embedding(input_ids, self.embed)
        for li, w in enumerate(self.layers):
            h = self._rms(x, w["ln1"]).to(cd)
            qkv = _linear(h, w["qkv_w"], w["qkv_b"])
            # rotary on queries and keys together, in float32 (as transformers under autocast)
            qk = qkv[..., : (H + Hkv) * D].unflatten(-1, (H + Hkv, D)).float()
            qk = (qk * cos).add_(qk.roll(D // 2, dims=-1).mul_(sin)).to(cd)  # [B, T, H + Hkv, D]
            q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)
            v = qkv[..., (H + Hkv) * D :].unflatten(-1, (Hkv, D)).transpose(1, 2)
            o = _linear(attend(li, q, k, v).transpose(1, 2).reshape(B, T, H * D), w["o_w"], w["o_b"])
            x = x.add_(o)  # x is this call's own tensor (the embedding's output)
            h = self._rms(x, w["ln2"]).to(cd)
            g, u = _linear(h, w["gu_w"]).chunk(2, dim=-1)
            x = x.add_(_linear(F.silu(g).mul_(u), w["down_w"]))
        h = self._rms(x[:, -1], self.norm).to(cd)
        return _linear(h, self.lm_head).float()

    def _decode_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                          bias: torch.Tensor) -> torch.Tensor:
        """Attention of one query per row as two float32 matmuls: q [B, H, 1, D] (compute
        dtype), keys/values [B, Hkv, S, D] float32, bias [B, 1, 1, S] (0 or -inf). Grouped query
        heads are folded into rows of their K/V head (head i uses K/V head i // groups, as
        repeat_kv), so nothing is copied. Returns [B, H, 1, D] in the compute dtype."""
        B, H, _, D = q.shape
        Hkv = keys.shape[1]
        scores = torch.matmul(q.float().reshape(B, Hkv, H // Hkv, D), keys.transpose(-1, -2))
        scores.mul_(self.scale).add_(bias)
        probs = torch.softmax(scores, dim=-1)
        return torch.matmul(probs, values).reshape(B, H, 1, D).to(self.compute_dtype)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """A cache for `batch` rows and `capacity` positions. On the CPU, up to
        FP32_CACHE_MAX_BYTES: float32, decoded by matmul attention; otherwise the compute dtype,
        decoded by SDPA."""
        fp32_bytes = 2 * len(self.layers) * batch * self.num_kv_heads * max(1, capacity) * self.head_dim * 4
        matmul = self.device.type == "cpu" and fp32_bytes <= FP32_CACHE_MAX_BYTES
        cache = KVCache(len(self.layers), batch, self.num_kv_heads, capacity, self.head_dim,
                        torch.float32 if matmul else self.compute_dtype, self.device)
        cache.matmul_attention = matmul
        return cache


class KVCache:
    """Preallocated keys/values [B, Hkv, capacity, D] per layer; all rows share one length
    (prompts are left-padded), so writing a step is one slice assignment per layer. `dtype` may
    be wider than the values written (float32 holding bf16 values: the same numbers)."""

    def __init__(self, n_layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.dtype = dtype
        self.matmul_attention = False  # decode through LeanQwen2._decode_attention (float32 only)
        shape = (batch, kv_heads, max(1, capacity), head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self._mark_dynamic()
        self.length = 0

    def _mark_dynamic(self) -> None:
        """Batch and capacity vary between caches: dynamic dimensions for a compiled decoding step."""
        for t in self.k + self.v:
            torch._dynamo.maybe_mark_dynamic(t, 0)
            torch._dynamo.maybe_mark_dynamic(t, 2)

    def reserve(self, n: int) -> int:
        """Room for n more positions (grows the buffers if needed); returns where they start."""
        start = self.length
        if start + n > self.k[0].shape[2]:
            extra = max(start + n - self.k[0].shape[2], self.k[0].shape[2] // 2, 16)
            grow = lambda t: torch.cat([t, t.new_empty(t.shape[:2] + (extra, t.shape[3]))], dim=2)  # noqa: E731
            self.k = [grow(t) for t in self.k]
            self.v = [grow(t) for t in self.v]
            self._mark_dynamic()
        self.length = start + n
        return start

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (in this order); used to repeat prompts and drop finished rows."""
        def take(t: torch.Tensor) -> torch.Tensor:  # copy only the filled part
            out = t.new_empty((len(rows),) + tuple(t.shape[1:]))
            out[:, :, : self.length] = t[rows, :, : self.length]
            return out

        self.k = [take(t) for t in self.k]
        self.v = [take(t) for t in self.v]
        self._mark_dynamic()
