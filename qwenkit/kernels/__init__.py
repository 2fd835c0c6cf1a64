"""Native CPU kernels, compiled on first use with torch's C++ extension builder and cached.

One module, `cpu_kernels()`: GGUF blocks used in place (ggml_cpu.cpp) and the small operations
of a decode step (decode_cpu.cpp). If it cannot be built or this CPU lacks AVX-512 VNNI,
`cpu_kernels()` returns None and callers take the pure-torch path.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

_NAME = "qwenkit_cpu"
_SOURCES = [str(Path(__file__).with_name(name)) for name in ("bindings.cpp", "ggml_cpu.cpp", "decode_cpu.cpp")]
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma", "-fopenmp"]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@functools.cache
def bf16_matmul_is_fast() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), where oneDNN's bf16
    matmul runs 2-3x faster than float32; elsewhere it is emulated and no faster."""
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


@functools.cache
def cpu_kernels() -> ModuleType | None:
    """The compiled kernels, or None (with one warning saying why) when they cannot run here."""
    if os.environ.get("QWENKIT_NO_NATIVE") == "1":
        return None
    needed = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c"}
    if not needed <= _cpu_flags():
        return None  # the CPU cannot run them: no warning, the torch path is the design for it
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        if not (Path(_get_build_directory(_NAME, verbose=False)) / f"{_NAME}.so").exists():
            print("qwenkit: compiling the native CPU kernels (first use only, about 30 s)...", file=sys.stderr, flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = load(name=_NAME, sources=_SOURCES, extra_cflags=_FLAGS,
                          extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, no Python headers: stay correct, get slower
        warnings.warn(f"qwenkit: the native CPU kernels could not be built ({type(exc).__name__}: {str(exc)[:200]}); "
                      "GGUF weights will be dequantized to float instead", stacklevel=2)
        return None
    return module
