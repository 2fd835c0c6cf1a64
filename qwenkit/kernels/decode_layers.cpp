// A Qwen decoder's layers for one decode step, in one call: the same kernels and ops, in the same
// order, as the model's Python forward (DecoderLayer -> Attention, MLP or SparseMoeBlock), so the
// same bits.
//
// Why: at one token per sequence a layer's arithmetic is ~0.5 ms, and its Python forward (twelve
// module calls, views, residual adds, ~140 Python function calls) cost ~0.2 ms more on a 2.4 GHz
// core: about a fifth of a decode step of the 0.5B model. One call for the whole stack leaves the
// kernels alone on the path.

#include "torch_lite.h"

#include <ATen/ops/add.h>
#include <ATen/ops/argsort.h>
#include <ATen/ops/bincount.h>
#include <ATen/ops/div.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/topk.h>
#include <ATen/ops/zeros_like.h>

#include <vector>

torch::Tensor matmul(torch::Tensor x, torch::Tensor w, int64_t kind, bool packed);
std::vector<torch::Tensor> matmul_group(torch::Tensor x, std::vector<torch::Tensor> ws, std::vector<int64_t> kinds,
                                        std::vector<bool> packed, std::vector<torch::Tensor> biases, bool silu_mul);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots,
                                     torch::Tensor lengths, double scale, int64_t window);
void store_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slot_mapping);
torch::Tensor rotary(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
torch::Tensor experts_mlp(torch::Tensor x, std::vector<int64_t> counts, torch::Tensor gate, torch::Tensor up, torch::Tensor down,
                          std::vector<int64_t> kinds, std::vector<bool> packed);
void shared_sum(torch::Tensor shared, int64_t rank, int64_t world, int64_t slot_bytes, int64_t call, torch::Tensor x);

namespace {

// A layer's tensors in `weights`, in this order (an empty tensor where a layer has none): a dense
// layer's MLP is GATE, UP, DOWN; a MoE layer's shared expert is (Qwen2-MoE; none in Qwen3-MoE),
// with its router (ROUTER, float32 [experts, hidden]), its experts' stacked GGUF blocks and the
// shared expert's gate (float32 [1, hidden]).
enum Weight {
  INPUT_NORM, Q, K, V, O, POST_NORM, GATE, UP, DOWN, Q_BIAS, K_BIAS, V_BIAS, Q_NORM, K_NORM,
  ROUTER, EXPERT_GATE, EXPERT_UP, EXPERT_DOWN, SHARED_GATE, WEIGHTS_PER_LAYER
};
// The GGUF weights' kinds and packed flags, per layer in this order (0 and false where absent).
enum Block { BQ, BK, BV, BO, BGATE, BUP, BDOWN, BEXPERT_GATE, BEXPERT_UP, BEXPERT_DOWN, BLOCKS_PER_LAYER };

// SwiGLU of GGUF gate, up and down weights: MLP.forward's calls (gate and up with their product
// in one call, then down).
torch::Tensor swiglu(const torch::Tensor& h, const torch::Tensor* w, const int64_t* kind, const std::vector<bool>& packed, size_t at,
                     const torch::Tensor& none) {
  const torch::Tensor hidden = matmul_group(h, {w[GATE], w[UP]}, {kind[BGATE], kind[BUP]}, {packed[at + BGATE], packed[at + BUP]},
                                            {none, none}, true)[0];
  return matmul(hidden, w[DOWN], kind[BDOWN], packed[at + BDOWN]);
}

// SparseMoeBlock.forward, op for op (so the same bits): the router's softmax and top-k, the
// tokens' choices grouped by expert (a stable argsort), the experts through experts_mlp (what
// GGUFExperts.grouped calls for few rows), the weighted sum back per token, and the shared expert
// under its sigmoid gate.
torch::Tensor sparse_moe(const torch::Tensor& h, const torch::Tensor* w, const int64_t* kind, const std::vector<bool>& packed, size_t at,
                         int64_t top_k, bool norm_topk_prob, const torch::Tensor& none) {
  const torch::Tensor probs = at::softmax(at::linear(h, w[ROUTER]), -1, at::kFloat);
  auto [weights, experts] = at::topk(probs, top_k, -1);
  if (norm_topk_prob) weights = at::div(weights, weights.sum({-1}, true));
  const torch::Tensor choices = experts.reshape({-1});
  const torch::Tensor order = at::argsort(choices, true, -1, false);
  const torch::Tensor rows = at::div(order, top_k, "floor");
  const torch::Tensor counted = at::bincount(choices, {}, w[EXPERT_GATE].size(0));
  const int64_t* c = counted.data_ptr<int64_t>();
  const std::vector<int64_t> counts(c, c + counted.numel());
  torch::Tensor y = experts_mlp(h.index_select(0, rows), counts, w[EXPERT_GATE], w[EXPERT_UP], w[EXPERT_DOWN],
                                {kind[BEXPERT_GATE], kind[BEXPERT_UP], kind[BEXPERT_DOWN]},
                                {packed[at + BEXPERT_GATE], packed[at + BEXPERT_UP], packed[at + BEXPERT_DOWN]});
  torch::Tensor out = at::zeros_like(h).index_add_(0, rows, y.mul_(weights.reshape({-1}).index_select(0, order).unsqueeze(1)));
  if (w[DOWN].numel()) out = at::add(out, at::mul(at::sigmoid(at::linear(h, w[SHARED_GATE])), swiglu(h, w, kind, packed, at, none)));
  return out;
}

// A tensor-parallel process's place in its group's shared memory (shared_memory.cpp), when the
// layers are this process's shard: each half-layer's output is then a partial sum, summed across
// the group (as the Python forward's hook does) before the residual add. No group: `shared` empty.
struct Group {
  torch::Tensor shared;
  int64_t rank, world, slot_bytes, call;  // `call`: the number of the next sum

  torch::Tensor sum(torch::Tensor partial) {
    if (!shared.numel()) return partial;
    partial = partial.contiguous();
    shared_sum(shared, rank, world, slot_bytes, call++, partial);
    return partial;
  }
};

// x += y (float32, same shape): the residual add, elementwise as torch's.
void add_into(torch::Tensor& x, const torch::Tensor& y) {
  TORCH_CHECK(y.sizes() == x.sizes() && y.is_contiguous(), "a layer's output must be [tokens, hidden] like its input");
  float* xs = x.data_ptr<float>();
  const float* ys = y.data_ptr<float>();
  const int64_t n = x.numel();
  for (int64_t i = 0; i < n; ++i) xs[i] += ys[i];
}

}  // namespace

// The hidden states after every layer (before the final norm) for x [T, hidden] float32: T decode
// rows (a sequence's next token, or a drafted token being verified; each row its own context).
// cos, sin [T, head_dim]. Per layer: WEIGHTS_PER_LAYER tensors (GGUF blocks as GGUFLinear and
// GGUFExperts hold them; float32 norms, biases and routers), BLOCKS_PER_LAYER kinds and packed
// flags, (top_k, norm_topk_prob) with top_k 0 for a dense layer, and a sliding window (0: none).
// The K and V caches [layers, slots, kv heads, head_dim]; slot_mapping [T] (the rows' new slots),
// slots [T, Lmax] and lengths [T] (each row's context), as BatchAttention holds them. Under tensor
// parallelism (a shard's layers): the group's shared bytes, this process's rank, the group's size,
// the slot size and the number of the step's first sum (two per layer); else an empty `shared`.
torch::Tensor decode_layers(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, std::vector<torch::Tensor> weights,
                            std::vector<int64_t> kinds, std::vector<bool> packed, std::vector<int64_t> moe, torch::Tensor k_cache,
                            torch::Tensor v_cache, std::vector<int64_t> windows, torch::Tensor slot_mapping,
                            torch::Tensor slots, torch::Tensor lengths, int64_t heads, int64_t kv_heads, double eps, double scale,
                            torch::Tensor shared, int64_t rank, int64_t world, int64_t slot_bytes, int64_t first_call) {
  const size_t layers = windows.size();
  TORCH_CHECK(weights.size() == layers * WEIGHTS_PER_LAYER && kinds.size() == layers * BLOCKS_PER_LAYER &&
                  packed.size() == layers * BLOCKS_PER_LAYER && moe.size() == 2 * layers && k_cache.dim() == 4 &&
                  k_cache.size(0) == static_cast<int64_t>(layers),
              "per layer: ", static_cast<int>(WEIGHTS_PER_LAYER), " tensors, ", static_cast<int>(BLOCKS_PER_LAYER),
              " kinds and packed flags, top_k and norm_topk_prob, a window and a K and a V cache ([layers, slots, kv_heads, head_dim])");
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "x must be float32 [tokens, hidden]");
  const int64_t tokens = x.size(0), head_dim = cos.size(1);
  x = x.contiguous().clone();  // the residual stream, ours to add into
  const torch::Tensor none = torch::empty({0}, x.options());
  Group group{shared, rank, world, slot_bytes, first_call};
  for (size_t l = 0; l < layers; ++l) {
    const torch::Tensor* w = &weights[l * WEIGHTS_PER_LAYER];
    const int64_t* kind = &kinds[l * BLOCKS_PER_LAYER];
    const size_t at = l * BLOCKS_PER_LAYER;
    auto flag = [&](int b) { return static_cast<bool>(packed[at + b]); };
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
    add_into(x, group.sum(matmul(attended, w[O], kind[BO], flag(BO))));
    h = rms_norm(x, w[POST_NORM], eps);
    const int64_t top_k = moe[2 * l];
    add_into(x, group.sum(top_k ? sparse_moe(h, w, kind, packed, at, top_k, moe[2 * l + 1] != 0, none) : swiglu(h, w, kind, packed, at, none)));
  }
  return x;
}
