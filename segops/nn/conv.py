"""Convolution layers on the segops ops: ``AtrousConv2d`` and ``ConvTranspose2d``.

Both subclass their ``torch.nn`` counterparts: same constructor arguments, same initialisation, same
``state_dict`` keys (``weight``, ``bias``), so checkpoints load in either direction. Only ``forward`` differs.
Both take ``backend=`` (``"auto"``, ``"segops"``, ``"vendor"``; default ``None``: follow
:func:`segops.ops.conv_backend` / :func:`segops.ops.set_conv_backend`), also settable later as the ``backend``
attribute; :func:`segops.nn.describe_kernels` reports what each layer ran.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segops.nn.init import bilinear_
from segops.ops.conv import atrous_conv2d, conv_transpose2d
from segops.ops.conv_choice import BACKENDS

__all__ = ["AtrousConv2d", "ConvTranspose2d"]


class AtrousConv2d(nn.Conv2d):
    """Atrous (dilated) 2-D convolution running :func:`segops.ops.atrous_conv2d` (deterministic backward).

    Arguments as :class:`torch.nn.Conv2d`, including ``padding='same'`` / ``'valid'``; a ``padding_mode`` other
    than ``'zeros'`` pads explicitly with :func:`torch.nn.functional.pad` first, as torch does. ``backend``: see the
    module docstring.
    """

    backend: Optional[str] = None  # class default: layers pickled before the option existed

    def __init__(self, *args, backend: Optional[str] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend = _checked_backend(type(self).__name__, backend)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.backend is None else s + ", backend=%r" % self.backend

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
                    return atrous_conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups,
                                        backend=self.backend)
        if self.padding_mode != "zeros":
            x = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return atrous_conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups,
                                        backend=self.backend)
        return atrous_conv2d(input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                            backend=self.backend)


class ConvTranspose2d(nn.ConvTranspose2d):
    """Transposed 2-D convolution running :func:`segops.ops.conv_transpose2d`.

    Arguments as :class:`torch.nn.ConvTranspose2d`, plus

    * ``init="bilinear"``: weight filled by :func:`segops.nn.init.bilinear_` (each channel upsampled on its own),
      bias zeroed. FCN's ×s upsampling is ``ConvTranspose2d(K, K, 2*s, stride=s, padding=s//2, bias=False,
      init="bilinear", trainable=False)``.
    * ``trainable=False``: weight and bias become parameters with ``requires_grad=False``, and a weight that only
      connects channel c to channel c (diagonal, e.g. bilinear with ``groups=1``) runs as the equivalent depthwise
      convolution (``C`` times fewer operations than the dense product: the zero cross-channel terms are skipped).
      The check is cached and redone whenever the weight changes (``load_state_dict``, in-place edits).
    * ``backend``: see the module docstring.
    """

    backend: Optional[str] = None  # class default: layers pickled before the option existed

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
        backend: Optional[str] = None,
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
        self.backend = _checked_backend(type(self).__name__, backend)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.backend is None else s + ", backend=%r" % self.backend

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
                                    self.in_channels, self.dilation, backend=self.backend)
        return conv_transpose2d(input, self.weight, self.bias, self.stride, self.padding, output_padding, self.groups,
                                self.dilation, backend=self.backend)


def _checked_backend(layer: str, backend: Optional[str]) -> Optional[str]:
    if backend is not None and backend not in BACKENDS:
        raise ValueError("%s: backend must be None or one of %s, got %r"
                         % (layer, ", ".join(repr(b) for b in BACKENDS), backend))
    return backend
