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

Modules (their public names, and `_matmul_attention`, are importable from ``spiral_cli.models``
as before; to patch a name in a test or a bench, patch the module that defines it):

- ``loaded``: `LoadedModel`, `ModelError`, prompt encoding and the chat format.
- ``scratch``: the byte-level tokenizer and the scratch presets.
- ``device``: device, dtype and bf16 autocast (measured on this CPU when needed).
- ``cpu_attention``: the CPU attention kernels load_model switches CPU models to.
- ``load``: `load_model`.
- ``save``: `save_checkpoint`.
"""
from __future__ import annotations

from spiral_cli.models.cpu_attention import (
    CPU_ATTENTION,
    MATMUL_ATTENTION_MAX_LEN,
    _matmul_attention,
)
from spiral_cli.models.device import (
    AUTOCAST_MARGIN,
    MEASURE,
    measure_cpu_autocast,
    resolve_autocast,
    resolve_device,
    resolve_dtype,
)
from spiral_cli.models.load import load_model
from spiral_cli.models.loaded import (
    BASE_SUBDIR,
    CHAT_ATTR,
    ChatFormat,
    LoadedModel,
    ModelError,
    chat_format,
    count_parameters,
    encode_prompts,
    eos_token_ids,
    set_chat_format,
)
from spiral_cli.models.save import save_checkpoint
from spiral_cli.models.scratch import (
    EOS_TOKEN,
    PAD_TOKEN,
    SCRATCH_PREFIX,
    SCRATCH_PRESETS,
    build_byte_tokenizer,
    scratch_config,
)

__all__ = [
    "AUTOCAST_MARGIN",
    "BASE_SUBDIR",
    "CHAT_ATTR",
    "CPU_ATTENTION",
    "ChatFormat",
    "EOS_TOKEN",
    "LoadedModel",
    "MATMUL_ATTENTION_MAX_LEN",
    "MEASURE",
    "ModelError",
    "PAD_TOKEN",
    "SCRATCH_PREFIX",
    "SCRATCH_PRESETS",
    "_matmul_attention",
    "build_byte_tokenizer",
    "chat_format",
    "count_parameters",
    "encode_prompts",
    "eos_token_ids",
    "load_model",
    "measure_cpu_autocast",
    "resolve_autocast",
    "resolve_device",
    "resolve_dtype",
    "save_checkpoint",
    "scratch_config",
    "set_chat_format",
]
