"""Interactive segmentation of one photo from a few strokes: the regularized loss of weakly-supervised
training, used the way it started, in interactive segmentation (``segops segment``).

A small per-image model is fitted from scratch to the strokes of one photo; no dataset, no pre-training:

* **Model.** Every pixel gets random Fourier features of its position and colour,
  ``phi(p) = cos(Omega f_p + b)`` with ``f_p = (x / s_xy, y / s_xy, R / s_rgb, G / s_rgb, B / s_rgb)``,
  ``Omega ~ N(0, 1)``, ``b ~ U(0, 2 pi)`` (a random approximation of a Gaussian kernel on position and
  colour; ``s_xy`` is a fraction of the image's longer side), and a two-layer perceptron maps them to K class
  scores. Its parameters are all that is fitted.
* **Loss.** Partial cross-entropy on the stroke pixels (at full resolution) plus, with ``crf=True``, the dense
  CRF loss of Tang et al. (ECCV'18) on the softmax over a grid of the image at ``crf_scale`` (ECCV'18's
  bandwidths: ``sigma_rgb`` 15, ``sigma_xy`` 80 full-resolution pixels), averaged over the grid's pixels so
  that ``crf_weight`` does not depend on the image size: ``pCE + crf_weight * (-(1 / N) sum_k S_k^T W S_k)``.
* **Fit.** Adam, full batch, ``steps`` steps; the mask is the argmax of the model on every pixel.

Without the CRF term the model spreads each stroke's label to pixels of similar position and colour; the CRF
term adds what interactive segmentation adds (graph cuts, Boykov & Jolly ICCV'01): neighbouring pixels of
similar colour take the same label, so label changes move onto colour edges.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SegmentSettings", "segment_image", "check_strokes", "mask_iou"]


@dataclass
class SegmentSettings:
    """Settings of :func:`segment_image` (``segops segment`` options of the same names)."""

    crf: bool = True  # add the dense CRF loss (False: pCE only)
    steps: int = 120  # Adam steps
    lr: float = 0.02  # Adam learning rate
    features: int = 64  # random Fourier features per pixel
    hidden: int = 32  # hidden units of the perceptron
    feature_sigma_xy: float = 0.1  # position bandwidth of the features, a fraction of the longer image side
    feature_sigma_rgb: float = 40.0  # colour bandwidth of the features, 0..255 units
    crf_weight: float = 5e-4  # weight of the per-pixel mean CRF term
    crf_sigma_rgb: float = 15.0  # ECCV'18
    crf_sigma_xy: float = 80.0  # ECCV'18, full-resolution pixels
    crf_scale: float = 0.5  # the CRF loss runs on a grid of the image at this scale (ECCV'18: 0.5)
    seed: int = 0

    def validate(self) -> None:
        for name in ("steps", "features", "hidden"):
            if int(getattr(self, name)) < 1:
                raise ValueError("--%s must be >= 1, got %r" % (name.replace("_", "-"), getattr(self, name)))
        for name in ("lr", "feature_sigma_xy", "feature_sigma_rgb", "crf_sigma_rgb", "crf_sigma_xy"):
            v = float(getattr(self, name))
            if not (v > 0 and math.isfinite(v)):
                raise ValueError("--%s must be a positive finite number, got %r" % (name.replace("_", "-"), v))
        if not (self.crf_weight >= 0 and math.isfinite(self.crf_weight)):
            raise ValueError("--crf-weight must be a finite number >= 0, got %r" % (self.crf_weight,))
        if not 0 < self.crf_scale <= 1:
            raise ValueError("--crf-scale must be in (0, 1], got %r" % (self.crf_scale,))


def check_strokes(image: np.ndarray, strokes: np.ndarray, ignore_index: int = 255) -> int:
    """Checks a photo and its strokes; returns K (the number of classes, ``max stroke id + 1``).

    ``image``: ``(H, W, 3) uint8``; ``strokes``: ``(H, W)`` integer, class ids 0..K-1 on the strokes and
    ``ignore_index`` elsewhere. Raises ``ValueError`` naming the problem: wrong shapes or sizes, no stroke,
    fewer than two classes, a class id in 0..K-1 without any stroke pixel.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError("the image must be RGB (H, W, 3), got shape %s" % (image.shape,))
    if strokes.ndim != 2:
        raise ValueError("the strokes must be one channel (H, W) of class ids, got shape %s" % (strokes.shape,))
    if strokes.shape != image.shape[:2]:
        raise ValueError("the strokes are %dx%d (width x height) but the image is %dx%d"
                         % (strokes.shape[1], strokes.shape[0], image.shape[1], image.shape[0]))
    ids = sorted(int(v) for v in np.unique(strokes) if int(v) != ignore_index)
    if not ids:
        raise ValueError("the strokes have no labelled pixel (every pixel is %d = unlabelled)" % ignore_index)
    k = ids[-1] + 1
    if k < 2:
        raise ValueError("the strokes must name at least two classes (ids 0 and 1), got only %s" % ids)
    missing = sorted(set(range(k)) - set(ids))
    if missing:
        raise ValueError("class ids must be 0..K-1 with a stroke for each; no stroke has id %s (K = %d from the "
                         "largest id)" % (", ".join(map(str, missing)), k))
    return k


class _FourierMLP(nn.Module):
    def __init__(self, n_features: int, hidden: int, k: int, scales: Tensor, g: torch.Generator) -> None:
        super().__init__()
        d = scales.numel()
        self.register_buffer("omega", torch.randn(d, n_features, generator=g) / scales.view(d, 1))
        self.register_buffer("phase", torch.rand(n_features, generator=g) * (2 * math.pi))
        self.l1 = nn.Linear(n_features, hidden)
        self.l2 = nn.Linear(hidden, k)
        for lin in (self.l1, self.l2):  # torch's default init, from our generator
            bound = 1.0 / math.sqrt(lin.in_features)
            with torch.no_grad():
                lin.weight.uniform_(-bound, bound, generator=g)
                lin.bias.uniform_(-bound, bound, generator=g)

    def features(self, f: Tensor) -> Tensor:
        """``(N, 5)`` raw (x, y, R, G, B) -> ``(N, n_features)``."""
        return torch.cos(f @ self.omega + self.phase)

    def forward(self, phi: Tensor) -> Tensor:
        return self.l2(F.relu(self.l1(phi)))


def _raw_features(image: Tensor, ys: Tensor, xs: Tensor) -> Tensor:
    """(x, y, R, G, B) of the pixels (ys, xs) of ``image (3, H, W)``: ``(N, 5)`` float32."""
    rgb = image[:, ys, xs].t()
    return torch.cat([xs.float()[:, None], ys.float()[:, None], rgb], 1)


def _grid(h: int, w: int, scale: float) -> Tuple[Tensor, Tensor, int, int]:
    """Pixel rows and columns of the ``floor(h * scale) x floor(w * scale)`` grid that nearest-neighbour
    resizing picks (``src = floor(dst * in / out)``, torch's ``nearest``)."""
    gh, gw = max(int(math.floor(h * scale)), 1), max(int(math.floor(w * scale)), 1)
    rows = torch.clamp((torch.arange(gh) * (h / gh)).floor().long(), max=h - 1)
    cols = torch.clamp((torch.arange(gw) * (w / gw)).floor().long(), max=w - 1)
    return rows, cols, gh, gw


def segment_image(
    image: np.ndarray, strokes: np.ndarray, settings: Optional[SegmentSettings] = None, ignore_index: int = 255
) -> Tuple[np.ndarray, Dict[str, object]]:
    """Segments one photo from strokes (see the module docstring).

    Args:
        image: ``(H, W, 3) uint8`` RGB.
        strokes: ``(H, W)`` integer: class ids 0..K-1 on the strokes, ``ignore_index`` elsewhere (ScribbleSup).
        settings: :class:`SegmentSettings` (defaults when None).

    Returns:
        ``(mask, info)``: ``mask (H, W) uint8`` class ids, and ``info`` with ``num_classes``, ``time_s``,
        the final loss terms (``pce``, ``crf``) and the settings.
    """
    import segops.nn as snn

    s = settings or SegmentSettings()
    s.validate()
    image = np.asarray(image)
    strokes = np.asarray(strokes)
    if image.dtype != np.uint8:
        raise ValueError("the image must be uint8 RGB, got dtype %s" % image.dtype)
    k = check_strokes(image, strokes, ignore_index)
    t0 = time.perf_counter()
    h, w = strokes.shape
    img = torch.tensor(image).permute(2, 0, 1).float()  # (3, H, W), 0..255 (a copy: the input may be read-only)
    g = torch.Generator().manual_seed(int(s.seed))
    scales = torch.tensor([s.feature_sigma_xy * max(h, w)] * 2 + [s.feature_sigma_rgb] * 3)
    model = _FourierMLP(int(s.features), int(s.hidden), k, scales, g)
    st = torch.from_numpy(strokes.astype(np.int64))
    ys, xs = torch.nonzero(st != ignore_index, as_tuple=True)
    phi_strokes = model.features(_raw_features(img, ys, xs))
    target = st[ys, xs].view(1, -1)
    pce = snn.PartialCrossEntropyLoss(ignore_index=ignore_index)
    crf = None
    if s.crf and s.crf_weight > 0:
        rows, cols, gh, gw = _grid(h, w, s.crf_scale)
        gy, gx = rows.view(-1, 1).expand(gh, gw).reshape(-1), cols.view(1, -1).expand(gh, gw).reshape(-1)
        phi_grid = model.features(_raw_features(img, gy, gx))
        grid_image = img[:, rows][:, :, cols][None]  # (1, 3, gh, gw): the nearest-resized photo
        crf = snn.DenseCRFLoss(s.crf_weight / (gh * gw), s.crf_sigma_rgb, s.crf_sigma_xy * s.crf_scale, 1.0)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    terms: Dict[str, float] = {}
    for _ in range(int(s.steps)):
        loss = pce(model(phi_strokes).t()[None], target)
        terms["pce"] = float(loss.detach())
        if crf is not None:
            probs = model(phi_grid).softmax(1).t().reshape(1, k, gh, gw)
            c = crf(grid_image, probs)
            terms["crf"] = float(c.detach())
            loss = loss + c
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        mask = torch.empty(h * w, dtype=torch.uint8)
        fy, fx = yy.reshape(-1), xx.reshape(-1)
        for lo in range(0, h * w, 65536):  # bounded memory for large photos
            sl = slice(lo, lo + 65536)
            mask[sl] = model(model.features(_raw_features(img, fy[sl], fx[sl]))).argmax(1).to(torch.uint8)
    info: Dict[str, object] = {
        "num_classes": k,
        "time_s": time.perf_counter() - t0,
        "stroke_pixels": int(ys.numel()),
        "settings": asdict(s),
        **terms,
    }
    return mask.view(h, w).numpy(), info


def mask_iou(pred: np.ndarray, reference: np.ndarray, num_classes: int, ignore_index: int = 255) -> Dict[str, object]:
    """Per-class IoU and mIoU of ``pred`` against ``reference`` (``ignore_index`` pixels of the reference skipped)."""
    from segops.metrics import ConfusionMatrix

    if pred.shape != reference.shape:
        raise ValueError("the mask is %s but the reference is %s" % (pred.shape, reference.shape))
    cm = ConfusionMatrix(num_classes, ignore_index)
    cm.update(torch.from_numpy(np.asarray(pred, np.int64)), torch.from_numpy(np.asarray(reference, np.int64)))
    r = cm.compute()
    return {"iou": [float(v) for v in r["iou"]], "miou": float(r["miou"]), "pixel_acc": float(r["pixel_acc"])}  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------------------------ CLI


def add_arguments(p) -> None:
    """``segops segment`` options."""
    d = SegmentSettings()
    p.add_argument("image", help="the photo (any format Pillow reads; RGB)")
    p.add_argument("--scribbles", required=True, metavar="STROKES.png",
                   help="one-channel PNG of the photo's size: class ids 0..K-1 on the strokes, 255 elsewhere (K inferred)")
    p.add_argument("--out", required=True, metavar="MASK.png", help="output: one-channel PNG of class ids (VOC palette)")
    p.add_argument("--no-crf", dest="crf", action="store_false", help="partial cross-entropy on the strokes only")
    p.add_argument("--steps", type=int, default=d.steps, help="Adam steps (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (default %(default)s)")
    p.add_argument("--crf-weight", type=float, default=d.crf_weight,
                   help="weight of the CRF loss averaged over pixels (default %(default)s)")
    p.add_argument("--crf-sigma-rgb", type=float, default=d.crf_sigma_rgb, help="colour bandwidth (ECCV'18: %(default)s)")
    p.add_argument("--crf-sigma-xy", type=float, default=d.crf_sigma_xy,
                   help="spatial bandwidth in full-resolution pixels (ECCV'18: %(default)s)")
    p.add_argument("--crf-scale", type=float, default=d.crf_scale, help="resolution of the CRF grid (ECCV'18: %(default)s)")
    p.add_argument("--feature-sigma-xy", type=float, default=d.feature_sigma_xy,
                   help="position bandwidth of the model's features, fraction of the longer side (default %(default)s)")
    p.add_argument("--feature-sigma-rgb", type=float, default=d.feature_sigma_rgb,
                   help="colour bandwidth of the model's features (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="(default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--reference", default=None, metavar="REF.png",
                   help="a reference mask (class ids, 255 = void): print the IoU against it")
    p.add_argument("--json", default=None, help="also write the timing, loss terms and IoU to this JSON file")


def write_mask(path: str, mask: np.ndarray) -> None:
    """Writes class ids as a one-channel palette PNG (VOC colours; reading it back gives the ids)."""
    from PIL import Image

    from segops.data.voc import voc_palette

    im = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="P")
    im.putpalette(voc_palette(256).reshape(-1).tolist())
    im.save(path)


def main(args) -> int:
    """``segops segment IMAGE --scribbles STROKES.png --out MASK.png``; returns the exit status."""
    import json
    import sys

    from segops.data.voc import DatasetError, read_image, read_label_png

    try:
        if args.threads is not None:
            torch.set_num_threads(int(args.threads))
        image = read_image(args.image)
        strokes = read_label_png(args.scribbles)
        names = {f for f in SegmentSettings.__dataclass_fields__}
        s = SegmentSettings(**{k: v for k, v in vars(args).items() if k in names})
        mask, info = segment_image(image, strokes, s)
        write_mask(args.out, mask)
        msg = "segmented %dx%d into %d classes from %d stroke pixels in %.2f s (%s) -> %s" % (
            image.shape[1], image.shape[0], info["num_classes"], info["stroke_pixels"], info["time_s"],
            "pCE + DenseCRF" if s.crf else "pCE only", args.out)
        print(msg)
        if args.reference:
            ref = read_label_png(args.reference)
            res = mask_iou(mask, ref, int(info["num_classes"]))  # type: ignore[arg-type]
            info["reference"] = res
            print("IoU per class %s, mIoU %.4f against %s"
                  % (" / ".join("%.4f" % v for v in res["iou"]), res["miou"], args.reference))  # type: ignore[union-attr]
        if args.json:
            with open(args.json, "w") as f:
                json.dump(info, f, indent=2)
    except (DatasetError, ValueError, FileNotFoundError) as e:
        print("segops segment: error: %s" % e, file=sys.stderr)
        return 2
    return 0
