"""The vision tower of Qwen2-VL and Qwen2.5-VL.

Pixels arrive patchified ([patches, C * T * 14 * 14], see qwenkit.multimodal.image), each patch
2 frames deep so that images and videos share one embedding. Patches get 2-D rotary positions,
attend bidirectionally within their image or video frame (Qwen2.5-VL: within windows, except in
`fullatt_block_indexes`), and the merger turns each 2x2 block of patches into one token for the
language model. Parameter names match the HF checkpoints (`visual.*`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit.config import VisionConfig
from qwenkit.errors import QwenkitError
from qwenkit.model.layers import MLP, RMSNorm
from qwenkit.model.rope import apply_rotary

Grid = tuple[int, int, int]  # (frames / temporal patch, patch rows, patch columns) of one image or video


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int], scale: float) -> torch.Tensor:
    """Bidirectional attention within each run of `lengths` rows (an image, a frame, a window).

    q, k, v: [T, heads, head_dim]; returns [T, heads * head_dim]. Segments of equal length go
    through SDPA together as one batch, so a thousand 64-patch windows cost one call, not a thousand.
    """
    t, heads, dim = q.shape
    if len(set(lengths)) == 1:  # one image, or windows that tile it exactly: views, no gathering
        qs, ks, vs = (x.view(len(lengths), lengths[0], heads, dim).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
        return out.transpose(1, 2).reshape(t, heads * dim)
    starts_by_length: dict[int, list[int]] = {}
    start = 0
    for n in lengths:
        starts_by_length.setdefault(n, []).append(start)
        start += n
    out = torch.empty_like(q)
    for n, starts in starts_by_length.items():
        rows = (torch.tensor(starts)[:, None] + torch.arange(n)[None, :]).reshape(-1)
        qs, ks, vs = (x[rows].view(len(starts), n, heads, dim).transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
        out[rows] = o.transpose(1, 2).reshape(-1, heads, dim)
    return out.reshape(t, heads * dim)


class PatchEmbed(nn.Module):
    """A Conv3d whose kernel equals its stride over pre-cut patches: one matrix product."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel, stride=kernel, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        return F.linear(pixel_values.to(weight.dtype), weight.view(weight.shape[0], -1))


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class VisionMlp(nn.Module):
    """Qwen2-VL's feed-forward (fc1, activation, fc2); Qwen2.5-VL uses the SwiGLU MLP instead."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _activation(config.hidden_act)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name in ("gelu", "gelu_pytorch_tanh"):
        return nn.GELU(approximate="tanh" if name == "gelu_pytorch_tanh" else "none")
    raise QwenkitError(f"unsupported vision activation {name!r}")


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv(x).view(t, 3, self.num_heads, self.head_dim).unbind(1)
        # The reference rotates in fp32 whatever the model dtype.
        q = apply_rotary(q.float(), cos, sin).to(x.dtype)
        k = apply_rotary(k.float(), cos, sin).to(x.dtype)
        return self.proj(segment_attention(q, k, v, lengths, self.head_dim**-0.5))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        if config.variant == "qwen2_vl":
            self.norm1 = nn.LayerNorm(config.hidden_size, eps=1e-6)
            self.norm2 = nn.LayerNorm(config.hidden_size, eps=1e-6)
            self.mlp = VisionMlp(config)
        else:
            if config.hidden_act != "silu":
                raise QwenkitError(f"unsupported Qwen2.5-VL vision activation {config.hidden_act!r}; expected 'silu'")
            self.norm1 = RMSNorm(config.hidden_size, 1e-6)
            self.norm2 = RMSNorm(config.hidden_size, 1e-6)
            self.mlp = MLP(config.hidden_size, config.intermediate_size, bias=True)
        self.attn = VisionAttention(config)

    def forward(self, x, cos, sin, lengths: list[int]):
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Each 2x2 block of neighbouring patches (consecutive rows, see the patch order) becomes one token."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        merged = config.hidden_size * config.spatial_merge_size**2
        if config.variant == "qwen2_vl":
            self.ln_q = nn.LayerNorm(config.hidden_size, eps=1e-6)
        else:
            self.ln_q = RMSNorm(config.hidden_size, 1e-6)
        self.mlp = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, config.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.mlp[0].in_features))


@dataclass(frozen=True)
class VisionLayout:
    """Where each patch sits and whom it attends to, for a batch of grids (no weights involved)."""

    cos: torch.Tensor  # [patches, head_dim], in processing order
    sin: torch.Tensor
    frame_lengths: list[int]  # full-attention segments: one per frame of each image/video
    window_lengths: list[int]  # Qwen2.5-VL window segments (empty for Qwen2-VL)
    window_order: torch.Tensor | None  # merged-token permutation into window order (Qwen2.5-VL)


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)
        head_dim = config.hidden_size // config.num_heads
        quarter = head_dim // 2
        # Height and width each rotate a quarter of the head's frequency pairs (a half of its dims).
        self.inv_freq = 1.0 / config.rope_theta ** (
            torch.arange(0, quarter, 2, dtype=torch.float32, device="cpu") / quarter
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def forward(self, pixel_values: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        """[patches, C*T*P*P] for `grids` -> [patches / merge^2, out_hidden_size], items back to back."""
        expected = sum(t * h * w for t, h, w in grids)
        if pixel_values.shape[0] != expected:
            raise QwenkitError(f"{pixel_values.shape[0]} patches given for grids {grids}, which need {expected}")
        layout = self.layout(grids)
        x = self.patch_embed(pixel_values)
        unit = self.config.spatial_merge_size**2
        if layout.window_order is not None:
            x = x.view(-1, unit, x.shape[-1])[layout.window_order].view(-1, x.shape[-1])
        for i, block in enumerate(self.blocks):
            full = layout.window_order is None or i in self.config.fullatt_block_indexes
            x = block(x, layout.cos, layout.sin, layout.frame_lengths if full else layout.window_lengths)
        merged = self.merger(x)
        if layout.window_order is not None:
            merged = merged[torch.argsort(layout.window_order)]
        return merged

    def layout(self, grids: list[Grid]) -> VisionLayout:
        m = self.config.spatial_merge_size
        heights, widths, frame_lengths = [], [], []
        for t, h, w in grids:
            if h % m or w % m:
                raise QwenkitError(f"grid {h}x{w} patches is not a multiple of the {m}x{m} merge")
            # Patch order within a frame: blocks of m x m patches, row-major over blocks and inside each.
            rows = torch.arange(h).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
            cols = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
            heights.append(rows.transpose(1, 2).reshape(-1).repeat(t))
            widths.append(cols.transpose(1, 2).reshape(-1).repeat(t))
            frame_lengths += [h * w] * t
        freqs = torch.cat(
            [torch.cat(heights)[:, None] * self.inv_freq, torch.cat(widths)[:, None] * self.inv_freq], dim=-1
        )
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.config.variant == "qwen2_vl":
            return VisionLayout(cos, sin, frame_lengths, [], None)
        order, window_lengths = self._windows(grids)
        unit = m * m
        cos = cos.view(-1, unit, cos.shape[-1])[order].view(cos.shape)
        sin = sin.view(-1, unit, sin.shape[-1])[order].view(sin.shape)
        return VisionLayout(cos, sin, frame_lengths, window_lengths, order)

    def _windows(self, grids: list[Grid]) -> tuple[torch.Tensor, list[int]]:
        """Qwen2.5-VL: merged tokens regrouped window by window (row-major windows of each frame)."""
        m = self.config.spatial_merge_size
        size = self.config.window_size // m // self.config.patch_size  # window side in merged tokens
        order, lengths, offset = [], [], 0
        for t, h, w in grids:
            index = torch.arange(t * (h // m) * (w // m)).view(t, h // m, w // m) + offset
            for frame in index:
                for top in range(0, h // m, size):
                    for left in range(0, w // m, size):
                        window = frame[top : top + size, left : left + size].reshape(-1)
                        order.append(window)
                        lengths.append(window.numel() * m * m)
            offset += index.numel()
        return torch.cat(order), lengths
