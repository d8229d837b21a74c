// A work-claiming thread pool for the kernels: sd::parallel_for(begin, end, grain, f) runs
// f(b, e) over chunks of [begin, end), like at::parallel_for, but the calling thread never waits
// for a worker that has not started.
//
// Why: a decoding step makes a few hundred parallel calls. With fork-join (OpenMP), each call ends
// at a barrier that every thread must reach; on a machine whose cores are shared with other work a
// descheduled worker stalls the caller for a scheduler tick at each of them (measured here: a 40 ms
// step became more than a second while other processes ran). Here the caller and the workers
// claim chunks from one counter and the caller waits only for chunks already claimed, so a late
// worker finds nothing left. Which thread computes a chunk never changes a result: the kernels
// split outputs, never a sum.
//
// Protocol: a claim is counted in `in_flight_` before the generation is checked and the chunk
// taken, so the caller, which waits for `in_flight_ == 0` before it returns and before it publishes
// the next call, never frees or replaces a job under a claim. Workers spin briefly after each call
// (the next one usually follows within microseconds), then sleep. Calls from several threads at
// once are safe: one runs on the pool, the others inline.
#pragma once

#include <ATen/Parallel.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace sd {

class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: workers may outlive static destructors
    return *pool;
  }

  void run(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body) {
    if (n <= 0) return;
    grain = grain < 1 ? 1 : grain;
    const int threads = at::get_num_threads();
    std::unique_lock<std::mutex> busy(submit_, std::try_to_lock);
    if (threads <= 1 || n <= grain || !busy.owns_lock()) {
      body(0, n);
      return;
    }
    ensure_workers(threads - 1);
    drain();  // a late worker's claim on the previous call
    job_ = &body;
    n_ = n;
    grain_ = grain;
    threads_ = threads;
    active_.store(threads - 1, std::memory_order_relaxed);
    next_.store(0, std::memory_order_release);  // last: a claim that sees it sees the job too
    const uint64_t gen = generation_.fetch_add(1, std::memory_order_acq_rel) + 1;
    {
      std::lock_guard<std::mutex> lock(sleep_);
    }
    wake_.notify_all();
    work(gen);
    drain();
    job_ = nullptr;
  }

 private:
  Pool() = default;

  void drain() {
    while (in_flight_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
  }

  void ensure_workers(int count) {
    while ((int)workers_.size() < count) {
      const int index = (int)workers_.size();
      workers_.emplace_back([this, index] { loop(index); });
      workers_.back().detach();
    }
  }

  // Claim and run chunks of call `gen` until none is left (or another call has begun).
  void work(uint64_t gen) {
    for (;;) {
      in_flight_.fetch_add(1, std::memory_order_acq_rel);
      if (generation_.load(std::memory_order_acquire) != gen) {
        in_flight_.fetch_sub(1, std::memory_order_release);
        return;
      }
      int64_t b, e;
      if (!claim(b, e)) {
        in_flight_.fetch_sub(1, std::memory_order_release);
        return;
      }
      (*job_)(b, e);
      in_flight_.fetch_sub(1, std::memory_order_release);
    }
  }

  // Guided chunks: a claim takes a share of what is left (never less than the grain), so a call
  // costs a few claims per thread instead of one per grain, and each thread streams long runs of
  // contiguous weight panels; the shrinking tail still balances a late or slow thread.
  bool claim(int64_t& b, int64_t& e) {
    int64_t cur = next_.load(std::memory_order_acquire);
    for (;;) {
      if (cur >= n_) return false;
      int64_t size = (n_ - cur) / (2 * threads_) / grain_ * grain_;
      size = size < grain_ ? grain_ : size;
      if (next_.compare_exchange_weak(cur, cur + size, std::memory_order_acq_rel)) {
        b = cur;
        e = cur + size < n_ ? cur + size : n_;
        return true;
      }
    }
  }

  void loop(int index) {
    uint64_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(200);
      while (generation_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < until) {
      }
      if (generation_.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lock(sleep_);
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
      }
      seen = generation_.load(std::memory_order_acquire);
      if (index < active_.load(std::memory_order_acquire)) work(seen);
    }
  }

  std::mutex submit_, sleep_;
  std::condition_variable wake_;
  std::vector<std::thread> workers_;
  // Each counter on its own cache line: a claim must not invalidate the line a spinning worker reads.
  alignas(64) std::atomic<uint64_t> generation_{0};
  alignas(64) std::atomic<int64_t> next_{0};
  alignas(64) std::atomic<int64_t> in_flight_{0};
  alignas(64) std::atomic<int> active_{0};
  alignas(64) const std::function<void(int64_t, int64_t)>* job_ = nullptr;
  int64_t n_ = 0, grain_ = 1;
  int threads_ = 1;
};

template <class F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const std::function<void(int64_t, int64_t)> body = [&](int64_t b, int64_t e) { f(begin + b, begin + e); };
  Pool::get().run(end - begin, grain, body);
}

}  // namespace sd
