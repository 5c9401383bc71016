"""Atrous (dilated) and transposed 2-D convolution with deterministic backward passes.

Both ops take the arguments of :func:`torch.nn.functional.conv2d` / :func:`torch.nn.functional.conv_transpose2d`
with the same meaning and weight layout, and return the same values (up to floating-point rounding).
They share one geometry: the input-gradient of an atrous conv is a transposed conv with the same
stride / padding / dilation / groups, and vice versa, so three kernels (correlate, its adjoint, and
the weight gradient) serve both ops in both directions. No backward pass uses atomics: results are
bit-identical from run to run.

Kernels: every call runs either segops' own kernels or the vendor's (ATen's convolution: oneDNN or its native
kernels on the CPU, cuDNN on CUDA), forward and backward chosen separately by :mod:`segops.ops.conv_choice`
(``backend=`` per call or layer, :func:`segops.ops.conv_backend` / :func:`segops.ops.set_conv_backend`; default
``"auto"``: a measured per-shape rule). segops' own kernels, chosen by geometry inside the op:

    * ``depthwise`` (``groups == C_in == C_out``): direct gather kernels, no matrix product;
    * ``gemm-1x1`` (1x1, stride 1, no padding): a matrix product over the input itself, bias folded in;
    * ``gemm-rows`` (vertical stride 1): the input unfolded along the width only; one matrix product per kernel row
      over a shifted range of rows, written straight into the NCHW output;
    * ``gemm-im2col`` (otherwise): im2col / col2im gather kernels around matrix products (BLAS / cuBLAS).

half / bfloat16 inputs are computed in float32 and rounded once at the end. In a profiler trace a segops kernel shows
as ``segops::conv/<kernel>`` inside ``segops::atrous_conv2d`` / ``segops::conv_transpose2d``; a call routed entirely
to the vendor shows as ``segops::<op>[vendor]`` around ATen's ``aten::convolution``.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from segops.ops import conv_choice

__all__ = ["atrous_conv2d", "conv_transpose2d", "conv_output_size", "conv_transpose_output_size"]

IntPair = Union[int, Sequence[int]]


def _pair(name: str, v: IntPair) -> List[int]:
    t = type(v)
    if t is int:
        return [v, v]
    if (t is tuple or t is list) and len(v) == 2 and type(v[0]) is int and type(v[1]) is int:
        return [v[0], v[1]]  # the layers' (h, w) tuples: the common case, checked without a generator
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


def _require(cond, fmt: str, *args) -> None:
    """Raise RuntimeError(fmt % args) unless cond. A symbolic condition (fake / meta kernels under dynamic shapes)
    goes through torch._check instead, with a message closure torch.compile can trace (constants only)."""
    if isinstance(cond, bool):
        if not cond:
            raise RuntimeError(fmt % args)
    else:
        torch._check(cond, lambda: fmt)


def _check_common(op: str, input: Tensor, weight: Tensor, stride, padding, dilation, output_padding, groups) -> None:
    if (input.dim() == 4 and weight.dim() == 4 and stride[0] > 0 and stride[1] > 0 and padding[0] >= 0
            and padding[1] >= 0 and dilation[0] > 0 and dilation[1] > 0 and groups > 0
            and 0 <= output_padding[0] < max(stride[0], dilation[0])
            and 0 <= output_padding[1] < max(stride[1], dilation[1])):
        return  # the common case, without building any message
    _require(input.dim() == 4, "%s: input must be 4-D (N, C, H, W), got %d-D", op, input.dim())
    _require(weight.dim() == 4, "%s: weight must be 4-D, got %d-D %s", op, weight.dim(), tuple(weight.shape))
    _require(all(s > 0 for s in stride), "%s: stride must be positive, got %s", op, stride)
    _require(all(p >= 0 for p in padding), "%s: padding must be non-negative, got %s", op, padding)
    _require(all(d > 0 for d in dilation), "%s: dilation must be positive, got %s", op, dilation)
    _require(groups > 0, "%s: groups must be positive, got %s", op, groups)
    _require(all(0 <= o < max(s, d) for o, s, d in zip(output_padding, stride, dilation)),
             "%s: output_padding (%s) must be non-negative and smaller than either stride (%s) or dilation (%s)",
             op, output_padding, stride, dilation)


def _check_tensors(op: str, input: Tensor, weight: Tensor, bias: Optional[Tensor], c_out) -> None:
    """dtype / device / bias checks, as the C++ kernels make them (the vendor route must refuse what segops does)."""
    dev, dt = input.device, input.dtype
    if (dt.is_floating_point and weight.device == dev and weight.dtype == dt and weight.shape[2] > 0
            and weight.shape[3] > 0 and (bias is None or (bias.device == dev and bias.dtype == dt and bias.dim() == 1
                                                          and bias.shape[0] == c_out))):
        return
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _require(t.device == input.device, "%s: %s is on %s but input is on %s", op, name, t.device,
                     input.device)
    _require(input.dtype.is_floating_point, "%s: input must be float32, float64, float16 or bfloat16, got %s", op,
             input.dtype)
    _require(weight.dtype == input.dtype, "%s: weight dtype %s must equal the input dtype %s", op, weight.dtype,
             input.dtype)
    _require(weight.shape[2] > 0 and weight.shape[3] > 0, "%s: kernel size must be positive, got weight %s", op,
             tuple(weight.shape))
    if bias is not None:
        _require(bias.dim() == 1 and bias.shape[0] == c_out, "%s: bias must have shape (out_channels,) = (%s,), got %s",
                 op, c_out, tuple(bias.shape))
        _require(bias.dtype == input.dtype, "%s: bias dtype %s must equal the input dtype %s", op, bias.dtype,
                 input.dtype)


def _atrous_output_size(input: Tensor, weight: Tensor, stride, padding, dilation, groups) -> Tuple[int, int]:
    """Checks an atrous call (every check of the C++ op) and returns (H_out, W_out)."""
    ho = conv_output_size(input.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    wo = conv_output_size(input.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    if input.shape[1] == weight.shape[1] * groups and weight.shape[0] % groups == 0 and ho > 0 and wo > 0:
        return ho, wo
    _require(input.shape[1] == weight.shape[1] * groups,
             "atrous_conv2d: input has %s channels but weight expects in_channels = weight.size(1) * groups = %s",
             input.shape[1], weight.shape[1] * groups)
    _require(weight.shape[0] % groups == 0,
             "atrous_conv2d: out_channels (weight.size(0) = %s) must be divisible by groups (%s)", weight.shape[0],
             groups)
    _require(ho > 0 and wo > 0, "atrous_conv2d: padded input is smaller than the dilated kernel")
    return ho, wo


def _transpose_output_size(input: Tensor, weight: Tensor, stride, padding, output_padding, groups,
                           dilation) -> Tuple[int, int]:
    """Checks a transposed call (every check of the C++ op) and returns (H_out, W_out)."""
    ho = conv_transpose_output_size(input.shape[2], weight.shape[2], stride[0], padding[0], output_padding[0],
                                    dilation[0])
    wo = conv_transpose_output_size(input.shape[3], weight.shape[3], stride[1], padding[1], output_padding[1],
                                    dilation[1])
    if (weight.shape[0] == input.shape[1] and input.shape[1] % groups == 0 and ho > 0 and wo > 0
            and input.shape[2] > 0 and input.shape[3] > 0):
        return ho, wo
    _require(weight.shape[0] == input.shape[1],
             "conv_transpose2d: input has %s channels but weight.size(0) (in_channels) is %s", input.shape[1],
             weight.shape[0])
    _require(input.shape[1] % groups == 0, "conv_transpose2d: in_channels (%s) must be divisible by groups (%s)",
             input.shape[1], groups)
    _require(ho > 0 and wo > 0, "conv_transpose2d: the output size (%s x %s) would not be positive", ho, wo)
    _require(input.shape[2] > 0 and input.shape[3] > 0, "conv_transpose2d: input spatial size must be positive, got %s",
             tuple(input.shape))
    return ho, wo


def _unbatched(input: Tensor) -> bool:
    return input.dim() == 3


def _vendor_label(op: str):
    """A profiler range naming the choice around a call routed to ATen (only while a profiler records)."""
    if not torch.compiler.is_compiling() and torch._C._autograd._profiler_enabled():
        return torch.autograd.profiler.record_function("segops::%s[vendor]" % op)
    return contextlib.nullcontext()


# ---- atrous_conv2d --------------------------------------------------------------------------------------


def atrous_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    *,
    backend: Optional[str] = None,
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
        backend: ``"auto"``, ``"segops"`` or ``"vendor"``; ``None`` (default) follows
            :func:`segops.ops.conv_backend` / :func:`segops.ops.set_conv_backend`.

    Returns:
        ``(N, C_out, H_out, W_out)``, ``H_out = (H + 2p - d(kH - 1) - 1) // s + 1``; contiguous from segops'
        kernels, in ATen's memory format (channels_last in, channels_last out) from the vendor's.
    """
    s, p, d = _pair("stride", stride), _pair("padding", padding), _pair("dilation", dilation)
    if _unbatched(input):
        return atrous_conv2d(input.unsqueeze(0), weight, bias, s, p, d, groups, backend=backend).squeeze(0)
    groups = int(groups)
    _check_common("atrous_conv2d", input, weight, s, p, d, [0, 0], groups)
    kernel = conv_choice.choose(False, input, weight, s, p, d, groups, backend)
    if kernel == conv_choice.VENDOR_FORWARD | conv_choice.VENDOR_BACKWARD:
        _check_tensors("atrous_conv2d", input, weight, bias, weight.shape[0])
        _atrous_output_size(input, weight, s, p, d, groups)
        with _vendor_label("atrous_conv2d"):
            return F.conv2d(input, weight, bias, s, p, d, groups)
    return torch.ops.segops.atrous_conv2d.default(input, weight, bias, s, p, d, groups, kernel)


@torch.library.register_fake("segops::atrous_conv2d")
def _atrous_fake(input, weight, bias, stride, padding, dilation, groups, route=0):
    _check_common("atrous_conv2d", input, weight, stride, padding, dilation, [0, 0], groups)
    _check_tensors("atrous_conv2d", input, weight, bias, weight.shape[0])
    ho, wo = _atrous_output_size(input, weight, stride, padding, dilation, groups)
    return input.new_empty((input.shape[0], weight.shape[0], ho, wo))


@torch.library.register_fake("segops::_atrous_conv2d_backward")
def _atrous_backward_fake(grad_output, input, weight, stride, padding, dilation, groups, output_mask, route=0):
    return _grads_like(input, weight, output_mask)


def _grads_like(input: Tensor, weight: Tensor, mask, n_bias: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    gi = torch.empty_like(input, memory_format=torch.contiguous_format) if mask[0] else input.new_empty((0,))
    gw = torch.empty_like(weight, memory_format=torch.contiguous_format) if mask[1] else input.new_empty((0,))
    bias_len = weight.shape[0] if n_bias is None else n_bias
    gb = input.new_empty((bias_len,)) if mask[2] else input.new_empty((0,))
    return gi, gw, gb


def _backward_kernel(kernel: int) -> int:
    """The backward op's ``route`` argument (1 = vendor) from the forward's bit flags."""
    return 1 if kernel & conv_choice.VENDOR_BACKWARD else 0


def _atrous_setup(ctx, inputs, output) -> None:
    input, weight, bias, stride, padding, dilation, groups, kernel = inputs
    ctx.save_for_backward(input, weight)
    ctx.args = (stride, padding, dilation, groups)
    ctx.has_bias = bias is not None
    ctx.kernel = _backward_kernel(kernel)


def _atrous_backward(ctx, grad: Tensor):
    input, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [bool(need[0]), bool(need[1]), bool(ctx.has_bias and need[2])]
    if not any(mask):
        return None, None, None, None, None, None, None, None
    gi, gw, gb = torch.ops.segops._atrous_conv2d_backward.default(grad, input, weight, *ctx.args, mask, ctx.kernel)
    return (gi if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None, None, None, None, None, None)


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
    *,
    backend: Optional[str] = None,
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
        backend: ``"auto"``, ``"segops"`` or ``"vendor"``; ``None`` (default) follows the global setting.

    Returns:
        ``(N, C_out, H_out, W_out)``, ``H_out = (H - 1)s - 2p + d(kH - 1) + output_padding + 1``.
    """
    s, p, op, d = (_pair("stride", stride), _pair("padding", padding), _pair("output_padding", output_padding),
                   _pair("dilation", dilation))
    if _unbatched(input):
        return conv_transpose2d(input.unsqueeze(0), weight, bias, s, p, op, groups, d, backend=backend).squeeze(0)
    groups = int(groups)
    _check_common("conv_transpose2d", input, weight, s, p, d, op, groups)
    kernel = conv_choice.choose(True, input, weight, s, p, d, groups, backend)
    if kernel == conv_choice.VENDOR_FORWARD | conv_choice.VENDOR_BACKWARD:
        _check_tensors("conv_transpose2d", input, weight, bias, weight.shape[1] * groups)
        _transpose_output_size(input, weight, s, p, op, groups, d)
        with _vendor_label("conv_transpose2d"):
            return F.conv_transpose2d(input, weight, bias, s, p, op, groups, d)
    return torch.ops.segops.conv_transpose2d.default(input, weight, bias, s, p, op, groups, d, kernel)


@torch.library.register_fake("segops::conv_transpose2d")
def _transpose_fake(input, weight, bias, stride, padding, output_padding, groups, dilation, route=0):
    _check_common("conv_transpose2d", input, weight, stride, padding, dilation, output_padding, groups)
    _check_tensors("conv_transpose2d", input, weight, bias, weight.shape[1] * groups)
    ho, wo = _transpose_output_size(input, weight, stride, padding, output_padding, groups, dilation)
    return input.new_empty((input.shape[0], weight.shape[1] * groups, ho, wo))


@torch.library.register_fake("segops::_conv_transpose2d_backward")
def _transpose_backward_fake(grad_output, input, weight, stride, padding, output_padding, groups, dilation,
                             output_mask, route=0):
    return _grads_like(input, weight, output_mask, n_bias=weight.shape[1] * groups)


def _transpose_setup(ctx, inputs, output) -> None:
    input, weight, bias, stride, padding, output_padding, groups, dilation, kernel = inputs
    ctx.save_for_backward(input, weight)
    ctx.args = (stride, padding, output_padding, groups, dilation)
    ctx.has_bias = bias is not None
    ctx.kernel = _backward_kernel(kernel)


def _transpose_backward(ctx, grad: Tensor):
    input, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [bool(need[0]), bool(need[1]), bool(ctx.has_bias and need[2])]
    if not any(mask):
        return None, None, None, None, None, None, None, None, None
    gi, gw, gb = torch.ops.segops._conv_transpose2d_backward.default(grad, input, weight, *ctx.args, mask,
                                                                     ctx.kernel)
    return (gi if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None,
            None, None, None, None, None, None)


torch.library.register_autograd("segops::conv_transpose2d", _transpose_backward, setup_context=_transpose_setup)
