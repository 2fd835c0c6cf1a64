// GGUF quantized blocks used in place on x86-64 CPUs with AVX2, FMA and F16C but no AVX-512
// VNNI: the same three functions as ggml_cpu.cpp (rows_matmul, dequantize_into, pack), with the same
// results up to the order float sums are added.
//
// Decoding is bound by the bytes of weights read per token, so rows are read in place through a
// View per block type that yields 64 values at a time as two 32-byte vectors of unsigned codes,
//     w = scale * (code - zero) - min        (zero is per type)
// and multiplied with the int8 activations (gguf_blocks.h) as ggml's AVX2 vec_dot does: VPMADDUBSW
// (unsigned code x signed activation, adjacent pairs summed into int16), then VPMADDWD with ones,
// or with the K-quants' integer sub-block scales, into int32 lanes. VPMADDUBSW saturates at 32767,
// which 4-, 5- and 6-bit codes cannot reach (2 * 63 * 127); Q8_0's 8-bit codes could, so they are
// multiplied as signed values with their signs moved onto the activations (|w| * sign(x, w)).
//   Q4_0, Q4_1, Q5_0, Q5_1 (packed in groups of eight rows) and the K-quants (the file's blocks):
//   eight rows at a time, their values interleaved (one vector: four values of each of the eight
//   rows) so that int16 sums, one VPMADDWD and one float multiply-add serve eight rows at once,
//   for the lanes of one vector are the eight rows' outputs. The groups are stored interleaved;
//   the K-quants (and a weight's last rows % 8 rows) are transposed into a buffer, or with few
//   tokens read row by row with eight rows' integer sums reduced into one vector: the same bits.
//   The K-quants' sub-block scales, and the zero's share, are applied in integers; float work
//   once per 256 values, token and eight rows.
//   Q8_0 (packed): one row at a time, one float multiply-add per 32 values and token.
// The 32-value types' zero and minimum (offset = scale * zero - min per block, times the token's
// scaled sum of codes in the block) are a float sum of their own per token; the K-quants' go
// through the activations' integer sums per group (gguf_blocks.h).
// Rows of 32-value types whose length is not a multiple of 64 (not packed), and dequantize_into
// (whose values must be ggml's bit for bit; not on the decode path), take the generic path of
// gguf_blocks.h.

#include "torch_lite.h"
#include <immintrin.h>

#include <type_traits>
#include <utility>

#include "gguf_blocks.h"
#include "vec_math.h"

using namespace qwenkit;

namespace {

// Q8_0 one row at a time with the row 5 on prefetched: measured on Zen 3 (AVX2, no AVX-512) when
// every type went this way, batch-1 products of the default model's layers from memory at 1
// thread streamed 1.4x faster than with AVX-512's groups of 8 (Q8_0 8.9 -> 15.0 GB/s, Q5_0 7.0 ->
// 9.7, Q4_K/Q6_K 6.0 -> 8.1): reading eight rows' scales before their codes broke the core's
// stream. (The eight-row kernels below read each row as one stream, then work from a buffer.)
constexpr int64_t TILE_ROWS = 1, PREFETCH_AHEAD = 5;
// When the tokens' int8 activations outgrow L1 (16 tokens of a 4864-value row are 78 KB), a
// group of rows meets each tile of 4 tokens in turn, so the tile stays in L1 for the group instead
// of streaming from L2 once per row (the next group's rows are prefetched as it starts). Measured
// on Zen 3, 2 threads, 8-32 tokens (then for the K-quants): Q6_K 896x4864 1.09-1.20x, Q4_K
// 1.05-1.09x; rows of 768-896 values gained nothing measurable, so they keep one row at a time.
// Same bits either way.
constexpr int64_t BATCH_TILE_ROWS = 8, L1_ACTIVATION_BYTES = 32 << 10;

// f(std::integral_constant<int64_t, rows>) with the rows per group for this many tokens of k values.
template <class F>
inline void with_row_group(int64_t tokens, int64_t k, F&& f) {
  if (tokens > 4 && tokens * k > L1_ACTIVATION_BYTES) return f(std::integral_constant<int64_t, BATCH_TILE_ROWS>{});
  return f(std::integral_constant<int64_t, TILE_ROWS>{});
}

// Values 64c .. 64c + 31 and 64c + 32 .. 64c + 63 of a row, one code per byte.
struct Codes64 {
  __m256i lo, hi;
};

inline __m256i load32(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

inline Codes64 split_nibbles(__m256i v) {
  const __m256i m = _mm256_set1_epi8(0x0F);
  return {_mm256_and_si256(v, m), _mm256_and_si256(_mm256_srli_epi16(v, 4), m)};
}

// 0x10 in byte j of lo (hi) where bit j (32 + j) of the 64 bits at qh is set: byte j takes byte
// j / 8 of its half of the word, then keeps its bit j % 8.
inline void add_fifth_bits(const uint8_t* qh, Codes64& q) {
  int64_t word;
  std::memcpy(&word, qh, 8);
  const __m256i bits = _mm256_set1_epi64x(word);
  const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ull)), fifth = _mm256_set1_epi8(0x10);
  const __m256i lo = _mm256_shuffle_epi8(bits, _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
  const __m256i hi = _mm256_shuffle_epi8(bits, _mm256_set_epi64x(0x0707070707070707, 0x0606060606060606, 0x0505050505050505, 0x0404040404040404));
  q.lo = _mm256_or_si256(q.lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(lo, bit), bit), fifth));
  q.hi = _mm256_or_si256(q.hi, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hi, bit), bit), fifth));
}

// ---- The 32-value types, packed (gguf_blocks.h's PackedRow) ----------------------------------

// A packed row as the kernels read it: 64 codes at a time, a float scale (and a minimum) per 32
// values. Q8_0's codes come back signed (the packed q + 128 with its top bit flipped).
template <int KIND>
struct PackedView {
  PackedRow p;
  PackedView(const uint8_t* row, int64_t k) : p(KIND, row, k) {}

  // The scales (minimums: Q4_1, Q5_1 store value = d * q + m) of blocks b .. b + 7. Past a row's
  // last block the lanes hold the next plane's bytes (every plane but the codes is followed by
  // another in the row): the caller ignores them.
  __m256 scales8(int64_t b) const { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.scales + b))); }
  __m256 mins8(int64_t b) const { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.mins + b))); }

  Codes64 codes64(int64_t c) const {
    if constexpr (KIND == Q8_0) {
      const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
      return {_mm256_xor_si256(load32(p.codes + 64 * c), flip), _mm256_xor_si256(load32(p.codes + 64 * c + 32), flip)};
    } else {
      Codes64 q = split_nibbles(load32(p.codes + 32 * c));
      if constexpr (has_fifth(KIND)) add_fifth_bits(p.fifth + 8 * c, q);
      return q;
    }
  }
};

// Software prefetch, one cache line a little ahead of each step of reading, never at or past `end`
// (the thread's last row). Zen 3's hardware prefetcher alone fell behind a row stream read at this
// kernel's pace: the default model's LM head (94 MB of Q5_0 rows from memory) went at 6 GB/s per
// thread where a plain read of it goes at 20 and the same kernel on rows in cache at 11.5; with a
// line requested 4 KB ahead it ran 1.6x faster at 1 thread and 1.8x at 2 (2 KB ahead: 0.8x of
// 4 KB; 8 KB: 0.96x). The distance must be a constant: read from memory, the gain was gone.
// Rows read one after the other are one stream (a line READ_AHEAD past each step's); eight rows
// read side by side (the interleaved K path) request the same place in the next group's rows.
constexpr int64_t READ_AHEAD = 4096;
struct ReadAhead {
  const uint8_t* end;
  void line(const uint8_t* p) const {
    if (p < end) __builtin_prefetch(p, 0, 3);
  }
  void ahead(const uint8_t* p) const { line(p + READ_AHEAD); }
  // Every line of [p, p + bytes).
  void lines(const uint8_t* p, int64_t bytes) const {
    for (int64_t at = 0; at < bytes; at += 64) line(p + at);
  }
};

// ---- Q8_0, one row at a time -------------------------------------------------------------------
// Its signed 8-bit codes leave no room for int16 sums of products (2 * 127 * 127 fills an int16
// lane), so eight rows interleaved would save nothing: a row meets each token as ggml's vec_dot
// does, |w| * sign(x, w) per 32 values into 8 int32 lanes, one float multiply-add per 32 values.

// NT tokens' dot products with one packed Q8_0 row, as 8 partial sums each: each 64-value step of
// the row is decoded once and multiplied with all NT tokens' int8 codes. Each token's sum is
// computed exactly as it would be alone (same operations, same order), so a batch gives each token
// the bits of a batch of one. First, one pass over the row's block scales, 8 at a time, gives each
// token's scale products (weight scale x activation scale, which the loop broadcasts from memory).
// The two 32-value blocks of a step go to two accumulators: one chain of multiply-adds would wait
// on its latency. xs32 has 8 values of padding.
template <int NT>
inline void q8_tile_dot(const PackedView<Q8_0>& v, const int8_t* xq, const float* xs32, int64_t k, float* scales, __m256* sums) {
  const int64_t blocks = k / 32, stride = blocks + 8;
  for (int64_t b = 0; b < blocks; b += 8) {
    const __m256 ws = v.scales8(b);
    for (int j = 0; j < NT; ++j) _mm256_storeu_ps(scales + j * stride + b, _mm256_mul_ps(ws, _mm256_loadu_ps(xs32 + j * blocks + b)));
  }
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc_lo[NT], acc_hi[NT];
  for (int j = 0; j < NT; ++j) acc_lo[j] = acc_hi[j] = _mm256_setzero_ps();
  for (int64_t c = 0; c < k / 64; ++c) {
    const Codes64 w = v.codes64(c);
    const Codes64 w_abs = {_mm256_sign_epi8(w.lo, w.lo), _mm256_sign_epi8(w.hi, w.hi)};
    for (int j = 0; j < NT; ++j) {
      const int8_t* x = xq + j * k + 64 * c;
      const float* scale = scales + j * stride + 2 * c;
      const __m256i lo = _mm256_madd_epi16(_mm256_maddubs_epi16(w_abs.lo, _mm256_sign_epi8(load32(x), w.lo)), ones);
      const __m256i hi = _mm256_madd_epi16(_mm256_maddubs_epi16(w_abs.hi, _mm256_sign_epi8(load32(x + 32), w.hi)), ones);
      acc_lo[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_broadcast_ss(scale), acc_lo[j]);
      acc_hi[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_broadcast_ss(scale + 1), acc_hi[j]);
    }
  }
  for (int j = 0; j < NT; ++j) sums[j] = _mm256_add_ps(acc_lo[j], acc_hi[j]);
}

// y[t, row] for packed Q8_0 rows [begin, end) (k a multiple of 64), tokens 4 at a time.
void rows_dot_q8(const uint8_t* rows, int64_t row_bytes, int64_t k, const QuantizedActivations& a, int64_t tokens, int64_t begin,
                 int64_t end, float* out, int64_t n) {
  const int64_t blocks = k / 32, stride = blocks + 8;
  std::vector<float> scales(4 * stride);
  __m256 sums[4];
  with_row_group(tokens, k, [&](auto ROWS) {
    row_and_token_tiles<4, ROWS, PREFETCH_AHEAD>(
        rows, row_bytes, begin, end, tokens, [](int64_t, int64_t) {},
        [&](int64_t, int64_t row, int64_t t0, int64_t nt) {
          const PackedView<Q8_0> v(rows + row * row_bytes, k);
          with_tile_size(nt, [&](auto NT) { q8_tile_dot<NT>(v, a.q.data() + t0 * k, a.scale32.data() + t0 * blocks, k, scales.data(), sums); });
          for (int64_t j = 0; j < nt; ++j) out[(t0 + j) * n + row] = hsum8(sums[j]);
        });
  });
}

// ---- The unsigned 32-value types (Q4_0, Q4_1, Q5_0, Q5_1), eight rows interleaved -------------
// Eight rows at a time are held (packed in groups at load time, or for a weight's last rows % 8
// rows decoded and transposed into a buffer: 8 bytes per value of a row, 7 KB for 896-value rows)
// where one 32-byte vector holds four consecutive values of each of the eight rows: a token's
// four activation codes, broadcast, meet all eight
// rows in one VPMADDUBSW. A block's eight such products add up in int16 four at a time (codes <
// 32 and |x| <= 127: 4 * 2 * 31 * 127 < 32767), so one VPMADDWD per four, one convert and one
// multiply-add per block give each of the eight rows its block sum: per token and 256
// multiply-adds, 8 VPMADDUBSW + 6 adds + 2 VPMADDWD + an add + a convert + 3 float ops, where one
// row at a time (as Q8_0 goes) needs 8 VPMADDUBSW, 8 VPMADDWD, 8 converts and 8 multiply-adds.
// Eight sums are eight rows' outputs: no horizontal sums. One token alone on the last rows % 8
// rows goes row by row (one_token_by_row) to the same integers and the same float steps. A
// token's result is the same whether it comes alone or in a batch, so batched decoding,
// speculative verification and prefill give each token the bits of a batch of one.

// lane r = the sum of v[r]'s eight lanes.
inline __m256i reduce8(const __m256i* v) {
  __m256i t[4];
  for (int i = 0; i < 4; ++i)
    t[i] = _mm256_add_epi32(_mm256_unpacklo_epi32(v[2 * i], v[2 * i + 1]), _mm256_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
  const __m256i u0 = _mm256_add_epi32(_mm256_unpacklo_epi64(t[0], t[1]), _mm256_unpackhi_epi64(t[0], t[1]));
  const __m256i u1 = _mm256_add_epi32(_mm256_unpacklo_epi64(t[2], t[3]), _mm256_unpackhi_epi64(t[2], t[3]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}

// What every eight-row kernel does around its arithmetic.
// Row r of the group of rows starting at `first` (a last group of fewer repeats its last row).
inline const uint8_t* group_row(const uint8_t* rows, int64_t row_bytes, int64_t first, int64_t count, int64_t r) {
  return rows + (first + std::min(r, count - 1)) * row_bytes;
}

// The views of rows first .. first + 7 (a last group of fewer repeats its last row: its lanes are
// computed and not stored).
template <class View>
inline void group_views(std::vector<View>& views, const uint8_t* rows, int64_t row_bytes, int64_t k, int64_t first, int64_t count) {
  views.clear();
  for (int64_t r = 0; r < 8; ++r) views.emplace_back(group_row(rows, row_bytes, first, count, r), k);
}

// Read-ahead for a group of eight rows read one after the other in steps of 64 values: at step
// c of row r, the line `stride` * c bytes into the row, ahead (stride: the row's bytes per step,
// rounded up, at most a line, so every line of the row is requested).
struct RowStream {
  ReadAhead read;
  const uint8_t* rows;
  int64_t row_bytes, first, count, stride;
  void step(int64_t r, int64_t c) const { read.ahead(group_row(rows, row_bytes, first, count, r) + c * stride); }
};

// Lanes [lo, hi) of eight rows' outputs v to y + lo.
inline void store_lanes(float* y, __m256 v, int64_t lo, int64_t hi) {
  if (lo == 0 && hi == 8) return _mm256_storeu_ps(y, v);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  std::memcpy(y + lo, lanes + lo, (hi - lo) * sizeof(float));
}

// The tokens from which eight K-quant rows are decoded into an interleaved buffer (fewer go row
// by row): measured on Zen 3, 1 thread, both ways giving equal bits, Q4_K is faster interleaved
// from 3 tokens (1.12x there, 0.78x at 1), Q6_K from 4 (0.92x at 3). The 32-value types' last
// rows % 8 rows go row by row only alone (one_token_by_row): at two tokens that form ran
// 0.85-0.9x the interleaved one.
template <class View>
constexpr int64_t interleave_tokens() { return View::MAX_CODE > 31 ? 4 : 3; }

// out[q] = dword q of each of the eight rows in[0..7] (dword r of out[q] from in[r]).
inline void transpose8x32(const __m256i in[8], __m256i out[8]) {
  const __m256i t0 = _mm256_unpacklo_epi32(in[0], in[1]), t1 = _mm256_unpackhi_epi32(in[0], in[1]);
  const __m256i t2 = _mm256_unpacklo_epi32(in[2], in[3]), t3 = _mm256_unpackhi_epi32(in[2], in[3]);
  const __m256i t4 = _mm256_unpacklo_epi32(in[4], in[5]), t5 = _mm256_unpackhi_epi32(in[4], in[5]);
  const __m256i t6 = _mm256_unpacklo_epi32(in[6], in[7]), t7 = _mm256_unpackhi_epi32(in[6], in[7]);
  const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);  // dwords 0 | 4, 1 | 5 of rows 0-3
  const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);  // 2 | 6, 3 | 7
  const __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);  // the same of rows 4-7
  const __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
  out[0] = _mm256_permute2x128_si256(u0, u4, 0x20);
  out[4] = _mm256_permute2x128_si256(u0, u4, 0x31);
  out[1] = _mm256_permute2x128_si256(u1, u5, 0x20);
  out[5] = _mm256_permute2x128_si256(u1, u5, 0x31);
  out[2] = _mm256_permute2x128_si256(u2, u6, 0x20);
  out[6] = _mm256_permute2x128_si256(u2, u6, 0x31);
  out[3] = _mm256_permute2x128_si256(u3, u7, 0x20);
  out[7] = _mm256_permute2x128_si256(u3, u7, 0x31);
}

// Eight rows (row i of `views`) decoded for interleaved_tile: codes as 8 vectors per block, and
// per block the rows' scales and offsets (scale * zero - min) as 8 float lanes.
template <int KIND>
struct InterleavedRows {
  std::vector<__m256i> codes;  // [blocks][8]
  std::vector<__m256i> by_row;  // [8][blocks]: the rows' codes before the transpose
  std::vector<__m256> scales, offsets;  // [blocks]
  // by_row doubles as one_token_by_row's partial sums; codes are only needed for 2 tokens or more
  InterleavedRows(int64_t k, bool interleaved) : codes(interleaved ? k / 32 * 8 : 0), by_row(k / 32 * 8), scales(k / 32 + 8), offsets(k / 32 + 8) {}

  // The rows are unpacked one after the other, each read as one stream, then transposed from the
  // buffer. Unpacking the eight rows side by side made eight streams at once, and the default
  // model's LM head (94 MB of Q5_0 rows, read from memory) ran 1.5x slower.
  void decode_codes(const PackedView<KIND>* views, int64_t k, const RowStream& stream) {
    const int64_t steps = k / 64;
    for (int r = 0; r < 8; ++r) {
      for (int64_t c = 0; c < steps; ++c) {
        stream.step(r, c);
        const Codes64 q = views[r].codes64(c);
        _mm256_store_si256(&by_row[r * 2 * steps + 2 * c], q.lo);
        _mm256_store_si256(&by_row[r * 2 * steps + 2 * c + 1], q.hi);
      }
    }
    __m256i lo[8], hi[8];
    for (int64_t c = 0; c < steps; ++c) {
      for (int r = 0; r < 8; ++r) {
        lo[r] = _mm256_load_si256(&by_row[r * 2 * steps + 2 * c]);
        hi[r] = _mm256_load_si256(&by_row[r * 2 * steps + 2 * c + 1]);
      }
      transpose8x32(lo, &codes[16 * c]);
      transpose8x32(hi, &codes[16 * c + 8]);
    }
  }

  // A block's eight offsets, scale * zero - min (the minimums: Q4_1, Q5_1), both layouts' way.
  static __m256 block_offsets(__m256 scales, __m256 mins) {
    const __m256 offsets = _mm256_mul_ps(scales, _mm256_set1_ps(static_cast<float>(format_of(KIND).zero)));
    if constexpr (!has_min(KIND)) return offsets;
    return _mm256_sub_ps(offsets, mins);
  }

  void decode_scales(const PackedView<KIND>* views, int64_t k) {
    // Eight blocks' scales of each row, transposed into eight blocks' scales of all rows (past
    // the row's last block, the lanes read the next plane: their blocks are never used).
    // The offsets, scale * zero - min, from the transposed values (the same products).
    __m256i s[8], m[8], mins[8];
    for (int64_t b = 0; b < k / 32; b += 8) {
      for (int r = 0; r < 8; ++r) {
        s[r] = _mm256_castps_si256(views[r].scales8(b));
        if constexpr (has_min(KIND)) m[r] = _mm256_castps_si256(views[r].mins8(b));
      }
      transpose8x32(s, reinterpret_cast<__m256i*>(&scales[b]));
      if constexpr (has_min(KIND)) transpose8x32(m, mins);
      for (int i = 0; i < 8; ++i) offsets[b + i] = block_offsets(scales[b + i], _mm256_castsi256_ps(mins[i]));
    }
  }
};

inline __m256i broadcast4(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm256_set1_epi32(v);
}

// Lane r: the int32 sum over 16 values of row r (codes[0..3]: four values of each of eight rows)
// times one token's 16 activation codes at x; the four products add up in int16 first.
inline __m256i sum16_of_eight_rows(const __m256i* codes, const int8_t* x) {
  __m256i s16 = _mm256_maddubs_epi16(codes[0], broadcast4(x));
  s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(codes[1], broadcast4(x + 4)));
  s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(codes[2], broadcast4(x + 8)));
  s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(codes[3], broadcast4(x + 12)));
  return _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
}

// NT tokens against eight decoded rows: result[j] lane r is token j's dot product with row r.
// Four code vectors at a time stay in registers for all NT tokens; the offsets' share goes to an
// accumulator of its own, in a loop of its own.
template <int KIND, int NT>
inline void interleaved_tile(const InterleavedRows<KIND>& w, const int8_t* xq, const float* xs32, const float* xsum32, int64_t k,
                             __m256* result) {
  const int64_t blocks = k / 32;
  __m256 acc[NT], sub[NT];
  for (int j = 0; j < NT; ++j) acc[j] = sub[j] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b)
    for (int j = 0; j < NT; ++j) sub[j] = _mm256_fmadd_ps(w.offsets[b], _mm256_broadcast_ss(xsum32 + j * blocks + b), sub[j]);
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i sum[NT];
    for (int half = 0; half < 2; ++half) {
      __m256i codes[4];
      for (int q = 0; q < 4; ++q) codes[q] = _mm256_load_si256(&w.codes[8 * b + 4 * half + q]);
      for (int j = 0; j < NT; ++j) {
        const __m256i part = sum16_of_eight_rows(codes, xq + j * k + 32 * b + 16 * half);
        sum[j] = half ? _mm256_add_epi32(sum[j], part) : part;
      }
    }
    for (int j = 0; j < NT; ++j) {
      const __m256 scale = _mm256_mul_ps(w.scales[b], _mm256_broadcast_ss(xs32 + j * blocks + b));
      acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[j]), scale, acc[j]);
    }
  }
  for (int j = 0; j < NT; ++j) result[j] = _mm256_sub_ps(acc[j], sub[j]);
}

// One token (decoding) against eight rows, row by row: each row's codes as packed, eight partial
// sums per block, eight rows' partials reduced into one vector per block; then the float work of
// interleaved_tile, in its order, so the same bits. At one token the transpose does not pay: on
// 2 threads the default model's Q5_0 layers and LM head ran 1.3-1.5x slower through it.
// parts: 8 vectors per block.
template <int KIND>
inline __m256 one_token_by_row(const PackedView<KIND>* views, const InterleavedRows<KIND>& w, const int8_t* x, const float* xs32,
                               const float* xsum32, int64_t k, __m256i* parts, const RowStream& stream) {
  const int64_t blocks = k / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int r = 0; r < 8; ++r) {
    for (int64_t c = 0; c < k / 64; ++c) {
      stream.step(r, c);
      const Codes64 q = views[r].codes64(c);
      parts[16 * c + r] = _mm256_madd_epi16(_mm256_maddubs_epi16(q.lo, load32(x + 64 * c)), ones);
      parts[16 * c + 8 + r] = _mm256_madd_epi16(_mm256_maddubs_epi16(q.hi, load32(x + 64 * c + 32)), ones);
    }
  }
  __m256 acc = _mm256_setzero_ps(), sub = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) sub = _mm256_fmadd_ps(w.offsets[b], _mm256_broadcast_ss(xsum32 + b), sub);
  for (int64_t b = 0; b < blocks; ++b) {
    const __m256 scale = _mm256_mul_ps(w.scales[b], _mm256_broadcast_ss(xs32 + b));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(reduce8(&parts[8 * b])), scale, acc);
  }
  return _mm256_sub_ps(acc, sub);
}

// ---- The same types in groups of eight rows (gguf_blocks.h's GroupLayout) ---------------------
// A group is stored as interleaved_tile reads it: a step's 16 vectors come from 8 loads split
// into nibbles, plus (Q5_0, Q5_1) a shift and a mask each for the fifth bits, where a row at a
// time spends a broadcast, two shuffles and two compares per 64 values, then a transpose (or, for
// one token, a reduction of eight rows' partial sums). The integers and the float steps are
// interleaved_tile's, so a group gives the bits that the same rows give in the row layout.

// Fifth bits in place for the vectors 0..7 of a step's half: bit J of each byte to bit 4.
template <int J>
inline __m256i fifth_bit(__m256i bits) {
  const __m256i bit4 = _mm256_set1_epi8(0x10);
  if constexpr (J < 4) return _mm256_and_si256(_mm256_slli_epi16(bits, 4 - J), bit4);
  else return _mm256_and_si256(_mm256_srli_epi16(bits, J - 4), bit4);
}
template <size_t... J>
inline void add_fifth_bits8(__m256i* v, __m256i bits, std::index_sequence<J...>) {
  ((v[J] = _mm256_or_si256(v[J], fifth_bit<J>(bits))), ...);
}

template <int KIND>
struct GroupView {
  const uint8_t* group;
  GroupLayout layout;
  GroupView(const uint8_t* group, int64_t k) : group(group), layout(KIND, k) {}

  // The eight rows' scales of block b, and their offsets (scale * zero - min).
  __m256 scales8(int64_t b) const { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(group + 16 * b))); }
  __m256 offsets8(int64_t b, __m256 scales) const {
    if constexpr (!has_min(KIND)) return InterleavedRows<KIND>::block_offsets(scales, scales);
    const __m256 mins = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(group + layout.mins_at + 16 * b)));
    return InterleavedRows<KIND>::block_offsets(scales, mins);
  }
  const uint8_t* step(int64_t c) const { return group + layout.steps_at + c * layout.step_bytes; }

  // V[0..15] of step c.
  void codes(int64_t c, __m256i* v) const {
    const uint8_t* s = step(c);
    const uint8_t* slots = s + (has_fifth(KIND) ? 64 : 0);
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int j = 0; j < 8; ++j) {
      const __m256i bytes = load32(slots + 32 * j);
      v[j] = _mm256_and_si256(bytes, low);
      v[8 + j] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
    }
    if constexpr (has_fifth(KIND)) {
      add_fifth_bits8(v, load32(s), std::make_index_sequence<8>{});
      add_fifth_bits8(v + 8, load32(s + 32), std::make_index_sequence<8>{});
    }
  }
};

// One token against a group: interleaved_tile<KIND, 1>'s arithmetic on each step as it is decoded.
template <int KIND>
inline __m256 group_one_token(const GroupView<KIND>& w, const int8_t* x, const float* xs32, const float* xsum32, int64_t k,
                              const ReadAhead& read) {
  __m256 acc = _mm256_setzero_ps(), sub = _mm256_setzero_ps();
  read.lines(w.group + READ_AHEAD, w.layout.steps_at);
  for (int64_t c = 0; c < k / 64; ++c) {
    read.lines(w.step(c) + READ_AHEAD, w.layout.step_bytes);
    __m256i v[16];
    w.codes(c, v);
    for (int half_step = 0; half_step < 2; ++half_step) {
      const int64_t b = 2 * c + half_step;
      const __m256i* codes = v + 8 * half_step;
      __m256i sum = _mm256_setzero_si256();
      for (int half = 0; half < 2; ++half) {
        const __m256i part = sum16_of_eight_rows(codes + 4 * half, x + 32 * b + 16 * half);
        sum = half ? _mm256_add_epi32(sum, part) : part;
      }
      const __m256 scales = w.scales8(b);
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(scales, _mm256_broadcast_ss(xs32 + b)), acc);
      sub = _mm256_fmadd_ps(w.offsets8(b, scales), _mm256_broadcast_ss(xsum32 + b), sub);
    }
  }
  return _mm256_sub_ps(acc, sub);
}

// y[t, row] for packed rows [begin, end) of an unsigned 32-value type, eight rows at a time (a
// last group of fewer repeats its last row in the unused lanes), tokens 4 at a time.
template <int KIND>
void rows_dot_interleaved(const uint8_t* rows, int64_t row_bytes, int64_t n_rows, int64_t k, const QuantizedActivations& a,
                          int64_t tokens, int64_t begin, int64_t end, float* out, int64_t n) {
  const int64_t blocks = k / 32, grouped = n_rows / GROUP_ROWS * GROUP_ROWS;
  InterleavedRows<KIND> w(k, tokens > 1);
  const ReadAhead read{rows + std::min(n_rows, (end + GROUP_ROWS - 1) / GROUP_ROWS * GROUP_ROWS) * row_bytes};
  __m256 result[4];
  // NT tokens at a time against the eight rows in w, lanes [lo, hi) stored at column `first`.
  auto tiles = [&](int64_t first, int64_t lo, int64_t hi) {
    for (int64_t t0 = 0; t0 < tokens;) {
      const int64_t nt = tile_tokens(tokens - t0);
      with_tile_size(nt, [&](auto NT) {
        interleaved_tile<KIND, NT>(w, a.q.data() + t0 * k, a.scale32.data() + t0 * blocks, a.sum32.data() + t0 * blocks, k, result);
      });
      for (int64_t j = 0; j < nt; ++j) store_lanes(out + (t0 + j) * n + first, result[j], lo, hi);
      t0 += nt;
    }
  };
  // The groups that hold rows of [begin, end): a group split between two calls (threads) is
  // computed by both, each storing its own rows.
  for (int64_t first = begin / GROUP_ROWS * GROUP_ROWS; first < std::min(end, grouped); first += GROUP_ROWS) {
    const int64_t lo = std::max(begin, first) - first, hi = std::min(end, first + GROUP_ROWS) - first;
    const GroupView<KIND> group(rows + first * row_bytes, k);
    if (tokens == 1) {
      store_lanes(out + first, group_one_token<KIND>(group, a.q.data(), a.scale32.data(), a.sum32.data(), k, read), lo, hi);
      continue;
    }
    // read ahead step by step, as group_one_token: a burst of a group's lines stalled on the
    // core's miss buffers (a sixth of the time at 2 tokens, rows in cache)
    read.lines(group.group + READ_AHEAD, group.layout.steps_at);
    for (int64_t b = 0; b < blocks; ++b) {
      w.scales[b] = group.scales8(b);
      w.offsets[b] = group.offsets8(b, w.scales[b]);
    }
    for (int64_t c = 0; c < k / 64; ++c) {
      read.lines(group.step(c) + READ_AHEAD, group.layout.step_bytes);
      group.codes(c, &w.codes[16 * c]);
    }
    tiles(first, lo, hi);
  }
  // The last n_rows % 8 rows, in the row layout.
  std::vector<PackedView<KIND>> views;
  views.reserve(8);
  for (int64_t first = std::max(begin, grouped); first < end; first += 8) {
    const int64_t count = std::min<int64_t>(8, end - first);
    const RowStream stream{read, rows, row_bytes, first, count, (row_bytes + k / 64 - 1) / (k / 64)};
    group_views(views, rows, row_bytes, k, first, count);
    w.decode_scales(views.data(), k);
    if (tokens == 1) {
      const __m256 y = one_token_by_row<KIND>(views.data(), w, a.q.data(), a.scale32.data(), a.sum32.data(), k, w.by_row.data(), stream);
      store_lanes(out + first, y, 0, count);
      continue;
    }
    w.decode_codes(views.data(), k, stream);
    tiles(first, 0, count);
  }
}

// ---- The K-quants, read in the file's blocks -------------------------------------------------
// Each gives, per 256-value super-block, its integer scales (int16, one per GROUP values) and d,
// and either a stored minimum (HAS_MIN: dmin and an integer min per GROUP, value = d * sc * q -
// dmin * m) or a code offset (ZERO_SHIFT: zero = 1 << ZERO_SHIFT, value = d * sc * (q - zero));
// and step_scales(sc, i): the int16 scales of the super-block's step i's two 32-byte halves as
// VPMADDWD multiplies them (VPMADDUBSW's int16 lane i sums bytes 2i and 2i + 1); MAX_CODE, the
// largest code, bounds how many VPMADDUBSW results may add up in int16.

struct BlockScales {
  alignas(32) int16_t sc[16];
  alignas(32) int16_t mins[16];  // HAS_MIN only; zero past the super-block's groups
  float d, dmin;
};

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// Q4_K's and Q5_K's scales: per 256 values (BYTES per block) d, dmin, then twelve bytes of 6-bit
// scales and mins, one per 32 values.
template <int BYTES>
struct ScalesK4 {
  static constexpr int GROUP = 32, ZERO_SHIFT = 0;
  static constexpr bool HAS_MIN = true;
  static constexpr int MAX_CODE = BYTES == 176 ? 31 : 15;  // Q5_K's fifth bit
  const uint8_t* row;
  explicit ScalesK4(const uint8_t* r) : row(r) {}
  void block_scales(int64_t s, BlockScales& b) const {
    const uint8_t* p = row + BYTES * s;
    const __m256i both = _mm256_cvtepu8_epi16(scale_min_bytes_k4(p + 4));  // 8 scales, 8 mins
    _mm256_store_si256(reinterpret_cast<__m256i*>(b.sc), both);
    _mm256_store_si256(reinterpret_cast<__m256i*>(b.mins), _mm256_permute2x128_si256(both, both, 0x81));  // mins, then zeros
    b.d = _cvtsh_ss(load_u16(p));
    b.dmin = _cvtsh_ss(load_u16(p + 2));
  }
  static void step_scales(const int16_t* sc, int i, __m256i& lo, __m256i& hi) {
    lo = _mm256_set1_epi16(sc[2 * i]);
    hi = _mm256_set1_epi16(sc[2 * i + 1]);
  }
};

// Q4_K: after the scales, 4 x 32 bytes whose low nibbles are values 64i..64i+31 and high nibbles
// 64i+32..64i+63: 32 bytes are exactly one 64-value step.
struct Q4KView : ScalesK4<144> {
  Q4KView(const uint8_t* r, int64_t) : ScalesK4(r) {}
  Codes64 codes64(int64_t c) const { return split_nibbles(load32(row + 144 * (c / 4) + 16 + 32 * (c % 4))); }
};

// Q5_K: Q4_K's nibbles (at 48) with 32 bytes of fifth bits (qh, at 16): bit 2i of qh[l] is value
// 64i + l's, bit 2i + 1 value 64i + 32 + l's.
struct Q5KView : ScalesK4<176> {
  Q5KView(const uint8_t* r, int64_t) : ScalesK4(r) {}
  Codes64 codes64(int64_t c) const {
    const uint8_t* p = row + 176 * (c / 4);
    const int i = static_cast<int>(c % 4);
    Codes64 q = split_nibbles(load32(p + 48 + 32 * i));
    // bit s of every byte to its bit 4: a 16-bit shift right by s, then left by 4, brings no
    // other bit of the pair of bytes to a bit 4
    const __m256i qh = load32(p + 16), bit4 = _mm256_set1_epi8(0x10);
    q.lo = _mm256_or_si256(q.lo, _mm256_and_si256(_mm256_slli_epi16(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * i)), 4), bit4));
    q.hi = _mm256_or_si256(q.hi, _mm256_and_si256(_mm256_slli_epi16(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * i + 1)), 4), bit4));
    return q;
  }
};

// The K-quants with a scale per 16 values: step i covers the groups 4i .. 4i + 3, its low half
// groups 4i and 4i + 1 (int16 lanes 0-7 and 8-15), its high half 4i + 2 and 4i + 3.
struct Scales16 {
  static constexpr int GROUP = 16;
  static void step_scales(const int16_t* sc, int i, __m256i& lo, __m256i& hi) {
    const __m256i pick = _mm256_set_epi64x(0x0302030203020302, 0x0302030203020302, 0x0100010001000100, 0x0100010001000100);
    int32_t pairs[2];
    std::memcpy(pairs, sc + 4 * i, 8);
    lo = _mm256_shuffle_epi8(_mm256_set1_epi32(pairs[0]), pick);
    hi = _mm256_shuffle_epi8(_mm256_set1_epi32(pairs[1]), pick);
  }
};

// Q2_K's and Q3_K's 2-bit planes: per 128 values, 32 bytes q whose bit pairs 0, 1, 2, 3 are
// values l, 32 + l, 64 + l, 96 + l; a 64-value step is two planes of one half.
inline Codes64 two_bit_planes(const uint8_t* qs, int64_t c) {
  const int i = static_cast<int>(c % 4), plane = 2 * (i % 2);
  const __m256i q = load32(qs + 32 * (i / 2)), m = _mm256_set1_epi8(3);
  // 16-bit shifts by at most 6 bring no bit of the other byte into a byte's low 2 bits
  return {_mm256_and_si256(_mm256_srl_epi16(q, _mm_cvtsi32_si128(2 * plane)), m),
          _mm256_and_si256(_mm256_srl_epi16(q, _mm_cvtsi32_si128(2 * plane + 2)), m)};
}

// Q2_K: sixteen bytes of 4-bit scale and 4-bit min per 16 values, qs[64], d, dmin:
// value = d * (sc & 15) * q - dmin * (sc >> 4).
struct Q2KView : Scales16 {
  static constexpr int ZERO_SHIFT = 0;
  static constexpr bool HAS_MIN = true;
  static constexpr int MAX_CODE = 3;
  const uint8_t* row;
  Q2KView(const uint8_t* r, int64_t) : row(r) {}
  void block_scales(int64_t s, BlockScales& b) const {
    const uint8_t* p = row + 84 * s;
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), low = _mm_set1_epi8(0x0F);
    _mm256_store_si256(reinterpret_cast<__m256i*>(b.sc), _mm256_cvtepu8_epi16(_mm_and_si128(bytes, low)));
    _mm256_store_si256(reinterpret_cast<__m256i*>(b.mins), _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(bytes, 4), low)));
    b.d = _cvtsh_ss(load_u16(p + 80));
    b.dmin = _cvtsh_ss(load_u16(p + 82));
  }
  Codes64 codes64(int64_t c) const { return two_bit_planes(row + 84 * (c / 4) + 16, c); }
};

// Q3_K: hmask[32], qs[64], twelve bytes of sixteen 6-bit scales (stored + 32), d; codes are the
// 2-bit planes with a third bit from hmask (bit 4 * half + plane of hmask[l]), zero 4.
struct Q3KView : Scales16 {
  static constexpr int ZERO_SHIFT = 2;
  static constexpr bool HAS_MIN = false;
  static constexpr int MAX_CODE = 7;
  const uint8_t* row;
  Q3KView(const uint8_t* r, int64_t) : row(r) {}
  void block_scales(int64_t s, BlockScales& b) const {
    const uint8_t* p = row + 110 * s;
    const uint8_t* sb = p + 96;
    b.d = _cvtsh_ss(load_u16(p + 108));
    for (int j = 0; j < 16; ++j) {  // ggml's kmask unpacking of the 6-bit scales
      const int low = j < 8 ? sb[j] & 0xF : sb[j - 8] >> 4;
      const int high = (sb[8 + j % 4] >> (2 * (j / 4))) & 3;
      b.sc[j] = static_cast<int16_t>((low | (high << 4)) - 32);
    }
  }
  Codes64 codes64(int64_t c) const {
    const uint8_t* p = row + 110 * (c / 4);
    Codes64 q = two_bit_planes(p + 32, c);
    const int i = static_cast<int>(c % 4), bit = 4 * (i / 2) + 2 * (i % 2);
    // bit s of every byte of hmask to its bit 2, as Q5KView's fifth bits
    const __m256i hm = load32(p), third = _mm256_set1_epi8(0x04);
    q.lo = _mm256_or_si256(q.lo, _mm256_and_si256(_mm256_slli_epi16(_mm256_srl_epi16(hm, _mm_cvtsi32_si128(bit)), 2), third));
    q.hi = _mm256_or_si256(q.hi, _mm256_and_si256(_mm256_slli_epi16(_mm256_srl_epi16(hm, _mm_cvtsi32_si128(bit + 1)), 2), third));
    return q;
  }
};

// Q6_K: per 256 values ql[128], qh[64], sixteen int8 scales (one per 16 values) and d; codes are
// 6 bits with zero 32. Each half of 128 values is two 64-value steps: (low nibbles of ql[0:32],
// ql[32:64]) then (their high nibbles), with qh's bit pairs.
struct Q6KView : Scales16 {
  static constexpr int ZERO_SHIFT = 5;
  static constexpr bool HAS_MIN = false;
  static constexpr int MAX_CODE = 63;
  const uint8_t* row;
  Q6KView(const uint8_t* r, int64_t) : row(r) {}
  void block_scales(int64_t s, BlockScales& b) const {
    const uint8_t* p = row + 210 * s;
    _mm256_store_si256(reinterpret_cast<__m256i*>(b.sc), _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 192))));
    b.d = _cvtsh_ss(load_u16(p + 208));
  }
  Codes64 codes64(int64_t c) const {
    const uint8_t* p = row + 210 * (c / 4);
    const int half = static_cast<int>((c % 4) / 2);
    const __m256i a = load32(p + 64 * half), b = load32(p + 64 * half + 32), h = load32(p + 128 + 32 * half);
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x30);
    if (c % 2) {
      return {_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), m4), _mm256_and_si256(h, m2)),
              _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b, 4), m4), _mm256_and_si256(_mm256_srli_epi16(h, 2), m2))};
    }
    return {_mm256_or_si256(_mm256_and_si256(a, m4), _mm256_and_si256(_mm256_slli_epi16(h, 4), m2)),
            _mm256_or_si256(_mm256_and_si256(b, m4), _mm256_and_si256(_mm256_slli_epi16(h, 2), m2))};
  }
};

// K-quant rows eight at a time. What a token's result is made of, whichever way it is computed:
// per 256-value super-block s and row r, the exact integers
//     sum_r = sum over groups g of sc[r, g] * (codes . activation codes)[g] - (the zero's share)
//     min_r = sum over groups g of m[r, g] * (the token's sum of activation codes)[g]   (HAS_MIN)
// and then, with the eight rows in the lanes of one vector,
//     acc += float(sum) * (d[r] * xd);  acc_min += float(min) * (dmin[r] * xd);  y = acc - acc_min
// The integers can be reached two ways, and the result is the same bits either way:
// - row by row (few tokens): each row's codes as the file stores them, eight partial sums per
//   row, then eight rows' partials reduced into one vector (k_row_partials, reduce8);
// - interleaved (interleave_tokens() or more): eight rows' codes transposed into a buffer, four
//   values of each row per vector as in rows_dot_interleaved, so a token's four activation codes
//   meet eight rows per VPMADDUBSW and products add up in int16 before one VPMADDWD with the
//   group's scales (k_interleaved). Per token and 256 multiply-adds of Q4_K: 8 VPMADDUBSW, 7
//   adds, a VPMADDWD and an add, where row by row needs 8, 8 and 8. The transpose costs about
//   as much as one token's products, paid once for all the tokens.
// Float work is one convert and one multiply-add (two with a minimum) per token, super-block and
// eight rows, where one row at a time needed them per row.

// Eight rows' scales of one super-block, in the lanes k_interleaved and the float step read.
struct GroupScales {
  __m256 d, dmin;
  __m256i pairs[8];      // dword p, lane r: row r's (sc[2p], sc[2p + 1]), for the zero's share
  __m256i min_pairs[8];  // the same for the minima (HAS_MIN)
  __m256i dup[16];       // group g, lane r: row r's sc[g] in both int16 halves
};

template <class View>
inline void group_scales(const BlockScales* b, GroupScales& g) {
  alignas(32) float d[8], dmin[8];
  __m256i sc[8], mins[8];
  for (int r = 0; r < 8; ++r) {
    d[r] = b[r].d;
    dmin[r] = b[r].dmin;
    sc[r] = load32(b[r].sc);
    mins[r] = load32(b[r].mins);
  }
  g.d = _mm256_load_ps(d);
  g.dmin = _mm256_load_ps(dmin);
  if constexpr (View::ZERO_SHIFT > 0) transpose8x32(sc, g.pairs);
  if constexpr (View::HAS_MIN) transpose8x32(mins, g.min_pairs);
  const __m256i low = _mm256_set1_epi32(0xFFFF);
  for (int half = 0; half < 256 / View::GROUP / 8; ++half) {
    __m256i dup[8];
    for (int r = 0; r < 8; ++r) {
      const __m256i v = _mm256_cvtepi16_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(b[r].sc + 8 * half)));
      dup[r] = _mm256_or_si256(_mm256_and_si256(v, low), _mm256_slli_epi32(v, 16));
    }
    transpose8x32(dup, &g.dup[8 * half]);
  }
}

// The float step of one token and super-block (the same for both ways of reaching the integers).
template <class View>
inline void k_float_step(__m256 d, __m256 dmin, __m256i sum, __m256i min, float xd, __m256& acc, __m256& acc_min) {
  acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(d, _mm256_set1_ps(xd)), acc);
  if constexpr (View::HAS_MIN) acc_min = _mm256_fmadd_ps(_mm256_cvtepi32_ps(min), _mm256_mul_ps(dmin, _mm256_set1_ps(xd)), acc_min);
}

// Row by row: NT tokens' partial sums (8 lanes) of one row's super-block s.
template <class View, int NT>
inline void k_row_partials(const View& v, const BlockScales& b, const int8_t* xq, const int16_t* xcodes, int64_t k, int64_t s,
                           __m256i* sum, __m256i* min) {
  const int64_t groups = k / View::GROUP, per_block = 256 / View::GROUP;
  for (int j = 0; j < NT; ++j) sum[j] = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    const int64_t c = 4 * s + i;
    const Codes64 w = v.codes64(c);
    __m256i scale_lo, scale_hi;
    View::step_scales(b.sc, i, scale_lo, scale_hi);
    for (int j = 0; j < NT; ++j) {
      const int8_t* x = xq + j * k + 64 * c;
      const __m256i lo = _mm256_madd_epi16(_mm256_maddubs_epi16(w.lo, load32(x)), scale_lo);
      const __m256i hi = _mm256_madd_epi16(_mm256_maddubs_epi16(w.hi, load32(x + 32)), scale_hi);
      sum[j] = _mm256_add_epi32(sum[j], _mm256_add_epi32(lo, hi));
    }
  }
  for (int j = 0; j < NT; ++j) {
    const __m256i group_sums = load32(xcodes + j * groups + per_block * s);
    if constexpr (View::ZERO_SHIFT > 0)
      sum[j] = _mm256_sub_epi32(sum[j], _mm256_slli_epi32(_mm256_madd_epi16(load32(b.sc), group_sums), View::ZERO_SHIFT));
    if constexpr (View::HAS_MIN) min[j] = _mm256_madd_epi16(load32(b.mins), group_sums);
  }
}

// Eight rows' codes of super-block s, transposed: vector 16 i + 8 h + q holds values 4q .. 4q + 3
// of half h (32 values) of step i (64 values) of each row.
template <class View>
inline void k_decode(const View* views, int64_t s, __m256i* codes) {
  __m256i lo[8], hi[8];
  for (int i = 0; i < 4; ++i) {
    for (int r = 0; r < 8; ++r) {
      const Codes64 q = views[r].codes64(4 * s + i);
      lo[r] = q.lo;
      hi[r] = q.hi;
    }
    transpose8x32(lo, codes + 16 * i);
    transpose8x32(hi, codes + 16 * i + 8);
  }
}

// Interleaved: NT tokens' integers for eight decoded rows of one super-block (x: token 0's codes
// of that super-block, the next token's k further on; group_sums likewise, `groups` apart). Four
// code vectors at a time stay in registers for all NT tokens.
template <class View, int NT>
inline void k_interleaved(const __m256i* codes, const GroupScales& g, const int8_t* x, int64_t k, const int16_t* group_sums,
                          int64_t groups, __m256i* sum, __m256i* min) {
  // VPMADDUBSW lanes add up in int16 before VPMADDWD: each is at most 2 * MAX_CODE * 127.
  constexpr int PER_GROUP = View::GROUP / 4, CHUNK_LIMIT = 32767 / (2 * View::MAX_CODE * 127);
  constexpr int CHUNK = PER_GROUP < CHUNK_LIMIT ? PER_GROUP : CHUNK_LIMIT;
  constexpr int LOADED = CHUNK < 4 ? CHUNK : 4;  // code vectors held for all tokens
  static_assert(PER_GROUP % CHUNK == 0 && CHUNK % LOADED == 0, "a group's products split into equal chunks");
  for (int j = 0; j < NT; ++j) sum[j] = _mm256_setzero_si256();
  for (int group = 0; group < 256 / View::GROUP; ++group) {
    for (int q0 = 0; q0 < PER_GROUP; q0 += CHUNK) {
      __m256i s16[NT];
      for (int j = 0; j < NT; ++j) s16[j] = _mm256_setzero_si256();
      for (int q1 = q0; q1 < q0 + CHUNK; q1 += LOADED) {
        const int at = group * PER_GROUP + q1;  // vector `at` holds values 4 at .. 4 at + 3
        __m256i w[LOADED];
        for (int q = 0; q < LOADED; ++q) w[q] = _mm256_load_si256(codes + at + q);
        for (int j = 0; j < NT; ++j)
          for (int q = 0; q < LOADED; ++q)
            s16[j] = _mm256_add_epi16(s16[j], _mm256_maddubs_epi16(w[q], broadcast4(x + j * k + 4 * (at + q))));
      }
      for (int j = 0; j < NT; ++j) sum[j] = _mm256_add_epi32(sum[j], _mm256_madd_epi16(s16[j], g.dup[group]));
    }
  }
  constexpr int PAIRS = 256 / View::GROUP / 2;
  for (int j = 0; j < NT; ++j) {
    const int8_t* pairs = reinterpret_cast<const int8_t*>(group_sums + j * groups);
    if constexpr (View::ZERO_SHIFT > 0) {
      __m256i zero = _mm256_setzero_si256();
      for (int p = 0; p < PAIRS; ++p) zero = _mm256_add_epi32(zero, _mm256_madd_epi16(g.pairs[p], broadcast4(pairs + 4 * p)));
      sum[j] = _mm256_sub_epi32(sum[j], _mm256_slli_epi32(zero, View::ZERO_SHIFT));
    }
    if constexpr (View::HAS_MIN) {
      min[j] = _mm256_setzero_si256();
      for (int p = 0; p < PAIRS; ++p) min[j] = _mm256_add_epi32(min[j], _mm256_madd_epi16(g.min_pairs[p], broadcast4(pairs + 4 * p)));
    }
  }
}

// y[t, row] for K-quant rows [begin, end), eight at a time (a last group of fewer repeats its
// last row in the unused lanes), super-block by super-block.
template <class View>
void rows_dot_k(const uint8_t* rows, int64_t row_bytes, int64_t k, const QuantizedActivations& a, int64_t tokens, int64_t begin,
                int64_t end, float* out, int64_t n) {
  const int16_t* xcodes = View::GROUP == 32 ? a.codes32.data() : a.codes16.data();
  const int64_t supers = k / 256, groups = k / View::GROUP, groups16 = k / 16, per_block = 256 / View::GROUP;
  const bool interleaved = tokens >= interleave_tokens<View>();
  const int64_t super_bytes = row_bytes / supers;
  const ReadAhead read{rows + end * row_bytes};
  std::vector<__m256i> codes(interleaved ? 64 : 0);
  // Row by row: each row's partial sums per super-block and token of a tile, [super][token][row].
  std::vector<__m256i> parts(interleaved ? 0 : supers * 4 * 8), min_parts(interleaved || !View::HAS_MIN ? 0 : supers * 4 * 8);
  std::vector<float> d(interleaved ? 0 : 16 * supers);  // [super][d of 8 rows, dmin of 8 rows]
  std::vector<__m256> acc(2 * tokens);
  std::vector<View> views;
  views.reserve(8);
  GroupScales g;
  for (int64_t first = begin; first < end; first += 8) {
    const int64_t count = std::min<int64_t>(8, end - first);
    group_views(views, rows, row_bytes, k, first, count);
    std::fill(acc.begin(), acc.end(), _mm256_setzero_ps());
    if (interleaved) {
      for (int64_t s = 0; s < supers; ++s) {
        BlockScales b[8]{};  // Q3_K and Q6_K leave mins and dmin unset
        for (int r = 0; r < 8; ++r) {
          read.lines(group_row(rows, row_bytes, first, count, r) + 8 * row_bytes + s * super_bytes, super_bytes);
          views[r].block_scales(s, b[r]);
        }
        group_scales<View>(b, g);
        k_decode(views.data(), s, codes.data());
        for (int64_t t0 = 0; t0 < tokens;) {
          const int64_t nt = tile_tokens(tokens - t0);
          with_tile_size(nt, [&](auto NT) {
            __m256i sum[NT], min[NT];
            k_interleaved<View, NT>(codes.data(), g, a.q.data() + t0 * k + 256 * s, k, xcodes + t0 * groups + per_block * s, groups, sum, min);
            for (int j = 0; j < NT; ++j) {
              if constexpr (!View::HAS_MIN) min[j] = _mm256_setzero_si256();
              k_float_step<View>(g.d, g.dmin, sum[j], min[j], a.scale16[(t0 + j) * groups16 + 16 * s], acc[2 * (t0 + j)], acc[2 * (t0 + j) + 1]);
            }
          });
          t0 += nt;
        }
      }
    } else {
      // Each row streams through its super-blocks as the file stores them (one read stream).
      for (int64_t t0 = 0; t0 < tokens;) {
        const int64_t nt = tile_tokens(tokens - t0);
        with_tile_size(nt, [&](auto NT) {
          for (int r = 0; r < 8; ++r) {
            const uint8_t* row = group_row(rows, row_bytes, first, count, r);
            for (int64_t s = 0; s < supers; ++s) {
              if (t0 == 0) read.lines(row + s * super_bytes + READ_AHEAD, super_bytes);
              BlockScales b;
              views[r].block_scales(s, b);
              d[16 * s + r] = b.d;
              if constexpr (View::HAS_MIN) d[16 * s + 8 + r] = b.dmin;
              __m256i sum[NT], min[NT];
              k_row_partials<View, NT>(views[r], b, a.q.data() + t0 * k, xcodes + t0 * groups, k, s, sum, min);
              for (int j = 0; j < NT; ++j) {
                parts[(s * 4 + j) * 8 + r] = sum[j];
                if constexpr (View::HAS_MIN) min_parts[(s * 4 + j) * 8 + r] = min[j];
              }
            }
          }
          for (int64_t s = 0; s < supers; ++s) {
            const __m256 ds = _mm256_loadu_ps(&d[16 * s]), dmins = _mm256_loadu_ps(&d[16 * s + 8]);
            for (int j = 0; j < NT; ++j) {
              const __m256i min = View::HAS_MIN ? reduce8(&min_parts[(s * 4 + j) * 8]) : _mm256_setzero_si256();
              k_float_step<View>(ds, dmins, reduce8(&parts[(s * 4 + j) * 8]), min, a.scale16[(t0 + j) * groups16 + 16 * s],
                                 acc[2 * (t0 + j)], acc[2 * (t0 + j) + 1]);
            }
          }
        });
        t0 += nt;
      }
    }
    for (int64_t t = 0; t < tokens; ++t)
      store_lanes(out + t * n + first, View::HAS_MIN ? _mm256_sub_ps(acc[2 * t], acc[2 * t + 1]) : acc[2 * t], 0, count);
  }
}

}  // namespace

void qwenkit::rows_matmul(int kind, bool packed, const uint8_t* rows, int64_t row_bytes, int64_t n_rows, int64_t k, const QuantizedActivations& a,
                          int64_t tokens, int64_t begin, int64_t end, float* out, int64_t ldo) {
  if (tokens == 0) return;  // no output to write (the eight-row paths would still decode rows)
  if (packed) {
    dispatch_packed(kind, [&](auto kind_constant) {
      constexpr int KIND = decltype(kind_constant)::value;
      if constexpr (KIND == Q8_0) {
        rows_dot_q8(rows, row_bytes, k, a, tokens, begin, end, out, ldo);
      } else {
        rows_dot_interleaved<KIND>(rows, row_bytes, n_rows, k, a, tokens, begin, end, out, ldo);
      }
    });
  } else if (kind == Q2_K) {
    rows_dot_k<Q2KView>(rows, row_bytes, k, a, tokens, begin, end, out, ldo);
  } else if (kind == Q3_K) {
    rows_dot_k<Q3KView>(rows, row_bytes, k, a, tokens, begin, end, out, ldo);
  } else if (kind == Q4_K) {
    rows_dot_k<Q4KView>(rows, row_bytes, k, a, tokens, begin, end, out, ldo);
  } else if (kind == Q5_K) {
    rows_dot_k<Q5KView>(rows, row_bytes, k, a, tokens, begin, end, out, ldo);
  } else if (kind == Q6_K) {
    rows_dot_k<Q6KView>(rows, row_bytes, k, a, tokens, begin, end, out, ldo);
  } else {
    unpacked_rows_dot(rows, row_bytes, begin, end, k, format_of(kind).zero, a, tokens, out, ldo,
                      [&](const uint8_t* row, int64_t k, RowScratch& r) { unpack_any_row(kind, false, row, k, r); }, scratch_row_dot);
  }
}

// out[N, K] = values of GGUF block rows w: in float32 equal to ggml's dequantize_row_*, in
// bfloat16 those values rounded to nearest even (the generic path: not on the decode path).
void dequantize_into(torch::Tensor w, int64_t kind, torch::Tensor out, bool packed) {
  w = w.contiguous();
  const uint8_t* rows = w.data_ptr<uint8_t>();
  const int64_t row_bytes = w.size(1), n = w.size(0), group = qwenkit::packed_group_rows(kind);
  dequantize_rows(
      w, kind, out,
      [&](const uint8_t* row, int64_t k, RowScratch& r) {
        unpack_stored_row(static_cast<int>(kind), packed, group, rows, row_bytes, n, (row - rows) / row_bytes, k, r);
      },
      [](const RowScratch& r, int zero, int64_t k, auto* values) { scratch_row_values(r, zero, k, values); });
}

int64_t qwenkit::packed_group_rows(int64_t kind) { return groupable(static_cast<int>(kind)) ? GROUP_ROWS : 1; }

torch::Tensor pack(torch::Tensor w, int64_t kind, int64_t k) { return pack_rows(w, kind, k, qwenkit::packed_group_rows(kind)); }
