"""Swap a model's Linear layers for quantized ones."""

from __future__ import annotations

from torch import nn

from qwenkit.errors import QwenkitError
from qwenkit.modules import replace_module
from qwenkit.quantization.linear import Int4Linear, Int8Linear

QUANTIZATION_MODES = ("int8", "int4")
# Routers and the shared-expert gate are tiny and steer whole experts: they stay in float.
KEEP_FLOAT = ("mlp.gate", "shared_expert_gate")


def keeps_float(module_name: str) -> bool:
    """Whether a projection stays in float under every quantization (GGUF blocks included)."""
    return module_name.endswith(KEEP_FLOAT)


def int4_group_size(out_features: int, in_features: int, wanted: int) -> int | None:
    """The requested group size, or the largest smaller power of two >= 32 that divides the input size;
    None for a shape the int4 kernel cannot tile (output size not a multiple of 16, no such group)."""
    if out_features % 16:
        return None
    size = wanted
    while size >= 32:
        if in_features % size == 0:
            return size
        size //= 2
    return None


def eligible_linears(model: nn.Module, mode: str, group_size: int) -> list[tuple[str, nn.Linear, int | None]]:
    """(name, layer, int4 group or None for int8) of every Linear to quantize."""
    if mode not in QUANTIZATION_MODES:
        raise QwenkitError(f"unsupported quantization {mode!r}; choose one of {', '.join(QUANTIZATION_MODES)}")
    if group_size not in (32, 64, 128, 256):
        raise QwenkitError(f"int4 group size must be 32, 64, 128 or 256, got {group_size}")
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or keeps_float(name):
            continue
        if mode == "int8":
            found.append((name, module, None))
            continue
        group = int4_group_size(module.out_features, module.in_features, group_size)
        if group is not None:
            found.append((name, module, group))
    return found


def quantize_model(model: nn.Module, mode: str, group_size: int = 128) -> nn.Module:
    """Replace every eligible nn.Linear (projections, MLPs, experts, lm_head) in place."""
    for name, linear, group in eligible_linears(model, mode, group_size):
        replace_module(model, name, Int8Linear.from_linear(linear) if group is None else Int4Linear.from_linear(linear, group))
    return model
