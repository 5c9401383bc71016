"""Atrous (dilated) and transposed 2-D convolution with deterministic backward passes.

Both ops take the arguments of :func:`torch.nn.functional.conv2d` / :func:`torch.nn.functional.conv_transpose2d`
with the same meaning and weight layout, and return the same values (up to floating-point rounding).
They share one geometry: the input-gradient of an atrous conv is a transposed conv with the same
stride / padding / dilation / groups, and vice versa, so three kernels (correlate, its adjoint, and
the weight gradient) serve both ops in both directions. No backward pass uses atomics: results are
bit-identical from run to run.

Paths (chosen inside the op):
    * depthwise (``groups == C_in == C_out``): direct gather kernels, no matrix product;
    * otherwise: im2col / col2im gather kernels around ATen matrix products per group (BLAS / cuBLAS).
half / bfloat16 inputs are computed in float32 and rounded once at the end.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from segops.ops._checks import check_same_device

__all__ = ["atrous_conv2d", "conv_transpose2d", "conv_output_size", "conv_transpose_output_size"]

IntPair = Union[int, Sequence[int]]


def _pair(name: str, v: IntPair) -> List[int]:
    if isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool):
        return [v, v]
    try:
        vals = list(v)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError("%s must be an int or a pair of ints, got %r" % (name, v)) from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or not all(isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool) for x in vals):
        raise ValueError("%s must be an int or a pair of ints, got %r" % (name, v))
    return vals


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of an atrous conv along one axis: ``(size + 2p - d(k-1) - 1) // s + 1``."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_transpose_output_size(size: int, kernel: int, stride: int, padding: int, output_padding: int,
                               dilation: int) -> int:
    """Output length of a transposed conv along one axis: ``(size-1)s - 2p + d(k-1) + output_padding + 1``."""
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def _check_common(op: str, input: Tensor, weight: Tensor, stride, padding, dilation, output_padding, groups) -> None:
    torch._check(input.dim() == 4, lambda: "%s: input must be 4-D (N, C, H, W), got %d-D" % (op, input.dim()))
    torch._check(weight.dim() == 4, lambda: "%s: weight must be 4-D, got %d-D %s" % (op, weight.dim(), tuple(weight.shape)))
    torch._check(all(s > 0 for s in stride), lambda: "%s: stride must be positive, got %s" % (op, stride))
    torch._check(all(p >= 0 for p in padding), lambda: "%s: padding must be non-negative, got %s" % (op, padding))
    torch._check(all(d > 0 for d in dilation), lambda: "%s: dilation must be positive, got %s" % (op, dilation))
    torch._check(groups > 0, lambda: "%s: groups must be positive, got %s" % (op, groups))
    torch._check(
        all(0 <= o < max(s, d) for o, s, d in zip(output_padding, stride, dilation)),
        lambda: "%s: output_padding (%s) must be non-negative and smaller than either stride (%s) or dilation (%s)"
        % (op, output_padding, stride, dilation),
    )


def _unbatched(input: Tensor) -> bool:
    return input.dim() == 3


# ---- atrous_conv2d --------------------------------------------------------------------------------------


def atrous_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> Tensor:
    """Dilated ("atrous", à trous) 2-D cross-correlation, as :func:`torch.nn.functional.conv2d`.

    ``out[n, o, y, x] = bias[o] + sum_{c, i, j} weight[o, c, i, j] * input[n, g*C_in/groups + c,
    y*s_h - p_h + i*d_h, x*s_w - p_w + j*d_w]`` (zero outside the input).

    Args:
        input: ``(N, C_in, H, W)`` or unbatched ``(C_in, H, W)``; float32 / float64 / float16 / bfloat16,
            any strides (channels_last works without a copy).
        weight: ``(C_out, C_in / groups, kH, kW)``, same dtype and device.
        bias: optional ``(C_out,)``.
        stride, padding, dilation: ints or ``(h, w)`` pairs; stride, dilation > 0, padding >= 0 (zero padding;
            string padding such as ``'same'`` is not supported).
        groups: C_in and C_out must both be divisible by it. ``groups == C_in == C_out`` runs the direct
            depthwise kernels.

    Returns:
        ``(N, C_out, H_out, W_out)`` contiguous, ``H_out = (H + 2p - d(kH - 1) - 1) // s + 1``.
    """
    s, p, d = _pair("stride", stride), _pair("padding", padding), _pair("dilation", dilation)
    if _unbatched(input):
        return atrous_conv2d(input.unsqueeze(0), weight, bias, s, p, d, groups).squeeze(0)
    return torch.ops.segops.atrous_conv2d.default(input, weight, bias, s, p, d, int(groups))


@torch.library.register_fake("segops::atrous_conv2d")
def _atrous_fake(input, weight, bias, stride, padding, dilation, groups):
    _check_common("atrous_conv2d", input, weight, stride, padding, dilation, [0, 0], groups)
    check_same_device("atrous_conv2d", "input", input, weight=weight, bias=bias)
    torch._check(
        input.shape[1] == weight.shape[1] * groups,
        lambda: "atrous_conv2d: input has %s channels but weight expects in_channels = weight.size(1) * groups = %s"
        % (input.shape[1], weight.shape[1] * groups),
    )
    torch._check(weight.shape[0] % groups == 0, lambda: "atrous_conv2d: out_channels must be divisible by groups")
    ho = conv_output_size(input.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    wo = conv_output_size(input.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    torch._check(ho > 0 and wo > 0, lambda: "atrous_conv2d: padded input is smaller than the dilated kernel")
    return input.new_empty((input.shape[0], weight.shape[0], ho, wo))


@torch.library.register_fake("segops::_atrous_conv2d_backward")
def _atrous_backward_fake(grad_output, input, weight, stride, padding, dilation, groups, output_mask):
    return _grads_like(input, weight, output_mask)


def _grads_like(input: Tensor, weight: Tensor, mask, n_bias: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    gi = torch.empty_like(input, memory_format=torch.contiguous_format) if mask[0] else input.new_empty((0,))
    gw = torch.empty_like(weight, memory_format=torch.contiguous_format) if mask[1] else input.new_empty((0,))
    nb = weight.shape[0] if n_bias is None else n_bias
    gb = input.new_empty((nb,)) if mask[2] else input.new_empty((0,))
    return gi, gw, gb


def _atrous_setup(ctx, inputs, output) -> None:
    input, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(input, weight)
    ctx.args = (stride, padding, dilation, groups)
    ctx.has_bias = bias is not None


def _atrous_backward(ctx, grad: Tensor):
    input, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [bool(need[0]), bool(need[1]), bool(ctx.has_bias and need[2])]
    if not any(mask):
        return None, None, None, None, None, None, None
    gi, gw, gb = torch.ops.segops._atrous_conv2d_backward.default(grad, input, weight, *ctx.args, mask)
    return (gi if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None, None, None, None, None)


torch.library.register_autograd("segops::atrous_conv2d", _atrous_backward, setup_context=_atrous_setup)


# ---- conv_transpose2d -------------------------------------------------------------------------------------


def conv_transpose2d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    output_padding: IntPair = 0,
    groups: int = 1,
    dilation: IntPair = 1,
) -> Tensor:
    """Transposed 2-D convolution ("deconvolution"), as :func:`torch.nn.functional.conv_transpose2d`.

    The adjoint of :func:`atrous_conv2d` with the same weight and geometry: every input pixel ``(y, x)``
    adds ``weight[c, o, i, j] * input[n, c, y, x]`` to output pixel ``(y*s_h - p_h + i*d_h,
    x*s_w - p_w + j*d_w)`` (computed as a gather: each output pixel sums the contributions reaching it).

    Args:
        input: ``(N, C_in, H, W)`` or unbatched ``(C_in, H, W)``, any strides.
        weight: ``(C_in, C_out / groups, kH, kW)``.
        bias: optional ``(C_out,)``.
        stride, padding, output_padding, dilation: ints or pairs; ``0 <= output_padding < max(stride, dilation)``.
        groups: C_in and C_out divisible by it; ``groups == C_in == C_out`` runs the depthwise kernels.

    Returns:
        ``(N, C_out, H_out, W_out)`` contiguous, ``H_out = (H - 1)s - 2p + d(kH - 1) + output_padding + 1``.
    """
    s, p, op, d = (_pair("stride", stride), _pair("padding", padding), _pair("output_padding", output_padding),
                   _pair("dilation", dilation))
    if _unbatched(input):
        return conv_transpose2d(input.unsqueeze(0), weight, bias, s, p, op, groups, d).squeeze(0)
    return torch.ops.segops.conv_transpose2d.default(input, weight, bias, s, p, op, int(groups), d)


@torch.library.register_fake("segops::conv_transpose2d")
def _transpose_fake(input, weight, bias, stride, padding, output_padding, groups, dilation):
    _check_common("conv_transpose2d", input, weight, stride, padding, dilation, output_padding, groups)
    check_same_device("conv_transpose2d", "input", input, weight=weight, bias=bias)
    torch._check(
        weight.shape[0] == input.shape[1],
        lambda: "conv_transpose2d: input has %s channels but weight.size(0) (in_channels) is %s"
        % (input.shape[1], weight.shape[0]),
    )
    torch._check(input.shape[1] % groups == 0, lambda: "conv_transpose2d: in_channels must be divisible by groups")
    ho = conv_transpose_output_size(input.shape[2], weight.shape[2], stride[0], padding[0], output_padding[0],
                                    dilation[0])
    wo = conv_transpose_output_size(input.shape[3], weight.shape[3], stride[1], padding[1], output_padding[1],
                                    dilation[1])
    torch._check(ho > 0 and wo > 0, lambda: "conv_transpose2d: the output size would not be positive")
    return input.new_empty((input.shape[0], weight.shape[1] * groups, ho, wo))


@torch.library.register_fake("segops::_conv_transpose2d_backward")
def _transpose_backward_fake(grad_output, input, weight, stride, padding, output_padding, groups, dilation,
                             output_mask):
    return _grads_like(input, weight, output_mask, n_bias=weight.shape[1] * groups)


def _transpose_setup(ctx, inputs, output) -> None:
    input, weight, bias, stride, padding, output_padding, groups, dilation = inputs
    ctx.save_for_backward(input, weight)
    ctx.args = (stride, padding, output_padding, groups, dilation)
    ctx.has_bias = bias is not None


def _transpose_backward(ctx, grad: Tensor):
    input, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [bool(need[0]), bool(need[1]), bool(ctx.has_bias and need[2])]
    if not any(mask):
        return None, None, None, None, None, None, None, None
    gi, gw, gb = torch.ops.segops._conv_transpose2d_backward.default(grad, input, weight, *ctx.args, mask)
    return (gi if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None, None, None, None, None, None)


torch.library.register_autograd("segops::conv_transpose2d", _transpose_backward, setup_context=_transpose_setup)
