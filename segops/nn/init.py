"""Weight initialisers for segops layers."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["bilinear_", "bilinear_kernel_1d"]


def bilinear_kernel_1d(k: int, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """FCN's 1-D bilinear upsampling filter of length ``k``: ``1 - |x - c| / f`` with ``f = ceil(k / 2)`` and
    centre ``c = f - 1`` (odd ``k``) or ``f - 1/2`` (even ``k``). For stride ``s`` FCN uses ``k = 2s - s % 2``.
    """
    if k < 1:
        raise ValueError("bilinear_kernel_1d: kernel length must be positive, got %d" % k)
    f = (k + 1) // 2
    c = f - 1 if k % 2 == 1 else f - 0.5
    x = torch.arange(k, dtype=torch.float64)
    return (1.0 - (x - c).abs() / f).to(dtype=dtype, device=device)


@torch.no_grad()
def bilinear_(weight: Tensor) -> Tensor:
    """Fill a transposed-conv weight ``(C_in, C_out / groups, kH, kW)`` in place with per-channel bilinear kernels.

    Input channel ``c`` feeds only output channel ``c`` (``weight[c, c % (C_out/groups)]`` = the 2-D bilinear
    kernel, everything else 0): ``groups=1`` with ``C_in == C_out`` gives FCN's diagonal 21x21 layout, ``groups=C``
    the depthwise one. With stride ``s``, kernel ``2s``, padding ``s/2`` (even s) the layer then equals
    ``F.interpolate(scale_factor=s, mode='bilinear', align_corners=False)`` away from the borders.
    Returns ``weight``.
    """
    if weight.dim() != 4:
        raise ValueError("bilinear_: weight must be 4-D (C_in, C_out/groups, kH, kW), got shape %s" % (tuple(weight.shape),))
    cin, cout_g, kh, kw = weight.shape
    if cout_g < 1 or cin % cout_g != 0:
        raise ValueError(
            "bilinear_: weight of shape %s cannot hold per-channel filters: C_in (%d) must be a multiple of "
            "C_out/groups (%d)" % (tuple(weight.shape), cin, cout_g)
        )
    k2 = bilinear_kernel_1d(kh)[:, None] * bilinear_kernel_1d(kw)[None, :]
    weight.zero_()
    c = torch.arange(cin, device=weight.device)
    weight[c, c % cout_g] = k2.to(dtype=weight.dtype, device=weight.device)
    return weight
