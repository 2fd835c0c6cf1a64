"""qwenkit beside llama.cpp on one MoE GGUF with Qwen3-30B-A3B's real layer shapes, in one run.

The file is random blocks (tests/random_gguf.py): hidden 2048, 128 experts of which 8 active,
moe_intermediate 768, 32 query / 4 KV heads of 128; a few layers and a tiny vocabulary, so it fits
a small machine (speed per layer is what compares). Experts Q4_K, attention Q8_0. Measured: decode
tokens/s at batch 1 and prefill tokens/s, qwenkit's engine and llama-bench (or llama_cpp's Python
package when llama-bench is absent), with ratios.

    python benchmarks/moe_gguf.py [--layers 4] [--prompt 256] [--decode 32] [--llama-bench PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

THREADS = 2
LLAMA_BENCH = "/tmp/llsrc/llama_cpp_python-0.3.36/build/bin/llama-bench"


def run_qwenkit(path: Path, prompt: int, decode: int) -> dict:
    import torch

    from qwenkit.engine import LLM, EngineConfig, SamplingParams
    from qwenkit.weights.loader import load_model

    torch.set_num_threads(THREADS)
    loaded = load_model(str(path), quantize="gguf")
    llm = LLM(loaded, engine_config=EngineConfig(kv_cache_memory=256 << 20))
    ids = torch.randint(0, 290, (prompt,)).tolist()
    # As llama-bench: a warm-up run (it maps the experts' pages the decode touches), then the mean of 2.
    decode_params = SamplingParams(max_tokens=decode + 1, temperature=0, ignore_eos=True)
    llm.generate(ids[:8], decode_params)
    rates = []
    for _ in range(2):
        times = llm.generate(ids[:8], decode_params)[0].token_times[0]
        rates.append(decode / (times[-1] - times[0]))
    decode_rate = sum(rates) / len(rates)
    out = llm.generate(ids, SamplingParams(max_tokens=1, temperature=0))[0]
    return {"decode": decode_rate, "prefill": prompt / out.metrics.time_to_first_token}


def run_llama_bench(binary: str, path: Path, prompt: int, decode: int) -> dict:
    rows = {}
    for args in (["-p", str(prompt), "-n", "0"], ["-p", "0", "-n", str(decode)]):
        out = subprocess.run([binary, "-m", str(path), "-t", str(THREADS), "-r", "2", "-o", "json", *args],
                             capture_output=True, text=True, check=True)
        result = json.loads(out.stdout)[0]
        rows["prefill" if result["n_prompt"] else "decode"] = result["avg_ts"]
    return rows


def run_llama_cpp_python(path: Path, prompt: int, decode: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=prompt + 64, n_threads=THREADS, n_threads_batch=THREADS, n_batch=512, verbose=False)
    ids = list(range(5, 5 + prompt))
    start = time.monotonic()
    llm.eval(ids)
    prefill = prompt / (time.monotonic() - start)
    llm.reset()
    stamps = []
    for _ in llm.generate(ids[:8], temp=0.0, top_k=1, reset=True):
        stamps.append(time.monotonic())
        if len(stamps) > decode:
            break
    return {"decode": decode / (stamps[-1] - stamps[0]), "prefill": prefill}


def main() -> None:
    from random_gguf import QWEN3_30B_A3B, Q, write_random_moe_gguf

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--llama-bench", default=LLAMA_BENCH)
    ap.add_argument("--file", default="/tmp/qwen3_30b_a3b_shapes.gguf")
    args = ap.parse_args()
    path = Path(args.file)
    shape = replace(QWEN3_30B_A3B, layers=args.layers)
    if not path.exists():
        write_random_moe_gguf(path, shape, expert_types=(Q.Q4_K, Q.Q4_K, Q.Q4_K), other_type=Q.Q8_0)
    print(f"{path}: {path.stat().st_size / 1e9:.2f} GB, {args.layers} layers of Qwen3-30B-A3B's shapes, "
          f"{THREADS} threads (shared machine: numbers move with the neighbours' load)")
    qwenkit = run_qwenkit(path, args.prompt, args.decode)
    if os.path.exists(args.llama_bench):
        anchor, name = run_llama_bench(args.llama_bench, path, args.prompt, args.decode), "llama-bench"
    else:
        anchor, name = run_llama_cpp_python(path, args.prompt, args.decode), "llama_cpp (Python)"
    print(f"{'':10s}{'qwenkit':>10s}{name:>20s}{'ratio':>8s}")
    for key in ("decode", "prefill"):
        print(f"{key + ' t/s':10s}{qwenkit[key]:10.1f}{anchor[key]:20.1f}{qwenkit[key] / anchor[key]:8.2f}")


if __name__ == "__main__":
    main()
