"""Convolution layers on the segops ops: ``AtrousConv2d`` and ``ConvTranspose2d``.

Both subclass their ``torch.nn`` counterparts: same constructor arguments, same initialisation, same
``state_dict`` keys (``weight``, ``bias``), so checkpoints load in either direction. Only ``forward`` differs.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segops.nn.init import bilinear_
from segops.ops.conv import atrous_conv2d, conv_transpose2d

__all__ = ["AtrousConv2d", "ConvTranspose2d"]


class AtrousConv2d(nn.Conv2d):
    """Atrous (dilated) 2-D convolution running :func:`segops.ops.atrous_conv2d` (deterministic backward).

    Arguments as :class:`torch.nn.Conv2d`, including ``padding='same'`` / ``'valid'``; a ``padding_mode`` other
    than ``'zeros'`` pads explicitly with :func:`torch.nn.functional.pad` first, as torch does.
    """

    def forward(self, input: Tensor) -> Tensor:
        padding = self.padding
        if isinstance(padding, str):  # 'valid' = 0; 'same' (stride 1, checked by nn.Conv2d) = d (k - 1) split in two
            if padding == "valid":
                padding = (0, 0)
            else:
                total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
                if all(t % 2 == 0 for t in total):
                    padding = (total[0] // 2, total[1] // 2)
                else:  # odd total: torch puts the extra row / column at the end
                    lr = []
                    for t in reversed(total):
                        lr += [t // 2, t - t // 2]
                    mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
                    x = F.pad(input, lr, mode=mode)
                    return atrous_conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        if self.padding_mode != "zeros":
            x = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return atrous_conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return atrous_conv2d(input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)


class ConvTranspose2d(nn.ConvTranspose2d):
    """Transposed 2-D convolution running :func:`segops.ops.conv_transpose2d`.

    Arguments as :class:`torch.nn.ConvTranspose2d`, plus

    * ``init="bilinear"``: weight filled by :func:`segops.nn.init.bilinear_` (each channel upsampled on its own),
      bias zeroed. FCN's ×s upsampling is ``ConvTranspose2d(K, K, 2*s, stride=s, padding=s//2, bias=False,
      init="bilinear", trainable=False)``.
    * ``trainable=False``: weight and bias become parameters with ``requires_grad=False``, and a weight that only
      connects channel c to channel c (diagonal, e.g. bilinear with ``groups=1``) runs the depthwise kernels
      (``C`` times fewer operations than the dense product). The check is cached and redone whenever the
      weight changes (``load_state_dict``, in-place edits).
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
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
                         dilation, padding_mode, device, dtype)
        if init not in (None, "bilinear"):
            raise ValueError("ConvTranspose2d: init must be None or 'bilinear', got %r" % (init,))
        self.init = init
        self.trainable = bool(trainable)
        if init == "bilinear":
            bilinear_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)
        if not self.trainable:
            self.weight.requires_grad_(False)
            if self.bias is not None:
                self.bias.requires_grad_(False)
        self._dw_key = None
        self._dw_weight: Optional[Tensor] = None

    def _depthwise_weight(self) -> Optional[Tensor]:
        """The (C, 1, kH, kW) weight equal to this frozen diagonal weight, or None (cached per weight version)."""
        w = self.weight
        if self.trainable or w.requires_grad or self.in_channels != self.out_channels:
            return None
        if self.groups == self.in_channels:
            return None  # already depthwise: the op takes that path itself
        key = (w.data_ptr(), w._version, w.device, w.dtype)
        if key != self._dw_key:
            with torch.no_grad():
                cin, cog = w.shape[0], w.shape[1]
                c = torch.arange(cin, device=w.device)
                diag = w[c, c % cog]
                off = w.clone()
                off[c, c % cog] = 0
                self._dw_weight = diag.unsqueeze(1).clone() if not bool(off.any()) else None
            self._dw_key = key
        return self._dw_weight

    def forward(self, input: Tensor, output_size: Optional[List[int]] = None) -> Tensor:
        if self.padding_mode != "zeros":
            raise ValueError("ConvTranspose2d: only padding_mode='zeros' is supported")
        num_spatial_dims = 2
        output_padding = self._output_padding(
            input, output_size, self.stride, self.padding, self.kernel_size, num_spatial_dims, self.dilation
        )
        dw = self._depthwise_weight()
        if dw is not None:
            return conv_transpose2d(input, dw, self.bias, self.stride, self.padding, output_padding,
                                    self.in_channels, self.dilation)
        return conv_transpose2d(input, self.weight, self.bias, self.stride, self.padding, output_padding, self.groups,
                                self.dilation)
