// Execution policies for the write-once kernels (Open3D ParallelFor style): a kernel body is a functor
// `f(index_t i)` holding plain pointers; the CPU runs it under at::parallel_for, CUDA in a grid-stride
// loop (parallel_cuda.cuh). Scatter-adds and hash inserts go through the atomics below so that both
// backends run the same algorithm.
#pragma once

#include "segops/hd.h"

#if !defined(__CUDACC__)
#include <ATen/Parallel.h>
#endif

namespace segops {

// ---- atomics -------------------------------------------------------------------------------------
// Host versions use GCC/Clang __atomic builtins (C++17-safe: the GPU machines build with torch 2.11).

template <typename T>
SEGOPS_HD_INLINE T atomic_add(T* address, T value) {
#if defined(__CUDA_ARCH__)
  return atomicAdd(address, value);
#else
  T old = __atomic_load_n(address, __ATOMIC_RELAXED);
  T desired;
  do {
    desired = old + value;
  } while (!__atomic_compare_exchange(address, &old, &desired, /*weak=*/true, __ATOMIC_RELAXED,
                                      __ATOMIC_RELAXED));
  return old;
#endif
}

// Compare-and-swap on a 32-bit slot; returns the value that was there before.
SEGOPS_HD_INLINE int32_t atomic_cas(int32_t* address, int32_t expected, int32_t desired) {
#if defined(__CUDA_ARCH__)
  return atomicCAS(address, expected, desired);
#else
  __atomic_compare_exchange_n(address, &expected, desired, /*weak=*/false, __ATOMIC_ACQ_REL,
                              __ATOMIC_ACQUIRE);
  return expected;
#endif
}

SEGOPS_HD_INLINE int64_t atomic_cas(int64_t* address, int64_t expected, int64_t desired) {
#if defined(__CUDA_ARCH__)
  return static_cast<int64_t>(atomicCAS(reinterpret_cast<unsigned long long*>(address),
                                        static_cast<unsigned long long>(expected),
                                        static_cast<unsigned long long>(desired)));
#else
  __atomic_compare_exchange_n(address, &expected, desired, /*weak=*/false, __ATOMIC_ACQ_REL,
                              __ATOMIC_ACQUIRE);
  return expected;
#endif
}

// Atomic load that sees a value another thread published with atomic_cas.
template <typename T>
SEGOPS_HD_INLINE T atomic_load(const T* address) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const volatile T*>(address);
#else
  return __atomic_load_n(address, __ATOMIC_ACQUIRE);
#endif
}

#if !defined(__CUDACC__)
// ---- CPU launcher ---------------------------------------------------------------------------------
#if defined(__SANITIZE_THREAD__)
#define SEGOPS_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define SEGOPS_TSAN 1
#endif
#endif
#if defined(SEGOPS_TSAN)
#include <omp.h>

#include <algorithm>
#include <mutex>
extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);
namespace tsan_detail {
inline char fork_token = 0;  // released by the thread that starts a region, acquired by its chunks
inline char join_token = 0;  // released by each chunk, acquired by the starting thread after the region
struct Region {
  int64_t begin, end;
  const void* body;
  void (*run)(const void* body, int64_t b, int64_t e);
};
inline const Region* region = nullptr;  // the running region (one at a time: `lock`)
inline std::mutex lock;
}  // namespace tsan_detail
#endif

// at::parallel_for for every segops CPU kernel. Under ThreadSanitizer (`make tsan`, README "Thread safety") it is
// the same chunking written out as an OpenMP region that tells TSan about the fork and the join, which
// libgomp (not instrumented) implements with futexes TSan cannot see: the starting thread's writes happen
// before each chunk, each chunk happens before the starting thread continues. The region has no shared
// variables (its arguments travel through tsan_detail::region, read after the fork edge): the block that
// GCC passes shared variables in is read by each thread before any annotation could run, and torch's
// at::parallel_for uses one. Chunks of one region get no edge between them, so races inside a region
// (the concurrent hash table, the splat, blur, slice) are reported. Without TSan: at::parallel_for.
template <typename Body>
inline void omp_parallel_for(int64_t begin, int64_t end, int64_t grain, const Body& body) {
#if defined(SEGOPS_TSAN)
  if (begin >= end) return;
  const int64_t n = end - begin;
  int64_t nt = at::get_num_threads();
  if (grain > 0) nt = std::min<int64_t>(nt, (n + grain - 1) / grain);
  if (nt <= 1 || at::in_parallel_region() || omp_in_parallel()) {
    body(begin, end);
    return;
  }
  std::lock_guard<std::mutex> guard(tsan_detail::lock);
  const tsan_detail::Region r{begin, end, &body, [](const void* f, int64_t b, int64_t e) {
                                (*static_cast<const Body*>(f))(b, e);
                              }};
  tsan_detail::region = &r;
  __tsan_release(&tsan_detail::fork_token);
#pragma omp parallel num_threads(static_cast<int>(nt))
  {
    __tsan_acquire(&tsan_detail::fork_token);
    const tsan_detail::Region& g = *tsan_detail::region;
    const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t chunk = (g.end - g.begin + T - 1) / T;
    const int64_t b = g.begin + t * chunk;
    if (b < g.end) g.run(g.body, b, std::min<int64_t>(g.end, b + chunk));
    __tsan_release(&tsan_detail::join_token);
  }
  __tsan_acquire(&tsan_detail::join_token);
  tsan_detail::region = nullptr;
#else
  at::parallel_for(begin, end, grain, body);
#endif
}

// `grain`: the smallest chunk worth a thread; at::parallel_for only runs multi-threaded when the
// extension is compiled with -fopenmp (setup.py does; tests/test_threads.py checks it).
template <typename F>
inline void cpu_parallel_for(index_t n, const F& f, index_t grain = 1024) {
  if (n <= 0) return;
  omp_parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) f(i);
  });
}

// The CPU policy as a value, for host glue written once for both backends (`launch(n, f)`).
struct CpuLaunch {
  index_t grain = 256;
  // Gradient policy of the backward functors: whether the functor itself writes the zeros of skipped
  // pixels, and whether the launch writes every element by other means; else the caller zero-fills.
  template <typename F>
  bool functor_writes_zeros(const F&) const { return false; }
  template <typename F>
  bool writes_every_gradient(const F&) const { return false; }
  template <typename F>
  void operator()(index_t n, const F& f) const { cpu_parallel_for(n, f, grain); }
};
#endif

}  // namespace segops

// ---- deterministic reductions ------------------------------------------------------------------------
// Loss sums are reduced in a fixed order, never with float atomics, so that a result's bits depend only on
// the inputs (and, on a GPU, the device's grid size), not on the thread count or the scheduling.
#if !defined(__CUDACC__)
#include <vector>
#endif

namespace segops {

// Sums v[0..n) in place by a fixed pairwise tree: v[i] += v[i + w] for w = 1, 2, 4, ...; returns the sum
// (Sum{} when n == 0). Sum: an aggregate with operator+ and Sum{} as zero. Error grows as log2(n).
template <typename Sum>
SEGOPS_HD Sum pairwise_sum_inplace(Sum* v, index_t n) {
  if (n <= 0) return Sum{};
  for (index_t w = 1; w < n; w *= 2)
    for (index_t i = 0; i + w < n; i += 2 * w) v[i] = v[i] + v[i + w];
  return v[0];
}

// *address = min(*address, value), atomically: records e.g. the lowest index of a bad element, whichever
// thread finds it first.
SEGOPS_HD_INLINE void atomic_min(int64_t* address, int64_t value) {
#if defined(__CUDA_ARCH__)
  atomicMin(reinterpret_cast<long long*>(address), static_cast<long long>(value));
#else
  int64_t old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (value < old && !__atomic_compare_exchange_n(address, &old, value, /*weak=*/true, __ATOMIC_RELAXED,
                                                     __ATOMIC_RELAXED)) {
  }
#endif
}

#if !defined(__CUDACC__)
// Runs f(task) for task in [0, n) in parallel and returns the pairwise sum of the results in task order:
// the same bits for any thread count, since each task's partial is computed by one thread and the tree's
// shape depends only on n. The caller chooses what a task covers (a fixed number of elements).
template <typename Sum, typename F>
inline Sum cpu_parallel_reduce(index_t n, const F& f, index_t grain = 1) {
  if (n <= 0) return Sum{};
  std::vector<Sum> partial(static_cast<size_t>(n));
  omp_parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) partial[task] = f(task);
  });
  return pairwise_sum_inplace(partial.data(), n);
}
#endif

}  // namespace segops
