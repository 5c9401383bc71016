// CUDA backend of the CRF losses' half-resolution resize: the shared glue over a grid-stride kernel, one output
// (forward) or one pair of input columns (backward) per thread, on the current stream.
#include <torch/library.h>

#include <c10/cuda/CUDAGuard.h>

#include "segops/half_resolution_host.h"
#include "segops/parallel_cuda.cuh"

namespace segops {
namespace {

at::Tensor forward_cuda(const at::Tensor& x) {
  const c10::cuda::CUDAGuard guard(x.device());
  return half_resolution::forward(x, CudaLaunch{});
}

at::Tensor backward_cuda(const at::Tensor& grad, at::IntArrayRef size) {
  const c10::cuda::CUDAGuard guard(grad.device());
  return half_resolution::backward(grad, size, CudaLaunch{});
}

}  // namespace

TORCH_LIBRARY_IMPL(segops, CUDA, m) {
  m.impl("_half_resolution", &forward_cuda);
  m.impl("_half_resolution_backward", &backward_cuda);
}

}  // namespace segops
