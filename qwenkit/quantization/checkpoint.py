"""Quantized checkpoints on disk: portable codes in safetensors, packed for the CPU kernel at load time.

Layout, per quantized Linear `X`: int4: `X.qweight` uint8 [N, K/2] (two codes per byte, low nibble
first), `X.scales` and `X.zeros` fp32 [N, K/group]; int8: `X.qweight` int8 [N, K], `X.scales` fp32 [N];
`X.bias` when the layer has one. config.json carries
`"quantization_config": {"quant_method": "qwenkit", "bits": 4 | 8, "group_size": G}`.
"""

from __future__ import annotations

import torch
from torch import nn

from qwenkit.errors import QwenkitError
from qwenkit.quantization.awq_gptq import BUILDERS
from qwenkit.quantization.linear import Int4Linear, Int8Linear

QUANT_METHOD = "qwenkit"
QUANTIZED_TENSORS = ("qweight", "qzeros", "scales", "zeros", "g_idx")


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.int32)
    out[:, 0::2] = (packed & 0x0F).to(torch.int32)
    out[:, 1::2] = (packed >> 4).to(torch.int32)
    return out


def split_quantized(tensors, quantization_config: dict) -> tuple[dict[str, nn.Module], list[tuple[str, torch.Tensor]]]:
    """Quantized modules built from their stored codes (qwenkit, AWQ or GPTQ), and the remaining float tensors."""
    method = str(quantization_config.get("quant_method", "")).lower()
    if method != QUANT_METHOD and method not in BUILDERS:
        raise QwenkitError(f"unsupported quantization method {method!r} in config.json; qwenkit reads qwenkit, awq and gptq")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    plain = []
    for name, tensor in tensors:
        module, _, suffix = name.rpartition(".")
        if suffix in QUANTIZED_TENSORS:
            parts.setdefault(module, {})[suffix] = tensor
        else:
            plain.append((name, tensor))
    biases = {n[: -len(".bias")]: t.float() for n, t in plain if n.endswith(".bias") and n[: -len(".bias")] in parts}
    plain = [(n, t) for n, t in plain if not (n.endswith(".bias") and n[: -len(".bias")] in parts)]
    modules: dict[str, nn.Module] = {}
    for module, p in parts.items():
        needed = ("qweight", "scales") if method == QUANT_METHOD else ("qweight", "qzeros", "scales")
        if any(k not in p for k in needed):
            raise QwenkitError(f"quantized layer {module} is incomplete in the checkpoint")
        if method != QUANT_METHOD:
            modules[module] = BUILDERS[method](p, biases.get(module), quantization_config)
        elif p["qweight"].dtype == torch.uint8:
            q = unpack_nibbles(p["qweight"])
            group = q.shape[1] // p["scales"].shape[1]
            modules[module] = Int4Linear(q, p["scales"].float(), p["zeros"].float(), group, biases.get(module))
        else:
            modules[module] = Int8Linear(p["qweight"], p["scales"].float(), biases.get(module))
    return modules, plain
