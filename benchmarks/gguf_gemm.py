"""GGUF layers of the default model by token count: the native kernel (int8, weights read in place)
against the dense path (dequantized rows, then a bfloat16 or float32 matmul), per token, in one run.

Picks `KERNEL_MAX_TOKENS` (where GGUFLinear switches to the dense path): the first column where
the dense path is faster for the model's layers taken together.

    python benchmarks/gguf_gemm.py [--tokens 1,2,4,8,16,32,48,64,128,256] [--threads 2]
"""

from __future__ import annotations

import argparse
import time


def best_of(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="1,2,4,8,16,32,48,64,128,256")
    parser.add_argument("--threads", type=int, default=2, help="1 gives steadier numbers on a busy machine")
    args = parser.parse_args()

    import numpy as np
    import torch

    from qwenkit.quantization.gguf_linear import GGUFLinear, dense_block_matmul, native_kernels
    from qwenkit.weights.default_model import ensure_assembled
    from qwenkit.formats.gguf_reader import GGUFFile

    torch.set_num_threads(args.threads)
    gguf = GGUFFile(ensure_assembled())
    layers = {}  # one layer of each (type, shape) in block 0, as the model uses them
    for tensor in gguf.tensors.values():
        if tensor.name.startswith("blk.0.") and len(tensor.shape) == 2:
            key = (tensor.kind.name, tensor.shape)
            if key not in layers:
                layers[key] = GGUFLinear(torch.from_numpy(np.array(gguf.raw(tensor))), tensor.kind, tensor.shape[1])
    native = native_kernels()
    counts = [int(t) for t in args.tokens.split(",")]
    print(f"{'layer':28s}" + "".join(f"{t:>14d}" for t in counts) + "   (us per token: kernel / dense)")
    totals = {t: [0.0, 0.0] for t in counts}
    for (kind, shape), layer in layers.items():
        cells = []
        for t in counts:
            x = torch.randn(t, shape[1])
            kernel = best_of(lambda: native.matmul(x, layer.blocks, layer.kind_id, layer.packed)) / t * 1e6
            dense = best_of(lambda: dense_block_matmul(x, layer.blocks, layer.kind_id, layer.in_features, layer.packed)) / t * 1e6
            totals[t][0] += kernel
            totals[t][1] += dense
            cells.append(f"{kernel:7.0f}/{dense:<6.0f}")
        print(f"{kind + ' ' + 'x'.join(map(str, shape)):28s}" + "".join(f"{c:>14s}" for c in cells))
    print(f"{'all of the above':28s}" + "".join(f"{f'{k:.0f}/{d:.0f}':>14s}" for k, d in totals.values()))
    print("kernel speed-up over dense: " + " ".join(f"T={t}: {d / k:.2f}x" for t, (k, d) in totals.items()))
    faster = [t for t, (k, d) in totals.items() if d < k]
    print(f"dense path first faster at T={faster[0] if faster else 'none measured'}")


if __name__ == "__main__":
    main()
