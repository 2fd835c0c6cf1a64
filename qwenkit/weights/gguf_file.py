"""GGUF files: model config from metadata, tensors mapped to HF names and dequantized.

The common types decode in torch (gguf_blocks.py, checked value for value against the `gguf`
package); the rest go through `gguf` itself, so the values are exactly the ones llama.cpp
computes. Only the tensor types qwenkit has tested are accepted; any other gets a clear error
rather than silently wrong numbers.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from qwenkit.config import ModelConfig, RopeConfig
from qwenkit.errors import QwenkitError
from qwenkit.weights.gguf_blocks import FAST_TYPES, decode, q4_k_codes, uint8_tensor
from qwenkit.weights.gguf_reader import GGUFFile, GGUFTensor

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


def open_gguf(path: Path) -> GGUFFile:
    return GGUFFile(path)


def gguf_architecture(gguf: GGUFFile) -> str:
    arch = gguf.metadata.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise QwenkitError(
            f"unsupported architecture {arch!r} in GGUF metadata; qwenkit supports {', '.join(GGUF_ARCHITECTURES)}"
        )
    return arch


def config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    arch = gguf_architecture(gguf)
    model_type = GGUF_ARCHITECTURES[arch]

    def get(key, default=None):
        return gguf.metadata.get(f"{arch}.{key}", default)

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    names = gguf.tensors.keys()
    if "token_embd.weight" not in names:
        raise QwenkitError(f"{gguf.path} has no token_embd.weight tensor")
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
        vocab_size=gguf.tensors["token_embd.weight"].shape[0],
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


def check_supported(tensor: GGUFTensor) -> None:
    if tensor.kind not in SUPPORTED_TENSOR_TYPES:
        raise QwenkitError(
            f"unsupported GGUF tensor type {tensor.kind.name} in tensor {tensor.name}; "
            f"supported: {', '.join(sorted(t.name for t in SUPPORTED_TENSOR_TYPES))}"
        )


def dequantized(gguf: GGUFFile, tensor: GGUFTensor) -> torch.Tensor:
    """The tensor's values as float32 (float16/bfloat16 values widened exactly)."""
    check_supported(tensor)
    if tensor.kind in FAST_TYPES:
        return decode(gguf.raw(tensor), tensor.kind, tensor.shape)
    return torch.from_numpy(dequantize(gguf.raw(tensor), tensor.kind).reshape(tensor.shape))  # a fresh array


def _projection_weights(gguf: GGUFFile, config: ModelConfig) -> Iterator[tuple[str, GGUFTensor, torch.Tensor | None]]:
    """(module name, weight tensor, float32 bias or None) of every 2-D weight of a single module.

    Experts' stacked 3-D tensors are left out: they stay on the float path.
    """
    for tensor in gguf.tensors.values():
        names = _hf_names(tensor.name, config.num_experts)
        if len(tensor.shape) != 2 or len(names) != 1 or not names[0].endswith(".weight"):
            continue
        bias_tensor = gguf.tensors.get(tensor.name.removesuffix("weight") + "bias")
        bias = None if bias_tensor is None else dequantized(gguf, bias_tensor)
        yield names[0].removesuffix(".weight"), tensor, bias


def int4_layers_from_q4_k(gguf: GGUFFile, config: ModelConfig) -> dict[str, torch.nn.Module]:
    """Every Q4_K projection as an Int4Linear (groups of 32), without going through float: exact.

    Q4_K stores value = scale * q - min per 32 values, q in 0..15; the kernel computes
    (q - 8) * scale + zero, so zero = 8 * scale - min.
    """
    from qwenkit.quantization.linear import Int4Linear
    from qwenkit.quantization.quantize import int4_group_size

    layers = {}
    for name, tensor, bias in _projection_weights(gguf, config):
        out_features, in_features = tensor.shape
        if tensor.kind != GGMLQuantizationType.Q4_K or name == "model.embed_tokens":
            continue
        if int4_group_size(out_features, in_features, 32) != 32:
            continue
        codes, scale, minimum = q4_k_codes(gguf.raw(tensor))
        scale, minimum = scale.reshape(out_features, -1), minimum.reshape(out_features, -1)
        layers[name] = Int4Linear(codes.reshape(out_features, in_features), scale, 8 * scale - minimum, 32, bias)
    return layers


def gguf_block_layers(gguf: GGUFFile, config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """Every projection and the embedding whose type the native kernels run, as layers over the
    file's own (memory-mapped) bytes. A tied output projection shares the embedding's bytes."""
    from qwenkit.quantization.gguf_linear import KERNEL_TYPES, PACKED_TYPES, GGUFEmbedding, GGUFLinear

    layers: dict[str, torch.nn.Module] = {}
    for name, tensor, bias in _projection_weights(gguf, config):
        if tensor.kind not in KERNEL_TYPES or name.endswith(("mlp.gate", "shared_expert_gate")):
            continue  # routers steer whole experts and are tiny: float
        blocks = uint8_tensor(gguf.raw(tensor))  # [rows, bytes per row], sharing the file's memory map
        if name == "model.embed_tokens":  # stays mapped: only the rows looked up are ever read
            layers[name] = GGUFEmbedding(blocks, tensor.kind, tensor.shape[1], dtype)
            if config.tie_word_embeddings:
                layers["lm_head"] = GGUFLinear(blocks, tensor.kind, tensor.shape[1])
        else:
            layers[name] = GGUFLinear(blocks, tensor.kind, tensor.shape[1], bias)
        if tensor.kind in PACKED_TYPES:
            gguf.release(tensor)  # now a packed copy (or looked up row by row)
    return layers


def iter_gguf_tensors(gguf: GGUFFile, config: ModelConfig, skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) of every tensor, except the weights of the modules in `skip`."""
    for tensor in gguf.tensors.values():  # refuse unsupported types before spending time on the others
        check_supported(tensor)
    for tensor in gguf.tensors.values():
        names = _hf_names(tensor.name, config.num_experts)
        if len(names) == 1 and names[0].rpartition(".")[0] in skip:
            continue
        yield from _named(names, dequantized(gguf, tensor))
        gguf.release(tensor)  # the float copy is what the model keeps


def _named(names: list[str], values: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    if len(names) > 1:  # stacked experts [E, out, in]
        yield from zip(names, values.unbind(0))
    elif names[0].endswith("shared_expert_gate.weight"):
        yield names[0], values.reshape(1, -1)
    else:
        yield names[0], values
