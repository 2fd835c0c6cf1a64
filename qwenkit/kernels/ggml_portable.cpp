// GGUF quantized blocks used in place on CPUs with neither AVX-512 VNNI nor AVX2: the same three
// functions as ggml_cpu.cpp (matmul, dequantize_into, pack), with the same results, in plain C++
// built with no instruction-set flag.
//
// Each row is decoded once per call into codes and a scale and minimum per 16 values
// (RowScratch, L1-resident), then dotted with every token's int8 activations: the generic row
// path of gguf_blocks.h, which the SIMD builds also take for the block types they have no kernel for.
//     w = scale * (code - zero) - min
// The formulas follow ggml's dequantize_row_*, so `dequantize_into` is bit-equal to ggml; the
// products differ from the SIMD builds' only in the order float sums are added.

#include <torch/extension.h>

#include "gguf_blocks.h"

using namespace qwenkit;

// y[t, n] = sum_k x[t, k] * w[n, k] for GGUF block rows w (uint8 [N, bytes per row]).
torch::Tensor matmul(torch::Tensor x, torch::Tensor w, int64_t kind, bool packed) {
  check_matmul_args(x, w, kind, packed);
  x = x.contiguous();
  w = w.contiguous();
  const int64_t tokens = x.size(0), k = x.size(1), n = w.size(0);
  const QuantizedActivations a = quantize_activations(x.data_ptr<float>(), tokens, k, activation_block(static_cast<int>(kind)));
  auto y = torch::empty({tokens, n}, x.options());
  unpacked_rows_matmul(w.data_ptr<uint8_t>(), w.size(1), n, k, format_of(static_cast<int>(kind)).zero, a, tokens, y.data_ptr<float>(),
                       [&](const uint8_t* row, int64_t k, RowScratch& r) { unpack_any_row(static_cast<int>(kind), packed, row, k, r); }, scratch_row_dot);
  return y;
}

// out[N, K] = values of GGUF block rows w: in float32 equal to ggml's dequantize_row_*, in
// bfloat16 those values rounded to nearest even.
void dequantize_into(torch::Tensor w, int64_t kind, torch::Tensor out, bool packed) {
  dequantize_rows(w, kind, out, [&](const uint8_t* row, int64_t k, RowScratch& r) { unpack_any_row(static_cast<int>(kind), packed, row, k, r); },
                  [](const RowScratch& r, int zero, int64_t k, auto* values) { scratch_row_values(r, zero, k, values); });
}

torch::Tensor pack(torch::Tensor w, int64_t kind, int64_t k) { return pack_rows(w, kind, k); }
