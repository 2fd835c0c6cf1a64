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

inline void set_scale(RowScratch& r, int64_t first16, float scale, float minimum) {  // a block of 32
  r.scale16[first16] = r.scale16[first16 + 1] = scale;
  r.min16[first16] = r.min16[first16 + 1] = minimum;
}

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

// Q4_K: per 256 values d, dmin, twelve bytes of 6-bit scales and mins (one per 32 values), then
// 4 x 32 bytes whose low nibbles are values 64i..64i+31 and high nibbles 64i+32..64i+63.
void unpack_q4k_row(const uint8_t* row, int64_t k, RowScratch& r) {
  for (int64_t b = 0; b < k / 256; ++b) {
    const uint8_t* p = row + 144 * b;
    const uint8_t* q = p + 4;
    const float d = f16(p), dmin = f16(p + 2);
    for (int j = 0; j < 8; ++j) {  // ggml's get_scale_min_k4
      const int sc = j < 4 ? q[j] & 63 : (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
      const int m = j < 4 ? q[j + 4] & 63 : (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
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
void unpack_q6k_row(const uint8_t* row, int64_t k, RowScratch& r) {
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

void unpack_row(int kind, bool packed, const uint8_t* row, int64_t k, RowScratch& r) {
  if (packed) {
    unpack_packed_row(kind, row, k, r);
  } else if (kind == Q4_K) {
    unpack_q4k_row(row, k, r);
  } else if (kind == Q6_K) {
    unpack_q6k_row(row, k, r);
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
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x must be float32 [tokens, in_features]");
  TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2, "w must be uint8 [out_features, bytes per row]");
  const Format f = format_of(static_cast<int>(kind));
  x = x.contiguous();
  w = w.contiguous();
  const int64_t tokens = x.size(0), k = x.size(1), n = w.size(0);
  TORCH_CHECK(k % f.block_values == 0 && w.size(1) == k / f.block_values * f.block_bytes,
              "in_features ", k, " does not match ", w.size(1), " bytes per row of GGUF type ", kind);
  TORCH_CHECK(!packed || (packable(static_cast<int>(kind)) && k % 64 == 0), "no packed layout for GGUF type ", kind, " with rows of ", k);
  const QuantizedActivations a = quantize_activations(x.data_ptr<float>(), tokens, k);
  auto y = torch::empty({tokens, n}, x.options());
  float* out = y.data_ptr<float>();
  const uint8_t* rows = w.data_ptr<uint8_t>();
  const int64_t row_bytes = w.size(1);
  parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    RowScratch r(k);
    for (int64_t row = begin; row < end; ++row) {
      unpack_row(static_cast<int>(kind), packed, rows + row * row_bytes, k, r);
      r.compute_offsets(f.zero, k / 16);
      for (int64_t t = 0; t < tokens; ++t)
        out[t * n + row] = row_dot(r, a.q.data() + t * k, a.scale16.data() + t * k / 16, a.sum16.data() + t * k / 16, k);
    }
  });
  return y;
}

// out[N, K] = values of GGUF block rows w: in float32 equal to ggml's dequantize_row_*, in
// bfloat16 those values rounded to nearest even.
void dequantize_into(torch::Tensor w, int64_t kind, torch::Tensor out, bool packed) {
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
      unpack_row(static_cast<int>(kind), packed, rows + row * row_bytes, k, r);
      if (bf16) {
        row_values(r, f.zero, k, out.data_ptr<at::BFloat16>() + row * k);
      } else {
        row_values(r, f.zero, k, out.data_ptr<float>() + row * k);
      }
    }
  });
}

torch::Tensor pack(torch::Tensor w, int64_t kind, int64_t k) { return pack_rows(w, kind, k); }
