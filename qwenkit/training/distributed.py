"""Data-parallel processes on torch.distributed, as launched by `torchrun`.

Every process holds the whole model and reads the same packed rows; process r takes rows
r, r + world, ... of each global batch. Gradients are summed across processes before each
optimizer step, so N processes take exactly the step one process takes on the same global batch.
gloo on CPU; NCCL where there are GPUs (that path cannot be tested on this machine).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
