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

// The CUDA launcher: the members and their meaning are listed in parallel.h ("launchers").
struct CudaLaunch {
  int threads = 256;

  template <typename F>
  bool functor_writes_zeros(const F&) const { return true; }
  template <typename F>
  bool writes_every_gradient(const F&) const { return false; }
  template <typename F>
  void operator()(index_t n, const F& f) const { cuda_parallel_for(n, f, threads); }
  template <typename F>
  void operator()(index_t n, const F& f, index_t /*cost*/) const { cuda_parallel_for(n, f, threads); }
  index_t segment(index_t /*width*/) const { return 1; }
  int64_t scratch_elements() const { return int64_t(1) << 28; }  // 1 GiB of float
  int64_t batch(int64_t n, int64_t per_item) const {
    const int64_t fit = scratch_elements() / (per_item > 1 ? per_item : 1);
    return std::max<int64_t>(1, std::min<int64_t>(n, fit));
  }
  template <typename F>
  void over_items(int64_t n, double /*flops*/, const F& body) const {
    if (n > 0) body(0, n);
  }
  template <typename F>
  void with_index(bool fits32, const F& f) const {
    if (fits32) {
      f(int32_t{});
    } else {
      f(int64_t{});
    }
  }
};

}  // namespace segops
