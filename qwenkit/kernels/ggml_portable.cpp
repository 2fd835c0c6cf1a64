// GGUF quantized blocks used in place on CPUs with neither AVX-512 VNNI nor AVX2: the same three
// functions as ggml_cpu.cpp (rows_matmul, dequantize_into, pack), with the same results, in plain C++
// built with no instruction-set flag.
//
// Each row is decoded once per call into codes and a scale and minimum per 16 values
// (RowScratch, L1-resident), then dotted with every token's int8 activations: the generic row
// path of gguf_blocks.h, which the SIMD builds also take for the block types they have no kernel for.
//     w = scale * (code - zero) - min
// The formulas follow ggml's dequantize_row_*, so `dequantize_into` is bit-equal to ggml; the
// products differ from the SIMD builds' only in the order float sums are added.

#include "torch_lite.h"

#include "gguf_blocks.h"

using namespace qwenkit;

void qwenkit::rows_matmul(int kind, bool packed, const uint8_t* rows, int64_t row_bytes, int64_t /*n_rows*/, int64_t k, const QuantizedActivations& a,
                          int64_t tokens, int64_t begin, int64_t end, float* out, int64_t ldo) {
  unpacked_rows_dot(rows, row_bytes, begin, end, k, format_of(kind).zero, a, tokens, out, ldo,
                    [&](const uint8_t* row, int64_t k, RowScratch& r) { unpack_any_row(kind, packed, row, k, r); }, scratch_row_dot);
}

// out[N, K] = values of GGUF block rows w: in float32 equal to ggml's dequantize_row_*, in
// bfloat16 those values rounded to nearest even.
void dequantize_into(torch::Tensor w, int64_t kind, torch::Tensor out, bool packed) {
  dequantize_rows(w, kind, out, [&](const uint8_t* row, int64_t k, RowScratch& r) { unpack_any_row(static_cast<int>(kind), packed, row, k, r); },
                  [](const RowScratch& r, int zero, int64_t k, auto* values) { scratch_row_values(r, zero, k, values); });
}

int64_t qwenkit::packed_group_rows(int64_t) { return 1; }

torch::Tensor pack(torch::Tensor w, int64_t kind, int64_t k) { return pack_rows(w, kind, k, 1); }
