"""Chooses the defaults of ``segops segment`` on synthetic validation scenes, never on the photo it reports.

Validation set: ``--images`` scenes of the built-in synthetic generator at 256 x 256 (all four shapes, up to
three objects, seed 1000 + i; textured backgrounds, objects of any colour) with their synthesized scribbles as
the strokes and their masks as the reference. For every setting in the grid the script fits
:func:`segops.weak.segment.segment_image` to each scene, with and without the CRF term, and prints the mean
mIoU and the CPU time; the best setting (highest mean mIoU of pCE + DenseCRF) is printed last. ::

    python benchmarks/segment_settings.py --out benchmarks/results/<date>-segment/settings.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
import torch

from segops.data.synthetic import SHAPES, render_sample
from segops.weak.segment import SegmentSettings, mask_iou, segment_image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--crf-weights", default="2e-4,5e-4,1e-3,2e-3")
    ap.add_argument("--feature-sigma-rgb", default="20,40")
    ap.add_argument("--feature-sigma-xy", default="0.1")
    ap.add_argument("--steps", default="120")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    scenes = [render_sample(1000 + i, 0, size=a.size, shapes=SHAPES) for i in range(a.images)]
    rows = []
    grid = itertools.product(
        [float(v) for v in a.feature_sigma_rgb.split(",")], [float(v) for v in a.feature_sigma_xy.split(",")],
        [int(v) for v in a.steps.split(",")], [0.0] + [float(v) for v in a.crf_weights.split(",")],
    )
    for srgb, sxy, steps, w in grid:
        s = SegmentSettings(crf=w > 0, crf_weight=w, feature_sigma_rgb=srgb, feature_sigma_xy=sxy, steps=steps)
        mious, t0 = [], time.process_time()
        for sc in scenes:
            strokes = sc["scribble"].copy()
            present = sorted(set(np.unique(strokes)) - {255})
            remap = np.full(256, 255, np.uint8)  # class ids 0..K'-1 in order of appearance (every id stroked)
            remap[present] = np.arange(len(present))
            ref = np.where(np.isin(sc["mask"], present), remap[sc["mask"]], 255)
            mask, _ = segment_image(sc["image"], remap[strokes], s)
            mious.append(mask_iou(mask, ref, len(present))["miou"])
        row = {"crf_weight": w, "feature_sigma_rgb": srgb, "feature_sigma_xy": sxy, "steps": steps,
               "miou": float(np.mean(mious)), "miou_per_image": mious, "cpu_s_per_image": (time.process_time() - t0) / len(scenes)}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "miou_per_image"}), flush=True)
    best = max((r for r in rows if r["crf_weight"] > 0), key=lambda r: r["miou"])
    print("best pCE + DenseCRF:", json.dumps({k: v for k, v in best.items() if k != "miou_per_image"}))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"images": a.images, "size": a.size, "rows": rows, "best": best, "torch": torch.__version__}, f, indent=2)


if __name__ == "__main__":
    main()
