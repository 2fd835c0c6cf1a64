"""The kernels' own worker threads (thread_pool.cpp): the same results from any calling thread,
errors raised in a worker reach the caller, and a forked child (which inherits no threads) still
runs them."""

from __future__ import annotations

import multiprocessing as mp
import threading

import pytest
import torch

from qwenkit.kernels import cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="native kernels need a C++ compiler")


def product(x: torch.Tensor) -> torch.Tensor:
    blocks = torch.arange(64 * 34 * 8, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(64, 34 * 8)
    blocks[:, 0::34] = 0x00  # fp16 scales: 0x1400 (about 1e-3) in every block
    blocks[:, 1::34] = 0x14
    return cpu_kernels().matmul(x, blocks, 8, False)  # Q8_0 rows of 256 values


def test_any_thread_gets_the_same_result():
    x = torch.randn(5, 256)
    expected = product(x)
    results = []
    workers = [threading.Thread(target=lambda: results.append(product(x))) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(results) == 3 and all(torch.equal(r, expected) for r in results)


def _child(queue, x):
    queue.put(product(x).tolist())  # plain data: a tensor would be shared through a descriptor


def test_a_forked_child_runs_the_kernels():
    x = torch.randn(5, 256)
    expected = product(x)  # the parent's workers exist before the fork
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue, x))
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=60)
    assert torch.equal(torch.tensor(got), expected)


def test_an_error_in_a_worker_reaches_the_caller():
    with pytest.raises(RuntimeError, match="does not match"):
        cpu_kernels().matmul(torch.randn(2, 256), torch.zeros(64, 10, dtype=torch.uint8), 8, False)


def test_a_gguf_decode_step_runs_torch_on_one_thread_and_the_kernels_on_all(gguf_model, monkeypatch):
    """Few-token steps: torch's OpenMP workers would spin on the cores the kernels' workers need
    (engine/step_threads.py), so torch gets the calling thread alone there; a prompt's step (the
    prompt's step) and the caller afterwards get torch's threads back. (The limit is lowered so
    that the prompt is one short step.)"""
    from qwenkit.engine import LLM, SamplingParams, step_threads

    FEW_TOKENS = 64
    monkeypatch.setattr(step_threads, "FEW_TOKENS", FEW_TOKENS)
    monkeypatch.setattr(step_threads, "FEW_TOKENS_ON_TWO_THREADS", FEW_TOKENS)

    seen = []  # (tokens in the step, torch threads, kernel threads) at the output head
    hook = gguf_model.model.lm_head.register_forward_pre_hook(
        lambda _, args: seen.append((torch.get_num_threads(), cpu_kernels().kernel_threads()))
    )
    tokens_per_step = []
    embed = gguf_model.model.model.embed_tokens.register_forward_pre_hook(lambda _, args: tokens_per_step.append(args[0].numel()))
    try:
        threads = torch.get_num_threads()
        llm = LLM(gguf_model)
        llm.generate([list(range(100, 100 + FEW_TOKENS + 20))], SamplingParams(max_tokens=3, temperature=0))
    finally:
        hook.remove()
        embed.remove()
    assert torch.get_num_threads() == threads == 2
    assert tokens_per_step == [FEW_TOKENS + 20, 1, 1]
    assert seen == [(2, 2), (1, 2), (1, 2)]


def test_a_step_of_torch_matmuls_gives_torch_its_threads(gguf_model, monkeypatch):
    """A step of more tokens than the kernels take (KERNEL_MAX_TOKENS) multiplies with torch
    matmuls on dequantized rows, so it runs with torch's threads even when it is short; decode
    steps still run torch on one thread."""
    from qwenkit.engine import LLM, SamplingParams
    from qwenkit.quantization import gguf_linear

    monkeypatch.setattr(gguf_linear, "KERNEL_MAX_TOKENS", 16)
    seen = []  # (torch threads, whether the kernels' idle workers spin) at the output head
    hook = gguf_model.model.lm_head.register_forward_pre_hook(
        lambda _, args: seen.append((torch.get_num_threads(), cpu_kernels().kernel_workers_spin()))
    )
    try:
        LLM(gguf_model).generate([list(range(100, 124))], SamplingParams(max_tokens=2, temperature=0))
    finally:
        hook.remove()
    assert torch.get_num_threads() == 2 and cpu_kernels().kernel_workers_spin()
    assert seen == [(2, False), (1, True)]


def test_requests_to_quiet_the_workers_nest_and_a_failed_step_undoes_its_own(gguf_model, monkeypatch):
    """Each set_kernel_workers_spin(False) is undone by one True (two engines' steps must not undo
    each other's), and a step that raises still undoes its request."""
    from qwenkit.engine.step_threads import StepThreads
    from qwenkit.kernels import set_kernel_workers_spin
    from qwenkit.quantization import gguf_linear

    kernels = cpu_kernels()
    set_kernel_workers_spin(False)
    set_kernel_workers_spin(False)
    set_kernel_workers_spin(True)
    assert not kernels.kernel_workers_spin()
    set_kernel_workers_spin(True)
    set_kernel_workers_spin(True)  # one too many: no effect
    assert kernels.kernel_workers_spin()
    monkeypatch.setattr(gguf_linear, "KERNEL_MAX_TOKENS", 16)
    with pytest.raises(RuntimeError, match="step failed"):
        with StepThreads(gguf_model.model).step(100):
            assert not kernels.kernel_workers_spin()
            raise RuntimeError("step failed")
    assert kernels.kernel_workers_spin()
