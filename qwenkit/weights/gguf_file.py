"""GGUF files: model config from metadata, tensors mapped to HF names and dequantized.

Dequantization goes through the `gguf` package, so the values are exactly the ones llama.cpp
would compute. Only the tensor types qwenkit has tested are accepted; any other gets a clear error
rather than silently wrong numbers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from qwenkit.config import ModelConfig, RopeConfig
from qwenkit.errors import QwenkitError

SUPPORTED_TENSOR_TYPES = frozenset(
    GGMLQuantizationType[name]
    for name in ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
)

# GGUF architecture name -> HF model_type
GGUF_ARCHITECTURES = {"qwen2": "qwen2", "qwen3": "qwen3", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
_EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def open_gguf(path: Path) -> GGUFReader:
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the gguf package raises ValueError, IndexError, struct.error, ... on bad input
        raise QwenkitError(f"{path} is not a readable GGUF file (truncated or corrupt: {exc})") from exc
    size = os.path.getsize(path)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise QwenkitError(f"{path} is truncated: tensor {t.name} ends past the end of the file")
    return reader


def metadata(reader: GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def gguf_architecture(reader: GGUFReader) -> str:
    arch = metadata(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise QwenkitError(
            f"unsupported architecture {arch!r} in GGUF metadata; qwenkit supports {', '.join(GGUF_ARCHITECTURES)}"
        )
    return arch


def config_from_gguf(reader: GGUFReader) -> ModelConfig:
    arch = gguf_architecture(reader)
    model_type = GGUF_ARCHITECTURES[arch]

    def get(key, default=None):
        return metadata(reader, f"{arch}.{key}", default)

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = metadata(reader, "tokenizer.ggml.tokens")
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    scaling = get("rope.scaling.type", "none")
    rope = RopeConfig(theta=float(get("rope.freq_base", 10000.0)))
    if scaling in ("yarn", "linear"):
        rope = RopeConfig(
            theta=rope.theta,
            rope_type=scaling,
            factor=float(get("rope.scaling.factor", 1.0)),
            original_max_position_embeddings=get("rope.scaling.original_context_length"),
            beta_fast=get("rope.scaling.yarn_beta_fast"),
            beta_slow=get("rope.scaling.yarn_beta_slow"),
        )
    is_moe = model_type.endswith("_moe")
    layers = int(get("block_count"))
    # GGUF has no mlp_only_layers key: a layer is sparse exactly when it has a router tensor.
    dense_layers = tuple(i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in names) if is_moe else ()
    return ModelConfig(
        architecture=model_type,
        vocab_size=int(embed.shape[1]) if vocab is None else len(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length", 0)),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length") or hidden // heads),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(get("context_length", 32768)),
        tie_word_embeddings="output.weight" not in names,
        rope=rope,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        num_experts=int(get("expert_count", 0)) if is_moe else 0,
        num_experts_per_tok=int(get("expert_used_count", 0)),
        moe_intermediate_size=int(get("expert_feed_forward_length", 0)),
        shared_expert_intermediate_size=int(get("expert_shared_feed_forward_length", 0)),
        mlp_only_layers=dense_layers,
        # llama.cpp renormalises the top-k weights for Qwen3-MoE and not for Qwen2-MoE.
        norm_topk_prob=bool(get("expert_weights_norm", model_type == "qwen3_moe")),
    )


def _hf_names(gguf_name: str, num_experts: int) -> list[str]:
    if gguf_name in _GLOBAL_NAMES:
        return [_GLOBAL_NAMES[gguf_name]]
    m = _BLOCK_RE.match(gguf_name)
    if m is None:
        raise QwenkitError(f"GGUF tensor {gguf_name!r} has no place in a Qwen model")
    layer, part, kind = m.groups()
    prefix = f"model.layers.{layer}"
    if part in _EXPERT_NAMES:
        return [f"{prefix}.mlp.experts.{e}.{_EXPERT_NAMES[part]}.{kind}" for e in range(num_experts)]
    if part not in _BLOCK_NAMES:
        raise QwenkitError(f"GGUF tensor {gguf_name!r} has no place in a Qwen model")
    return [f"{prefix}.{_BLOCK_NAMES[part]}.{kind}"]


def dequantized(tensor) -> np.ndarray:
    """The tensor's values as float32 (or its float16/bfloat16 values widened exactly)."""
    kind = tensor.tensor_type
    if kind not in SUPPORTED_TENSOR_TYPES:
        raise QwenkitError(
            f"unsupported GGUF tensor type {kind.name} in tensor {tensor.name}; "
            f"supported: {', '.join(sorted(t.name for t in SUPPORTED_TENSOR_TYPES))}"
        )
    if kind == GGMLQuantizationType.F32:
        values = np.asarray(tensor.data, dtype=np.float32)
    else:
        values = dequantize(tensor.data, kind)
    # ggml lists dimensions fastest-first; numpy slowest-first.
    return values.reshape(tuple(int(d) for d in reversed(tensor.shape)))


def iter_gguf_tensors(reader: GGUFReader, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    for tensor in reader.tensors:
        names = _hf_names(tensor.name, config.num_experts)
        values = dequantized(tensor)
        # F32 tensors are read-only views of the memory-mapped file; everything else is a fresh array.
        values = torch.from_numpy(values if values.flags.writeable else values.copy())
        if len(names) > 1:  # stacked experts [E, out, in]
            for name, expert in zip(names, values.unbind(0)):
                yield name, expert
        elif names[0].endswith("shared_expert_gate.weight"):
            yield names[0], values.reshape(1, -1)
        else:
            yield names[0], values
