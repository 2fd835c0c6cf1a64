"""How much memory a Qwen model needs in qwenkit at a quantization and a context, and how much this
machine has.

needed = weights + KV cache + runtime
  weights  every tensor's parameters x the bits per weight of the type llama.cpp's recipe gives it
           (Q4_K_M: Q4_K, with Q6_K for the output and for attn_v/ffn_down in the layers
           llama.cpp's use_more_bits picks; a K-quant on rows not a multiple of 256 falls back to
           Q5_0/Q8_0, as llama.cpp does), counted the way qwenkit holds them: the native kernels'
           types (MoE experts included) stay in their blocks, F16/BF16 weights become float32. The
           memory-mapped embedding counts whole when it is also the output (read every step), else
           for the share one step's lookups fault in (64 KiB each, the kernel's fault-around; the
           pages are let go after each lookup, so at most a prefill chunk's, and `context`'s if
           fewer).
  KV       layers x kv_heads x head_dim x 2 (K and V) x 2 bytes (float16, the GGUF default) x context
  runtime  this process's own RSS with torch and qwenkit imported (measured), the tokenizer and GGUF
           vocabulary (measured once on the 151,936-token Qwen vocabulary) and one prefill chunk's activations
           (with the context's keys and values gathered for its attention).
benchmarks/memory_estimate.py checks the sum against the measured peak RSS.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from qwenkit.kernels import default_prefill_chunk  # the engine's max_num_batched_tokens

GIB = 1 << 30
QUANTS = ("F16", "Q8_0", "Q4_K_M")
BITS = {"F32": 32.0, "F16": 16.0, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_0": 5.5, "Q4_K": 4.5}
KERNEL_TYPES = {"Q8_0", "Q6_K", "Q5_0", "Q4_K"}  # what qwenkit runs in place (others become float32)
_K_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}  # llama.cpp's type for a K-quant on rows it cannot tile
# The tokenizer plus the GGUF header's vocabulary arrays for Qwen's 151,936 tokens, measured here
# (RSS after Tokenizer.from_gguf minus RSS before opening the file, embedded default model).
TOKENIZER_BYTES = 130 << 20
FAULT_AROUND = 64 << 10  # bytes a page fault on a file mapping maps at once (Linux's fault_around_bytes)


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Qwen text model that decide its size (config.json's names)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int = 151936
    tied: bool = False  # input embedding reused as the output projection
    qkv_bias: bool = False  # Qwen2 family
    qk_norm: bool = False  # Qwen3 family
    experts: int = 0
    active_experts: int = 0
    moe_intermediate: int = 0
    shared_expert_intermediate: int = 0
    gguf_output: bool | None = None  # the GGUF has its own output.weight (default: when not tied)

    def tensors(self) -> list[tuple[str, int, int, int]]:
        """(llama.cpp name with {i} for the layer, layer or -1, rows, columns) of every weight matrix."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        out = [("token_embd", -1, self.vocab, h)]
        if self.gguf_output if self.gguf_output is not None else not self.tied:
            out.append(("output", -1, self.vocab, h))
        for i in range(self.layers):
            out += [("attn_q", i, q, h), ("attn_k", i, kv, h), ("attn_v", i, kv, h), ("attn_output", i, h, q)]
            if self.experts:
                e, m = self.experts, self.moe_intermediate
                out += [("ffn_gate_exps", i, e * m, h), ("ffn_up_exps", i, e * m, h), ("ffn_down_exps", i, e * h, m)]
                if self.shared_expert_intermediate:
                    s = self.shared_expert_intermediate
                    out += [("ffn_gate_shexp", i, s, h), ("ffn_up_shexp", i, s, h), ("ffn_down_shexp", i, h, s)]
            else:
                out += [("ffn_gate", i, self.intermediate, h), ("ffn_up", i, self.intermediate, h), ("ffn_down", i, h, self.intermediate)]
        return out

    def small_params(self) -> int:
        """Norms, biases, routers: kept in float32."""
        per_layer = 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        if self.qkv_bias:
            per_layer += (self.heads + 2 * self.kv_heads) * self.head_dim
        if self.experts:
            per_layer += self.experts * self.hidden + (self.hidden if self.shared_expert_intermediate else 0)
        return self.layers * per_layer + self.hidden

    @property
    def params(self) -> int:
        # a tied model's output is its embedding: counted once (a GGUF may still store it twice)
        return sum(r * c for n, _, r, c in self.tensors() if not (n == "output" and self.tied)) + self.small_params()

    @property
    def active_params(self) -> int:
        if not self.experts:
            return self.params
        expert_params = 3 * self.hidden * self.moe_intermediate * self.layers
        return self.params - expert_params * (self.experts - self.active_experts)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def _use_more_bits(layer: int, layers: int) -> bool:
    # llama.cpp (llama-quant.cpp) counts attn_v / ffn_down tensors in the order it meets them and gives
    # more bits to the first and last eighth of that count and every third in between. The converter
    # writes layers in the checkpoint's name order (blk.0, blk.1, blk.10, ...), so the count is the
    # layer's place in that order (checked tensor by tensor against Qwen's own Q4_K_M file).
    i = sorted(range(layers), key=str).index(layer)
    return i < layers // 8 or i >= 7 * layers // 8 or (i - layers // 8) % 3 == 2


def tensor_type(quant: str, name: str, layer: int, layers: int, columns: int) -> str:
    """The GGUF type llama.cpp's `quant` recipe gives a weight matrix (simplified to Qwen's tensors)."""
    if quant in ("F16", "Q8_0"):
        return quant
    if quant != "Q4_K_M":
        raise ValueError(f"unknown quantization {quant!r}; known: {', '.join(QUANTS)}")
    if name == "output":
        kind = "Q6_K"
    elif name in ("attn_v", "ffn_down", "ffn_down_exps") and _use_more_bits(layer, layers):
        kind = "Q6_K"
    else:
        kind = "Q4_K"
    return kind if columns % 256 == 0 else _K_FALLBACK[kind]


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.runtime


def weight_bytes(shape: ModelShape, quant: str, context: int | None = None) -> int:
    """Resident bytes of the weights in qwenkit (GGUF blocks in place, float32 compute) after
    `context` tokens have been looked up (None: every embedding row)."""
    total = 4 * shape.small_params()
    has_output = any(n == "output" for n, *_ in shape.tensors())
    for name, layer, rows, columns in shape.tensors():
        kind = tensor_type(quant, name, layer, shape.layers, columns)
        in_place = kind in KERNEL_TYPES
        size = int(rows * columns * BITS[kind] / 8) if in_place else rows * columns * 4
        if name == "token_embd" and in_place and has_output and context is not None:  # pages dropped after each lookup
            size = int(size * _touched_fraction(size, min(context, default_prefill_chunk())))
        total += size
    return total


def _touched_fraction(mapped_bytes: int, lookups: int) -> float:
    """Share of a memory-mapped embedding resident after `lookups` row lookups. Each lookup faults in
    its 64 KiB neighbourhood (Linux's default fault-around), so with tokens spread over the vocabulary
    the share is 1 - exp(-lookups / windows). A tied embedding is also the output projection, read
    whole every step: that case never gets here."""
    windows = max(1, mapped_bytes // FAULT_AROUND)
    return 1 - math.exp(-lookups / windows)


def activation_bytes(shape: ModelShape, context: int) -> int:
    """One prefill chunk's largest live buffers (float32): the MLP's gate, up and product, q/k/v,
    attention output; and the keys and values of the `context` before it, gathered from the cache
    (float16) and converted to float32 for the chunk's attention (6 bytes a value, K and V)."""
    width = 3 * max(shape.intermediate, shape.moe_intermediate * shape.active_experts) + 6 * shape.hidden
    gathered = 2 * 6 * context * shape.kv_heads * shape.head_dim
    return default_prefill_chunk() * width * 4 + gathered


def estimate(shape: ModelShape, quant: str, context: int, baseline_rss: int | None = None) -> MemoryEstimate:
    runtime = (baseline_rss if baseline_rss is not None else runtime_baseline()) + TOKENIZER_BYTES + activation_bytes(shape, context)
    return MemoryEstimate(weight_bytes(shape, quant, context), shape.kv_bytes_per_token() * context, runtime)


def runtime_baseline() -> int:
    """This process's RSS with torch and qwenkit's model code imported: what a serving process starts from."""
    import qwenkit.weights.loader  # noqa: F401  (torch, the model, the kernels' bindings)

    return current_rss()


def current_rss() -> int:
    """This process's resident memory now: torch and qwenkit imported, no model (the runtime's baseline)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def available_memory() -> int:
    """MemAvailable from /proc/meminfo: what a new process can use without swapping."""
    text = Path("/proc/meminfo").read_text()
    m = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    if m is None:
        m = re.search(r"^MemFree:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else 0


def fit_text(needed: int, available: int) -> str:
    return "fits" if needed <= available else f"needs {(needed - available) / GIB:.1f} GiB more"
