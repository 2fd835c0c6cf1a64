// What every build of the GGUF kernels shares, whatever the instruction set: the block types,
// the int8 quantization of activations (as llama.cpp's Q8_0), and the packed layout of the
// 32-value types. ggml_cpu.cpp (AVX-512 VNNI) and ggml_portable.cpp (AVX2 or any CPU) read
// blocks through these, so both give the same codes, scales and activations.
//
// Block layouts are ggml's (ggml-common.h).

#pragma once

#include <torch/extension.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "thread_pool.h"

namespace qwenkit {

// ggml type ids (ggml.h)
enum Kind : int { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q6_K = 14 };

struct Format {
  int block_values;
  int block_bytes;
  int zero;  // code offset of the symmetric types; 0 for the ones with a stored minimum
};

inline Format format_of(int kind) {
  switch (kind) {
    case Q4_0: return {32, 18, 8};
    case Q4_1: return {32, 20, 0};
    case Q5_0: return {32, 22, 16};
    case Q5_1: return {32, 24, 0};
    case Q8_0: return {32, 34, 128};
    case Q4_K: return {256, 144, 0};
    case Q6_K: return {256, 210, 32};
  }
  TORCH_CHECK(false, "GGUF block type ", kind, " has no CPU kernel");
}

inline float f16(const uint8_t* p) {  // exact, as F16C's conversion
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

// Activations as int8 in blocks of 32 (scale = max|x| / 127, as llama.cpp's Q8_0), with each
// block's scale and the scaled sum of its codes given per 16 values, the weights' granularity.
struct QuantizedActivations {
  std::vector<int8_t> q;       // [T, K]
  std::vector<float> scale16;  // [T, K / 16]
  std::vector<float> sum16;    // [T, K / 16]
  std::vector<float> scale32;  // [T, K / 32]
  std::vector<float> sum32;    // [T, K / 32]
};

inline QuantizedActivations quantize_activations(const float* x, int64_t tokens, int64_t k) {
  QuantizedActivations a{std::vector<int8_t>(tokens * k), std::vector<float>(tokens * k / 16 + 16), std::vector<float>(tokens * k / 16 + 16),
                         std::vector<float>(tokens * k / 32 + 16), std::vector<float>(tokens * k / 32 + 16)};
  parallel_for(0, tokens * (k / 32), 64, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* xb = x + b * 32;
      float amax = 0.0f;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::abs(xb[i]));
      const float d = amax / 127.0f;
      const float id = d != 0.0f ? 1.0f / d : 0.0f;
      int sums[2] = {0, 0};
      for (int i = 0; i < 32; ++i) {
        const int v = static_cast<int>(std::nearbyint(xb[i] * id));
        a.q[b * 32 + i] = static_cast<int8_t>(v);
        sums[i / 16] += v;
      }
      a.scale16[b * 2] = a.scale16[b * 2 + 1] = d;
      a.sum16[b * 2] = d * sums[0];
      a.sum16[b * 2 + 1] = d * sums[1];
      a.scale32[b] = d;
      a.sum32[b] = d * (sums[0] + sums[1]);
    }
  });
  return a;
}

// One row's unpacked form: codes, and a scale and minimum per 16 values:
//     value = scale * (code - zero) - min
struct RowScratch {
  std::vector<uint8_t> codes;   // [K]
  std::vector<float> scale16;   // [K / 16]
  std::vector<float> min16;     // [K / 16]
  std::vector<float> offset16;  // [K / 16] scale * zero + min: what the dot product subtracts per 16 values
  explicit RowScratch(int64_t k) : codes(k), scale16(k / 16 + 16), min16(k / 16 + 16), offset16(k / 16 + 16) {}

  void compute_offsets(int zero, int64_t groups) {
    for (int64_t g = 0; g < groups; ++g) offset16[g] = std::fma(scale16[g], static_cast<float>(zero), min16[g]);
  }
};

// ---- The packed layout of the 32-value block types ------------------------------------------
// Same size as the file's blocks, made once at load time so that the decode loop reads planes
// instead of interleaved blocks (no per-block scalar work). Per row:
//   [K/32 fp16 scales][K/32 fp16 minimums: Q4_1, Q5_1][K/8 bytes of fifth bits: Q5_0, Q5_1][codes]
// Codes are K bytes for Q8_0 (stored as q + 128, unsigned), else K/2 bytes of nibbles, 32 bytes
// per 64 values: byte j holds value j in its low nibble and value 32 + j in its high nibble.
// Fifth bits are 8 bytes per 64 values, bit j for value j.

constexpr bool has_min(int kind) { return kind == Q4_1 || kind == Q5_1; }
constexpr bool has_fifth(int kind) { return kind == Q5_0 || kind == Q5_1; }
inline bool packable(int kind) { return kind == Q4_0 || kind == Q4_1 || kind == Q5_0 || kind == Q5_1 || kind == Q8_0; }

// Where a 32-value block's 16 bytes of nibbles (or Q8_0's 32 codes) start, and its fifth bits.
inline int codes_at(int kind) { return kind == Q4_0 ? 2 : kind == Q4_1 ? 4 : kind == Q5_0 ? 6 : kind == Q5_1 ? 8 : 2; }

struct PackedRow {
  const uint16_t* scales;
  const uint16_t* mins;
  const uint8_t* fifth;
  const uint8_t* codes;
  PackedRow(int kind, const uint8_t* row, int64_t k) {
    scales = reinterpret_cast<const uint16_t*>(row);
    const uint8_t* p = row + k / 16;
    mins = reinterpret_cast<const uint16_t*>(p);
    if (has_min(kind)) p += k / 16;
    fifth = p;
    if (has_fifth(kind)) p += k / 8;
    codes = p;
  }
};

// The file's blocks of one row in the packed layout (at load time: plain code is fast enough).
inline void pack_row(int kind, const uint8_t* src, int64_t k, uint8_t* dst) {
  const Format f = format_of(kind);
  const int64_t blocks = k / 32;
  uint8_t* scales = dst;
  uint8_t* mins = dst + k / 16;
  uint8_t* fifth = mins + (has_min(kind) ? k / 16 : 0);
  uint8_t* codes = fifth + (has_fifth(kind) ? k / 8 : 0);
  const int at = codes_at(kind);
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* p = src + b * f.block_bytes;
    std::memcpy(scales + 2 * b, p, 2);
    if (has_min(kind)) std::memcpy(mins + 2 * b, p + 2, 2);
    if (has_fifth(kind)) std::memcpy(fifth + 4 * b, p + at - 4, 4);
    if (kind == Q8_0) {
      for (int i = 0; i < 32; ++i) codes[32 * b + i] = p[at + i] ^ 0x80;
    } else if (b % 2 == 1) {  // blocks 2c and 2c + 1 share 32 bytes: low and high nibbles
      const uint8_t* first = p - f.block_bytes + at;
      const uint8_t* second = p + at;
      for (int j = 0; j < 32; ++j) {
        const int a = j < 16 ? first[j] & 0x0F : first[j - 16] >> 4;
        const int c = j < 16 ? second[j] & 0x0F : second[j - 16] >> 4;
        codes[16 * (b - 1) + j] = static_cast<uint8_t>(a | (c << 4));
      }
    }
  }
}

// Per-type dispatch to a template taking the type id as a constant.
template <typename F>
void dispatch_packed(int kind, F&& f) {
  switch (kind) {
    case Q4_0: f(std::integral_constant<int, Q4_0>{}); break;
    case Q4_1: f(std::integral_constant<int, Q4_1>{}); break;
    case Q5_0: f(std::integral_constant<int, Q5_0>{}); break;
    case Q5_1: f(std::integral_constant<int, Q5_1>{}); break;
    case Q8_0: f(std::integral_constant<int, Q8_0>{}); break;
    default: TORCH_CHECK(false, "GGUF block type ", kind, " has no packed layout");
  }
}

// The packed layout of GGUF block rows of a 32-value type (see PackedRow), same shape.
inline torch::Tensor pack_rows(torch::Tensor w, int64_t kind, int64_t k) {
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2, "w must be uint8 [rows, bytes per row]");
  const Format f = format_of(static_cast<int>(kind));
  TORCH_CHECK(packable(static_cast<int>(kind)) && k % 64 == 0 && w.size(1) == k / f.block_values * f.block_bytes,
              "no packed layout for GGUF type ", kind, " with rows of ", k);
  w = w.contiguous();
  auto packed = torch::empty_like(w);
  const int64_t row_bytes = w.size(1);
  const uint8_t* src = w.data_ptr<uint8_t>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  parallel_for(0, w.size(0), 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) pack_row(static_cast<int>(kind), src + row * row_bytes, k, dst + row * row_bytes);
  });
  return packed;
}

}  // namespace qwenkit
