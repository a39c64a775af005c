"""Load and save models: scratch presets with a byte tokenizer, HF checkpoints, LoRA, 4/8-bit.

Sources (`load_model(section, source=...)`; the caller resolves registry names first):

- ``scratch:<preset>`` -- a small Qwen2-architecture model initialised from a seed, with the
  byte-level tokenizer built locally (no hub access needed). See `SCRATCH_PRESETS`.
- a local directory -- a full HF checkpoint, or a peft adapter-only checkpoint
  (``adapter_config.json``); the adapter's base is ``<dir>/base`` when the checkpoint bundles
  one, else the adapter config's ``base_model_name_or_path`` (a hub id or a directory).
- a hub id -- ``AutoModelForCausalLM.from_pretrained`` (cache or download).

Checkpoints written by `save_checkpoint` are plain HF directories: full models load with
``AutoModelForCausalLM`` / ``AutoTokenizer``, LoRA checkpoints with
``peft.AutoPeftModelForCausalLM``, without this package.

User mistakes raise `ModelError` with a one-line message.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spiral_cli.adapters import AGGREGATOR_ADAPTER
from spiral_cli.recipe import ModelSection

log = logging.getLogger(__name__)
# peft imports bitsandbytes when it is installed; on a CPU with AVX512-BF16 its CPU backend warns
# on import that an optional `kernels` package is missing. Not actionable for our users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SCRATCH_PREFIX = "scratch:"
BASE_SUBDIR = "base"  # where a LoRA checkpoint bundles its base model
_BUNDLE_COPY_LIMIT = 2 * 1024**3  # copy (not hard-link) a local base only below this size


class ModelError(ValueError):
    """A user-facing model problem (bad name, missing directory, unsupported option); one line."""


# --------------------------------------------------------------------------------------------
# Byte-level tokenizer
# --------------------------------------------------------------------------------------------

# The pre-tokenizer regex of Qwen2Tokenizer. With no merges it does not change the ids (every
# byte is one token whatever the split); we use it so that our tokenizer is *identical* to the
# Qwen2Tokenizer that transformers 5 rebuilds from our vocab when `AutoTokenizer` loads a
# qwen2-type checkpoint (it ignores tokenizer_class for model_type qwen2 and re-creates the
# pipeline from vocab + merges: NFC normaliser, this split, ByteLevel). A pure byte vocab (" " ->
# id 32 as the literal " ") would lose spaces and newlines in that rebuild; the GPT-2 byte-to-
# unicode alphabet does not.
_QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (used by ByteLevel)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_byte_tokenizer(model_max_length: int = 1024):
    """The scratch models' tokenizer: one token per UTF-8 byte (id == byte value, 0..255),
    then ``<|endoftext|>`` (256; eos, no bos is prepended) and ``<|pad|>`` (257); left padding.

    Text is NFC-normalised before encoding (as Qwen2Tokenizer does), so decode(encode(s)) == s
    for every NFC string (all ASCII, and virtually all real text).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    b2u = _bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    tok = Tokenizer(
        BPE(vocab=vocab, merges=[], dropout=None, unk_token=None, continuing_subword_prefix="",
            end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(EOS_TOKEN, special=True, normalized=False), AddedToken(PAD_TOKEN, special=True, normalized=False)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=None,
        padding_side="left",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


# --------------------------------------------------------------------------------------------
# Scratch presets (Qwen2 architecture, tied embeddings, vocab 258 = 256 bytes + 2 specials)
# --------------------------------------------------------------------------------------------

# Parameter counts measured with the byte tokenizer (vocab 258, tied embeddings):
#   nano 1,018,240 | micro 2,215,232 | tiny 4,002,560 | small 31,610,368 | base 96,963,840
SCRATCH_PRESETS: dict[str, dict[str, int]] = {
    "nano": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512),
    "micro": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2, intermediate_size=768),
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=1024),
    "small": dict(hidden_size=512, num_hidden_layers=10, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1536),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4, intermediate_size=2816),
}


def scratch_config(preset: str, tokenizer, max_seq_len: int = 1024):
    from transformers import Qwen2Config

    if preset not in SCRATCH_PRESETS:
        raise ModelError(f"unknown scratch preset {preset!r} (choose from: {', '.join(SCRATCH_PRESETS)})")
    return Qwen2Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_seq_len,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-6,
        use_cache=True,
        **SCRATCH_PRESETS[preset],
    )


# --------------------------------------------------------------------------------------------
# Devices, dtypes, autocast
# --------------------------------------------------------------------------------------------


def resolve_device(spec: str) -> torch.device:
    """"auto" -> cuda if available else cpu; "cpu", "cuda", "cuda:N" as given (checked)."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ModelError(f"model.device: unknown device {spec!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"model.device: {spec!r} requested but this machine has no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"model.device: {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise ModelError(f"model.device: unsupported device {spec!r} (use auto, cpu, cuda or cuda:N)")
    return dev


def _bf16_ok(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """"auto" -> bfloat16 on a CUDA device with bf16 support, else float32."""
    if spec == "auto":
        return torch.bfloat16 if _bf16_ok(device) else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec]


MEASURE = "measure"  # resolve_autocast's answer when only a timing on this CPU can tell


def resolve_autocast(spec: str, device: torch.device, dtype: torch.dtype) -> bool | str:
    """Whether forward/backward run under bf16 autocast (fp32 master weights).

    "auto": on for CUDA with bf16 support; on a CPU, MEASURE: the CPU's flags do not tell.
    A 2-core Xeon with AMX ran a scratch:tiny step 5x faster under bf16; a Xeon with
    AVX512-BF16 and no AMX 1.4x slower (336 vs 235 ms); an AMD EPYC with AVX512-BF16 and no AMX
    1.8x faster (bench/README.md, "bf16 autocast on the CPU"). Never on for a float16 model.
    """
    if dtype == torch.float16:
        return False
    if spec == "on":
        return device.type in ("cuda", "cpu")
    if spec == "off":
        return False
    if device.type == "cuda":
        return _bf16_ok(device)
    if device.type == "cpu" and dtype == torch.float32:
        return MEASURE
    return False


# decisions already measured in this process, by model shape (a run loads its model more than once)
_AUTOCAST_MEASURED: dict[tuple, tuple[bool, str]] = {}
AUTOCAST_MARGIN = 0.9  # bf16 must be >10% faster: a near tie keeps fp32, so noise rarely flips it


def measure_cpu_autocast(model, for_training: bool, timer=time.perf_counter) -> tuple[bool, str]:
    """Time the model itself on a small batch (8 x 64 tokens) in fp32 and under bf16 autocast,
    forward+backward when it will train, forward only when it will sample; alternate the two,
    keep each one's fastest of 3 after a warm-up. Leaves weights, gradients and the torch RNG as
    they were. Returns (use bf16, a one-line note with both timings)."""
    cfg = model.config
    key = (type(model).__name__, getattr(cfg, "hidden_size", None), getattr(cfg, "num_hidden_layers", None),
           getattr(cfg, "vocab_size", None), for_training, torch.get_num_threads())
    if key in _AUTOCAST_MEASURED:
        return _AUTOCAST_MEASURED[key]
    rng_state = torch.get_rng_state()
    ids = torch.randint(0, min(int(getattr(cfg, "vocab_size", 256) or 256), 256), (8, 64),
                        generator=torch.Generator().manual_seed(0)).to(next(model.parameters()).device)

    def step(bf16: bool) -> float:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        t = timer()
        if for_training:
            with ctx:
                loss = model(input_ids=ids).logits.float().mean()
            loss.backward()
        else:
            with torch.inference_mode(), ctx:
                model(input_ids=ids)
        return timer() - t

    try:
        best = {True: float("inf"), False: float("inf")}
        for rep in range(4):
            for bf16 in (False, True):
                seconds = step(bf16)
                if rep:  # the first of each is a warm-up
                    best[bf16] = min(best[bf16], seconds)
    finally:
        for p in model.parameters():
            p.grad = None
        torch.set_rng_state(rng_state)
    use = best[True] < AUTOCAST_MARGIN * best[False]
    note = (f"autocast auto: bf16 {best[True] * 1e3:.0f} ms vs fp32 {best[False] * 1e3:.0f} ms per "
            f"{'training' if for_training else 'forward'} step on this CPU -> {'bf16' if use else 'fp32'}")
    _AUTOCAST_MEASURED[key] = (use, note)
    return use, note


# --------------------------------------------------------------------------------------------
# CPU attention without repeat_kv
# --------------------------------------------------------------------------------------------

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
    """Attention as two matmuls and a float32 softmax, for training on the CPU: torch's CPU
    flash-attention backward took ~7 ms per layer per step (profiled, scratch:tiny, 16x84 tokens);
    with this form a training step went 117 -> 96 ms (bench/sft_step.py). Grouped heads are folded into the query rows (no K/V copies).
    query (B, H, Lq, d); key, value (B, Hkv, Lk, d); a boolean mask (B, 1, Lq, Lk), True = attend.
    Returns (B, Lq, H, d) like the sdpa path."""
    b, h, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    groups = h // hkv
    q = query.reshape(b, hkv, groups * lq, d)  # head i uses K/V head i // groups, as repeat_kv
    scores = torch.matmul(q, key.transpose(-1, -2)) * (scaling if scaling is not None else d**-0.5)
    keep = None
    if attention_mask is not None:
        keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        keep = keep.repeat(1, 1, groups, 1)
    elif causal:
        keep = torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril(lk - lq).repeat(groups, 1)
    if keep is not None:  # the dtype's minimum, not -inf: a fully masked (padding) row stays finite
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
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


# --------------------------------------------------------------------------------------------
# LoadedModel
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    model: Any  # PreTrainedModel or peft.PeftModel
    tokenizer: Any  # PreTrainedTokenizerBase, pad token set, padding_side="left"
    device: torch.device
    is_lora: bool
    source: str  # what was loaded: scratch:<preset>, a directory or a hub id
    dtype: torch.dtype
    autocast: bool = False  # resolved ModelSection.autocast
    autocast_note: str = ""  # how "auto" decided, when it measured
    base_source: str | None = None  # for LoRA: where the base model came from
    scratch_preset: str | None = None  # set when the (base) model was built from a preset
    quantization: str = "none"

    def autocast_ctx(self) -> contextlib.AbstractContextManager:
        """bf16 autocast where the section asked for it, else a no-op context."""
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    @property
    def eos_token_ids(self) -> list[int]:
        return eos_token_ids(self.model, self.tokenizer)


def eos_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's eos plus the generation config's eos ids (Qwen instruct models have two)."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    extra = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if isinstance(extra, int):
        extra = [extra]
    for i in extra or []:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    return ids


@dataclass(frozen=True)
class ChatFormat:
    """How prompts go through a tokenizer's chat template (recipe: model.chat_template). The task's
    prompt is the user message, after an optional system message; the template adds the
    assistant's turn header (add_generation_prompt) and sees the extra `kwargs`."""

    system_prompt: str | None = None
    kwargs: tuple[tuple[str, Any], ...] = ()

    def messages(self, prompt: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        return system + [{"role": "user", "content": prompt}]

    def render(self, tokenizer, prompts: list[str]) -> list[str]:
        return [tokenizer.apply_chat_template(self.messages(p), tokenize=False, add_generation_prompt=True,
                                              **dict(self.kwargs)) for p in prompts]


CHAT_ATTR = "_spiral_chat_format"  # where load_model leaves a tokenizer's ChatFormat (None = raw text)


def chat_format(tokenizer) -> ChatFormat | None:
    return getattr(tokenizer, CHAT_ATTR, None)


def set_chat_format(tokenizer, section: ModelSection, source: str = "") -> ChatFormat | None:
    """Decide, from model.chat_template, whether prompts go through this tokenizer's chat template;
    record it on the tokenizer (encode_prompts reads it) and return it. The template is tried on a
    probe prompt now, so a broken template or kwarg fails at load time in one line."""
    cfg = section.chat_template
    has = bool(getattr(tokenizer, "chat_template", None))
    fmt = None
    if cfg.use == "on" and not has:
        raise ModelError(f"model.chat_template.use=on: the tokenizer of {source or 'the model'} has no chat template "
                         "(use auto or off)")
    if cfg.use != "off" and has:
        fmt = ChatFormat(cfg.system_prompt, tuple(sorted(cfg.kwargs.items())))
        try:
            fmt.render(tokenizer, ["probe"])
        except Exception as e:  # noqa: BLE001 - jinja errors, a template that needs other roles...
            raise ModelError(f"model.chat_template: the chat template of {source or 'the model'} failed on a test "
                             f"prompt: {_one_line(e)} (set model.chat_template.use=off to send raw prompts)") from None
    elif cfg.use == "auto" and (cfg.system_prompt is not None or cfg.kwargs):
        log.warning("model.chat_template: the tokenizer of %s has no chat template; system_prompt and kwargs are unused",
                    source or "the model")
    setattr(tokenizer, CHAT_ATTR, fmt)
    return fmt


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Prompt ids exactly as the generators see them. Use this wherever a prompt is re-encoded
    (sft's examples, the RL loss's teacher-forced pass) so the contexts match.

    With a chat format (`set_chat_format`; hub models with a template): the prompt rendered by
    ``apply_chat_template`` as the user message (system message, generation prompt, template
    kwargs), then encoded without adding special tokens, as ``apply_chat_template(tokenize=True)``
    does (the template writes its own BOS). Otherwise the raw text: `tokenizer(prompt)` with the
    tokenizer's own special tokens (a BOS for models that use one; none for the byte tokenizer or
    Qwen), and an empty prompt as a single start token (bos, else eos)."""
    fmt = chat_format(tokenizer)
    if fmt is not None:
        return [list(ids) for ids in tokenizer(fmt.render(tokenizer, list(prompts)), add_special_tokens=False)["input_ids"]]
    enc = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [list(ids) if len(ids) else [int(start)] for ids in enc]


def count_parameters(model) -> tuple[int, int]:
    """(total, trainable) parameter counts (tied weights counted once; 4-bit params as stored)."""
    total = trainable = 0
    for p in model.parameters():  # parameters() de-duplicates shared tensors
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return total, trainable


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return (msg[0] if msg else type(e).__name__)[:300]


def _check_quantization(section: ModelSection, device: torch.device) -> None:
    if section.quantization == "none":
        return
    bits = section.quantization.replace("bit", "-bit")
    if section.lora is None:
        raise ModelError(f"model.quantization={section.quantization} needs LoRA: set model.lora (a quantized base cannot be trained in full)")
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ModelError(
            f"{bits} quantization needs a CUDA GPU and bitsandbytes (pip install bitsandbytes); this machine has no CUDA device"
        )
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        raise ModelError(f"{bits} quantization needs a CUDA GPU and bitsandbytes (pip install bitsandbytes); bitsandbytes is not installed") from None


def _bnb_config(section: ModelSection):
    from transformers import BitsAndBytesConfig

    if section.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def _finish_tokenizer(tokenizer) -> Any:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError("the tokenizer has neither a pad nor an eos token; cannot batch prompts")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _is_pathlike(src: str) -> bool:
    return src.startswith(("/", "./", "../", "~", ".\\")) or os.sep in src and Path(src).expanduser().exists()


def _load_tokenizer(location: str, section: ModelSection):
    from transformers import AutoTokenizer

    if not Path(location).is_dir():
        return _from_hub(AutoTokenizer, location, "tokenizer", trust_remote_code=section.trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(location, trust_remote_code=section.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any failure is reported in one line
        raise ModelError(f"could not load the tokenizer of {location!r}: {_one_line(e)}") from None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on") or os.environ.get(
        "TRANSFORMERS_OFFLINE", ""
    ).strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub endpoint, so that an offline machine fails in seconds rather
    than after huggingface_hub's minute of retries. Assumed reachable behind a proxy."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _from_hub(auto_cls, repo_id: str, what: str, **kwargs):
    """`auto_cls.from_pretrained(repo_id)`: local cache first, then the hub if it is reachable."""
    not_found = (
        f"model {repo_id!r} is not a local directory, a scratch:<preset> or a registry name, and its {what} "
        "could not be found on the Hugging Face Hub or in the local cache"
    )
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(repo_id)
    except Exception:  # noqa: BLE001
        raise ModelError(f"{not_found} (not a valid hub id)") from None
    cached_error: Exception | None = None
    if _in_hub_cache(repo_id):
        local = dict(kwargs, local_files_only=True)
        if what == "model":  # transformers 5 does not pass local_files_only to its adapter lookup
            local["adapter_kwargs"] = {"local_files_only": True}
        try:
            return auto_cls.from_pretrained(repo_id, **local)
        except Exception as e:  # noqa: BLE001 - e.g. an incomplete cache: try the hub
            cached_error = e
    if _hub_offline():
        why = f": {_one_line(cached_error)}" if cached_error else " (offline: HF_HUB_OFFLINE is set)"
        raise ModelError(f"{not_found}{why}") from None
    if not _hub_reachable():
        raise ModelError(f"{not_found} (the hub is unreachable: offline?)") from None
    try:
        return auto_cls.from_pretrained(repo_id, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{not_found}: {_one_line(e)}") from None


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001
        return False


def _has_tokenizer(d: Path) -> bool:
    return any((d / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"))


def _load_full(location: str, section: ModelSection, device: torch.device, dtype: torch.dtype, *, is_dir: bool):
    """AutoModelForCausalLM from a directory or hub id (quantized when the section says so)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": section.trust_remote_code}
    if section.quantization != "none":
        kwargs["quantization_config"] = _bnb_config(section)
        kwargs["device_map"] = {"": device.index if device.index is not None else 0}
        kwargs["dtype"] = torch.bfloat16 if dtype == torch.float32 else dtype
    if is_dir:
        try:
            model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"could not load a causal LM from directory {location}: {_one_line(e)}") from None
    else:
        model = _from_hub(AutoModelForCausalLM, location, "model", **kwargs)
    if section.quantization == "none":
        model.to(device)
    return model


def _build_scratch(preset: str, section: ModelSection, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import Qwen2ForCausalLM

    tokenizer = build_byte_tokenizer(section.max_seq_len)
    config = scratch_config(preset, tokenizer, section.max_seq_len)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    if section.quantization != "none":
        # Allowed but pointless: write the fresh model out and reload it quantized.
        with tempfile.TemporaryDirectory(prefix="spiral-scratch-") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            model = _load_full(tmp, section, device, dtype, is_dir=True)
    else:
        model.to(device=device, dtype=dtype)
    return model, tokenizer


def _apply_lora(model, section: ModelSection, seed: int):
    from peft import LoraConfig, get_peft_model

    lora = section.lora
    assert lora is not None
    cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, cfg)
        except ValueError as e:
            raise ModelError(f"model.lora: {_one_line(e)}") from None


def _prepare_training(model, section: ModelSection, for_training: bool) -> None:
    if section.quantization != "none":
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=section.gradient_checkpointing and for_training,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif section.gradient_checkpointing and for_training:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_model(
    section: ModelSection,
    *,
    source: str | None = None,
    for_training: bool = True,
    seed: int = 0,
) -> LoadedModel:
    """Load the model described by `section` from `source` (default: `section.name`).

    `source` is already resolved: ``scratch:<preset>``, a local directory or a hub id.
    `for_training=False` puts the model in eval mode, freezes it and merges a LoRA adapter into
    the base (faster generation; the result is then a plain model, ``is_lora=False``) unless the
    base is quantized.
    """
    src = (source if source is not None else section.name).strip()
    if not src:
        raise ModelError("model.name is empty")
    device = resolve_device(section.device)
    _check_quantization(section, device)
    dtype = resolve_dtype(section.dtype, device)
    autocast = resolve_autocast(section.autocast, device, dtype)

    scratch_preset: str | None = None
    base_source: str | None = None
    is_adapter_dir = False

    if src.startswith(SCRATCH_PREFIX):
        scratch_preset = src[len(SCRATCH_PREFIX):]
        if scratch_preset not in SCRATCH_PRESETS:
            raise ModelError(f"unknown scratch preset {scratch_preset!r} (choose from: {', '.join(SCRATCH_PRESETS)})")
        model, tokenizer = _build_scratch(scratch_preset, section, device, dtype, seed)
    else:
        path = Path(src).expanduser()
        if path.is_dir():
            src = str(path.resolve())
            if (path / "adapter_config.json").is_file():
                is_adapter_dir = True
                model, tokenizer, base_source, scratch_preset = _load_adapter_dir(path, section, device, dtype, for_training)
            elif (path / "config.json").is_file():
                model = _load_full(src, section, device, dtype, is_dir=True)
                tokenizer = _load_tokenizer(src, section)
                scratch_preset = _read_meta(path).get("scratch_preset")
            else:
                raise ModelError(f"{path} is not a model checkpoint (no config.json or adapter_config.json)")
        elif path.exists():
            raise ModelError(f"model path {path} is a file; expected a checkpoint directory")
        elif _is_pathlike(src):
            raise ModelError(f"model directory not found: {path}")
        else:
            model = _load_full(src, section, device, dtype, is_dir=False)
            tokenizer = _load_tokenizer(src, section)

    tokenizer = _finish_tokenizer(tokenizer)
    set_chat_format(tokenizer, section, src)
    _use_cpu_attention(model.get_base_model() if hasattr(model, "get_base_model") else model, device)
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    is_lora = is_adapter_dir
    if is_adapter_dir:
        # a quantized base was prepared before its adapter was attached (_load_adapter_dir)
        if section.quantization == "none" and section.gradient_checkpointing and for_training:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif section.lora is not None:
        base_source = src
        _prepare_training(model, section, for_training)
        model = _apply_lora(model, section, seed)
        is_lora = True
    else:
        _prepare_training(model, section, for_training)

    if not for_training:
        # merged = a plain model for sampling; a second (aggregator) adapter keeps the adapters
        # separate so each role samples with its own
        if is_lora and section.quantization == "none" and AGGREGATOR_ADAPTER not in model.peft_config:
            model = model.merge_and_unload()
            is_lora = False
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    else:
        model.train()

    autocast_note = ""
    if autocast == MEASURE:
        autocast, autocast_note = measure_cpu_autocast(model, for_training)
        log.info(autocast_note)

    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        is_lora=is_lora,
        source=src,
        dtype=dtype,
        autocast=autocast,
        autocast_note=autocast_note,
        base_source=base_source,
        scratch_preset=scratch_preset,
        quantization=section.quantization,
    )


def _read_meta(path: Path) -> dict[str, Any]:
    f = path / "spiral_model.json"
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return {}


def _load_adapter_dir(path: Path, section: ModelSection, device, dtype, for_training: bool):
    from peft import PeftModel

    try:
        adapter_cfg = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}/adapter_config.json is unreadable: {_one_line(e)}") from None
    bundled = path / BASE_SUBDIR
    if (bundled / "config.json").is_file():
        base = str(bundled.resolve())
    else:
        base = adapter_cfg.get("base_model_name_or_path") or ""
        if not base:
            raise ModelError(f"{path}/adapter_config.json names no base_model_name_or_path")
    base_path = Path(base).expanduser()
    if base_path.is_dir():
        model = _load_full(str(base_path.resolve()), section, device, dtype, is_dir=True)
        base_tok_loc = str(base_path.resolve())
    elif _is_pathlike(base):
        raise ModelError(f"the base model of adapter {path} is missing: directory {base} not found")
    else:
        model = _load_full(base, section, device, dtype, is_dir=False)
        base_tok_loc = base
    tokenizer = _load_tokenizer(str(path) if _has_tokenizer(path) else base_tok_loc, section)
    if section.quantization != "none":
        _prepare_training(model, section, for_training)
    if section.lora is not None:
        cur = adapter_cfg.get("r"), adapter_cfg.get("lora_alpha")
        if cur != (section.lora.r, section.lora.alpha):
            log.warning("continuing the adapter in %s (r=%s, alpha=%s); model.lora's r/alpha are ignored", path, *cur)
    try:
        model = PeftModel.from_pretrained(model, str(path), is_trainable=for_training)
        agg_dir = path / AGGREGATOR_ADAPTER  # a second adapter for the aggregation role, if any
        if (agg_dir / "adapter_config.json").is_file():
            model.load_adapter(str(agg_dir), adapter_name=AGGREGATOR_ADAPTER, is_trainable=for_training)
            if for_training:
                model.set_requires_grad(list(model.peft_config), requires_grad=True)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"could not attach the LoRA adapter in {path}: {_one_line(e)}") from None
    meta = _read_meta(path)
    return model, tokenizer, base, meta.get("scratch_preset")


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def _dir_size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def _bundle_local_base(src: Path, dst: Path) -> bool:
    """Hard-link (or copy, if small) a local base checkpoint into dst. False = too big to copy."""
    files = [f for f in src.rglob("*") if f.is_file()]
    try:
        for f in files:
            out = dst / f.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            os.link(f, out)
        return True
    except OSError:
        shutil.rmtree(dst, ignore_errors=True)
    if _dir_size(src) > _BUNDLE_COPY_LIMIT:
        return False
    shutil.copytree(src, dst)
    return True


def save_checkpoint(
    loaded: LoadedModel,
    path: Path,
    *,
    extra_files: dict[str, bytes] | None = None,
    final_path: Path | None = None,
) -> None:
    """Write a plain HF checkpoint directory at `path` (created if missing).

    Full models: ``config.json``, ``model.safetensors``, generation config, tokenizer.
    LoRA: the adapter (``adapter_config.json`` + ``adapter_model.safetensors``) and tokenizer;
    a scratch base, or a base loaded from a local directory, is bundled under ``<path>/base``
    (a local base is hard-linked, so this costs no space on the same filesystem) and
    ``base_model_name_or_path`` is set to the absolute path of that bundle *at `final_path`*
    (default: `path`) -- pass the checkpoint's final location when writing into a temporary
    directory that is renamed afterwards. A hub base is referenced by its id.
    `extra_files` maps relative file names to contents (e.g. a recipe snapshot).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    final = Path(final_path if final_path is not None else path).expanduser().absolute()
    model = loaded.model
    meta: dict[str, Any] = {"source": loaded.source, "scratch_preset": loaded.scratch_preset, "is_lora": loaded.is_lora}
    if loaded.is_lora:
        model.save_pretrained(str(path))
        base_ref = loaded.base_source or ""
        base_dir = path / BASE_SUBDIR
        if loaded.scratch_preset is not None and (base_ref.startswith(SCRATCH_PREFIX) or not Path(base_ref).is_dir()):
            base_model = model.get_base_model()
            base_model.save_pretrained(str(base_dir), state_dict=_base_state_dict(base_model))
            loaded.tokenizer.save_pretrained(str(base_dir))
            base_ref = str(final / BASE_SUBDIR)
        elif base_ref and Path(base_ref).is_dir():
            src = Path(base_ref).resolve()
            if _bundle_local_base(src, base_dir):
                base_ref = str(final / BASE_SUBDIR)
            else:
                base_ref = str(src)
        for cfg_file in (path / "adapter_config.json", path / AGGREGATOR_ADAPTER / "adapter_config.json"):
            if cfg_file.is_file():  # the aggregator adapter, when there is one, sits in a subdir
                cfg = json.loads(cfg_file.read_text())
                cfg["base_model_name_or_path"] = base_ref
                cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        meta["base"] = base_ref
    else:
        model.save_pretrained(str(path))
    loaded.tokenizer.save_pretrained(str(path))
    (path / "spiral_model.json").write_text(json.dumps(meta, indent=2))
    for name, data in (extra_files or {}).items():
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise ModelError(f"extra file name {name!r} must be a relative path inside the checkpoint")
        out = path / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)


def _base_state_dict(base_model) -> dict[str, torch.Tensor]:
    """The base weights of a model with LoRA layers injected: no lora_* tensors, and
    ``x.base_layer.weight`` renamed back to ``x.weight`` (unmerged, i.e. the original base)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in base_model.state_dict().items():
        if "lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v
    return out
