"""Fast GGUF block decoding in torch for the types Qwen GGUFs are made of: Q8_0, Q5_0, Q4_K, Q6_K.

The `gguf` package decodes in numpy and takes ~6 s for the 0.5B model; these vectorised torch
versions follow ggml's reference decoders (ggml-quants.c, dequantize_row_*) and produce the same
float32 values. Q4_K is also exposed as codes, scales and minimums, because it maps exactly onto
the int4 kernel's (q - 8) * scale + zero in groups of 32: a Q4_K weight can stay 4-bit.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at byte `start` of every block, as float32 [blocks, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def uint8_tensor(raw: np.ndarray) -> torch.Tensor:
    """The bytes as a tensor sharing their memory (a read-only view of the memory-mapped file; it is never written)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(raw))


def _blocks(raw: np.ndarray, block_bytes: int) -> torch.Tensor:
    return uint8_tensor(raw).reshape(-1, block_bytes)


def _q8_0(b: torch.Tensor) -> torch.Tensor:  # d fp16, 32 x int8
    return _f16(b, 0) * b[:, 2:].view(torch.int8).float()


def _q5_0(b: torch.Tensor) -> torch.Tensor:  # d fp16, qh uint32 (5th bits), 16 bytes of nibbles
    d = _f16(b, 0)
    qh = b[:, 2:6].contiguous().view(torch.int32)  # [n, 1]
    high = ((qh >> torch.arange(32, dtype=torch.int32)) & 1) << 4  # bit j is value j's fifth bit
    qs = b[:, 6:22].int()
    low = torch.cat([qs & 0xF, qs >> 4], dim=1)  # values 0..15 from low nibbles, 16..31 from high
    return d * ((low | high) - 16).float()


def _q4_k_codes(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes [8n, 32] in 0..15 with per-sub-block scale and min [8n] of n Q4_K blocks: value = scale * q - min."""
    d, dmin = _f16(b, 0), _f16(b, 2)  # then 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
    s = b[:, 4:16].int()
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], dim=1)  # 8 sub-blocks
    mn = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    qs = b[:, 16:].int().reshape(-1, 4, 32)  # each 32 bytes: low nibbles are sub-block 2i, high ones 2i + 1
    codes = torch.stack([qs & 0xF, qs >> 4], dim=2).reshape(-1, 8, 32)
    scale, minimum = d * sc.float(), dmin * mn.float()
    return codes.reshape(-1, 32), scale.reshape(-1), minimum.reshape(-1)


def q4_k_codes(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_K tensor's codes, scales and minimums (see _q4_k_codes), in the tensor's value order."""
    return _q4_k_codes(_blocks(raw, GGML_QUANT_SIZES[T.Q4_K][1]))


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    codes, scale, minimum = _q4_k_codes(b)
    return (scale[:, None] * codes.float() - minimum[:, None]).reshape(b.shape[0], -1)


def _q6_k(b: torch.Tensor) -> torch.Tensor:  # 128 bytes low nibbles, 64 bytes 2-bit highs, 16 int8 scales, d fp16
    ql = b[:, :128].int().reshape(-1, 2, 64)
    qh = b[:, 128:192].int().reshape(-1, 2, 32)
    sc = b[:, 192:208].view(torch.int8).float().reshape(-1, 2, 8)
    d = _f16(b, 208)
    q = torch.cat([
        (ql[..., :32] & 0xF) | ((qh & 3) << 4),
        (ql[..., 32:] & 0xF) | (((qh >> 2) & 3) << 4),
        (ql[..., :32] >> 4) | (((qh >> 4) & 3) << 4),
        (ql[..., 32:] >> 4) | (((qh >> 6) & 3) << 4),
    ], dim=2) - 32  # [n, 2 halves, 128]: quarters of 32 values
    scales = sc.repeat_interleave(16, dim=2)  # one scale per 16 values
    return (d[:, :, None] * scales * q.float()).reshape(-1, 256)


_DECODERS = {T.Q8_0: _q8_0, T.Q5_0: _q5_0, T.Q4_K: _q4_k, T.Q6_K: _q6_k}
CHUNK_BLOCKS = 1 << 14
FAST_TYPES = frozenset([*_DECODERS, T.F32, T.F16, T.BF16])


def _file_view(raw: np.ndarray, dtype: type) -> torch.Tensor:
    """The file's read-only bytes as a tensor of `dtype`, to be widened (copied) at once, never written:
    torch's warning about non-writable arrays does not apply."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(raw).view(dtype))


def decode(raw: np.ndarray, kind: T, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 values of a tensor of one of FAST_TYPES, shaped `shape`."""
    if kind == T.F32:
        return torch.from_numpy(np.array(raw).view(np.float32)).reshape(shape)
    if kind == T.F16:
        return _file_view(raw, np.float16).float().reshape(shape)
    if kind == T.BF16:
        return _file_view(raw, np.int16).view(torch.bfloat16).float().reshape(shape)
    values_per_block, block_bytes = GGML_QUANT_SIZES[kind]
    blocks = _blocks(raw, block_bytes)
    out = torch.empty(blocks.shape[0], values_per_block)
    # In chunks: the intermediates of a whole embedding would be gigabytes of fresh pages.
    for start in range(0, blocks.shape[0], CHUNK_BLOCKS):
        out[start : start + CHUNK_BLOCKS] = _DECODERS[kind](blocks[start : start + CHUNK_BLOCKS])
    return out.reshape(shape)
