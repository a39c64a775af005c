"""HFGenerator: batched sampling with a transformers model, a hand-written decoding loop.

Why a hand loop rather than ``model.generate``: it returns the sampling logprobs directly, it
prefills each prompt once and shares its KV cache among the n samples (``generate`` would
encode every prompt n times), and it drops finished rows from the batch so they stop costing.

Per chunk of at most ``batch_size`` sequences (prompts x samples):
  1. left-pad the chunk's unique prompts, prefill them once (logits of the last position only);
  2. repeat each prompt's KV cache rows for its samples (``DynamicCache.batch_select_indices``);
  3. loop: sample one token per row, record it and its logprob, retire rows that produced EOS,
     completed a stop string or hit max_new_tokens, run one decoding step for the rest.
Position ids follow the attention mask (left padding does not shift positions), so results do
not depend on which prompts share a batch (up to float rounding of different batch shapes).

The forward pass is either transformers' (any model, peft adapters, quantized weights) or, for
plain Qwen2 models, the lean path in `lean_qwen2.py` (``fast_decode``): same math, much less
per-step overhead, its own copy of the weights refreshed by `update_weights`.
"""
from __future__ import annotations

import contextlib
import math
import sys

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from spiral_cli.generation.base import Completion, check_generate_args, cut_at_stop
from spiral_cli.generation.lean_qwen2 import LeanQwen2
from spiral_cli.generation.lean_qwen2 import supports as lean_supports
from spiral_cli.models import LoadedModel, encode_prompts, eos_token_ids


class HFGenerator:
    """Generator backed by the in-memory model. The transformers engine shares its weights; the
    lean engine holds a copy, which `update_weights` refreshes after each optimizer step."""

    def __init__(self, loaded: LoadedModel, batch_size: int = 64, fast_decode: str | bool = "auto",
                 compile: bool = False):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.batch_size = int(batch_size)
        self.eos_ids = eos_token_ids(self.model, self.tokenizer)
        self._backend_tok = getattr(self.tokenizer, "backend_tokenizer", None)
        self.lean: LeanQwen2 | None = None
        mode = {True: "on", False: "off"}.get(fast_decode, fast_decode)  # type: ignore[arg-type]
        wanted = mode == "on" or (mode == "auto" and self.device.type == "cpu")
        if wanted and lean_supports(self.model):
            compute = torch.bfloat16 if loaded.autocast else next(self.model.parameters()).dtype
            self.lean = LeanQwen2(self.model, compute, compile_decode=compile and self.device.type == "cpu")
        if compile and (self.lean is None or self.device.type != "cpu"):
            print("note: generation.compile applies to the lean engine on the CPU (plain Qwen2, "
                  "generation.fast_decode); this model decodes uncompiled", file=sys.stderr)

    @property
    def engine(self) -> str:
        """Which forward pass samples: "lean" (spiral's Qwen2 path) or "transformers"."""
        return "lean" if self.lean is not None else "transformers"

    # -- protocol ------------------------------------------------------------------------------

    def update_weights(self, model=None) -> None:
        """The transformers path shares the trainer's weights; the lean path copies them again.
        A different model object may be passed in."""
        if model is not None:
            self.model = model
        if self.lean is not None:
            self.lean.load_weights(self.model)

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
        check_generate_args(prompts, n, max_new_tokens, temperature, top_p, top_k)
        if not prompts:
            return []
        stop = [s for s in (stop or []) if s]
        prompt_ids = self._encode(prompts)

        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())  # follows torch.manual_seed
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(seed))

        results: list[list[Completion | None]] = [[None] * n for _ in prompts]
        rows = [(i, j) for i in range(len(prompts)) for j in range(n)]
        model = self.model
        training = [m for m in model.modules() if m.training]  # restored exactly afterwards
        model.eval()
        decoder = _LeanDecoder(self.lean) if self.lean is not None else _TransformersDecoder(model)
        context = contextlib.nullcontext() if self.lean is not None else self.loaded.autocast_ctx()
        try:
            with torch.inference_mode(), context:
                for start in range(0, len(rows), self.batch_size):
                    chunk = rows[start:start + self.batch_size]
                    for (i, j), comp in zip(
                        chunk,
                        self._run_chunk(decoder, chunk, prompt_ids, max_new_tokens, temperature, top_p, top_k, stop, gen),
                    ):
                        results[i][j] = comp
        finally:
            for m in training:
                m.training = True
        return results  # type: ignore[return-value]

    # -- internals -----------------------------------------------------------------------------

    def _encode(self, prompts: list[str]) -> list[list[int]]:
        return encode_prompts(self.tokenizer, prompts)

    def _decode_batch(self, seqs: list[list[int]]) -> list[str]:
        if self._backend_tok is not None:
            return self._backend_tok.decode_batch(seqs, skip_special_tokens=True)
        return self.tokenizer.batch_decode(seqs, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _run_chunk(self, decoder, chunk, prompt_ids, max_new_tokens, temperature, top_p, top_k, stop, gen) -> list[Completion]:
        """Sample one chunk of (prompt, sample) rows: prefill each prompt once, then decode until
        every row has hit EOS or a stop string or the budget; finished rows leave the batch."""
        dev = self.device
        logits, attn, next_pos = self._prefill(decoder, chunk, prompt_ids, max_new_tokens)
        B = len(chunk)
        out_tok = torch.zeros((B, max_new_tokens), dtype=torch.long, device=dev)
        out_lp = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=dev)
        lengths = [0] * B
        reason = ["length"] * B
        active = torch.arange(B, device=dev)  # chunk row of each batch row
        active_list = list(range(B))
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=dev)
        tok_hist: list[list[int]] | None = [[] for _ in range(B)] if stop else None

        alive = [True] * B  # per batch row; finished rows are dropped lazily (see below)
        n_dead = 0
        for t in range(max_new_tokens):
            tok, lp = _sample(logits, temperature, top_k, top_p, gen)
            out_tok[active, t] = tok
            out_lp[active, t] = lp
            done_list = torch.isin(tok, eos).tolist()
            if tok_hist is not None:
                self._mark_stops(done_list, tok.tolist(), tok_hist, active_list, alive, stop)
            last = t == max_new_tokens - 1
            for b, r in enumerate(active_list):
                if not alive[b]:
                    continue
                if done_list[b]:
                    lengths[r] = t + 1
                    reason[r] = "stop"
                    alive[b] = False
                    n_dead += 1
                elif last:
                    lengths[r] = max_new_tokens
            if last or n_dead == len(active_list):
                break
            # Drop finished rows once they are >= 1/8 of the batch: each drop copies the cache,
            # so dropping rows one at a time would cost more than computing a few dead rows.
            if n_dead and n_dead * 8 >= len(active_list):
                keep_list = [b for b in range(len(active_list)) if alive[b]]
                keep = torch.tensor(keep_list, dtype=torch.long, device=dev)
                decoder.select(keep)
                attn, next_pos, tok, active = attn[keep], next_pos[keep], tok[keep], active[keep]
                active_list = [active_list[b] for b in keep_list]
                alive = [True] * len(active_list)
                n_dead = 0
            attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=1)
            logits = decoder.step(tok, attn, next_pos)
            next_pos = next_pos + 1

        decoder.release()
        return self._completions(chunk, prompt_ids, out_tok, out_lp, lengths, reason, stop)

    def _prefill(self, decoder, chunk, prompt_ids, max_new_tokens):
        """Prefill each distinct prompt of the chunk once (left-padded), then repeat its cache and
        last logits for its samples. Returns (logits, attention mask, next positions) per row."""
        dev = self.device
        # unique prompts of this chunk, in order, and how many rows (samples) each gets
        uniq: list[int] = []
        counts: list[int] = []
        for i, _ in chunk:
            if uniq and uniq[-1] == i:
                counts[-1] += 1
            else:
                uniq.append(i)
                counts.append(1)
        lens = [len(prompt_ids[i]) for i in uniq]
        L = max(lens)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        input_ids = torch.full((len(uniq), L), int(pad_id), dtype=torch.long)
        attn = torch.zeros((len(uniq), L), dtype=torch.long)
        for r, i in enumerate(uniq):
            ids = prompt_ids[i]
            input_ids[r, L - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attn[r, L - len(ids):] = 1
        input_ids, attn = input_ids.to(dev), attn.to(dev)
        pos = (attn.cumsum(-1) - 1).clamp_(min=0)

        logits = decoder.prefill(input_ids, attn, pos, capacity=L + max_new_tokens)
        next_pos = pos[:, -1] + 1
        if any(c > 1 for c in counts):
            idx = torch.repeat_interleave(torch.arange(len(uniq), device=dev), torch.tensor(counts, device=dev))
            decoder.select(idx)
            logits, attn, next_pos = logits[idx], attn[idx], next_pos[idx]
        return logits, attn, next_pos

    def _mark_stops(self, done_list: list[bool], tokens: list[int], tok_hist: list[list[int]],
                    active_list: list[int], alive: list[bool], stop: list[str]) -> None:
        """Append each live row's new token to its history and mark `done_list[b]` where the
        decoded tail (the longest stop string's bytes plus one token) contains a stop string."""
        window = max(len(s.encode("utf-8")) for s in stop) + 1
        rows_b = [b for b in range(len(active_list)) if alive[b]]
        tails = []
        for b in rows_b:
            h = tok_hist[active_list[b]]
            h.append(tokens[b])
            tails.append(h[-window:])
        for b, text in zip(rows_b, self._decode_batch(tails)):
            if not done_list[b] and any(s in text for s in stop):
                done_list[b] = True

    def _completions(self, chunk, prompt_ids, out_tok, out_lp, lengths, reason, stop) -> list[Completion]:
        B = len(chunk)
        toks = out_tok.cpu().tolist()
        lps = out_lp.cpu().tolist()
        ids_list = [toks[r][: lengths[r]] for r in range(B)]
        texts = self._decode_batch(ids_list)
        comps: list[Completion] = []
        for r, (i, _) in enumerate(chunk):
            text, which = cut_at_stop(texts[r], stop)
            fr = reason[r]
            if which is not None:
                fr = "stop"
            comps.append(
                Completion(
                    text=text,
                    token_ids=ids_list[r],
                    logprobs=lps[r][: lengths[r]],
                    prompt_tokens=len(prompt_ids[i]),
                    finish_reason=fr,
                    stop_str=which,
                )
            )
        return comps


class _TransformersDecoder:
    """One chunk's forward passes through the transformers model and a buffered DynamicCache."""

    def __init__(self, model):
        self.model = model
        self.cache = None

    def prefill(self, input_ids, attn, pos, capacity: int) -> torch.Tensor:
        self.cache = _make_cache(self.model, capacity=capacity)
        kw = dict(input_ids=input_ids, attention_mask=attn, position_ids=pos, past_key_values=self.cache, use_cache=True)
        try:
            out = self.model(**kw, logits_to_keep=1)  # only the last position's logits are needed
        except TypeError:  # a (remote-code) model without logits_to_keep
            kw["past_key_values"] = self.cache = _make_cache(self.model, capacity=capacity)
            out = self.model(**kw)
        self.cache = out.past_key_values
        return out.logits[:, -1, :]

    def select(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)

    def step(self, tok, attn, pos) -> torch.Tensor:
        out = self.model(input_ids=tok[:, None], attention_mask=attn, position_ids=pos[:, None],
                         past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1, :]

    def release(self) -> None:
        self.cache = None


class _LeanDecoder:
    """The same three calls on `LeanQwen2`; masks are built from the 0/1 attention mask."""

    def __init__(self, lean: LeanQwen2):
        self.lean = lean
        self.cache = None

    def prefill(self, input_ids, attn, pos, capacity: int) -> torch.Tensor:
        B, L = input_ids.shape
        self.cache = self.lean.new_cache(B, capacity)
        causal = torch.ones((L, L), dtype=torch.bool, device=attn.device).tril()
        mask = causal[None] & attn.bool()[:, None, :]
        # left-padding queries see nothing else: let them see themselves (no NaN rows)
        mask |= torch.eye(L, dtype=torch.bool, device=attn.device)[None]
        return self.lean.forward(input_ids, pos, mask[:, None], self.cache)

    def select(self, rows: torch.Tensor) -> None:
        self.cache.select(rows)

    def step(self, tok, attn, pos) -> torch.Tensor:
        return self.lean.forward(tok[:, None], pos[:, None], attn.bool()[:, None, None, :], self.cache)

    def release(self) -> None:
        self.cache = None


def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator):
    """One token per row -> (ids, logprob of each id under log_softmax(logits / T)).

    T == 0: greedy (argmax), logprob under T = 1. Top-k/top-p only restrict what can be
    sampled; the returned logprobs are not renormalised over the kept tokens.
    """
    logits = logits.float()
    if temperature == 0:
        tok = logits.argmax(dim=-1)
        lp = torch.log_softmax(logits, dim=-1).gather(-1, tok[:, None]).squeeze(-1)
        return tok, lp
    scaled = logits / temperature if temperature != 1.0 else logits
    logp = torch.log_softmax(scaled, dim=-1)
    filt = logp
    V = logp.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(filt, top_k, dim=-1).values[:, -1:]
        filt = filt.masked_fill(filt < kth, -math.inf)
    if top_p < 1.0:
        sorted_lp, order = torch.sort(filt, dim=-1, descending=True)
        probs = torch.softmax(sorted_lp, dim=-1)
        cum = probs.cumsum(dim=-1)
        remove = (cum - probs) >= top_p  # keep the smallest prefix with mass >= top_p (>= 1 token)
        sorted_lp = sorted_lp.masked_fill(remove, -math.inf)
        filt = torch.full_like(filt, -math.inf).scatter(-1, order, sorted_lp)
    # Gumbel-max via exponential races: argmax p_i / E_i, E_i ~ Exp(1), samples from softmax(filt)
    probs = torch.softmax(filt, dim=-1) if filt is not logp else logp.exp()
    # -log(U) is Exp(1); on the CPU this is ~5x cheaper than Tensor.exponential_ with a generator
    q = torch.rand(probs.shape, generator=gen, device=probs.device, dtype=probs.dtype).log_().neg_()
    tok = (probs / q).argmax(dim=-1)
    lp = logp.gather(-1, tok[:, None]).squeeze(-1)
    return tok, lp



def _make_cache(model, capacity: int):
    """A DynamicCache whose full-attention layers write into preallocated buffers (no
    per-step `torch.cat` of the whole cache); other layer kinds (sliding, linear) are kept."""
    config = getattr(model, "config", None)
    try:
        cache = DynamicCache(config=config) if config is not None else DynamicCache()
    except Exception:  # noqa: BLE001 - exotic configs: let the model build its own cache
        return None
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [_BufferedLayer(capacity) for _ in cache.layers]
    return cache


class _BufferedLayer(DynamicLayer):
    """transformers' DynamicLayer with a preallocated [B, H, capacity, D] buffer (grows if needed)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = max(int(capacity), 1)
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self._k = key_states.new_empty((b, h, self.capacity, d))
        self._v = value_states.new_empty((b, value_states.shape[1], self.capacity, value_states.shape[-1]))
        self.is_initialized = True

    def _grow(self, need: int) -> None:
        extra = max(need - self.capacity, self.capacity // 2, 16)
        self._k = torch.cat([self._k, self._k.new_empty(self._k.shape[:2] + (extra, self._k.shape[-1]))], dim=2)
        self._v = torch.cat([self._v, self._v.new_empty(self._v.shape[:2] + (extra, self._v.shape[-1]))], dim=2)
        self.capacity += extra

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        end = self.length + n
        if end > self.capacity:
            self._grow(end)
        self._k[:, :, self.length:end] = key_states
        self._v[:, :, self.length:end] = value_states
        self.length = end
        self.keys = self._k[:, :, :end]
        self.values = self._v[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        k = self._k.new_empty((len(indices),) + tuple(self._k.shape[1:]))
        v = self._v.new_empty((len(indices),) + tuple(self._v.shape[1:]))
        k[:, :, : self.length] = self._k[indices, :, : self.length]
        v[:, :, : self.length] = self._v[indices, :, : self.length]
        self._k, self._v = k, v
        self.keys = self._k[:, :, : self.length]
        self.values = self._v[:, :, : self.length]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.batch_select_indices(
                torch.arange(self._k.shape[0], device=self._k.device).repeat_interleave(repeats)
            )

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0:
            self.length = max(self.length + tokens_to_remove, 0)
        elif tokens_to_remove < self.length:
            self.length = tokens_to_remove
        if self.is_initialized:
            self.keys = self._k[:, :, : self.length]
            self.values = self._v[:, :, : self.length]

    def reset(self) -> None:
        self.length = 0
        self._k = self._v = None
        self.keys = self.values = None
        self.is_initialized = False

