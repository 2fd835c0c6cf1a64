"""A Qwen3-MoE GGUF of random blocks at any shape, written straight from bytes (no float model):
for memory tests and benchmarks at real layer shapes, where only sizes and speed matter.

llama.cpp's names and metadata keys (qwen3moe), with a tiny byte-level vocabulary so llama.cpp
loads it too. Each quantized block gets random codes and small fp16 scales, so values stay sane.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from tiny_gguf import add_tokenizer
from tiny_models import tiny_tokenizer

Q = gguf.GGMLQuantizationType
# Byte offsets of each block's fp16 scales (ggml-common.h): d, and dmin where the type has one.
_SCALES = {Q.Q4_0: (0,), Q.Q8_0: (0,), Q.Q4_K: (0, 2), Q.Q6_K: (208,)}


@dataclass(frozen=True)
class MoeShape:
    layers: int = 2
    hidden: int = 2048
    experts: int = 128
    active: int = 8
    moe_intermediate: int = 768
    heads: int = 32
    kv_heads: int = 4
    head_dim: int = 128
    vocab: int = 300


QWEN3_30B_A3B = MoeShape()  # its real layer shapes (48 layers and a 151,936-token vocabulary in the release)


def random_blocks(kind: Q, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """uint8 [*shape[:-1], bytes per row] of random `kind` blocks for rows of shape[-1] values."""
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    blocks = rng.integers(0, 256, (*shape[:-1], shape[-1] // block_values, block_bytes), dtype=np.uint8)
    for at in _SCALES[kind]:
        scale = rng.uniform(0.0005, 0.002, blocks.shape[:-1] + (1,)).astype(np.float16)
        blocks[..., at : at + 2] = scale.view(np.uint8)
    return blocks.reshape(*shape[:-1], -1)


def write_random_moe_gguf(path: Path, shape: MoeShape, expert_types: tuple[Q, Q, Q] = (Q.Q4_K, Q.Q4_K, Q.Q6_K),
                          other_type: Q = Q.Q8_0, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    arch = "qwen3moe"
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in {
        "block_count": shape.layers, "context_length": 4096, "embedding_length": shape.hidden,
        "feed_forward_length": shape.moe_intermediate, "attention.head_count": shape.heads,
        "attention.head_count_kv": shape.kv_heads, "attention.key_length": shape.head_dim,
        "attention.value_length": shape.head_dim, "expert_count": shape.experts,
        "expert_used_count": shape.active, "expert_feed_forward_length": shape.moe_intermediate,
    }.items():
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", 1e6)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    add_tokenizer(w, tiny_tokenizer(shape.vocab))

    def quantized(name: str, kind: Q, dims: tuple[int, ...]) -> None:
        w.add_tensor(name, random_blocks(kind, dims, rng), raw_dtype=kind)

    def norm(name: str, size: int) -> None:
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(size)).astype(np.float32))

    h, q, kv, e, m = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.experts, shape.moe_intermediate
    quantized("token_embd.weight", other_type, (shape.vocab, h))
    quantized("output.weight", other_type, (shape.vocab, h))
    norm("output_norm.weight", h)
    for i in range(shape.layers):
        b = f"blk.{i}."
        norm(b + "attn_norm.weight", h)
        norm(b + "ffn_norm.weight", h)
        norm(b + "attn_q_norm.weight", shape.head_dim)
        norm(b + "attn_k_norm.weight", shape.head_dim)
        for name, dims in (("attn_q", (q, h)), ("attn_k", (kv, h)), ("attn_v", (kv, h)), ("attn_output", (h, q))):
            quantized(f"{b}{name}.weight", other_type, dims)
        w.add_tensor(b + "ffn_gate_inp.weight", (rng.standard_normal((e, h)) / np.sqrt(h)).astype(np.float32))
        quantized(b + "ffn_gate_exps.weight", expert_types[0], (e, m, h))
        quantized(b + "ffn_up_exps.weight", expert_types[1], (e, m, h))
        quantized(b + "ffn_down_exps.weight", expert_types[2], (e, h, m))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
