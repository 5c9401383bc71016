"""Dense CRF and normalized-cut regularized losses as modules (drop-ins for the ECCV'18 / CVPR'18 code)."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from segops.ops.crf_losses import dense_crf_loss, normalized_cut_loss

__all__ = ["DenseCRFLoss", "NormalizedCutLoss"]


class _RegularizedLoss(nn.Module):
    def __init__(self, weight: float, sigma_rgb: float, sigma_xy: float, scale_factor: float = 1.0) -> None:
        super().__init__()
        for what, v in (("sigma_rgb", sigma_rgb), ("sigma_xy", sigma_xy), ("scale_factor", scale_factor)):
            if not (v > 0 and v < float("inf")):
                raise ValueError("%s must be a positive finite number, got %r" % (what, v))
        self.weight = float(weight)
        self.sigma_rgb = float(sigma_rgb)
        self.sigma_xy = float(sigma_xy)
        self.scale_factor = float(scale_factor)

    def extra_repr(self) -> str:
        return "weight=%g, sigma_rgb=%g, sigma_xy=%g, scale_factor=%g" % (
            self.weight, self.sigma_rgb, self.sigma_xy, self.scale_factor)


class DenseCRFLoss(_RegularizedLoss):
    """Dense CRF loss of Tang et al. (ECCV'18), called as ``loss(images, segmentations, rois)``.

    ``-(weight / B) sum_b sum_k (S_bk * roi)^T W_b (S_bk * roi)`` with W the bilateral Gaussian on
    (column / sigma_xy, row / sigma_xy, RGB / sigma_rgb) computed on the permutohedral lattice with the
    densecrf semantics, so the published settings carry over, e.g.
    ``DenseCRFLoss(weight=2e-9, sigma_rgb=15, sigma_xy=80, scale_factor=0.5)``.
    See :func:`segops.ops.dense_crf_loss` for shapes, resizing and the gradient.
    """

    def forward(self, images: Tensor, segmentations: Tensor, rois: Optional[Tensor] = None) -> Tensor:
        return dense_crf_loss(images, segmentations, self.weight, self.sigma_rgb, self.sigma_xy,
                              self.scale_factor, rois)


class NormalizedCutLoss(_RegularizedLoss):
    """Normalized-cut loss of Tang et al. (CVPR'18), called as ``loss(images, segmentations, rois)``.

    ``(weight / B) sum_b sum_k S_k^T W (1 - S_k) / (d^T S_k)``, ``d = W 1``; see
    :func:`segops.ops.normalized_cut_loss`.
    """

    def forward(self, images: Tensor, segmentations: Tensor, rois: Optional[Tensor] = None) -> Tensor:
        return normalized_cut_loss(images, segmentations, self.weight, self.sigma_rgb, self.sigma_xy,
                                   self.scale_factor, rois)
