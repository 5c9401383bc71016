// CPU backend of partial_cross_entropy: the shared glue run over at::parallel_for, in chunks of pixels, blocked
// across pixels for NCHW float inputs (softmax_losses_block.h); one parallel region per forward and backward.
#include <torch/library.h>

#include "segops/softmax_losses_block.h"
#include "segops/softmax_losses_host.h"

namespace segops {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> pce_forward_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                               const c10::optional<at::Tensor>& weight,
                                                               int64_t reduction, int64_t ignore_index,
                                                               double label_smoothing, bool check_labels) {
  return losses::pce_forward(logits, target, weight, reduction, ignore_index, label_smoothing, check_labels,
                             block::CpuLossLaunch{});
}

at::Tensor pce_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                            const c10::optional<at::Tensor>& weight, const at::Tensor& lse,
                            const at::Tensor& denom, int64_t reduction, int64_t ignore_index,
                            double label_smoothing) {
  return losses::pce_backward(grad, logits, target, weight, lse, denom, reduction, ignore_index,
                              label_smoothing, block::CpuLossLaunch{});
}

}  // namespace

TORCH_LIBRARY_IMPL(segops, CPU, m) {
  m.impl("partial_cross_entropy", &pce_forward_cpu);
  m.impl("_partial_cross_entropy_backward", &pce_backward_cpu);
}

}  // namespace segops
