"""Tensor parallel on one machine against one process, on the same checkpoint: speed and memory.

Speed (the embedded default model, `qwenkit bench` as a user runs it): one process with every
core, against `torchrun --nproc-per-node 2 ... --tensor-parallel-size 2` with the processes'
sums and gathers through shared memory, and through gloo (QWENKIT_TP_SHARED_MEMORY=0), at 1 and
16 concurrent requests, the three interleaved round by round. On one machine tensor parallelism
has the same cores and memory bandwidth as one process, so this measures what it costs; it is
for models bigger than one machine, and for several sockets.

Memory: peak memory of each rank against one process. A rank should hold its share of the
decoder layers and of the output projection, plus the replicated parts (embedding, norms,
routers; a float output projection tied to the embedding), and never the whole model on the way
there. Cases: the embedded default model (GGUF Q4_K_M, blocks run in place), a random-weight GGUF
with Qwen2.5-1.5B's shapes (Q4_K_M), and a random bfloat16 safetensors checkpoint with
Qwen2.5-0.5B's shapes. Each case loads with a 64 MiB KV pool, prefills a 200-token prompt and
decodes 16 tokens: once in one process, once as 2 torchrun processes. Prints each process's peak
RSS (VmHWM) and its file-backed / anonymous split at the end.
Usage: python benchmarks/tensor_parallel.py [--keep DIR] [--only LABEL] [--rounds 3] [--skip-speed] [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Every rank writes its peak at exit: ranks > 0 never return from LLM() (they serve rank 0's steps).
CHILD = r"""
import atexit, json, os, sys, torch

def status():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields

out, path, dtype, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rank = int(os.environ.get("RANK", "0"))
atexit.register(lambda: open(f"{out}.{rank}", "w").write(json.dumps(status())))
from qwenkit.engine.llm import LLM
from qwenkit.engine.llm_engine import EngineConfig
from qwenkit.engine.sampling_params import SamplingParams
# A small KV pool (each rank allocates the pool it is given), so the weights are what differ.
config = EngineConfig(kv_cache_memory=64 << 20)
llm = LLM(None if path == "default" else path, None if dtype == "auto" else dtype, config, tensor_parallel_size=size)
ids = torch.randint(0, 150000, (200,), generator=torch.Generator().manual_seed(0)).tolist()
llm.generate([ids], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
llm.engine.close()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(path: str, dtype: str, size: int, work: Path) -> list[dict]:
    out = work / f"peak-{size}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if size == 1:
        cmd = [sys.executable, "-c", CHILD, str(out), path, dtype, "1"]
    else:
        script = work / "child.py"
        script.write_text(CHILD)
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(size), "--master-port", str(free_port()),
               str(script), str(out), path, dtype, str(size)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if done.returncode:
        raise SystemExit(f"{path} x{size} failed:\n{done.stderr[-3000:]}")
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(size)]


def bench(size: int, requests: int, shared: bool = True) -> dict[str, float]:
    """`qwenkit bench` on the default model: output tok/s and inter-token p50 (ms)."""
    args = ["bench", "--num-requests", str(requests), "--prompt-len", "128", "--output-len", "64"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QWENKIT_TP_SHARED_MEMORY": "1" if shared else "0"}
    if size == 1:
        cmd = [sys.executable, "-m", "qwenkit.cli.main", *args]
    else:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // size))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(size), "--master-port", str(free_port()),
               "-m", "qwenkit.cli.main", *args, "--tensor-parallel-size", str(size)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if done.returncode:
        raise SystemExit(f"bench x{size} failed:\n{done.stderr[-3000:]}")
    out = {}
    for line in done.stdout.splitlines():
        if line.startswith("output tokens/s"):
            out["tok/s"] = float(line.split()[-1])
        elif line.startswith("inter-token p50/p99"):
            out["itl"] = float(line.split()[-4])
    return out


def speed(rounds: int) -> None:
    import statistics

    runs = {("one process", 1, True): [], ("2 processes, shared memory", 2, True): [], ("2 processes, gloo", 2, False): []}
    for requests in (1, 16):
        for key in runs:
            runs[key] = []
        for _ in range(rounds):
            for label, size, shared in runs:
                runs[(label, size, shared)].append(bench(size, requests, shared))
        base = statistics.median(r["tok/s"] for r in runs[("one process", 1, True)])
        print(f"{requests} request(s), 128-token prompts, 64 tokens out; median of {rounds} rounds (all rounds)")
        for (label, _, _), results in runs.items():
            tps = [r["tok/s"] for r in results]
            itl = statistics.median(r["itl"] for r in results)
            print(f"  {label:<28} {statistics.median(tps):6.1f} tok/s ({' '.join(f'{t:.1f}' for t in tps)})  "
                  f"inter-token p50 {itl:5.1f} ms  {statistics.median(tps) / base:.2f}x one process", flush=True)


def random_float_checkpoint(directory: Path) -> None:
    """Qwen2.5-0.5B's shapes (tied embedding), random bfloat16 weights, the default model's tokenizer."""
    import torch
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True, torch_dtype="bfloat16",
    )
    # 14 query heads over 2 processes: 7 each (and 1 of the 2 key/value heads each).
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    from types import SimpleNamespace

    from qwenkit.formats.gguf_reader import GGUFFile
    from qwenkit.tokenizer.tokenizer import Tokenizer
    from qwenkit.weights.default_model import ensure_assembled
    from qwenkit.weights.save import save_tokenizer

    save_tokenizer(SimpleNamespace(tokenizer=Tokenizer.from_gguf(GGUFFile(ensure_assembled())), generation_config={}), directory)


def main() -> None:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from memory_estimate import write_random_gguf

    from qwenkit.formats.gguf_reader import GGUFFile
    from qwenkit.weights.catalog import by_name
    from qwenkit.weights.default_model import ensure_assembled

    parser = argparse.ArgumentParser()
    parser.add_argument("--keep", type=Path, default=None, help="write the random checkpoints here (and reuse them)")
    parser.add_argument("--only", default=None, help="run only the memory cases whose label contains this")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    if not args.skip_speed:
        speed(args.rounds)
    if args.skip_memory:
        return
    work = args.keep or Path(tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    default = ensure_assembled()
    gguf_15b = work / "Qwen2.5-1.5B-Instruct-Q4_K_M.gguf"
    float_05b = work / "qwen2.5-0.5b-bf16"
    cases = [("default Qwen2.5-Coder-0.5B Q4_K_M (gguf blocks)", "default", "auto", lambda: None, default),
             ("random Qwen2.5-1.5B Q4_K_M (gguf blocks)", str(gguf_15b), "auto",
              lambda: write_random_gguf(by_name("Qwen2.5-1.5B-Instruct").shape, "Q4_K_M", "qwen2", gguf_15b, GGUFFile(default)), gguf_15b),
             ("random Qwen2.5-0.5B bf16 safetensors", str(float_05b), "bfloat16", lambda: random_float_checkpoint(float_05b), float_05b)]
    mib = 1 << 20
    print(f"{'case':<48} {'size':>7} {'1 process':>10} {'rank 0':>8} {'rank 1':>8} {'rank/one':>8}  (peak RSS; at exit rank 1: anon / file)")
    for label, path, dtype, make, target in cases:
        if args.only and args.only not in label:
            continue
        if not Path(target).exists():
            make()
        size = sum(p.stat().st_size for p in Path(target).rglob("*")) if Path(target).is_dir() else Path(target).stat().st_size
        one = run(path, dtype, 1, work)[0]
        two = run(path, dtype, 2, work)
        worst = max(r["VmHWM"] for r in two)
        print(f"{label:<48} {size / mib:>5.0f}Mi {one['VmHWM'] / mib:>8.0f}Mi {two[0]['VmHWM'] / mib:>6.0f}Mi {two[1]['VmHWM'] / mib:>6.0f}Mi "
              f"{worst / one['VmHWM']:>8.2f}  {two[1]['RssAnon'] / mib:.0f} / {two[1]['RssFile'] / mib:.0f} Mi "
              f"(one process: {one['RssAnon'] / mib:.0f} / {one['RssFile'] / mib:.0f} Mi)", flush=True)


if __name__ == "__main__":
    main()
