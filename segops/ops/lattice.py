"""Permutohedral lattice filter and the dense CRF / normalized-cut losses built on it.

``permutohedral_filter(values, features)`` computes ``W values`` per image with
``W_ij ~ exp(-|f_i - f_j|^2 / 2)`` (self term included, no normalisation) on the permutohedral lattice of
Adams, Baek & Davis (2010), in exactly the form of Kraehenbuehl & Koltun's densecrf code used by the ECCV'18
regularized-loss code (shared/DESIGN.md, "Lattice semantics"), so their hyper-parameters carry over.

The lattice approximates the Gaussian: on real images ``W x`` carries about 0.5-0.6x the mass of the exact
dense Gaussian filter (the blur kernel 1/2, 1, 1/2 per direction and ``alpha = 1 / (1 + 2^-d)`` are the
densecrf constants, not a normalised Gaussian). ``normalize=True`` returns ``(W x) / (W 1)`` instead, for
which the overall scale cancels.

The lattice (per point its d+1 vertex ids and barycentric weights, per vertex its blur neighbours) is
built once per image in the forward op and reused for every channel and for the backward op.
Gradients: ``grad_values = W^T grad_out`` (normalised: ``W^T (grad_out / (W 1))``), the exact gradient.
Each blur direction is symmetric, but their ordered product is not quite: ``W^T`` is ``W`` with the
blur directions in reverse order (``<W u, v>`` and ``<u, W v>`` differ by ~1e-4 relative on image
features). The backward op reuses the forward lattice. The features get NO gradient (the lattice is
piecewise constant in them; treat them as constants).

Determinism: the CPU kernels are deterministic (independent of the thread count). On CUDA the splat
accumulates with float atomicAdd, so results vary at float-rounding level between runs.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from segops.ops._checks import check_same_device

__all__ = ["permutohedral_filter", "dense_crf_loss", "normalized_cut_loss", "crf_features"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def permutohedral_filter(values: Tensor, features: Tensor, normalize: bool = False) -> Tensor:
    """Gaussian filtering of ``values`` in the feature space ``features`` on the permutohedral lattice.

    Args:
        values: ``(B, C, H, W)`` or ``(B, C, N)`` (any ``(B, C, *spatial)``) float32 / float64 / float16 /
            bfloat16; all C channels are filtered in one splat / blur / slice pass.
        features: ``(B, d, *spatial)`` floating, already scaled (e.g. position / sigma), 1 <= d <= 16;
            computed in float64 when ``values`` are float64, else float32. Must be finite.
        normalize: return ``(W values) / (W 1)`` instead of ``W values``.

    Returns:
        ``W values``, same shape and dtype as ``values`` (contiguous). Differentiable in ``values`` only.
    """
    out, _, _, _, _ = torch.ops.segops.permutohedral_filter.default(values, features, bool(normalize))
    return out


@torch.library.register_fake("segops::permutohedral_filter")
def _filter_fake(values, features, normalize):
    torch._check(values.dim() >= 3, lambda: "permutohedral_filter: values must be (B, C, *spatial)")
    torch._check(features.dim() == values.dim(), lambda: "permutohedral_filter: features must be (B, d, *spatial)")
    torch._check(1 <= features.shape[1] <= 16, lambda: "permutohedral_filter: d must be in [1, 16]")
    check_same_device("permutohedral_filter", "values", values, features=features)
    B, d = values.shape[0], features.shape[1]
    n = 1
    for s in values.shape[2:]:
        n = n * s
    acc = _acc_dtype(values.dtype)
    m = torch.library.get_ctx().new_dynamic_size()
    out = values.new_empty(values.shape)
    vertex = values.new_empty((B, n, d + 1), dtype=torch.int64)
    bary = values.new_empty((B, n, d + 1), dtype=acc)
    nbr = values.new_empty((m, d + 1, 2), dtype=torch.int64)
    norm = values.new_empty((B, n) if normalize else (0,), dtype=acc)
    return out, vertex, bary, nbr, norm


@torch.library.register_fake("segops::_permutohedral_filter_backward")
def _filter_backward_fake(grad, vertex, bary, neighbors, norm, normalize, transposed):
    return grad.new_empty(grad.shape)


def _filter_setup_context(ctx, inputs, output) -> None:
    _, _, normalize = inputs
    _, vertex, bary, nbr, norm = output
    ctx.save_for_backward(vertex, bary, nbr, norm)
    ctx.normalize = normalize


def _filter_backward(ctx, grad_out: Tensor, *_unused: Tensor):
    vertex, bary, nbr, norm = ctx.saved_tensors
    grad_values = None
    if ctx.needs_input_grad[0]:
        grad_values = torch.ops.segops._permutohedral_filter_backward.default(
            grad_out.contiguous(), vertex, bary, nbr, norm, ctx.normalize, True
        )
    return grad_values, None, None


def _backward_setup_context(ctx, inputs, output) -> None:
    _, vertex, bary, nbr, norm, normalize, transposed = inputs
    ctx.save_for_backward(vertex, bary, nbr, norm)
    ctx.args = (normalize, not transposed)


def _backward_backward(ctx, grad_out: Tensor):
    vertex, bary, nbr, norm = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = torch.ops.segops._permutohedral_filter_backward.default(
            grad_out.contiguous(), vertex, bary, nbr, norm, *ctx.args
        )
    return grad, None, None, None, None, None, None


torch.library.register_autograd(
    "segops::_permutohedral_filter_backward", _backward_backward, setup_context=_backward_setup_context
)


torch.library.register_autograd(
    "segops::permutohedral_filter", _filter_backward, setup_context=_filter_setup_context
)


# ---- dense CRF / normalized-cut losses ---------------------------------------------------------------------


def crf_features(images: Tensor, sigma_rgb: float, sigma_xy: float) -> Tensor:
    """Bilateral features ``(B, 2 + Ci, H, W)``: (column / sigma_xy, row / sigma_xy, image channels / sigma_rgb).

    Rows and columns are 0-based pixel indices; float32 (float64 for float64 images).
    """
    B, _, H, W = images.shape
    acc = _acc_dtype(images.dtype)
    xs = (torch.arange(W, device=images.device, dtype=acc) / sigma_xy).view(1, 1, 1, W).expand(B, 1, H, W)
    ys = (torch.arange(H, device=images.device, dtype=acc) / sigma_xy).view(1, 1, H, 1).expand(B, 1, H, W)
    return torch.cat([xs, ys, images.to(acc) / sigma_rgb], 1)


def _check_loss_inputs(name: str, images: Tensor, segmentations: Tensor, rois: Optional[Tensor],
                       sigma_rgb: float, sigma_xy: float, scale_factor: float) -> None:
    if images.dim() != 4:
        raise ValueError("%s: images must be (B, C_img, H, W), got shape %s" % (name, tuple(images.shape)))
    if segmentations.dim() != 4:
        raise ValueError("%s: segmentations must be (B, K, H, W), got shape %s" % (name, tuple(segmentations.shape)))
    if images.shape[0] != segmentations.shape[0] or images.shape[2:] != segmentations.shape[2:]:
        raise ValueError(
            "%s: images %s and segmentations %s must agree in B, H, W"
            % (name, tuple(images.shape), tuple(segmentations.shape))
        )
    if not 1 <= images.shape[1] <= 14:
        raise ValueError("%s: images must have 1..14 channels (d = 2 + C_img <= 16), got %d" % (name, images.shape[1]))
    for what, t in (("images", images), ("rois", rois)):
        if t is not None and t.device != segmentations.device:
            raise ValueError("%s: %s are on %s but segmentations are on %s"
                             % (name, what, t.device, segmentations.device))
    if not segmentations.is_floating_point():
        raise TypeError("%s: segmentations must be floating point, got %s" % (name, segmentations.dtype))
    if rois is not None and (rois.dim() != 3 or rois.shape[0] != images.shape[0] or rois.shape[1:] != images.shape[2:]):
        raise ValueError("%s: rois must be (B, H, W) = %s, got %s"
                         % (name, (images.shape[0],) + tuple(images.shape[2:]), tuple(rois.shape)))
    for what, v in (("sigma_rgb", sigma_rgb), ("sigma_xy", sigma_xy), ("scale_factor", scale_factor)):
        if not (v > 0 and v < float("inf")):
            raise ValueError("%s: %s must be a positive finite number, got %r" % (name, what, v))
    if images.is_floating_point() and images.numel() > 0 and not bool(torch.isfinite(images).all()):
        # else the lattice reports NaN "features", which the caller never passed (found by test_fuzz.py);
        # RuntimeError as the lattice's own check raised before
        raise RuntimeError("%s: images contain NaN or Inf" % name)
    H, W = images.shape[2:]
    if scale_factor != 1.0 and segmentations.numel() > 0 and min(math.floor(H * scale_factor),
                                                                math.floor(W * scale_factor)) < 1:
        # F.interpolate would fail with "Input and output sizes should be greater than 0" (found by test_fuzz.py)
        raise ValueError("%s: scale_factor %r resizes the %d x %d images to %d x %d: nothing left"
                         % (name, scale_factor, H, W, math.floor(H * scale_factor), math.floor(W * scale_factor)))


def _prepare(images: Tensor, segmentations: Tensor, rois: Optional[Tensor], sigma_rgb: float, sigma_xy: float,
             scale_factor: float) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Resize (nearest images / rois, bilinear segmentations), then (features, X = S * roi, roi (B, 1, H, W)).

    Without rois, X = S and roi is None (an all-ones roi changes nothing and costs two passes).
    """
    if rois is not None:
        rois = rois.to(segmentations.dtype)
    if scale_factor != 1.0:
        images = F.interpolate(images, scale_factor=scale_factor, mode="nearest")
        segmentations = F.interpolate(segmentations, scale_factor=scale_factor, mode="bilinear", align_corners=False)
        if rois is not None:
            rois = F.interpolate(rois.unsqueeze(1), scale_factor=scale_factor, mode="nearest").squeeze(1)
        sigma_xy = sigma_xy * scale_factor
    feats = crf_features(images, sigma_rgb, sigma_xy)
    if rois is None:
        return feats, segmentations, None
    roi = rois.unsqueeze(1)
    return feats, segmentations * roi, roi


def _checked_prepare(name: str, images: Tensor, segmentations: Tensor, rois: Optional[Tensor], sigma_rgb: float,
                     sigma_xy: float, scale_factor: float) -> Optional[Tuple[Tensor, Tensor, Optional[Tensor]]]:
    """Both losses' prologue: the argument checks, then :func:`_prepare`; None when nothing is left to filter
    (B = 0, K = 0 or an empty image), in which case the loss is 0."""
    _check_loss_inputs(name, images, segmentations, rois, sigma_rgb, sigma_xy, scale_factor)
    if segmentations.numel() == 0:  # before resizing, which rejects empty inputs
        return None
    feats, x, roi = _prepare(images, segmentations, rois, sigma_rgb, sigma_xy, scale_factor)
    return None if x.numel() == 0 else (feats, x, roi)


def _batched_dot(x: Tensor, y: Tensor, block: int = 1 << 14) -> Tensor:
    """Per image ``<x_b, y_b>`` without a temporary: float32 (or the input dtype) dot products over blocks of
    ``block`` elements, summed in float64. One BLAS dot over a whole 4096 x 4096 x 21 image in float32 is off
    by ~2e-3 relative (long sequential accumulations; scripts/scale_check.py), blocks bring that to ~1e-7."""
    B = x.shape[0]
    xf, yf = x.reshape(B, -1), y.reshape(B, -1)
    n = xf.shape[1]
    nb = n // block
    out = []
    for b in range(B):
        xb, yb = xf[b], yf[b]
        t = torch.zeros((), dtype=torch.float64, device=x.device)
        if nb:
            t = t + torch.bmm(xb[: nb * block].view(nb, 1, block), yb[: nb * block].view(nb, block, 1)).double().sum()
        if n > nb * block:
            t = t + (xb[nb * block:] * yb[nb * block:]).sum(dtype=torch.float64)
        out.append(t)
    return torch.stack(out).to(x.dtype)


class _QuadraticForm(torch.autograd.Function):
    """Per image ``sum_k X_k^T W X_k``; keeps ``W X`` from the forward pass: grad_X = 2 g W X."""

    @staticmethod
    def forward(ctx, x: Tensor, feats: Tensor) -> Tensor:
        wx = torch.ops.segops.permutohedral_filter.default(x, feats, False)[0]
        ctx.save_for_backward(wx)
        return _batched_dot(x, wx)

    @staticmethod
    def backward(ctx, g: Tensor):
        (wx,) = ctx.saved_tensors
        return wx * (2.0 * g).view(-1, *([1] * (wx.dim() - 1))), None


def dense_crf_loss(
    images: Tensor,
    segmentations: Tensor,
    weight: float,
    sigma_rgb: float,
    sigma_xy: float,
    scale_factor: float = 1.0,
    rois: Optional[Tensor] = None,
) -> Tensor:
    """Dense CRF regularized loss of Tang et al. (ECCV'18), a drop-in for their ``DenseCRFLoss``.

    ``loss = -(weight / B) sum_b sum_k X_bk^T W_b X_bk`` with ``X = S * roi`` and ``W_b`` the bilateral
    Gaussian (permutohedral lattice, densecrf semantics) on features
    ``(column / sigma_xy, row / sigma_xy, R / sigma_rgb, G / sigma_rgb, B / sigma_rgb)``. Equal, up to a
    constant, to ``weight / B * sum_k S_k^T W (1 - S_k)``; it is <= 0.

    Args:
        images: ``(B, C_img, H, W)`` float, RGB in 0..255 (any number of channels 1..14: d = 2 + C_img).
            The image values are not checked against 0..255; other ranges change the meaning of sigma_rgb.
        segmentations: ``(B, K, H, W)`` softmax probabilities (float32 / float64).
        weight: loss weight (ECCV'18: 2e-9; tiny because the sum runs over all N^2 pixel pairs).
        sigma_rgb, sigma_xy: bandwidths in colour units and pixels (of the full-resolution image).
        scale_factor: if != 1, images and rois are resized with nearest and segmentations with bilinear
            (align_corners=False) interpolation to ``floor(H * s)``, and sigma_xy becomes ``sigma_xy * s``.
        rois: optional ``(B, H, W)`` 0/1 region of interest; pixels with roi 0 get exactly zero gradient.
            The lattice is built from all pixels, roi 0 ones included.

    Returns:
        A scalar. Gradient w.r.t. the (resized) segmentations: ``-(2 weight / B) (W X) * roi``, flowing to
        the full-resolution input through the resize's autograd; ``W X`` is computed once in the forward.
        This is the ECCV'18 code's gradient, which treats W as symmetric; the exact gradient of the
        lattice's quadratic form, ``-(weight / B) (W + W^T) X * roi``, differs from it at the 1e-4..1e-2
        level (see :func:`permutohedral_filter`).
    """
    prepared = _checked_prepare("dense_crf_loss", images, segmentations, rois, sigma_rgb, sigma_xy, scale_factor)
    if prepared is None:
        return (segmentations * 0).sum()
    feats, x, _ = prepared
    B = images.shape[0]
    energy = _QuadraticForm.apply(x, feats)
    return -(weight / B) * energy.sum()


def normalized_cut_loss(
    images: Tensor,
    segmentations: Tensor,
    weight: float,
    sigma_rgb: float,
    sigma_xy: float,
    scale_factor: float = 1.0,
    rois: Optional[Tensor] = None,
) -> Tensor:
    """Normalized-cut loss of Tang et al. (CVPR'18): ``(weight / B) sum_b sum_k S_k^T W (1 - S_k) / (d^T S_k)``.

    ``d = W 1`` is the degree vector; features, resizing and arguments as in :func:`dense_crf_loss`. With a
    roi, ``X = S * roi`` replaces S and the roi replaces 1 (``d = W roi``): the cut of the region's
    segmentation. Classes with ``d^T X_k = 0`` (absent from the region) contribute 0. The loss lies in
    ``[0, weight * K]``. The gradient is exact (autograd through the filter, whose backward applies the
    adjoint ``W^T`` on the saved lattice).
    """
    prepared = _checked_prepare("normalized_cut_loss", images, segmentations, rois, sigma_rgb, sigma_xy, scale_factor)
    if prepared is None:
        return (segmentations * 0).sum()
    feats, x, roi = prepared
    B = images.shape[0]
    if roi is None:
        roi = x.new_ones((x.shape[0], 1) + x.shape[2:])
    # One lattice pass over the K+1 channels [X, roi]; autograd applies W^T to the gradient (the exact
    # adjoint, reusing the lattice built in the forward pass).
    w = permutohedral_filter(torch.cat([x, roi.expand(x.shape[0], 1, *x.shape[2:])], 1), feats)
    wx, dvec = w[:, :-1], w[:, -1:].detach()
    degree = (x * dvec).flatten(2).sum(2)
    cut = degree - (x * wx).flatten(2).sum(2)
    pos = degree > 0
    safe = torch.where(pos, degree, torch.ones_like(degree))
    return (weight / B) * torch.where(pos, cut / safe, torch.zeros_like(cut)).sum()
