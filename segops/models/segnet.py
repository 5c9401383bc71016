"""SegNet (Badrinarayanan, Kendall, Cipolla, *SegNet: A Deep Convolutional Encoder-Decoder Architecture for Image
Segmentation*, TPAMI 2017).

* Encoder: the 13 conv layers of VGG16, each 3x3 conv -> BN -> ReLU (torchvision ``vgg16_bn`` ``features`` layout),
  five 2x2 stride-2 max-pools that keep their argmax indices (ceil mode, so odd sizes lose no row or column).
* Decoder: mirror image of the encoder. Each stage max-unpools with the indices of the matching encoder pool (to the
  exact pre-pool size), then 3x3 conv -> BN -> ReLU layers: 512,512,512 | 512,512,256 | 256,256,128 | 128,64 | 64,
  and a final 3x3 conv to the K classes (no BN / ReLU; the softmax lives in the loss), as in the Caffe SegNet net.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from segops.models._common import SegmentationModel, check_common, check_input, check_width, scaled
from segops.models.backbones import conv_indices, vgg16_features
from segops.nn import AtrousConv2d

__all__ = ["SegNet"]

# Decoder stages, deepest first: output widths of the 3x3 convs after each unpooling.
_DECODER = ((512, 512, 512), (512, 512, 256), (256, 256, 128), (128, 64), (64,))


def _cbr(cin: int, cout: int) -> List[nn.Module]:
    return [AtrousConv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SegNet(SegmentationModel):
    """SegNet with a VGG16-BN encoder and max-unpooling decoder; returns logits ``(B, K, H, W)``."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        check_common("SegNet", num_classes, in_channels)
        width = check_width(width)
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        pools = [nn.MaxPool2d(2, 2, ceil_mode=True, return_indices=True) for _ in range(5)]
        self.features = vgg16_features(in_channels, width, batch_norm=True, pools=pools)
        stages = []
        c = scaled(512, width)
        for widths in _DECODER:
            layers: List[nn.Module] = []
            for w in widths:
                layers += _cbr(c, scaled(w, width))
                c = scaled(w, width)
            stages.append(nn.Sequential(*layers))
        self.decoder = nn.ModuleList(stages)
        self.classifier = AtrousConv2d(c, self.num_classes, 3, padding=1)
        for m in list(self.decoder.modules()) + [self.classifier]:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self._vgg_convs = conv_indices(self.features)

    def forward(self, x: Tensor) -> Tensor:
        check_input("SegNet", x, self.in_channels)
        saved = []  # (indices, pre-pool size) per pool
        for m in self.features:
            if isinstance(m, nn.MaxPool2d):
                size = x.shape[-2:]
                x, idx = m(x)
                saved.append((idx, size))
            else:
                x = m(x)
        for stage, (idx, size) in zip(self.decoder, reversed(saved)):
            x = F.max_unpool2d(x, idx, kernel_size=2, stride=2, output_size=size)
            x = stage(x)
        return self.classifier(x)

    # -- torchvision vgg16_bn checkpoints ----------------------------------------------------------------------
    def encoder_keys(self) -> List[str]:
        return [k for k in self.state_dict() if k.startswith("features.")]

    def backbone_mapping(self, sd: Mapping[str, Tensor]) -> Tuple[Dict[str, Tensor], List[str], List[str]]:
        """vgg16_bn ``features.*`` (convs and BN, incl. running statistics) as is; ``classifier.*`` (the fully
        connected layers, which SegNet drops) ignored."""
        own = set(self.encoder_keys())
        out = {k: v for k, v in sd.items() if k in own}
        ignored = [k for k in sd if k.startswith("classifier.")]
        unexpected = [k for k in sd if k not in out and k not in ignored]
        return out, unexpected, ignored
