"""`load_model`: scratch presets, HF checkpoints (full or LoRA adapter-only), hub ids, LoRA and
4/8-bit quantization, each failure a one-line `ModelError`."""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from spiral_cli.adapters import AGGREGATOR_ADAPTER
from spiral_cli.models.cpu_attention import _use_cpu_attention
from spiral_cli.models.device import (
    MEASURE,
    forced_autocast_warning,
    measure_cpu_autocast,
    resolve_autocast,
    resolve_device,
    resolve_dtype,
)
from spiral_cli.models.loaded import (
    BASE_SUBDIR,
    LoadedModel,
    ModelError,
    _one_line,
    set_chat_format,
)
from spiral_cli.models.scratch import (
    SCRATCH_PREFIX,
    SCRATCH_PRESETS,
    build_byte_tokenizer,
    scratch_config,
)
from spiral_cli.recipe import ModelSection

log = logging.getLogger(__name__)
_WARNED: set[str] = set()  # one-line warnings already given in this process
# peft imports bitsandbytes when it is installed; on a CPU with AVX512-BF16 its CPU backend warns
# on import that an optional `kernels` package is missing. Not actionable for our users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _check_quantization(section: ModelSection, device: torch.device) -> None:
    """The first thing `load_model` does: a 4/8-bit base that cannot load here is one line naming
    the way out, before any weights are read."""
    if section.quantization == "none":
        return
    q = section.quantization
    bits = q.replace("bit", "-bit")
    way_out = "--set model.quantization=none trains the LoRA adapter on the full-precision base instead"
    if section.lora is None:
        raise ModelError(f"model.quantization={q} needs LoRA: set model.lora (a quantized base cannot be trained in full)")
    if device.type != "cuda" or not torch.cuda.is_available():
        where = f"model.device={section.device}" if section.device not in ("auto", "") and device.type != "cuda" \
            else "this machine has no CUDA device"
        raise ModelError(f"model.quantization={q}: {bits} bases need a CUDA GPU with bitsandbytes and {where}; {way_out}")
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        raise ModelError(f"model.quantization={q}: {bits} bases need bitsandbytes, which is not installed "
                         f"(pip install bitsandbytes); {way_out}") from None


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

    autocast_note = forced_autocast_warning(section.autocast, device, autocast)
    if autocast_note and autocast_note not in _WARNED:  # a run loads its model more than once
        _WARNED.add(autocast_note)
        log.warning(autocast_note)
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
        max_seq_len=section.max_seq_len,
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
