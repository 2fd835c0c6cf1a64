"""Batch-1 decode by instruction set: qwenkit's avx512 / avx2 / portable kernels (forced with
QWENKIT_ISA) beside llama.cpp's `llama-bench` built natively and built for AVX2 only, on the
embedded default GGUF, 2 threads, in one run.

    # llama.cpp for AVX2 only, from the llama.cpp that llama-cpp-python vendors:
    cmake -S vendor/llama.cpp -B build-avx2 -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \\
          -DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX512_VBMI=OFF
    cmake --build build-avx2 --target llama-bench -j2
    python benchmarks/isa_decode.py --llama-bench build/bin/llama-bench --llama-bench-avx2 build-avx2/bin/llama-bench
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

THREADS = 2
TOKENS = 128

QWENKIT_DECODE = f"""
import torch
from qwenkit.engine import LLM, SamplingParams
torch.set_num_threads({THREADS})
llm = LLM(None)
prompt = llm.tokenizer.encode_chat([{{"role": "user", "content": "Write a long story about the sea."}}])
params = SamplingParams(max_tokens={TOKENS} + 1, temperature=0, ignore_eos=True)
llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0))
rates = []
for _ in range(3):
    times = llm.generate(prompt, params)[0].token_times[0]
    rates.append({TOKENS} / (times[-1] - times[0]))
print(max(rates))
"""


def qwenkit_decode(isa: str) -> float:
    env = dict(os.environ, QWENKIT_ISA=isa)
    out = subprocess.run([sys.executable, "-c", QWENKIT_DECODE], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def llama_bench(binary: str, gguf: str) -> float:
    out = subprocess.run([binary, "-m", gguf, "-p", "0", "-n", str(TOKENS), "-t", str(THREADS), "-r", "3", "-o", "json"],
                         capture_output=True, text=True, check=True)
    return statistics.mean(r["avg_ts"] for r in json.loads(out.stdout))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-bench", help="llama-bench built for this CPU")
    ap.add_argument("--llama-bench-avx2", help="llama-bench built with GGML_NATIVE=OFF, AVX2 on, AVX-512 off")
    ap.add_argument("--isas", default=None, help="comma-separated; default: every one this CPU runs")
    args = ap.parse_args()
    from qwenkit.kernels import supported_isas
    from qwenkit.weights.default_model import ensure_assembled

    gguf = str(ensure_assembled())
    rows: dict[str, float] = {}
    if args.llama_bench:
        rows["llama.cpp native"] = llama_bench(args.llama_bench, gguf)
    if args.llama_bench_avx2:
        rows["llama.cpp AVX2 only"] = llama_bench(args.llama_bench_avx2, gguf)
    for isa in (args.isas.split(",") if args.isas else supported_isas()):
        rows[f"qwenkit {isa}"] = qwenkit_decode(isa)
    print(f"\nbatch-1 decode, {TOKENS} tokens, {THREADS} threads (best of 3 for qwenkit; llama-bench's mean of 3)")
    native, avx2 = rows.get("llama.cpp native"), rows.get("llama.cpp AVX2 only")
    for name, rate in rows.items():
        ratios = []
        if native:
            ratios.append(f"{rate / native:.2f}x native llama.cpp")
        if avx2:
            ratios.append(f"{rate / avx2:.2f}x AVX2 llama.cpp")
        print(f"{name:22}{rate:8.1f} tok/s   {', '.join(ratios)}")


if __name__ == "__main__":
    main()
