"""U-Net (Ronneberger, Fischer, Brox, *U-Net: Convolutional Networks for Biomedical Image Segmentation*, MICCAI
2015), with padded 3x3 convolutions so that the output has the input's size.

* Contracting path: 4 stages of two 3x3 conv -> ReLU (64, 128, 256, 512 channels) each followed by a 2x2 stride-2
  max-pool, then the bottom stage (two 3x3 convs, 1024). Dropout (p = 0.5) at the end of the contracting path
  (after the 512 stage and the 1024 stage), as in the paper's Caffe net.
* Expanding path: 4 stages of a 2x2 stride-2 "up-convolution" (:class:`segops.nn.ConvTranspose2d`) halving the
  channels, concatenation with the encoder feature map of the same level, two 3x3 conv -> ReLU; then a 1x1 conv to
  the K classes.
* Odd sizes: the pools run in ceil mode and each up-convolution's output is cropped to the skip's size (the paper
  crops the skip instead, its convolutions being unpadded).

``batch_norm=True`` inserts BN after every 3x3 conv (a common modern variant, not the paper's).
"""

from __future__ import annotations

from typing import List

import torch
from torch import Tensor, nn

from segops.models._common import SegmentationModel, check_common, check_input, check_width, scaled
from segops.nn import AtrousConv2d, ConvTranspose2d

__all__ = ["UNet"]


def _double_conv(cin: int, cout: int, batch_norm: bool) -> nn.Sequential:
    layers: List[nn.Module] = []
    for c in (cin, cout):
        layers.append(AtrousConv2d(c, cout, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class UNet(SegmentationModel):
    """U-Net with padded convolutions; returns logits ``(B, K, H, W)``."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width: float = 1.0,
        dropout: float = 0.5,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        check_common("UNet", num_classes, in_channels)
        width = check_width(width)
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        chans = [scaled(c, width) for c in (64, 128, 256, 512, 1024)]
        self.down = nn.ModuleList()
        c = in_channels
        for co in chans:
            self.down.append(_double_conv(c, co, batch_norm))
            c = co
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.drop4 = nn.Dropout(dropout)
        self.drop5 = nn.Dropout(dropout)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for co in reversed(chans[:-1]):
            self.up.append(ConvTranspose2d(c, co, 2, stride=2))
            self.dec.append(_double_conv(2 * co, co, batch_norm))
            c = co
        self.classifier = AtrousConv2d(c, self.num_classes, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                # The paper: Gaussian with std sqrt(2 / N), N = fan-in (He init).
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        check_input("UNet", x, self.in_channels)
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = self.pool(x)
            x = block(x)
            if i == 3:
                x = self.drop4(x)
            if i < 4:
                skips.append(x)
        x = self.drop5(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            x = up(x)[..., : skip.shape[-2], : skip.shape[-1]]
            x = dec(torch.cat([skip, x], dim=1))
        return self.classifier(x)
