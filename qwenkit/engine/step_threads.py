"""Which threads run a step's work when the model's projections are native GGUF kernels.

A few-token step of a GGUF model spends its time in qwenkit's kernels, which run on their own
worker threads (kernels/thread_pool.h), and between them issues small torch operations (norms'
helpers, SiLU, the sampler's passes over the vocabulary). With torch's usual intra-op threads,
those operations start OpenMP regions whose workers then spin for a while after each one, on the
very cores the kernels' workers need next: on 2 cores that costs ~20% of batch-1 decode
(measured: 21 -> 25-27 tok/s, the same as running with OMP_WAIT_POLICY=PASSIVE, which a library
cannot set for its users). So such a step runs torch on the calling thread alone while the
kernels keep every thread; a step with many tokens (a prompt) gives torch its threads back, as
its attention and elementwise work grow with the tokens. Where that starts depends on the cores:
on 2 (AMD EPYC Zen 3, whose prompts take the int8 kernels), a 1000-token prefill in 512-token
steps ran 1.13x faster with torch on the calling thread alone (242-250 vs 215-221 tok/s,
alternating in one process), so with at most 2 threads every step up to 1024 tokens whose
products take the kernels keeps torch on one thread; with more threads, a prompt step's
attention on one thread would cost more than the spinning (not measured here), and steps past
256 tokens give torch its threads back.

Where the CPU multiplies bfloat16 fast, a step of more than KERNEL_MAX_TOKENS (96) tokens takes
its products as torch matmuls on dequantized rows (quantization/gguf_linear.py), so it gives
torch its threads back at any size, and the kernels' workers (which still dequantize and take
the norms) sleep at once between calls instead of spinning on the cores torch's workers need.
On 2 Xeon cores (AMX) a 1000-token prefill in 256-token steps: 490-580 tok/s with torch on one
thread, the same with both but the workers spinning, 630-650 with both and the workers asleep.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from qwenkit.kernels import set_kernel_threads, set_kernel_workers_spin
from qwenkit.quantization.gguf_linear import GGUFLinear, takes_kernel

# Steps of at most this many tokens run torch on the calling thread alone (with at most 2
# threads, FEW_TOKENS_ON_TWO_THREADS).
FEW_TOKENS = 256
FEW_TOKENS_ON_TWO_THREADS = 1024


def few_tokens(threads: int) -> int:
    return FEW_TOKENS_ON_TWO_THREADS if threads <= 2 else FEW_TOKENS


class StepThreads:
    def __init__(self, model: torch.nn.Module):
        self.threads = torch.get_num_threads()  # what the user gave torch (--threads) when the engine started
        self.native = any(isinstance(m, GGUFLinear) for m in model.modules())
        if self.native:
            set_kernel_threads(self.threads)

    @contextmanager
    def step(self, num_tokens: int) -> Iterator[None]:
        if not self.native:
            yield
        elif not takes_kernel(num_tokens):  # torch matmuls: torch's threads, the kernels' workers asleep
            set_kernel_workers_spin(False)
            try:
                yield
            finally:
                set_kernel_workers_spin(True)
        elif num_tokens > few_tokens(self.threads):
            yield
        else:
            torch.set_num_threads(1)
            try:
                yield
            finally:
                torch.set_num_threads(self.threads)
