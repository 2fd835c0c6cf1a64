// Products of float32 activations with GGUF block rows, the same for every build: the
// activations are quantized once, then the rows are spread over the kernels' threads in one
// pass, and each build's rows_matmul (gguf_blocks.h) does the arithmetic.
//
// matmul_group takes the weights that read one input: a layer's q, k and v, or its gate and up
// (then returning SwiGLU's silu(gate) * up, computed by each thread on the rows it just wrote).
// At one token a projection of the 0.5B model takes 10-60 us of work, and each separate call
// would pay again for the Python dispatch, the activations' quantization, waking the threads and
// the elementwise ops after it.

#include "torch_lite.h"

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
    rows_matmul(kind, packed, rows, row_bytes, n, k, *a, tokens, begin, end, out, ldo);
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

// gate[t * ldo + r] = silu(gate[...]) * up[...] for tokens [0, tokens) and rows [begin, end):
// SwiGLU's product on the rows a thread has just written.
void silu_mul_rows(float* gate, const float* up, int64_t ldo, int64_t tokens, int64_t begin, int64_t end) {
  for (int64_t t = 0; t < tokens; ++t) silu_mul(gate + t * ldo + begin, up + t * ldo + begin, end - begin);
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
      silu_mul_rows(gate, up, n, tokens, begin, end);
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

// A MoE block's experts on their routed rows: x [N, H] float32 holds counts[0] rows for expert 0,
// then counts[1] for expert 1, ...; gate, up uint8 [E, I, bytes per row] and down [E, H, bytes
// per row] are the experts' stacked GGUF blocks (kinds, packed: gate's, up's, down's). Returns
// [N, H]: each row through its expert's SwiGLU MLP. Two passes of the threads for the whole
// block (gate and up with SwiGLU's product, then down), each spreading every active expert's
// rows; a decode step's 8 active experts would otherwise be 24 calls and their elementwise ops.
torch::Tensor experts_mlp(torch::Tensor x, std::vector<int64_t> counts, torch::Tensor gate, torch::Tensor up, torch::Tensor down,
                          std::vector<int64_t> kinds, std::vector<bool> packed) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x must be float32 [rows, hidden]");
  TORCH_CHECK(kinds.size() == 3 && packed.size() == 3, "kinds and packed are gate's, up's and down's");
  for (const torch::Tensor* w : {&gate, &up, &down})
    TORCH_CHECK(w->dtype() == torch::kUInt8 && w->dim() == 3 && w->size(0) == static_cast<int64_t>(counts.size()),
                "expert blocks must be uint8 [experts, rows, bytes per row], one count per expert");
  TORCH_CHECK(gate.size(1) == up.size(1) && down.size(1) == x.size(1), "gate and up give the intermediate rows, down the hidden ones");
  x = x.contiguous();
  gate = gate.contiguous();
  up = up.contiguous();
  down = down.contiguous();
  const int64_t rows = x.size(0), hidden = x.size(1), inter = gate.size(1);
  int64_t total = 0;
  for (int64_t c : counts) {
    TORCH_CHECK(c >= 0, "counts must not be negative");
    total += c;
  }
  TORCH_CHECK(total == rows, "counts add up to ", total, ", not the ", rows, " rows of x");
  auto hidden_x = torch::empty({rows, inter}, x.options());
  check_matmul_args(x, gate.select(0, 0), kinds[0], packed[0]);
  check_matmul_args(x, up.select(0, 0), kinds[1], packed[1]);
  check_matmul_args(hidden_x, down.select(0, 0), kinds[2], packed[2]);
  struct Active {
    int64_t expert, first, n;
  };
  std::vector<Active> active;
  for (int64_t e = 0, first = 0; e < static_cast<int64_t>(counts.size()); first += counts[e], ++e)
    if (counts[e]) active.push_back({e, first, counts[e]});
  const int64_t experts = static_cast<int64_t>(active.size());
  auto up_x = torch::empty({rows, inter}, x.options());
  auto out = torch::empty({rows, hidden}, x.options());
  float* gate_out = hidden_x.data_ptr<float>();
  float* up_out = up_x.data_ptr<float>();
  // Each expert's rows of x, quantized for gate's and up's block sizes.
  // Expert a's slice of stacked weight w (kinds[which]), reading `input` ([a.n, in]), writing out + a.first * ldo.
  auto expert_part = [&](const Active& a, const torch::Tensor& w, int which, ActivationsBySize& inputs, const float* input, int64_t in,
                         float* out, int64_t ldo) {
    const int kind = static_cast<int>(kinds[which]);
    return Part{kind, packed[which], w.data_ptr<uint8_t>() + a.expert * w.size(1) * w.size(2), w.size(2), w.size(1), nullptr,
                inputs.get(input, a.n, in, kind), out + a.first * ldo, ldo};
  };
  std::vector<ActivationsBySize> inputs(experts);
  std::vector<Part> gates, ups, downs;
  for (int64_t i = 0; i < experts; ++i) {
    const float* xs = x.data_ptr<float>() + active[i].first * hidden;
    gates.push_back(expert_part(active[i], gate, 0, inputs[i], xs, hidden, gate_out, inter));
    ups.push_back(expert_part(active[i], up, 1, inputs[i], xs, hidden, up_out, inter));
  }
  // Expert i's rows [lo, hi) of a projection with `width` rows, for each i overlapping [begin, end).
  auto each_expert = [&](int64_t width, int64_t begin, int64_t end, auto&& f) {
    for (int64_t i = begin / width; i < experts && i * width < end; ++i) {
      const int64_t lo = std::max(begin - i * width, int64_t{0}), hi = std::min(end - i * width, width);
      if (lo < hi) f(i, lo, hi);
    }
  };
  parallel_for(0, experts * inter, 16, [&](int64_t begin, int64_t end) {
    each_expert(inter, begin, end, [&](int64_t i, int64_t lo, int64_t hi) {
      gates[i].run(hidden, active[i].n, lo, hi);
      ups[i].run(hidden, active[i].n, lo, hi);
      silu_mul_rows(gate_out + active[i].first * inter, up_out + active[i].first * inter, inter, active[i].n, lo, hi);
    });
  });
  std::vector<ActivationsBySize> hiddens(experts);
  for (int64_t i = 0; i < experts; ++i)
    downs.push_back(expert_part(active[i], down, 2, hiddens[i], gate_out + active[i].first * inter, inter, out.data_ptr<float>(), hidden));
  parallel_for(0, experts * hidden, 16, [&](int64_t begin, int64_t end) {
    each_expert(hidden, begin, end, [&](int64_t i, int64_t lo, int64_t hi) { downs[i].run(inter, active[i].n, lo, hi); });
  });
  return out;
}
