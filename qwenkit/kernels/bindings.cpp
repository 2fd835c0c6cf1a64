// The Python module of qwenkit's CPU kernels: GGUF blocks in place (gguf_matmul.cpp over each
// build's ggml_*.cpp), the small operations of a decode step (decode_cpu.cpp) and a decoder's
// layers (dense or MoE) for one decode step (decode_layers.cpp); a tensor-parallel group's sums
// and gathers through shared memory (shared_memory.cpp).

#include <torch/csrc/utils/pybind.h>  // pybind11 with torch's Tensor casters, without the C++ frontend

#include "torch_lite.h"

#include "thread_pool.h"

namespace qwenkit {
int64_t packed_group_rows(int64_t kind);
}

torch::Tensor pack(torch::Tensor w, int64_t kind, int64_t k);
torch::Tensor matmul(torch::Tensor x, torch::Tensor w, int64_t kind, bool packed);
std::vector<torch::Tensor> matmul_group(torch::Tensor x, std::vector<torch::Tensor> ws, std::vector<int64_t> kinds,
                                        std::vector<bool> packed, std::vector<torch::Tensor> biases, bool silu_mul);
torch::Tensor experts_mlp(torch::Tensor x, std::vector<int64_t> counts, torch::Tensor gate, torch::Tensor up, torch::Tensor down,
                          std::vector<int64_t> kinds, std::vector<bool> packed);
void dequantize_into(torch::Tensor w, int64_t kind, torch::Tensor out, bool packed);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots,
                                     torch::Tensor lengths, double scale, int64_t window);
void store_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slot_mapping);
torch::Tensor rotary(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
std::tuple<torch::Tensor, torch::Tensor> row_max(torch::Tensor x);
void shared_sum(torch::Tensor shared, int64_t rank, int64_t world, int64_t slot_bytes, int64_t call, torch::Tensor x);
torch::Tensor shared_gather(torch::Tensor shared, int64_t rank, int64_t world, int64_t slot_bytes, int64_t call, torch::Tensor x,
                            std::vector<int64_t> widths);
torch::Tensor decode_layers(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, std::vector<torch::Tensor> weights,
                            std::vector<int64_t> kinds, std::vector<bool> packed, std::vector<int64_t> moe, torch::Tensor k_cache,
                            torch::Tensor v_cache, std::vector<int64_t> windows, torch::Tensor slot_mapping, torch::Tensor slots,
                            torch::Tensor lengths,
                            int64_t heads, int64_t kv_heads, double eps, double scale,
                            torch::Tensor shared, int64_t rank, int64_t world, int64_t slot_bytes, int64_t first_call);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack, "GGUF block rows in the packed layout this build reads fastest (the 32-value types; the AVX-512 build also Q4_K, Q6_K)");
  m.def("packed_group_rows", &qwenkit::packed_group_rows, "how many rows the packed layout of a GGUF type stores together (8, 16 or 1)");
  m.def("matmul", &matmul, py::call_guard<py::gil_scoped_release>(), "x @ w.T for GGUF block rows w (packed: in the packed layout)");
  m.def("matmul_group", &matmul_group, py::call_guard<py::gil_scoped_release>(),
        "x @ w.T (+ bias) for several GGUF weights in one pass (silu_mul: silu(x @ gate.T) * (x @ up.T))");
  m.def("experts_mlp", &experts_mlp, py::call_guard<py::gil_scoped_release>(), "a MoE block's experts (stacked GGUF blocks) on their routed rows, in two passes of the threads");
  m.def("dequantize_into", &dequantize_into, py::call_guard<py::gil_scoped_release>(), "values of GGUF block rows, written into out (float32 or bfloat16)");
  m.def("rms_norm", &rms_norm, "x / rms(x) * weight over the last dimension (float32)");
  m.def("store_kv", &store_kv, "new tokens' float32 keys and values into their slots of one layer's paged cache");
  m.def("row_max", &row_max, py::call_guard<py::gil_scoped_release>(),
        "torch.max(x, -1) of float32 rows: each row's largest value (NaN if it has one) and its first index");
  m.def("shared_sum", &shared_sum, py::call_guard<py::gil_scoped_release>(),
        "x summed in place across the processes of one machine that map the same shared bytes (call numbers 1, 2, ...)");
  m.def("shared_gather", &shared_gather, py::call_guard<py::gil_scoped_release>(),
        "every process's x [rows, widths[rank]] side by side, through the same shared bytes");
  m.def("rotary", &rotary, "rotary position embedding (rotate_half) of float32 [T, heads, head_dim]");
  m.def("set_kernel_threads", &qwenkit::set_kernel_threads,
        "how many threads the kernels use, whatever torch's count (0: follow torch.get_num_threads())");
  m.def("set_kernel_workers_spin", &qwenkit::set_kernel_workers_spin,
        "false: ask the kernels' idle workers to sleep at once rather than spin first; true: undo one such request");
  m.def("kernel_workers_spin", &qwenkit::kernel_workers_spin, "whether the kernels' idle workers spin before they sleep (no request to sleep at once is pending)");
  m.def("kernel_threads", &qwenkit::kernel_threads, "how many threads the kernels use on this thread");
  m.def("decode_layers", &decode_layers, py::call_guard<py::gil_scoped_release>(), "a decoder's layers (dense or MoE) on GGUF blocks for one decode step, in one call");
  m.def("paged_decode_attention", &paged_decode_attention, "one new token per sequence attending over its paged K/V");
}
