"""Rebuild a Qwen byte-level BPE tokenizer from the vocabulary a GGUF file carries."""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from qwenkit.errors import QwenkitError

# Qwen2's pre-tokenizer split (tokenizer.ggml.pre == "qwen2"): single digits, letters with one
# leading non-letter, punctuation runs, newlines, and spaces that stay before the next word.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_PRE_TOKENIZERS = {"qwen2", "deepseek-r1-qwen"}

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


def byte_level_bpe(
    tokens: list[str], merges: list[str], token_types: list[int], pre: str | None, model: str | None
) -> Tokenizer:
    if model != "gpt2":
        raise QwenkitError(f"unsupported GGUF tokenizer model {model!r}; Qwen uses byte-level BPE ('gpt2')")
    if pre not in QWEN_PRE_TOKENIZERS:
        raise QwenkitError(f"unsupported GGUF pre-tokenizer {pre!r}; qwenkit supports {sorted(QWEN_PRE_TOKENIZERS)}")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(BPE(vocab=vocab, merges=pairs, byte_fallback=False, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    special = [tokens[i] for i, t in enumerate(token_types) if t == TOKEN_TYPE_CONTROL]
    user_defined = [tokens[i] for i, t in enumerate(token_types) if t == TOKEN_TYPE_USER_DEFINED]
    # Both kinds must match whole in text (e.g. "<|im_start|>", "<think>"); only control tokens are "special"
    # (dropped by skip_special_tokens).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
    return tok
