"""Rotary position embeddings in the split-half ("NeoX") layout, with linear and YaRN scaling.

The inverse frequencies and the attention factor follow transformers' `modeling_rope_utils`
exactly, so that long-context checkpoints give the reference logits.
"""

from __future__ import annotations

import math

import torch

from qwenkit.config import RopeConfig
from qwenkit.kernels import cpu_kernels


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq of shape [head_dim // 2], factor applied to cos and sin)."""
    base, dim = rope.theta, head_dim
    # Explicit CPU device: models are built under torch.device("meta"), and these are no parameters.
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
    if rope.rope_type == "default":
        return 1.0 / pos_freqs, 1.0
    if rope.rope_type == "linear":
        return 1.0 / pos_freqs / rope.factor, 1.0
    return _yarn(rope, dim, pos_freqs)


def _yarn(rope: RopeConfig, dim: int, pos_freqs: torch.Tensor) -> tuple[torch.Tensor, float]:
    factor = rope.factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = float(mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim))
        else:
            attention_factor = mscale(factor)

    beta_fast = rope.beta_fast or 32
    beta_slow = rope.beta_slow or 1
    original = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        # The dimension whose wavelength makes `rotations` turns over the original context.
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    inv_freq = inv_freq_interpolation * (1 - extrapolation_weight) + inv_freq_extrapolation * extrapolation_weight
    return inv_freq, attention_factor


class RotaryEmbedding:
    """Computes cos/sin for arbitrary positions; holds no parameters (never part of a checkpoint)."""

    def __init__(self, rope: RopeConfig, head_dim: int):
        self.inv_freq, self.attention_scaling = rope_inverse_frequencies(rope, head_dim)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [T, head_dim] for positions of shape [T]."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


class MultimodalRotaryEmbedding(RotaryEmbedding):
    """M-RoPE (Qwen2-VL, Qwen2.5-VL): each token has a temporal, a height and a width position.

    The head's frequencies are split into `mrope_section` parts; part i rotates by the position on
    axis i % 3. Text tokens have three equal positions, which makes this ordinary RoPE. The cos/sin
    layout is the 1-D one, so attention applies them with the same `apply_rotary`.
    """

    def __init__(self, rope: RopeConfig, head_dim: int, mrope_section: tuple[int, ...]):
        super().__init__(rope, head_dim)
        self.axis_of_frequency = torch.cat(
            [torch.full((n,), i % 3, dtype=torch.int64, device="cpu") for i, n in enumerate(mrope_section)]
        )

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [3, T] (temporal, height, width), or [T] for text-only tokens."""
        if positions.dim() == 1:
            return super().cos_sin(positions, dtype)
        axis = self.axis_of_frequency.to(positions.device)
        chosen = positions.to(torch.float32)[axis]  # [head_dim // 2, T]: each frequency's own axis
        freqs = chosen.T * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos/sin: [T, head_dim]."""
    if x.dtype == torch.float32 and cos.dtype == torch.float32 and not torch.is_grad_enabled():
        kernels = cpu_kernels()
        if kernels is not None:  # one pass instead of six dispatched ops (a decode step does 48)
            return kernels.rotary(x, cos, sin)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
