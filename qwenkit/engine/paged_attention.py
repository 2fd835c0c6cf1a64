"""Paged KV cache and the attention backend for one batched forward pass.

K/V for all layers live in one pool of fixed-size blocks; a sequence's block table maps its
positions to slots. Each layer first writes the batch's new K/V into their slots and only then
attends, so a sequence may read blocks that another sequence of the same batch just filled.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwenkit.kernels import cpu_kernels
from qwenkit.model.attention import PagedDecode, causal_attention


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype):
        self.block_size, self.num_blocks = block_size, num_blocks
        shape = (num_layers, num_blocks * block_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def copy_block(self, src: int, dst: int) -> None:
        bs = self.block_size
        self.k[:, dst * bs : (dst + 1) * bs] = self.k[:, src * bs : (src + 1) * bs]
        self.v[:, dst * bs : (dst + 1) * bs] = self.v[:, src * bs : (src + 1) * bs]


def slots_for(block_table: list[int], start: int, end: int, block_size: int) -> torch.Tensor:
    """Cache slots of positions [start, end) of a sequence."""
    positions = torch.arange(start, end)
    table = torch.tensor(block_table, dtype=torch.long)
    return table[positions // block_size] * block_size + positions % block_size


@dataclass
class PrefillSlice:
    rows: slice  # rows of the flat batch
    q_positions: torch.Tensor
    context_slots: torch.Tensor  # slots of positions [0, context_len)


class BatchAttention:
    """Attention metadata for one forward: decodes batched together, prefill chunks one by one."""

    def __init__(
        self,
        cache: PagedKVCache,
        slot_mapping: torch.Tensor,
        decode_rows: torch.Tensor,
        decode_slots: torch.Tensor,
        decode_lengths: torch.Tensor,
        prefills: list[PrefillSlice],
    ):
        self.cache = cache
        self.slot_mapping = slot_mapping
        self.decode_rows = decode_rows  # [B] rows of single-token (decode) sequences
        self.decode_slots = decode_slots  # [B, Lmax] their context slots, padded
        self.decode_lengths = decode_lengths  # [B]
        self.prefills = prefills
        if len(decode_rows):
            span = torch.arange(decode_slots.shape[1])
            self.decode_valid = span[None, :] < decode_lengths[:, None]
            self.decode_span = span

    def paged_decode(self) -> PagedDecode | None:
        """This step's caches and slots for a native decode of all layers at once, when every row
        decodes from a CPU cache (else None: the model attends layer by layer through attend)."""
        if len(self.decode_rows) != len(self.slot_mapping) or not self.cache.k.is_cpu:
            return None
        return PagedDecode(self.cache.k, self.cache.v, self.slot_mapping, self.decode_slots, self.decode_lengths)

    def attend(self, layer, q, k, v, scale, window):
        k_pool, v_pool = self.cache.k[layer], self.cache.v[layer]
        kernels = cpu_kernels()
        if kernels is not None and k.is_cpu and k.dtype == torch.float32 and v.dtype == torch.float32:
            kernels.store_kv(k, v, k_pool, v_pool, self.slot_mapping)  # one call for two conversions and two scatters
        else:
            k_pool[self.slot_mapping] = k.to(k_pool.dtype)
            v_pool[self.slot_mapping] = v.to(v_pool.dtype)
        if len(self.decode_rows) == q.shape[0]:  # all decoding (the usual step): no row shuffling
            return self._decode(q, k_pool, v_pool, scale, window)
        out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
        if len(self.decode_rows):
            out[self.decode_rows] = self._decode(q[self.decode_rows], k_pool, v_pool, scale, window)
        for p in self.prefills:
            out[p.rows] = _prefill_attention(
                q[p.rows], k_pool[p.context_slots].to(q.dtype), v_pool[p.context_slots].to(q.dtype),
                p.q_positions, torch.arange(len(p.context_slots)), scale, window,
            )
        return out

    def _decode(self, q, k_pool, v_pool, scale, window):
        kernels = cpu_kernels()
        if kernels is not None and q.dtype == torch.float32:  # reads the slots in place: no gather, no mask
            return kernels.paged_decode_attention(q, k_pool, v_pool, self.decode_slots, self.decode_lengths, scale, window or 0)
        b, heads, dim = q.shape
        keys = k_pool[self.decode_slots].to(q.dtype).transpose(1, 2)  # [B, Hkv, Lmax, D]
        values = v_pool[self.decode_slots].to(q.dtype).transpose(1, 2)
        mask = self.decode_valid
        if window is not None:
            mask = mask & (self.decode_span[None, :] > (self.decode_lengths[:, None] - 1 - window))
        out = F.scaled_dot_product_attention(
            q.view(b, heads, 1, dim), keys, values, attn_mask=mask[:, None, None, :], scale=scale,
            enable_gqa=heads != keys.shape[1],
        )
        return out.reshape(b, heads * dim)


# Where a prompt chunk's products take the kernels (no fast bf16), its attention on a GGUF model
# with 2 kernel threads runs with torch on the calling thread alone (engine/step_threads.py:
# torch's OpenMP workers would spin on the kernels' cores),
# which left one core idle through attention, a fifth of a 1000-token prefill. Half the KV heads
# (with their query heads) then go to a helper thread, itself one torch thread, so both cores
# attend; each head's attention is computed as it would be in one call (same kernel, same bits).
_helper: ThreadPoolExecutor | None = None


def _prefill_attention(q, k, v, q_positions, k_positions, scale, window):
    kv_heads = k.shape[1]
    kernels = cpu_kernels()
    if kv_heads < 2 or torch.get_num_threads() != 1 or kernels is None or kernels.kernel_threads() < 2 or q.shape[0] < 2:
        return causal_attention(q, k, v, q_positions, k_positions, scale, window)
    global _helper
    if _helper is None:
        _helper = ThreadPoolExecutor(1, thread_name_prefix="qwenkit-attention", initializer=torch.set_num_threads, initargs=(1,))
    kv_half = kv_heads // 2
    q_half = q.shape[1] // kv_heads * kv_half
    second = _helper.submit(causal_attention, q[:, q_half:], k[:, kv_half:], v[:, kv_half:], q_positions, k_positions, scale, window)
    first = causal_attention(q[:, :q_half], k[:, :kv_half], v[:, :kv_half], q_positions, k_positions, scale, window)
    return torch.cat([first, second.result()], dim=1)
