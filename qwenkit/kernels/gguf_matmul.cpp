// Products of float32 activations with GGUF block rows, the same for every build: the
// activations are quantized once, then the rows are spread over the kernels' threads in one
// pass, and each build's rows_matmul (gguf_blocks.h) does the arithmetic.
//
// matmul_group takes the weights that read one input: a layer's q, k and v, or its gate and up
// (then returning SwiGLU's silu(gate) * up, computed by each thread on the rows it just wrote).
// At one token a projection of the 0.5B model takes 10-60 us of work, and each separate call
// would pay again for the Python dispatch, the activations' quantization, waking the threads and
// the elementwise ops after it.

#include <torch/extension.h>

#include "gguf_blocks.h"
#include "vec_math.h"

using namespace qwenkit;

namespace {

// One weight of a product: its rows, where its outputs go, and the activations it reads.
struct Part {
  int kind;
  bool packed;
  const uint8_t* rows;
  int64_t row_bytes, n;
  const float* bias;  // [n] or null
  const QuantizedActivations* a;
  float* out;  // [T, ldo]
  int64_t ldo;

  // Rows [begin, end) for every token, bias included.
  void run(int64_t k, int64_t tokens, int64_t begin, int64_t end) const {
    rows_matmul(kind, packed, rows, row_bytes, k, *a, tokens, begin, end, out, ldo);
    if (bias)
      for (int64_t t = 0; t < tokens; ++t)
        for (int64_t r = begin; r < end; ++r) out[t * ldo + r] += bias[r];
  }
};

// The quantized activations each weight reads: one quantization per activation block size
// (32 for the 32-value types, 256 for the K-quants).
struct ActivationsBySize {
  QuantizedActivations by32, by256;
  bool has32 = false, has256 = false;
  const QuantizedActivations* get(const float* x, int64_t tokens, int64_t k, int kind) {
    const int64_t block = activation_block(kind);
    bool& has = block == 32 ? has32 : has256;
    QuantizedActivations& a = block == 32 ? by32 : by256;
    if (!has) {
      a = quantize_activations(x, tokens, k, block);
      has = true;
    }
    return &a;
  }
};

}  // namespace

// y[t, n] = sum_k x[t, k] * w[n, k] for GGUF block rows w (uint8 [N, bytes per row]).
torch::Tensor matmul(torch::Tensor x, torch::Tensor w, int64_t kind, bool packed) {
  check_matmul_args(x, w, kind, packed);
  x = x.contiguous();
  w = w.contiguous();
  const int64_t tokens = x.size(0), k = x.size(1), n = w.size(0);
  const QuantizedActivations a = quantize_activations(x.data_ptr<float>(), tokens, k, activation_block(static_cast<int>(kind)));
  auto y = torch::empty({tokens, n}, x.options());
  const Part part{static_cast<int>(kind), packed, w.data_ptr<uint8_t>(), w.size(1), n, nullptr, &a, y.data_ptr<float>(), n};
  parallel_for(0, n, 16, [&](int64_t begin, int64_t end) { part.run(k, tokens, begin, end); });
  return y;
}

// x @ w.T (+ bias) for each weight of ws (kinds, packed as matmul's; an empty bias is none), in
// one pass of the threads: a list of [T, N_i]. silu_mul: ws is (gate, up) of equal shape, and
// the result is the one tensor silu(x @ gate.T) * (x @ up.T).
std::vector<torch::Tensor> matmul_group(torch::Tensor x, std::vector<torch::Tensor> ws, std::vector<int64_t> kinds,
                                        std::vector<bool> packed, std::vector<torch::Tensor> biases, bool silu_mul) {
  const size_t count = ws.size();
  TORCH_CHECK(count > 0 && kinds.size() == count && packed.size() == count && biases.size() == count,
              "one kind, packed flag and bias (empty for none) per weight");
  for (size_t i = 0; i < count; ++i) {
    check_matmul_args(x, ws[i], kinds[i], packed[i]);
    ws[i] = ws[i].contiguous();
    TORCH_CHECK(biases[i].numel() == 0 || (biases[i].dtype() == torch::kFloat32 && biases[i].numel() == ws[i].size(0)),
                "a bias must be float32 with one value per output row");
    biases[i] = biases[i].contiguous();
  }
  TORCH_CHECK(!silu_mul || (count == 2 && ws[0].size(0) == ws[1].size(0)), "silu_mul takes a gate and an up weight of equal shape");
  x = x.contiguous();
  const int64_t tokens = x.size(0), k = x.size(1);
  ActivationsBySize activations;
  std::vector<torch::Tensor> outs;
  std::vector<Part> parts;
  for (size_t i = 0; i < count; ++i) {
    const int64_t n = ws[i].size(0);
    outs.push_back(torch::empty({tokens, n}, x.options()));
    parts.push_back({static_cast<int>(kinds[i]), packed[i], ws[i].data_ptr<uint8_t>(), ws[i].size(1), n,
                     biases[i].numel() ? biases[i].data_ptr<float>() : nullptr,
                     activations.get(x.data_ptr<float>(), tokens, k, static_cast<int>(kinds[i])), outs[i].data_ptr<float>(), n});
  }
  if (silu_mul) {
    const int64_t n = parts[0].n;
    float* gate = outs[0].data_ptr<float>();
    const float* up = outs[1].data_ptr<float>();
    parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      parts[0].run(k, tokens, begin, end);
      parts[1].run(k, tokens, begin, end);
      for (int64_t t = 0; t < tokens; ++t) qwenkit::silu_mul(gate + t * n + begin, up + t * n + begin, end - begin);
    });
    return {outs[0]};
  }
  int64_t total = 0;
  for (const Part& p : parts) total += p.n;
  // The weights' rows as one range, split evenly over the threads.
  parallel_for(0, total, 16, [&](int64_t begin, int64_t end) {
    int64_t first = 0;
    for (const Part& p : parts) {
      const int64_t lo = std::max(begin, first), hi = std::min(end, first + p.n);
      if (lo < hi) p.run(k, tokens, lo - first, hi - first);
      first += p.n;
    }
  });
  return outs;
}
