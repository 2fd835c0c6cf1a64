// The kernels' worker threads (see thread_pool.h for why they are not OpenMP's).

#include "thread_pool.h"

#include <ATen/Parallel.h>
#include <pthread.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>

namespace qwenkit {
namespace {

using Clock = std::chrono::steady_clock;
// How long an idle worker spins before it sleeps. Between the kernel calls of a decode step
// Python runs for tens of microseconds; between steps, for about a millisecond or more.
constexpr auto SPIN = std::chrono::microseconds(500);
// How long the caller spins for the others to finish before it sleeps too. On a busy machine a
// worker may not be running at all; a caller that kept spinning (or yielding) would hold the CPU
// it needs. Measured with 8-18 runnable threads on 2 cores: a yielding caller made each call cost
// milliseconds, several times OpenMP's (whose caller sleeps).
constexpr auto CALLER_SPIN = std::chrono::microseconds(100);

// Spinning only pays when every spinning thread has a CPU of its own: on a machine where more
// threads are runnable than there are CPUs, a spinning thread takes the time slice the thread it
// waits for needs (measured: 1-2.6 ms per kernel call instead of 0.1 ms with 19 runnable threads
// on 2 cores). So both waits shrink to a few microseconds while the kernel's count of running
// threads (/proc/loadavg, read at most every 20 ms) exceeds the CPUs.
constexpr auto BUSY_SPIN = std::chrono::microseconds(5);
constexpr auto LOAD_CHECK_EVERY = std::chrono::milliseconds(20);
std::atomic<bool> crowded{false};
// How many callers have asked the idle workers to sleep at once (set_kernel_workers_spin(false)
// not yet undone): they spin only while this is 0, so that two engines' steps cannot undo each
// other's request.
std::atomic<int> quiet_requests{0};
std::atomic<int64_t> crowded_checked_at{0};

bool machine_is_crowded() {
  const int64_t now = Clock::now().time_since_epoch().count();
  const int64_t last = crowded_checked_at.load(std::memory_order_relaxed);
  if (now - last < std::chrono::duration_cast<Clock::duration>(LOAD_CHECK_EVERY).count()) return crowded.load(std::memory_order_relaxed);
  crowded_checked_at.store(now, std::memory_order_relaxed);
  std::FILE* f = std::fopen("/proc/loadavg", "r");
  if (f == nullptr) return false;
  double one, five, fifteen;
  int running = 0, total = 0;
  const bool read = std::fscanf(f, "%lf %lf %lf %d/%d", &one, &five, &fifteen, &running, &total) == 5;
  std::fclose(f);
  const bool result = read && running > static_cast<int>(std::thread::hardware_concurrency());
  crowded.store(result, std::memory_order_relaxed);
  return result;
}

thread_local bool inside_worker = false;

class Pool {
 public:
  explicit Pool(int threads) : size_(threads) {
    for (int i = 1; i < threads; ++i) std::thread([this, i] { loop(i); }).detach();
  }
  int size() const { return size_; }
  std::mutex& busy() { return busy_; }

  void run(int workers, const std::function<void(int, int)>& f) {
    job_ = &f;
    workers_ = workers;
    error_ = nullptr;
    pending_.store(size_ - 1);
    generation_.fetch_add(1);
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
    call(0);
    const auto start = Clock::now();
    const auto spin = machine_is_crowded() ? BUSY_SPIN : CALLER_SPIN;
    for (int spins = 0; pending_.load(std::memory_order_acquire) != 0; ++spins) {
      cpu_relax();
      if ((spins & 63) == 63 && Clock::now() - start > spin) {
        std::unique_lock<std::mutex> lock(sleep_mutex_);
        caller_sleeps_.store(true);  // seq_cst with pending_: either the last worker sees it or we see 0
        done_.wait(lock, [&] { return pending_.load() == 0; });
        caller_sleeps_.store(false);
        break;
      }
    }
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void call(int worker) {
    if (worker >= workers_) return;
    try {
      (*job_)(worker, workers_);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex_);
      if (!error_) error_ = std::current_exception();
    }
  }

  [[noreturn]] void loop(int index) {
    inside_worker = true;
    uint64_t seen = 0;  // the pool is made before its first run
    for (;;) {
      wait_for_work(seen);
      seen = generation_.load();  // before pending_ drops: the next run cannot have started
      call(index);
      if (pending_.fetch_sub(1) == 1 && caller_sleeps_.load()) {
        std::lock_guard<std::mutex> lock(sleep_mutex_);
        done_.notify_one();
      }
    }
  }

  void wait_for_work(uint64_t seen) {
    const auto start = Clock::now();
    const auto spin = quiet_requests.load(std::memory_order_relaxed) > 0 ? std::chrono::microseconds(0)
                      : crowded.load(std::memory_order_relaxed)     ? BUSY_SPIN
                                                                    : SPIN;
    for (int spins = 0; generation_.load(std::memory_order_acquire) == seen; ++spins) {
      cpu_relax();
      if ((spins & 63) == 63 && Clock::now() - start > spin) {
        std::unique_lock<std::mutex> lock(sleep_mutex_);
        sleepers_.fetch_add(1);  // seq_cst with generation_: either run() sees a sleeper or we see the run
        wake_.wait(lock, [&] { return generation_.load() != seen; });
        sleepers_.fetch_sub(1);
        return;
      }
    }
  }

  const int size_;
  std::mutex busy_;  // one caller at a time
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<int> sleepers_{0};
  std::mutex sleep_mutex_, error_mutex_;
  std::condition_variable wake_, done_;
  std::atomic<bool> caller_sleeps_{false};
  const std::function<void(int, int)>* job_ = nullptr;
  int workers_ = 0;
  std::exception_ptr error_;
};

// Pools are never destroyed: their threads are detached and idle ones sleep. A pool is replaced
// only by a wider one (torch.set_num_threads raised) or in a forked child, which has no threads.
std::atomic<Pool*> current{nullptr};
std::mutex create_mutex;

Pool* pool_for(int workers) {
  Pool* pool = current.load();
  if (pool != nullptr && pool->size() >= workers) return pool;
  std::lock_guard<std::mutex> lock(create_mutex);
  pool = current.load();
  if (pool == nullptr || pool->size() < workers) {
    pool = new Pool(workers);
    current.store(pool);
  }
  return pool;
}

const bool fork_handler_installed = [] {
  pthread_atfork(nullptr, nullptr, [] { current.store(nullptr); });
  return true;
}();

void run_serially(int workers, const std::function<void(int, int)>& f) {
  for (int w = 0; w < workers; ++w) f(w, workers);
}

}  // namespace

namespace {
std::atomic<int> configured_threads{0};  // 0: follow torch's intra-op count
}  // namespace

void set_kernel_threads(int threads) { configured_threads.store(std::max(0, threads)); }

void set_kernel_workers_spin(bool spin) {
  if (!spin) {
    quiet_requests.fetch_add(1);
    return;
  }
  int now = quiet_requests.load();
  while (now > 0 && !quiet_requests.compare_exchange_weak(now, now - 1)) {
  }
}

bool kernel_workers_spin() { return quiet_requests.load() == 0; }

int kernel_threads() {
  const int configured = configured_threads.load(std::memory_order_relaxed);
  return configured > 0 ? configured : std::max(1, at::get_num_threads());
}

void run_on_workers(int workers, const std::function<void(int, int)>& f) {
  if (workers <= 1 || inside_worker) return run_serially(workers, f);
  Pool* pool = pool_for(workers);
  std::unique_lock<std::mutex> lock(pool->busy(), std::try_to_lock);
  if (!lock.owns_lock()) return run_serially(workers, f);  // another thread's call is running
  pool->run(workers, f);
}

}  // namespace qwenkit
