// CUDA launcher for the write-once kernel bodies of parallel.h: one grid-stride kernel per functor.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "segops/parallel.h"

namespace segops {

template <typename F>
__global__ void grid_stride_kernel(index_t n, F f) {
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) f(i);
}

// Runs f(i) for i in [0, n) on the current stream of the current device.
template <typename F>
inline void cuda_parallel_for(index_t n, const F& f, int threads = 256) {
  if (n <= 0) return;
  const index_t max_blocks = index_t(1) << 20;  // grid-stride covers the rest; keeps launches cheap
  const index_t blocks = std::min<index_t>((n + threads - 1) / threads, max_blocks);
  grid_stride_kernel<F><<<static_cast<unsigned>(blocks), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(n, f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The CUDA policy as a value, for host glue written once for both backends (`launch(n, f)`).
struct CudaLaunch {
  int threads = 256;
  // Gradient policy of the backward functors: whether the functor itself writes the zeros of skipped
  // pixels, and whether the launch writes every element by other means; else the caller zero-fills.
  template <typename F>
  bool functor_writes_zeros(const F&) const { return true; }
  template <typename F>
  bool writes_every_gradient(const F&) const { return false; }
  template <typename F>
  void operator()(index_t n, const F& f) const { cuda_parallel_for(n, f, threads); }
};

}  // namespace segops
