"""Tiny random-weight stand-ins for hub models, built from configs (no hub access).

    d = build_model_dir(root, "qwen3")            # -> an ordinary HF directory, loaded by path
    d = hub_model(tmp_path_factory, "llama")     # the same, built once per test session

Each directory holds what a hub repo holds: config.json, model.safetensors, generation_config.json
and a tokenizer (tokenizer.json + tokenizer_config.json with a chat template). The tokenizer is a
byte-level BPE trained here (`tokenizers`) on a small procedural corpus of countdown-style prompts
and completions, with the special tokens of an instruct model:

- qwen2 / qwen3 (as Qwen2.5/Qwen3 instruct): no BOS, eos ``<|im_end|>``, pad ``<|endoftext|>``,
  generation eos ``[<|im_end|>, <|endoftext|>]``, tied embeddings; Qwen3 with an explicit
  head_dim (q projection wider than the hidden size) and q/k norms, as the real ones.
- llama (as Llama 3 instruct): a BOS ``<|begin_of_text|>`` added by the tokenizer's post-processor,
  eos ``<|im_end|>``, pad ``<|endoftext|>``, untied embeddings, llama3 rope scaling.

All three carry the same Qwen-style chat template (``<|im_start|>role ... <|im_end|>``; the llama one
starts with ``{{ bos_token }}``), with an optional ``enable_thinking`` switch as Qwen3's.

The pre-tokenizer is Qwen2Tokenizer's (regex split + ByteLevel): transformers 5 rebuilds a
qwen2/qwen3 checkpoint's tokenizer as Qwen2Tokenizer from vocab + merges, and a different
pipeline would silently change the ids (tests check the round trip after loading by path).

Head sizes: the default shapes use head_dim 32, the smallest that vLLM 0.32's CPU attention
kernels accept (32, 64, 80, 96, 112, 128, ...); pass ``head_dim=16`` for one they refuse.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

ARCHS = ("qwen2", "qwen3", "llama")

BOS = "<|begin_of_text|>"
EOS = "<|im_end|>"
PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
SPECIALS = [PAD, IM_START, EOS, BOS]

# Qwen2Tokenizer's pre-tokenizer split (the one transformers 5 rebuilds qwen2/qwen3 tokenizers with)
_QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' -}}"
    "{%- set rest = messages[1:] -%}"
    "{%- else -%}{%- set rest = messages -%}{%- endif -%}"
    "{%- for m in rest -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


def corpus(n: int = 600, seed: int = 0) -> list[str]:
    """Countdown-style prompts and completions, plus chat markup and free text with spaces,
    newlines and tabs, so the BPE learns merges for what the tests feed it."""
    rng = random.Random(seed)
    words = ["Using", "the", "numbers", "make", "target", "answer", "think", "each", "once", "with",
             "reach", "try", "so", "no", "ok", "step", "system", "user", "assistant", "You", "are", "a",
             "helpful", "solve", "equation", "final"]
    out = []
    for _ in range(n):
        nums = [rng.randint(1, 99) for _ in range(rng.randint(3, 4))]
        target = rng.randint(10, 999)
        a, b, c = nums[:3]
        op1, op2 = rng.choice("+-*/"), rng.choice("+-*/")
        out.append(f"{' '.join(map(str, nums))} -> {target}\n")
        out.append(f"Using the numbers {nums}, make {target}. Use each number once.\n")
        out.append(f"<think>\n{a} {op1} {b} = ?\ntry ({a} {op1} {b}) {op2} {c}\n</think>\n<answer>({a} {op1} {b}) {op2} {c}</answer>\n")
        out.append(f"answer: ({a}{op1}{b}){op2}{c}\n\n")
        out.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice([".", "\n", "\t", "  "]))
    return out


def build_tokenizer(arch: str, vocab_size: int = 384, max_len: int = 512):
    """A trained byte-level BPE as a transformers fast tokenizer, with special tokens and the
    chat template (see the module docstring)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    bos = None
    if arch == "llama":  # Llama 3: the post-processor prepends BOS to every encoded text
        bos = BOS
        bos_id = tok.token_to_id(BOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    template = ("{{- bos_token -}}" + CHAT_TEMPLATE) if bos else CHAT_TEMPLATE
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=EOS, pad_token=PAD, unk_token=None,
        additional_special_tokens=[IM_START], model_max_length=max_len, clean_up_tokenization_spaces=False,
        chat_template=template, padding_side="left",
    )


def build_config(arch: str, tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 2, kv_heads: int = 1,
                 head_dim: int | None = None, max_positions: int = 512):
    """A transformers config of `arch` at a tiny size. head_dim defaults to 32 (hidden // heads
    for qwen2, whose head size cannot be set apart from it)."""
    common = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=2 * hidden, max_position_embeddings=max_positions,
        rms_norm_eps=1e-6, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, use_cache=True,
    )
    if arch == "qwen2":
        from transformers import Qwen2Config

        if head_dim is not None:  # Qwen2 derives its head size: hidden // heads
            common["num_attention_heads"] = hidden // head_dim
            common["num_key_value_heads"] = min(kv_heads, hidden // head_dim)
        return Qwen2Config(tie_word_embeddings=True, **common)
    if arch == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(head_dim=head_dim or 32, tie_word_embeddings=True, **{**common, "num_attention_heads": 4,
                                                                               "num_key_value_heads": 2})
    if arch == "llama":
        from transformers import LlamaConfig

        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
        return LlamaConfig(head_dim=head_dim or 32, tie_word_embeddings=False, rope_parameters=rope, **common)
    raise ValueError(f"unknown architecture {arch!r} (one of {ARCHS})")


def build_model_dir(root: Path, arch: str, *, seed: int = 0, head_dim: int | None = None, max_positions: int = 512) -> Path:
    """Write a random-weight `arch` model and its tokenizer to root/<arch>[-hd<head_dim>]; return the path."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(root) / (arch if head_dim is None else f"{arch}-hd{head_dim}")
    tokenizer = build_tokenizer(arch, max_len=max_positions)
    config = build_config(arch, tokenizer, head_dim=head_dim, max_positions=max_positions)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


_BUILT: dict[tuple, Path] = {}


def hub_model(tmp_path_factory, arch: str, **kw) -> Path:
    """`build_model_dir` once per test session and arguments."""
    key = (arch, tuple(sorted(kw.items())))
    if key not in _BUILT:
        _BUILT[key] = build_model_dir(tmp_path_factory.mktemp(f"hub-{arch}"), arch, **kw)
    return _BUILT[key]


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
