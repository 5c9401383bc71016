// Execution policies for the write-once kernels (Open3D ParallelFor style): a kernel body is a functor
// `f(index_t i)` holding plain pointers; the CPU runs it under at::parallel_for, CUDA in a grid-stride
// loop (parallel_cuda.cuh). Scatter-adds and hash inserts go through the atomics below so that both
// backends run the same algorithm.
#pragma once

#include "segops/hd.h"

#if !defined(__CUDACC__)
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include "segops/cpu_gemm.h"
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

// ---- launchers: one policy value per backend ---------------------------------------------------
// Host glue written once for both backends takes a launcher (`const Launch&`: CpuLaunch here, CudaLaunch in
// parallel_cuda.cuh) and asks it every question whose answer depends on the hardware, so that the glue itself has
// no device branch:
//
//   launch(n, f)                  f(i) for every i in [0, n): at::parallel_for chunks of `grain` items on the
//                                 CPU, one grid-stride kernel on CUDA.
//   launch(n, f, cost)            the same for items of about `cost` elements of work each: the CPU sizes its
//                                 chunks to ~32k elements (small problems stay on one thread); CUDA ignores it.
//   launch.segment(width)         how many consecutive elements of a row one work item covers: the whole row on
//                                 the CPU (tight, vectorisable loops), one element on CUDA (a thread per output).
//   launch.scratch_elements()     budget of a temporary buffer, in elements: cache-sized on the CPU, a bounded
//                                 share of device memory on CUDA.
//   launch.batch(n, per_item)     how many of n batch items (samples) one matrix product takes, given per_item
//                                 scratch elements each: 1 on the CPU (one product already uses every core), as
//                                 many as the scratch holds on CUDA (launches do not grow with the batch).
//   launch.over_items(n, flops, body)  body(b, e) over [0, n) in ranges: on the CPU in parallel when the items are
//                                 small (flops each) but not tiny, so that several single-threaded BLAS calls run
//                                 at once; otherwise one range, whose BLAS calls use every thread.
//   launch.with_index(fits32, f)  f(int32_t{}) or f(int64_t{}): the index type of the kernel bodies; 32-bit
//                                 where every offset fits and it pays (CUDA's integer division), else 64-bit.
//   launch.sgemm(M, N, K, A, rsA, csA, B, rsB, csB, C, rsC, csC, accumulate)  a float matrix product of segops'
//                                 own, returning false where the backend has none that beats its BLAS (then the
//                                 caller uses ATen's): the CPU's AVX-512 GEMM (cpu_gemm.h), never on CUDA.
//   launch.functor_writes_zeros(f), launch.writes_every_gradient(f): gradient policy of the backward functors
//                                 (whether the functor writes the zeros of skipped pixels, whether the launch
//                                 writes every element by other means; otherwise the caller zero-fills).
struct CpuLaunch {
  index_t grain = 256;

  template <typename F>
  bool functor_writes_zeros(const F&) const { return false; }
  template <typename F>
  bool writes_every_gradient(const F&) const { return false; }
  template <typename F>
  void operator()(index_t n, const F& f) const { cpu_parallel_for(n, f, grain); }
  template <typename F>
  void operator()(index_t n, const F& f, index_t cost) const {
    cpu_parallel_for(n, f, grain_for(cost));
  }
  // Items per chunk for items of about `cost` elements of work each: chunks of ~32k elements.
  static index_t grain_for(index_t cost) {
    const index_t per_item = cost > 1 ? cost : 1;
    return per_item >= (index_t(1) << 15) ? 1 : (index_t(1) << 15) / per_item;
  }
  index_t segment(index_t width) const { return width > 0 ? width : 1; }
  int64_t scratch_elements() const { return int64_t(1) << 22; }  // 16 MiB of float
  int64_t batch(int64_t /*n*/, int64_t /*per_item*/) const { return 1; }
  template <typename F>
  void over_items(int64_t n, double flops, const F& body) const {
    // Below ~2^26 flops per item a BLAS call cannot keep every thread busy; items in parallel can. Below ~2^21
    // flops waking the thread pool costs more than it saves (gradcheck-sized problems stay on one thread).
    const double lo = double(int64_t(1) << 21), hi = double(int64_t(1) << 26);
    if (n > 1 && flops >= lo && flops < hi && at::get_num_threads() > 1 && !at::in_parallel_region()) {
      // the ranges call ATen ops: they run under the caller's grad mode and dispatch keys, not the pool thread's
      const at::ThreadLocalState caller;
      omp_parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
        const at::ThreadLocalStateGuard guard(caller);
        body(b, e);
      });
    } else if (n > 0) {
      body(0, n);
    }
  }
  template <typename F>
  void with_index(bool /*fits32*/, const F& f) const { f(int64_t{}); }
  bool sgemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t rsA, int64_t csA, const float* B, int64_t rsB,
             int64_t csB, float* C, int64_t rsC, int64_t csC, bool accumulate) const {
    return cpu::sgemm(M, N, K, A, rsA, csA, B, rsB, csB, C, rsC, csC, accumulate);
  }
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
