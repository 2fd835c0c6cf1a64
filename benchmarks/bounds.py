"""What this machine can do at most, printed beside the benchmarks' figures.

- read bandwidth: a 1 GB tensor summed with 2 threads (median of 15). Batch-1 decode reads every
  weight once per token, so bandwidth / bytes per token bounds it.
- float32, bfloat16 and int8 matrix-multiply rates: large square products through torch (oneDNN,
  with AVX512-BF16 / VNNI where the CPU has them; without them bf16 and int8 are emulated and
  slower than float32), 2 threads, best of 5. Batched decode and prefill do about one
  multiply-add per weight per token, so the best rate / multiply-adds per token bounds them.
- the default model's multiply-adds per token and bytes read per token, from its GGUF.

    python benchmarks/bounds.py
"""

from __future__ import annotations

import statistics
import time

THREADS = 2


def read_bandwidth() -> float:
    """GB/s reading a 1 GB tensor with 2 threads (median of 15)."""
    import torch

    torch.set_num_threads(THREADS)
    data = torch.ones(2**30 // 4, dtype=torch.float32)
    data.sum()
    rates = []
    for _ in range(15):
        start = time.perf_counter()
        data.sum()
        rates.append(data.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def matmul_rate(dtype_name: str, size: int = 2048) -> float:
    """G multiply-adds/s of a [size, size] x [size, size] product in float32, bfloat16 or int8 (best of
    5). A type the CPU only emulates (bf16 and int8 without AVX512-BF16 / VNNI run at ~1 G MAC/s,
    ~10 s per product) is measured on 512 x 512 instead."""
    import torch

    if size > 512:
        small = matmul_rate(dtype_name, 512)
        if 512**3 / (small * 1e9) > 0.05:
            return small

    torch.set_num_threads(THREADS)
    if dtype_name == "int8":
        a = torch.randint(-127, 127, (size, size), dtype=torch.int8)
        b = torch.randint(-127, 127, (size, size), dtype=torch.int8)
        run = lambda: torch._int_mm(a, b)  # noqa: E731 - int8 x int8 -> int32 (oneDNN, VNNI where present)
    else:
        a = torch.randn(size, size, dtype=getattr(torch, dtype_name))
        b = torch.randn(size, size, dtype=getattr(torch, dtype_name))
        run = lambda: a @ b  # noqa: E731
    run()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return size**3 / best / 1e9


def model_costs() -> tuple[float, float]:
    """(multiply-adds, bytes of weights read) per decoded token of the embedded default model: every
    2-D weight once, the tied embedding as the output head (the input embedding reads one row)."""
    from qwenkit.formats.gguf_reader import GGUFFile
    from qwenkit.weights.default_model import ensure_assembled

    gguf = GGUFFile(ensure_assembled())
    names = {t.name for t in gguf.tensors.values()}
    # an untied output head is its own tensor; then the input embedding is only looked up
    tensors = [t for t in gguf.tensors.values() if not (t.name == "token_embd.weight" and "output.weight" in names)]
    macs = sum(t.shape[0] * t.shape[1] for t in tensors if len(t.shape) == 2)
    read = sum(t.n_bytes for t in tensors)
    return macs, read


def describe() -> str:
    bandwidth = read_bandwidth()
    rates = {name: matmul_rate(name) for name in ("float32", "bfloat16", "int8")}
    macs, read = model_costs()
    return (f"bounds here ({THREADS} threads): read {bandwidth:.1f} GB/s -> batch-1 decode <= {bandwidth * 1e9 / read:.0f} tok/s "
            f"({read / 1e9:.2f} GB read per token); matmul "
            + ", ".join(f"{name} {rate:.0f} G MAC/s" for name, rate in rates.items())
            + " -> compute-bound decode/prefill <= "
            + ", ".join(f"{rate * 1e9 / macs:.0f} tok/s ({name})" for name, rate in rates.items())
            + f" at {macs / 1e9:.2f} G MAC per token")


if __name__ == "__main__":
    print(describe())
