"""PASCAL VOC 2012 (+ SBD ``SegmentationClassAug``) and ScribbleSup loaders over local folders.

Layout (the standard one; nothing is downloaded)::

    <root>/JPEGImages/<name>.jpg
    <root>/SegmentationClass/<name>.png        palette PNGs (or SegmentationClassAug/ from SBD: grey-level PNGs)
    <root>/ImageSets/Segmentation/train.txt    one image name per line (val.txt, trainaug.txt, ...)
    <root>/ImageSets/SegmentationAug/train_aug.txt   the SBD-augmented lists (train_aug.txt: 10,582 images)
    <scribble_dir>/<name>.png                  ScribbleSup scribbles: class index per pixel, 255 = unlabelled

A split list is looked up in ``ImageSets/Segmentation/``, then ``ImageSets/SegmentationAug/``, then directly
in ``<root>/<split>.txt``. Palette PNGs (mode ``P``) are read as class
indices; grey-level PNGs (``L``) as values; RGB masks are decoded with the VOC colour map. The void label
255 is kept. Any other value >= ``num_classes`` is an error naming the file.
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from segops.data.scribbles import synthesize_scribbles

__all__ = ["VOCSegmentation", "VOC_CLASSES", "voc_palette", "read_label_png", "read_image", "DatasetError"]

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


class DatasetError(ValueError):
    """A dataset folder or file is missing, malformed or holds invalid labels (the message says which)."""


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: ``(n, 3) uint8``; class c's colour comes from the bits of c."""
    pal = np.zeros((n, 3), np.uint8)
    for c in range(n):
        r = g = b = 0
        v = c
        for j in range(8):
            r |= ((v >> 0) & 1) << (7 - j)
            g |= ((v >> 1) & 1) << (7 - j)
            b |= ((v >> 2) & 1) << (7 - j)
            v >>= 3
        pal[c] = (r, g, b)
    return pal


def read_image(path: str) -> np.ndarray:
    """An RGB image file as ``(H, W, 3) uint8``; ``DatasetError`` naming the file if it is missing or corrupt."""
    if not os.path.isfile(path):
        raise DatasetError("image file not found: %s" % path)
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError("cannot decode image %s (corrupt or not an image): %s" % (path, e)) from e


def read_label_png(path: str, num_classes: Optional[int] = None, ignore_index: int = 255) -> np.ndarray:
    """A label PNG as ``(H, W) int64`` class indices (palette / grey / VOC-coloured RGB), void kept.

    Raises ``DatasetError`` naming the file if it is missing, corrupt, or (with ``num_classes``) holds
    values outside ``[0, num_classes)`` other than ``ignore_index``.
    """
    if not os.path.isfile(path):
        raise DatasetError("label file not found: %s" % path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("P", "L", "I", "I;16"):
                lab = np.asarray(im, dtype=np.int64).copy()
            else:
                rgb = np.asarray(im.convert("RGB"), dtype=np.int64)
                lab = _decode_rgb_label(rgb, path)
    except DatasetError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError("cannot decode label image %s (corrupt or not an image): %s" % (path, e)) from e
    if num_classes is not None:
        bad = (lab != ignore_index) & ((lab < 0) | (lab >= num_classes))
        if bad.any():
            vals = sorted(set(np.unique(lab[bad]).tolist()))[:10]
            raise DatasetError(
                "label file %s has values %s outside [0, %d) other than the void label %d"
                % (path, vals, num_classes, ignore_index)
            )
    return lab


def _decode_rgb_label(rgb: np.ndarray, path: str) -> np.ndarray:
    pal = voc_palette(256).astype(np.int64)
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    keys = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
    lut = {int(k): i for i, k in enumerate(keys)}  # the 256 colours are distinct; 255 is void (224, 224, 192)
    uniq, inv = np.unique(code, return_inverse=True)
    out = np.empty(uniq.shape, np.int64)
    for j, u in enumerate(uniq.tolist()):
        if u not in lut:
            raise DatasetError(
                "label file %s: RGB colour %s is not a PASCAL VOC class colour" % (path, ((u >> 16) & 255, (u >> 8) & 255, u & 255))
            )
        out[j] = lut[u]
    return out[inv].reshape(rgb.shape[:2])


SPLIT_FOLDERS = (os.path.join("ImageSets", "Segmentation"), os.path.join("ImageSets", "SegmentationAug"), "")


def split_list_path(root: str, split: str) -> str:
    """The file listing ``split``: the first of ``<root>/<folder>/<split>.txt`` over :data:`SPLIT_FOLDERS`."""
    candidates = [os.path.join(root, folder, split + ".txt") for folder in SPLIT_FOLDERS]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise DatasetError("split list %r not found: looked for %s" % (split, ", ".join(candidates)))


def _read_split(root: str, split: str) -> List[str]:
    with open(split_list_path(root, split)) as f:
        entries = [line.split()[0] for line in f if line.strip()]
    # SBD-style lists hold "/JPEGImages/x.jpg /SegmentationClassAug/x.png" pairs
    return [os.path.splitext(os.path.basename(entry))[0] for entry in entries]


class VOCSegmentation(Dataset):
    """PASCAL VOC 2012 / SBD-augmented segmentation with optional ScribbleSup scribbles.

    Args:
        root: the VOC folder (holding ``JPEGImages/``).
        split: name of the split list (``train``, ``val``, ``trainaug``...).
        mask_dir: ``"SegmentationClass"``, ``"SegmentationClassAug"`` or any folder (relative to ``root`` or
            absolute); ``None`` picks ``SegmentationClassAug`` if present, else ``SegmentationClass``.
        scribble_dir: ScribbleSup label PNG folder (relative to ``root`` or absolute); ``None`` means no scribble
            files: with ``synthesize=True`` scribbles are synthesized from the masks (deterministic per image and
            ``seed``), else ``sample["scribble"]`` is the full mask.
        num_classes: 21 for VOC; labels >= this other than ``ignore_index`` are an error.
        synthesize, scribble_fraction, seed: scribble synthesis settings (see ``synthesize_scribbles``).
        require_masks: if False, images without a mask file are allowed (mask = all ``ignore_index``),
            e.g. scribble-only training sets.

    Items: ``image (3, H, W) float32`` 0..255, ``mask`` / ``scribble (H, W) int64``, ``roi (H, W)`` ones,
    ``index``, ``name``.
    """

    classes = VOC_CLASSES
    ignore_index = 255

    def __init__(
        self,
        root: str,
        split: str = "train",
        mask_dir: Optional[str] = None,
        scribble_dir: Optional[str] = None,
        num_classes: int = 21,
        synthesize: bool = True,
        scribble_fraction: float = 0.03,
        seed: int = 0,
        require_masks: bool = True,
    ) -> None:
        if root is None or not os.path.isdir(root):
            raise DatasetError("VOC data root not found: %r (pass --data-root pointing at the VOC2012 folder)" % (root,))
        img_dir = os.path.join(root, "JPEGImages")
        if not os.path.isdir(img_dir):
            raise DatasetError(
                "wrong VOC folder layout: %s has no JPEGImages/ folder (expected JPEGImages/, "
                "SegmentationClass[Aug]/, ImageSets/Segmentation/<split>.txt)" % root
            )
        if mask_dir is None:
            mask_dir = "SegmentationClassAug" if os.path.isdir(os.path.join(root, "SegmentationClassAug")) else "SegmentationClass"
        self.mask_dir = mask_dir if os.path.isabs(mask_dir) else os.path.join(root, mask_dir)
        if require_masks and not os.path.isdir(self.mask_dir):
            raise DatasetError("wrong VOC folder layout: mask folder %s not found" % self.mask_dir)
        self.scribble_dir = None
        if scribble_dir is not None:
            self.scribble_dir = scribble_dir if os.path.isabs(scribble_dir) else os.path.join(root, scribble_dir)
            if not os.path.isdir(self.scribble_dir):
                raise DatasetError("scribble folder %s not found" % self.scribble_dir)
        self.root = root
        self.img_dir = img_dir
        self.split = split
        self.names = _read_split(root, split)
        if not self.names:
            raise DatasetError("split list %r in %s is empty" % (split, root))
        self.num_classes = int(num_classes)
        self.synthesize = bool(synthesize)
        if self.scribble_dir is None and self.synthesize:
            warnings.warn(
                "VOCSegmentation(%r): no scribble folder given (--scribble-dir), so scribbles are SYNTHESIZED from "
                "the full masks (thin strokes inside every region, about %.0f%% of the pixels), not ScribbleSup's "
                "hand-drawn ones; results are not comparable to published scribble numbers" % (split, 100 * scribble_fraction),
                UserWarning,
                stacklevel=2,
            )
        self.scribble_fraction = float(scribble_fraction)
        self.seed = int(seed)
        self.require_masks = bool(require_masks)

    def __len__(self) -> int:
        return len(self.names)

    def _image_path(self, name: str) -> str:
        for ext in (".jpg", ".jpeg", ".png", ".JPG"):
            p = os.path.join(self.img_dir, name + ext)
            if os.path.isfile(p):
                return p
        return os.path.join(self.img_dir, name + ".jpg")

    def raw(self, i: int) -> Dict[str, object]:
        name = self.names[i]
        image = read_image(self._image_path(name))
        mpath = os.path.join(self.mask_dir, name + ".png")
        if os.path.isfile(mpath) or self.require_masks:
            mask = read_label_png(mpath, self.num_classes, self.ignore_index)
        else:
            mask = np.full(image.shape[:2], self.ignore_index, np.int64)
        if mask.shape != image.shape[:2]:
            raise DatasetError("mask %s has size %s but its image has %s" % (mpath, mask.shape, image.shape[:2]))
        if self.scribble_dir is not None:
            spath = os.path.join(self.scribble_dir, name + ".png")
            scribble = read_label_png(spath, self.num_classes, self.ignore_index)
            if scribble.shape != image.shape[:2]:
                raise DatasetError("scribble %s has size %s but its image has %s" % (spath, scribble.shape, image.shape[:2]))
        elif self.synthesize:
            rng = np.random.default_rng([self.seed, i])
            scribble = synthesize_scribbles(mask, rng, self.scribble_fraction, self.ignore_index).astype(np.int64)
        else:
            scribble = mask
        return {"image": image, "mask": mask, "scribble": scribble, "name": name}

    def __getitem__(self, i: int) -> Dict[str, object]:
        s = self.raw(i)
        image = s["image"]
        assert isinstance(image, np.ndarray)
        return {
            "image": torch.from_numpy(image).permute(2, 0, 1).float(),
            "mask": torch.from_numpy(np.asarray(s["mask"], np.int64)),
            "scribble": torch.from_numpy(np.asarray(s["scribble"], np.int64)),
            "roi": torch.ones(image.shape[:2]),
            "index": int(i),
            "name": s["name"],
        }
