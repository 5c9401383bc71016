// CUDA backend of the dense CRF mean-field update: the shared glue over a grid-stride kernel (one thread per
// pixel; adjacent threads read adjacent pixels of each class row) on the current stream; and the one-op
// inference schedule (_crf_mean_field_iterate), the shared one of crf_iterate_shared.h.
#include <torch/library.h>

#include <c10/cuda/CUDAGuard.h>

#include "segops/crf_iterate_shared.h"
#include "segops/crf_meanfield_host.h"
#include "segops/parallel_cuda.cuh"

namespace segops {
namespace {

at::Tensor forward_cuda(const at::Tensor& unary, at::TensorList messages, at::TensorList scales,
                        at::ArrayRef<double> weights) {
  const c10::cuda::CUDAGuard guard(unary.device());
  return meanfield::forward(unary, messages, scales, weights, CudaLaunch{});
}

void forward_out_cuda(const at::Tensor& unary, at::TensorList messages, at::TensorList scales,
                            at::ArrayRef<double> weights, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(unary.device());
  meanfield::forward_into(unary, messages, scales, weights, out, CudaLaunch{});
}

at::Tensor backward_cuda(const at::Tensor& grad, const at::Tensor& q) {
  const c10::cuda::CUDAGuard guard(q.device());
  return meanfield::backward(grad, q, CudaLaunch{});
}

// The lattice functions' launcher (launch(n, functor, grain), blur_per_channel) for the shared schedule.
struct CudaIterateLaunch {
  template <typename F>
  static void launch(index_t n, const F& f, index_t /*grain*/) {
    cuda_parallel_for(n, f, 256);
  }
  template <typename F>
  static void ranged(index_t n, const F& f, index_t grain) {
    launch(n, f, grain);
  }
  static bool blur_per_channel() { return true; }  // one thread per (vertex, channel): coalesced rows
};

// No-grad dense CRF inference with Potts kernels in one op: the shared schedule (crf_iterate_shared.h).
at::Tensor iterate_cuda(const at::Tensor& unary, at::TensorList vertex, at::TensorList bary, at::TensorList neighbors,
                        at::IntArrayRef normalization, at::ArrayRef<double> weights, int64_t iterations) {
  const c10::cuda::CUDAGuard guard(unary.device());
  return meanfield::iterate_shared<meanfield::GatherSplatBackend<CudaIterateLaunch>>(
      unary, vertex, bary, neighbors, normalization, weights, iterations);
}

}  // namespace

TORCH_LIBRARY_IMPL(segops, CUDA, m) {
  m.impl("_crf_mean_field_iterate", &iterate_cuda);
  m.impl("crf_mean_field_update", &forward_cuda);
  m.impl("_crf_mean_field_update_out", &forward_out_cuda);
  m.impl("_crf_mean_field_update_backward", &backward_cuda);
}

}  // namespace segops
