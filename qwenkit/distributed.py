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

from qwenkit.errors import QwenkitError


@dataclass
class _Groups:
    """The gloo groups qwenkit's collectives use, made once per process group (every process
    makes them together): `bounded` fails after collective_timeout() of waiting for a process,
    `unbounded` waits as long as it takes (rank 0's next step, however long a server is idle)."""

    bounded: Any
    unbounded: Any


_GROUPS: _Groups | None = None
_GENERATION = 0  # counts closed process groups: what was made for one must not serve the next


def generation() -> int:
    return _GENERATION


def collective_timeout() -> datetime.timedelta:
    """How long a process waits for the others in a collective before it fails (a process of the
    group died or hangs): QWENKIT_TP_TIMEOUT seconds, default 1800 (gloo's), for tensor-parallel
    steps and data-parallel training alike; the shared-memory collectives (kernels/shared_memory.cpp)
    read the same variable."""
    value = os.environ.get("QWENKIT_TP_TIMEOUT", "1800")
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise QwenkitError(f"QWENKIT_TP_TIMEOUT must be a positive number of seconds, not {value!r}")
    return datetime.timedelta(seconds=seconds)


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
        a process, as the shared-memory ones do; `broadcast` and `wait_for_everyone` have no such
        limit (they are how the other processes of a tensor-parallel server wait for rank 0's next
        step, for as long as the server is idle: on gloo's default group and its 30-minute limit
        they died after 30 idle minutes). The limit is the groups' own, not the startup's: a
        process group's timeout would also bound how long the processes take to start."""
        global _GROUPS
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        timeout = collective_timeout()
        if not dist.is_initialized():
            # Every qwenkit collective is on CPU tensors: gloo, with NCCL for CUDA tensors (untested here).
            dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        if _GROUPS is None:  # every process makes them here, together
            _GROUPS = _Groups(dist.new_group(backend="gloo", timeout=timeout),
                              dist.new_group(backend="gloo", timeout=datetime.timedelta(days=365)))
        return cls(dist.get_rank(), dist.get_world_size())

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum `tensors` in place across processes, as one flat message."""
        if self.world_size == 1 or not tensors:
            return
        if len(tensors) == 1 and tensors[0].is_contiguous():  # one tensor: in place, no copies
            dist.all_reduce(tensors[0], group=_GROUPS.bounded)
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=_GROUPS.bounded)
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
        dist.all_gather(parts, padded, group=_GROUPS.bounded)
        return torch.cat([part[:, :width] for part, width in zip(parts, widths)], dim=1)

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's `obj` (any picklable value) on every process; the others pass nothing."""
        if self.world_size == 1:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=_GROUPS.unbounded)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=_GROUPS.bounded)

    def wait_for_everyone(self) -> None:
        """A barrier without a time limit: after loading, however long the slowest process takes
        (its first collectives are time-limited)."""
        if self.world_size > 1:
            dist.barrier(group=_GROUPS.unbounded)

    def close(self) -> None:
        global _GROUPS, _GENERATION
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()  # every group, the two of _GROUPS too
        _GROUPS = None
        _GENERATION += 1


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
