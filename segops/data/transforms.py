"""Training augmentations that keep image, mask, scribbles and the ROI aligned.

A sample is a dict with ``image (3, H, W) float`` (0..255), label maps ``mask`` / ``scribble`` ``(H, W)
int64`` (255 = void / unlabelled) and ``roi (H, W) float`` (1 = a real image pixel, 0 = padding). The
dense CRF loss must not see padded pixels (it would pull predictions towards the padding colour), so
every geometric transform updates ``roi`` together with the labels.

Randomness comes from a ``numpy.random.Generator`` passed per call, so that a sample's augmentation is a
pure function of ``(seed, epoch, index)`` (see :class:`AugmentedDataset`), independent of the number of
data-loader workers, of DDP ranks and of resuming.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["RandomScaleCropFlip", "CenterPad", "AugmentedDataset", "LABEL_KEYS"]

LABEL_KEYS: Tuple[str, ...] = ("mask", "scribble")


def _resize(sample: Dict[str, object], h: int, w: int) -> Dict[str, object]:
    out = dict(sample)
    img = sample["image"]
    assert isinstance(img, torch.Tensor)
    out["image"] = F.interpolate(img[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    for k in LABEL_KEYS + ("roi",):
        v = sample.get(k)
        if isinstance(v, torch.Tensor):
            r = F.interpolate(v[None, None].float(), size=(h, w), mode="nearest-exact")[0, 0]  # pixel centres, like bilinear
            out[k] = r.to(v.dtype)
    return out


def _pad_to(sample: Dict[str, object], h: int, w: int, ignore_index: int, fill: Sequence[float]) -> Dict[str, object]:
    img = sample["image"]
    assert isinstance(img, torch.Tensor)
    H, W = img.shape[-2:]
    ph, pw = max(h - H, 0), max(w - W, 0)
    if ph == 0 and pw == 0:
        return sample
    out = dict(sample)
    new = torch.empty((img.shape[0], H + ph, W + pw), dtype=img.dtype)
    new[:] = torch.tensor(list(fill), dtype=img.dtype).view(-1, 1, 1)
    new[:, :H, :W] = img
    out["image"] = new
    for k in LABEL_KEYS:
        v = sample.get(k)
        if isinstance(v, torch.Tensor):
            out[k] = F.pad(v, (0, pw, 0, ph), value=ignore_index)
    roi = sample.get("roi")
    if not isinstance(roi, torch.Tensor):
        roi = torch.ones((H, W))
    out["roi"] = F.pad(roi, (0, pw, 0, ph), value=0.0)
    return out


def _crop(sample: Dict[str, object], y: int, x: int, h: int, w: int) -> Dict[str, object]:
    out = dict(sample)
    for k in ("image",) + LABEL_KEYS + ("roi",):
        v = sample.get(k)
        if isinstance(v, torch.Tensor):
            out[k] = v[..., y : y + h, x : x + w].contiguous()
    return out


class RandomScaleCropFlip:
    """Random scale (bilinear image, nearest labels), pad to the crop size (image ``fill``, labels
    ``ignore_index``, ROI 0), random crop, random horizontal flip — all aligned.

    Args:
        crop_size: ``(h, w)`` or an int; ``None`` keeps the scaled size (no pad / crop).
        scale_range: ``(lo, hi)`` uniform scale factor range, e.g. ``(0.5, 2.0)`` as in DeepLab.
        flip: horizontal flip with probability 0.5.
        ignore_index: label written into padded pixels.
        fill: image value of padded pixels per channel (0..255 units); the dataset mean is a good choice.
    """

    def __init__(
        self,
        crop_size=None,
        scale_range: Tuple[float, float] = (0.5, 2.0),
        flip: bool = True,
        ignore_index: int = 255,
        fill: Sequence[float] = (124.0, 116.0, 104.0),
    ) -> None:
        if isinstance(crop_size, int):
            crop_size = (crop_size, crop_size)
        if crop_size is not None and (len(crop_size) != 2 or min(crop_size) < 1):
            raise ValueError("RandomScaleCropFlip: crop_size must be positive (h, w), got %r" % (crop_size,))
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ValueError("RandomScaleCropFlip: scale_range must satisfy 0 < lo <= hi, got %r" % (scale_range,))
        self.crop_size = None if crop_size is None else (int(crop_size[0]), int(crop_size[1]))
        self.scale_range = (float(lo), float(hi))
        self.flip = bool(flip)
        self.ignore_index = int(ignore_index)
        self.fill = tuple(float(f) for f in fill)

    def __call__(self, sample: Dict[str, object], rng: np.random.Generator) -> Dict[str, object]:
        img = sample["image"]
        assert isinstance(img, torch.Tensor)
        H, W = img.shape[-2:]
        if "roi" not in sample or sample["roi"] is None:
            sample = dict(sample)
            sample["roi"] = torch.ones((H, W))
        s = float(rng.uniform(*self.scale_range))
        if s != 1.0:
            sample = _resize(sample, max(1, int(round(H * s))), max(1, int(round(W * s))))
        if self.crop_size is not None:
            ch, cw = self.crop_size
            sample = _pad_to(sample, ch, cw, self.ignore_index, self.fill)
            h, w = sample["image"].shape[-2:]  # type: ignore[union-attr]
            y = int(rng.integers(0, h - ch + 1))
            x = int(rng.integers(0, w - cw + 1))
            sample = _crop(sample, y, x, ch, cw)
        if self.flip and rng.random() < 0.5:
            sample = dict(sample)
            for k in ("image",) + LABEL_KEYS + ("roi",):
                v = sample.get(k)
                if isinstance(v, torch.Tensor):
                    sample[k] = v.flip(-1).contiguous()
        return sample


class CenterPad:
    """Evaluation-time transform: pads (bottom / right) to a multiple of ``multiple`` with labels
    ``ignore_index`` and ROI 0, so that any image size batches and runs through strided models."""

    def __init__(self, multiple: int = 1, ignore_index: int = 255, fill: Sequence[float] = (124.0, 116.0, 104.0)):
        self.multiple = int(multiple)
        self.ignore_index = int(ignore_index)
        self.fill = tuple(float(f) for f in fill)

    def __call__(self, sample: Dict[str, object], rng: Optional[np.random.Generator] = None) -> Dict[str, object]:
        img = sample["image"]
        assert isinstance(img, torch.Tensor)
        H, W = img.shape[-2:]
        m = self.multiple
        return _pad_to(sample, -(-H // m) * m, -(-W // m) * m, self.ignore_index, self.fill)


class AugmentedDataset(Dataset):
    """Applies ``transform(sample, rng)`` with ``rng = default_rng([seed, epoch, index])``: the augmentation
    of a sample depends only on the seed, the epoch (:meth:`set_epoch`) and the index."""

    def __init__(self, dataset: Dataset, transform, seed: int = 0) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        sample = self.dataset[i]
        if self.transform is None:
            return sample
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        return self.transform(sample, rng)
