"""Tensor parallel steps across torchrun's processes: rank 0 schedules, every rank runs the forward.

Rank 0 runs the whole engine (scheduler, block manager, sampler, detokenizer). Its runner
broadcasts each call that touches the model or the KV cache (a step's `StepInputs`, a forked
sample's block copy) before running it; every other rank loops in `serve`, running the same call
on its shard of the model (model/tensor_parallel.py) and its own cache of its heads. The block
tables are rank 0's, so the caches stay slot for slot alike. Logits are complete on every rank;
rank 0 samples. As nano-vllm's ModelRunner loop, over torch.distributed (gloo on CPU, NCCL on
GPUs, untested here) instead of shared memory.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from qwenkit.distributed import ProcessGroup
from qwenkit.engine.media_inputs import EncoderCache
from qwenkit.engine.model_runner import ModelRunner, StepInputs
from qwenkit.engine.paged_attention import PagedKVCache
from qwenkit.engine.step_threads import StepThreads
from qwenkit.errors import QwenkitError


def tensor_parallel_group(size: int) -> ProcessGroup:
    """The group of `size` processes this one belongs to, one shard each: torchrun's processes,
    which must be exactly `size` (a size of 1 without torchrun: no group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if size == world:
        return ProcessGroup.from_environment()
    how = f"torchrun started {_processes(world)}" if "WORLD_SIZE" in os.environ else "not launched by torchrun"
    raise QwenkitError(
        f"--tensor-parallel-size {size} needs {_processes(size)}, one per shard ({how}): "
        f"launch with torchrun --nproc-per-node {size} -m qwenkit.cli.main ..."
    )


def _processes(n: int) -> str:
    return f"{n} process" + ("es" if n != 1 else "")


@dataclass(frozen=True)
class Call:
    """A ModelRunner method for the other ranks to run; None: leave the loop."""

    method: str | None
    args: tuple[Any, ...] = ()


class TensorParallelRunner(ModelRunner):
    """Rank 0's runner: what it runs, the other ranks run too. The other ranks leave their loop
    when it closes, is collected, or the process exits, whichever comes first."""

    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, group: ProcessGroup, encoder_cache: EncoderCache | None = None):
        super().__init__(model, cache, encoder_cache)
        self.group = group
        self.close = weakref.finalize(self, _release, group)  # holds the group only, not this runner

    def execute(self, step: StepInputs) -> torch.Tensor:
        self.group.broadcast(Call("execute", (step,)))
        return super().execute(step)

    def copy_block(self, src: int, dst: int) -> None:
        self.group.broadcast(Call("copy_block", (src, dst)))
        super().copy_block(src, dst)


class WorkerRunner(ModelRunner):
    """A rank > 0's runner: each forward with the threads rank 0's engine gives the same step
    (StepThreads: a few-token GGUF step leaves the cores to the kernels)."""

    def __init__(self, model: torch.nn.Module, cache: PagedKVCache):
        super().__init__(model, cache)
        self.step_threads = StepThreads(model)

    def execute(self, step: StepInputs) -> torch.Tensor:
        with self.step_threads.step(len(step.input_ids)):
            return super().execute(step)


def _release(group: ProcessGroup) -> None:
    """Tell the other ranks to leave their loop, and wait until they have: torchrun ends a group
    whose first process exits."""
    group.broadcast(Call(None))
    group.barrier()


def serve(runner: ModelRunner, group: ProcessGroup) -> None:
    """Ranks > 0: run rank 0's calls on `runner` until it says to stop."""
    while True:
        call: Call = group.broadcast()
        if call.method is None:
            group.barrier()
            return
        getattr(runner, call.method)(*call.args)
