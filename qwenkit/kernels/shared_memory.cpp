// A tensor-parallel group's collectives through memory its processes share, when they all run on
// one machine (kernels/shared_memory.py makes it), in place of gloo's all-reduce and all-gather.
//
// Why: gloo sends each half-layer's partial sum over TCP on the loopback device, ~220 us per
// all-reduce of a decode step's [1, 896] on 2 Xeon cores, and a decode step of a 24-layer model
// makes 48 of them. Here a process copies its part into its slot, publishes the call's number,
// waits until every process has published it, and reads the slots: a sum adds them up in rank
// order, so every process gets the same bits (as gloo gives); a gather puts them side by side.
//
// The shared bytes: `world` 64-byte lines each holding one process's last published call number,
// then two buffers of `world` slots of `slot_bytes`; call n uses buffer n % 2. A process can be
// at most one call ahead of the slowest (it waits for every number of the call it is in), so the
// buffer it writes next is one no process still reads.

#include <sched.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "thread_pool.h"
#include "torch_lite.h"

namespace {

constexpr int64_t LINE = 64;
// Waiting for the other processes: spin this long (a decode step's collectives come every few
// hundred microseconds, and the processes are seldom further apart than that), then yield the
// core between checks (a process that shares its core with another must let it run), and past
// YIELD sleep between checks, so that a long wait (a long prompt chunk on another process) costs
// no core.
constexpr auto SPIN = std::chrono::microseconds(50);
constexpr auto YIELD = std::chrono::milliseconds(1);
constexpr auto NAP = std::chrono::microseconds(50);

// How long a process waits for the others before it fails (a process of the group has died or
// failed): QWENKIT_TP_TIMEOUT seconds, default 1800 (gloo's default for its collectives).
std::chrono::steady_clock::duration timeout() {
  static const auto seconds = [] {
    const char* value = std::getenv("QWENKIT_TP_TIMEOUT");
    const double parsed = value ? std::atof(value) : 0.0;
    return parsed > 0 ? parsed : 1800.0;
  }();
  return std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(seconds));
}

// Copies `bytes` of `data` into this process's slot of call `call`, publishes it, waits for every
// process's, and returns the call's buffer (slot r at r * slot_bytes).
const uint8_t* exchange(torch::Tensor& shared, int64_t rank, int64_t world, int64_t slot_bytes, int64_t call,
                        const void* data, int64_t bytes) {
  TORCH_CHECK(shared.scalar_type() == torch::kUInt8 && shared.numel() >= world * LINE + 2 * world * slot_bytes,
              "shared memory collective: the shared bytes are too small");
  TORCH_CHECK(0 <= rank && rank < world && call > 0, "shared memory collective: bad rank or call number");
  TORCH_CHECK(bytes <= slot_bytes, "shared memory collective: ", bytes, " bytes do not fit a slot of ", slot_bytes);
  uint8_t* base = shared.data_ptr<uint8_t>();
  uint8_t* buffer = base + world * LINE + (call % 2) * world * slot_bytes;
  std::memcpy(buffer + rank * slot_bytes, data, bytes);
  __atomic_store_n(reinterpret_cast<int64_t*>(base + rank * LINE), call, __ATOMIC_RELEASE);
  for (int64_t r = 0; r < world; ++r) {
    const auto* published = reinterpret_cast<const int64_t*>(base + r * LINE);
    const auto start = std::chrono::steady_clock::now();
    int spins = 0;
    while (__atomic_load_n(published, __ATOMIC_ACQUIRE) < call) {
      if (++spins < 64) {
        cpu_relax();
        continue;
      }
      const auto waited = std::chrono::steady_clock::now() - start;
      if (waited < SPIN) {
        cpu_relax();
      } else if (waited < YIELD) {
        sched_yield();
      } else {
        TORCH_CHECK(waited < timeout(), "tensor parallel: process ", r, " has not reached collective ", call, " in ",
                    std::chrono::duration_cast<std::chrono::seconds>(waited).count(),
                    " s (did a process of the group fail? QWENKIT_TP_TIMEOUT sets the limit)");
        std::this_thread::sleep_for(NAP);
      }
    }
  }
  return buffer;
}

}  // namespace

// x (float32, contiguous) becomes the sum of every process's x for call number `call` (1, 2, ...:
// every process numbers its calls alike).
void shared_sum(torch::Tensor shared, int64_t rank, int64_t world, int64_t slot_bytes, int64_t call, torch::Tensor x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "shared_sum: a contiguous float32 tensor");
  float* out = x.data_ptr<float>();
  const int64_t n = x.numel();
  const uint8_t* buffer = exchange(shared, rank, world, slot_bytes, call, out, n * sizeof(float));
  std::memcpy(out, buffer, n * sizeof(float));
  for (int64_t r = 1; r < world; ++r) {
    const auto* part = reinterpret_cast<const float*>(buffer + r * slot_bytes);
    for (int64_t i = 0; i < n; ++i) out[i] += part[i];
  }
}

// Every process's x [rows, widths[rank]] side by side in rank order: [rows, sum(widths)].
torch::Tensor shared_gather(torch::Tensor shared, int64_t rank, int64_t world, int64_t slot_bytes, int64_t call, torch::Tensor x,
                            std::vector<int64_t> widths) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && static_cast<int64_t>(widths.size()) == world && x.size(1) == widths[rank],
              "shared_gather: a contiguous [rows, widths[rank]] tensor");
  const int64_t rows = x.size(0), size = x.element_size();
  int64_t total = 0;
  for (int64_t w : widths) {
    TORCH_CHECK(rows * w * size <= slot_bytes, "shared_gather: a part does not fit a slot");
    total += w;
  }
  const uint8_t* buffer = exchange(shared, rank, world, slot_bytes, call, x.data_ptr(), x.nbytes());
  torch::Tensor out = torch::empty({rows, total}, x.options());
  auto* dst = static_cast<uint8_t*>(out.data_ptr());
  for (int64_t t = 0; t < rows; ++t) {
    int64_t column = 0;
    for (int64_t r = 0; r < world; ++r) {
      std::memcpy(dst + (t * total + column) * size, buffer + r * slot_bytes + t * widths[r] * size, widths[r] * size);
      column += widths[r];
    }
  }
  return out;
}
