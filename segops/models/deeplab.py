"""DeepLab v2 (Chen, Papandreou, Kokkinos, Murphy, Yuille, TPAMI 2018) and v3+ (Chen, Zhu, Papandreou, Schroff,
Adam, *Encoder-Decoder with Atrous Separable Convolution*, ECCV 2018), every dilated conv a
:class:`segops.nn.AtrousConv2d`.

**DeepLab-LargeFOV (VGG16)**, as in the released DeepLab v1/v2 nets: VGG16 conv layers; pool1-3 are 3x3 stride-2
pad-1 max-pools, pool4 and pool5 3x3 stride-1 (no subsampling), conv5_x atrous with rate 2, an extra 3x3 stride-1
average pool (``pool5a`` of the v2 net), then fc6 = 3x3 atrous conv with rate 12 and 1024 channels, fc7 = 1x1 1024,
each with ReLU + dropout 0.5, and fc8 = 1x1 to K. Output stride 8. An ImageNet VGG16 initialises fc6 / fc7 by
decimation of its fully connected layers, as the paper does (4096 -> 1024 filters, 7x7 -> 3x3 taps).

**DeepLab-v2 ASPP**: ResNet-101 with atrous layer3 / layer4 (output stride 8) and a v2 ASPP (rates 6, 12, 18, 24,
summed) straight to the classes (the released ResNet-101 model's ``fc1_voc12_c0..3``; ``aspp_hidden=1024`` gives the
paper's ASPP-L branches fc6 -> fc7 -> fc8). ``msc_scales=(1, 0.75, 0.5)`` adds the paper's multi-scale inputs with
max fusion (MSC). ``deeplabv2_aspp_vgg16`` is the paper's VGG16 DeepLab-ASPP-L. The trunk is torchvision's ResNet
("v1.5": stride on the 3x3 conv, so torchvision ImageNet weights fit); the Caffe original strides the first 1x1
conv, which changes no parameter count.

**DeepLab v3+**: ResNet-50 / 101 with atrous last stage(s) (output stride 16: layer4 rate 2; 8: layer3 rate 2,
layer4 rate 4), ASPP v3 (1x1 + three 3x3 atrous at rates 6, 12, 18 — doubled at output stride 8 — + image pooling,
256 channels, BN, concat, 1x1 projection), decoder: low-level layer1 features -> 1x1 conv to 48 -> BN -> ReLU,
concat with the x4-upsampled ASPP output, two 3x3 conv 256 -> BN -> ReLU, 1x1 classifier, x4 upsampling.

All DeepLab models upsample their logits to the input size by bilinear interpolation (align_corners=True, the
semantics of Caffe's Interp layer and of the TF code's resize).
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segops.models._common import SegmentationModel, check_common, check_input, check_width, reshape_like, scaled
from segops.models.backbones import ResNet, conv_indices, vgg16_features
from segops.nn.aspp import ASPP
from segops.nn import AtrousConv2d

__all__ = ["DeepLabLargeFOV", "DeepLabV2ASPPVGG", "DeepLabV2ResNet", "DeepLabV3Plus"]


def _upsample(x: Tensor, size) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def _deeplab_vgg_features(in_channels: int, width: float) -> Tuple[nn.Sequential, nn.Module]:
    pools = [nn.MaxPool2d(3, 2, padding=1, ceil_mode=True) for _ in range(3)]
    pools += [nn.MaxPool2d(3, 1, padding=1, ceil_mode=True) for _ in range(2)]
    feats = vgg16_features(in_channels, width, pools=pools, block5_dilation=2)
    return feats, nn.AvgPool2d(3, 1, padding=1, ceil_mode=True, count_include_pad=True)


def _decimated_fc(sd: Mapping[str, Tensor], prefix: str, fc7_shape) -> Dict[str, Tensor]:
    """DeepLab's fc6/fc7 init from VGG16's fully connected layers: keep every 4th filter (4096 -> 1024) and, for
    fc6, every 3rd tap of the 7x7 kernel (-> 3x3); fc7 keeps every 4th input too. Shapes that do not fit (another
    width) are passed through unchanged so that the shape check reports them."""
    out: Dict[str, Tensor] = {}
    w6, b6 = sd.get("classifier.0.weight"), sd.get("classifier.0.bias")
    w7, b7 = sd.get("classifier.3.weight"), sd.get("classifier.3.bias")
    if w6 is not None:
        if w6.dim() == 2 and w6.shape[1] % 49 == 0 and w6.shape[0] % 4 == 0:
            w6 = w6.reshape(w6.shape[0], -1, 7, 7)[::4, :, ::3, ::3]
        out[prefix + "fc6.weight"] = w6
    if b6 is not None:
        out[prefix + "fc6.bias"] = b6[::4] if b6.shape[0] % 4 == 0 else b6
    if w7 is not None:
        if w7.dim() == 2 and w7.shape[0] % 4 == 0 and w7.shape[1] % 4 == 0:
            w7 = w7[::4, ::4]
        out[prefix + "fc7.weight"] = reshape_like(w7, fc7_shape)
    if b7 is not None:
        out[prefix + "fc7.bias"] = b7[::4] if b7.shape[0] % 4 == 0 else b7
    return out


class _VGGDeepLab(SegmentationModel):
    """Shared torchvision-vgg16 loading of the VGG16 DeepLab nets; subclasses define ``_fc_prefixes()`` (where
    their fc6 / fc7 pairs live)."""

    features: nn.Sequential

    def encoder_keys(self) -> List[str]:
        keys = []
        for i in conv_indices(self.features):
            keys += ["features.%d.weight" % i, "features.%d.bias" % i]
        for p in self._fc_prefixes():
            keys += [p + "fc6.weight", p + "fc6.bias", p + "fc7.weight", p + "fc7.bias"]
        return keys

    def backbone_mapping(self, sd: Mapping[str, Tensor]) -> Tuple[Dict[str, Tensor], List[str], List[str]]:
        own = self.state_dict()
        feats = {k for k in self.encoder_keys() if k.startswith("features.")}
        out = {k: v for k, v in sd.items() if k in feats}
        for p in self._fc_prefixes():
            out.update(_decimated_fc(sd, p, own[p + "fc7.weight"].shape))
        used = set(feats) | {"classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias"}
        ignored = [k for k in sd if k.startswith("classifier.6.")]
        unexpected = [k for k in sd if k not in used and k not in ignored]
        return out, unexpected, ignored


class DeepLabLargeFOV(_VGGDeepLab):
    """DeepLab-LargeFOV on VGG16 (fc6: 3x3, rate 12, 1024 channels); output stride 8."""

    def __init__(
        self, num_classes: int, in_channels: int = 3, width: float = 1.0, dropout: float = 0.5, rate: int = 12
    ) -> None:
        super().__init__()
        check_common("DeepLabLargeFOV", num_classes, in_channels)
        width = check_width(width)
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.features, self.pool5a = _deeplab_vgg_features(in_channels, width)
        c5, fc = scaled(512, width), scaled(1024, width)
        self.fc6 = AtrousConv2d(c5, fc, 3, padding=rate, dilation=rate)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout(dropout)
        self.fc7 = AtrousConv2d(fc, fc, 1)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout(dropout)
        self.fc8 = AtrousConv2d(fc, self.num_classes, 1)
        for m in (self.fc6, self.fc7):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        nn.init.normal_(self.fc8.weight, std=0.01)
        nn.init.zeros_(self.fc8.bias)

    def _fc_prefixes(self) -> List[str]:
        return [""]

    def forward(self, x: Tensor) -> Tensor:
        check_input("DeepLabLargeFOV", x, self.in_channels)
        size = x.shape[-2:]
        x = self.pool5a(self.features(x))
        x = self.drop6(self.relu6(self.fc6(x)))
        x = self.drop7(self.relu7(self.fc7(x)))
        return _upsample(self.fc8(x), size)


class DeepLabV2ASPPVGG(_VGGDeepLab):
    """DeepLab-ASPP-L on VGG16: four fc6 -> fc7 -> fc8 branches with rates 6, 12, 18, 24, summed."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width: float = 1.0,
        rates: Sequence[int] = (6, 12, 18, 24),
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        check_common("DeepLabV2ASPPVGG", num_classes, in_channels)
        width = check_width(width)
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.features, self.pool5a = _deeplab_vgg_features(in_channels, width)
        self.aspp = ASPP(
            scaled(512, width), self.num_classes, rates, "v2", hidden_channels=scaled(1024, width), dropout=dropout
        )

    def _fc_prefixes(self) -> List[str]:
        return ["aspp.branches.%d." % i for i in range(len(self.aspp.branches))]

    def forward(self, x: Tensor) -> Tensor:
        check_input("DeepLabV2ASPPVGG", x, self.in_channels)
        size = x.shape[-2:]
        return _upsample(self.aspp(self.pool5a(self.features(x))), size)


class _ResNetDeepLab(SegmentationModel):
    """Shared torchvision-resnet loading: ``backbone.<key>`` <- ``<key>``; ``fc.*`` ignored."""

    backbone: ResNet

    def encoder_keys(self) -> List[str]:
        return [k for k in self.state_dict() if k.startswith("backbone.")]

    def backbone_mapping(self, sd: Mapping[str, Tensor]) -> Tuple[Dict[str, Tensor], List[str], List[str]]:
        own = set(self.encoder_keys())
        out = {"backbone." + k: v for k, v in sd.items() if "backbone." + k in own}
        ignored = [k for k in sd if k.startswith("fc.")]
        unexpected = [k for k in sd if "backbone." + k not in own and k not in ignored]
        return out, unexpected, ignored


class DeepLabV2ResNet(_ResNetDeepLab):
    """DeepLab-v2 ASPP on ResNet-101 (output stride 8, rates 6/12/18/24 summed)."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width: float = 1.0,
        output_stride: int = 8,
        depth: int = 101,
        rates: Sequence[int] = (6, 12, 18, 24),
        aspp_hidden: Optional[int] = None,
        msc_scales: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__()
        check_common("DeepLabV2ResNet", num_classes, in_channels)
        if msc_scales is not None and (not msc_scales or any(not 0 < float(s) <= 4 for s in msc_scales)):
            raise ValueError("DeepLabV2ResNet: msc_scales must be scales in (0, 4], got %r" % (msc_scales,))
        self.msc_scales = tuple(float(s) for s in msc_scales) if msc_scales else None
        width = check_width(width)
        if output_stride not in (8, 16):
            raise ValueError("DeepLabV2ResNet: output_stride must be 8 or 16, got %r" % (output_stride,))
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.backbone = ResNet(depth, in_channels, width, output_stride)
        hidden = scaled(aspp_hidden, width) if aspp_hidden else None
        self.aspp = ASPP(self.backbone.out_channels, self.num_classes, rates, "v2", hidden_channels=hidden)

    def forward(self, x: Tensor) -> Tensor:
        check_input("DeepLabV2ResNet", x, self.in_channels)
        size = x.shape[-2:]
        if not self.msc_scales:
            return _upsample(self.aspp(self.backbone(x)["layer4"]), size)
        # MSC (DeepLab v2, Sec. 4.3): the shared net on rescaled copies of the image, logits brought to the input
        # size and fused by a per-pixel max over the scales.
        outs = []
        for s in self.msc_scales:
            hs, ws = max(1, int(size[0] * s + 0.5)), max(1, int(size[1] * s + 0.5))  # round half up
            xs = x if (hs, ws) == tuple(size) else _upsample(x, (hs, ws))
            outs.append(_upsample(self.aspp(self.backbone(xs)["layer4"]), size))
        return torch.stack(outs).amax(0)


class DeepLabV3Plus(_ResNetDeepLab):
    """DeepLab v3+ on ResNet-50 / 101: atrous encoder + ASPP with image pooling + decoder with a layer1 skip."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width: float = 1.0,
        output_stride: int = 16,
        depth: int = 101,
        rates: Optional[Sequence[int]] = None,
        multi_grid: Optional[Sequence[int]] = None,
        separable: bool = False,
        aspp_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        check_common("DeepLabV3Plus", num_classes, in_channels)
        width = check_width(width)
        if output_stride not in (8, 16):
            raise ValueError("DeepLabV3Plus: output_stride must be 8 or 16, got %r" % (output_stride,))
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.output_stride = output_stride
        if rates is None:
            rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
        self.backbone = ResNet(depth, in_channels, width, output_stride, multi_grid)
        c = scaled(256, width)
        self.aspp = ASPP(self.backbone.out_channels, c, rates, "v3", separable=separable, dropout=aspp_dropout)
        low = scaled(48, width)
        self.low_level = nn.Sequential(
            AtrousConv2d(self.backbone.low_level_channels, low, 1, bias=False), nn.BatchNorm2d(low), nn.ReLU(inplace=True)
        )

        def sep_or_conv(cin: int, cout: int) -> List[nn.Module]:
            if separable:
                return [
                    AtrousConv2d(cin, cin, 3, padding=1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                    nn.ReLU(inplace=True), AtrousConv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True),
                ]
            return [AtrousConv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.decoder = nn.Sequential(*(sep_or_conv(c + low, c) + sep_or_conv(c, c)))
        self.classifier = AtrousConv2d(c, self.num_classes, 1)
        for m in list(self.low_level.modules()) + list(self.decoder.modules()):
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: Tensor) -> Tensor:
        check_input("DeepLabV3Plus", x, self.in_channels)
        size = x.shape[-2:]
        feats = self.backbone(x)
        low = self.low_level(feats["layer1"])
        y = _upsample(self.aspp(feats["layer4"]), low.shape[-2:])
        y = self.decoder(torch.cat([y, low], dim=1))
        return _upsample(self.classifier(y), size)
