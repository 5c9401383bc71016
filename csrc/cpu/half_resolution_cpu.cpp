// CPU backend of the CRF losses' half-resolution resize: the shared glue over at::parallel_for, a whole output
// row (forward) or input row (backward) per work item.
#include <torch/library.h>

#include "segops/half_resolution_host.h"

namespace segops {
namespace {

at::Tensor forward_cpu(const at::Tensor& x) { return half_resolution::forward(x, CpuLaunch{}); }

at::Tensor backward_cpu(const at::Tensor& grad, at::IntArrayRef size) {
  return half_resolution::backward(grad, size, CpuLaunch{});
}

}  // namespace

TORCH_LIBRARY_IMPL(segops, CPU, m) {
  m.impl("_half_resolution", &forward_cpu);
  m.impl("_half_resolution_backward", &backward_cpu);
}

}  // namespace segops
