"""FCN-32s / 16s / 8s (Long, Shelhamer, Darrell, *Fully Convolutional Networks for Semantic Segmentation*,
CVPR 2015; PAMI 2017), following the reference Caffe nets of fcn.berkeleyvision.org.

* Encoder: VGG16 conv1_1..pool5 with conv1_1 padded by 100 and ceil-mode pooling (Caffe's), so that every input
  size >= 1 yields a score map covering the image; fc6 (7x7, 4096) and fc7 (1x1, 4096) are convolutions, each
  followed by ReLU and dropout 0.5.
* ``score_fr`` (1x1 -> K); FCN-16s adds ``score_pool4`` (1x1 on pool4), FCN-8s also ``score_pool3``; the class
  scoring layers start at zero, as in the paper.
* Upsampling: transposed convolutions (:class:`segops.nn.ConvTranspose2d`) initialised to bilinear interpolation,
  no bias. The intermediate x2 layers (``upscore2``, ``upscore_pool4``: 21x21 dense, 4x4 stride 2) are learned; the
  final one (x32 / x16 / x8; kernel 2s, stride s) is fixed to bilinear (``trainable=False``) as in the paper. Being
  fixed and per-channel, it is a depthwise (groups = K) transposed conv: the same map as Caffe's dense K x K filter
  whose off-diagonal entries stay zero, at 1/K of the cost.
* Crops align each map to the image, the offsets being those of Caffe's coordinate maps: in image coordinates u,
  pool_k output x sits at u = 2^k x + c_k (c_5 = -83.5 with the 100 padding), fc6 (7x7 valid) adds 3 to the pool5
  index, and a transposed conv with kernel k, stride s maps its input x to s x + (k - 1) / 2. That gives
  score_pool4 crop 5, score_pool3 crop 9, and final crops 19 (32s), 27 (16s), 31 (8s).

``at_once=True`` scales pool4 by 0.01 and pool3 by 1e-4 before their score layers (the "FCN-8s at-once" net of the
PAMI version, trained in one stage instead of 32s -> 16s -> 8s).
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

from torch import Tensor, nn

from segops.models._common import SegmentationModel, check_common, check_input, check_width, reshape_like, scaled
from segops.models.backbones import conv_indices, vgg16_features
from segops.nn import AtrousConv2d, ConvTranspose2d

__all__ = ["FCN"]

# Final crop offsets per variant (see module docstring), and those of the skip score maps.
_FINAL_CROP = {32: 19, 16: 27, 8: 31}
_POOL4_CROP = 5
_POOL3_CROP = 9


def _crop(x: Tensor, offset: int, h: int, w: int) -> Tensor:
    if x.shape[-2] < offset + h or x.shape[-1] < offset + w:
        raise RuntimeError(
            "FCN: internal size error, cannot crop %s at offset %d to %dx%d" % (tuple(x.shape), offset, h, w)
        )
    return x[..., offset : offset + h, offset : offset + w]


class FCN(SegmentationModel):
    """FCN-``stride``s on VGG16; ``stride`` is 32, 16 or 8. Returns logits ``(B, K, H, W)``."""

    def __init__(
        self,
        num_classes: int,
        stride: int = 8,
        in_channels: int = 3,
        width: float = 1.0,
        dropout: float = 0.5,
        at_once: bool = False,
    ) -> None:
        super().__init__()
        check_common("FCN", num_classes, in_channels)
        width = check_width(width)
        if stride not in (8, 16, 32):
            raise ValueError("FCN: stride must be 32, 16 or 8, got %r" % (stride,))
        self.num_classes = K = int(num_classes)
        self.in_channels = int(in_channels)
        self.stride = stride
        self.at_once = bool(at_once)
        self.features = vgg16_features(
            in_channels, width, pools=[nn.MaxPool2d(2, 2, ceil_mode=True) for _ in range(5)], first_padding=100
        )
        pool5_channels = scaled(512, width)
        pool4_channels = scaled(512, width)
        pool3_channels = scaled(256, width)
        fc = scaled(4096, width)
        self.fc6 = AtrousConv2d(pool5_channels, fc, 7)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout(dropout)
        self.fc7 = AtrousConv2d(fc, fc, 1)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout(dropout)
        self.score_fr = AtrousConv2d(fc, K, 1)
        scores = [self.score_fr]
        if stride <= 16:
            self.score_pool4 = AtrousConv2d(pool4_channels, K, 1)
            self.upscore2 = ConvTranspose2d(K, K, 4, stride=2, bias=False, init="bilinear")
            scores.append(self.score_pool4)
        if stride == 8:
            self.score_pool3 = AtrousConv2d(pool3_channels, K, 1)
            self.upscore_pool4 = ConvTranspose2d(K, K, 4, stride=2, bias=False, init="bilinear")
            scores.append(self.score_pool3)
        self.upscore = ConvTranspose2d(
            K, K, 2 * stride, stride=stride, groups=K, bias=False, init="bilinear", trainable=False
        )
        for m in (self.fc6, self.fc7):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        for m in scores:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        convs = conv_indices(self.features)
        pools = [i for i, m in enumerate(self.features) if isinstance(m, nn.MaxPool2d)]
        self._pool3_idx, self._pool4_idx = pools[2], pools[3]
        self._vgg_convs = convs

    def forward(self, x: Tensor) -> Tensor:
        check_input("FCN", x, self.in_channels)
        H, W = x.shape[-2:]
        pool3 = pool4 = None
        for i, m in enumerate(self.features):
            x = m(x)
            if i == self._pool3_idx:
                pool3 = x
            elif i == self._pool4_idx:
                pool4 = x
        x = self.drop6(self.relu6(self.fc6(x)))
        x = self.drop7(self.relu7(self.fc7(x)))
        score = self.score_fr(x)
        if self.stride <= 16:
            up2 = self.upscore2(score)
            p4 = self.score_pool4(pool4 * 0.01 if self.at_once else pool4)
            score = up2 + _crop(p4, _POOL4_CROP, up2.shape[-2], up2.shape[-1])
        if self.stride == 8:
            up4 = self.upscore_pool4(score)
            p3 = self.score_pool3(pool3 * 1e-4 if self.at_once else pool3)
            score = up4 + _crop(p3, _POOL3_CROP, up4.shape[-2], up4.shape[-1])
        out = self.upscore(score)
        return _crop(out, _FINAL_CROP[self.stride], H, W)

    # -- torchvision vgg16 checkpoints ------------------------------------------------------------------------
    def encoder_keys(self) -> List[str]:
        keys = []
        for i in self._vgg_convs:
            keys += ["features.%d.weight" % i, "features.%d.bias" % i]
        return keys + ["fc6.weight", "fc6.bias", "fc7.weight", "fc7.bias"]

    def backbone_mapping(self, sd: Mapping[str, Tensor]) -> Tuple[Dict[str, Tensor], List[str], List[str]]:
        """vgg16 ``features.*`` as is; ``classifier.0`` (25088 -> 4096) reshaped to the 7x7 fc6 conv,
        ``classifier.3`` to the 1x1 fc7 conv ("convolutionalization", Sec. 3.1); ``classifier.6`` (the 1000-way
        ImageNet classifier) is ignored."""
        out: Dict[str, Tensor] = {}
        unexpected: List[str] = []
        ignored: List[str] = []
        own = set(self.encoder_keys())
        for k, v in sd.items():
            if k.startswith("features.") and k in own:
                out[k] = v
            elif k in ("classifier.0.weight", "classifier.0.bias"):
                out["fc6." + k.rsplit(".", 1)[1]] = reshape_like(v, self.fc6.weight.shape if v.dim() == 2 else v.shape)
            elif k in ("classifier.3.weight", "classifier.3.bias"):
                out["fc7." + k.rsplit(".", 1)[1]] = reshape_like(v, self.fc7.weight.shape if v.dim() == 2 else v.shape)
            elif k.startswith("classifier.6."):
                ignored.append(k)
            else:
                unexpected.append(k)
        return out, unexpected, ignored
