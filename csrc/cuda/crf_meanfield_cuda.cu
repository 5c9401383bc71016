// CUDA backend of the dense CRF mean-field update: the shared glue over a grid-stride kernel (one thread per
// pixel; adjacent threads read adjacent pixels of each class row) on the current stream.
#include <torch/library.h>

#include <c10/cuda/CUDAGuard.h>

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

// The one-op inference schedule is the CPU's (one pass over the pixels per iteration, splatting as it goes);
// on the GPU, MeanFieldCRF / dense_crf_inference run crf_mean_field_update and the lattice filters instead.
// Called directly on CUDA tensors, it says so rather than the dispatcher's "could not run".
at::Tensor iterate_cuda(const at::Tensor& unary, at::TensorList, at::TensorList, at::TensorList, at::IntArrayRef,
                        at::ArrayRef<double>, int64_t) {
  TORCH_CHECK(false, "_crf_mean_field_iterate is the CPU schedule of dense CRF inference (got unary on ",
              unary.device(), "); on CUDA, segops.ops.dense_crf_inference / MeanFieldCRF run crf_mean_field_update ",
              "and the lattice filters. Call those, or move the tensors to the CPU.");
  return at::Tensor();
}

}  // namespace

TORCH_LIBRARY_IMPL(segops, CUDA, m) {
  m.impl("_crf_mean_field_iterate", &iterate_cuda);
  m.impl("crf_mean_field_update", &forward_cuda);
  m.impl("_crf_mean_field_update_out", &forward_out_cuda);
  m.impl("_crf_mean_field_update_backward", &backward_cuda);
}

}  // namespace segops
