"""``segops segment`` on scikit-image's coffee photo (481 x 321) with the strokes in docs/img/segment: the IoU of
pCE only vs pCE + dense CRF loss against the reference mask drawn there, the time of each, and the figure
(photo | strokes | pCE only | pCE + DenseCRF | reference)::

    python benchmarks/segment_photo.py --json benchmarks/results/<date>-segment/coffee.json \
        --figure docs/img/segment/coffee_segment.png

The photo is loaded from scikit-image at run time and resized with Pillow's bilinear filter; it is never stored.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
from PIL import Image

from segops.weak.segment import SegmentSettings, mask_iou, segment_image

HERE = os.path.dirname(os.path.abspath(__file__))
LABELS = os.path.join(os.path.dirname(HERE), "docs", "img", "segment")
CLASSES = ("table", "cup and saucer", "spoon")


def coffee() -> np.ndarray:
    """scikit-image's ``data.coffee()`` resized to 481 x 321 (width x height), ``(321, 481, 3) uint8``."""
    from skimage import data

    return np.asarray(Image.fromarray(data.coffee()).resize((481, 321), Image.BILINEAR))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each variant (the masks are identical)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--figure", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    photo = coffee()
    strokes = np.asarray(Image.open(os.path.join(LABELS, "coffee_strokes.png")))
    ref = np.asarray(Image.open(os.path.join(LABELS, "coffee_reference.png")))
    out = {"photo": "skimage.data.coffee() resized to 481x321", "torch": torch.__version__, "threads": a.threads,
           "machine": platform.processor() or platform.machine(), "load_avg": os.getloadavg(), "variants": {}}
    masks = {}
    for name, crf in (("pce", False), ("pce+crf", True)):
        walls, cpus = [], []
        for _ in range(a.repeat):
            c0, t0 = time.process_time(), time.perf_counter()
            mask, info = segment_image(photo, strokes, SegmentSettings(crf=crf))
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            if name in masks and not np.array_equal(masks[name], mask):
                raise SystemExit("the %s mask changed between runs" % name)
            masks[name] = mask
        res = mask_iou(mask, ref, 3)
        out["variants"][name] = dict(res, wall_s=walls, cpu_s=cpus, settings=info["settings"])  # type: ignore[index]
        print("%-8s IoU %s  mIoU %.4f  wall %s s  CPU %s s" % (
            name, " / ".join("%s %.3f" % (c, v) for c, v in zip(CLASSES, res["iou"])), res["miou"],  # type: ignore[arg-type]
            " ".join("%.2f" % w for w in walls), " ".join("%.2f" % c for c in cpus)))
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    if a.figure:
        from segops.figures import colorize, save_labelled_panels

        v = out["variants"]
        cells = [[photo, colorize(strokes), colorize(masks["pce"]), colorize(masks["pce+crf"]), colorize(ref)]]
        labels = ["photo", "strokes", "pCE only: mIoU %.3f" % v["pce"]["miou"],  # type: ignore[index]
                  "pCE+CRF: mIoU %.3f" % v["pce+crf"]["miou"], "reference"]  # type: ignore[index]
        save_labelled_panels(a.figure, cells, labels, CLASSES)
        print("wrote", a.figure)


if __name__ == "__main__":
    main()
