// CUDA backend of atrous_conv2d / conv_transpose2d: the shared glue (conv_host.h) run by the CUDA launcher
// (one output element per work item in grid-stride kernels, batched cuBLAS matrix products through ATen).
#include <torch/library.h>

#include "segops/conv_host.h"
#include <c10/cuda/CUDAGuard.h>

#include "segops/parallel_cuda.cuh"

namespace segops {
namespace {

const CudaLaunch kLaunch{};

at::Tensor atrous_cuda(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       int64_t kernel) {
  const c10::cuda::CUDAGuard guard(input.device());
  return conv::atrous_forward(input, weight, bias, stride, padding, dilation, groups, kernel, kLaunch);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> atrous_backward_cuda(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, std::array<bool, 3> mask, int64_t kernel) {
  const c10::cuda::CUDAGuard guard(input.device());
  return conv::atrous_backward(grad, input, weight, stride, padding, dilation, groups, mask, kernel, kLaunch);
}

at::Tensor transpose_cuda(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
                          int64_t groups, at::IntArrayRef dilation, int64_t kernel) {
  const c10::cuda::CUDAGuard guard(input.device());
  return conv::transpose_forward(input, weight, bias, stride, padding, output_padding, groups, dilation, kernel,
                                 kLaunch);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> transpose_backward_cuda(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef output_padding, int64_t groups, at::IntArrayRef dilation,
    std::array<bool, 3> mask, int64_t kernel) {
  const c10::cuda::CUDAGuard guard(input.device());
  return conv::transpose_backward(grad, input, weight, stride, padding, output_padding, groups, dilation, mask,
                                  kernel, kLaunch);
}

}  // namespace

TORCH_LIBRARY_IMPL(segops, CUDA, m) {
  m.impl("atrous_conv2d", &atrous_cuda);
  m.impl("_atrous_conv2d_backward", &atrous_backward_cuda);
  m.impl("conv_transpose2d", &transpose_cuda);
  m.impl("_conv_transpose2d_backward", &transpose_backward_cuda);
}

}  // namespace segops
