// GGUF quantized blocks used in place on x86-64 CPUs with AVX-512 VNNI: matrix products that
// read the file's own bytes, and exact dequantization for everything else.
//
// Decoding is bound by the bytes of weights read per token, so the weights are never widened in
// memory. Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and Q6_K are repacked at load time into tile groups
// of sixteen rows (TileLayout, the same bytes) and multiplied by tile_groups_dot: per 32 values,
// eight VPDPBUSD with a token's codes broadcast give sixteen rows' exact int32 sums, then the
// same float steps for every (row, token) at every batch size. The rows outside a weight's tile
// groups (its last rows % 16) are read through a View that yields 64 unsigned codes at a time and
// a scale and offset per 16 or 32 values (rows_dot; rows_dot_k for Q4_K and Q6_K, whose integer
// sub-block scales are applied in integers, one VPDPWSSD, with float work once per 256 values):
//     w = scale * (code - zero) - min        (zero is per type)
// The activations are quantized to int8 in blocks of 32 (256 for the K-quants), as llama.cpp
// does. Rows of 32-value types whose length is not a multiple of 64, and the other K-quants, are
// unpacked into L1-resident scratch instead.
//
// Block layouts are ggml's (ggml-common.h); the formulas follow ggml's dequantize_row_* so that
// `dequantize` gives the same float32 values bit for bit.

#include "torch_lite.h"
#include <immintrin.h>

#include <type_traits>

#include "gguf_blocks.h"
#include "vec_math.h"

using namespace qwenkit;

namespace {

// Row groups of 8 with the group after next prefetched: measured on Zen 4 (AVX-512), where the
// kernels streamed 8 GB/s without the prefetch against 24 GB/s for plain reads.
constexpr int64_t TILE_ROWS = 8, PREFETCH_AHEAD = 16;

// 32 values from 16 bytes: the low nibbles are values 0..15, the high nibbles 16..31.
inline __m256i nibbles_32(const uint8_t* qs) {
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), mask), _mm_and_si128(q, mask));
}

// Q5_0 / Q5_1: bit j of the 32-bit qh is the fifth bit of value j.
inline __m256i with_fifth_bits(__m256i low, const uint8_t* qh) {
  uint32_t bits;
  std::memcpy(&bits, qh, 4);
  return _mm256_mask_add_epi8(low, static_cast<__mmask32>(bits), low, _mm256_set1_epi8(0x10));
}

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

inline void store32(uint8_t* dst, __m256i v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), v); }

void unpack_row(int kind, const uint8_t* row, int64_t k, RowScratch& r) {
  const Format f = format_of(kind);
  if (f.block_values == 256) return unpack_k_quant_row(kind, row, k, r);  // Q2_K, Q3_K, Q5_K (plain code)
  const int64_t blocks = k / f.block_values;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* p = row + b * f.block_bytes;
    uint8_t* codes = r.codes.data() + b * f.block_values;
    const int64_t first16 = b * f.block_values / 16;
    switch (kind) {
      case Q8_0:
        store32(codes, _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2)), _mm256_set1_epi8(char(0x80))));
        set_scale(r, first16, f16(p), 0.0f);
        break;
      case Q5_0:
        store32(codes, with_fifth_bits(nibbles_32(p + 6), p + 2));
        set_scale(r, first16, f16(p), 0.0f);
        break;
      case Q5_1:  // value = d * q + m
        store32(codes, with_fifth_bits(nibbles_32(p + 8), p + 4));
        set_scale(r, first16, f16(p), -f16(p + 2));
        break;
      case Q4_0:
        store32(codes, nibbles_32(p + 2));
        set_scale(r, first16, f16(p), 0.0f);
        break;
      case Q4_1:
        store32(codes, nibbles_32(p + 4));
        set_scale(r, first16, f16(p), -f16(p + 2));
        break;
      default:
        TORCH_CHECK(false, "GGUF block type ", kind, " has no CPU kernel");
    }
  }
}

// The 64 unsigned codes of values 64c .. 64c + 63.
template <int KIND>
inline __m512i packed_codes64(const PackedRow& p, int64_t c) {
  if constexpr (KIND == Q8_0) {
    return _mm512_loadu_si512(p.codes + 64 * c);
  } else {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.codes + 32 * c));
    const __m256i m = _mm256_set1_epi8(0x0F);
    __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, m)), _mm256_and_si256(_mm256_srli_epi16(v, 4), m), 1);
    if constexpr (has_fifth(KIND)) {
      uint64_t bits;
      std::memcpy(&bits, p.fifth + 8 * c, 8);
      q = _mm512_mask_add_epi8(q, _cvtu64_mask64(bits), q, _mm512_set1_epi8(0x10));
    }
    return q;
  }
}

// A row's fp16 scales (and minimums) as float: ws[b], and off[b] = ws * zero + min, the per-block
// amount the dot product subtracts times the block's sum of x.
template <int KIND>
inline void packed_row_scales(const PackedRow& p, int64_t blocks, float* ws, float* off) {
  const __m512 zero = _mm512_set1_ps(static_cast<float>(format_of(KIND).zero));
  for (int64_t b = 0; b < blocks; b += 16) {
    const __mmask16 m = blocks - b >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (blocks - b)) - 1);
    const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p.scales + b));
    _mm512_storeu_ps(ws + b, s);
    __m512 o = _mm512_mul_ps(s, zero);
    if constexpr (has_min(KIND)) o = _mm512_sub_ps(o, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p.mins + b)));
    _mm512_storeu_ps(off + b, o);
  }
}

// A packed row as the dot product reads it: 64 codes at a time, a scale and an offset per 32.
template <int KIND>
struct PackedView {
  static constexpr int GROUP = 32;
  PackedRow p;
  PackedView(const uint8_t* row, int64_t k) : p(KIND, row, k) {}
  void scales(int64_t k, float* ws, float* off) const { packed_row_scales<KIND>(p, k / 32, ws, off); }
  __m512i codes64(int64_t c) const { return packed_codes64<KIND>(p, c); }
};

// Q4_K straight from the file's blocks: per 256 values, d and dmin, eight 6-bit scales and mins
// (one per 32 values), then 4 x 32 bytes whose low nibbles are values 64i..64i+31 and high
// nibbles 64i+32..64i+63, so that 32 bytes are exactly one 64-value step.
struct Q4KView {
  static constexpr int GROUP = 32;
  const uint8_t* row;
  Q4KView(const uint8_t* r, int64_t) : row(r) {}
  // Float scales per 32 values for dequantization (unpack_view_row): d * sc, from int_scales.
  void scales(int64_t k, float* ws, float* off) const {
    std::vector<int32_t> sc(k / 32);
    std::vector<float> d(k / 256);
    int_scales(k, sc.data(), d.data(), off);  // off = dmin * m: value = d * sc * q - dmin * m
    for (int64_t g = 0; g < k / 32; ++g) ws[g] = d[g / 8] * sc[g];
  }
  // The scales as integers: sc per 32 values and d per 256. The 8 scale bytes then 8 min bytes
  // (scale_min_bytes_k4) are widened in one instruction.
  void int_scales(int64_t k, int32_t* sc, float* d, float* off) const {
    for (int64_t b = 0; b < k / 256; ++b) {
      const uint8_t* p = row + 144 * b;
      const __m512i wide = _mm512_cvtepu8_epi32(scale_min_bytes_k4(p + 4));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(sc + 8 * b), _mm512_castsi512_si256(wide));
      const __m256 mins = _mm256_cvtepi32_ps(_mm512_extracti64x4_epi64(wide, 1));
      _mm256_storeu_ps(off + 8 * b, _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(load_u16(p + 2))), mins));
      d[b] = _cvtsh_ss(load_u16(p));
    }
  }
  __m512i codes64(int64_t c) const {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 144 * (c / 4) + 16 + 32 * (c % 4)));
    const __m256i m = _mm256_set1_epi8(0x0F);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, m)), _mm256_and_si256(_mm256_srli_epi16(v, 4), m), 1);
  }
};

// Q6_K straight from the file's blocks: per 256 values, ql[128], qh[64], sixteen int8 scales (one
// per 16 values) and d; codes are 6 bits with zero 32. Each half of 128 values is two 64-value
// steps: (low nibbles of ql[0:32], ql[32:64]) then (their high nibbles), with qh's bit pairs.
struct Q6KView {
  static constexpr int GROUP = 16;
  const uint8_t* row;
  Q6KView(const uint8_t* r, int64_t) : row(r) {}
  // Float scales per 16 values for dequantization (unpack_view_row): d * sc, from int_scales.
  void scales(int64_t k, float* ws, float* off) const {
    std::vector<int32_t> sc(k / 16);
    std::vector<float> d(k / 256);
    int_scales(k, sc.data(), d.data(), off);  // off = d * sc * 32, the zero's share
    for (int64_t g = 0; g < k / 16; ++g) ws[g] = d[g / 16] * static_cast<int16_t>(sc[g]);
  }
  // The scales as integers: sc per 16 values (int8, held as an int16) and d per 256.
  void int_scales(int64_t k, int32_t* sc, float* d, float* off) const {
    for (int64_t b = 0; b < k / 256; ++b) {
      const uint8_t* p = row + 210 * b;
      const int8_t* s = reinterpret_cast<const int8_t*>(p + 192);
      d[b] = _cvtsh_ss(load_u16(p + 208));
      const __m512i wide = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
      // an int16 in each lane's low half, zero in the high half (see tile_dot_k)
      _mm512_storeu_si512(sc + 16 * b, _mm512_and_si512(wide, _mm512_set1_epi32(0xFFFF)));
      _mm512_storeu_ps(off + 16 * b, _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(d[b]), _mm512_cvtepi32_ps(wide)), _mm512_set1_ps(32.0f)));
    }
  }
  __m512i codes64(int64_t c) const {
    const uint8_t* p = row + 210 * (c / 4);
    const int half = (c % 4) / 2, upper = c % 2;
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * half));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * half + 32));
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 128 + 32 * half));
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x30);
    __m256i lo, hi;
    if (upper) {
      lo = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), m4), _mm256_and_si256(h, m2));
      hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b, 4), m4), _mm256_and_si256(_mm256_srli_epi16(h, 2), m2));
    } else {
      lo = _mm256_or_si256(_mm256_and_si256(a, m4), _mm256_and_si256(_mm256_slli_epi16(h, 4), m2));
      hi = _mm256_or_si256(_mm256_and_si256(b, m4), _mm256_and_si256(_mm256_slli_epi16(h, 2), m2));
    }
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  }
};

// Per 64-value step, GROUP-value scales spread over the 16 lanes of VPDPBUSD's result: lane l
// sums 4 bytes, so a step's lanes split into 2 groups of 32 or 4 groups of 16.
template <int G>
inline __m512 spread_step(const float* scales, int64_t c) {
  if constexpr (G == 32) {
    const __m512i lanes = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m128 two = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(scales + 2 * c)));
    return _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(two));
  } else {
    const __m512i lanes = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    return _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(_mm_loadu_ps(scales + 4 * c)));
  }
}

// The subtracted part of a row's dot products with tokens [t0, t0 + nt): per weight group, the
// group's offset (scale * zero + min) times the token's scaled sum of codes in the group.
inline void subtract_offsets(const float* off, const float* xsums, int64_t groups, int64_t t0, int64_t nt, const float* sums,
                             float* out, int64_t n, int64_t row) {
  for (int64_t j = 0; j < nt; ++j) {
    const float* xsum = xsums + (t0 + j) * groups;
    __m512 sub = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += 16) {
      const __mmask16 m = groups - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (groups - g)) - 1);
      sub = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, off + g), _mm512_maskz_loadu_ps(m, xsum + g), sub);
    }
    out[(t0 + j) * n + row] = sums[j] - _mm512_reduce_add_ps(sub);
  }
}

// NT tokens' dot products with one row: each 64-value step of the row is decoded once and
// multiplied with all NT tokens' int8 codes. Each token's sum is computed exactly as it would be
// alone (same operations, same order), so a batch gives each token the bits of a batch of one.
template <class View, int NT>
inline void tile_dot(const View& v, const float* ws, const int8_t* xq, const __m512* xsv, int64_t k, float* sums) {
  constexpr int G = View::GROUP;
  const int64_t steps = k / 64;
  __m512 acc[NT];
  for (int j = 0; j < NT; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < steps; ++c) {
    const __m512i codes = v.codes64(c);
    const __m512 w = spread_step<G>(ws, c);
    for (int j = 0; j < NT; ++j) {
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, _mm512_loadu_si512(xq + j * k + 64 * c));
      acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(w, xsv[j * steps + c]), acc[j]);
    }
  }
  for (int j = 0; j < NT; ++j) sums[j] = _mm512_reduce_add_ps(acc[j]);
}

// y[t, row] for rows [begin, end) (k a multiple of 64), through a View of each row: codes per
// 64 values, a float weight scale and an offset per GROUP values (the 32-value types), tokens
// 4 at a time through tile_dot.
template <class View>
void rows_dot(const uint8_t* rows, int64_t row_bytes, int64_t k, const QuantizedActivations& a, int64_t tokens,
              int64_t begin, int64_t end, float* out, int64_t n) {
  constexpr int G = View::GROUP;
  const int64_t groups = k / G, steps = k / 64, stride = groups + 16;
  const float* xscale = G == 32 ? a.scale32.data() : a.scale16.data();
  const float* xsums = G == 32 ? a.sum32.data() : a.sum16.data();
  std::vector<float> ws(TILE_ROWS * stride), off(TILE_ROWS * stride);
  std::vector<__m512> xsv(tokens * steps);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t c = 0; c < steps; ++c) xsv[t * steps + c] = spread_step<G>(xscale + t * groups, c);
  float sums[4];
  row_and_token_tiles<4, TILE_ROWS, PREFETCH_AHEAD>(
      rows, row_bytes, begin, end, tokens,
      [&](int64_t first, int64_t count) {
        for (int64_t r = 0; r < count; ++r) View(rows + (first + r) * row_bytes, k).scales(k, &ws[r * stride], &off[r * stride]);
      },
      [&](int64_t r, int64_t row, int64_t t0, int64_t nt) {
        const View v(rows + row * row_bytes, k);
        with_tile_size(nt, [&](auto NT) { tile_dot<View, NT>(v, &ws[r * stride], a.q.data() + t0 * k, xsv.data() + t0 * steps, k, sums); });
        subtract_offsets(&off[r * stride], xsums, groups, t0, nt, sums, out, n, row);
      });
}

// Per 64-value step, the integer sub-block scales spread over VPDPBUSD's 16 lanes, as spread_step.
template <int G>
inline __m512i spread_int_step(const int32_t* sc, int64_t c) {
  if constexpr (G == 32) {
    const __m512i lanes = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_permutexvar_epi32(lanes, _mm512_castsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc + 2 * c))));
  } else {
    const __m512i lanes = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    return _mm512_permutexvar_epi32(lanes, _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + 4 * c))));
  }
}

// NT tokens' dot products with one K-quant row, in integers within each 256-value super-block
// (the activations have one scale per super-block, the weights an integer scale per 16 or 32
// values and a float d per 256). A lane of VPDPBUSD sums 4 products of a code (< 64) and an
// activation (|x| <= 127), so it fits in 16 bits: VPDPWSSD multiplies that low half by the lane's
// scale (whose high half is zero) and accumulates, in one instruction, with no float work per
// step. Float work is one convert and one multiply-add per token per 256 values. As in tile_dot,
// each token's sum is computed exactly as it would be alone.
template <class View, int NT>
inline void tile_dot_k(const View& v, const int32_t* sc, const float* d, const int8_t* xq, const float* xs16, int64_t k, float* sums) {
  constexpr int G = View::GROUP;
  const int64_t groups16 = k / 16;
  __m512 acc[NT];
  for (int j = 0; j < NT; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t s = 0; s < k / 256; ++s) {
    __m512i isum[NT];
    for (int j = 0; j < NT; ++j) isum[j] = _mm512_setzero_si512();
    for (int64_t c = 4 * s; c < 4 * s + 4; ++c) {
      const __m512i codes = v.codes64(c);
      const __m512i scales = spread_int_step<G>(sc, c);
      for (int j = 0; j < NT; ++j) {
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, _mm512_loadu_si512(xq + j * k + 64 * c));
        isum[j] = _mm512_dpwssd_epi32(isum[j], dot, scales);
      }
    }
    for (int j = 0; j < NT; ++j)
      acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[j]), _mm512_set1_ps(d[s] * xs16[j * groups16 + 16 * s]), acc[j]);
  }
  for (int j = 0; j < NT; ++j) sums[j] = _mm512_reduce_add_ps(acc[j]);
}

// rows_dot for the K-quant views with integer scales (Q4_K, Q6_K): tokens 8 at a time through
// tile_dot_k.
template <class View>
void rows_dot_k(const uint8_t* rows, int64_t row_bytes, int64_t k, const QuantizedActivations& a, int64_t tokens,
                int64_t begin, int64_t end, float* out, int64_t n) {
  constexpr int G = View::GROUP;
  const int64_t groups = k / G, stride = groups + 16, supers = k / 256;
  const float* xsums = G == 32 ? a.sum32.data() : a.sum16.data();
  std::vector<int32_t> sc(TILE_ROWS * stride);
  std::vector<float> d(TILE_ROWS * supers), off(TILE_ROWS * stride);
  float sums[8];
  row_and_token_tiles<8, TILE_ROWS, PREFETCH_AHEAD>(
      rows, row_bytes, begin, end, tokens,
      [&](int64_t first, int64_t count) {
        for (int64_t r = 0; r < count; ++r)
          View(rows + (first + r) * row_bytes, k).int_scales(k, &sc[r * stride], &d[r * supers], &off[r * stride]);
      },
      [&](int64_t r, int64_t row, int64_t t0, int64_t nt) {
        const View v(rows + row * row_bytes, k);
        with_tile_size(nt, [&](auto NT) {
          tile_dot_k<View, NT>(v, &sc[r * stride], &d[r * supers], a.q.data() + t0 * k, a.scale16.data() + t0 * (k / 16), k, sums);
        });
        subtract_offsets(&off[r * stride], xsums, groups, t0, nt, sums, out, n, row);
      });
}

// One row in the unpacked form (for dequantization), through the same View the dot product
// reads: value = scale * (code - zero) - min, where the dot product subtracts off = scale * zero + min.
template <class View>
void unpack_view_row(const uint8_t* row, int64_t k, int zero, RowScratch& r) {
  constexpr int G = View::GROUP;
  const View v(row, k);
  std::vector<float> ws(k / G + 16), off(k / G + 16);
  v.scales(k, ws.data(), off.data());
  for (int64_t c = 0; c < k / 64; ++c) _mm512_storeu_si512(r.codes.data() + 64 * c, v.codes64(c));
  for (int64_t g = 0; g < k / 16; ++g) {
    const float scale = ws[g * 16 / G];
    r.scale16[g] = scale;
    r.min16[g] = off[g * 16 / G] - scale * zero;
  }
}

// sum_i w_i * x_i for one unpacked row and one quantized token. VPDPBUSD lane l sums 4 bytes,
// so lanes 4g..4g+3 of a 64-byte step belong to 16-value group g: the four group scales are
// spread over the lanes with one permute.
inline float row_dot(const RowScratch& r, const int8_t* xq, const float* xs16, const float* xsum16, int64_t k) {
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 64) {
    const bool whole = i + 64 <= k;  // otherwise a last 32 values
    const __mmask64 bytes = whole ? ~0ull : 0xFFFFFFFFull;
    const __mmask8 groups = whole ? 0xF : 0x3;
    const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_maskz_loadu_epi8(bytes, r.codes.data() + i),
                                            _mm512_maskz_loadu_epi8(bytes, xq + i));
    const __m128 s4 = _mm_mul_ps(_mm_maskz_loadu_ps(groups, r.scale16.data() + i / 16), _mm_maskz_loadu_ps(groups, xs16 + i / 16));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(s4)), acc);
  }
  __m512 off = _mm512_setzero_ps();
  const int64_t n16 = k / 16;
  for (int64_t g = 0; g < n16; g += 16) {
    const __mmask16 m = n16 - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n16 - g)) - 1);
    off = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, r.offset16.data() + g), _mm512_maskz_loadu_ps(m, xsum16 + g), off);
  }
  return _mm512_reduce_add_ps(acc) - _mm512_reduce_add_ps(off);
}

// float32 to bfloat16, rounded to nearest even (the values are finite: no NaN handling). Done
// with integer ops so that the build needs no AVX512-BF16.
inline __m256i to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

inline void store16(float* out, __m512 v) { _mm512_storeu_ps(out, v); }
inline void store16(at::BFloat16* out, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), to_bf16(v)); }

// ggml's values of one unpacked row: d * q for the symmetric types, d * q - m for the others.
template <typename T>
inline void row_values(const RowScratch& r, int zero, int64_t k, T* out) {
  const __m512i z = _mm512_set1_epi32(zero);
  for (int64_t i = 0; i < k; i += 16) {
    const __m512 q = _mm512_cvtepi32_ps(_mm512_sub_epi32(
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r.codes.data() + i))), z));
    const __m512 v = _mm512_mul_ps(_mm512_set1_ps(r.scale16[i / 16]), q);
    store16(out + i, zero ? v : _mm512_sub_ps(v, _mm512_set1_ps(r.min16[i / 16])));
  }
}

// ---- Tile groups of sixteen rows (TileLayout): the 32-value types, Q4_K and Q6_K --------------
// A block of 32 values of sixteen rows meets one token in eight VPDPBUSD, the token's four codes
// broadcast against four values of each of the sixteen rows: no transpose, no horizontal sums,
// and the block's exact int32 sum per row. From there every (row, token) takes the same float
// steps in the same order whatever the batch:
//     acc = fma(float(sum - zero * token's code sum), row scale * token scale, acc)    per block
//     acc = fma(row minimum, token's scaled code sum, acc)            (Q4_1, Q5_1, Q4_K) per block
// (Q6_K's blocks are its 16-value sub-blocks.)
// Tokens go 16 at a time (TILE_TOKENS): each block's codes are decoded once per 16 tokens, and
// the sums stay in registers. The layout is also AMX's (a block of a group is one tile of its
// second operand); its tile multiply was tried (TDPBSUD, 16 tokens x 16 rows x 32 values) and
// measured 1.1-1.3x this path from 16 tokens, 0.9x on Q8_0 rows, so it was not kept. This path
// issues eight VPDPBUSD per token, block and 16 rows (64 multiply-adds each, at most one per
// cycle per core on the Xeon measured: 175 G MAC/s on one thread at 16 tokens is that rate at
// 2.7 GHz); the tile version, with 1024 per cycle, was held by the same float steps per token and
// block and by each block's sums going through memory between the tile unit and the vectors.
constexpr int64_t TILE_TOKENS = 16;

// What the float steps of a tile group's type need: whether it has minimums, and how many values
// share a weight scale (Q6_K: 16; the rest 32). Q4_K is Q4_1's arithmetic with scales from its
// super-blocks: value = (d * sc) * q - (dmin * m) per 32 values.
constexpr bool tile_min(int kind) { return has_min(kind) || kind == Q4_K; }
constexpr int tile_sub(int kind) { return kind == Q6_K ? 16 : 32; }

// Step b's 512 codes of a tile group in tile order, as 8 vectors (one per four values).
template <int KIND>
inline void tile_block_codes(const uint8_t* step, __m512i* v) {
  if constexpr (KIND == Q8_0) {
    for (int p = 0; p < 8; ++p) v[p] = _mm512_loadu_si512(step + 64 * p);
  } else {
    constexpr int HIGH = has_fifth(KIND) ? 64 : KIND == Q6_K ? 128 : 0;
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    for (int p = 0; p < 4; ++p) {
      const __m512i bytes = _mm512_loadu_si512(step + HIGH + 64 * p);
      v[p] = _mm512_and_si512(bytes, m4);
      v[p + 4] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), m4);
    }
    if constexpr (has_fifth(KIND)) {
      const __m512i sixteen = _mm512_set1_epi8(0x10);
      for (int p = 0; p < 8; ++p) {
        uint64_t bits;
        std::memcpy(&bits, step + 8 * p, 8);
        v[p] = _mm512_mask_add_epi8(v[p], _cvtu64_mask64(bits), v[p], sixteen);
      }
    } else if constexpr (KIND == Q6_K) {
      const __m512i sixteen = _mm512_set1_epi8(0x10), thirty_two = _mm512_set1_epi8(0x20);
      for (int p = 0; p < 8; ++p) {
        uint64_t bit4, bit5;
        std::memcpy(&bit4, step + 16 * p, 8);
        std::memcpy(&bit5, step + 16 * p + 8, 8);
        v[p] = _mm512_mask_add_epi8(v[p], _cvtu64_mask64(bit4), v[p], sixteen);
        v[p] = _mm512_mask_add_epi8(v[p], _cvtu64_mask64(bit5), v[p], thirty_two);
      }
    }
  }
}

// A tile group's weight scales (and minimums) as float by [scale group][row]: 32-value blocks,
// Q4_K's 32-value sub-blocks (d * sc, -dmin * m), Q6_K's 16-value sub-blocks (d * sc).
template <int KIND>
inline void tile_group_scales(const uint8_t* group, const TileLayout& layout, int64_t k, float* ws, float* mins) {
  auto f16x16 = [](const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); };
  if constexpr (KIND == Q4_K) {
    const __m128i low6 = _mm_set1_epi8(63), low4 = _mm_set1_epi8(0x0F);
    for (int64_t s = 0; s < k / 256; ++s) {
      const __m512 d = f16x16(group + 32 * s), dmin = f16x16(group + layout.mins_at + 32 * s);
      __m128i q[12];
      for (int i = 0; i < 12; ++i) q[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(group + layout.scales_at + 192 * s + 16 * i));
      auto top2 = [&](__m128i x) { return _mm_and_si128(_mm_srli_epi16(x, 6), _mm_set1_epi8(3)); };  // bits 6-7 of each byte
      for (int j = 0; j < 8; ++j) {  // ggml's get_scale_min_k4, sixteen rows at once
        __m128i sc, m;
        if (j < 4) {
          sc = _mm_and_si128(q[j], low6);
          m = _mm_and_si128(q[j + 4], low6);
        } else {
          sc = _mm_or_si128(_mm_and_si128(q[j + 4], low4), _mm_slli_epi16(top2(q[j - 4]), 4));
          m = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(q[j + 4], 4), low4), _mm_slli_epi16(top2(q[j]), 4));
        }
        _mm512_storeu_ps(ws + 16 * (8 * s + j), _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(sc))));
        _mm512_storeu_ps(mins + 16 * (8 * s + j), _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(m)))));
      }
    }
  } else if constexpr (KIND == Q6_K) {
    for (int64_t s = 0; s < k / 256; ++s) {
      const __m512 d = f16x16(group + 32 * s);
      for (int i = 0; i < 16; ++i) {
        const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(group + layout.scales_at + 256 * s + 16 * i));
        _mm512_storeu_ps(ws + 16 * (16 * s + i), _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc))));
      }
    }
  } else {
    for (int64_t b = 0; b < k / 32; ++b) {
      _mm512_storeu_ps(ws + 16 * b, f16x16(group + 32 * b));
      if constexpr (has_min(KIND)) _mm512_storeu_ps(mins + 16 * b, f16x16(group + layout.mins_at + 32 * b));
    }
  }
}

// Per-call token data by [token][scale group]: zero * the group's code sum (exact int32), the
// activations' scale and their scaled code sum.
template <int KIND>
struct TokenBlocks {
  std::vector<int32_t> zero_sums;
  const float* scale;
  const float* sum;
  TokenBlocks(const QuantizedActivations& a, int64_t tokens, int64_t k)
      : zero_sums(tokens * (k / tile_sub(KIND))),
        scale(tile_sub(KIND) == 16 ? a.scale16.data() : a.scale32.data()),
        sum(tile_sub(KIND) == 16 ? a.sum16.data() : a.sum32.data()) {
    const int zero = format_of(KIND).zero;
    const int16_t* codes = tile_sub(KIND) == 16 ? a.codes16.data() : a.codes32.data();
    for (size_t i = 0; i < zero_sums.size(); ++i) zero_sums[i] = zero * static_cast<int32_t>(codes[i]);
  }
};

// One scale group's float steps for one token (see above).
template <int KIND>
inline __m512 block_step(__m512i sums, int64_t tb, const TokenBlocks<KIND>& x, __m512 ws, __m512 mins, __m512 acc) {
  const __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(sums, _mm512_set1_epi32(x.zero_sums[tb])));
  acc = _mm512_fmadd_ps(f, _mm512_mul_ps(ws, _mm512_set1_ps(x.scale[tb])), acc);
  if constexpr (tile_min(KIND)) acc = _mm512_fmadd_ps(mins, _mm512_set1_ps(x.sum[tb]), acc);
  return acc;
}

// A tile group as the token loops read it: its steps' codes (TileLayout), and its rows' scales
// and minimums as float by [scale group][row].
struct TileGroup {
  const uint8_t* steps;
  int64_t step_bytes, blocks;
  const float* ws;
  const float* mins;
  __m512 scale(int64_t b) const { return _mm512_loadu_ps(ws + 16 * b); }
  __m512 minimum(int64_t b) const { return mins ? _mm512_loadu_ps(mins + 16 * b) : _mm512_setzero_ps(); }
};

// Tokens [t0, t0 + NT) of a group through VPDPBUSD, step by step: acc[m] gets token t0 + m's
// sums of the sixteen rows. xq: the tile's codes step-major ([step][NT tokens][32], see
// step_major), so that a step's codes for all NT tokens are one contiguous run. `ahead` (or
// null): the next group's codes, requested into L2 a step at a time.
template <int KIND, int NT>
inline void vnni_tokens(const TileGroup& g, const int8_t* xq, const TokenBlocks<KIND>& x, int64_t t0, const uint8_t* ahead, __m512* acc) {
  constexpr int SUBS = 32 / tile_sub(KIND);  // scale groups per step
  const int64_t groups = g.blocks * SUBS;
  for (int m = 0; m < NT; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < g.blocks; ++b) {
    if (ahead)
      for (int64_t at = 0; at < g.step_bytes; at += 64) __builtin_prefetch(ahead + b * g.step_bytes + at, 0, 2);
    __m512i v[8];
    tile_block_codes<KIND>(g.steps + b * g.step_bytes, v);
    // Every loop here unrolled (GCC left Q6_K's token loop rolled, with its sums on the stack).
#pragma GCC unroll 2
    for (int sub = 0; sub < SUBS; ++sub) {
      const int64_t scale_group = b * SUBS + sub;
      const __m512 w = g.scale(scale_group), mn = g.minimum(scale_group);
#pragma GCC unroll 16
      for (int m = 0; m < NT; ++m) {
        const int8_t* xb = xq + (b * NT + m) * 32;
        __m512i s = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int p = sub * 8 / SUBS; p < (sub + 1) * 8 / SUBS; ++p) {
          int32_t four;
          std::memcpy(&four, xb + 4 * p, 4);
          s = _mm512_dpbusd_epi32(s, v[p], _mm512_set1_epi32(four));
        }
        acc[m] = block_step<KIND>(s, (t0 + m) * groups + scale_group, x, w, mn, acc[m]);
      }
    }
  }
}

// How many of the `left` tokens the next token tile takes: 16, then 8, 4, 2, 1.
inline int64_t tile_size(int64_t left) { return left >= TILE_TOKENS ? TILE_TOKENS : tile_tokens<8>(left); }

// The tokens' int8 codes [T, K] rearranged tile by tile (tile_size) into [step][tile's tokens][32]:
// a step's 32 codes of every token of a tile in one contiguous run, where [T, K] has them K bytes
// apart (with K = 4864, 16 tokens' codes for one step sat on 16 lines that L1 could not keep).
inline void step_major(const int8_t* q, int64_t tokens, int64_t k, std::vector<int8_t>& out) {
  out.resize(tokens * k);
  for (int64_t t0 = 0; t0 < tokens;) {
    const int64_t nt = tile_size(tokens - t0);
    int8_t* tile = out.data() + t0 * k;
    for (int64_t b = 0; b < k / 32; ++b)
      for (int64_t m = 0; m < nt; ++m) std::memcpy(tile + (b * nt + m) * 32, q + (t0 + m) * k + 32 * b, 32);
    t0 += nt;
  }
}

// Rows [lo, hi) of a tile group's sixteen outputs for tokens [t0, t0 + nt).
inline void store_group(const __m512* acc, int64_t nt, int64_t t0, int64_t first, int64_t lo, int64_t hi, float* out, int64_t ldo) {
  const __mmask16 keep = static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1));
  for (int64_t m = 0; m < nt; ++m) _mm512_mask_storeu_ps(out + (t0 + m) * ldo + first, keep, acc[m]);
}

// The rows outside a weight's tile groups: packed rows, or a K-quant's file blocks.
template <int KIND>
void tail_rows_dot(const uint8_t* rows, int64_t row_bytes, int64_t k, const QuantizedActivations& a, int64_t tokens, int64_t begin,
                   int64_t end, float* out, int64_t ldo) {
  if constexpr (KIND == Q4_K) {
    rows_dot_k<Q4KView>(rows, row_bytes, k, a, tokens, begin, end, out, ldo);
  } else if constexpr (KIND == Q6_K) {
    rows_dot_k<Q6KView>(rows, row_bytes, k, a, tokens, begin, end, out, ldo);
  } else {
    rows_dot<PackedView<KIND>>(rows, row_bytes, k, a, tokens, begin, end, out, ldo);
  }
}

// y[t, row] for rows [begin, end) of a packed weight of n_rows rows: its tile groups here, its
// last n_rows % 16 rows through the row kernels.
template <int KIND>
void tile_groups_dot(const uint8_t* rows, int64_t row_bytes, int64_t n_rows, int64_t k, const QuantizedActivations& a, int64_t tokens,
                     int64_t begin, int64_t end, float* out, int64_t ldo) {
  constexpr int64_t G = TILE_GROUP_ROWS;
  const int64_t blocks = k / 32, grouped = n_rows / G * G, scale_groups = k / tile_sub(KIND);
  const TileLayout layout(KIND, k);
  const TokenBlocks<KIND> x(a, tokens, k);
  thread_local std::vector<float> ws, mins;
  ws.resize(scale_groups * G);
  mins.resize(tile_min(KIND) ? scale_groups * G : 0);
  __m512 acc[TILE_TOKENS];
  thread_local std::vector<int8_t> codes;
  if (begin / G * G < std::min(end, grouped)) step_major(a.q.data(), tokens, k, codes);
  for (int64_t first = begin / G * G; first < std::min(end, grouped); first += G) {
    const int64_t lo = std::max(begin, first) - first, hi = std::min(end, first + G) - first;
    const uint8_t* group = rows + first * row_bytes;
    const uint8_t* next = first + G < grouped ? group + G * row_bytes : nullptr;
    tile_group_scales<KIND>(group, layout, k, ws.data(), mins.data());
    if (next)  // the next group's scales; its codes a step at a time as this group's are read
      for (int64_t at = 0; at < layout.steps_at; at += 64) __builtin_prefetch(next + at, 0, 2);
    const uint8_t* ahead = next ? next + layout.steps_at : nullptr;
    const TileGroup g{group + layout.steps_at, layout.step_bytes, blocks, ws.data(), tile_min(KIND) ? mins.data() : nullptr};
    for (int64_t t0 = 0; t0 < tokens;) {
      const int64_t nt = tile_size(tokens - t0);
      const int8_t* xq = codes.data() + t0 * k;
      const uint8_t* prefetch = t0 == 0 ? ahead : nullptr;
      switch (nt) {
        case 16: vnni_tokens<KIND, 16>(g, xq, x, t0, prefetch, acc); break;
        case 8: vnni_tokens<KIND, 8>(g, xq, x, t0, prefetch, acc); break;
        case 4: vnni_tokens<KIND, 4>(g, xq, x, t0, prefetch, acc); break;
        case 2: vnni_tokens<KIND, 2>(g, xq, x, t0, prefetch, acc); break;
        default: vnni_tokens<KIND, 1>(g, xq, x, t0, prefetch, acc); break;
      }
      store_group(acc, nt, t0, first, lo, hi, out, ldo);
      t0 += nt;
    }
  }
  if (end > grouped) tail_rows_dot<KIND>(rows, row_bytes, k, a, tokens, std::max(begin, grouped), end, out, ldo);
}

// One row as dequantize_into reads it outside tile groups: a packed row (PackedRow) of a 32-value
// type, else the file's blocks (a K-quant's rows outside its tile groups are the file's too).
inline void unpack_one_row(int kind, bool packed, const uint8_t* row, int64_t k, int zero, RowScratch& r) {
  if (packed && packable(kind)) {
    dispatch_packed(kind, [&](auto kind_constant) { unpack_view_row<PackedView<decltype(kind_constant)::value>>(row, k, zero, r); });
  } else if (kind == Q4_K) {
    unpack_view_row<Q4KView>(row, k, zero, r);
  } else if (kind == Q6_K) {
    unpack_view_row<Q6KView>(row, k, zero, r);
  } else {
    unpack_row(kind, row, k, r);
  }
}

// Per-type dispatch over the tile-group types (dispatch_packed's, and Q4_K, Q6_K).
template <typename F>
void dispatch_tiled(int kind, F&& f) {
  switch (kind) {
    case Q4_K: f(std::integral_constant<int, Q4_K>{}); break;
    case Q6_K: f(std::integral_constant<int, Q6_K>{}); break;
    default: dispatch_packed(kind, std::forward<F>(f));
  }
}

// dequantize_into for a packed weight (tile groups, then the rows outside them): each step of a
// group decoded once (tile_block_codes), its 16 rows' codes copied out of tile order, the scales
// those of the kernel (tile_group_scales), whose products are ggml's.
template <int KIND>
void dequantize_tile_groups(torch::Tensor w, torch::Tensor out) {
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2, "w must be uint8 [rows, bytes per row]");
  TORCH_CHECK((out.dtype() == torch::kFloat32 || out.dtype() == torch::kBFloat16) && out.dim() == 2 && out.is_contiguous() &&
                  out.size(0) == w.size(0),
              "out must be a contiguous float32 or bfloat16 [rows, row length]");
  const Format f = format_of(KIND);
  const int64_t n = w.size(0), k = out.size(1), G = TILE_GROUP_ROWS;
  TORCH_CHECK(k % 64 == 0 && k % f.block_values == 0 && w.size(1) == k / f.block_values * f.block_bytes, "row length ", k,
              " does not match ", w.size(1), " bytes per row of GGUF type ", KIND);
  w = w.contiguous();
  const uint8_t* rows = w.data_ptr<uint8_t>();
  const int64_t row_bytes = w.size(1), groups = n / G, blocks = k / 32, sub = tile_sub(KIND), zero = f.zero;
  const TileLayout layout(KIND, k);
  auto write = [&](const RowScratch& r, int64_t row) {
    if (out.dtype() == torch::kBFloat16) {
      row_values(r, zero, k, out.data_ptr<at::BFloat16>() + row * k);
    } else {
      row_values(r, zero, k, out.data_ptr<float>() + row * k);
    }
  };
  parallel_for(0, groups + n - groups * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<RowScratch> scratch(G, RowScratch(k));
    std::vector<float> ws(k / sub * G), mins(k / sub * G);
    alignas(64) uint8_t tile[512];
    for (int64_t u = begin; u < end; ++u) {
      if (u >= groups) {  // a row outside the groups
        const int64_t row = groups * G + u - groups;
        unpack_one_row(KIND, true, rows + row * row_bytes, k, zero, scratch[0]);
        write(scratch[0], row);
        continue;
      }
      const uint8_t* group = rows + u * G * row_bytes;
      tile_group_scales<KIND>(group, layout, k, ws.data(), mins.data());
      for (int64_t b = 0; b < blocks; ++b) {
        __m512i v[8];
        tile_block_codes<KIND>(group + layout.steps_at + b * layout.step_bytes, v);
        for (int q = 0; q < 8; ++q) _mm512_store_si512(tile + 64 * q, v[q]);
        for (int64_t r = 0; r < G; ++r)
          for (int q = 0; q < 8; ++q) std::memcpy(scratch[r].codes.data() + 32 * b + 4 * q, tile + 64 * q + 4 * r, 4);
      }
      for (int64_t r = 0; r < G; ++r) {
        for (int64_t i = 0; i < k / 16; ++i) {  // value = scale * (code - zero) - min: min = -(the kernel's minimum)
          scratch[r].scale16[i] = ws[i * 16 / sub * G + r];
          scratch[r].min16[i] = tile_min(KIND) ? -mins[i * 16 / sub * G + r] : 0.0f;
        }
        write(scratch[r], u * G + r);
      }
    }
  });
}

}  // namespace

void qwenkit::rows_matmul(int kind, bool packed, const uint8_t* rows, int64_t row_bytes, int64_t n_rows, int64_t k, const QuantizedActivations& a,
                          int64_t tokens, int64_t begin, int64_t end, float* out, int64_t ldo) {
  if (tokens == 0) return;
  if (packed) {
    dispatch_tiled(kind, [&](auto kind_constant) {
      tile_groups_dot<decltype(kind_constant)::value>(rows, row_bytes, n_rows, k, a, tokens, begin, end, out, ldo);
    });
  } else if (kind == Q4_K) {
    rows_dot_k<Q4KView>(rows, row_bytes, k, a, tokens, begin, end, out, ldo);
  } else if (kind == Q6_K) {
    rows_dot_k<Q6KView>(rows, row_bytes, k, a, tokens, begin, end, out, ldo);
  } else {
    unpacked_rows_dot(rows, row_bytes, begin, end, k, format_of(kind).zero, a, tokens, out, ldo,
                      [&](const uint8_t* row, int64_t k, RowScratch& r) { unpack_row(kind, row, k, r); }, row_dot);
  }
}

// out[N, K] = values of GGUF block rows w: in float32 equal to ggml's dequantize_row_*, in
// bfloat16 those values rounded to nearest even.
void dequantize_into(torch::Tensor w, int64_t kind, torch::Tensor out, bool packed) {
  const int zero = format_of(static_cast<int>(kind)).zero;
  if (packed) {
    dispatch_tiled(static_cast<int>(kind), [&](auto kind_constant) { dequantize_tile_groups<decltype(kind_constant)::value>(w, out); });
    return;
  }
  dequantize_rows(
      w, kind, out, [&](const uint8_t* row, int64_t k, RowScratch& r) { unpack_one_row(static_cast<int>(kind), false, row, k, zero, r); },
      [](const RowScratch& r, int zero, int64_t k, auto* values) { row_values(r, zero, k, values); });
}

int64_t qwenkit::packed_group_rows(int64_t kind) { return tileable(static_cast<int>(kind)) ? TILE_GROUP_ROWS : 1; }

torch::Tensor pack(torch::Tensor w, int64_t kind, int64_t k) { return pack_rows(w, kind, k, qwenkit::packed_group_rows(kind)); }
