"""The catalog's memory estimate (qwenkit/weights/memory.py) against the measured peak RSS.

Cases: the embedded default model (a real Qwen2.5-Coder-0.5B-Instruct Q4_K_M file made by
llama.cpp), and random-weight GGUFs with real Qwen shapes whose tensor types follow llama.cpp's
recipe: Qwen3-0.6B at Q8_0 and Qwen2.5-1.5B-Instruct at Q4_K_M. Each runs in a fresh process:
load with max_model_len = CONTEXT, a KV pool of exactly that context, a prompt of CONTEXT - 40
tokens and 32 generated tokens; ru_maxrss is the peak. Prints estimate / measured.
Usage: python benchmarks/memory_estimate.py [--context 4096] [--keep DIR] [--only LABEL]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# The child's peak is VmHWM, its own memory's high-water mark: ru_maxrss survives fork and exec, so
# a child of this process (which may have just written a 1 GB random GGUF) would report the parent's.
CHILD = r"""
import json, sys, torch
torch.set_num_threads(2)

def peak_rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

from qwenkit.weights.memory import runtime_baseline
baseline = runtime_baseline()
from qwenkit.engine.llm_engine import EngineConfig, LLMEngine
from qwenkit.engine.sampling_params import SamplingParams
from qwenkit.weights.loader import load_model

path, context = (None if sys.argv[1] == "default" else sys.argv[1]), int(sys.argv[2])
loaded = load_model(path, max_model_len=context)
after_load = peak_rss()
engine = LLMEngine(loaded, EngineConfig(kv_cache_memory=loaded.plan.context_kv_bytes, enable_prefix_caching=False))
ids = torch.randint(0, 150000, (context - 40,), generator=torch.Generator().manual_seed(0)).tolist()
engine.add_request(ids, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
while engine.has_unfinished_requests():
    engine.step()
print(json.dumps({"baseline": baseline, "load_peak": after_load, "peak": peak_rss()}))
"""

# The byte offsets of each block's float16 scale(s), so random blocks decode to small finite values.
_SCALE_BYTES = {"Q8_0": (0, 2), "Q5_0": (0, 2), "Q4_K": (0, 4), "Q6_K": (208, 210)}


def random_blocks(kind: str, rows: int, columns: int, rng: np.random.Generator) -> np.ndarray:
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if kind == "F16":
        return (rng.standard_normal((rows, columns), dtype=np.float32) * 0.02).astype(np.float16)
    data = rng.integers(0, 256, (rows, columns // block, size), dtype=np.uint8)
    lo, hi = _SCALE_BYTES[kind]
    data[:, :, lo:hi] = np.frombuffer(np.full((hi - lo) // 2, 0.002, np.float16).tobytes(), np.uint8)
    return data.reshape(rows, -1)


def write_random_gguf(shape, quant: str, arch: str, path: Path, default_gguf) -> None:
    """A GGUF with `shape`'s tensors in the types memory.tensor_type gives, and the default model's tokenizer."""
    import gguf

    from qwenkit.weights.memory import tensor_type

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (("block_count", shape.layers), ("context_length", 32768), ("embedding_length", shape.hidden),
                       ("feed_forward_length", shape.intermediate), ("attention.head_count", shape.heads),
                       ("attention.head_count_kv", shape.kv_heads), ("attention.key_length", shape.head_dim),
                       ("attention.value_length", shape.head_dim)):
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", 1e6)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    meta = default_gguf.metadata
    w.add_string("tokenizer.ggml.model", meta["tokenizer.ggml.model"])
    w.add_string("tokenizer.ggml.pre", meta["tokenizer.ggml.pre"])
    w.add_array("tokenizer.ggml.tokens", meta["tokenizer.ggml.tokens"])
    w.add_array("tokenizer.ggml.token_type", meta["tokenizer.ggml.token_type"])
    w.add_array("tokenizer.ggml.merges", meta["tokenizer.ggml.merges"])
    for key in ("eos_token_id", "padding_token_id", "bos_token_id"):
        w.add_uint32(f"tokenizer.ggml.{key}", meta[f"tokenizer.ggml.{key}"])
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_string("tokenizer.chat_template", meta["tokenizer.chat_template"])
    ones = np.ones(shape.hidden, np.float32)
    w.add_tensor("output_norm.weight", ones)
    for name, layer, rows, columns in shape.tensors():
        kind = tensor_type(quant, name, layer, shape.layers, columns)
        full = f"{name}.weight" if layer < 0 else f"blk.{layer}.{name}.weight"
        data = random_blocks(kind, rows, columns, rng)
        w.add_tensor(full, data, raw_dtype=None if kind == "F16" else gguf.GGMLQuantizationType[kind])
        if layer >= 0 and name == "attn_q":
            w.add_tensor(f"blk.{layer}.attn_norm.weight", ones)
            w.add_tensor(f"blk.{layer}.ffn_norm.weight", ones)
            if shape.qk_norm:
                w.add_tensor(f"blk.{layer}.attn_q_norm.weight", np.ones(shape.head_dim, np.float32))
                w.add_tensor(f"blk.{layer}.attn_k_norm.weight", np.ones(shape.head_dim, np.float32))
            if shape.qkv_bias:
                q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
                for part, n in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
                    w.add_tensor(f"blk.{layer}.{part}.bias", np.zeros(n, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from qwenkit.formats.gguf_reader import GGUFFile
    from qwenkit.weights.catalog import by_name
    from qwenkit.weights.default_model import ensure_assembled
    from qwenkit.weights.memory import estimate

    parser = argparse.ArgumentParser()
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--keep", type=Path, default=None, help="write the random GGUFs here (and reuse them)")
    parser.add_argument("--only", default=None, help="run only the cases whose label contains this")
    args = parser.parse_args()
    directory = args.keep or Path(tempfile.mkdtemp())
    directory.mkdir(parents=True, exist_ok=True)
    default = GGUFFile(ensure_assembled())
    cases = [("default (real Qwen2.5-Coder-0.5B Q4_K_M)", "default", by_name("Qwen2.5-Coder-0.5B-Instruct").shape, "Q4_K_M")]
    for label, name, arch, quant in (("random Qwen3-0.6B Q8_0", "Qwen3-0.6B", "qwen3", "Q8_0"),
                                     ("random Qwen2.5-1.5B Q4_K_M", "Qwen2.5-1.5B-Instruct", "qwen2", "Q4_K_M")):
        shape = by_name(name).shape
        path = directory / f"{name}-{quant}.gguf"
        if not path.exists():
            write_random_gguf(shape, quant, arch, path, default)
        cases.append((label, str(path), shape, quant))
    print(f"context {args.context} tokens; estimate = weights + KV + runtime (runtime baseline measured in the child)")
    print(f"{'case':<42} {'file':>8} {'weights':>8} {'KV':>7} {'runtime':>8} {'estimate':>9} {'load peak':>9} {'peak RSS':>9} {'est/meas':>8}")
    for label, path, shape, quant in cases:
        if args.only and args.only not in label:
            continue
        out = subprocess.run([sys.executable, "-c", CHILD, path, str(args.context)], capture_output=True, text=True, timeout=1200)
        if out.returncode:
            print(label, "failed:", out.stderr.strip().splitlines()[-1])
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        est = estimate(shape, quant, args.context, baseline_rss=r["baseline"])
        size = Path(ensure_assembled() if path == "default" else path).stat().st_size
        mib = 1 << 20
        print(f"{label:<42} {size / mib:>6.0f}Mi {est.weights / mib:>6.0f}Mi {est.kv_cache / mib:>5.0f}Mi {est.runtime / mib:>6.0f}Mi "
              f"{est.total / mib:>7.0f}Mi {r['load_peak'] / mib:>7.0f}Mi {r['peak'] / mib:>7.0f}Mi {est.total / r['peak']:>8.3f}", flush=True)


if __name__ == "__main__":
    main()
