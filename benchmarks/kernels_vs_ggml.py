"""qwenkit's GGUF kernels beside ggml's own row dot products, on the same rows of the embedded default.

For each weight kind of the default Q4_K_M file (Q5_0 gate and q, Q6_K and Q4_K down, Q8_0 v and
the output head), one token's product with every row: qwenkit's `matmul` (the kernels this CPU
runs, 1 thread) and a loop over ggml's `ggml_vec_dot_*_q8_*` (the function llama.cpp's CPU backend
calls per row, with its own activation quantization), both in cache (best of many), with their
bytes per second, the ratio and the largest relative difference of the results. The loop is a
small C shim compiled here and linked to the ggml libraries of a llama.cpp build (the one
llama-cpp-python vendors, built as benchmarks/serving.py says). llama.cpp repacks Q4_0/Q4_K into
8-row interleaved blocks on AVX2/AVX-512 where it can (ggml_gemv_*): for Q4_K this measures its
plain vec_dot, not that path.

    python benchmarks/kernels_vs_ggml.py --ggml-lib-dir build/bin [--isa avx2]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

SHIM = r"""
#include <stddef.h>
#include <stdint.h>
typedef void (*vec_dot_t)(int, float*, size_t, const void*, size_t, const void*, size_t, int);
void ggml_vec_dot_q5_0_q8_0(int, float*, size_t, const void*, size_t, const void*, size_t, int);
void ggml_vec_dot_q8_0_q8_0(int, float*, size_t, const void*, size_t, const void*, size_t, int);
void ggml_vec_dot_q6_K_q8_K(int, float*, size_t, const void*, size_t, const void*, size_t, int);
void ggml_vec_dot_q4_K_q8_K(int, float*, size_t, const void*, size_t, const void*, size_t, int);
void quantize_row_q8_0(const float*, void*, int64_t);
void quantize_row_q8_K(const float*, void*, int64_t);
/* which: 0 Q5_0, 1 Q8_0, 2 Q6_K, 3 Q4_K; one token x against every row, as llama.cpp's mul_mat does */
void rows(int which, int64_t nrows, int k, const uint8_t* w, int64_t row_bytes, const float* x, void* xq, float* out) {
  if (which <= 1) quantize_row_q8_0(x, xq, k); else quantize_row_q8_K(x, xq, k);
  vec_dot_t f = which == 0 ? ggml_vec_dot_q5_0_q8_0 : which == 1 ? ggml_vec_dot_q8_0_q8_0
              : which == 2 ? ggml_vec_dot_q6_K_q8_K : ggml_vec_dot_q4_K_q8_K;
  for (int64_t i = 0; i < nrows; ++i) f(k, out + i, 0, w + i * row_bytes, 0, xq, 0, 1);
}
"""
WHICH = {"Q5_0": 0, "Q8_0": 1, "Q6_K": 2, "Q4_K": 3}
CASES = [("blk.3.ffn_gate.weight", None), ("blk.3.attn_q.weight", None), ("blk.3.attn_v.weight", None),
         ("blk.0.ffn_down.weight", None), ("blk.2.ffn_down.weight", None), ("output.weight", 20000)]


def build_shim(lib_dir: Path, out_dir: Path) -> ctypes.CDLL:
    source, shim = out_dir / "rows.c", out_dir / "librows.so"
    source.write_text(SHIM)
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", str(source), "-o", str(shim), f"-L{lib_dir}", "-lggml-cpu", "-lggml-base",
                    f"-Wl,-rpath,{lib_dir}"], check=True)
    ctypes.CDLL(str(lib_dir / "libggml-cpu.so")).ggml_cpu_init()  # ggml's fp16 tables
    return ctypes.CDLL(str(shim))


def best_of(f, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ggml-lib-dir", type=Path, default=Path("/tmp/llsrc/llama_cpp_python-0.3.36/build/bin"),
                        help="directory with libggml-cpu.so and libggml-base.so of a llama.cpp build")
    parser.add_argument("--isa", default=None, help="qwenkit's kernel build (default: the best this CPU runs)")
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()

    import torch
    from gguf import GGUFReader

    from qwenkit.kernels import cpu_kernels, kernel_isa
    from qwenkit.quantization.gguf_linear import pack_if_packable
    from qwenkit.weights.default_model import ensure_assembled

    torch.set_num_threads(1)
    kernels = cpu_kernels(args.isa)
    kernels.set_kernel_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        ggml = build_shim(args.ggml_lib_dir, Path(tmp))
        tensors = {t.name: t for t in GGUFReader(str(ensure_assembled())).tensors}
        print(f"one token x every row, 1 thread, in cache (best of {args.runs}); qwenkit {args.isa or kernel_isa()} build")
        print(f"{'tensor':24s} {'type':5s} {'rows x cols':>13s} {'qwenkit us':>11s} {'GB/s':>6s} {'ggml us':>9s} {'GB/s':>6s} "
              f"{'ggml/qwenkit time':>18s} {'max rel diff':>13s}")
        for name, keep_rows in CASES:
            tensor = tensors[name]
            kind, cols = tensor.tensor_type, int(tensor.shape[0])
            raw = np.ascontiguousarray(tensor.data).view(np.uint8).reshape(int(tensor.shape[1]), -1)[:keep_rows].copy()
            blocks, packed = pack_if_packable(torch.from_numpy(raw), kind, cols, kernels)  # the layout of the build that multiplies
            x = torch.randn(1, cols)
            ours = best_of(lambda: kernels.matmul(x, blocks, int(kind), packed), args.runs)
            out, xq, xs = np.zeros(raw.shape[0], np.float32), np.zeros(cols * 2, np.uint8), x.numpy()
            pointer = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
            theirs = best_of(lambda: ggml.rows(WHICH[kind.name], ctypes.c_int64(raw.shape[0]), cols, pointer(raw),
                                                ctypes.c_int64(raw.shape[1]), pointer(xs), pointer(xq), pointer(out)), args.runs)
            y = kernels.matmul(x, blocks, int(kind), packed)[0].numpy()
            diff = float(np.abs(y - out).max() / np.abs(out).max())
            gb = raw.nbytes / 1e9
            print(f"{name:24s} {kind.name:5s} {raw.shape[0]:6d} x {cols:<5d} {ours * 1e6:11.1f} {gb / ours:6.1f} {theirs * 1e6:9.1f} "
                  f"{gb / theirs:6.1f} {theirs / ours:17.2f}x {diff:13.1e}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
