"""Tiny random Qwen models built with transformers' own classes: the reference for each architecture."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import transformers

ARCHITECTURES = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}


def tiny_config(arch: str, yarn: bool = False, tied: bool = False, max_positions: int = 128) -> transformers.PretrainedConfig:
    common = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        rope_parameters=dict(YARN) if yarn else {"rope_type": "default", "rope_theta": 10000.0},
    )
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "qwen3":
        # head_dim deliberately not hidden_size / heads: qwenkit must take it from the config.
        return transformers.Qwen3Config(**common, head_dim=24)
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[1])
    if arch == "qwen2_moe":
        return transformers.Qwen2MoeConfig(**common, **moe, shared_expert_intermediate_size=64, norm_topk_prob=False)
    return transformers.Qwen3MoeConfig(**common, **moe, head_dim=16, norm_topk_prob=True)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough that every part of the model moves the logits (HF init is nearly zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def reference_model(config) -> torch.nn.Module:
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    randomize(model)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]  # added, not special (as in Qwen3)


def tiny_tokenizer(vocab_size: int = 300, chat_template: str = CHATML):
    """A byte-level BPE Qwen2Tokenizer: 256 byte symbols, a few merges, ChatML special tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    merges = []
    for pair in ("Ġ t", "h e", "i n", "e r", "a n", "Ġ a", "o n", "r e", "Ġt he", "e n", "a t", "o r", "e s", "Ġ s", "i s", "Ġ w", "i t", "Ġ o", "l l", "Ġ c"):
        a, b = pair.split()
        if len(vocab) >= vocab_size - len(SPECIAL_TOKENS):
            break
        vocab.setdefault(a + b, len(vocab))
        merges.append((a, b))
    while len(vocab) < vocab_size - len(SPECIAL_TOKENS) - len(THINK_TOKENS):
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    for t in SPECIAL_TOKENS + THINK_TOKENS:
        vocab[t] = len(vocab)
    tok = transformers.Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.add_tokens([transformers.AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    tok.chat_template = chat_template
    return tok


def save_tiny(arch: str, directory: Path, yarn: bool = False, tied: bool = False, max_shard_size=None, max_positions=128):
    """Save a tiny random model with a tokenizer; return the transformers reference model."""
    model = reference_model(tiny_config(arch, yarn, tied, max_positions))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    tiny_tokenizer().save_pretrained(directory)
    return model


# Qwen3-style: thinking on (the default) opens <think> in the prompt; off writes an empty block.
QWEN3_THINKING_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + (m['content'] or '') + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% else %}{{ '<think>\\n' }}{% endif %}{% endif %}"
)
