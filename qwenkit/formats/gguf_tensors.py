"""GGUF tensors under their HF names, as float values.

The common types decode in torch (gguf_blocks.py, checked value for value against the `gguf`
package); the rest go through `gguf` itself, so the values are exactly the ones llama.cpp
computes. Only the tensor types qwenkit has tested are accepted; any other gets a clear error
rather than silently wrong numbers.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from qwenkit.config import ModelConfig
from qwenkit.errors import QwenkitError
from qwenkit.formats.gguf_blocks import FAST_TYPES, decode
from qwenkit.formats.gguf_reader import GGUFFile, GGUFTensor

SUPPORTED_TENSOR_TYPES = frozenset(
    GGMLQuantizationType[name]
    for name in ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
)

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


def projection_weights(gguf: GGUFFile, config: ModelConfig) -> Iterator[tuple[str, GGUFTensor, torch.Tensor | None]]:
    """(module name, weight tensor, float32 bias or None) of every 2-D weight of a single module.

    Experts' stacked 3-D tensors are left out: `expert_weights` gives them.
    """
    for tensor in gguf.tensors.values():
        names = _hf_names(tensor.name, config.num_experts)
        if len(tensor.shape) != 2 or len(names) != 1 or not names[0].endswith(".weight"):
            continue
        bias_tensor = gguf.tensors.get(tensor.name.removesuffix("weight") + "bias")
        bias = None if bias_tensor is None else dequantized(gguf, bias_tensor)
        yield names[0].removesuffix(".weight"), tensor, bias


def expert_weights(gguf: GGUFFile) -> Iterator[tuple[str, tuple[GGUFTensor, GGUFTensor, GGUFTensor]]]:
    """(experts module name, its gate, up and down 3-D weight tensors) of every MoE layer."""
    for tensor in gguf.tensors.values():
        m = _BLOCK_RE.match(tensor.name)
        if m is not None and m.group(2) == "ffn_gate_exps" and m.group(3) == "weight":
            prefix = tensor.name.removesuffix("ffn_gate_exps.weight")
            parts = (tensor, gguf.tensors[prefix + "ffn_up_exps.weight"], gguf.tensors[prefix + "ffn_down_exps.weight"])
            yield f"model.layers.{m.group(1)}.mlp.experts", parts


def iter_gguf_tensors(gguf: GGUFFile, config: ModelConfig, skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) of every tensor, except the weights of the modules in `skip`
    (an experts module, e.g. `model.layers.0.mlp.experts`, skips its layer's stacked experts)."""
    for tensor in gguf.tensors.values():  # refuse unsupported types before spending time on the others
        check_supported(tensor)
    for tensor in gguf.tensors.values():
        names = _hf_names(tensor.name, config.num_experts)
        if _module_of(names) in skip:
            continue
        yield from _named(names, dequantized(gguf, tensor))
        gguf.release(tensor)  # the float copy is what the model keeps


def _module_of(names: list[str]) -> str:
    """The module a tensor's weights belong to: the layer's experts for a stacked expert tensor."""
    if len(names) > 1:  # model.layers.{i}.mlp.experts.{e}.{proj}.weight
        return names[0].split(".experts.")[0] + ".experts"
    return names[0].rpartition(".")[0]


def _named(names: list[str], values: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    if len(names) > 1:  # stacked experts [E, out, in]
        yield from zip(names, values.unbind(0))
    elif names[0].endswith("shared_expert_gate.weight"):
        yield names[0], values.reshape(1, -1)
    else:
        yield names[0], values
