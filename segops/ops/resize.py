"""The CRF losses' half-resolution resize as one op each way.

``half_resolution(x)`` is ``F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)`` for
``x`` (B, C, H, W): at exactly one half both bilinear weights are 1/2 in each direction, so each output is the
mean of a 2x2 block (a trailing odd row / column is never read). ATen's general resize spends ~5 ms forward and
~8 ms backward (zero fill, then scatter-add) on a 21 x 512 x 512 float map on one CPU thread; this op reads the
input once forward and writes each element of the gradient once backward (~2.2-2.6 ms forward, ~1.1-1.7 ms
backward measured). Float16 / bfloat16 accumulate in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["half_resolution"]

ops = torch.ops.segops

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def half_resolution(x: Tensor) -> Tensor:
    """Mean of each 2 x 2 block: ``x`` (B, C, H, W) floating -> (B, C, H // 2, W // 2), differentiable.

    The values of ``F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)`` up to the
    rounding of one four-term sum, added as ``0.25 ((a + b) + (c + d))``: ATen's order for large outputs (bitwise
    equal at 512²); for small outputs and odd sizes ATen adds the terms in sequence and about a quarter of the
    values differ in the last bit. The result is contiguous.
    """
    return ops._half_resolution.default(x)


@torch.library.register_fake("segops::_half_resolution")
def _half_resolution_fake(x):
    torch._check(x.dim() == 4, lambda: "_half_resolution: x must be (B, C, H, W), got %d dimensions" % x.dim())
    torch._check(x.dtype in _DTYPES,
                 lambda: "_half_resolution: x must be float32, float64, float16 or bfloat16, got %s" % x.dtype)
    return x.new_empty((x.shape[0], x.shape[1], x.shape[2] // 2, x.shape[3] // 2))


@torch.library.register_fake("segops::_half_resolution_backward")
def _half_resolution_backward_fake(grad, size):
    op = "_half_resolution_backward"
    torch._check(grad.dim() == 4, lambda: "%s: grad must be (B, C, H / 2, W / 2), got %d dimensions" % (op, grad.dim()))
    torch._check(grad.dtype in _DTYPES,
                 lambda: "%s: grad must be float32, float64, float16 or bfloat16, got %s" % (op, grad.dtype))
    torch._check(len(size) == 2, lambda: "%s: size must be the input's [H, W], got %s" % (op, list(size)))
    torch._check(grad.shape[2] == size[0] // 2 and grad.shape[3] == size[1] // 2,
                 lambda: "%s: grad must be (B, C, H / 2, W / 2) for size %s, got %s" % (op, list(size),
                                                                                   tuple(grad.shape)))
    return grad.new_empty((grad.shape[0], grad.shape[1], size[0], size[1]))


def _setup(ctx, inputs, output) -> None:
    (x,) = inputs
    ctx.size = (x.shape[2], x.shape[3])


def _backward(ctx, grad: Tensor):
    return ops._half_resolution_backward.default(grad, list(ctx.size))


def _backward_setup(ctx, inputs, output) -> None:
    pass


def _backward_backward(ctx, grad_grad: Tensor):
    # the backward is linear in grad, and its adjoint is the forward
    return ops._half_resolution.default(grad_grad), None


torch.library.register_autograd("segops::_half_resolution", _backward, setup_context=_setup)
torch.library.register_autograd("segops::_half_resolution_backward", _backward_backward, setup_context=_backward_setup)
