// A dense Qwen decoder's layers for one decode step, in one call: the same kernels, in the same
// order, as the model's Python forward (DecoderLayer -> Attention, MLP), so the same bits.
//
// Why: at one token per sequence a layer's arithmetic is ~0.5 ms, and its Python forward (twelve
// module calls, views, residual adds, ~140 Python function calls) cost ~0.2 ms more on a 2.4 GHz
// core: about a fifth of a decode step of the 0.5B model. One call for the whole stack leaves the
// kernels alone on the path.

#include "torch_lite.h"

#include <vector>

#include "thread_pool.h"

torch::Tensor matmul(torch::Tensor x, torch::Tensor w, int64_t kind, bool packed);
std::vector<torch::Tensor> matmul_group(torch::Tensor x, std::vector<torch::Tensor> ws, std::vector<int64_t> kinds,
                                        std::vector<bool> packed, std::vector<torch::Tensor> biases, bool silu_mul);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots,
                                     torch::Tensor lengths, double scale, int64_t window);
void store_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slot_mapping);
torch::Tensor rotary(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);

namespace {

// A layer's tensors in `weights`, in this order (an empty tensor where a layer has none).
enum Weight { INPUT_NORM, Q, K, V, O, POST_NORM, GATE, UP, DOWN, Q_BIAS, K_BIAS, V_BIAS, Q_NORM, K_NORM, WEIGHTS_PER_LAYER };
// The GGUF weights' kinds and packed flags, per layer in this order.
enum Block { BQ, BK, BV, BO, BGATE, BUP, BDOWN, BLOCKS_PER_LAYER };

// x += y (float32, same shape): the residual add, elementwise as torch's.
void add_into(torch::Tensor& x, const torch::Tensor& y) {
  float* xs = x.data_ptr<float>();
  const float* ys = y.data_ptr<float>();
  const int64_t n = x.numel();
  for (int64_t i = 0; i < n; ++i) xs[i] += ys[i];
}

}  // namespace

// The hidden states after every layer (before the final norm) for x [T, hidden] float32, T decode
// tokens each of its own sequence. cos, sin [T, head_dim]; per layer WEIGHTS_PER_LAYER tensors
// (GGUF blocks as GGUFLinear holds them, float32 norms and biases) and BLOCKS_PER_LAYER kinds and
// packed flags; each layer's sliding window (0: none); the K and V caches [layers, slots, kv heads,
// head_dim]; slot_mapping [T] (the new
// tokens' slots), slots [T, Lmax] and lengths [T] (each sequence's context), as BatchAttention.
torch::Tensor decode_layers(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, std::vector<torch::Tensor> weights,
                            std::vector<int64_t> kinds, std::vector<bool> packed, torch::Tensor k_cache, torch::Tensor v_cache,
                            std::vector<int64_t> windows, torch::Tensor slot_mapping,
                            torch::Tensor slots, torch::Tensor lengths, int64_t heads, int64_t kv_heads, double eps, double scale) {
  const size_t layers = windows.size();
  TORCH_CHECK(weights.size() == layers * WEIGHTS_PER_LAYER && kinds.size() == layers * BLOCKS_PER_LAYER &&
                  packed.size() == layers * BLOCKS_PER_LAYER && k_cache.dim() == 4 && k_cache.size(0) == static_cast<int64_t>(layers),
              "per layer: ", static_cast<int>(WEIGHTS_PER_LAYER), " tensors, ", static_cast<int>(BLOCKS_PER_LAYER),
              " kinds and packed flags, a window and a K and a V cache ([layers, slots, kv_heads, head_dim])");
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x must be float32 [tokens, hidden]");
  const int64_t tokens = x.size(0), head_dim = cos.size(1);
  x = x.contiguous().clone();  // the residual stream, ours to add into
  const torch::Tensor none = torch::empty({0}, x.options());
  for (size_t l = 0; l < layers; ++l) {
    const torch::Tensor* w = &weights[l * WEIGHTS_PER_LAYER];
    const int64_t* kind = &kinds[l * BLOCKS_PER_LAYER];
    auto flag = [&](int b) { return static_cast<bool>(packed[l * BLOCKS_PER_LAYER + b]); };
    torch::Tensor h = rms_norm(x, w[INPUT_NORM], eps);
    std::vector<torch::Tensor> qkv = matmul_group(h, {w[Q], w[K], w[V]}, {kind[BQ], kind[BK], kind[BV]}, {flag(BQ), flag(BK), flag(BV)},
                                                  {w[Q_BIAS], w[K_BIAS], w[V_BIAS]}, false);
    torch::Tensor q = qkv[0].view({tokens, heads, head_dim}), k = qkv[1].view({tokens, kv_heads, head_dim});
    const torch::Tensor v = qkv[2].view({tokens, kv_heads, head_dim});
    if (w[Q_NORM].numel()) {
      q = rms_norm(q, w[Q_NORM], eps);
      k = rms_norm(k, w[K_NORM], eps);
    }
    q = rotary(q, cos, sin);
    k = rotary(k, cos, sin);
    const torch::Tensor k_layer = k_cache.select(0, l), v_layer = v_cache.select(0, l);
    store_kv(k, v, k_layer, v_layer, slot_mapping);
    const torch::Tensor attended = paged_decode_attention(q, k_layer, v_layer, slots, lengths, scale, windows[l]);
    add_into(x, matmul(attended, w[O], kind[BO], flag(BO)));
    h = rms_norm(x, w[POST_NORM], eps);
    const torch::Tensor hidden = matmul_group(h, {w[GATE], w[UP]}, {kind[BGATE], kind[BUP]}, {flag(BGATE), flag(BUP)},
                                              {none, none}, true)[0];
    add_into(x, matmul(hidden, w[DOWN], kind[BDOWN], flag(BDOWN)));
  }
  return x;
}
