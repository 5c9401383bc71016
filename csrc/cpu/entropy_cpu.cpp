// CPU backend of entropy: the shared glue run over at::parallel_for, in chunks of pixels, blocked
// across pixels for NCHW float inputs (softmax_losses_block.h); one parallel region per forward and backward.
#include <torch/library.h>

#include "segops/softmax_losses_block.h"
#include "segops/softmax_losses_host.h"

namespace segops {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> entropy_forward_cpu(
    const at::Tensor& logits, const c10::optional<at::Tensor>& mask, int64_t reduction) {
  return losses::entropy_forward(logits, mask, reduction, block::CpuLossLaunch{});
}

at::Tensor entropy_backward_cpu(const at::Tensor& grad, const at::Tensor& logits,
                                const c10::optional<at::Tensor>& mask, const at::Tensor& lse,
                                const at::Tensor& ex, const at::Tensor& denom, int64_t reduction) {
  return losses::entropy_backward(grad, logits, mask, lse, ex, denom, reduction, block::CpuLossLaunch{});
}

}  // namespace

TORCH_LIBRARY_IMPL(segops, CPU, m) {
  m.impl("entropy", &entropy_forward_cpu);
  m.impl("_entropy_backward", &entropy_backward_cpu);
}

}  // namespace segops
