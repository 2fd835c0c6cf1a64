"""Processes on torch.distributed, as launched by `torchrun`: data parallel training and tensor
parallel inference share this one view of "which process am I, and how do we talk".

gloo on CPU; NCCL where there are GPUs (that path cannot be tested on this machine).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ProcessGroup:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> "ProcessGroup":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
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

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's `obj` (any picklable value) on every process; the others pass nothing."""
        if self.world_size == 1:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
