"""Under torchrun: a tensor-parallel group's sums and gathers, through shared memory and through
gloo (QWENKIT_TP_SHARED_MEMORY=0 picks gloo), on parts whose whole each process can compute
itself. Rank 0 writes what it got to OUT.pt.
    python -m torch.distributed.run --nproc-per-node 2 tests/collectives_run.py OUT.pt [abandoned]
("abandoned": rank 1 makes no sum, and rank 0 writes the error its sum fails with).
"""

from __future__ import annotations

import sys

import torch

from qwenkit.distributed import ProcessGroup
from qwenkit.kernels.shared_memory import SharedMemoryGroup, collectives


def part(rank: int, shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 + rank)).to(dtype)


def main(out_path: str, mode: str = "all") -> None:
    group = ProcessGroup.from_environment()
    ops = collectives(group)
    if mode == "abandoned":  # rank 1 never makes the sum: rank 0 must fail within QWENKIT_TP_TIMEOUT, not hang
        if group.is_main:
            try:
                ops.sum_([torch.ones(1, 896)])
            except RuntimeError as exc:
                torch.save({"error": str(exc)}, out_path)
        group.broadcast("done")  # rank 1 waits here, where waiting has no time limit
        group.close()
        return
    results = {"shared": isinstance(ops, SharedMemoryGroup)}
    for i, shape in enumerate([(1, 896), (16, 896), (3, 5), (1100, 2048)]):  # the last is larger than a slot
        for repeat in range(3):  # calls in a row reuse the two buffers
            x = part(group.rank, shape) * (repeat + 1)
            ops.sum_([x])
            results[f"sum{i}.{repeat}"] = x
    x = part(group.rank, (4, 8), torch.bfloat16)  # not float32: torch.distributed
    ops.sum_([x])
    results["sum_bf16"] = x
    widths = [7, 12]
    for rows in (1, 16, 3000):  # 3000 x 12 x 4 bytes fits a slot; see below for one that does not
        results[f"gather{rows}"] = ops.gather_columns(part(group.rank, (rows, widths[group.rank])), widths)
    results["gather_big"] = ops.gather_columns(part(group.rank, (200_000, widths[group.rank])), widths)
    if group.is_main:
        torch.save(results, out_path)
    group.barrier()
    group.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
