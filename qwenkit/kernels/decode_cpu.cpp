// The small operations of a decode step, each one pass over its data. At one token per step
// a layer's non-matmul work is a few KB, so torch's per-op dispatch (an RMSNorm is six ops, a
// paged attention read is two gathers, a mask and SDPA) costs more than the arithmetic.

#include "torch_lite.h"
#include "thread_pool.h"
#include "vec_math.h"
#include <ATen/ops/max.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

using namespace qwenkit;

namespace {

inline float load1(const float* p) { return *p; }
inline float load1(const at::Half* p) { return static_cast<float>(*p); }
inline float load1(const at::BFloat16* p) { return static_cast<float>(*p); }

// sum_d q[d] * key[d], out[d] += p * value[d]: with AVX-512 16 lanes at a time, with AVX2 8, else plain loops
// (which the compiler vectorizes for the CPU it builds for).
#if defined(__AVX512F__)
// 16 values as float32 from a cache row of float32, float16 or bfloat16.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m512 load16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

template <typename T>
inline float dot(const float* q, const T* key, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= n; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), load16(key + d), acc);
  float s = _mm512_reduce_add_ps(acc);
  for (; d < n; ++d) s += q[d] * load1(key + d);
  return s;
}

template <typename T>
inline void add_scaled(float* out, float p, const T* value, int64_t n) {
  int64_t d = 0;
  for (; d + 16 <= n; d += 16) _mm512_storeu_ps(out + d, _mm512_fmadd_ps(_mm512_set1_ps(p), load16(value + d), _mm512_loadu_ps(out + d)));
  for (; d < n; ++d) out[d] += p * load1(value + d);
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// 8 values as float32 from a cache row of float32, float16 or bfloat16.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8(const at::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// Two accumulators: a single chain of multiply-adds waits on its latency (measured on Zen 3: the
// compiler's vectorisation of the plain loop below took 70 us for 14 heads over 150 positions).
template <typename T>
inline float dot(const float* q, const T* key, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= n; d += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(key + d), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), load8(key + d + 8), a1);
  }
  for (; d + 8 <= n; d += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(key + d), a0);
  float s = hsum8(_mm256_add_ps(a0, a1));
  for (; d < n; ++d) s += q[d] * load1(key + d);
  return s;
}

template <typename T>
inline void add_scaled(float* out, float p, const T* value, int64_t n) {
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) _mm256_storeu_ps(out + d, _mm256_fmadd_ps(_mm256_set1_ps(p), load8(value + d), _mm256_loadu_ps(out + d)));
  for (; d < n; ++d) out[d] += p * load1(value + d);
}
#else
template <typename T>
inline float dot(const float* q, const T* key, int64_t n) {
  float lanes[8] = {};  // 8 independent sums: a float reduction the compiler may vectorize
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    for (int i = 0; i < 8; ++i) lanes[i] += q[d + i] * load1(key + d + i);
  float s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
  for (; d < n; ++d) s += q[d] * load1(key + d);
  return s;
}

template <typename T>
inline void add_scaled(float* out, float p, const T* value, int64_t n) {
  for (int64_t d = 0; d < n; ++d) out[d] += p * load1(value + d);
}
#endif

// s[j] = exp(s[j] - top) for j < n, returning their sum: a decode step's softmax over every
// cached position of every head. glibc's scalar exp (~15 ns) made it most of the attention's time
// (measured on Zen 3: 109 us per layer at 60-190 cached positions); with AVX2 and FMA, eight
// lanes at a time through exp8 (vec_math.h).
#if defined(__AVX2__) && defined(__FMA__)
inline float exp_shifted_sum(float* s, int64_t n, float top) {
  const __m256 shift = _mm256_set1_ps(top);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), shift));
    _mm256_storeu_ps(s + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  float total = hsum8(acc);
  if (j < n) {  // the last n - j values through the same exp8, so every score is computed alike
    float tail[8];
    std::fill(tail, tail + 8, top);
    std::copy(s + j, s + n, tail);
    _mm256_storeu_ps(tail, exp8(_mm256_sub_ps(_mm256_loadu_ps(tail), shift)));
    for (int64_t i = 0; i < n - j; ++i) total += (s[j + i] = tail[i]);
  }
  return total;
}
#else
inline float exp_shifted_sum(float* s, int64_t n, float top) {
  float total = 0.0f;
  for (int64_t j = 0; j < n; ++j) total += (s[j] = std::exp(s[j] - top));
  return total;
}
#endif

// The largest of n scores (n >= 1). With AVX-512 16 lanes at a time: std::max_element's one chain
// of scalar maxima was a fifth of the attention's time there.
inline float max_of(const float* s, int64_t n) {
#if defined(__AVX512F__)
  __m512 top = _mm512_set1_ps(s[0]);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(s + j));
  float best = _mm512_reduce_max_ps(top);
  for (; j < n; ++j) best = std::max(best, s[j]);
  return best;
#else
  return *std::max_element(s, s + n);
#endif
}

// Each of `group` rows of n scores (n >= 1) replaced by its softmax.
inline void softmax_rows(float* scores, int64_t group, int64_t n) {
  for (int64_t h = 0; h < group; ++h) {
    float* sh = scores + h * n;
    const float inv = 1.0f / exp_shifted_sum(sh, n, max_of(sh, n));
    for (int64_t j = 0; j < n; ++j) sh[j] *= inv;
  }
}

#if defined(__AVX512F__)
// Cached rows are 16-slot blocks scattered over the pool: each position's row is requested this
// many positions before it is read.
constexpr int64_t AHEAD = 8;

template <typename T>
inline void prefetch_row(const T* row, int64_t values) {
  for (int64_t at = 0; at < values * static_cast<int64_t>(sizeof(T)); at += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(row) + at, 0, 3);
}

// attend_group's two passes for head_dim = 16 * C with AVX-512, the same arithmetic in the same
// order (so the same bits), with each cached key and value row converted to float once for the
// whole group rather than once per query head, and the output rows of H heads kept in registers
// across positions rather than loaded and stored at each one. 16 decode streams of the default
// model (64-value heads, 7 query heads per kv head, float16 cache): the attention was 6% of a step.
template <int C, typename T>
void group_scores(const float* q, int64_t group, const T* k, int64_t row_stride, const int64_t* slots, int64_t first, int64_t n,
                  float scale, float* scores) {
  for (int64_t j = 0; j < n; ++j) {
    const T* key = k + slots[first + j] * row_stride;
    if (j + AHEAD < n) prefetch_row(k + slots[first + j + AHEAD] * row_stride, 16 * C);
    __m512 kv[C];
    for (int c = 0; c < C; ++c) kv[c] = load16(key + 16 * c);
    for (int64_t h = 0; h < group; ++h) {
      const float* qh = q + h * 16 * C;
      __m512 acc = _mm512_setzero_ps();
      for (int c = 0; c < C; ++c) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * c), kv[c], acc);
      scores[h * n + j] = _mm512_reduce_add_ps(acc) * scale;
    }
  }
}

// out[h] = sum_j p[h][j] * value_j for H heads of probabilities p (rows of n).
template <int C, int H, typename T>
void group_values(const float* p, const T* v, int64_t row_stride, const int64_t* slots, int64_t first, int64_t n, float* out,
                  int64_t out_stride) {
  __m512 acc[H][C];
  for (int h = 0; h < H; ++h)
    for (int c = 0; c < C; ++c) acc[h][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const T* value = v + slots[first + j] * row_stride;
    if (j + AHEAD < n) prefetch_row(v + slots[first + j + AHEAD] * row_stride, 16 * C);
    __m512 vv[C];
    for (int c = 0; c < C; ++c) vv[c] = load16(value + 16 * c);
    for (int h = 0; h < H; ++h) {
      const __m512 ph = _mm512_set1_ps(p[h * n + j]);
      for (int c = 0; c < C; ++c) acc[h][c] = _mm512_fmadd_ps(ph, vv[c], acc[h][c]);
    }
  }
  for (int h = 0; h < H; ++h)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + h * out_stride + 16 * c, acc[h][c]);
}

template <int C, typename T>
void group_values_all(const float* p, int64_t group, const T* v, int64_t row_stride, const int64_t* slots, int64_t first, int64_t n,
                      float* out, int64_t out_stride) {
  constexpr int H = C <= 4 ? 4 : 2;  // H * C accumulators and C values stay within the 32 registers
  int64_t h = 0;
  for (; h + H <= group; h += H) group_values<C, H>(p + h * n, v, row_stride, slots, first, n, out + h * out_stride, out_stride);
  const float* rest = p + h * n;
  float* rest_out = out + h * out_stride;
  switch (group - h) {  // the last heads in one pass too
    case 3: group_values<C, 3>(rest, v, row_stride, slots, first, n, rest_out, out_stride); break;
    case 2: group_values<C, 2>(rest, v, row_stride, slots, first, n, rest_out, out_stride); break;
    case 1: group_values<C, 1>(rest, v, row_stride, slots, first, n, rest_out, out_stride); break;
    default: break;
  }
}

template <int C, typename T>
void attend_group16(const float* q, int64_t group, const T* k, const T* v, int64_t row_stride, const int64_t* slots, int64_t first,
                    int64_t n, float scale, float* scores, float* out, int64_t out_stride) {
  group_scores<C>(q, group, k, row_stride, slots, first, n, scale, scores);
  softmax_rows(scores, group, n);
  group_values_all<C>(scores, group, v, row_stride, slots, first, n, out, out_stride);
}
#endif

// Attention of one kv head's group of query heads over one sequence's cached keys and values.
template <typename T>
void attend_group(const float* q, int64_t group, int64_t head_dim, const T* k, const T* v, int64_t row_stride,
                  const int64_t* slots, int64_t first, int64_t last, float scale, float* scores, float* out, int64_t out_stride) {
  const int64_t n = last - first;
#if defined(__AVX512F__)
  if (head_dim == 64) return attend_group16<4>(q, group, k, v, row_stride, slots, first, n, scale, scores, out, out_stride);
  if (head_dim == 128) return attend_group16<8>(q, group, k, v, row_stride, slots, first, n, scale, scores, out, out_stride);
#endif
#if defined(__AVX2__)
  // Rows as cached: the vector loads convert float16 and bfloat16 (converting each row once for
  // the group instead measured 0.92-1.0x with AVX2 on float16).
  auto row_at = [&](const T* base, int64_t j) { return base + slots[first + j] * row_stride; };
#else
  // Without vector conversions a float16 row is converted once for the whole group (the same
  // values): 3.5-4.3x on float16 caches (a bfloat16 one converts by a shift: 0.86-0.94x so).
  thread_local std::vector<float> row;
  row.resize(head_dim);
  auto row_at = [&](const T* base, int64_t j) {
    const T* cached = base + slots[first + j] * row_stride;
    if constexpr (std::is_same_v<T, at::Half>) {
      for (int64_t d = 0; d < head_dim; ++d) row[d] = load1(cached + d);
      return static_cast<const float*>(row.data());
    } else {
      return cached;
    }
  };
#endif
  for (int64_t j = 0; j < n; ++j) {
    const auto* key = row_at(k, j);
    for (int64_t h = 0; h < group; ++h) {
      scores[h * n + j] = dot(q + h * head_dim, key, head_dim) * scale;
    }
  }
  softmax_rows(scores, group, n);
  for (int64_t h = 0; h < group; ++h) std::fill(out + h * out_stride, out + h * out_stride + head_dim, 0.0f);
  for (int64_t j = 0; j < n; ++j) {
    const auto* value = row_at(v, j);
    for (int64_t h = 0; h < group; ++h) {
      add_scaled(out + h * out_stride, scores[h * n + j], value, head_dim);
    }
  }
}

// run(k, v) with the caches' element pointers as float, at::Half or at::BFloat16.
template <typename Run>
void with_cache_rows(torch::Tensor& k_cache, torch::Tensor& v_cache, Run&& run) {
  switch (k_cache.scalar_type()) {
    case at::kFloat: run(k_cache.data_ptr<float>(), v_cache.data_ptr<float>()); break;
    case at::kHalf: run(k_cache.data_ptr<at::Half>(), v_cache.data_ptr<at::Half>()); break;
    case at::kBFloat16: run(k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>()); break;
    default: TORCH_CHECK(false, "the cache must be float32, float16 or bfloat16");
  }
}

}  // namespace

// y = x / rms(x) * weight over the last dimension, for float32 rows.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && weight.dtype() == torch::kFloat32, "rms_norm takes float32");
  x = x.contiguous();
  const int64_t dim = x.size(-1), rows = x.numel() / dim;
  TORCH_CHECK(weight.numel() == dim, "weight has ", weight.numel(), " values for rows of ", dim);
  auto y = torch::empty_like(x);
  const float* xs = x.data_ptr<float>();
  const float* w = weight.contiguous().data_ptr<float>();
  float* ys = y.data_ptr<float>();
  qwenkit::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xs + r * dim;
      double squares = 0.0;  // the reference sums in float32; double only makes it more exact
      for (int64_t i = 0; i < dim; ++i) squares += static_cast<double>(row[i]) * row[i];
      const float inv = 1.0f / std::sqrt(static_cast<float>(squares / dim) + static_cast<float>(eps));
      for (int64_t i = 0; i < dim; ++i) ys[r * dim + i] = row[i] * inv * w[i];
    }
  });
  return y;
}

// One new token per sequence attending over its cached keys and values (paged: slot numbers).
// q [B, Hq, D] float32; k_cache, v_cache [slots, Hkv, D] of one layer (float32, float16 or
// bfloat16); slots [B, Lmax] int64 with lengths [B] valid entries; window > 0 limits a sequence
// to its last `window` positions. Returns [B, Hq * D] float32.
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots,
                                     torch::Tensor lengths, double scale, int64_t window) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && q.dim() == 3, "q must be float32 [batch, heads, head_dim]");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.sizes() == v_cache.sizes() && k_cache.dtype() == v_cache.dtype(),
              "k_cache and v_cache must be [slots, kv_heads, head_dim] of one dtype");
  TORCH_CHECK(k_cache.stride(2) == 1 && k_cache.stride(1) == k_cache.size(2) && v_cache.strides() == k_cache.strides(),
              "the cache rows must be contiguous");
  TORCH_CHECK(slots.dtype() == torch::kInt64 && lengths.dtype() == torch::kInt64, "slots and lengths must be int64");
  q = q.contiguous();
  slots = slots.contiguous();
  lengths = lengths.contiguous();
  const int64_t batch = q.size(0), heads = q.size(1), head_dim = q.size(2), kv_heads = k_cache.size(1);
  TORCH_CHECK(heads % kv_heads == 0 && k_cache.size(2) == head_dim, "query heads must be a multiple of kv heads of the same size");
  TORCH_CHECK(slots.size(0) == batch && lengths.size(0) == batch, "one row of slots and one length per sequence");
  const int64_t group = heads / kv_heads, max_len = slots.size(1), row_stride = k_cache.stride(0);
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) TORCH_CHECK(len[b] >= 1 && len[b] <= max_len, "length out of range");
  auto out = torch::empty({batch, heads * head_dim}, q.options());
  const float* qs = q.data_ptr<float>();
  float* os = out.data_ptr<float>();
  const int64_t* slot_rows = slots.data_ptr<int64_t>();
  auto run = [&](auto* k, auto* v) {
    qwenkit::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(group * max_len);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / kv_heads, kv = task % kv_heads;
        const int64_t first = window > 0 ? std::max<int64_t>(0, len[b] - window) : 0;
        attend_group(qs + (b * heads + kv * group) * head_dim, group, head_dim, k + kv * head_dim, v + kv * head_dim,
                     row_stride, slot_rows + b * max_len, first, len[b], static_cast<float>(scale), scores.data(),
                     os + b * heads * head_dim + kv * group * head_dim, head_dim);
      }
    });
  };
  with_cache_rows(k_cache, v_cache, run);
  return out;
}

// The new tokens' keys and values into their cache slots: k, v float32 [T, Hkv, D]; k_cache,
// v_cache [slots, Hkv, D] of one layer (float32, float16 or bfloat16, rounded to nearest even as
// Tensor.to does); slot_mapping [T] int64. One call instead of two conversions and two scatters.
void store_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slot_mapping) {
  TORCH_CHECK(k.dtype() == torch::kFloat32 && v.dtype() == torch::kFloat32 && k.sizes() == v.sizes(), "k and v must be float32 of one shape");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.sizes() == v_cache.sizes() && k_cache.dtype() == v_cache.dtype() &&
              k_cache.is_contiguous() && v_cache.is_contiguous(), "k_cache and v_cache must be contiguous [slots, kv_heads, head_dim] of one dtype");
  const int64_t tokens = slot_mapping.numel(), row = k_cache.size(1) * k_cache.size(2), slots = k_cache.size(0);
  TORCH_CHECK(slot_mapping.dtype() == torch::kInt64 && k.numel() == tokens * row, "one slot per token, each with a cache row of values");
  k = k.contiguous();
  v = v.contiguous();
  slot_mapping = slot_mapping.contiguous();
  const int64_t* slot = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) TORCH_CHECK(slot[t] >= 0 && slot[t] < slots, "slot ", slot[t], " out of range");
  const float* ks = k.data_ptr<float>();
  const float* vs = v.data_ptr<float>();
  auto run = [&](auto* kc, auto* vc) {
    using T = std::remove_pointer_t<decltype(kc)>;
    qwenkit::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t i = 0; i < row; ++i) {
          kc[slot[t] * row + i] = static_cast<T>(ks[t * row + i]);
          vc[slot[t] * row + i] = static_cast<T>(vs[t * row + i]);
        }
    });
  };
  with_cache_rows(k_cache, v_cache, run);
}

// Rotary position embedding, half-split as Qwen (rotate_half): for x [T, H, D] and cos, sin [T, D],
// out = x * cos + cat(-x[D/2:], x[:D/2]) * sin.
torch::Tensor rotary(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && cos.dtype() == torch::kFloat32 && sin.dtype() == torch::kFloat32,
              "rotary takes float32");
  TORCH_CHECK(x.dim() == 3 && cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == x.size(0) &&
              cos.size(1) == x.size(2) && x.size(2) % 2 == 0, "x must be [T, heads, head_dim] with cos, sin [T, head_dim]");
  x = x.contiguous();
  cos = cos.contiguous();
  sin = sin.contiguous();
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2;
  auto out = torch::empty_like(x);
  const float* xs = x.data_ptr<float>();
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  float* o = out.data_ptr<float>();
  qwenkit::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* ct = c + t * dim;
      const float* st = s + t * dim;
      for (int64_t h = 0; h < heads; ++h) {
        const float* a = xs + (t * heads + h) * dim;
        float* y = o + (t * heads + h) * dim;
        for (int64_t i = 0; i < half; ++i) {
          y[i] = a[i] * ct[i] - a[i + half] * st[i];
          y[i + half] = a[i + half] * ct[i + half] + a[i] * st[i + half];
        }
      }
    }
  });
  return out;
}

#if defined(__AVX2__)
namespace {

// One row's largest value and the first index holding it, as torch.max(x, -1): a NaN anywhere
// makes the result that NaN (the first one). Each lane keeps its largest value and the first
// index where it saw it (strictly greater replaces), then the lanes' winners are compared, ties
// going to the smaller index.
struct RowBest {
  float value;
  int64_t index;
};

inline RowBest scalar_best(const float* row, int64_t begin, int64_t end, RowBest best) {
  for (int64_t j = begin; j < end; ++j)
    if (row[j] > best.value) best = {row[j], j};
  return best;
}

inline RowBest first_nan_or(const float* row, int64_t n, bool has_nan, RowBest best) {
  if (!has_nan) return best;
  int64_t j = 0;
  while (row[j] == row[j]) ++j;
  return {row[j], j};
}

// The lanes' winners compared (ties to the smaller index), then the row's tail from j on, which
// no whole vector covered.
inline RowBest lanes_best(const float* values, const int32_t* indices, int lanes, const float* row, int64_t j, int64_t n,
                          bool lanes_saw_nan) {
  RowBest best{values[0], indices[0]};
  for (int i = 1; i < lanes; ++i)
    if (values[i] > best.value || (values[i] == best.value && indices[i] < best.index)) best = {values[i], indices[i]};
  const bool tail_nan = std::any_of(row + j, row + n, [](float v) { return v != v; });
  return first_nan_or(row, n, lanes_saw_nan || tail_nan, scalar_best(row, j, n, best));
}

RowBest row_best(const float* row, int64_t n) {
#if defined(__AVX512F__)
  constexpr int L = 16;
  if (n >= L) {
    __m512 top = _mm512_loadu_ps(row);
    __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), where = at;
    const __m512i step = _mm512_set1_epi32(L);
    __mmask16 nan = _mm512_cmp_ps_mask(top, top, _CMP_UNORD_Q);
    int64_t j = L;
    for (; j + L <= n && j + L <= (int64_t{1} << 31); j += L) {
      at = _mm512_add_epi32(at, step);
      const __m512 x = _mm512_loadu_ps(row + j);
      const __mmask16 greater = _mm512_cmp_ps_mask(x, top, _CMP_GT_OQ);
      nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
      top = _mm512_mask_mov_ps(top, greater, x);
      where = _mm512_mask_mov_epi32(where, greater, at);
    }
    alignas(64) float values[L];
    alignas(64) int32_t indices[L];
    _mm512_store_ps(values, top);
    _mm512_store_si512(indices, where);
    return lanes_best(values, indices, L, row, j, n, nan != 0);
  }
#elif defined(__AVX2__)
  constexpr int L = 8;
  if (n >= L) {
    __m256 top = _mm256_loadu_ps(row);
    __m256i at = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), where = at;
    const __m256i step = _mm256_set1_epi32(L);
    __m256 nan = _mm256_cmp_ps(top, top, _CMP_UNORD_Q);
    int64_t j = L;
    for (; j + L <= n && j + L <= (int64_t{1} << 31); j += L) {
      at = _mm256_add_epi32(at, step);
      const __m256 x = _mm256_loadu_ps(row + j);
      const __m256 greater = _mm256_cmp_ps(x, top, _CMP_GT_OQ);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
      top = _mm256_blendv_ps(top, x, greater);
      where = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(where), _mm256_castsi256_ps(at), greater));
    }
    alignas(32) float values[L];
    alignas(32) int32_t indices[L];
    _mm256_store_ps(values, top);
    _mm256_store_si256(reinterpret_cast<__m256i*>(indices), where);
    return lanes_best(values, indices, L, row, j, n, _mm256_movemask_ps(nan) != 0);
  }
#endif
  const bool has_nan = std::any_of(row, row + n, [](float v) { return v != v; });  // rows shorter than a vector
  return first_nan_or(row, n, has_nan, scalar_best(row, 1, n, {row[0], 0}));
}

}  // namespace
#endif

// torch.max(x, -1) for float32 rows [R, V]: each row's largest value (NaN if it has one) and the
// first index holding it. A batch of greedy rows samples this: torch's reduction over 16 x 151,936
// logits just written by the output projection took 2.6-2.9 ms of a 46 ms decode step, on one
// thread; this reads the rows with vector compares on the kernels' threads.
std::tuple<torch::Tensor, torch::Tensor> row_max(torch::Tensor x) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) > 0, "row_max takes float32 [rows, values], values > 0");
#if !defined(__AVX2__)
  return at::max(x, -1);  // without vector compares torch's own reduction is the faster one (a scalar loop: 0.66x)
#else
  x = x.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  auto values = torch::empty({rows}, x.options());
  auto indices = torch::empty({rows}, x.options().dtype(torch::kInt64));
  const float* xs = x.data_ptr<float>();
  float* vs = values.data_ptr<float>();
  int64_t* is = indices.data_ptr<int64_t>();
  qwenkit::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const RowBest best = row_best(xs + r * n, n);
      vs[r] = best.value;
      is[r] = best.index;
    }
  });
  return {values, indices};
#endif
}
