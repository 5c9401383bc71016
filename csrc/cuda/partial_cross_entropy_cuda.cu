// CUDA backend of partial_cross_entropy: the shared glue on the current stream, one kernel launch per forward
// (deterministic in-kernel reduction) and one per backward; no host synchronisation unless check_labels.
#include <torch/library.h>

#include <c10/cuda/CUDAGuard.h>

#include "segops/softmax_losses_cuda.cuh"
#include "segops/softmax_losses_host.h"

namespace segops {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> pce_forward_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                               const c10::optional<at::Tensor>& weight,
                                                               int64_t reduction, int64_t ignore_index,
                                                               double label_smoothing, bool check_labels) {
  const c10::cuda::CUDAGuard guard(logits.device());
  return losses::pce_forward(logits, target, weight, reduction, ignore_index, label_smoothing, check_labels,
                             CudaLossLaunch{});
}

at::Tensor pce_backward_cuda(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                            const c10::optional<at::Tensor>& weight, const at::Tensor& lse,
                            const at::Tensor& denom, int64_t reduction, int64_t ignore_index,
                            double label_smoothing) {
  const c10::cuda::CUDAGuard guard(logits.device());
  return losses::pce_backward(grad, logits, target, weight, lse, denom, reduction, ignore_index,
                              label_smoothing, CudaLossLaunch{});
}

}  // namespace

TORCH_LIBRARY_IMPL(segops, CUDA, m) {
  m.impl("partial_cross_entropy", &pce_forward_cuda);
  m.impl("_partial_cross_entropy_backward", &pce_backward_cuda);
}

}  // namespace segops
