// CPU backend of atrous_conv2d / conv_transpose2d: the shared glue (conv_host.h) run by the CPU launcher
// (whole output rows per work item under at::parallel_for, BLAS matrix products through ATen).
#include <torch/library.h>

#include "segops/conv_host.h"
#include "segops/parallel.h"

namespace segops {
namespace {

const CpuLaunch kLaunch{};

at::Tensor atrous_cpu(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                      int64_t kernel) {
  return conv::atrous_forward(input, weight, bias, stride, padding, dilation, groups, kernel, kLaunch);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> atrous_backward_cpu(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> mask, int64_t kernel) {
  return conv::atrous_backward(grad, input, weight, stride, padding, dilation, groups, mask, kernel, kLaunch);
}

at::Tensor transpose_cpu(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
                         int64_t groups, at::IntArrayRef dilation, int64_t kernel) {
  return conv::transpose_forward(input, weight, bias, stride, padding, output_padding, groups, dilation, kernel,
                                 kLaunch);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> transpose_backward_cpu(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef output_padding, int64_t groups, at::IntArrayRef dilation,
    std::array<bool, 3> mask, int64_t kernel) {
  return conv::transpose_backward(grad, input, weight, stride, padding, output_padding, groups, dilation, mask,
                                  kernel, kLaunch);
}

}  // namespace

TORCH_LIBRARY_IMPL(segops, CPU, m) {
  m.impl("atrous_conv2d", &atrous_cpu);
  m.impl("_atrous_conv2d_backward", &atrous_backward_cpu);
  m.impl("conv_transpose2d", &transpose_cpu);
  m.impl("_conv_transpose2d_backward", &transpose_backward_cpu);
}

}  // namespace segops
