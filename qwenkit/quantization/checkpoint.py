"""Quantized checkpoints on disk: portable codes in safetensors, packed for the CPU kernel at load time.

Layout, per quantized Linear `X`: int4: `X.qweight` uint8 [N, K/2] (two codes per byte, low nibble
first), `X.scales` and `X.zeros` fp32 [N, K/group]; int8: `X.qweight` int8 [N, K], `X.scales` fp32 [N];
`X.bias` when the layer has one. config.json carries
`"quantization_config": {"quant_method": "qwenkit", "bits": 4 | 8, "group_size": G}`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qwenkit.errors import QwenkitError
from qwenkit.quantization.linear import Int4Linear, Int8Linear, quantize_int4, quantize_int8
from qwenkit.quantization.quantize import eligible_linears
from qwenkit.weights.save import model_tensors, save_hf_checkpoint

QUANT_METHOD = "qwenkit"
SUFFIXES = (".qweight", ".scales", ".zeros", ".bias")


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.int32)
    out[:, 0::2] = (packed & 0x0F).to(torch.int32)
    out[:, 1::2] = (packed >> 4).to(torch.int32)
    return out


def save_quantized(loaded, out_dir: Path, bits: int, group_size: int) -> None:
    """Write `loaded` (a float model with its tokenizer) as a quantized HF-style directory."""
    mode = {4: "int4", 8: "int8"}.get(bits)
    if mode is None:
        raise QwenkitError(f"--bits must be 4 or 8, got {bits}")
    model = loaded.model
    tensors: dict[str, torch.Tensor] = {}
    quantized = set()
    for name, linear, group in eligible_linears(model, mode, group_size):
        weight = linear.weight.detach().float()
        if group is None:
            q, scale = quantize_int8(weight)
            tensors.update({f"{name}.qweight": q, f"{name}.scales": scale})
        else:
            q, scale, zero = quantize_int4(weight, group)
            tensors.update({f"{name}.qweight": pack_nibbles(q), f"{name}.scales": scale, f"{name}.zeros": zero})
        if linear.bias is not None:
            tensors[f"{name}.bias"] = linear.bias.detach().float()
        quantized.add(name)
    tensors.update(model_tensors(loaded, quantized))
    save_hf_checkpoint(loaded, out_dir, tensors, {"quant_method": QUANT_METHOD, "bits": bits, "group_size": group_size})


def split_quantized(tensors, quantization_config: dict) -> tuple[dict[str, nn.Module], list[tuple[str, torch.Tensor]]]:
    """Quantized modules built from their stored codes, and the remaining float tensors."""
    if quantization_config.get("quant_method") != QUANT_METHOD:
        raise QwenkitError(f"unsupported quantization method {quantization_config.get('quant_method')!r} in config.json")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    plain = []
    for name, tensor in tensors:
        suffix = next((s for s in SUFFIXES if name.endswith(s)), None)
        if suffix in (".qweight", ".scales", ".zeros"):
            parts.setdefault(name[: -len(suffix)], {})[suffix] = tensor
        else:
            plain.append((name, tensor))
    modules: dict[str, nn.Module] = {}
    biases = {n[: -len(".bias")]: t for n, t in plain if n.endswith(".bias") and n[: -len(".bias")] in parts}
    plain = [(n, t) for n, t in plain if not (n.endswith(".bias") and n[: -len(".bias")] in parts)]
    for module, p in parts.items():
        if ".qweight" not in p or ".scales" not in p:
            raise QwenkitError(f"quantized layer {module} is incomplete in the checkpoint")
        if p[".qweight"].dtype == torch.uint8:
            q = unpack_nibbles(p[".qweight"])
            group = q.shape[1] // p[".scales"].shape[1]
            modules[module] = Int4Linear(q, p[".scales"].float(), p[".zeros"].float(), group, biases.get(module))
        else:
            modules[module] = Int8Linear(p[".qweight"], p[".scales"].float(), biases.get(module))
    return modules, plain
