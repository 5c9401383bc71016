// CPU backend of atrous_conv2d / conv_transpose2d: the shared glue (conv_host.h) with one output row per
// work item under at::parallel_for, BLAS matrix products through ATen.
#include <torch/library.h>

#include "segops/conv_host.h"
#include "segops/parallel.h"

namespace segops {
namespace {

// Row-granular work items are heavier than the elementwise ops' pixels: a small grain keeps threads busy.
const CpuLaunch kLaunch{4};

at::Tensor atrous_cpu(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return conv::atrous_forward(input, weight, bias, stride, padding, dilation, groups, kLaunch, false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> atrous_backward_cpu(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> mask) {
  return conv::atrous_backward(grad, input, weight, stride, padding, dilation, groups, mask, kLaunch, false);
}

at::Tensor transpose_cpu(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
                         int64_t groups, at::IntArrayRef dilation) {
  return conv::transpose_forward(input, weight, bias, stride, padding, output_padding, groups, dilation, kLaunch,
                                 false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> transpose_backward_cpu(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef output_padding, int64_t groups, at::IntArrayRef dilation,
    std::array<bool, 3> mask) {
  return conv::transpose_backward(grad, input, weight, stride, padding, output_padding, groups, dilation, mask,
                                  kLaunch, false);
}

}  // namespace

TORCH_LIBRARY_IMPL(segops, CPU, m) {
  m.impl("atrous_conv2d", &atrous_cpu);
  m.impl("_atrous_conv2d_backward", &atrous_backward_cpu);
  m.impl("conv_transpose2d", &transpose_cpu);
  m.impl("_conv_transpose2d_backward", &transpose_backward_cpu);
}

}  // namespace segops
