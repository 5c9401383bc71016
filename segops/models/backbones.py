"""Encoders of the reference models: VGG16 (with / without BN) and ResNet-50 / 101, every conv a segops layer.

Module names mirror torchvision's ``vgg16`` / ``vgg16_bn`` (``features.<i>``) and ``resnet50`` / ``resnet101``
(``conv1``, ``bn1``, ``layer<k>.<i>.conv<j>``, ``...downsample.0/1``) so that a torchvision ImageNet state_dict maps
onto them key for key. The convolutions are :class:`segops.nn.AtrousConv2d`, a ``torch.nn.Conv2d`` subclass with
the same parameters, so the keys and shapes are exactly torchvision's.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from torch import Tensor, nn

from segops.models._common import scaled
from segops.nn import AtrousConv2d

__all__ = ["VGG16_CFG", "vgg16_features", "conv_indices", "ResNet", "Bottleneck", "RESNET_LAYERS"]

# VGG16 ("configuration D" of Simonyan & Zisserman): conv widths, "M" = 2x2 max-pool.
VGG16_CFG: Tuple = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16_features(
    in_channels: int = 3,
    width: float = 1.0,
    batch_norm: bool = False,
    pools: Optional[Sequence[nn.Module]] = None,
    first_padding: int = 1,
    block5_dilation: int = 1,
) -> nn.Sequential:
    """The 13 conv layers and 5 pools of VGG16 as a Sequential indexed exactly like torchvision's ``features``.

    ``pools``: the five pooling modules (default: 2x2 stride-2 max-pool); ``first_padding``: padding of conv1_1
    (FCN uses 100); ``block5_dilation``: dilation of conv5_x (DeepLab-LargeFOV uses 2).
    """
    if pools is None:
        pools = [nn.MaxPool2d(2, 2) for _ in range(5)]
    if len(pools) != 5:
        raise ValueError("vgg16_features: need 5 pooling modules, got %d" % len(pools))
    layers: List[nn.Module] = []
    c = in_channels
    n_pool = 0
    n_conv = 0
    for v in VGG16_CFG:
        if v == "M":
            layers.append(pools[n_pool])
            n_pool += 1
            continue
        out = scaled(v, width)
        dil = block5_dilation if n_pool == 4 else 1
        pad = first_padding if n_conv == 0 else dil
        layers.append(AtrousConv2d(c, out, 3, padding=pad, dilation=dil))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out))
        layers.append(nn.ReLU(inplace=True))
        c = out
        n_conv += 1
    feats = nn.Sequential(*layers)
    for m in feats.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return feats


def conv_indices(features: nn.Sequential) -> List[int]:
    """Indices of the conv layers inside a VGG ``features`` Sequential."""
    return [i for i, m in enumerate(features) if isinstance(m, nn.Conv2d)]


# ---------------------------------------------------------------------------------------------------------------
# ResNet (He et al., CVPR'16), torchvision layout ("v1.5": the stride sits on the 3x3 conv of a bottleneck).

RESNET_LAYERS: Dict[int, Tuple[int, int, int, int]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample: Optional[nn.Module] = None
    ) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = AtrousConv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = AtrousConv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = AtrousConv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNet(nn.Module):
    """ResNet-50 / 101 trunk without the classification head; ``forward`` returns ``{"layer1".."layer4"}``.

    ``output_stride`` 32 (plain), 16 (layer4 atrous, rate 2) or 8 (layer3 rate 2, layer4 rate 4), the DeepLab
    recipe: the stride of the first block of a dilated stage is removed and that block keeps the previous rate, the
    following blocks use the new rate (torchvision's ``replace_stride_with_dilation``). ``multi_grid`` (DeepLab v3)
    multiplies the rate of layer4's blocks, e.g. (1, 2, 4).
    """

    def __init__(
        self,
        depth: int = 101,
        in_channels: int = 3,
        width: float = 1.0,
        output_stride: int = 32,
        multi_grid: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        if depth not in RESNET_LAYERS:
            raise ValueError("ResNet: depth must be one of %s, got %r" % (sorted(RESNET_LAYERS), depth))
        if output_stride not in (8, 16, 32):
            raise ValueError("ResNet: output_stride must be 8, 16 or 32, got %r" % (output_stride,))
        blocks = RESNET_LAYERS[depth]
        if multi_grid is not None and len(multi_grid) != blocks[3]:
            raise ValueError("ResNet: multi_grid needs %d entries (layer4 blocks), got %r" % (blocks[3], multi_grid))
        self.depth = depth
        self.output_stride = output_stride
        base = scaled(64, width)
        self.inplanes = base
        self.dilation = 1
        self.conv1 = AtrousConv2d(in_channels, base, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        dilate3 = output_stride == 8
        dilate4 = output_stride in (8, 16)
        self.layer1 = self._make_layer(base, blocks[0])
        self.layer2 = self._make_layer(scaled(128, width), blocks[1], stride=2)
        self.layer3 = self._make_layer(scaled(256, width), blocks[2], stride=2, dilate=dilate3)
        self.layer4 = self._make_layer(scaled(512, width), blocks[3], stride=2, dilate=dilate4, multi_grid=multi_grid)
        self.out_channels = self.inplanes
        self.low_level_channels = base * Bottleneck.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(
        self, planes: int, n: int, stride: int = 1, dilate: bool = False, multi_grid: Optional[Sequence[int]] = None
    ) -> nn.Sequential:
        previous = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        grid = list(multi_grid) if (multi_grid is not None and dilate) else [1] * n
        out = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(AtrousConv2d(self.inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
        # First block: the previous rate (torchvision's rule), or the multi-grid unit rate times the new rate.
        first = self.dilation * grid[0] if multi_grid is not None and dilate else previous
        layers = [Bottleneck(self.inplanes, planes, stride, first, downsample)]
        self.inplanes = out
        for i in range(1, n):
            layers.append(Bottleneck(self.inplanes, planes, 1, self.dilation * grid[i]))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return {"layer1": f1, "layer2": f2, "layer3": f3, "layer4": f4}
