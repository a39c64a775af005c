"""What a loaded model is (`LoadedModel`), how prompts become token ids (`encode_prompts`, the
chat format), and the package's one error, `ModelError`. Everything else in `spiral_cli.models`
builds on this module."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch

from spiral_cli.recipe import ModelSection

log = logging.getLogger(__name__)

BASE_SUBDIR = "base"  # where a LoRA checkpoint bundles its base model (save writes it, load reads it)


class ModelError(ValueError):
    """A user-facing model problem (bad name, missing directory, unsupported option); one line."""


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return (msg[0] if msg else type(e).__name__)[:300]


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
    max_seq_len: int | None = None  # the recipe's model.max_seq_len (a cap on prompt + completion tokens)

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
