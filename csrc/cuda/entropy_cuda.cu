// CUDA backend of entropy: the shared glue on the current stream, one kernel launch per forward (deterministic
// in-kernel reduction) and one per backward.
#include <torch/library.h>

#include <c10/cuda/CUDAGuard.h>

#include "segops/softmax_losses_cuda.cuh"
#include "segops/softmax_losses_host.h"

namespace segops {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> entropy_forward_cuda(
    const at::Tensor& logits, const c10::optional<at::Tensor>& mask, int64_t reduction) {
  const c10::cuda::CUDAGuard guard(logits.device());
  return losses::entropy_forward(logits, mask, reduction, CudaLossLaunch{});
}

at::Tensor entropy_backward_cuda(const at::Tensor& grad, const at::Tensor& logits,
                                const c10::optional<at::Tensor>& mask, const at::Tensor& lse,
                                const at::Tensor& ex, const at::Tensor& denom, int64_t reduction) {
  const c10::cuda::CUDAGuard guard(logits.device());
  return losses::entropy_backward(grad, logits, mask, lse, ex, denom, reduction, CudaLossLaunch{});
}

}  // namespace

TORCH_LIBRARY_IMPL(segops, CUDA, m) {
  m.impl("entropy", &entropy_forward_cuda);
  m.impl("_entropy_backward", &entropy_backward_cuda);
}

}  // namespace segops
