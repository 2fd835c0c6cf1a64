"""What this machine can do at most, printed beside the benchmarks' figures.

- read bandwidth: a 1 GB tensor summed with 2 threads (median of 15). Batch-1 decode reads every
  weight once per token, so bandwidth / bytes per token bounds it.
- float32, bfloat16 and int8 matrix-multiply rates: large square products through torch (oneDNN,
  with AVX512-BF16 / VNNI where the CPU has them; without them bf16 and int8 are emulated and
  slower than float32), 2 threads, best of 5. Batched decode and prefill do about one
  multiply-add per weight per token, so the best rate / multiply-adds per token bounds them.
- the default model's multiply-adds per token and bytes read per token, from its GGUF.
- (`--instructions`, x86 with AVX2) how many 256-bit vector instructions one core retires per
  second, by kind: 12 independent chains of one instruction in registers (enough that no latency
  caps the rate). The int8 kernels need
  ~8 of them per 64 multiply-adds per token (VPMADDUBSW, VPMADDWD, convert, FMA, twice), float32
  one FMA per 8, so this rate, not the matmul libraries, says what batched int8 products can reach.

    python benchmarks/bounds.py [--instructions]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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

_PROBE = r"""
#include <immintrin.h>
#include <chrono>
#include <cstdio>
// 12 independent chains, so that no instruction's latency (3-4 cycles) caps the rate: a chain
// issues one instruction per loop, and 12 per loop fill 4 pipes for 3 cycles.
#define KEEP(a, b, c, d, e, f, g, h, i, j, k, l) \
  __asm__ volatile("" : "+x"(a), "+x"(b), "+x"(c), "+x"(d), "+x"(e), "+x"(f), "+x"(g), "+x"(h), "+x"(i), "+x"(j), "+x"(k), "+x"(l))
#define CHAINS(OP, V) V##0 = OP(V##0); V##1 = OP(V##1); V##2 = OP(V##2); V##3 = OP(V##3); V##4 = OP(V##4); V##5 = OP(V##5); \
                      V##6 = OP(V##6); V##7 = OP(V##7); V##8 = OP(V##8); V##9 = OP(V##9); V##10 = OP(V##10); V##11 = OP(V##11)
#define ALL(V) (V##0, V##1, V##2, V##3, V##4, V##5, V##6, V##7, V##8, V##9, V##10, V##11)
#define RATE(NAME, BODY, VARS) { auto t0 = std::chrono::steady_clock::now(); \
    for (long i = 0; i < N / 12; ++i) { BODY; KEEP VARS; } \
    printf("%s %.2f\n", NAME, N / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 1e9); }
int main() {
  const long N = 480000000;
  __m256i a0 = _mm256_set1_epi8(1), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0, a9 = a0, a10 = a0, a11 = a0;
  __m256 f0 = _mm256_set1_ps(1), f1 = f0, f2 = f0, f3 = f0, f4 = f0, f5 = f0, f6 = f0, f7 = f0, f8 = f0, f9 = f0, f10 = f0, f11 = f0;
  const __m256i w = _mm256_set1_epi8(3);
  const __m256 s = _mm256_set1_ps(1.0001f);
#define MADDUBS(x) _mm256_maddubs_epi16(w, x)
#define MADDWD(x) _mm256_madd_epi16(w, x)
#define ADD(x) _mm256_add_epi32(w, x)
#define FMA(x) _mm256_fmadd_ps(s, x, s)
#define CVT(x) _mm256_cvtepi32_ps(_mm256_castps_si256(x))
  RATE("VPMADDUBSW", CHAINS(MADDUBS, a), ALL(a))
  RATE("VPMADDWD", CHAINS(MADDWD, a), ALL(a))
  RATE("VPADDD", CHAINS(ADD, a), ALL(a))
  RATE("VFMADD231PS", CHAINS(FMA, f), ALL(f))
  RATE("VCVTDQ2PS", CHAINS(CVT, f), ALL(f))
  // the 32-value types' kernel: VPMADDUBSW, VPMADDWD, convert, FMA, three chains each
  RATE("int8-kernel-mix", (a0 = MADDUBS(a0), a1 = MADDUBS(a1), a2 = MADDUBS(a2), a3 = MADDWD(a3), a4 = MADDWD(a4), a5 = MADDWD(a5),
                           f0 = CVT(f0), f1 = CVT(f1), f2 = CVT(f2), f3 = FMA(f3), f4 = FMA(f4), f5 = FMA(f5)),
       (a0, a1, a2, a3, a4, a5, f0, f1, f2, f3, f4, f5))
  volatile float sink = f0[0] + f1[0] + f2[0] + f3[0] + f4[0] + f5[0] + f6[0] + f7[0] + f8[0] + f9[0] + f10[0] + f11[0]
                        + _mm256_extract_epi32(a0, 0) + _mm256_extract_epi32(a5, 0) + _mm256_extract_epi32(a11, 0);
  (void)sink;
}
"""


def vector_instruction_rates() -> dict[str, float]:
    """G instructions/s one core retires of each 256-bit kind (AVX2 + FMA; compiled with g++)."""
    with tempfile.TemporaryDirectory() as tmp:
        source, binary = Path(tmp) / "probe.cpp", Path(tmp) / "probe"
        source.write_text(_PROBE)
        subprocess.run(["g++", "-O2", "-mavx2", "-mfma", str(source), "-o", str(binary)], check=True)
        lines = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout.split("\n")
    return {name: float(rate) for name, rate in (line.split() for line in lines if line)}


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
    if "--instructions" in sys.argv:
        rates = vector_instruction_rates()
        print("one core, G vector instructions/s: " + ", ".join(f"{name} {rate:.2f}" for name, rate in rates.items()))
        mix = rates["int8-kernel-mix"]
        print(f"-> int8 products at ~8 instructions per 64 multiply-adds: <= {mix * 8:.0f} G MAC/s per core; "
              f"float32 FMA: {rates['VFMADD231PS'] * 8:.0f} G MAC/s per core")
