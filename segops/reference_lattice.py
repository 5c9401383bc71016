"""Pure-PyTorch twins of the permutohedral filter and the losses built on it.

Two twins of ``segops.ops.permutohedral_filter`` (``W_ij ~ exp(-|f_i - f_j|^2 / 2)``):

(a) :func:`dense_gaussian_filter` -- the exact dense Gaussian ``W x``, O(N^2) time (chunked, O(chunk N)
    memory): small images only. The lattice approximates it (see :func:`permutohedral_filter`).
(b) :func:`permutohedral_filter` -- a vectorised pure-PyTorch permutohedral lattice with the semantics of
    the compatibility contract (shared/DESIGN.md "Lattice semantics", the lattice of Kraehenbuehl &
    Koltun's densecrf code used by the ECCV'18 loss): the test reference of the C++/CUDA kernels and the
    "pure PyTorch" benchmark baseline. It is differentiable in ``values`` through ordinary autograd.

The discrete decisions (rounding, ranking) use the same floating-point operations in the same order as
the kernels (``csrc/include/segops/permutohedral_math.h``), so in the same dtype both build the same
lattice and agree to rounding.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Lattice",
    "build_lattice",
    "lattice_filter",
    "permutohedral_filter",
    "dense_gaussian_filter",
    "crf_features",
    "dense_crf_loss",
    "normalized_cut_loss",
]


class Lattice(NamedTuple):
    vertex: Tensor  # (N, d+1) int64 vertex ids
    bary: Tensor  # (N, d+1) barycentric weights
    minus: Tensor  # (M, d+1) int64 neighbour at key - 1 (+d at j), M = absent
    plus: Tensor  # (M, d+1) int64 neighbour at key + 1 (-d at j), M = absent
    num_vertices: int
    d: int


def _elevate(features: Tensor) -> Tensor:
    """Step 1: (N, d) -> (N, d+1) elevated coordinates, same operation order as the kernel."""
    n, d = features.shape
    inv_std_dev = math.sqrt(2.0 / 3.0) * (d + 1)
    scale = torch.tensor(
        [inv_std_dev / math.sqrt((i + 1) * (i + 2)) for i in range(d)], dtype=torch.float64
    ).to(device=features.device, dtype=features.dtype)
    c = features * scale
    e = features.new_empty((n, d + 1))
    sm = features.new_zeros((n,))
    for j in range(d, 0, -1):
        cf = c[:, j - 1]
        e[:, j] = sm - cf * j
        sm = sm + cf
    e[:, 0] = sm
    return e


def _encode(keys: Tensor, lo: Tensor, span: Tensor) -> Tensor:
    code = torch.zeros(keys.shape[:-1], dtype=torch.int64, device=keys.device)
    for i in range(keys.shape[-1]):
        code = code * int(span[i]) + (keys[..., i] - int(lo[i]))
    return code


def build_lattice(features: Tensor) -> Lattice:
    """The lattice of N points with features (N, d), in the dtype of ``features``."""
    if features.dim() != 2:
        raise ValueError("features must be (N, d), got %s" % (tuple(features.shape),))
    n, d = features.shape
    if not 1 <= d <= 16:
        raise ValueError("d must be in [1, 16], got %d" % d)
    if not bool(torch.isfinite(features).all()):
        raise ValueError("features contain NaN or Inf")
    dev = features.device
    if n == 0:  # no points: an empty lattice (amin / amax below need at least one key)
        empty = torch.empty((0, d + 1), dtype=torch.int64, device=dev)
        return Lattice(empty, features.new_empty((0, d + 1)), empty, empty, 0, d)
    e = _elevate(features)
    down = 1.0 / (d + 1)
    # step 2: nearest remainder-0 point, ranks of the remainders, back onto the plane
    q = torch.round(e * down)
    rem0 = q.to(torch.int64) * (d + 1)
    r = e - rem0.to(e.dtype)
    greater = (r.unsqueeze(1) > r.unsqueeze(2)).sum(2)  # #{j : r_j > r_i}
    lower = torch.tril(torch.ones(d + 1, d + 1, dtype=torch.bool, device=dev), diagonal=-1)  # j < i
    ties = ((r.unsqueeze(1) == r.unsqueeze(2)) & lower).sum(2)
    rank = greater + ties
    s = q.to(torch.int64).sum(1, keepdim=True)
    rank = rank + s
    under = rank < 0
    over = rank > d
    rank = torch.where(under, rank + (d + 1), torch.where(over, rank - (d + 1), rank))
    rem0 = torch.where(under, rem0 + (d + 1), torch.where(over, rem0 - (d + 1), rem0))
    # step 3: barycentric weights
    v = (e - rem0.to(e.dtype)) * down
    b = features.new_zeros((n, d + 2))
    b.scatter_add_(1, d - rank, v)
    b.scatter_add_(1, d - rank + 1, -v)
    b[:, 0] += 1 + b[:, d + 1]
    bary = b[:, : d + 1].contiguous()
    # step 4: vertex keys (first d coordinates)
    k = torch.arange(d + 1, device=dev).view(1, d + 1, 1)
    keys = rem0[:, None, :d] + k - (d + 1) * (rank[:, None, :d] > d - k).to(torch.int64)  # (N, d+1, d)
    # hash: unique keys; neighbours along the d+1 directions looked up among them
    flat = keys.reshape(-1, d)
    lo = flat.amin(0) - (d + 1)
    span = flat.amax(0) - lo + (d + 2)
    bits = float(torch.log2(span.double()).sum()) if flat.numel() else 0.0
    delta = torch.full((d + 1, d), -1, dtype=torch.int64, device=dev)  # row j: the key - 1, +d at j
    delta[torch.arange(d), torch.arange(d)] = d
    if bits < 62:
        codes = _encode(flat, lo, span)
        uniq, inverse = torch.unique(codes, sorted=True, return_inverse=True)
        ukeys = keys.new_empty((uniq.numel(), d))
        ukeys[inverse] = flat
        m = uniq.numel()

        def lookup(nkeys: Tensor) -> Tensor:
            c = _encode(nkeys, lo, span)
            pos = torch.searchsorted(uniq, c).clamp(max=m - 1)
            return torch.where(uniq[pos] == c, pos, torch.full_like(pos, m))

    else:  # keys too spread out to pack into one int64: unique over rows
        ukeys, inverse = torch.unique(flat, dim=0, return_inverse=True)
        m = ukeys.shape[0]

        def lookup(nkeys: Tensor) -> Tensor:
            shp = nkeys.shape[:-1]
            allk, inv = torch.unique(torch.cat([ukeys, nkeys.reshape(-1, d)]), dim=0, return_inverse=True)
            slot = torch.full((allk.shape[0],), m, dtype=torch.int64, device=dev)
            slot[inv[:m]] = torch.arange(m, device=dev)
            return slot[inv[m:]].reshape(shp)

    vertex = inverse.reshape(n, d + 1)
    minus = lookup(ukeys[:, None, :] + delta[None])
    plus = lookup(ukeys[:, None, :] - delta[None])
    return Lattice(vertex, bary, minus, plus, m, d)


def lattice_filter(lat: Lattice, values: Tensor, normalize: bool = False) -> Tensor:
    """Splat / blur / slice of values (N, C) on a built lattice (differentiable in values)."""
    n, c = values.shape
    d = lat.d
    dtype = lat.bary.dtype
    x = values.to(dtype)
    if normalize:
        x = torch.cat([x, x.new_ones((n, 1))], 1)
    grid = x.new_zeros((lat.num_vertices, x.shape[1]))
    for k in range(d + 1):  # step 5
        grid = grid.index_add(0, lat.vertex[:, k], lat.bary[:, k, None] * x)
    zero = grid.new_zeros((1, grid.shape[1]))
    for j in range(d + 1):  # step 6, double-buffered
        padded = torch.cat([grid, zero])
        grid = grid + 0.5 * (padded[lat.minus[:, j]] + padded[lat.plus[:, j]])
    out = x.new_zeros((n, x.shape[1]))
    for k in range(d + 1):  # step 7
        out = out + lat.bary[:, k, None] * grid[lat.vertex[:, k]]
    out = out * (1.0 / (1.0 + 2.0 ** (-d)))
    if normalize:
        out = out[:, :c] / out[:, c:]
    return out.to(values.dtype)


def permutohedral_filter(values: Tensor, features: Tensor, normalize: bool = False) -> Tensor:
    """Twin (b): ``W values`` per image, values (B, C, *spatial), features (B, d, *spatial).

    The lattice is computed in the accumulation dtype of ``values`` (float64 for float64, else float32),
    like the kernel.
    """
    B, C = values.shape[:2]
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    d = features.shape[1]
    n = features[0, 0].numel() if B else 0
    outs = []
    for b in range(B):
        f = features[b].reshape(d, n).t().to(acc)
        x = values[b].reshape(C, n).t()  # explicit n: reshape(C, -1) is ambiguous for C = 0
        lat = build_lattice(f)
        outs.append(lattice_filter(lat, x.to(acc), normalize).t().reshape(values.shape[1:]))
    if not outs:
        return values.clone()
    return torch.stack(outs).to(values.dtype)


def dense_gaussian_filter(values: Tensor, features: Tensor, normalize: bool = False, chunk: int = 1024) -> Tensor:
    """Twin (a): exact ``sum_j exp(-|f_i - f_j|^2 / 2) x_j`` (self term included), O(N^2) time."""
    B, C = values.shape[:2]
    d = features.shape[1]
    outs = []
    for b in range(B):
        f = features[b].reshape(d, -1).t().to(values.dtype)
        x = values[b].reshape(C, -1).t()
        if normalize:
            x = torch.cat([x, x.new_ones((x.shape[0], 1))], 1)
        rows = []
        for start in range(0, f.shape[0], chunk):
            w = torch.exp(-0.5 * torch.cdist(f[start : start + chunk], f).pow(2))
            rows.append(w @ x)
        out = torch.cat(rows)
        if normalize:
            out = out[:, :C] / out[:, C:]
        outs.append(out.t().reshape(values.shape[1:]))
    return torch.stack(outs) if outs else values.clone()


def crf_features(images: Tensor, sigma_rgb: float, sigma_xy: float) -> Tensor:
    """(B, Ci, H, W) -> (B, 2 + Ci, H, W): (column / sigma_xy, row / sigma_xy, channels / sigma_rgb)."""
    B, Ci, H, W = images.shape
    acc = torch.float64 if images.dtype == torch.float64 else torch.float32
    xs = torch.arange(W, device=images.device, dtype=acc).view(1, 1, 1, W).expand(B, 1, H, W) / sigma_xy
    ys = torch.arange(H, device=images.device, dtype=acc).view(1, 1, H, 1).expand(B, 1, H, W) / sigma_xy
    return torch.cat([xs, ys, images.to(acc) / sigma_rgb], 1)


def _scaled(images: Tensor, segmentations: Tensor, rois: Optional[Tensor], sigma_xy: float, scale_factor: float):
    if rois is None:
        rois = segmentations.new_ones((segmentations.shape[0],) + segmentations.shape[2:])
    if scale_factor != 1.0:
        images = F.interpolate(images, scale_factor=scale_factor, mode="nearest")
        segmentations = F.interpolate(segmentations, scale_factor=scale_factor, mode="bilinear", align_corners=False)
        rois = F.interpolate(rois.unsqueeze(1).to(segmentations.dtype), scale_factor=scale_factor, mode="nearest").squeeze(1)
        sigma_xy = sigma_xy * scale_factor
    return images, segmentations, rois.to(segmentations.dtype), sigma_xy


def dense_crf_loss(
    images: Tensor,
    segmentations: Tensor,
    weight: float,
    sigma_rgb: float,
    sigma_xy: float,
    scale_factor: float = 1.0,
    rois: Optional[Tensor] = None,
    filter=permutohedral_filter,
) -> Tensor:
    """``-(weight / B) sum_b sum_k X_bk^T W_b X_bk``, X = S * roi, via autograd of the twin filter."""
    B = images.shape[0]
    images, seg, rois, sigma_xy = _scaled(images, segmentations, rois, sigma_xy, scale_factor)
    feats = crf_features(images, sigma_rgb, sigma_xy)
    x = seg * rois.unsqueeze(1)
    wx = filter(x, feats.to(x.dtype) if x.dtype == torch.float64 else feats)
    return -(weight / B) * (x * wx).sum()


def normalized_cut_loss(
    images: Tensor,
    segmentations: Tensor,
    weight: float,
    sigma_rgb: float,
    sigma_xy: float,
    scale_factor: float = 1.0,
    rois: Optional[Tensor] = None,
    filter=permutohedral_filter,
) -> Tensor:
    """``(weight / B) sum_b sum_k X_bk^T W_b (roi - X_bk) / (d_b^T X_bk)``, d_b = W_b roi (terms with
    ``d^T X <= 0`` count 0; non-finite inputs give a non-finite loss)."""
    B = images.shape[0]
    images, seg, rois, sigma_xy = _scaled(images, segmentations, rois, sigma_xy, scale_factor)
    feats = crf_features(images, sigma_rgb, sigma_xy)
    r = rois.unsqueeze(1)
    x = seg * r
    w = filter(torch.cat([x, r], 1), feats.to(x.dtype) if x.dtype == torch.float64 else feats)
    wx, dvec = w[:, :-1], w[:, -1:]
    assoc = (x * wx).flatten(2).sum(2)
    degree = (x * dvec).flatten(2).sum(2)
    cut = degree - assoc
    # a class absent from the region (degree 0) contributes 0; a NaN degree (non-finite input) propagates
    live = ~(degree <= 0)
    safe = torch.where(live, degree, torch.ones_like(degree))
    return (weight / B) * torch.where(live, cut / safe, torch.zeros_like(cut)).sum()
