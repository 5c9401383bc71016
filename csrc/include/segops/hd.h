// Shared host/device definitions: the per-element math of every op is written once against these.
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define SEGOPS_HD __host__ __device__
#define SEGOPS_HD_INLINE __host__ __device__ __forceinline__
#else
#define SEGOPS_HD
#define SEGOPS_HD_INLINE inline
#endif

// Hot helpers of the CPU loops are forced inline so that the CPU backend's AVX2 clone of a loop (a function
// compiled with target("avx2") around the same body) vectorises them too; on CUDA: the usual HD inline.
#if defined(__CUDACC__) || !defined(__GNUC__)
#define SEGOPS_LATTICE_INLINE SEGOPS_HD_INLINE
#else
#define SEGOPS_LATTICE_INLINE inline __attribute__((always_inline))
#endif
// The same for a lambda (after its parameter list). A lambda's body is a function of its own, compiled for the
// default target: one called from a target("avx2") / ("avx512f") clone without being inlined runs as baseline
// x86-64 code, its 8-lane vectors emulated through the stack (the build's 8-point code generation did, until this).
#if defined(__GNUC__) && !defined(__CUDACC__)
#define SEGOPS_LAMBDA_INLINE __attribute__((always_inline))
#else
#define SEGOPS_LAMBDA_INLINE
#endif

namespace segops {

// 64-bit indices everywhere: a 16x21x4096x4096 tensor already exceeds 2^31 elements.
using index_t = int64_t;

template <typename T>
SEGOPS_HD_INLINE T hd_max(T a, T b) { return a > b ? a : b; }
template <typename T>
SEGOPS_HD_INLINE T hd_min(T a, T b) { return a < b ? a : b; }

SEGOPS_HD_INLINE float hd_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);  // full precision: the __expf intrinsic is 2 ulp off and not the bottleneck
#else
  return std::exp(x);
#endif
}
SEGOPS_HD_INLINE double hd_exp(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}
SEGOPS_HD_INLINE float hd_log(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return std::log(x);
#endif
}
SEGOPS_HD_INLINE double hd_log(double x) {
#if defined(__CUDA_ARCH__)
  return ::log(x);
#else
  return std::log(x);
#endif
}

// Accumulation type: half / bfloat16 inputs accumulate in float, float in float, double in double.
template <typename T>
struct acc_type { using type = float; };
template <>
struct acc_type<double> { using type = double; };
template <typename T>
using acc_t = typename acc_type<T>::type;

}  // namespace segops
