"""Decode speed by calling thread: the main thread, a `threading.Thread`, and `AsyncLLM` (whose
engine steps on its own thread, as the server's does), in one process, interleaved, same model.

It also times one small kernel call (a 896x896 Q8_0 layer, one token) on each thread: the
per-call cost of waking the worker threads is what separates the rows.

    python benchmarks/thread_decode.py [--rounds 3] [--tokens 128]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time

THREADS = 2


def on_thread(fn):
    result = []
    worker = threading.Thread(target=lambda: result.append(fn()))
    worker.start()
    worker.join()
    return result[0]


def kernel_call_us(calls: int = 1000) -> float:
    """Median over 5 repeats of the mean time of one single-token call of a small GGUF layer."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    from qwenkit.quantization.gguf_linear import GGUFLinear

    blocks = quantize(np.random.default_rng(0).standard_normal((896, 896)).astype(np.float32), Q.Q8_0)
    layer = GGUFLinear(torch.from_numpy(blocks), Q.Q8_0, 896)
    x = torch.randn(1, 896)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            layer(x)
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()

    import torch

    from qwenkit.engine import LLM, EngineConfig, SamplingParams
    from qwenkit.engine.llm import AsyncLLM
    from qwenkit.weights.loader import load_model

    torch.set_num_threads(THREADS)
    start = time.monotonic()
    loaded = load_model(None)
    config = EngineConfig(kv_cache_memory=64 << 20)
    llm = LLM(loaded, engine_config=config)
    prompt = "Write a long story about the sea. Once upon a time,"
    params = SamplingParams(max_tokens=args.tokens + 1, temperature=0, ignore_eos=True)

    def decode_rate(out) -> float:
        times = out.token_times[0]
        return args.tokens / (times[-1] - times[0])

    def sync_run() -> float:
        return decode_rate(llm.generate(prompt, params)[0])

    async_llm = AsyncLLM(loaded, engine_config=config)

    async def async_stream() -> float:
        last = None
        async for out in async_llm.generate(prompt, params):
            last = out
        return decode_rate(last)

    print(f"model loaded in {time.monotonic() - start:.0f} s")
    print(f"kernel call (1 token, 896x896 Q8_0): main {kernel_call_us():.1f} us, thread {on_thread(kernel_call_us):.1f} us")
    rows: dict[str, list[float]] = {"main thread": [], "threading.Thread": [], "AsyncLLM": []}
    sync_run()  # warm-up
    for _ in range(args.rounds):
        rows["main thread"].append(sync_run())
        rows["threading.Thread"].append(on_thread(sync_run))
        rows["AsyncLLM"].append(asyncio.run(async_stream()))
    async_llm.shutdown()
    base = statistics.median(rows["main thread"])
    print(f"decode tok/s, {args.tokens} tokens, batch 1, {THREADS} threads, {args.rounds} interleaved rounds")
    for name, rates in rows.items():
        median = statistics.median(rates)
        print(f"  {name:17s} median {median:5.1f}  runs {' '.join(f'{r:.1f}' for r in rates)}  ratio to main {median / base:.2f}")


if __name__ == "__main__":
    main()
