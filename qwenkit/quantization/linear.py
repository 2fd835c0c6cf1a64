"""Weight-only quantized linear layers on PyTorch's CPU kernels.

Decoding is bound by the bytes of weights read per token, so int4 (0.5 byte/weight plus group
scales) and int8 read 8x and 4x less than fp32. PyTorch's CPU kernels want bfloat16
activations (with fp32 ones they are many times slower), so activations are cast at the boundary
and the result cast back: the rest of the model keeps its dtype.
"""

from __future__ import annotations

import torch
from torch import nn

INT4_INNER_K_TILES = 2  # packing layout parameter of the CPU int4 kernel


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit codes per group of `group_size` inputs: weight ≈ (q - 8) * scale + zero.

    Returns q [N, K] int32 in [0, 15], scale and zero [N, K / group_size] fp32.
    """
    n, k = weight.shape
    groups = weight.float().reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = (hi - lo).clamp(min=1e-8) / 15
    zero = lo + 8 * scale
    q = ((groups - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
    return q.reshape(n, k), scale, zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = q.shape
    groups = q.reshape(n, k // group_size, group_size).float() - 8
    return (groups * scale[..., None] + zero[..., None]).reshape(n, k)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit codes per output channel: weight ≈ q * scale."""
    scale = weight.float().abs().amax(dim=1).clamp(min=1e-8) / 127
    q = (weight.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale


class Int4Linear(nn.Module):
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, bias: torch.Tensor | None,
                 input_permutation: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        # GPTQ act-order: weight columns were reordered so groups are contiguous; activations follow.
        self.register_buffer("input_permutation", input_permutation)
        # The packed layout depends on the CPU's instruction set: pack here, at load time.
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), INT4_INNER_K_TILES))
        scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [groups, N, 2]
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> "Int4Linear":
        q, scale, zero = quantize_int4(linear.weight.detach(), group_size)
        return cls(q, scale, zero, group_size, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.input_permutation is not None:
            flat = flat[:, self.input_permutation]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scales_and_zeros)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class Int8Linear(nn.Module):
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight_int8", q.contiguous())
        self.register_buffer("scales", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        q, scale = quantize_int8(linear.weight.detach())
        return cls(q, scale, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scales)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
