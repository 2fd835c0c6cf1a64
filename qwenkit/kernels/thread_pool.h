// The kernels' own worker threads, instead of OpenMP (at::parallel_for).
//
// Why not OpenMP: libgomp keeps one team of worker threads per thread that starts parallel
// regions, and counts every such thread process-wide. Once a second thread (an engine thread, a
// server, AsyncLLM) has started a region after the main thread did, that count exceeds the CPUs
// and libgomp stops spinning between regions: every region then costs a futex sleep and wake of
// its workers (measured: 2 voluntary context switches per kernel call on a thread, 0 on the main
// thread), and a decode step runs a few hundred regions. These workers spin briefly between
// calls whichever thread calls them, then sleep.

#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#elif defined(__aarch64__)
static inline void cpu_relax() { asm volatile("yield"); }
#else
static inline void cpu_relax() {}
#endif

namespace qwenkit {

// Calls f(worker, workers) on `workers` threads (the caller is worker 0) and returns when all
// are done; the first exception any of them throws is rethrown here.
void run_on_workers(int workers, const std::function<void(int, int)>& f);

// How many threads the kernels use: the count set by set_kernel_threads, else (0, the default)
// torch's intra-op thread count for the calling thread.
int kernel_threads();
void set_kernel_threads(int threads);

// Whether idle workers spin for a while before they sleep (the default) or sleep at once. A step
// whose products are torch matmuls (many tokens) runs torch's OpenMP workers on the same cores
// between the kernels' calls (dequantization, norms); a worker spinning there takes the core
// they need. Measured on 2 Xeon cores, a 1000-token prefill: 630-650 tok/s sleeping at once,
// 490-580 spinning. Requests nest: each set_kernel_workers_spin(false) is undone by one
// set_kernel_workers_spin(true), and the workers spin again once every request is undone.
void set_kernel_workers_spin(bool spin);
bool kernel_workers_spin();

// f(begin, end) over [begin, end) split into at most kernel_threads() contiguous chunks of at
// least `grain` items, as at::parallel_for.
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t items = end - begin;
  if (items <= 0) return;
  const int64_t most = (items + grain - 1) / grain;
  const int workers = static_cast<int>(std::min<int64_t>(kernel_threads(), most));
  if (workers <= 1) {
    f(begin, end);
    return;
  }
  run_on_workers(workers, [&](int worker, int count) {
    const int64_t first = begin + items * worker / count, last = begin + items * (worker + 1) / count;
    if (first < last) f(first, last);
  });
}

}  // namespace qwenkit
