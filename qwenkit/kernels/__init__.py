"""Native CPU kernels, compiled on first use with torch's C++ extension builder and cached.

One module, `cpu_kernels()`: GGUF blocks used in place and the small operations of a decode step,
built for the instruction set this CPU has, each build its own cached module:
  avx512    AVX-512 VNNI (ggml_cpu.cpp: hand-written VPDPBUSD kernels)
  avx2      AVX2 + FMA + F16C (ggml_avx2.cpp: hand-written VPMADDUBSW kernels, as llama.cpp's AVX2 path)
  portable  any other CPU (ggml_portable.cpp, no instruction-set flag)
QWENKIT_ISA=avx512|avx2|portable forces one (read once; a CPU cannot run a richer set than it
has). `cpu_kernels()` returns None only when no C++ compiler can build them, or with
QWENKIT_NO_NATIVE=1; callers then take the pure-torch path.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import warnings
from pathlib import Path
from types import ModuleType

from qwenkit.errors import QwenkitError

_COMMON = ("bindings.cpp", "decode_cpu.cpp", "decode_layers.cpp", "gguf_matmul.cpp", "shared_memory.cpp", "thread_pool.cpp")
_ISAS = {
    # name: (CPU flags needed, GGUF kernel source, compiler flags)
    "avx512": ({"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c", "fma"}, "ggml_cpu.cpp",
               ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma"]),
    "avx2": ({"avx2", "fma", "f16c"}, "ggml_avx2.cpp", ["-mavx2", "-mfma", "-mf16c"]),
    "portable": (set(), "ggml_portable.cpp", []),
}


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


def default_prefill_chunk() -> int:
    """The engine's default prefill chunk in tokens (EngineConfig.max_num_batched_tokens). Where
    bf16 is fast, long prompts take the dense bf16 path (quantization/gguf_linear.py), on which
    every chunk dequantizes every weight once, so fewer, larger chunks pay: on the AMX Xeon (2
    threads) a 1000-token prompt in 512-token steps ran at 640-780 tok/s, in 256-token steps at
    590-700, in 1024 at 560-740. Where the int8 kernels take prompts, 256 (measured on Zen 3,
    engine/llm_engine.py)."""
    return 512 if bf16_matmul_is_fast() else 256


def supported_isas() -> list[str]:
    """The kernel builds this CPU can run, fastest first."""
    flags = _cpu_flags()
    x86 = platform.machine().lower() in {"x86_64", "amd64", "i686", "i386"}
    return [name for name, (needed, _, _) in _ISAS.items() if name == "portable" or (x86 and needed <= flags)]


@functools.cache
def kernel_isa() -> str:
    """The instruction set the kernels are built for: QWENKIT_ISA if set, else the best this CPU has."""
    forced = os.environ.get("QWENKIT_ISA", "").strip().lower()
    supported = supported_isas()
    if not forced:
        return supported[0]
    if forced not in _ISAS:
        raise QwenkitError(f"QWENKIT_ISA={forced!r} is not one of {', '.join(_ISAS)}")
    if forced not in supported:
        raise QwenkitError(f"QWENKIT_ISA={forced}: this CPU cannot run it (it can run {', '.join(supported)})")
    return forced


def set_kernel_threads(threads: int) -> None:
    """Run the kernels on `threads` threads whatever torch's own count on the calling thread is
    (0: follow torch.get_num_threads(), the default). A no-op without the native kernels."""
    kernels = cpu_kernels()
    if kernels is not None:
        kernels.set_kernel_threads(threads)


def set_kernel_workers_spin(spin: bool) -> None:
    """False: ask the kernels' idle worker threads to sleep at once (while torch's own threads
    share the cores, kernels/thread_pool.h) instead of spinning briefly first (the default: a
    decode step's kernel calls come tens of microseconds apart); True: undo one such request
    (requests nest). A no-op without the native kernels."""
    kernels = cpu_kernels()
    if kernels is not None:
        kernels.set_kernel_workers_spin(spin)


@functools.cache
def cpu_kernels(isa: str | None = None) -> ModuleType | None:
    """The compiled kernels for `isa` (default: kernel_isa()), or None (with one warning saying
    why) when they cannot be built here."""
    if os.environ.get("QWENKIT_NO_NATIVE") == "1":
        return None
    isa = isa or kernel_isa()
    _, source, isa_flags = _ISAS[isa]
    name = f"qwenkit_cpu_{isa}"
    here = Path(__file__).parent
    sources = [str(here / s) for s in (*_COMMON, source)]
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        if not (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").exists():
            print(f"qwenkit: compiling the native CPU kernels for {isa} (first use only, about half a minute)...",
                  file=sys.stderr, flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # No fast-math and no FMA contraction in the plain-C++ build: its dequantized values
            # must be ggml's bit for bit.
            return load(name=name, sources=sources, extra_cflags=["-O3", "-ffp-contract=off", *isa_flags], verbose=False)
    except Exception as exc:  # no compiler, no ninja, no Python headers: stay correct, get slower
        warnings.warn(f"qwenkit: the native CPU kernels could not be built ({type(exc).__name__}: {str(exc)[:200]}); "
                      "GGUF weights will be dequantized to float instead", stacklevel=2)
        return None
