"""Attention backends: where K/V live and how a layer attends over them.

The model computes q, k, v and hands them to a backend; it never knows whether the cache is
absent, one contiguous buffer, or paged blocks shared across a batch. That keeps
`forward(input_ids, positions, attention)` the same for a test, a chat loop and the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PagedDecode:
    """A step where every token decodes (one new token per sequence) over a paged K/V cache, as a
    native call reads it: caches [layers, slots, kv_heads, head_dim]; slot_mapping [T] the new
    tokens' slots; slots [T, Lmax] and lengths [T] each sequence's context (its new token included)."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor
    slots: torch.Tensor
    lengths: torch.Tensor


class AttentionBackend(Protocol):
    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None
    ) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D] for the new tokens. Returns [T, Hq * D]."""
        ...


# The most mask values one attention call takes: SDPA turns a boolean mask into floats, so a
# 512-token chunk of a 100K-token prompt would hold 205 MB of it. Query rows are independent, so
# a chunk attends in blocks of rows with the same bits (the CPU kernel's per-row sums do not
# depend on how the rows are blocked; tested), at most 16 MB of mask each: up to a 131K context
# still 32 rows or more, the CPU kernel's own query block, so K and V are read no more often.
MASK_VALUES = 1 << 22


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Attention of q over k/v (one sequence) where a query sees keys at positions <= its own."""
    if window is None and q.shape[0] > 1 and _same_ascending(q_positions, k_positions):
        return _sdpa(q, k, v, None, True, scale)  # the plain triangle: SDPA skips the masked half instead of reading a mask (1.5x)
    if q.shape[0] == 1 and window is None:  # a decode row: the last position, which sees every key
        return _sdpa(q, k, v, None, False, scale)
    rows = max(1, MASK_VALUES // len(k_positions))
    blocks = []
    for a in range(0, q.shape[0], rows):  # a chunk of a long prompt: its mask in pieces, not [chunk, context]
        mask = k_positions[None, :] <= q_positions[a : a + rows, None]
        if window is not None:
            mask &= k_positions[None, :] > q_positions[a : a + rows, None] - window
        blocks.append(_sdpa(q[a : a + rows], k, v, mask, False, scale))
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, scale: float) -> torch.Tensor:
    """SDPA of q [T, heads, dim] over k, v [S, kv_heads, dim] -> [T, heads * dim]."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1).reshape(q.shape[0], -1)


def _same_ascending(q_positions: torch.Tensor, k_positions: torch.Tensor) -> bool:
    """Queries and keys are the same strictly increasing positions, so the mask is a lower triangle."""
    if q_positions is not k_positions and not torch.equal(q_positions, k_positions):
        return False
    return bool((q_positions[1:] > q_positions[:-1]).all())


class NoCache:
    """One sequence, all of it in this forward pass (tests, scoring, training)."""

    def __init__(self, positions: torch.Tensor):
        self.positions = positions

    def attend(self, layer, q, k, v, scale, window):
        return causal_attention(q, k, v, self.positions, self.positions, scale, window)


class PackedSequences:
    """Several sequences back to back in one forward pass, each attending only within itself (training)."""

    def __init__(self, lengths: list[int], positions: torch.Tensor):
        self.lengths = lengths
        self.positions = positions.split(lengths)

    def attend(self, layer, q, k, v, scale, window):
        parts = zip(q.split(self.lengths), k.split(self.lengths), v.split(self.lengths), self.positions)
        return torch.cat([causal_attention(qi, ki, vi, p, p, scale, window) for qi, ki, vi, p in parts])
