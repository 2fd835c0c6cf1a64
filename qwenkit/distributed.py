"""Processes on torch.distributed, as launched by `torchrun`: data parallel training and tensor
parallel inference share this one view of "which process am I, and how do we talk".

gloo on CPU; NCCL where there are GPUs (that path cannot be tested on this machine).
"""

from __future__ import annotations

import datetime
import functools
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


# A gloo group of every process without a time limit on waiting (see ProcessGroup.from_environment).
_UNBOUNDED: Any = None


def collective_timeout() -> datetime.timedelta | None:
    """How long a process waits for the others in a collective before it fails: QWENKIT_TP_TIMEOUT
    seconds if set, else torch's default (30 minutes for gloo), which the shared-memory
    collectives (kernels/shared_memory.cpp) also take."""
    value = os.environ.get("QWENKIT_TP_TIMEOUT")
    return datetime.timedelta(seconds=float(value)) if value else None


@dataclass(frozen=True)
class ProcessGroup:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> "ProcessGroup":
        """torchrun's processes. Their collectives fail after `collective_timeout()` of waiting for
        a process, as the shared-memory ones do; `broadcast` has no such limit (it is
        how the other processes of a tensor-parallel server wait for rank 0's next step, for as
        long as the server is idle: on gloo's own 30-minute limit they died after 30 idle minutes)."""
        global _UNBOUNDED
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=collective_timeout())
        if _UNBOUNDED is None:  # every process creates it here, together
            _UNBOUNDED = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=365))
        return cls(dist.get_rank(), dist.get_world_size())

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum `tensors` in place across processes, as one flat message."""
        if self.world_size == 1 or not tensors:
            return
        if len(tensors) == 1 and tensors[0].is_contiguous():  # one tensor: in place, no copies
            dist.all_reduce(tensors[0])
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def gather_columns(self, x: torch.Tensor, widths: list[int]) -> torch.Tensor:
        """Every process's x [rows, widths[rank]] side by side in rank order, on every process (an
        all-gather; parts padded to the widest, which all_gather needs)."""
        if self.world_size == 1:
            return x
        wide = max(widths)
        padded = torch.zeros(x.shape[0], wide, dtype=x.dtype)
        padded[:, : x.shape[1]] = x
        parts = [torch.empty_like(padded) for _ in widths]
        dist.all_gather(parts, padded)
        return torch.cat([part[:, :width] for part, width in zip(parts, widths)], dim=1)

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's `obj` (any picklable value) on every process; the others pass nothing."""
        if self.world_size == 1:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=_UNBOUNDED)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        global _UNBOUNDED
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()  # every group, the unbounded one too
            _UNBOUNDED = None


@dataclass(frozen=True)
class Cut:
    """The run of a weight one tensor-parallel process keeps: [start, start + length) of its
    output rows (dim 0) or input columns (dim 1)."""

    dim: int
    start: int
    length: int

    def of(self, tensor: torch.Tensor, dim: int | None = None) -> torch.Tensor:
        """This run of `tensor` along `dim` (default self.dim), as memory of its own: the whole
        tensor can then be freed (or its mapped pages left unread)."""
        return tensor.narrow(self.dim if dim is None else dim, self.start, self.length).clone()


@dataclass(frozen=True)
class ShardPlan:
    """What one process of a tensor-parallel group keeps of each layer, decided before any weight
    is read (model/tensor_parallel.py makes it), so that the checkpoint's readers take only
    those runs: `cuts` by module name; a MoE layer's experts kept as stacks (GGUF blocks) have one
    cut of their intermediate features, under "model.layers.N.mlp.experts"."""

    group: ProcessGroup
    cuts: dict[str, Cut] = field(default_factory=dict)

    def tensor_cut(self, name: str) -> Cut | None:
        """The run of checkpoint tensor `name` (a module's weight or bias) this process keeps;
        None: all of it. A row-parallel layer's bias is whole (rank 0 adds it to the sum)."""
        module, _, kind = name.rpartition(".")
        cut = self.cuts.get(module)
        if cut is None or (kind == "bias" and cut.dim == 1):
            return None
        return cut

    def cuts_within(self, module: str) -> bool:
        """Whether the plan cuts modules inside `module` (experts stored fused as one tensor)."""
        return module in self._parents

    @functools.cached_property
    def _parents(self) -> frozenset[str]:
        return frozenset(key[:i] for key in self.cuts for i, c in enumerate(key) if c == ".")

    def keeps(self, name: str) -> bool:
        """Whether this process keeps checkpoint tensor `name` at all: a row-parallel layer's bias
        lives on rank 0 only."""
        module, _, kind = name.rpartition(".")
        cut = self.cuts.get(module)
        return not (kind == "bias" and cut is not None and cut.dim == 1 and not self.group.is_main)

    def take(self, name: str, tensor: torch.Tensor, full_shape: tuple[int, ...]) -> torch.Tensor:
        """This process's share of checkpoint tensor `name` of `full_shape`, from the whole tensor
        or from a reader that already took the share (then it is returned as it is)."""
        cut = self.tensor_cut(name)
        if cut is None or tuple(tensor.shape) != tuple(full_shape):
            return tensor
        return cut.of(tensor, 0 if tensor.dim() == 1 else cut.dim)
