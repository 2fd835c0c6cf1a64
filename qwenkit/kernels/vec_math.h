// Vector helpers the kernels share: an 8-lane horizontal sum, a vectorised exp, Q4_K's scale
// bytes, and SiLU(gate) * up, each for the instruction set the file is built for (AVX2 + FMA,
// or plain C++).

#pragma once

#include <cmath>
#include <cstdint>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace qwenkit {

#if defined(__AVX2__) && defined(__FMA__)
// The sum of 8 float lanes.
inline float hsum8(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

// e^x for 8 lanes by Cephes' expf: range reduction by ln 2 in two parts, a degree-5 polynomial,
// 2^n through the exponent bits; relative error ~1e-7, and 0 below e^-87.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(two_n));
}

// Q4_K's and Q5_K's twelve bytes of 6-bit scales and mins as 8 scale bytes then 8 min bytes
// (ggml's get_scale_min_k4 for j = 0..7), by ggml vec_dot_q4_K's word masks on four 32-bit lanes
// at once. The same masks on words in general registers, stored and read back as one vector,
// waited on a failed store-to-load forward every super-block: Q4_K rows at one token took
// 1.1-1.4x longer (Zen 3). Reads 4 bytes past the 12 (the block's codes follow).
inline __m128i scale_min_bytes_k4(const uint8_t* q) {
  const __m128i u = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));  // words u0, u1, u2
  // lanes: u0 & low6 | (u2 & low4) + ((u0 >> 6) & low2) << 4 | u1 & low6 | ((u2 >> 4) & low4) + ((u1 >> 6) & low2) << 4
  const __m128i low = _mm_and_si128(_mm_srlv_epi32(_mm_shuffle_epi32(u, _MM_SHUFFLE(2, 1, 2, 0)), _mm_setr_epi32(0, 0, 0, 4)),
                                    _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f));
  const __m128i high = _mm_and_si128(_mm_srli_epi32(_mm_shuffle_epi32(u, _MM_SHUFFLE(1, 1, 0, 0)), 6), _mm_setr_epi32(0, 0x03030303, 0, 0x03030303));
  return _mm_or_si128(low, _mm_slli_epi32(high, 4));
}
#endif

// gate[i] = gate[i] / (1 + e^-gate[i]) * up[i]: SwiGLU's product, in place. exp8 saturates at
// e^88, where the quotient is 0 as it should be (gate below -88).
inline void silu_mul(float* gate, const float* up, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 one = _mm256_set1_ps(1.0f);
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    _mm256_storeu_ps(gate + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
  }
#endif
  for (; i < n; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

}  // namespace qwenkit
