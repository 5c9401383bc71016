"""Weight initialisers for segops layers.

TEMPORARY SHIM (models branch): replaced by the conv branch's segops/nn/init.py at merge. It implements the
agreed contract ``bilinear_(weight)`` so that the reference models can be written and tested meanwhile.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["bilinear_"]


def _bilinear_1d(k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    # FCN's upsample filter: factor = ceil(k/2), centre at factor-1 (k odd) or factor-0.5 (k even).
    factor = (k + 1) // 2
    center = factor - 1 if k % 2 == 1 else factor - 0.5
    x = torch.arange(k, dtype=torch.float64)
    return (1 - (x - center).abs() / factor).to(dtype=dtype, device=device)


@torch.no_grad()
def bilinear_(weight: Tensor) -> Tensor:
    """Fill a transposed-conv weight ``(C_in, C_out/groups, kH, kW)`` with a per-channel bilinear kernel.

    Channel i of each group maps to channel i of the same group only (a diagonal, per-channel filter), so the
    layer upsamples every channel independently. Needs ``C_in/groups == C_out/groups`` per group, which is
    ``weight.shape[0] // groups == weight.shape[1]``; the group count is inferred as ``C_in / weight.shape[1]``
    when that holds for the diagonal layout.
    """
    if weight.dim() != 4:
        raise ValueError("bilinear_: weight must be 4-D (C_in, C_out/groups, kH, kW), got shape %s" % (tuple(weight.shape),))
    cin, cout_g, kh, kw = weight.shape
    if cin % cout_g != 0:
        raise ValueError(
            "bilinear_: weight of shape %s cannot be a per-channel filter: C_in (%d) must be a multiple of "
            "C_out/groups (%d)" % (tuple(weight.shape), cin, cout_g)
        )
    kernel = _bilinear_1d(kh, weight.dtype, weight.device)[:, None] * _bilinear_1d(kw, weight.dtype, weight.device)[None, :]
    weight.zero_()
    idx = torch.arange(cin, device=weight.device)
    weight[idx, idx % cout_g] = kernel
    return weight
