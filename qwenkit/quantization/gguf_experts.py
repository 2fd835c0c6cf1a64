"""A MoE block's experts computed straight from the GGUF file's stacked expert tensors.

llama.cpp stores each projection of all experts as one 3-D tensor [experts, rows, columns]; here
each stays those bytes ([experts, rows, bytes per row], memory-mapped, or a same-size packed copy
where the build packs the type: pack_if_packable) and each active expert's rows go through the
same kernels as GGUFLinear:
the active experts with few rows in one native call (all of them when decoding), an expert with
many rows alone on GGUFLinear's dense path.
It replaces the float `ExpertMLPs` by name and answers the same `grouped(x, counts)`.
"""

from __future__ import annotations

from itertools import accumulate

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from qwenkit.quantization.gguf_linear import (
    KERNEL_TYPES, block_matmul, bytes_per_row, check_row_slice, column_unit, narrow_columns, native_kernels, pack_if_packable,
    takes_kernel,
)


class GGUFExperts(nn.Module):
    def __init__(
        self,
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        kinds: tuple[GGMLQuantizationType, GGMLQuantizationType, GGMLQuantizationType],
        hidden_size: int,
        prepacked: tuple[bool, bool, bool] = (False, False, False),
    ):
        """gate, up: uint8 [experts, intermediate, bytes]; down: uint8 [experts, hidden, bytes];
        kinds: the three tensors' GGUF types (llama.cpp's mixes often give down its own);
        prepacked: which are already in the packed layout (a shard's)."""
        super().__init__()
        self.num_experts, self.intermediate_size = gate.shape[0], gate.shape[1]
        self.hidden_size = hidden_size
        self.kinds = kinds
        for name, blocks, kind, in_features, was_packed in (
            ("gate", gate, kinds[0], hidden_size, prepacked[0]),
            ("up", up, kinds[1], hidden_size, prepacked[1]),
            ("down", down, kinds[2], self.intermediate_size, prepacked[2]),
        ):
            if kind not in KERNEL_TYPES or blocks.dim() != 3 or blocks.shape[0] != self.num_experts \
                    or blocks.shape[2] != bytes_per_row(kind, in_features):
                raise ValueError(f"{kind.name} expert blocks {name} of shape {tuple(blocks.shape)} do not make rows of {in_features} values")
            blocks, packed = (blocks, True) if was_packed else pack_if_packable(blocks, kind, in_features)
            self.register_buffer(f"{name}_blocks", blocks, persistent=False)  # GGUF bytes, not float state
            setattr(self, f"{name}_kind", (int(kind), in_features, packed))

    def grouped(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Each expert's SwiGLU MLP of its rows: x [N, hidden] holds counts[0] rows for expert 0,
        then counts[1] for expert 1, ... (the order SparseMoeBlock sorts them in). The experts with
        few rows (all of them when decoding) go through the kernels in one native call; an expert
        with many rows (a long prompt routed unevenly) takes GGUFLinear's dense path on its own."""
        dtype = x.dtype
        x = x.float()
        dense = [not takes_kernel(n) for n in counts]
        if not any(dense):
            return self._kernel_experts(x, counts).to(dtype)
        out = torch.empty_like(x)
        starts = [0, *accumulate(counts)]
        few = [0 if is_dense else n for n, is_dense in zip(counts, dense)]
        if any(few):
            rows = torch.cat([torch.arange(starts[e], starts[e + 1]) for e, n in enumerate(few) if n])
            out[rows] = self._kernel_experts(x[rows], few)
        for expert, is_dense in enumerate(dense):
            if is_dense:
                rows = x[starts[expert] : starts[expert + 1]]
                hidden = F.silu(block_matmul(rows, self.gate_blocks[expert], *self.gate_kind), inplace=True)
                hidden.mul_(block_matmul(rows, self.up_blocks[expert], *self.up_kind))
                out[starts[expert] : starts[expert + 1]] = block_matmul(hidden, self.down_blocks[expert], *self.down_kind)
        return out.to(dtype)

    def _kernel_experts(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        kinds = [self.gate_kind, self.up_kind, self.down_kind]
        return native_kernels().experts_mlp(x, counts, self.gate_blocks, self.up_blocks, self.down_blocks,
                                            [kind for kind, _, _ in kinds], [packed for _, _, packed in kinds])

    def native_decode_experts(self, tokens: int) -> tuple | None:
        """(gate, up, down blocks, their kinds, their packed flags) for a native call that runs the
        experts of `tokens` routed tokens as grouped would (the model's decode_layers), or None
        where grouped would do otherwise: an expert could get too many rows for the kernel, hooks,
        a subclass."""
        if type(self) is not GGUFExperts or self._forward_hooks or self._forward_pre_hooks or not takes_kernel(tokens):
            return None
        kinds = (self.gate_kind, self.up_kind, self.down_kind)
        blocks = self._buffers
        return (blocks["gate_blocks"], blocks["up_blocks"], blocks["down_blocks"], tuple(kind for kind, _, _ in kinds),
                tuple(packed for _, _, packed in kinds))

    @property
    def column_unit(self) -> int:
        """The intermediate features split in runs of this many (whole blocks of down's rows)."""
        return column_unit(self.kinds[2], self.down_kind[2])

    def narrow_intermediate(self, start: int, length: int) -> "GGUFExperts":
        """Every expert's intermediate features [start, start + length): gate/up output rows and
        down input columns, a tensor-parallel shard whose output is a partial sum."""
        down = narrow_columns(self.down_blocks, self.kinds[2], self.intermediate_size, self.down_kind[2], start, length)
        packed = (self.gate_kind[2], self.up_kind[2], self.down_kind[2])
        for kind, was_packed in zip(self.kinds[:2], packed[:2]):
            check_row_slice(kind, was_packed, start, length, self.intermediate_size)
        rows = slice(start, start + length)  # each expert's rows, copied to one run per expert as the kernels read them
        return GGUFExperts(self.gate_blocks[:, rows].contiguous(), self.up_blocks[:, rows].contiguous(), down,
                           self.kinds, self.hidden_size, prepacked=packed)

    def extra_repr(self) -> str:
        types = "/".join(kind.name for kind in self.kinds)
        return f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, types={types}"
