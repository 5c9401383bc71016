"""Reference segmentation models built on segops layers: FCN, SegNet, U-Net, DeepLab v2 / v3+.

``get_model(name, num_classes, in_channels=3, output_stride=None, width=1.0, backbone_weights=None, **kwargs)``
builds one by name (``list_models()``); every model maps ``(B, in_channels, H, W)`` to logits
``(B, num_classes, H, W)`` for any H, W >= 1. ``width`` scales every channel count (0.125-0.25 trains on a CPU);
``backbone_weights`` is a path to a local torchvision-format ImageNet checkpoint (vgg16, vgg16_bn, resnet50,
resnet101 key names) loaded into the encoder; nothing is ever downloaded. Every dilated and transposed convolution is
a :class:`segops.nn.AtrousConv2d` / :class:`segops.nn.ConvTranspose2d` (ordinary convs are ``AtrousConv2d`` with
dilation 1); :func:`to_torch_layers` gives the same model with torch.nn's conv layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from torch import nn

from segops.models._common import (
    BackboneLoadReport,
    SegmentationModel,
    count_parameters,
    freeze_bn,
    to_torch_layers,
)
from segops.models.backbones import ResNet, vgg16_features
from segops.models.deeplab import DeepLabLargeFOV, DeepLabV2ASPPVGG, DeepLabV2ResNet, DeepLabV3Plus
from segops.models.fcn import FCN
from segops.models.segnet import SegNet
from segops.models.unet import UNet

__all__ = [
    "get_model",
    "list_models",
    "model_info",
    "FCN",
    "SegNet",
    "UNet",
    "DeepLabLargeFOV",
    "DeepLabV2ASPPVGG",
    "DeepLabV2ResNet",
    "DeepLabV3Plus",
    "ResNet",
    "vgg16_features",
    "BackboneLoadReport",
    "SegmentationModel",
    "count_parameters",
    "freeze_bn",
    "to_torch_layers",
]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    build: Callable[..., SegmentationModel]
    output_strides: Tuple[int, ...]  # encoder output strides it supports; the first is the default
    backbone: Optional[str]  # torchvision checkpoint the encoder takes (None: no ImageNet encoder)
    paper: str


_REGISTRY: Dict[str, ModelInfo] = {}


def _register(name: str, build, output_strides, backbone, paper) -> None:
    _REGISTRY[name] = ModelInfo(name, build, tuple(output_strides), backbone, paper)


_FCN = "Long, Shelhamer, Darrell, CVPR 2015"
_V2 = "Chen et al., DeepLab v2, TPAMI 2018"
_V3P = "Chen et al., DeepLab v3+, ECCV 2018"
_register("fcn32s", lambda os, **kw: FCN(stride=32, **kw), (32,), "vgg16", _FCN)
_register("fcn16s", lambda os, **kw: FCN(stride=16, **kw), (32,), "vgg16", _FCN)
_register("fcn8s", lambda os, **kw: FCN(stride=8, **kw), (32,), "vgg16", _FCN)
_register("segnet", lambda os, **kw: SegNet(**kw), (32,), "vgg16_bn", "Badrinarayanan, Kendall, Cipolla, TPAMI 2017")
_register("unet", lambda os, **kw: UNet(**kw), (16,), None, "Ronneberger, Fischer, Brox, MICCAI 2015")
_register("deeplabv2_largefov", lambda os, **kw: DeepLabLargeFOV(**kw), (8,), "vgg16", _V2 + " (LargeFOV: ICLR 2015)")
_register("deeplabv2_aspp", lambda os, **kw: DeepLabV2ResNet(output_stride=os, depth=101, **kw), (8, 16), "resnet101", _V2)
_register("deeplabv2_aspp_vgg16", lambda os, **kw: DeepLabV2ASPPVGG(**kw), (8,), "vgg16", _V2 + " (ASPP-L)")
_register(
    "deeplabv3plus_resnet50", lambda os, **kw: DeepLabV3Plus(output_stride=os, depth=50, **kw), (16, 8), "resnet50", _V3P
)
_register(
    "deeplabv3plus_resnet101", lambda os, **kw: DeepLabV3Plus(output_stride=os, depth=101, **kw), (16, 8), "resnet101",
    _V3P,
)


def list_models() -> List[str]:
    """Names accepted by :func:`get_model`."""
    return list(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    """Registry entry of a model: supported output strides, torchvision backbone checkpoint, paper."""
    if name not in _REGISTRY:
        raise ValueError("unknown model %r; available: %s" % (name, ", ".join(_REGISTRY)))
    return _REGISTRY[name]


def get_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    output_stride: Optional[int] = None,
    width: float = 1.0,
    backbone_weights: Optional[str] = None,
    **kwargs,
) -> nn.Module:
    """Build a reference model by name.

    Args:
        name: one of :func:`list_models`.
        num_classes: K, the channels of the returned logits ``(B, K, H, W)``.
        in_channels: channels of the input image.
        output_stride: encoder output stride; DeepLab v3+ takes 16 (default) or 8, DeepLab-v2 ASPP 8 (default) or
            16; the others have a fixed stride (None or that value).
        width: multiplies every channel count (1.0 = the paper's model).
        backbone_weights: path to a local torchvision-format ImageNet state_dict for the encoder (``vgg16`` for
            FCN / DeepLab-VGG, ``vgg16_bn`` for SegNet, ``resnet50`` / ``resnet101`` for the ResNet DeepLabs).
            The load report (missing / unexpected keys) is ``model.backbone_report`` and a warning when not clean.
        **kwargs: model-specific options (e.g. ``at_once`` for FCN, ``batch_norm`` for U-Net, ``separable`` and
            ``multi_grid`` for DeepLab v3+, ``aspp_hidden`` for DeepLab-v2 ASPP).
    """
    info = model_info(name)
    os_ = info.output_strides[0] if output_stride is None else int(output_stride)
    if os_ not in info.output_strides:
        raise ValueError(
            "%s: output_stride must be one of %s, got %r" % (name, list(info.output_strides), output_stride)
        )
    model = info.build(os_, num_classes=num_classes, in_channels=in_channels, width=width, **kwargs)
    model.model_name = name
    if backbone_weights is not None:
        if info.backbone is None:
            raise ValueError("%s has no ImageNet encoder; backbone_weights must be None" % name)
        model.load_backbone(backbone_weights)
    return model
