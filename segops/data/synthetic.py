"""A built-in procedural scribble dataset: deterministic from a seed, nothing to download.

Every image has a textured, noisy background and 1..``max_objects`` objects of the shape classes
(by default disk and bar; class 0 is background). An object's colour is drawn at random for every object, so the
class is given by the *shape*, never by the colour; every object is painted in one colour (plus the same
noise as the background), so object boundaries coincide with colour edges, as in photographs. Each sample
has the full mask and scribbles (thin strokes in the core of every object and of the background, about 3%
of the pixels; everything else is 255 = unlabelled), drawn with :func:`segops.data.scribbles.synthesize_scribbles`.

Sample ``i`` depends only on ``(seed, i)``, so any subset, order or worker split produces the same data.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from segops.data.scribbles import synthesize_scribbles

__all__ = ["SyntheticScribbles", "render_sample", "SYNTHETIC_CLASSES", "SHAPES"]

#: every shape the generator can draw; a dataset uses a subset (``shapes``), class i + 1 = shapes[i].
SHAPES: Tuple[str, ...] = ("disk", "bar", "triangle", "box")
#: the default object classes: round disks and long thin bars, any colour, any orientation. (With triangles
#: too, a small CPU model needs many more steps to tell the shapes apart; pass ``shapes=`` for them.)
DEFAULT_SHAPES: Tuple[str, ...] = ("disk", "bar")
SYNTHETIC_CLASSES: Tuple[str, ...] = ("background",) + DEFAULT_SHAPES


def _smooth_field(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """A smooth random field (bilinear upsampling of a coarse ``cells x cells`` grid), ``(size, size, C)``
    in [-1, 1]."""
    coarse = torch.from_numpy(rng.uniform(-1.0, 1.0, (1, channels, cells, cells)).astype(np.float32))
    up = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)
    return up[0].permute(1, 2, 0).clamp(-1, 1).numpy()


def _shape_mask(shape: str, size: int, cy: float, cx: float, r: float, angle: float, aspect: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    y, x = yy + 0.5 - cy, xx + 0.5 - cx
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * x + s * y, -s * x + c * y  # rotated coordinates
    if shape == "disk":  # a round blob (ellipse of aspect 0.8..1)
        return (u / r) ** 2 + (v / (r * (0.8 + 0.2 * aspect))) ** 2 <= 1.0
    if shape == "bar":  # a long thin rotated rectangle
        return (np.abs(u) <= r * 1.15) & (np.abs(v) <= r * (0.3 + 0.12 * aspect))
    if shape == "box":  # rotated rectangle
        return (np.abs(u) <= r * 0.9) & (np.abs(v) <= r * 0.9 * (0.7 + 0.3 * aspect))
    if shape != "triangle":
        raise ValueError("unknown shape %r (known: %s)" % (shape, ", ".join(SHAPES)))
    # triangle: intersection of three half-planes of an equilateral triangle of circumradius r*1.25
    R = r * 1.25
    inside = np.ones((size, size), np.bool_)
    for k in range(3):
        a = angle + 2.0 * math.pi * k / 3.0
        nx, ny = math.cos(a), math.sin(a)
        inside &= (x * nx + y * ny) <= R * 0.5
    return inside


def render_sample(
    seed: int,
    index: int,
    size: int = 64,
    max_objects: int = 3,
    noise: float = 6.0,
    texture: float = 30.0,
    min_contrast: float = 90.0,
    scribble_fraction: float = 0.03,
    scribble_margin: int = 2,
    scribble_core_ratio: float = 0.4,
    shapes: Tuple[str, ...] = DEFAULT_SHAPES,
) -> Dict[str, np.ndarray]:
    """Renders sample ``index`` of the dataset with ``seed``: ``image (H, W, 3) uint8``, ``mask (H, W) uint8``
    in [0, 1 + len(shapes)), ``scribble (H, W) uint8`` (class or 255)."""
    rng = np.random.default_rng([int(seed), int(index)])
    # background: a base colour, a smooth colour field, a stripe texture and pixel noise
    base = rng.uniform(60, 195, 3)
    img = base + texture * _smooth_field(rng, size, 4, 3)
    freq = rng.uniform(0.25, 0.7)
    theta = rng.uniform(0, math.pi)
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = np.sin(freq * (xx * math.cos(theta) + yy * math.sin(theta)) + rng.uniform(0, 2 * math.pi))
    img = img + (texture / 3.0) * stripes[..., None] * rng.uniform(-1, 1, 3)
    mask = np.zeros((size, size), np.uint8)
    n_obj = int(rng.integers(1, max_objects + 1))
    for _ in range(n_obj):
        kind = int(rng.integers(1, len(shapes) + 1))
        r = rng.uniform(0.12, 0.21) * size
        aspect = rng.uniform(0.0, 1.0)
        cy, cx = rng.uniform(r, size - r, 2)
        shape = _shape_mask(shapes[kind - 1], size, cy, cx, r, rng.uniform(0, 2 * math.pi), aspect)
        if shape.sum() < 20:
            continue
        # a colour that differs clearly from what lies beneath (the object's edge is a colour edge)
        under = img[shape].mean(axis=0)
        col = rng.uniform(0, 255, 3)
        for _try in range(20):
            if np.linalg.norm(col - under) >= min_contrast:
                break
            col = rng.uniform(0, 255, 3)
        shading = 0.3 * texture * _smooth_field(rng, size, 3, 1)
        img[shape] = col + shading[shape]
        mask[shape] = kind
    img = img + rng.normal(0.0, noise, img.shape)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    scribble = synthesize_scribbles(
        mask, rng, fraction=scribble_fraction, margin=scribble_margin, core_ratio=scribble_core_ratio, min_area=9
    )
    return {"image": image, "mask": mask, "scribble": scribble}


class SyntheticScribbles(Dataset):
    """The procedural scribble dataset (see the module docstring).

    Args:
        num_images: number of samples.
        size: image height and width in pixels.
        seed: dataset seed; use different seeds (or disjoint ``offset`` ranges) for train and val.
        offset: index of the first sample (``SyntheticScribbles(n, seed=s, offset=n)`` follows on).
        max_objects, noise, texture, min_contrast: scene parameters (noise: pixel noise std in 0..255 units;
            texture: amplitude of the background colour field; min_contrast: minimum RGB distance between an
            object's colour and the mean colour under it).
        scribble_fraction, scribble_margin, scribble_core_ratio: see :func:`synthesize_scribbles`.
        shapes: the object classes, a subset of :data:`SHAPES` (class ``i + 1`` is ``shapes[i]``).
        cache: keep rendered samples in memory (rendering takes ~1-2 ms per 64x64 image).

    Items are dicts: ``image (3, H, W) float32`` in 0..255, ``mask (H, W) int64``, ``scribble (H, W) int64``
    (255 = unlabelled), ``roi (H, W) float32`` (all ones), ``index`` (int).
    """

    ignore_index = 255

    def __init__(
        self,
        num_images: int = 512,
        size: int = 64,
        seed: int = 0,
        offset: int = 0,
        max_objects: int = 3,
        noise: float = 6.0,
        texture: float = 30.0,
        min_contrast: float = 90.0,
        scribble_fraction: float = 0.03,
        scribble_margin: int = 2,
        scribble_core_ratio: float = 0.4,
        shapes: Tuple[str, ...] = DEFAULT_SHAPES,
        cache: bool = True,
    ) -> None:
        if num_images < 0:
            raise ValueError("SyntheticScribbles: num_images must be >= 0, got %d" % num_images)
        if size < 16:
            raise ValueError("SyntheticScribbles: size must be >= 16, got %d" % size)
        shapes = tuple(shapes)
        if not shapes or any(sh not in SHAPES for sh in shapes) or len(set(shapes)) != len(shapes):
            raise ValueError("SyntheticScribbles: shapes must be distinct names from %s, got %r" % (SHAPES, shapes))
        if max_objects < 1:
            raise ValueError("SyntheticScribbles: max_objects must be >= 1, got %d" % max_objects)
        self.num_images = int(num_images)
        self.size = int(size)
        self.seed = int(seed)
        self.offset = int(offset)
        self.params = dict(
            size=self.size,
            max_objects=int(max_objects),
            noise=float(noise),
            texture=float(texture),
            min_contrast=float(min_contrast),
            scribble_fraction=float(scribble_fraction),
            scribble_margin=int(scribble_margin),
            scribble_core_ratio=float(scribble_core_ratio),
            shapes=shapes,
        )
        self.classes: Tuple[str, ...] = ("background",) + shapes
        self.num_classes = len(self.classes)
        self._cache: Optional[List[Optional[Dict[str, np.ndarray]]]] = [None] * self.num_images if cache else None

    def __len__(self) -> int:
        return self.num_images

    def raw(self, i: int) -> Dict[str, np.ndarray]:
        """The rendered numpy arrays of sample ``i`` (image HWC uint8, mask, scribble)."""
        if not -self.num_images <= i < self.num_images:
            raise IndexError("SyntheticScribbles: index %d out of range for %d images" % (i, self.num_images))
        i %= max(self.num_images, 1)
        if self._cache is not None and self._cache[i] is not None:
            return self._cache[i]  # type: ignore[return-value]
        s = render_sample(self.seed, self.offset + i, **self.params)
        if self._cache is not None:
            self._cache[i] = s
        return s

    def __getitem__(self, i: int) -> Dict[str, object]:
        s = self.raw(i)
        return {
            "image": torch.from_numpy(s["image"]).permute(2, 0, 1).float(),
            "mask": torch.from_numpy(s["mask"].astype(np.int64)),
            "scribble": torch.from_numpy(s["scribble"].astype(np.int64)),
            "roi": torch.ones(self.size, self.size),
            "index": int(i),
        }
