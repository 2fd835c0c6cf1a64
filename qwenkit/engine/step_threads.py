"""Which threads run a step's work when the model's projections are native GGUF kernels.

A few-token step of a GGUF model spends its time in qwenkit's kernels, which run on their own
worker threads (kernels/thread_pool.h), and between them issues small torch operations (norms'
helpers, SiLU, the sampler's passes over the vocabulary). With torch's usual intra-op threads,
those operations start OpenMP regions whose workers then spin for a while after each one, on the
very cores the kernels' workers need next: on 2 cores that costs ~20% of batch-1 decode
(measured: 21 -> 25-27 tok/s, the same as running with OMP_WAIT_POLICY=PASSIVE, which a library
cannot set for its users). So such a step runs torch on the calling thread alone while the
kernels keep every thread; a step with many tokens (a prompt) gives torch its threads back, since
the GGUF layers then multiply through torch's dense matmul.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from qwenkit.kernels import set_kernel_threads
from qwenkit.quantization.gguf_linear import KERNEL_MAX_TOKENS, GGUFLinear


class StepThreads:
    def __init__(self, model: torch.nn.Module):
        self.threads = torch.get_num_threads()  # what the user gave torch (--threads) when the engine started
        self.native = any(isinstance(m, GGUFLinear) for m in model.modules())
        if self.native:
            set_kernel_threads(self.threads)

    @contextmanager
    def step(self, num_tokens: int) -> Iterator[None]:
        if not self.native or num_tokens > KERNEL_MAX_TOKENS:
            yield
            return
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(self.threads)
