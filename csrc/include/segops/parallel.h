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
extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);
#endif

// at::parallel_for for every segops CPU kernel. Under ThreadSanitizer (`make tsan`) it also tells TSan
// about the fork and the join of the OpenMP region, which libgomp (not instrumented) implements with
// futexes TSan cannot see: the caller's writes happen before each chunk (fork), each chunk happens before
// the caller continues (join). Chunks of one region get no edge between them, so races inside a region
// (the concurrent hash table, the splat) are still reported. Without TSan this is at::parallel_for.
template <typename Body>
inline void omp_parallel_for(int64_t begin, int64_t end, int64_t grain, const Body& body) {
#if defined(SEGOPS_TSAN)
  char fork = 0, join = 0;
  __tsan_release(&fork);
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    __tsan_acquire(&fork);
    body(b, e);
    __tsan_release(&join);
  });
  __tsan_acquire(&join);
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
