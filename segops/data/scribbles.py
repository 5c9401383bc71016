"""Weak labels synthesized from full masks, for any mask dataset (no scipy): scribbles, clicks, image tags.

A scribble is a thin stroke inside a region, kept away from the region's boundary, as a person would draw it
(ScribbleSup, Lin et al. CVPR'16: ~3% of the pixels labelled, the rest ``ignore_index``). For every class
region we compute the chessboard distance to the region's boundary by repeated 3x3 erosion, take the
region's *core* (pixels at least ``margin`` from the boundary, shrunk further for large regions), and draw
strokes inside it:

* the medial ridge of the region (pixels whose distance is a local maximum along some axis, i.e. a
  morphological skeleton) restricted to the core, which follows elongated shapes; and
* polyline strokes between random core points (starting at the deepest point), which covers blob-like
  shapes whose skeleton is nearly a single point.

Strokes are added until the requested fraction of the region is labelled.

A *click* (:func:`synthesize_clicks`) is one small disk per region, placed at a random point of the region's
core, as a person clicks once inside each object and each piece of background. *Image tags*
(:func:`image_tags`) are the classes present in a mask, the label of image-level supervision.

Everything is deterministic given the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

__all__ = ["distance_to_boundary", "connected_components", "synthesize_scribbles", "draw_line", "synthesize_clicks", "image_tags"]


def _shift_reduce(a: np.ndarray, fill, op) -> np.ndarray:
    """3x3 neighbourhood reduction (``op`` = np.minimum / np.maximum, separable) with ``fill`` outside."""
    out = a.copy()
    op(out[1:], a[:-1], out=out[1:])
    op(out[:-1], a[1:], out=out[:-1])
    rows = out.copy()
    op(out[:, 1:], rows[:, :-1], out=out[:, 1:])
    op(out[:, :-1], rows[:, 1:], out=out[:, :-1])
    if fill is not None:  # the outside of the image takes part in the reduction
        for edge in (out[0], out[-1], out[:, 0], out[:, -1]):
            op(edge, fill, out=edge)
    return out


def distance_to_boundary(mask: np.ndarray, max_iter: Optional[int] = None) -> np.ndarray:
    """Chessboard distance (in pixels, >= 1 inside) of every pixel of a boolean ``mask`` to the nearest
    pixel outside it; 0 outside. The image border counts as outside. ``(H, W) bool -> (H, W) int32``."""
    cur = np.ascontiguousarray(mask, dtype=np.bool_)
    dist = np.zeros(cur.shape, np.int32)
    limit = max_iter if max_iter is not None else (max(cur.shape) + 1) // 2 + 1
    for _ in range(limit):
        if not cur.any():
            break
        dist += cur
        cur = _shift_reduce(cur, False, np.minimum)  # erosion; outside the image is background
    return dist


def connected_components(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels of a boolean mask: ``(H, W) int64``, 0 outside, 1..n inside
    (numbered in raster order of each component's first pixel)."""
    mask = np.ascontiguousarray(mask, dtype=np.bool_)
    h, w = mask.shape
    if not mask.any():
        return np.zeros((h, w), np.int64)
    lab = np.where(mask, np.arange(1, h * w + 1, dtype=np.int64).reshape(h, w), 0)
    # propagate the maximum id through each component until nothing changes, with pointer jumping (a
    # pixel takes the label of the pixel its label names: same component, label >= its own) for speed
    while True:
        new = _shift_reduce(lab, None, np.maximum)
        new[~mask] = 0
        for _ in range(4):
            jumped = np.where(mask, new.ravel()[np.maximum(new, 1) - 1], 0)
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, lab):
            break
        lab = new
    uniq, first = np.unique(lab.ravel(), return_index=True)
    keep = uniq > 0
    order = np.argsort(first[keep], kind="stable")
    remap = np.zeros(uniq.shape[0], np.int64)
    nz = np.nonzero(keep)[0]
    remap[nz[order]] = np.arange(1, len(nz) + 1)
    return remap[np.searchsorted(uniq, lab)]


def _line_points(y0: float, x0: float, y1: float, x1: float) -> Tuple[np.ndarray, np.ndarray]:
    n = int(max(abs(y1 - y0), abs(x1 - x0))) + 1
    t = np.linspace(0.0, 1.0, n)
    return np.rint(y0 + (y1 - y0) * t).astype(np.int64), np.rint(x0 + (x1 - x0) * t).astype(np.int64)


def draw_line(canvas: np.ndarray, y0: float, x0: float, y1: float, x1: float, width: int = 1) -> None:
    """Marks the pixels of the segment (y0, x0)-(y1, x1) in the boolean ``canvas`` (in place), ``width``
    pixels thick (a square brush)."""
    h, w = canvas.shape
    ys, xs = _line_points(y0, x0, y1, x1)
    if width == 1:
        ok = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        canvas[ys[ok], xs[ok]] = True
        return
    r0 = -((width - 1) // 2)
    for dy in range(r0, r0 + width):
        for dx in range(r0, r0 + width):
            yy, xx = ys + dy, xs + dx
            ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            canvas[yy[ok], xx[ok]] = True


def _ridge(dist: np.ndarray) -> np.ndarray:
    """Medial ridge: pixels whose distance is >= both neighbours along a row, a column or a diagonal and
    strictly greater than at least one of them (a discrete skeleton of the region)."""
    d = np.pad(dist, 1, mode="constant")
    c = d[1:-1, 1:-1]
    h, w = dist.shape
    out = np.zeros(dist.shape, np.bool_)
    for (ay, ax), (by, bx) in (((0, 1), (2, 1)), ((1, 0), (1, 2)), ((0, 0), (2, 2)), ((0, 2), (2, 0))):
        a = d[ay : ay + h, ax : ax + w]
        b = d[by : by + h, bx : bx + w]
        out |= (c >= a) & (c >= b) & ((c > a) | (c > b))
    return out & (dist > 0)


_NEIGHBOURS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _walk_skeleton(
    ridge: np.ndarray, dist: np.ndarray, y: int, x: int, length: int, rng: np.random.Generator
) -> List[Tuple[int, int]]:
    """A stroke along the skeleton: from (y, x), step to the unvisited 8-neighbour on the ridge with the
    largest distance to the boundary (random among ties) until ``length`` pixels or a dead end."""
    h, w = ridge.shape
    path = [(y, x)]
    seen = {(y, x)}
    while len(path) < length:
        best, cands = -1, []
        for dy, dx in _NEIGHBOURS:
            yy, xx = y + dy, x + dx
            if 0 <= yy < h and 0 <= xx < w and ridge[yy, xx] and (yy, xx) not in seen:
                d = int(dist[yy, xx])
                if d > best:
                    best, cands = d, [(yy, xx)]
                elif d == best:
                    cands.append((yy, xx))
        if not cands:
            break
        y, x = cands[int(rng.integers(0, len(cands)))]
        path.append((y, x))
        seen.add((y, x))
    return path


def _region_scribble(
    region: np.ndarray,
    rng: np.random.Generator,
    fraction: float,
    margin: int,
    core_ratio: float,
    width: int,
    max_strokes: int,
) -> np.ndarray:
    """A scribble inside one connected region (boolean in, boolean out)."""
    dist = distance_to_boundary(region)
    dmax = int(dist.max())
    if dmax == 0:
        return np.zeros_like(region)
    # the core: far from the boundary (at least `margin`, and `core_ratio` of the region's depth)
    thr = min(dmax, max(margin, int(np.ceil(core_ratio * dmax))))
    core = dist >= thr
    area = int(region.sum())
    budget = max(1, int(round(max(fraction * area, np.sqrt(area)))))
    length = max(1, budget // max(width, 1))  # stroke length in pixels
    out = np.zeros_like(region)
    deepest = np.flatnonzero(dist.ravel() == dmax)
    p = int(deepest[rng.integers(0, len(deepest))])
    py, px = divmod(p, region.shape[1])
    # 1) a stroke along the skeleton (the medial ridge inside the core), from the deepest point
    ridge = _ridge(dist) & core
    ridge[py, px] = True
    path = _walk_skeleton(ridge, dist, py, px, length, rng)
    py_, px_ = np.array(path).T
    for dy in range(-((width - 1) // 2), width - (width - 1) // 2):
        for dx in range(-((width - 1) // 2), width - (width - 1) // 2):
            yy, xx = py_ + dy, px_ + dx
            ok = (yy >= 0) & (yy < region.shape[0]) & (xx >= 0) & (xx < region.shape[1])
            out[yy[ok], xx[ok]] = True
    out &= core
    py, px = path[-1]
    # 2) polyline strokes between random core points until the budget is reached
    ys, xs = np.nonzero(core)
    for _ in range(max_strokes):
        remaining = length - len(path)
        if remaining <= 0:
            break
        j = int(rng.integers(0, len(ys)))
        ly, lx = _line_points(py, px, ys[j], xs[j])
        inside = core[ly, lx]
        ly, lx = ly[inside][: remaining + 1], lx[inside][: remaining + 1]
        for y, x in zip(ly.tolist(), lx.tolist()):
            if (y, x) != path[-1]:
                path.append((y, x))
        if len(ly):
            draw_line(out, ly[0], lx[0], ly[-1], lx[-1], width)
        out &= core
        py, px = ys[j], xs[j]
    out[path[0]] = True
    return out


def synthesize_scribbles(
    mask: np.ndarray,
    rng: np.random.Generator,
    fraction: float = 0.03,
    ignore_index: int = 255,
    margin: int = 2,
    core_ratio: float = 0.4,
    width: int = 1,
    min_area: int = 16,
    max_strokes: int = 6,
    num_classes: Optional[int] = None,
) -> np.ndarray:
    """Scribble labels from a full mask: thin strokes inside every region, the rest ``ignore_index``.

    Args:
        mask: ``(H, W)`` integer class map; ``ignore_index`` pixels (void) never get a scribble.
        rng: source of randomness (results are deterministic given its state).
        fraction: target labelled fraction of each region's area (~0.03 matches ScribbleSup); a region
            gets at least ``sqrt(area)`` stroke pixels, so small objects still get a visible stroke.
        margin: minimum chessboard distance of a scribble pixel to its region's boundary.
        core_ratio: scribbles also stay at least this fraction of the region's depth (its maximum
            distance to the boundary) inside, so that the band around boundaries is left unlabelled.
        width: stroke width in pixels.
        min_area: regions smaller than this get no scribble (as annotators skip tiny fragments).
        max_strokes: polyline segments per region at most.
        num_classes: if given, labels must be in ``[0, num_classes)`` (else ``ValueError``).

    Returns:
        ``(H, W)`` uint8 (int64 if labels exceed 255) map: class index on scribble pixels, else ``ignore_index``.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError("synthesize_scribbles: mask must be (H, W), got shape %s" % (mask.shape,))
    if not 0.0 < fraction <= 1.0:
        raise ValueError("synthesize_scribbles: fraction must be in (0, 1], got %r" % (fraction,))
    labels = [int(v) for v in np.unique(mask) if int(v) != ignore_index]
    if num_classes is not None and any(v < 0 or v >= num_classes for v in labels):
        raise ValueError(
            "synthesize_scribbles: mask has labels %s outside [0, %d) other than ignore_index=%d"
            % ([v for v in labels if v < 0 or v >= num_classes], num_classes, ignore_index)
        )
    out = np.full(mask.shape, ignore_index, dtype=np.int64)
    for c in labels:
        comps = connected_components(mask == c)
        for i in range(1, int(comps.max()) + 1):
            region = comps == i
            if region.sum() < min_area:
                continue
            s = _region_scribble(region, rng, fraction, margin, core_ratio, width, max_strokes)
            out[s] = c
    if ignore_index <= 255 and (out[out != ignore_index] <= 255).all():
        return out.astype(np.uint8)
    return out


def _check_label_map(fn: str, mask: np.ndarray, ignore_index: int, num_classes: Optional[int]) -> List[int]:
    """The labels of a 2-D mask other than ``ignore_index`` (``ValueError`` naming ``fn`` if out of range)."""
    if mask.ndim != 2:
        raise ValueError("%s: mask must be (H, W), got shape %s" % (fn, mask.shape))
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError("%s: mask must hold integer class ids, got dtype %s" % (fn, mask.dtype))
    labels = [int(v) for v in np.unique(mask) if int(v) != ignore_index]
    bad = [v for v in labels if v < 0 or (num_classes is not None and v >= num_classes)]
    if bad:
        raise ValueError(
            "%s: mask has labels %s outside [0, %s) other than ignore_index=%d"
            % (fn, bad, num_classes if num_classes is not None else "inf", ignore_index)
        )
    return labels


def synthesize_clicks(
    mask: np.ndarray,
    rng: np.random.Generator,
    radius: float = 1.5,
    ignore_index: int = 255,
    core_ratio: float = 0.5,
    min_area: int = 16,
    num_classes: Optional[int] = None,
) -> np.ndarray:
    """Click labels from a full mask: one small disk per connected region of every class, the rest ``ignore_index``.

    The click's centre is drawn uniformly among the region's *core*: pixels whose chessboard distance to the
    region's boundary is at least ``core_ratio`` of the region's largest (a person clicks well inside an
    object, not on its edge). The disk (pixels within ``radius`` of the centre, Euclidean) is clipped to the
    region, so a click never labels a pixel of another class.

    Args:
        mask: ``(H, W)`` integer class map; ``ignore_index`` pixels (void) never get a click.
        rng: source of randomness (deterministic given its state).
        radius: click radius in pixels (1.5: a 3x3 cross plus corners, 9 pixels; 0: a single pixel).
        core_ratio: in [0, 1]; 0 places clicks anywhere in the region, 1 only at its deepest points.
        min_area: regions smaller than this (pixels) get no click.
        num_classes: if given, labels must be in ``[0, num_classes)`` (else ``ValueError``).

    Returns:
        ``(H, W)`` uint8 (int64 if labels exceed 255): class index on click pixels, else ``ignore_index``.
    """
    mask = np.asarray(mask)
    labels = _check_label_map("synthesize_clicks", mask, ignore_index, num_classes)
    if not (radius >= 0 and np.isfinite(radius)):
        raise ValueError("synthesize_clicks: radius must be a finite number >= 0, got %r" % (radius,))
    if not 0.0 <= core_ratio <= 1.0:
        raise ValueError("synthesize_clicks: core_ratio must be in [0, 1], got %r" % (core_ratio,))
    h, w = mask.shape
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.full(mask.shape, ignore_index, dtype=np.int64)
    for c in labels:
        comps = connected_components(mask == c)
        for i in range(1, int(comps.max()) + 1):
            region = comps == i
            if int(region.sum()) < min_area:
                continue
            dist = distance_to_boundary(region)
            thr = max(1, int(np.ceil(core_ratio * int(dist.max()))))
            cand = np.flatnonzero(dist.ravel() >= thr)
            cy, cx = divmod(int(cand[rng.integers(0, len(cand))]), w)
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius * radius
            out[disk & region] = c
    if ignore_index <= 255 and (out[out != ignore_index] <= 255).all():
        return out.astype(np.uint8)
    return out


def image_tags(mask: np.ndarray, num_classes: int, ignore_index: int = 255, min_pixels: int = 1) -> np.ndarray:
    """The image-level tags of a mask: ``(num_classes,) bool``, True for every class with at least
    ``min_pixels`` pixels (``ignore_index`` never counts). Raises ``ValueError`` for labels outside
    ``[0, num_classes)`` other than ``ignore_index``."""
    mask = np.asarray(mask)
    if int(num_classes) < 1:
        raise ValueError("image_tags: num_classes must be >= 1, got %r" % (num_classes,))
    _check_label_map("image_tags", mask, ignore_index, num_classes)
    if int(min_pixels) < 1:
        raise ValueError("image_tags: min_pixels must be >= 1, got %r" % (min_pixels,))
    valid = mask[mask != ignore_index].astype(np.int64)
    counts = np.bincount(valid, minlength=int(num_classes))
    return counts >= int(min_pixels)
