"""Dense CRF (ECCV'18) and normalized-cut (CVPR'18) regularized losses on the permutohedral lattice.

One pass over the whole batch: the lattice of every image is built in one op (one host read: the vertex
count), then one op computes every image's and class's quadratic forms ``<x_k, W x_k>`` (and for the
normalized cut ``<x_k, W r>``) in the lattice's vertex domain: with S the splat and B the blur,
``W = alpha S^T B S``, so ``<x, W y> = alpha <S x, B S y>`` needs no per-pixel output. Kept for the backward:
the blurred vertex values ``B S x`` (M x K, M the lattice's vertices, usually far fewer than the pixels) and
the lattice's per-pixel vertex ids and weights; the backward slices them once, scaled by the incoming
gradient (on the CPU at scale_factor 0.5, straight into the full-resolution gradient: the resize's backward
fused into the slice). docs/ops/crf-losses.md has the maths, arguments, determinism and measured speed.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from segops.ops._checks import check_same_device
from segops.ops.lattice import _acc_dtype, crf_features
from segops.ops.resize import half_resolution

__all__ = ["dense_crf_loss", "normalized_cut_loss"]

ops = torch.ops.segops

_LatticeTensors = Tuple[Tensor, Tensor, Tensor]


# ---- the quadratic-forms op: fake kernel and autograd -------------------------------------------------------


@torch.library.register_fake("segops::_lattice_quadratic_forms")
def _forms_fake(x, roi, vertex, bary, neighbors, degree, exact):
    check_same_device("_lattice_quadratic_forms", "x", x, roi=roi, vertex=vertex, bary=bary, neighbors=neighbors)
    B, K = x.shape[0], x.shape[1]
    M = neighbors.shape[0]
    acc = _acc_dtype(x.dtype)
    cg = K + 1 if degree else K
    forms = x.new_empty((B, K, 2), dtype=torch.float64)
    return forms, x.new_empty((M, cg), dtype=acc), x.new_empty((M, cg), dtype=acc)


@torch.library.register_fake("segops::_lattice_quadratic_forms_backward")
def _forms_backward_fake(grad_forms, splatted, blurred, vertex, bary, neighbors, exact, dtype, full_size=None,
                         mask=None):
    op = "_lattice_quadratic_forms_backward"
    if full_size is None:
        torch._check(mask is None, lambda: "%s: mask needs full_size" % op)
        return grad_forms.new_empty((vertex.shape[0], grad_forms.shape[1], vertex.shape[1]), dtype=dtype)
    torch._check(len(full_size) == 2 and (full_size[0] // 2) * (full_size[1] // 2) == vertex.shape[1],
                 lambda: "%s: full_size must be [H, W] with (H // 2) (W // 2) = N = %d points, got %s"
                 % (op, vertex.shape[1], list(full_size)))
    return grad_forms.new_empty((vertex.shape[0], grad_forms.shape[1], full_size[0], full_size[1]), dtype=dtype)


def _forms_setup_context(ctx, inputs, output) -> None:
    x, _, vertex, bary, neighbors, _, exact = inputs
    _, splatted, blurred = output
    # The grids are saved values, not results: no gradient flows through them, and autograd builds no zero
    # gradients for them in every backward (two (M, K) tensors, 2.9 MB for the ECCV'18 photo at 512^2).
    ctx.mark_non_differentiable(splatted, blurred)
    ctx.set_materialize_grads(False)
    # The ECCV'18 gradient needs only the blurred values; the exact one also the splatted (for B^T S x).
    ctx.save_for_backward(splatted if exact else None, blurred, vertex, bary, neighbors)
    ctx.exact = exact
    ctx.dtype = x.dtype
    ctx.shape = x.shape


def _forms_gradient(ctx, grad_forms: Tensor, full_size: Optional[List[int]] = None) -> Tensor:
    """The forms' backward op on what the forward saved: (splatted or None, blurred, vertex, bary, neighbors
    [, mask]) and ctx.exact / ctx.dtype."""
    splatted, blurred, vertex, bary, neighbors, *mask = ctx.saved_tensors
    if splatted is None:  # (the ECCV'18 gradient does not read it)
        splatted = blurred.new_empty((0, blurred.shape[1]))
    return ops._lattice_quadratic_forms_backward.default(grad_forms, splatted, blurred, vertex, bary, neighbors,
                                                         ctx.exact, ctx.dtype, full_size, *mask)


def _forms_backward(ctx, grad_forms: Tensor, *_unused: Tensor):
    grad_x = None
    if ctx.needs_input_grad[0] and grad_forms is not None:
        grad_x = _forms_gradient(ctx, grad_forms).view(ctx.shape)
    return grad_x, None, None, None, None, None, None


torch.library.register_autograd("segops::_lattice_quadratic_forms", _forms_backward, setup_context=_forms_setup_context)


class _HalfResolutionForms(torch.autograd.Function):
    """The forms of ``x = half_resolution(s) [* mask]`` on a built lattice (CPU), ``s`` (B, K, H, W): the values
    of the ops apart. The backward is one op: the slice writes the gradient of ``s`` (B, K, H, W) itself, each
    value times the mask and 1/4 into its 2 x 2 block (the same bits as the multiply's and the resize's
    backward after the slice), so the 4x larger gradient is written once, inside a pass that computes, instead
    of by a pass of its own after a quarter-size one."""

    @staticmethod
    def forward(ctx, s: Tensor, mask: Optional[Tensor], roi: Optional[Tensor], vertex: Tensor, bary: Tensor,
                neighbors: Tensor, degree: bool, exact: bool) -> Tensor:
        x = ops._half_resolution.default(s)
        if mask is not None:
            x = x * mask
        forms, splatted, blurred = ops._lattice_quadratic_forms.default(x, roi, vertex, bary, neighbors, degree, exact)
        ctx.save_for_backward(splatted if exact else None, blurred, vertex, bary, neighbors, mask)
        ctx.exact, ctx.dtype, ctx.size = exact, x.dtype, [s.shape[2], s.shape[3]]
        return forms

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_forms: Tensor):
        grad_s = _forms_gradient(ctx, grad_forms, ctx.size) if ctx.needs_input_grad[0] else None
        return grad_s, None, None, None, None, None, None, None


class _HalfOf(NamedTuple):
    """``x = half_resolution(s) [* mask]``, not computed yet: the forms' op computes it (see _HalfResolutionForms)."""

    s: Tensor
    mask: Optional[Tensor]


# ---- argument handling --------------------------------------------------------------------------------------


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``; a copy from the CPU to a GPU is issued without blocking the host (the copy from
    pageable memory is staged before the call returns, so the source may change afterwards)."""
    if t.device == device:
        return t
    return t.to(device, non_blocking=t.device.type == "cpu" and device.type == "cuda")


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
        # images and rois are moved to the segmentations' device; a 'meta' tensor has no values to move
        if t is not None and t.device != segmentations.device and "meta" in (t.device.type, segmentations.device.type):
            raise ValueError("%s: %s are on %s but segmentations are on %s (a meta tensor holds no data to move)"
                             % (name, what, t.device, segmentations.device))
    if not segmentations.is_floating_point():
        raise TypeError("%s: segmentations must be floating point, got %s" % (name, segmentations.dtype))
    if rois is not None and (rois.dim() != 3 or rois.shape[0] != images.shape[0] or rois.shape[1:] != images.shape[2:]):
        raise ValueError("%s: rois must be (B, H, W) = %s, got %s"
                         % (name, (images.shape[0],) + tuple(images.shape[2:]), tuple(rois.shape)))
    for what, v in (("sigma_rgb", sigma_rgb), ("sigma_xy", sigma_xy), ("scale_factor", scale_factor)):
        if not (v > 0 and v < float("inf")):
            raise ValueError("%s: %s must be a positive finite number, got %r" % (name, what, v))
    H, W = images.shape[2:]
    if scale_factor != 1.0 and segmentations.numel() > 0 and min(math.floor(H * scale_factor),
                                                                math.floor(W * scale_factor)) < 1:
        # F.interpolate would fail with "Input and output sizes should be greater than 0"
        raise ValueError("%s: scale_factor %r resizes the %d x %d images to %d x %d: nothing left"
                         % (name, scale_factor, H, W, math.floor(H * scale_factor), math.floor(W * scale_factor)))


def _bad_images(name: str) -> RuntimeError:
    return RuntimeError("%s: images contain NaN or Inf (or values so large that the lattice's elevated "
                        "coordinates exceed 1e9; images are expected in 0..255)" % name)


def _prepare(name: str, images: Tensor, segmentations: Tensor, rois: Optional[Tensor], sigma_rgb: float,
             sigma_xy: float, scale_factor: float
             ) -> Optional[Tuple[Tensor, Union[Tensor, _HalfOf], Optional[Tensor]]]:
    """Both losses' prologue: checks, images and rois onto the segmentations' device, resizing (nearest images /
    rois, bilinear segmentations), then (features, X = S * roi, roi (B, 1, H, W) or None). None when nothing
    is left to filter (B = 0, K = 0 or an empty image): the loss is then 0. On the CPU at scale 0.5, X is left
    to the forms' op (a _HalfOf), whose backward then writes the full-resolution gradient itself.

    The images' finiteness (of the full-resolution images: a nearest resize may drop a NaN pixel) is folded
    into the features (:func:`crf_features`' poison) instead of read back here; the lattice build reports it
    with its one host read.
    """
    _check_loss_inputs(name, images, segmentations, rois, sigma_rgb, sigma_xy, scale_factor)
    device = segmentations.device
    images = _to_device(images, device)
    # 0 for finite images, NaN otherwise (the sum of NaN / Inf values is NaN / Inf); summed in the features'
    # dtype, which holds any 0..255 image without overflow. Only where the features are not made from every
    # pixel (a resize, or nothing to filter): at full resolution a NaN / Inf pixel makes its own features
    # non-finite, which the build reports (one pass over the images less per call).
    checked = images.is_floating_point() and (scale_factor != 1.0 or segmentations.numel() == 0)
    poison = images.sum(dtype=_acc_dtype(images.dtype)) * 0 if checked else None
    if segmentations.numel() == 0:  # before resizing, which rejects empty inputs
        if poison is not None and images.numel() > 0 and not bool(poison == 0):
            raise _bad_images(name)
        return None
    if rois is not None:
        rois = _to_device(rois, device).to(segmentations.dtype)
    halved = False
    if scale_factor == 0.5:  # the ECCV'18 setting
        # Nearest at exactly one half picks the even rows and columns (source index floor(2 i)): a view instead
        # of a resize op. The segmentations: the bilinear resize's values (last-bit order aside), one op.
        H2, W2 = images.shape[2] // 2 * 2, images.shape[3] // 2 * 2
        images = images[:, :, 0:H2:2, 0:W2:2]
        if rois is not None:
            rois = rois[:, 0:H2:2, 0:W2:2]
        # CPU: the resize is left to the forms' op (not where a roi wants a gradient: that op gives it none)
        halved = (segmentations.device.type == "cpu" and images.shape[2] * images.shape[3] > 0
                  and (rois is None or not rois.requires_grad))
        if not halved:
            segmentations = half_resolution(segmentations)
    elif scale_factor != 1.0:
        images = F.interpolate(images, scale_factor=scale_factor, mode="nearest")
        segmentations = F.interpolate(segmentations, scale_factor=scale_factor, mode="bilinear", align_corners=False)
        if rois is not None:
            rois = F.interpolate(rois.unsqueeze(1), scale_factor=scale_factor, mode="nearest").squeeze(1)
    sigma_xy = sigma_xy * scale_factor
    if segmentations.numel() == 0:
        return None
    feats = crf_features(images, sigma_rgb, sigma_xy, poison).to(_acc_dtype(segmentations.dtype))
    roi = None if rois is None else rois.unsqueeze(1)
    if halved:
        return feats, _HalfOf(segmentations, roi), roi
    return feats, segmentations if roi is None else segmentations * roi, roi


def _lattice(name: str, feats: Tensor) -> _LatticeTensors:
    try:
        return ops.permutohedral_lattice.default(feats)
    except RuntimeError as e:
        if "NaN or Inf" in str(e):  # the features are the images' (positions are finite)
            raise _bad_images(name) from None
        raise


def _forms(name: str, feats: Tensor, x: Union[Tensor, _HalfOf], roi: Optional[Tensor], degree: bool,
           exact: bool) -> Tensor:
    vertex, bary, neighbors = _lattice(name, feats)
    if isinstance(x, _HalfOf):
        return _HalfResolutionForms.apply(x.s, x.mask, roi, vertex, bary, neighbors, degree, exact)
    forms, _, _ = ops._lattice_quadratic_forms.default(x, roi, vertex, bary, neighbors, degree, exact)
    return forms


class _CutRatios(torch.autograd.Function):
    """``sum_bk (degree_bk - assoc_bk) / degree_bk`` over the classes with ``degree > 0`` (the others count 0;
    a NaN degree propagates), from forms ``(B, K, 2)`` = [assoc, degree]; float64. A hand-written backward:
    d/d assoc = -1 / degree, d/d degree = assoc / degree^2 (0 for the classes that count 0) -- a few ops
    instead of autograd's trace through the masking."""

    @staticmethod
    def forward(ctx, forms: Tensor) -> Tensor:
        assoc, degree = forms.unbind(2)
        dead = degree <= 0  # False for NaN: NaN propagates
        safe = torch.where(dead, 1.0, degree)
        ctx.save_for_backward(assoc, safe, dead)
        return torch.where(dead, 0.0, (degree - assoc) / safe).sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        assoc, safe, dead = ctx.saved_tensors
        scale = torch.where(dead, 0.0, grad / safe)
        return torch.stack([-scale, scale * (assoc / safe)], 2)


# ---- the losses ---------------------------------------------------------------------------------------------


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
        images: ``(B, C_img, H, W)``, RGB in 0..255 (any number of channels 1..14: d = 2 + C_img), on any
            device: moved to the segmentations' device. The values are not checked against 0..255; other
            ranges change the meaning of sigma_rgb.
        segmentations: ``(B, K, H, W)`` softmax probabilities (float32 / float64; float16 / bfloat16 are
            filtered in float32).
        weight: loss weight (ECCV'18: 2e-9; tiny because the sum runs over all N^2 pixel pairs).
        sigma_rgb, sigma_xy: bandwidths in colour units and pixels (of the full-resolution image).
        scale_factor: if != 1, images and rois are resized with nearest and segmentations with bilinear
            (align_corners=False) interpolation to ``floor(H * s)``, and sigma_xy becomes ``sigma_xy * s``.
        rois: optional ``(B, H, W)`` 0/1 region of interest (any dtype and device: moved to the
            segmentations'); pixels with roi 0 get exactly zero gradient. The lattice is built from all
            pixels, roi 0 ones included.

    Returns:
        A scalar of the segmentations' dtype (accumulated in float64). Gradient w.r.t. the (resized)
        segmentations: ``-(2 weight / B) (W X) * roi``, flowing to the full-resolution input through the
        resize's autograd. This is the ECCV'18 code's gradient, which treats W as symmetric; the exact
        gradient of the lattice's quadratic form, ``-(weight / B) (W + W^T) X * roi``, differs from it at the
        1e-4..1e-2 level.

    Raises:
        ValueError / TypeError: shapes, dtypes, non-positive sigmas or scale_factor, a resize to nothing,
            images or rois on the 'meta' device. RuntimeError: NaN / Inf in the images.
    """
    name = "dense_crf_loss"
    prepared = _prepare(name, images, segmentations, rois, sigma_rgb, sigma_xy, scale_factor)
    if prepared is None:
        return (segmentations * 0).sum()
    feats, x, _ = prepared
    forms = _forms(name, feats, x, None, degree=False, exact=False)
    loss = forms.select(2, 0).sum() * (-weight / images.shape[0])
    return loss.to(segmentations.dtype)


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

    ``d = W 1`` is the degree vector; features, resizing, devices and arguments as in :func:`dense_crf_loss`.
    With a roi, ``X = S * roi`` replaces S and the roi replaces 1 (``d = W roi``): the cut of the region's
    segmentation. Classes with ``d^T X_k = 0`` (absent from the region) contribute 0; NaN or Inf in the
    segmentations give a non-finite loss. The loss lies in ``[0, weight * K]``. The gradient is exact: ``(W + W^T) X_k`` for the association term, ``W roi`` for
    the degree term, on the lattice built in the forward pass.
    """
    name = "normalized_cut_loss"
    prepared = _prepare(name, images, segmentations, rois, sigma_rgb, sigma_xy, scale_factor)
    if prepared is None:
        return (segmentations * 0).sum()
    feats, x, roi = prepared
    forms = _forms(name, feats, x, roi, degree=True, exact=True)
    return (_CutRatios.apply(forms) * (weight / images.shape[0])).to(segmentations.dtype)
