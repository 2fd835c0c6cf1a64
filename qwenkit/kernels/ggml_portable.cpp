// GGUF quantized blocks used in place on CPUs without AVX-512 VNNI: the same three functions as
// ggml_cpu.cpp (matmul, dequantize_into, pack), with the same results, in plain C++. Built with
// -mavx2 -mfma -mf16c on AVX2 CPUs, where the compiler vectorizes the loops below, and with no
// flag for any other CPU.
//
// Each row is decoded once per call into codes and a scale and minimum per 16 values
// (RowScratch, L1-resident), then dotted with every token's int8 activations:
//     w = scale * (code - zero) - min
// The formulas follow ggml's dequantize_row_*, so `dequantize_into` is bit-equal to ggml; the
// products differ from the AVX-512 build's only in the order float sums are added.

#include <torch/extension.h>

#include "gguf_blocks.h"

using namespace qwenkit;

namespace {

// A 32-value block's 16 bytes of nibbles: low nibbles are values 0..15, high nibbles 16..31.
inline void nibbles_32(const uint8_t* qs, uint8_t* codes) {
  for (int j = 0; j < 16; ++j) {
    codes[j] = qs[j] & 0x0F;
    codes[j + 16] = qs[j] >> 4;
  }
}

inline void add_fifth_bits(const uint8_t* qh, uint8_t* codes) {  // bit j of qh (32 bits) is value j's
  uint32_t bits;
  std::memcpy(&bits, qh, 4);
  for (int j = 0; j < 32; ++j) codes[j] |= ((bits >> j) & 1) << 4;
}

// A row of a 32-value type as stored in the file.
void unpack_file_row(int kind, const uint8_t* row, int64_t k, RowScratch& r) {
  const Format f = format_of(kind);
  for (int64_t b = 0; b < k / 32; ++b) {
    const uint8_t* p = row + b * f.block_bytes;
    uint8_t* codes = r.codes.data() + 32 * b;
    const int at = codes_at(kind);
    if (kind == Q8_0) {
      for (int j = 0; j < 32; ++j) codes[j] = p[at + j] ^ 0x80;
    } else {
      nibbles_32(p + at, codes);
      if (has_fifth(kind)) add_fifth_bits(p + at - 4, codes);
    }
    set_scale(r, 2 * b, f16(p), has_min(kind) ? -f16(p + 2) : 0.0f);  // Q4_1, Q5_1: value = d * q + m
  }
}

// A row of a 32-value type in the packed layout (gguf_blocks.h).
void unpack_packed_row(int kind, const uint8_t* row, int64_t k, RowScratch& r) {
  const PackedRow p(kind, row, k);
  const auto* scales = reinterpret_cast<const uint8_t*>(p.scales);
  const auto* mins = reinterpret_cast<const uint8_t*>(p.mins);
  for (int64_t b = 0; b < k / 32; ++b) set_scale(r, 2 * b, f16(scales + 2 * b), has_min(kind) ? -f16(mins + 2 * b) : 0.0f);
  uint8_t* codes = r.codes.data();
  if (kind == Q8_0) {
    std::memcpy(codes, p.codes, k);
    return;
  }
  for (int64_t c = 0; c < k / 64; ++c) {
    const uint8_t* bytes = p.codes + 32 * c;
    for (int j = 0; j < 32; ++j) {
      codes[64 * c + j] = bytes[j] & 0x0F;
      codes[64 * c + 32 + j] = bytes[j] >> 4;
    }
    if (has_fifth(kind)) {
      uint64_t bits;
      std::memcpy(&bits, p.fifth + 8 * c, 8);
      for (int j = 0; j < 64; ++j) codes[64 * c + j] |= ((bits >> j) & 1) << 4;
    }
  }
}

void unpack_row(int kind, bool packed, const uint8_t* row, int64_t k, RowScratch& r) {
  if (packed) {
    unpack_packed_row(kind, row, k, r);
  } else if (format_of(kind).block_values == 256) {
    unpack_k_quant_row(kind, row, k, r);
  } else {
    unpack_file_row(kind, row, k, r);
  }
}

// sum_i w_i * x_i for one unpacked row and one quantized token: an integer dot product per 16
// values (vectorized by the compiler), scaled by the weight's and the activation's scales.
inline float row_dot(const RowScratch& r, const int8_t* xq, const float* xs16, const float* xsum16, int64_t k) {
  float acc = 0.0f, off = 0.0f;
  for (int64_t g = 0; g < k / 16; ++g) {
    const uint8_t* w = r.codes.data() + 16 * g;
    const int8_t* x = xq + 16 * g;
    int32_t dot = 0;
    for (int i = 0; i < 16; ++i) dot += static_cast<int32_t>(w[i]) * static_cast<int32_t>(x[i]);
    acc += static_cast<float>(dot) * (r.scale16[g] * xs16[g]);
    off += r.offset16[g] * xsum16[g];
  }
  return acc - off;
}

// ggml's values of one unpacked row: d * q for the symmetric types, d * q - m for the others.
template <typename T>
void row_values(const RowScratch& r, int zero, int64_t k, T* out) {
  for (int64_t i = 0; i < k; ++i) {
    const float v = r.scale16[i / 16] * static_cast<float>(static_cast<int>(r.codes[i]) - zero);
    out[i] = static_cast<T>(zero ? v : v - r.min16[i / 16]);  // c10::BFloat16 rounds to nearest even
  }
}

}  // namespace

// y[t, n] = sum_k x[t, k] * w[n, k] for GGUF block rows w (uint8 [N, bytes per row]).
torch::Tensor matmul(torch::Tensor x, torch::Tensor w, int64_t kind, bool packed) {
  check_matmul_args(x, w, kind, packed);
  x = x.contiguous();
  w = w.contiguous();
  const int64_t tokens = x.size(0), k = x.size(1), n = w.size(0);
  const QuantizedActivations a = quantize_activations(x.data_ptr<float>(), tokens, k, activation_block(static_cast<int>(kind)));
  auto y = torch::empty({tokens, n}, x.options());
  unpacked_rows_matmul(w.data_ptr<uint8_t>(), w.size(1), n, k, format_of(static_cast<int>(kind)).zero, a, tokens, y.data_ptr<float>(),
                       [&](const uint8_t* row, int64_t k, RowScratch& r) { unpack_row(static_cast<int>(kind), packed, row, k, r); }, row_dot);
  return y;
}

// out[N, K] = values of GGUF block rows w: in float32 equal to ggml's dequantize_row_*, in
// bfloat16 those values rounded to nearest even.
void dequantize_into(torch::Tensor w, int64_t kind, torch::Tensor out, bool packed) {
  dequantize_rows(w, kind, out, [&](const uint8_t* row, int64_t k, RowScratch& r) { unpack_row(static_cast<int>(kind), packed, row, k, r); },
                  [](const RowScratch& r, int zero, int64_t k, auto* values) { row_values(r, zero, k, values); });
}

torch::Tensor pack(torch::Tensor w, int64_t kind, int64_t k) { return pack_rows(w, kind, k); }
