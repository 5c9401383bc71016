"""The before/after figure of docs/ops/crf-inference.md: DeepLab's dense CRF post-processing on a photo.

A network's output is coarse: DeepLab's DCNN predicts at 1/8 of the resolution and is upsampled bilinearly.
This script imitates that on scikit-image's ``coffee`` photo with a deliberately crude 3-class "network"
(table, red crockery, white rim / metal spoon): colour scores averaged over 16 x 16 blocks as logits, upsampled
bilinearly. The unary is ``-log p``; ``segops.nn.DenseCRF.deeplab()`` (10
iterations, DeepLab-LargeFOV's kernels) refines it.

    python scripts/crf_inference_figure.py [--out docs/img/crf_inference_coffee.png]

Writes a PNG of three panels (photo | argmax of the coarse unary | argmax after the CRF), the boundaries drawn
in white, and prints the share of pixels whose label changed.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import segops


def coarse_probabilities(image: torch.Tensor, block: int = 16) -> torch.Tensor:
    """(1, 3, H, W) probabilities [table, red crockery, white / metal] of a crude colour "network": per-pixel
    scores (redness 1 - G/R; whiteness brightness - saturation) averaged over block x block cells, as logits,
    upsampled bilinearly."""
    rgb = image.float() / 255
    r, g = rgb[:, :1], rgb[:, 1:2]
    redness = 1 - g / r.clamp_min(1e-3)
    whiteness = rgb.mean(1, keepdim=True) - (rgb.amax(1, keepdim=True) - rgb.amin(1, keepdim=True))
    logits = torch.cat([torch.zeros_like(r), (redness - 0.62) * 25, (whiteness - 0.45) * 25], 1)
    coarse = F.avg_pool2d(logits, block)
    up = F.interpolate(coarse, size=image.shape[-2:], mode="bilinear", align_corners=False)
    return torch.softmax(up, 1)


COLOURS = np.array([[0, 0, 0], [0, 160, 255], [255, 230, 0]], np.float32)  # table: untinted


def overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The photo tinted by label (table untinted), label boundaries in white."""
    out = image.astype(np.float32).copy()
    for k in (1, 2):
        out[labels == k] = 0.55 * out[labels == k] + 0.45 * COLOURS[k]
    edge = np.zeros_like(labels, dtype=bool)
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    out[edge] = [255, 255, 255]
    return out.astype(np.uint8)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/img/crf_inference_coffee.png")
    args = p.parse_args()
    from skimage import data

    photo = np.ascontiguousarray(data.coffee())
    image = torch.from_numpy(photo).permute(2, 0, 1)[None].contiguous()
    probs = coarse_probabilities(image)
    unary = segops.ops.unary_from_softmax(probs)
    q = segops.nn.DenseCRF.deeplab()(-unary, image)  # the module takes logits: -unary
    before = unary.argmin(1)[0].numpy()
    after = q.argmax(1)[0].numpy()
    gap = np.full((photo.shape[0], 8, 3), 255, np.uint8)
    panel = np.concatenate([photo, gap, overlay(photo, before), gap, overlay(photo, after)], 1)
    Image.fromarray(panel).resize((panel.shape[1] // 2, panel.shape[0] // 2), Image.LANCZOS).save(args.out)
    print("wrote %s; labels changed by the CRF: %.1f%% of the pixels" % (args.out, 100 * (before != after).mean()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
