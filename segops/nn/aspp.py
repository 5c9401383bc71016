"""Atrous Spatial Pyramid Pooling (DeepLab v2 and v3 / v3+), built on :class:`segops.nn.AtrousConv2d`.

Two variants:

``variant="v2"`` (Chen et al., *DeepLab*, TPAMI 2018, Sec. 3.3 and Fig. 4): parallel branches, one per rate,
whose outputs are **summed**. Each branch is, as in the paper's DeepLab-ASPP-L on VGG16,
``fc6`` (3x3 atrous, rate r) -> ReLU -> dropout -> ``fc7`` (1x1) -> ReLU -> dropout -> ``fc8`` (1x1 classifier),
with ``hidden_channels`` (1024 in the paper) channels. ``hidden_channels=None`` gives one 3x3 atrous conv per
branch straight to ``out_channels`` (the released DeepLab-v2 ResNet-101 model, ``fc1_voc12_c0..c3``).
Here ``out_channels`` is the number of classes.

``variant="v3"`` (Chen et al., *Rethinking Atrous Convolution*, 2017, Sec. 3.3; used by v3+): a 1x1 branch,
one 3x3 atrous branch per rate and an image-pooling branch (global average pool -> 1x1 -> BN -> ReLU -> bilinear
upsample), each with ``branch_channels`` channels and BN + ReLU; the branches are **concatenated** and projected by
1x1 -> BN -> ReLU -> dropout to ``out_channels``. ``separable=True`` makes the atrous branches depthwise-separable
(depthwise 3x3 atrous -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU, as in DeepLab v3+ with Xception).

Shapes: input ``(B, in_channels, H, W)`` -> output ``(B, out_channels, H, W)`` (padding = rate keeps the size).
With the image-pooling branch, BatchNorm in training mode needs more than one value per channel, i.e. batch > 1
(freeze BN, ``model.eval()`` on the BN layers, for batch-1 fine-tuning as DeepLab does).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

# Through the package, not a module path: segops/nn/__init__.py imports the conv layers before this module.
from segops.nn.conv import AtrousConv2d

__all__ = ["ASPP"]


def _rates(rates: Optional[Sequence[int]], variant: str) -> tuple:
    if rates is None:
        return (6, 12, 18, 24) if variant == "v2" else (6, 12, 18)
    rates = tuple(int(r) for r in rates)
    if not rates or any(r < 1 for r in rates):
        raise ValueError("ASPP: rates must be a non-empty sequence of positive ints, got %r" % (rates,))
    return rates


class _ImagePooling(nn.Sequential):
    """Global average pool -> 1x1 conv -> BN -> ReLU, then bilinear upsampling back to the input size."""

    def __init__(self, in_channels: int, out_channels: int, norm_layer: Callable[[int], nn.Module]) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            AtrousConv2d(in_channels, out_channels, 1, bias=False),
            norm_layer(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        y = super().forward(x)
        # A 1x1 map upsampled bilinearly is a constant broadcast; expand is the exact, allocation-free equivalent.
        return y.expand(-1, -1, size[0], size[1])


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling; see the module docstring for the two variants.

    Args:
        in_channels: channels of the input feature map.
        out_channels: v2: number of classes (each branch ends in a classifier, outputs are summed);
            v3: channels after the projection (256 in the paper).
        rates: atrous rates of the 3x3 branches; default (6, 12, 18, 24) for v2 and (6, 12, 18) for v3
            (output stride 16; double them for output stride 8).
        variant: ``"v2"`` (sum of branches) or ``"v3"`` (concat + image pooling + projection).
        hidden_channels: v2 only: width of each branch's fc6 / fc7 (1024 in the paper); ``None`` or 0 = one 3x3
            atrous conv per branch directly to ``out_channels``.
        branch_channels: v3 only: channels of every branch (default: ``out_channels``).
        dropout: dropout probability (v2: after fc6 and fc7, default 0.5; v3: after the projection, default 0.1).
        image_pooling: v3 only: include the image-level (global average pooling) branch.
        separable: v3 only: depthwise-separable atrous branches.
        norm_layer: v3 only: normalisation layer factory (default ``nn.BatchNorm2d``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rates: Optional[Sequence[int]] = None,
        variant: str = "v2",
        *,
        hidden_channels: Optional[int] = 1024,
        branch_channels: Optional[int] = None,
        dropout: Optional[float] = None,
        image_pooling: bool = True,
        separable: bool = False,
        norm_layer: Optional[Callable[[int], nn.Module]] = None,
    ) -> None:
        super().__init__()
        if variant not in ("v2", "v3"):
            raise ValueError("ASPP: variant must be 'v2' or 'v3', got %r" % (variant,))
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if int(v) < 1:
                raise ValueError("ASPP: %s must be >= 1, got %r" % (name, v))
        if hidden_channels is not None and int(hidden_channels) < 0:
            raise ValueError("ASPP: hidden_channels must be None or >= 0, got %r" % (hidden_channels,))
        if dropout is not None and not 0.0 <= float(dropout) < 1.0:
            raise ValueError("ASPP: dropout must be in [0, 1), got %r" % (dropout,))
        self.variant = variant
        self.rates = _rates(rates, variant)
        self.in_channels = in_channels
        self.out_channels = out_channels
        if variant == "v2":
            p = 0.5 if dropout is None else float(dropout)
            self.branches = nn.ModuleList(
                self._v2_branch(in_channels, out_channels, r, hidden_channels, p) for r in self.rates
            )
        else:
            p = 0.1 if dropout is None else float(dropout)
            norm = norm_layer or nn.BatchNorm2d
            c = int(branch_channels or out_channels)
            branches = [
                nn.Sequential(AtrousConv2d(in_channels, c, 1, bias=False), norm(c), nn.ReLU(inplace=True))
            ]
            for r in self.rates:
                branches.append(self._v3_branch(in_channels, c, r, separable, norm))
            if image_pooling:
                branches.append(_ImagePooling(in_channels, c, norm))
            self.branches = nn.ModuleList(branches)
            self.project = nn.Sequential(
                AtrousConv2d(len(branches) * c, out_channels, 1, bias=False),
                norm(out_channels),
                nn.ReLU(inplace=True),
                nn.Dropout(p),
            )
        self.reset_parameters()

    @staticmethod
    def _v2_branch(cin: int, cout: int, rate: int, hidden: Optional[int], p: float) -> nn.Sequential:
        if not hidden:
            return nn.Sequential(OrderedDict(conv=AtrousConv2d(cin, cout, 3, padding=rate, dilation=rate)))
        return nn.Sequential(
            OrderedDict(
                fc6=AtrousConv2d(cin, hidden, 3, padding=rate, dilation=rate),
                relu6=nn.ReLU(inplace=True),
                drop6=nn.Dropout(p),
                fc7=AtrousConv2d(hidden, hidden, 1),
                relu7=nn.ReLU(inplace=True),
                drop7=nn.Dropout(p),
                fc8=AtrousConv2d(hidden, cout, 1),
            )
        )

    @staticmethod
    def _v3_branch(cin: int, c: int, rate: int, separable: bool, norm) -> nn.Sequential:
        if not separable:
            return nn.Sequential(
                AtrousConv2d(cin, c, 3, padding=rate, dilation=rate, bias=False), norm(c), nn.ReLU(inplace=True)
            )
        return nn.Sequential(
            AtrousConv2d(cin, cin, 3, padding=rate, dilation=rate, groups=cin, bias=False),
            norm(cin),
            nn.ReLU(inplace=True),
            AtrousConv2d(cin, c, 1, bias=False),
            norm(c),
            nn.ReLU(inplace=True),
        )

    def reset_parameters(self) -> None:
        classifiers = set()
        if self.variant == "v2":
            # DeepLab's classifier init (the last conv of every branch): Gaussian, std 0.01, zero bias.
            classifiers = {id([m for m in b if isinstance(m, nn.Conv2d)][-1]) for b in self.branches}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if id(m) in classifiers:
                    nn.init.normal_(m.weight, std=0.01)
                else:
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                "ASPP: input must be (B, %d, H, W), got shape %s" % (self.in_channels, tuple(x.shape))
            )
        if self.variant == "v2":
            out = self.branches[0](x)
            for b in self.branches[1:]:
                out = out + b(x)
            return out
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))

    def extra_repr(self) -> str:
        return "variant=%s, rates=%s" % (self.variant, self.rates)
