// What every build of the GGUF kernels shares, whatever the instruction set: the block types,
// the int8 quantization of activations (as llama.cpp's Q8_0), and the packed layout of the
// 32-value types, the generic row path, and the row and token tiles of the SIMD builds.
// ggml_cpu.cpp (AVX-512 VNNI), ggml_avx2.cpp (AVX2) and ggml_portable.cpp (any CPU) read blocks
// through these, so all give the same codes, scales and activations.
//
// Block layouts are ggml's (ggml-common.h).

#pragma once

#include "torch_lite.h"
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "thread_pool.h"

namespace qwenkit {

// ggml type ids (ggml.h)
enum Kind : int { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

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
    case Q2_K: return {256, 84, 0};
    case Q3_K: return {256, 110, 4};
    case Q4_K: return {256, 144, 0};
    case Q5_K: return {256, 176, 0};
    case Q6_K: return {256, 210, 32};
  }
  TORCH_CHECK(false, "GGUF block type ", kind, " has no CPU kernel");
}

inline float f16(const uint8_t* p) {  // exact, as F16C's conversion
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

// Activations as int8 in blocks (scale = max|x| / 127), with each block's scale and the scaled
// sum of its codes given per 16 and per 32 values, the weights' granularities. The block is 32
// values for the 32-value types (llama.cpp's Q8_0) and 256 for the K-quants (llama.cpp's Q8_K):
// one activation scale per 256-value super-block lets a K-quant's integer sub-block scales be
// applied in integer arithmetic (ggml_cpu.cpp, ggml_avx2.cpp), and every build quantizes alike.
struct QuantizedActivations {
  std::vector<int8_t> q;       // [T, K]
  std::vector<float> scale16;  // [T, K / 16]
  std::vector<float> sum16;    // [T, K / 16]
  std::vector<float> scale32;  // [T, K / 32]
  std::vector<float> sum32;    // [T, K / 32]
  std::vector<int16_t> codes16;  // [T, K / 16] (+16): the sum of the codes per 16 values (|.| <= 2032)
  std::vector<int16_t> codes32;  // [T, K / 32] (+16): per 32 values (|.| <= 4064)
};

inline int64_t activation_block(int kind) { return format_of(kind).block_values == 256 ? 256 : 32; }

// max |x| over 16 values, and x * id rounded to nearest even as int8 with the codes' sum: the same
// results from every build (max is exact; one multiply and one rounding per value), vectorized
// where the build's flags allow.
inline float abs_max_16(const float* x) {
#if defined(__AVX512F__)
  return _mm512_reduce_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x)));
#else
  float m = 0.0f;
  for (int i = 0; i < 16; ++i) m = std::max(m, std::abs(x[i]));
  return m;
#endif
}

inline int quantize_16(const float* x, float id, int8_t* q) {
#if defined(__AVX512F__)
  const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x), _mm512_set1_ps(id)));  // MXCSR: nearest even
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(v));
  return _mm512_reduce_add_epi32(v);
#elif defined(__AVX2__)
  int sum = 0;
  for (int h = 0; h < 16; h += 8) {
    const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + h), _mm256_set1_ps(id)));
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v);
    for (int i = 0; i < 8; ++i) {
      q[h + i] = static_cast<int8_t>(lanes[i]);
      sum += lanes[i];
    }
  }
  return sum;
#else
  int sum = 0;
  for (int i = 0; i < 16; ++i) {
    const int v = static_cast<int>(std::nearbyint(x[i] * id));
    q[i] = static_cast<int8_t>(v);
    sum += v;
  }
  return sum;
#endif
}

inline QuantizedActivations quantize_activations(const float* x, int64_t tokens, int64_t k, int64_t block) {
  QuantizedActivations a{std::vector<int8_t>(tokens * k), std::vector<float>(tokens * k / 16 + 16), std::vector<float>(tokens * k / 16 + 16),
                         std::vector<float>(tokens * k / 32 + 16), std::vector<float>(tokens * k / 32 + 16),
                         std::vector<int16_t>(tokens * k / 16 + 16), std::vector<int16_t>(tokens * k / 32 + 16)};
  const int64_t per_block16 = block / 16;
  parallel_for(0, tokens * (k / block), std::max<int64_t>(1, 2048 / block), [&](int64_t begin, int64_t end) {
    int sums[16];
    for (int64_t b = begin; b < end; ++b) {
      const float* xb = x + b * block;
      float amax = 0.0f;
      for (int64_t i = 0; i < block; i += 16) amax = std::max(amax, abs_max_16(xb + i));
      const float d = amax / 127.0f;
      const float id = d != 0.0f ? 1.0f / d : 0.0f;
      for (int64_t g = 0; g < per_block16; ++g) sums[g] = quantize_16(xb + 16 * g, id, a.q.data() + b * block + 16 * g);
      for (int64_t g = 0; g < per_block16; ++g) {
        a.scale16[b * per_block16 + g] = d;
        a.sum16[b * per_block16 + g] = d * sums[g];
        a.codes16[b * per_block16 + g] = static_cast<int16_t>(sums[g]);
      }
      for (int64_t g = 0; g < per_block16 / 2; ++g) {
        a.scale32[b * per_block16 / 2 + g] = d;
        a.sum32[b * per_block16 / 2 + g] = d * (sums[2 * g] + sums[2 * g + 1]);
        a.codes32[b * per_block16 / 2 + g] = static_cast<int16_t>(sums[2 * g] + sums[2 * g + 1]);
      }
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

// ---- The K-quants, decoded row by row into RowScratch (plain code) ----------------------------
// The portable build reads every K-quant this way, the AVX-512 build all but Q4_K and Q6_K (its
// own views), the AVX2 build only to dequantize. Each follows ggml's dequantize_row_q*_K.

inline void set_scale(RowScratch& r, int64_t first16, float scale, float minimum) {  // a block of 32
  r.scale16[first16] = r.scale16[first16 + 1] = scale;
  r.min16[first16] = r.min16[first16 + 1] = minimum;
}

// Q4_K's and Q5_K's eight 6-bit scales and mins (ggml's get_scale_min_k4).
inline void scale_min_k4(int j, const uint8_t* q, int& sc, int& m) {
  sc = j < 4 ? q[j] & 63 : (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
  m = j < 4 ? q[j + 4] & 63 : (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
}

// Q4_K: per 256 values d, dmin, twelve bytes of 6-bit scales and mins (one per 32 values), then
// 4 x 32 bytes whose low nibbles are values 64i..64i+31 and high nibbles 64i+32..64i+63.
inline void unpack_q4k_row(const uint8_t* row, int64_t k, RowScratch& r) {
  for (int64_t b = 0; b < k / 256; ++b) {
    const uint8_t* p = row + 144 * b;
    const uint8_t* q = p + 4;
    const float d = f16(p), dmin = f16(p + 2);
    for (int j = 0; j < 8; ++j) {
      int sc, m;
      scale_min_k4(j, q, sc, m);
      set_scale(r, 16 * b + 2 * j, d * sc, dmin * m);  // value = d * sc * q - dmin * m
    }
    uint8_t* codes = r.codes.data() + 256 * b;
    for (int i = 0; i < 4; ++i) {
      const uint8_t* bytes = p + 16 + 32 * i;
      for (int j = 0; j < 32; ++j) {
        codes[64 * i + j] = bytes[j] & 0x0F;
        codes[64 * i + 32 + j] = bytes[j] >> 4;
      }
    }
  }
}

// Q6_K: per 256 values ql[128], qh[64], sixteen int8 scales (one per 16 values) and d; 6-bit
// codes with zero 32. Per half of 128 values, for l < 32: values l, l+32, l+64, l+96 take the low
// nibble of ql[l], of ql[l+32], the high nibble of ql[l], of ql[l+32], and bit pairs 0, 1, 2, 3 of qh[l].
inline void unpack_q6k_row(const uint8_t* row, int64_t k, RowScratch& r) {
  for (int64_t b = 0; b < k / 256; ++b) {
    const uint8_t* p = row + 210 * b;
    const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192);
    const float d = f16(p + 208);
    for (int j = 0; j < 16; ++j) {
      r.scale16[16 * b + j] = d * sc[j];
      r.min16[16 * b + j] = 0.0f;
    }
    for (int half = 0; half < 2; ++half) {
      const uint8_t* ql = p + 64 * half;
      const uint8_t* qh = p + 128 + 32 * half;
      uint8_t* codes = r.codes.data() + 256 * b + 128 * half;
      for (int l = 0; l < 32; ++l) {
        codes[l] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
        codes[l + 32] = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
        codes[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
        codes[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
      }
    }
  }
}

// Q5_K: Q4_K's layout with 32 bytes of fifth bits (qh) after the scales: bit 2i of qh[l] is
// value 64i + l's, bit 2i + 1 value 64i + 32 + l's.
inline void unpack_q5k_row(const uint8_t* row, int64_t k, RowScratch& r) {
  for (int64_t b = 0; b < k / 256; ++b) {
    const uint8_t* p = row + 176 * b;
    const uint8_t* q = p + 4;
    const uint8_t* qh = p + 16;
    const uint8_t* qs = p + 48;
    const float d = f16(p), dmin = f16(p + 2);
    for (int j = 0; j < 8; ++j) {
      int sc, m;
      scale_min_k4(j, q, sc, m);
      set_scale(r, 16 * b + 2 * j, d * sc, dmin * m);
    }
    uint8_t* codes = r.codes.data() + 256 * b;
    for (int i = 0; i < 4; ++i) {
      for (int l = 0; l < 32; ++l) {
        codes[64 * i + l] = (qs[32 * i + l] & 0x0F) | (((qh[l] >> (2 * i)) & 1) << 4);
        codes[64 * i + 32 + l] = (qs[32 * i + l] >> 4) | (((qh[l] >> (2 * i + 1)) & 1) << 4);
      }
    }
  }
}

// Q3_K: hmask[32], qs[64], twelve bytes of sixteen 6-bit scales (stored + 32), d. Per 128 values
// (32 bytes of qs), four 2-bit planes; value = d * (scale - 32) * (q2 + 4 * hbit - 4).
inline void unpack_q3k_row(const uint8_t* row, int64_t k, RowScratch& r) {
  for (int64_t b = 0; b < k / 256; ++b) {
    const uint8_t* p = row + 110 * b;
    const uint8_t* hm = p;
    const uint8_t* qs = p + 32;
    const uint8_t* s = p + 96;
    const float d = f16(p + 108);
    for (int j = 0; j < 16; ++j) {  // ggml's kmask unpacking of the 6-bit scales
      const int low = j < 8 ? s[j] & 0xF : s[j - 8] >> 4;
      const int high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
      r.scale16[16 * b + j] = d * static_cast<float>((low | (high << 4)) - 32);
      r.min16[16 * b + j] = 0.0f;
    }
    uint8_t* codes = r.codes.data() + 256 * b;
    for (int half = 0; half < 2; ++half) {
      const uint8_t* q = qs + 32 * half;
      for (int plane = 0; plane < 4; ++plane) {
        const int bit = 4 * half + plane;
        for (int l = 0; l < 32; ++l)
          codes[128 * half + 32 * plane + l] = ((q[l] >> (2 * plane)) & 3) | (((hm[l] >> bit) & 1) << 2);
      }
    }
  }
}

// Q2_K: sixteen bytes of 4-bit scale and 4-bit min per 16 values, qs[64], d, dmin. Per 128 values
// (32 bytes of qs), four 2-bit planes; value = d * (sc & 15) * q - dmin * (sc >> 4).
inline void unpack_q2k_row(const uint8_t* row, int64_t k, RowScratch& r) {
  for (int64_t b = 0; b < k / 256; ++b) {
    const uint8_t* p = row + 84 * b;
    const uint8_t* qs = p + 16;
    const float d = f16(p + 80), dmin = f16(p + 82);
    for (int j = 0; j < 16; ++j) {
      r.scale16[16 * b + j] = d * (p[j] & 0xF);
      r.min16[16 * b + j] = dmin * (p[j] >> 4);
    }
    uint8_t* codes = r.codes.data() + 256 * b;
    for (int half = 0; half < 2; ++half) {
      const uint8_t* q = qs + 32 * half;
      for (int plane = 0; plane < 4; ++plane)
        for (int l = 0; l < 32; ++l) codes[128 * half + 32 * plane + l] = (q[l] >> (2 * plane)) & 3;
    }
  }
}

inline void unpack_k_quant_row(int kind, const uint8_t* row, int64_t k, RowScratch& r) {
  switch (kind) {
    case Q2_K: unpack_q2k_row(row, k, r); break;
    case Q3_K: unpack_q3k_row(row, k, r); break;
    case Q4_K: unpack_q4k_row(row, k, r); break;
    case Q5_K: unpack_q5k_row(row, k, r); break;
    case Q6_K: unpack_q6k_row(row, k, r); break;
    default: TORCH_CHECK(false, "GGUF block type ", kind, " is not a K-quant");
  }
}

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
// The types the AVX-512 build stores in tile groups (TileLayout): the packed ones and two K-quants.
inline bool tileable(int kind) { return packable(kind) || kind == Q4_K || kind == Q6_K; }

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

// ---- What every build's matmul and dequantize_into share: argument checks and row loops ------

// How many rows the build's packed layout of `kind` stores together: 8 (the AVX2 build's groups
// for the unsigned 32-value types, GroupLayout), 16 (the AVX-512 build's tile groups for every
// packed type, TileLayout) or 1 (rows as PackedRow reads them: the portable build).
int64_t packed_group_rows(int64_t kind);

// matmul's arguments: float32 x [T, K] and GGUF rows w [N, bytes per row] whose rows hold K values.
inline void check_matmul_args(const torch::Tensor& x, const torch::Tensor& w, int64_t kind, bool packed) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x must be float32 [tokens, in_features]");
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2, "w must be uint8 [out_features, bytes per row]");
  const Format f = format_of(static_cast<int>(kind));
  const int64_t k = x.size(1);
  TORCH_CHECK(k % f.block_values == 0 && w.size(1) == k / f.block_values * f.block_bytes,
              "in_features ", k, " does not match ", w.size(1), " bytes per row of GGUF type ", kind);
  TORCH_CHECK(!packed || ((packable(static_cast<int>(kind)) || packed_group_rows(kind) > 1) && k % 64 == 0), "no packed layout for GGUF type ",
              kind, " with rows of ", k);
}

// y[t, row] for rows [begin, end) unpacked one at a time into RowScratch, written to
// out[t * ldo + row]: unpack(row bytes, k, scratch) fills codes, scales and minimums;
// dot(scratch, token codes, scales per 16, sums per 16, k) is the build's dot product.
template <class Unpack, class Dot>
void unpacked_rows_dot(const uint8_t* rows, int64_t row_bytes, int64_t begin, int64_t end, int64_t k, int zero,
                       const QuantizedActivations& a, int64_t tokens, float* out, int64_t ldo, Unpack unpack, Dot dot) {
  RowScratch r(k);
  for (int64_t row = begin; row < end; ++row) {
    unpack(rows + row * row_bytes, k, r);
    r.compute_offsets(zero, k / 16);
    for (int64_t t = 0; t < tokens; ++t)
      out[t * ldo + row] = dot(r, a.q.data() + t * k, a.scale16.data() + t * k / 16, a.sum16.data() + t * k / 16, k);
  }
}

// y[t, row] = sum_k x[t, k] * w[row, k] for GGUF block rows [begin, end) of w (uint8 rows of
// row_bytes; packed: in the packed layout), written to out[t * ldo + row], on the calling thread.
// Each build (ggml_cpu.cpp, ggml_avx2.cpp, ggml_portable.cpp) defines it with its kernels;
// gguf_matmul.cpp spreads the rows of one or several weights over the threads.
// n_rows: all the rows of the weight `rows` starts (a packed weight's last n_rows % g rows stay
// in the row layout where the build packs groups of g = packed_group_rows rows).
void rows_matmul(int kind, bool packed, const uint8_t* rows, int64_t row_bytes, int64_t n_rows, int64_t k, const QuantizedActivations& a,
                 int64_t tokens, int64_t begin, int64_t end, float* out, int64_t ldo);

// out[N, K] = the values of GGUF rows w, float32 or bfloat16: unpack(row bytes, k, scratch) as
// above; values(scratch, zero, k, out row) writes one row in out's dtype (a generic lambda).
template <class Unpack, class Values>
void dequantize_rows(torch::Tensor w, int64_t kind, torch::Tensor out, Unpack unpack, Values values) {
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2, "w must be uint8 [rows, bytes per row]");
  const bool bf16 = out.dtype() == torch::kBFloat16;
  TORCH_CHECK((bf16 || out.dtype() == torch::kFloat32) && out.dim() == 2 && out.is_contiguous() && out.size(0) == w.size(0),
              "out must be a contiguous float32 or bfloat16 [rows, row length]");
  const Format f = format_of(static_cast<int>(kind));
  const int64_t n = w.size(0), k = out.size(1);
  TORCH_CHECK(k % f.block_values == 0 && w.size(1) == k / f.block_values * f.block_bytes,
              "row length ", k, " does not match ", w.size(1), " bytes per row of GGUF type ", kind);
  w = w.contiguous();
  const int64_t row_bytes = w.size(1);
  const uint8_t* rows = w.data_ptr<uint8_t>();
  parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    RowScratch r(k);
    for (int64_t row = begin; row < end; ++row) {
      unpack(rows + row * row_bytes, k, r);
      if (bf16) {
        values(r, f.zero, k, out.data_ptr<at::BFloat16>() + row * k);
      } else {
        values(r, f.zero, k, out.data_ptr<float>() + row * k);
      }
    }
  });
}

// ---- The generic row path: any block type unpacked into RowScratch, in plain C++ ------------
// The portable build reads every row this way; the SIMD builds read this way the rows they have
// no kernel for (unpacked 32-value rows, and K-quants without an AVX-512 view) and the AVX2
// build's dequantize_into. Plain code that the compiler vectorizes
// for the build's flags; the values follow ggml's dequantize_row_* bit for bit.

// A 32-value block's 16 bytes of nibbles: low nibbles are values 0..15, high nibbles 16..31.
inline void split_nibbles_32(const uint8_t* qs, uint8_t* codes) {
  for (int j = 0; j < 16; ++j) {
    codes[j] = qs[j] & 0x0F;
    codes[j + 16] = qs[j] >> 4;
  }
}

inline void or_fifth_bits_32(const uint8_t* qh, uint8_t* codes) {  // bit j of qh (32 bits) is value j's
  uint32_t bits;
  std::memcpy(&bits, qh, 4);
  for (int j = 0; j < 32; ++j) codes[j] |= ((bits >> j) & 1) << 4;
}

// A row of a 32-value type as stored in the file.
inline void unpack_file_row(int kind, const uint8_t* row, int64_t k, RowScratch& r) {
  const Format f = format_of(kind);
  for (int64_t b = 0; b < k / 32; ++b) {
    const uint8_t* p = row + b * f.block_bytes;
    uint8_t* codes = r.codes.data() + 32 * b;
    const int at = codes_at(kind);
    if (kind == Q8_0) {
      for (int j = 0; j < 32; ++j) codes[j] = p[at + j] ^ 0x80;
    } else {
      split_nibbles_32(p + at, codes);
      if (has_fifth(kind)) or_fifth_bits_32(p + at - 4, codes);
    }
    set_scale(r, 2 * b, f16(p), has_min(kind) ? -f16(p + 2) : 0.0f);  // Q4_1, Q5_1: value = d * q + m
  }
}

// A row of a 32-value type in the packed layout.
inline void unpack_packed_row(int kind, const uint8_t* row, int64_t k, RowScratch& r) {
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

inline void unpack_any_row(int kind, bool packed, const uint8_t* row, int64_t k, RowScratch& r) {
  if (packed && packable(kind)) {  // (a packed K-quant's rows outside its tile groups are the file's)
    unpack_packed_row(kind, row, k, r);
  } else if (format_of(kind).block_values == 256) {
    unpack_k_quant_row(kind, row, k, r);
  } else {
    unpack_file_row(kind, row, k, r);
  }
}

// ---- The packed layout in groups of eight rows (the AVX2 build's, for Q4_0, Q4_1, Q5_0, Q5_1) --
// Eight rows' codes stored as the eight-row kernels multiply them, so that one token meets eight
// rows with no transpose and no horizontal sums (ggml's repacked Q4_0x8 serves the same end). The
// same bytes as eight packed rows:
//   [K/32 blocks x 8 rows fp16 scales][the same for minimums: Q4_1, Q5_1]
//   then per 64 values (a step c): [64 bytes of fifth bits: Q5_0, Q5_1][256 bytes of codes]
// A step is 16 vectors of 32 codes V[v], v = 8x + 4h + q: byte 4r + i of V[v] is row r's value
// 64c + 32x + 16h + 4q + i (block 2c + x, its 16 values h, their 4 values q). The codes' 32-byte
// slot j holds V[j] in its low nibbles and V[8 + j] in its high nibbles; bit j of byte m of the
// x-th 32 bytes of fifth bits is the fifth bit of byte m of V[8x + j] (one shift and one mask
// put it in place). A weight's last rows % 8 rows keep the row layout (PackedRow).
constexpr int64_t GROUP_ROWS = 8;
inline bool groupable(int kind) { return kind == Q4_0 || kind == Q4_1 || kind == Q5_0 || kind == Q5_1; }

struct GroupLayout {
  int64_t mins_at, steps_at, fifth_bytes, step_bytes;
  GroupLayout(int kind, int64_t k)
      : mins_at(k / 32 * 16),
        steps_at(mins_at + (has_min(kind) ? k / 32 * 16 : 0)),
        fifth_bytes(has_fifth(kind) ? 64 : 0),
        step_bytes(fifth_bytes + 256) {}
};

// Eight file rows (row_bytes apart) in the group layout.
inline void pack_group(int kind, const uint8_t* src, int64_t row_bytes, int64_t k, uint8_t* dst) {
  const Format f = format_of(kind);
  const GroupLayout g(kind, k);
  std::vector<uint8_t> codes(GROUP_ROWS * k);  // [row][value], 0..31
  RowScratch r(k);
  for (int64_t row = 0; row < GROUP_ROWS; ++row) {
    unpack_any_row(kind, false, src + row * row_bytes, k, r);
    std::memcpy(codes.data() + row * k, r.codes.data(), k);
    for (int64_t b = 0; b < k / 32; ++b) {
      const uint8_t* block = src + row * row_bytes + b * f.block_bytes;
      std::memcpy(dst + 16 * b + 2 * row, block, 2);
      if (has_min(kind)) std::memcpy(dst + g.mins_at + 16 * b + 2 * row, block + 2, 2);
    }
  }
  for (int64_t c = 0; c < k / 64; ++c) {
    uint8_t* step = dst + g.steps_at + c * g.step_bytes;
    std::memset(step, 0, g.step_bytes);
    for (int v = 0; v < 16; ++v) {
      const int x = v / 8, j = v % 8;
      for (int m = 0; m < 32; ++m) {
        const uint8_t code = codes[(m / 4) * k + 64 * c + 4 * v + m % 4];
        step[g.fifth_bytes + 32 * j + m] |= static_cast<uint8_t>((code & 0x0F) << (4 * x));
        if (has_fifth(kind)) step[32 * x + m] |= static_cast<uint8_t>(((code >> 4) & 1) << j);
      }
    }
  }
}

// Row `lane` of a group into RowScratch (dequantize_into).
inline void unpack_group_row(int kind, const uint8_t* group, int lane, int64_t k, RowScratch& r) {
  const GroupLayout g(kind, k);
  for (int64_t b = 0; b < k / 32; ++b)
    set_scale(r, 2 * b, f16(group + 16 * b + 2 * lane), has_min(kind) ? -f16(group + g.mins_at + 16 * b + 2 * lane) : 0.0f);
  for (int64_t c = 0; c < k / 64; ++c) {
    const uint8_t* step = group + g.steps_at + c * g.step_bytes;
    for (int v = 0; v < 16; ++v) {
      const int x = v / 8, j = v % 8;
      for (int i = 0; i < 4; ++i) {
        const int m = 4 * lane + i;
        int code = (step[g.fifth_bytes + 32 * j + m] >> (4 * x)) & 0x0F;
        if (has_fifth(kind)) code |= ((step[32 * x + m] >> j) & 1) << 4;
        r.codes[64 * c + 4 * v + i] = static_cast<uint8_t>(code);
      }
    }
  }
}

// ---- The packed layout in tiles of sixteen rows (the AVX-512 build's) ---------------------------
// Sixteen rows' codes stored per 32 values (a step) in the order in which VPDPBUSD meets one
// token's four codes broadcast (and an AMX tile multiply reads its second operand), so that a
// step of sixteen rows is eight vectors with no transpose. The step's 512 codes C[j],
// j = 64p + 4n + i, are row n's value 32b + 4p + i (vector p holds four consecutive values of
// each of the 16 rows). Nibble byte j holds C[j] in its low and C[256 + j] in its high nibble.
// The same bytes as sixteen rows of the file's blocks; per type (S = K/256 super-blocks):
//   32-value types: [K/32 blocks x 16 rows fp16 scales][the same for minimums: Q4_1, Q5_1], then
//     per step [64 bytes of fifth bits: Q5_0, Q5_1; bit j % 8 of byte j / 8 is C[j]'s]
//     [256 bytes of nibbles, or Q8_0's 512 codes q + 128]
//   Q4_K: [S x 16 fp16 d][S x 16 fp16 dmin][S x 12 x 16: byte i of row n's twelve bytes of 6-bit
//     scales and minimums at 16i + n], then per step [256 bytes of nibbles]
//   Q6_K: [S x 16 fp16 d][S x 16 x 16: row n's int8 scale of its 16-value sub-block i at 16i + n],
//     then per step [for each vector p: two 8-byte masks of its codes' bits 4 and 5][256 bytes
//     of nibbles]
// A weight's last rows % 16 rows keep the row layout (PackedRow; the file's blocks for K-quants).
constexpr int64_t TILE_GROUP_ROWS = 16;

struct TileLayout {
  int64_t mins_at, scales_at, steps_at, high_bytes, step_bytes;
  TileLayout(int kind, int64_t k) {
    const int64_t supers = k / 256, blocks = k / 32;
    if (kind == Q4_K) {
      mins_at = supers * 32, scales_at = supers * 64, steps_at = supers * 256, high_bytes = 0;
    } else if (kind == Q6_K) {
      mins_at = 0, scales_at = supers * 32, steps_at = supers * 288, high_bytes = 128;
    } else {
      mins_at = blocks * 32, scales_at = 0, steps_at = mins_at + (has_min(kind) ? blocks * 32 : 0), high_bytes = has_fifth(kind) ? 64 : 0;
    }
    step_bytes = high_bytes + (kind == Q8_0 ? 512 : 256);
  }
};

// Sixteen file rows (row_bytes apart) in the tile layout (the kernel's decode: tile_block_codes
// and tile_group_scales in ggml_cpu.cpp).
inline void pack_tile_group(int kind, const uint8_t* src, int64_t row_bytes, int64_t k, uint8_t* dst) {
  const TileLayout g(kind, k);
  const Format f = format_of(kind);
  std::vector<uint8_t> codes(TILE_GROUP_ROWS * k);  // [row][value]: 0..15, 0..31, 0..63 (Q6_K) or q + 128 (Q8_0)
  RowScratch r(k);
  for (int64_t n = 0; n < TILE_GROUP_ROWS; ++n) {
    const uint8_t* row = src + n * row_bytes;
    unpack_any_row(kind, false, row, k, r);
    std::memcpy(codes.data() + n * k, r.codes.data(), k);
    for (int64_t b = 0; b < k / f.block_values; ++b) {
      const uint8_t* block = row + b * f.block_bytes;
      if (kind == Q4_K) {
        std::memcpy(dst + 32 * b + 2 * n, block, 2);
        std::memcpy(dst + g.mins_at + 32 * b + 2 * n, block + 2, 2);
        for (int i = 0; i < 12; ++i) dst[g.scales_at + 192 * b + 16 * i + n] = block[4 + i];
      } else if (kind == Q6_K) {
        std::memcpy(dst + 32 * b + 2 * n, block + 208, 2);
        for (int i = 0; i < 16; ++i) dst[g.scales_at + 256 * b + 16 * i + n] = block[192 + i];
      } else {
        std::memcpy(dst + 32 * b + 2 * n, block, 2);
        if (has_min(kind)) std::memcpy(dst + g.mins_at + 32 * b + 2 * n, block + 2, 2);
      }
    }
  }
  for (int64_t b = 0; b < k / 32; ++b) {
    uint8_t* step = dst + g.steps_at + b * g.step_bytes;
    uint8_t tile[512];  // C[j] as above
    for (int n = 0; n < TILE_GROUP_ROWS; ++n)
      for (int p = 0; p < 8; ++p) std::memcpy(tile + 64 * p + 4 * n, codes.data() + n * k + 32 * b + 4 * p, 4);
    if (kind == Q8_0) {
      std::memcpy(step, tile, 512);
      continue;
    }
    for (int j = 0; j < 256; ++j) step[g.high_bytes + j] = static_cast<uint8_t>((tile[j] & 0x0F) | (tile[256 + j] << 4));
    std::memset(step, 0, g.high_bytes);
    for (int j = 0; j < 512; ++j) {
      if (has_fifth(kind)) step[j / 8] |= static_cast<uint8_t>(((tile[j] >> 4) & 1) << (j % 8));
      if (kind == Q6_K)  // vector p's 64 bits 4 at 16p, its bits 5 at 16p + 8
        for (int bit = 0; bit < 2; ++bit) step[16 * (j / 64) + 8 * bit + (j % 64) / 8] |= static_cast<uint8_t>(((tile[j] >> (4 + bit)) & 1) << (j % 8));
    }
  }
}

// Row `row` of the n rows at `rows` as stored: the file's blocks, packed rows, or (group_rows 8)
// packed groups with the last n % 8 rows packed row by row. (The AVX-512 build's tile groups are
// read by its own dequantize_tile_groups.)
inline void unpack_stored_row(int kind, bool packed, int64_t group_rows, const uint8_t* rows, int64_t row_bytes, int64_t n, int64_t row,
                              int64_t k, RowScratch& r) {
  if (packed && group_rows > 1 && row < n / group_rows * group_rows)
    return unpack_group_row(kind, rows + row / group_rows * group_rows * row_bytes, static_cast<int>(row % group_rows), k, r);
  unpack_any_row(kind, packed, rows + row * row_bytes, k, r);
}

// GGUF block rows of a 32-value type ([rows, bytes per row], or [matrices, rows, bytes per row]:
// each matrix's rows on their own) in the packed layout, same shape: row by row (PackedRow), or
// in groups of group_rows = 8 (GroupLayout) or 16 (TileLayout) with each matrix's last
// rows % group_rows row by row.
inline torch::Tensor pack_rows(torch::Tensor w, int64_t kind, int64_t k, int64_t group_rows) {
  TORCH_CHECK(w.dtype() == torch::kUInt8 && (w.dim() == 2 || w.dim() == 3), "w must be uint8 [(matrices,) rows, bytes per row]");
  const Format f = format_of(static_cast<int>(kind));
  const int64_t rows = w.size(w.dim() - 2), row_bytes = w.size(w.dim() - 1);
  const bool tiles = group_rows == TILE_GROUP_ROWS;
  TORCH_CHECK((tiles ? tileable(static_cast<int>(kind)) : packable(static_cast<int>(kind))) && k % 64 == 0 &&
                  row_bytes == k / f.block_values * f.block_bytes,
              "no packed layout for GGUF type ", kind, " with rows of ", k);
  TORCH_CHECK(group_rows == 1 || (group_rows == GROUP_ROWS && groupable(static_cast<int>(kind))) || group_rows == TILE_GROUP_ROWS,
              "no packed groups of ", group_rows, " rows for GGUF type ", kind);
  w = w.contiguous();
  auto packed = torch::empty_like(w);
  if (w.numel() == 0) return packed;
  const int64_t matrices = w.numel() / (rows * row_bytes), groups = rows / group_rows * (group_rows > 1);
  const int64_t units = groups + rows - groups * group_rows;  // per matrix: its groups, then single rows
  const uint8_t* src = w.data_ptr<uint8_t>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  parallel_for(0, matrices * units, 8, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t matrix = (u / units) * rows * row_bytes, i = u % units;
      if (i < groups) {
        const int64_t at = matrix + i * group_rows * row_bytes;
        if (group_rows == TILE_GROUP_ROWS) {
          pack_tile_group(static_cast<int>(kind), src + at, row_bytes, k, dst + at);
        } else {
          pack_group(static_cast<int>(kind), src + at, row_bytes, k, dst + at);
        }
      } else {
        const int64_t at = matrix + (groups * group_rows + i - groups) * row_bytes;
        if (packable(static_cast<int>(kind))) {
          pack_row(static_cast<int>(kind), src + at, k, dst + at);
        } else {  // a K-quant's tail rows stay the file's blocks
          std::memcpy(dst + at, src + at, row_bytes);
        }
      }
    }
  });
  return packed;
}

// sum_i w_i * x_i for one unpacked row and one quantized token: an integer dot product per 16
// values, scaled by the weight's and the activation's scales.
inline float scratch_row_dot(const RowScratch& r, const int8_t* xq, const float* xs16, const float* xsum16, int64_t k) {
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
void scratch_row_values(const RowScratch& r, int zero, int64_t k, T* out) {
  for (int64_t i = 0; i < k; ++i) {
    const float v = r.scale16[i / 16] * static_cast<float>(static_cast<int>(r.codes[i]) - zero);
    out[i] = static_cast<T>(zero ? v : v - r.min16[i / 16]);  // c10::BFloat16 rounds to nearest even
  }
}

// ---- Row and token tiles of the SIMD builds' matmul ---------------------------------------------

// Rows [begin, end) ROWS at a time (prepare(first, count) reads their scales once; their bytes
// stay in L1/L2) and, for each ROWS, tokens in tiles of MAX_NT, then 4, 2, 1: tile(r, row, t0, nt)
// gives the row's sums for tokens [t0, t0 + nt). T tokens decode each weight step ceil(T / nt)
// times, not T times, and read each row from memory once. The rows AHEAD rows on from a group's
// first are requested into L2 (prefetcht1) while the group computes: a thread's rows are one
// sequential stream, and a token's decode waits on memory when the hardware prefetcher alone
// runs ahead of it. Which ROWS and AHEAD stream best depends on the core, so each build picks
// them by measurement (ggml_cpu.cpp, ggml_avx2.cpp); an AHEAD shorter than a group reaches the
// next group instead (rows of the group being computed are already on their way).
// How many of the `left` tokens the next tile takes: MAX_NT, then 4, 2, 1.
template <int MAX_NT = 4>
inline int64_t tile_tokens(int64_t left) {
  return left >= MAX_NT ? MAX_NT : left >= 4 ? 4 : left >= 2 ? 2 : 1;
}

template <int MAX_NT, int64_t ROWS, int64_t AHEAD, class Prepare, class Tile>
inline void row_and_token_tiles(const uint8_t* rows, int64_t row_bytes, int64_t begin, int64_t end, int64_t tokens, Prepare prepare,
                                Tile tile) {
  for (int64_t first = begin; first < end; first += ROWS) {
    const int64_t count = std::min(ROWS, end - first);
    const int64_t ahead = first + std::max(AHEAD, ROWS);
    const uint8_t* next = rows + ahead * row_bytes;
    const int64_t next_bytes = std::max<int64_t>(0, std::min(ROWS, end - ahead)) * row_bytes;
    for (int64_t at = 0; at < next_bytes; at += 64) __builtin_prefetch(next + at, 0, 2);  // 2: into L2 (prefetcht1)
    prepare(first, count);
    for (int64_t t0 = 0; t0 < tokens;) {
      const int64_t left = tokens - t0;
      const int64_t nt = tile_tokens<MAX_NT>(left);
      for (int64_t r = 0; r < count; ++r) tile(r, first + r, t0, nt);
      t0 += nt;
    }
  }
}

// f(std::integral_constant<int, nt>) for a tile size nt of row_and_token_tiles.
template <class F>
inline void with_tile_size(int64_t nt, F&& f) {
  switch (nt) {
    case 8: return f(std::integral_constant<int, 8>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 2: return f(std::integral_constant<int, 2>{});
    default: return f(std::integral_constant<int, 1>{});
  }
}

}  // namespace qwenkit
