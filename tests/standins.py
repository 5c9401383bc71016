"""Test / development stand-ins (NOT product code).

* :class:`ExactDenseCRFLoss`: the ECCV'18 dense CRF loss with the *exact* dense bilateral Gaussian
  ``W_ij = exp(-|f_i - f_j|^2 / 2)`` over features ``(col/sxy, row/sxy, R/srgb, G/srgb, B/srgb)`` (O(N^2),
  fine for 64x64 images), behind the same interface as ``segops.nn.DenseCRFLoss``. The permutohedral
  lattice of the real op approximates this Gaussian with roughly 0.5-0.6x its mass, so a weight tuned with
  this stand-in needs ~2x with the lattice.
* :func:`tiny_fcn`: a small U-Net-like fully-convolutional net in plain torch.nn, used while
  ``segops.models`` is not available.
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def exact_dense_gaussian_filter(features: Tensor, values: Tensor) -> Tensor:
    """``W @ values`` with ``W_ij = exp(-|f_i - f_j|^2 / 2)``; features ``(N, d)``, values ``(N, C)``."""
    d2 = torch.cdist(features, features).pow(2)
    return torch.exp(-0.5 * d2) @ values


class ExactDenseCRFLoss(nn.Module):
    """``-(weight / B) * sum_b sum_k X_k^T W X_k`` with ``X = S * roi`` at ``scale_factor`` resolution."""

    def __init__(self, weight: float, sigma_rgb: float, sigma_xy: float, scale_factor: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)
        self.sigma_rgb = float(sigma_rgb)
        self.sigma_xy = float(sigma_xy)
        self.scale_factor = float(scale_factor)

    def _per_image(self, images: Tensor, segmentations: Tensor, rois: Optional[Tensor]) -> Iterator[Tuple[Tensor, Tensor, Tensor]]:
        """Per image at ``scale_factor`` resolution: the dense ``W`` (N, N), ``X = S * roi`` (N, K), roi (N, 1)."""
        B, K, H, W = segmentations.shape
        if rois is None:
            rois = segmentations.new_ones((B, H, W))
        if self.scale_factor != 1.0:
            h, w = max(1, int(H * self.scale_factor)), max(1, int(W * self.scale_factor))
            images = F.interpolate(images, size=(h, w), mode="nearest")
            segmentations = F.interpolate(segmentations, size=(h, w), mode="bilinear", align_corners=False)
            rois = F.interpolate(rois[:, None].float(), size=(h, w), mode="nearest")[:, 0]
            H, W = h, w
        sxy = self.sigma_xy * self.scale_factor
        rows, cols = torch.meshgrid(
            torch.arange(H, dtype=segmentations.dtype), torch.arange(W, dtype=segmentations.dtype), indexing="ij"
        )
        for b in range(B):
            feat = torch.cat(
                [(cols / sxy).reshape(-1, 1), (rows / sxy).reshape(-1, 1),
                 images[b].reshape(3, -1).t().to(segmentations.dtype) / self.sigma_rgb],
                dim=1,
            )  # fmt: skip
            r = rois[b].reshape(-1, 1).to(segmentations.dtype)
            with torch.no_grad():
                Wm = torch.exp(-0.5 * torch.cdist(feat, feat).pow(2))
            yield Wm, segmentations[b].reshape(K, -1).t() * r, r

    def forward(self, images: Tensor, segmentations: Tensor, rois: Optional[Tensor] = None) -> Tensor:
        total = segmentations.new_zeros(())
        for Wm, X, _ in self._per_image(images, segmentations, rois):
            total = total - (X * (Wm @ X)).sum()
        return self.weight * total / segmentations.shape[0]


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TinyFCN(nn.Module):
    """A 3-level U-Net-like FCN (plain torch.nn): input any size divisible by 8."""

    def __init__(self, num_classes: int, in_channels: int = 3, base: int = 16, stem_stride: int = 1) -> None:
        super().__init__()
        c = base
        self.stem_stride = stem_stride
        self.e1, self.e2, self.e3 = _block(in_channels, c), _block(c, 2 * c), _block(2 * c, 4 * c)
        if stem_stride > 1:
            self.e1[0] = nn.Conv2d(in_channels, c, 3, stride=stem_stride, padding=1, bias=False)
        self.mid = _block(4 * c, 4 * c)
        self.d3, self.d2, self.d1 = _block(8 * c, 2 * c), _block(4 * c, c), _block(2 * c, c)
        self.head = nn.Conv2d(c, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        e1 = self.e1(x)
        e2 = self.e2(F.max_pool2d(e1, 2))
        e3 = self.e3(F.max_pool2d(e2, 2))
        m = self.mid(F.max_pool2d(e3, 2))
        up = lambda t, ref: F.interpolate(t, size=ref.shape[-2:], mode="bilinear", align_corners=False)  # noqa: E731
        d3 = self.d3(torch.cat([up(m, e3), e3], 1))
        d2 = self.d2(torch.cat([up(d3, e2), e2], 1))
        d1 = self.d1(torch.cat([up(d2, e1), e1], 1))
        out = self.head(d1)
        if self.stem_stride > 1:
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out


def tiny_fcn(name: str = "tiny", num_classes: int = 4, in_channels: int = 3, width: float = 1.0, **kw) -> nn.Module:
    """``get_model``-compatible factory for :class:`TinyFCN` (``width`` 1.0 = 16 base channels)."""
    return TinyFCN(num_classes, in_channels, max(4, int(round(16 * width))), int(kw.get("stem_stride", 1)))


class ExactNormalizedCutLoss(ExactDenseCRFLoss):
    """CVPR'18 normalized cut loss with the exact dense Gaussian: ``weight / B * sum_b sum_k
    X_k^T W (1 - X_k) / (d^T X_k)``, ``d = W 1`` (stand-in with the ``NormalizedCutLoss`` interface)."""

    def forward(self, images: Tensor, segmentations: Tensor, rois: Optional[Tensor] = None) -> Tensor:
        total = segmentations.new_zeros(())
        for Wm, X, r in self._per_image(images, segmentations, rois):
            d = Wm @ r
            total = total + ((X * (d - Wm @ X)).sum(0) / (d * X).sum(0).clamp_min(1e-12)).sum()
        return self.weight * total / segmentations.shape[0]
