"""Scratch models: the byte-level tokenizer built locally and the Qwen2-architecture presets
(``scratch:<preset>``), so a model can be trained with no hub access."""
from __future__ import annotations

from spiral_cli.models.loaded import ModelError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SCRATCH_PREFIX = "scratch:"


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
#   nano 1,018,240 | micro 2,215,232 | tiny 4,002,560 | tiny-deep 7,938,816 | small 31,610,368 | base 96,963,840
# tiny-deep is tiny with twice the layers (2x the compute per token): the next size to measure on a CPU,
# where small (~8x) does not fit a session (docs/results.md).
SCRATCH_PRESETS: dict[str, dict[str, int]] = {
    "nano": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512),
    "micro": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2, intermediate_size=768),
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=1024),
    "tiny-deep": dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, intermediate_size=1024),
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
