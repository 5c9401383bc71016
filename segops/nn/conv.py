"""Convolution layers: ``AtrousConv2d`` and ``ConvTranspose2d``.

TEMPORARY SHIM (models branch): replaced by the conv branch's segops/nn/conv.py at merge. It implements the agreed
contract (torch.nn subclasses with the same constructor arguments, initialisation and state_dict keys) with torch's
own forward, so that the reference models can be written and tested before the segops conv ops land.
"""

from __future__ import annotations

from typing import List, Optional

from torch import Tensor, nn

from segops.nn.init import bilinear_

__all__ = ["AtrousConv2d", "ConvTranspose2d"]


class AtrousConv2d(nn.Conv2d):
    """Atrous (dilated) 2-D convolution; same arguments, init and state_dict keys as ``torch.nn.Conv2d``."""


class ConvTranspose2d(nn.ConvTranspose2d):
    """Transposed 2-D convolution; ``torch.nn.ConvTranspose2d`` arguments plus ``init`` and ``trainable``.

    ``init="bilinear"`` fills the weight with a per-channel bilinear kernel (:func:`segops.nn.init.bilinear_`) and
    zeroes the bias; ``trainable=False`` freezes weight and bias (``requires_grad=False``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        output_padding=0,
        groups: int = 1,
        bias: bool = True,
        dilation=1,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        init: Optional[str] = None,
        trainable: bool = True,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias, dilation,
            padding_mode, device, dtype,
        )
        if init not in (None, "bilinear"):
            raise ValueError("ConvTranspose2d: init must be None or 'bilinear', got %r" % (init,))
        self.init = init
        if init == "bilinear":
            bilinear_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)
        self.trainable = trainable
        if not trainable:
            self.weight.requires_grad_(False)
            if self.bias is not None:
                self.bias.requires_grad_(False)

    def forward(self, input: Tensor, output_size: Optional[List[int]] = None) -> Tensor:
        return super().forward(input, output_size)
