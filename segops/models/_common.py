"""Helpers shared by the reference models: channel scaling, backbone checkpoint loading, layer swapping."""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Tuple

import torch
from torch import Tensor, nn

from segops.nn import AtrousConv2d, ConvTranspose2d

__all__ = [
    "scaled",
    "BackboneLoadReport",
    "SegmentationModel",
    "load_checkpoint",
    "to_torch_layers",
    "freeze_bn",
    "count_parameters",
]


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded, at least 1 (the ``width`` knob of every model)."""
    return max(1, int(round(channels * width)))


def reshape_like(v: Tensor, shape) -> Tensor:
    """``v`` reshaped to ``shape`` when the element counts agree (a Linear weight seen as a conv), else ``v``
    unchanged so that the shape check reports the mismatch."""
    return v.reshape(shape) if v.numel() == int(torch.Size(shape).numel()) else v


def check_width(width: float) -> float:
    width = float(width)
    if not width > 0 or width != width or width == float("inf"):
        raise ValueError("width must be a positive finite number, got %r" % (width,))
    return width


def check_common(name: str, num_classes: int, in_channels: int) -> None:
    if int(num_classes) < 1:
        raise ValueError("%s: num_classes must be >= 1, got %r" % (name, num_classes))
    if int(in_channels) < 1:
        raise ValueError("%s: in_channels must be >= 1, got %r" % (name, in_channels))


def check_input(name: str, x: Tensor, in_channels: int) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != in_channels:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError("%s: input must be (B, %d, H, W), got %s" % (name, in_channels, shape))
    if x.shape[-1] < 1 or x.shape[-2] < 1:
        raise ValueError("%s: input must have H, W >= 1, got %s" % (name, tuple(x.shape)))


@dataclass
class BackboneLoadReport:
    """What :meth:`SegmentationModel.load_backbone` did with a torchvision-format checkpoint.

    ``loaded``: model keys that received a tensor; ``missing``: encoder keys the checkpoint lacked (left at their
    initialisation); ``unexpected``: checkpoint keys that match nothing in the encoder; ``ignored``: checkpoint keys
    deliberately not used (the ImageNet classification head, e.g. ``fc.*`` or ``classifier.6.*``).
    """

    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        return "loaded %d tensors; missing %d %s; unexpected %d %s; ignored %d (classification head)" % (
            len(self.loaded), len(self.missing), self.missing[:8], len(self.unexpected), self.unexpected[:8],
            len(self.ignored),
        )


def load_checkpoint(path: str) -> Dict[str, Tensor]:
    """A state_dict from a local file: a plain state_dict or a dict holding one under 'state_dict' / 'model'."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError("backbone_weights must be a path to a local checkpoint, got %s" % type(path).__name__)
    if not os.path.isfile(path):
        raise FileNotFoundError("backbone_weights: no such file %r (segops never downloads weights)" % (str(path),))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError("backbone_weights: %r does not hold a state_dict of tensors" % (str(path),))
    sd = dict(obj)
    # Checkpoints saved from DataParallel / DDP wrappers carry a 'module.' prefix.
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


class SegmentationModel(nn.Module):
    """Base class of the reference models: input checks and torchvision-format backbone loading.

    Subclasses implement :meth:`backbone_mapping` (checkpoint -> model keys) and :meth:`encoder_keys`.
    """

    in_channels: int
    num_classes: int

    def encoder_keys(self) -> List[str]:
        """Model state_dict keys that an ImageNet checkpoint is expected to provide."""
        raise ValueError("%s has no ImageNet-pretrainable encoder" % type(self).__name__)

    def backbone_mapping(self, sd: Mapping[str, Tensor]) -> Tuple[Dict[str, Tensor], List[str], List[str]]:
        """(model key -> tensor, unexpected checkpoint keys, ignored checkpoint keys)."""
        raise ValueError("%s has no ImageNet-pretrainable encoder" % type(self).__name__)

    @torch.no_grad()
    def load_backbone(self, state_dict_or_path) -> BackboneLoadReport:
        """Load a torchvision-format ImageNet state_dict (or a path to one) into the encoder.

        Raises ``ValueError`` on a shape mismatch (e.g. ``width != 1`` or ``in_channels != 3`` against an RGB
        checkpoint), naming the key. Returns a :class:`BackboneLoadReport`; warns when keys are missing or unexpected.
        """
        sd = load_checkpoint(state_dict_or_path) if not isinstance(state_dict_or_path, Mapping) else state_dict_or_path
        mapped, unexpected, ignored = self.backbone_mapping(sd)
        own = self.state_dict(keep_vars=True)
        for k, v in mapped.items():
            if k not in own:
                raise RuntimeError("internal: backbone mapping produced unknown key %r" % k)
            if tuple(own[k].shape) != tuple(v.shape):
                raise ValueError(
                    "backbone_weights: %s has shape %s in the checkpoint but %s in the model (the checkpoint needs "
                    "width=1.0 and in_channels matching its first conv)" % (k, tuple(v.shape), tuple(own[k].shape))
                )
        for k, v in mapped.items():
            own[k].copy_(v.to(dtype=own[k].dtype))
        report = BackboneLoadReport(
            loaded=sorted(mapped),
            missing=[k for k in self.encoder_keys() if k not in mapped],
            unexpected=sorted(unexpected),
            ignored=sorted(ignored),
        )
        if report.missing or report.unexpected:
            warnings.warn("%s.load_backbone: %s" % (type(self).__name__, report), stacklevel=2)
        self.backbone_report = report
        return report


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameters (by default only those with ``requires_grad``, as papers count them)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def freeze_bn(model: nn.Module) -> nn.Module:
    """Put every BatchNorm layer in eval mode (running statistics, no update), as DeepLab fine-tunes with
    small batches; call after ``model.train()``. Returns the model."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def to_torch_layers(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every segops conv layer turned into its torch.nn parent class.

    Same parameters, same state_dict keys; only the forward changes (torch's convolution instead of segops').
    The benchmarks compare the two; it also makes a model exportable where segops is not installed.
    """
    clone = copy.deepcopy(model)
    for m in clone.modules():
        if isinstance(m, ConvTranspose2d):
            m.__class__ = nn.ConvTranspose2d
        elif isinstance(m, AtrousConv2d):
            m.__class__ = nn.Conv2d
    return clone
