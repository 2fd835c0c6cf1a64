"""Linear and embedding layers that compute straight from a GGUF tensor's blocks.

The weights stay the file's bytes (memory-mapped, or a same-size copy in the layout the CPU's
kernels read fastest; never widened), so a Q4_K_M model costs its file size in memory and
decodes at the speed its bytes allow, with the very values llama.cpp uses. Few tokens
(decoding, a small batch) go through the native kernel, which quantizes the activations to int8
as llama.cpp does; many tokens (a long prompt) are cheaper as a dense matmul
on dequantized row chunks, since the kernel would unpack every row once per token. That matmul
is bfloat16 where the CPU multiplies bfloat16 natively (2.4x float32's speed on an AVX512-BF16
core), else float32 on the exact values.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from qwenkit.kernels import bf16_matmul_is_fast, cpu_kernels

KERNEL_TYPES = frozenset(
    GGMLQuantizationType[name] for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
)
# The 32-value types are repacked at load time into planes (same size) that decode 2-3x faster.
PACKED_TYPES = frozenset(GGMLQuantizationType[name] for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"))
# Products of more tokens than this take the dense path (benchmarks/gguf_gemm.py picks it: the
# first count where the dense path was faster). Where the CPU has
# bfloat16 arithmetic the dense path is a bf16 matmul: on the AVX-512 BF16 machine (Zen 4) the
# row kernels before the tile groups were 3x faster at 32 tokens, 1.3x at 64; on a Xeon with AMX
# (whose tiles oneDNN's bf16 matmul uses) the tile-group kernels, once their token loops were
# unrolled, were 1.5-1.75x faster at 48 tokens, 1.2x at 96, and about even from 112 (0.79-1.02x
# in two runs). Elsewhere the dense path is a
# float32 matmul, slower per multiply-add than the int8 kernels that decode eight rows at a time:
# on the AVX2 machine (Zen 3, 2 threads) the default model's layers ran through the kernel 8.9x
# faster at 16 tokens, 3.5x at 128, 1.6x at 512, 1.4x at 1024 and 1.1x at 2048 (a prefill chunk
# is at most max_num_batched_tokens, 256 by default there).
KERNEL_MAX_TOKENS = 96 if bf16_matmul_is_fast() else 2048
# Dequantized rows are produced this many values at a time, in a reused per-thread buffer:
# the 150k-row output projection would otherwise need 0.5 GB of float32 at once.
DENSE_CHUNK_VALUES = 1 << 23

_scratch = threading.local()


def dense_dtype() -> torch.dtype:
    """What long prompts multiply in: bfloat16 activations and weights (float32 accumulation)
    where the CPU has bfloat16 arithmetic, float32 elsewhere."""
    return torch.bfloat16 if bf16_matmul_is_fast() else torch.float32


def _scratch_buffer(values: int, dtype: torch.dtype) -> torch.Tensor:
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < values or buf.dtype != dtype:
        buf = _scratch.buf = torch.empty(max(values, DENSE_CHUNK_VALUES), dtype=dtype)
    return buf[:values]


def dequantize_rows(blocks: torch.Tensor, kind: GGMLQuantizationType, row_length: int, packed: bool = False) -> torch.Tensor:
    """float32 [rows, row_length] values of GGUF block rows (uint8 [rows, bytes per row])."""
    out = torch.empty(blocks.shape[0], row_length, dtype=torch.float32)
    native_kernels().dequantize_into(blocks, int(kind), out, packed)
    return out


def native_kernels():
    """The compiled CPU kernels; a clear error where they could not be built."""
    kernels = cpu_kernels()
    if kernels is None:
        raise RuntimeError("GGUF block layers need the native CPU kernels (a C++ compiler)")
    return kernels


def takes_kernel(tokens: int) -> bool:
    """Whether a product of this many tokens goes through the native kernel (else the dense path)."""
    return tokens <= KERNEL_MAX_TOKENS


def block_matmul(x: torch.Tensor, blocks: torch.Tensor, kind_id: int, in_features: int, packed: bool) -> torch.Tensor:
    """float32 x [T, in] @ W.T for GGUF block rows W (uint8 [out, bytes per row]): the native
    kernel for few tokens, a dense matmul on dequantized row chunks for many."""
    if takes_kernel(x.shape[0]):
        return native_kernels().matmul(x, blocks, kind_id, packed)
    return dense_block_matmul(x, blocks, kind_id, in_features, packed)


def dense_block_matmul(x: torch.Tensor, blocks: torch.Tensor, kind_id: int, in_features: int, packed: bool) -> torch.Tensor:
    """block_matmul's many-token path: dequantized row chunks in a reused buffer, one matmul each."""
    dtype = dense_dtype()
    x = x.to(dtype)
    out_features = blocks.shape[0]
    rows_per_chunk = max(16, DENSE_CHUNK_VALUES // in_features) // 16 * 16  # whole groups of packed rows (8 or 16)
    if out_features <= rows_per_chunk:
        return (x @ _dequantized_chunk(blocks, kind_id, in_features, packed, dtype).T).float()
    y = torch.empty(x.shape[0], out_features)
    for start in range(0, out_features, rows_per_chunk):
        end = min(start + rows_per_chunk, out_features)
        y[:, start:end] = x @ _dequantized_chunk(blocks[start:end], kind_id, in_features, packed, dtype).T
    return y


def _dequantized_chunk(blocks: torch.Tensor, kind_id: int, in_features: int, packed: bool, dtype: torch.dtype) -> torch.Tensor:
    out = _scratch_buffer(blocks.shape[0] * in_features, dtype).view(blocks.shape[0], in_features)
    native_kernels().dequantize_into(blocks, kind_id, out, packed)
    return out


def pack_if_packable(blocks: torch.Tensor, kind: GGMLQuantizationType, in_features: int, kernels=None) -> tuple[torch.Tensor, bool]:
    """(blocks in the layout the kernels read, whether that is the packed layout): 32-value types
    with rows of a multiple of 64 values are repacked (a same-size copy), and so are the K-quants a
    build stores in groups of rows (the AVX-512 build's Q4_K and Q6_K tile groups); the rest stay
    as given. A stack [experts, rows, bytes] packs each expert's rows on their own. Each build has
    its own layout: `kernels` (default: this process's build) must be the build that will read them."""
    kernels = kernels or native_kernels()
    if not packs(kind, in_features, kernels):
        return blocks, False
    return kernels.pack(blocks, int(kind), in_features), True


def packs(kind: GGMLQuantizationType, in_features: int, kernels=None) -> bool:
    """Whether pack_if_packable repacks rows of this type and length for `kernels` (default: this
    process's build)."""
    kernels = kernels or native_kernels()
    return in_features % 64 == 0 and (kind in PACKED_TYPES or kernels.packed_group_rows(int(kind)) > 1)


def group_rows(kind: GGMLQuantizationType, packed: bool) -> int:
    """How many rows the packed layout stores side by side (8: the AVX2 build's groups; 16: the
    AVX-512 build's tile groups), whose slices must start on a group and hold whole groups unless
    they end the weight; else 1."""
    return native_kernels().packed_group_rows(int(kind)) if packed else 1


def check_row_slice(kind: GGMLQuantizationType, packed: bool, start: int, length: int, rows: int) -> None:
    """Rows [start, start + length) of `rows` must be a valid weight of their own in the layout."""
    group = group_rows(kind, packed)
    if start % group or (length % group and start + length != rows):
        raise ValueError(f"rows [{start}, {start + length}) of a packed {kind.name} weight of {rows} rows "
                         f"split its groups of {group} rows")


def bytes_per_row(kind: GGMLQuantizationType, row_length: int) -> int:
    block_values, block_bytes = GGML_QUANT_SIZES[kind]
    return row_length // block_values * block_bytes


def column_unit(kind: GGMLQuantizationType, packed: bool) -> int:
    """Input columns of a GGUF row come in runs of this many values (a block: its values share a scale)."""
    block_values = GGML_QUANT_SIZES[kind][0]
    return max(64, block_values) if packed else block_values


def narrow_columns(blocks: torch.Tensor, kind: GGMLQuantizationType, in_features: int, packed: bool,
                   start: int, length: int) -> torch.Tensor:
    """The bytes of input columns [start, start + length) of every row of `blocks` ([..., rows, bytes],
    the file's or the packed layout): a tensor-parallel shard of a row-parallel layer. The cut must
    fall on block boundaries."""
    unit = column_unit(kind, packed)
    if start % unit or length % unit:
        raise ValueError(f"{kind.name} rows of {in_features} values split into [{start}, {start + length}), "
                         f"not on the {unit}-value blocks they are stored in")

    def cut(stored: torch.Tensor, planes: list[tuple[int, int]]) -> torch.Tensor:
        return torch.cat([stored[..., offset + start // unit * size : offset + (start + length) // unit * size]
                          for offset, size in planes], dim=-1)

    group = group_rows(kind, packed)
    rows = blocks.shape[-2]
    grouped = rows // group * group if group > 1 else 0
    if not grouped:
        return cut(blocks, _row_planes(kind, in_features, packed))
    lead = blocks.shape[:-2]
    groups = blocks[..., :grouped, :].reshape(*lead, grouped // group, group * blocks.shape[-1])
    out = cut(groups, _row_planes(kind, in_features, packed, group)).reshape(*lead, grouped, -1)
    if grouped == rows:
        return out
    return torch.cat([out, cut(blocks[..., grouped:, :], _row_planes(kind, in_features, packed))], dim=-2)


def _row_planes(kind: GGMLQuantizationType, in_features: int, packed: bool, group: int = 1) -> list[tuple[int, int]]:
    """(byte offset in a row, bytes per column unit) of each plane of a row: one plane for the
    file's interleaved blocks; scales, minimums, fifth bits and codes in the packed layout
    (kernels/gguf_blocks.h, PackedRow); in a group of 8 or 16 packed rows (GroupLayout,
    TileLayout), `group` times each plane with the fifth bits and codes of each 64 values side by
    side, one plane; a packed K-quant's tile group: d, (dmin,) scales, then its steps' codes per
    256 values (its rows outside the groups are the file's)."""
    name = kind.name
    if not packed or (kind not in PACKED_TYPES and group == 1):
        return [(0, GGML_QUANT_SIZES[kind][1])]
    if kind not in PACKED_TYPES:  # Q4_K: d, dmin, 12 bytes of scales, 128 of nibbles; Q6_K: d, 16 scales, 192 of codes
        sizes = [group * size for size in ((2, 2, 12, 128) if name == "Q4_K" else (2, 16, 192))]
        return [(sum(sizes[:i]) * in_features // 256, size) for i, size in enumerate(sizes)]
    sizes = [4]  # fp16 scale per 32 values
    sizes += [4] if name in ("Q4_1", "Q5_1") else []  # fp16 minimum per 32 values
    sizes += [8] if name in ("Q5_0", "Q5_1") else []  # fifth bits, one per value
    sizes += [64 if name == "Q8_0" else 32]  # codes: a byte, or a nibble, per value
    if group > 1:  # a group: every plane `group` times, a step's fifth bits and codes side by side
        sizes = [group * size for size in sizes]
        if name in ("Q5_0", "Q5_1"):
            sizes[-2:] = [sizes[-2] + sizes[-1]]
    planes, offset = [], 0
    for size in sizes:
        planes.append((offset, size))
        offset += in_features // 64 * size
    return planes


class GGUFLinear(nn.Module):
    """`blocks` are the file's bytes of the weight; 32-value types are repacked (a copy), the
    others are used as given (a memory map stays a memory map); see pack_if_packable."""

    def __init__(
        self, blocks: torch.Tensor, kind: GGMLQuantizationType, in_features: int, bias: torch.Tensor | None = None,
        prepacked: bool = False,
    ):
        """`prepacked`: `blocks` are already in the packed layout (a narrowed packed layer's)."""
        super().__init__()
        if kind not in KERNEL_TYPES or blocks.dim() != 2 or blocks.shape[1] != bytes_per_row(kind, in_features):
            raise ValueError(f"{kind.name} blocks of shape {tuple(blocks.shape)} do not make rows of {in_features} values")
        self.kind, self.in_features, self.out_features = kind, in_features, blocks.shape[0]
        self.kind_id = int(kind)
        if prepacked:
            self.packed = True
        else:
            blocks, self.packed = pack_if_packable(blocks, kind, in_features)
        self.register_buffer("blocks", blocks, persistent=False)  # GGUF bytes: not a float state dict entry
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A decode step's float32 [T, in] input needs no reshape or cast either way: skipping the
        # no-op calls saves a few us per layer, ~0.4 ms per token over the model's 168 layers.
        flat_float = x.dim() == 2 and x.dtype == torch.float32
        flat = x if flat_float else x.reshape(-1, self.in_features).float()
        y = block_matmul(flat, self.blocks, self.kind_id, self.in_features, self.packed)
        if self.bias is not None:
            y += self.bias
        return y if flat_float else y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    @staticmethod
    def forward_group(x: torch.Tensor, layers: "list[GGUFLinear]") -> list[torch.Tensor] | None:
        """Each layer's output for the same input x (a decoder layer's q, k, v) in one native call,
        which quantizes x once and runs all the layers' rows in one pass of the threads; None
        where that does not apply (many tokens, hooks, a subclass): the caller runs them one by one."""
        if not _groupable(x, layers):
            return None
        return native_kernels().matmul_group(
            x, [layer.blocks for layer in layers], [layer.kind_id for layer in layers], [layer.packed for layer in layers],
            [_NO_BIAS if layer.bias is None else layer.bias for layer in layers], False,
        )

    @staticmethod
    def forward_silu_mul(x: torch.Tensor, gate: "GGUFLinear", up: "GGUFLinear") -> torch.Tensor | None:
        """silu(gate(x)) * up(x), SwiGLU's product, in one native call (the product taken by each
        thread on the rows it has just computed); None where that does not apply, as forward_group."""
        if not _groupable(x, [gate, up]):
            return None
        blocks, kinds, packed = [gate.blocks, up.blocks], [gate.kind_id, up.kind_id], [gate.packed, up.packed]
        biases = [_NO_BIAS if layer.bias is None else layer.bias for layer in (gate, up)]
        return native_kernels().matmul_group(x, blocks, kinds, packed, biases, True)[0]

    def native_decode_weight(self, tokens: int) -> tuple[torch.Tensor, int, bool, torch.Tensor] | None:
        """(blocks, kind id, packed, bias or an empty tensor) for a native call that runs this layer
        on `tokens` rows as forward would (the model's decode_layers), or None where forward
        would do otherwise: too many tokens for the kernel, hooks, a subclass."""
        if not (_plain(self) and takes_kernel(tokens)):
            return None
        bias = self._buffers["bias"]  # not through nn.Module's __getattr__: a decode step asks 168 layers
        return self._buffers["blocks"], self.kind_id, self.packed, _NO_BIAS if bias is None else bias

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_rows(self.blocks, self.kind, self.in_features, self.packed)

    def narrow(self, dim: int, start: int, length: int) -> "GGUFLinear":
        """The layer of output rows (dim 0) or input columns (dim 1) [start, start + length) of this
        one's weight, as torch.narrow: a tensor-parallel shard. Rows are whole GGUF rows; columns
        must start and end on block boundaries (`column_unit`), since a block's values share one scale. The bias goes with the rows, and stays whole for a column cut."""
        if dim == 0:
            check_row_slice(self.kind, self.packed, start, length, self.out_features)
            bias = None if self.bias is None else self.bias[start : start + length]
            return GGUFLinear(self.blocks[start : start + length], self.kind, self.in_features, bias, prepacked=self.packed)
        cut = narrow_columns(self.blocks, self.kind, self.in_features, self.packed, start, length)
        return GGUFLinear(cut, self.kind, length, self.bias, prepacked=self.packed)

    @property
    def column_unit(self) -> int:
        """Input columns come in runs of this many values that `narrow` keeps together (a block)."""
        return column_unit(self.kind, self.packed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, type={self.kind.name}"


_NO_BIAS = torch.empty(0)


def _groupable(x: torch.Tensor, layers: "list[GGUFLinear]") -> bool:
    """Whether the layers can run as one native call on x: plain GGUF layers (no hooks, no
    subclass) reading a flat float32 input of few enough tokens for the kernel."""
    return (
        x.dim() == 2 and x.dtype == torch.float32 and takes_kernel(x.shape[0])
        and all(_plain(layer) for layer in layers)
    )


def _plain(layer: "GGUFLinear") -> bool:
    """A GGUFLinear itself (no subclass) without hooks: its forward is the kernel call and nothing else."""
    return type(layer) is GGUFLinear and not (layer._forward_hooks or layer._forward_pre_hooks)


class GGUFEmbedding(nn.Module):
    """Token embeddings read row by row from the blocks: only the looked-up rows are decoded.

    `drop_pages` (blocks that are a file's memory map): called after each lookup to let go of the
    pages it mapped. Each read of a mapped file page also maps its neighbours (the kernel's 64 KiB
    fault-around), so the 600-byte rows of the tokens a process has seen would otherwise stay in
    its memory 64 KiB each: 30 MiB of the default model's after a 1000-token prompt."""

    def __init__(
        self, blocks: torch.Tensor, kind: GGMLQuantizationType, embedding_dim: int, dtype: torch.dtype = torch.float32,
        drop_pages: Callable[[], None] | None = None,
    ):
        super().__init__()
        if kind not in KERNEL_TYPES or blocks.dim() != 2 or blocks.shape[1] != bytes_per_row(kind, embedding_dim):
            raise ValueError(f"{kind.name} blocks of shape {tuple(blocks.shape)} do not make rows of {embedding_dim} values")
        self.kind, self.embedding_dim, self.num_embeddings, self.dtype = kind, embedding_dim, blocks.shape[0], dtype
        self.register_buffer("blocks", blocks, persistent=False)
        self.drop_pages = drop_pages

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        picked = self.blocks.index_select(0, ids.reshape(-1))
        if self.drop_pages is not None:
            self.drop_pages()
        rows = dequantize_rows(picked, self.kind, self.embedding_dim)
        return rows.to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, type={self.kind.name}"
