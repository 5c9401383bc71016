// CUDA backend of entropy: the shared glue run over a grid-stride kernel on the current stream.
#include <torch/library.h>

#include <c10/cuda/CUDAGuard.h>

#include "segops/parallel_cuda.cuh"
#include "segops/softmax_losses_host.h"

namespace segops {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> entropy_forward_cuda(
    const at::Tensor& logits, const c10::optional<at::Tensor>& mask, int64_t reduction) {
  const c10::cuda::CUDAGuard guard(logits.device());
  return losses::entropy_forward(logits, mask, reduction, CudaLaunch{});
}

at::Tensor entropy_backward_cuda(const at::Tensor& grad, const at::Tensor& logits,
                                const c10::optional<at::Tensor>& mask, const at::Tensor& lse,
                                const at::Tensor& ex, const at::Tensor& denom, int64_t reduction) {
  const c10::cuda::CUDAGuard guard(logits.device());
  return losses::entropy_backward(grad, logits, mask, lse, ex, denom, reduction, CudaLaunch{});
}

}  // namespace

TORCH_LIBRARY_IMPL(segops, CUDA, m) {
  m.impl("entropy", &entropy_forward_cuda);
  m.impl("_entropy_backward", &entropy_backward_cuda);
}

}  // namespace segops
