"""Swap a model's Linear layers for quantized ones."""

from __future__ import annotations

from torch import nn

from qwenkit.errors import QwenkitError
from qwenkit.quantization.linear import Int4Linear, Int8Linear

QUANTIZATION_MODES = ("int8", "int4")
# Routers and the shared-expert gate are tiny and steer whole experts: they stay in float.
KEEP_FLOAT = ("mlp.gate", "shared_expert_gate")


def int4_group_size(in_features: int, wanted: int) -> int | None:
    """The requested group size, or the largest smaller power of two >= 32 that divides the input size."""
    size = wanted
    while size >= 32:
        if in_features % size == 0:
            return size
        size //= 2
    return None


def quantize_model(model: nn.Module, mode: str, group_size: int = 128) -> nn.Module:
    """Replace every eligible nn.Linear (projections, MLPs, experts, lm_head) in place."""
    if mode not in QUANTIZATION_MODES:
        raise QwenkitError(f"unsupported quantization {mode!r}; choose one of {', '.join(QUANTIZATION_MODES)}")
    if group_size not in (32, 64, 128, 256):
        raise QwenkitError(f"int4 group size must be 32, 64, 128 or 256, got {group_size}")
    targets = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not name.endswith(KEEP_FLOAT)
    ]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if mode == "int8":
            replacement = Int8Linear.from_linear(linear)
        else:
            group = int4_group_size(linear.in_features, group_size)
            if group is None or linear.out_features % 16:
                continue  # shapes the int4 kernel cannot tile stay in float
            replacement = Int4Linear.from_linear(linear, group)
        setattr(parent, child, replacement)
    return model
