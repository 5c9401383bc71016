"""Chooses the expand term's weight and foreground decay of ``segops demo --experiment tags`` on a selection
replicate, never on a reported split.

The replicate is the tags experiment with another seed, as in ``benchmarks/demo_weights.py``: training images of
synthetic seed ``--seed`` (100), validation images of seed ``--seed + 1`` (101), the classifier, its seeds, the model
initialisation and the sample order from ``--seed``. The demo reports seeds 0, 1 and 2 (validation seeds 1, 2, 3),
so no reported image is seen here. One classifier and one set of seeds; then, for every (weight, decay) pair,
pCE + expand and pCE + CRF + expand (the demo's CRF loss). The pair with the highest mean selection mIoU of the two
networks goes into ``segops.weak.tags_demo.EXPAND`` by hand::

    python benchmarks/tags_weights.py --out benchmarks/results/<date>-tags-weights/sweep.json

``--crf-weights W,W,...`` with one expand weight and one decay trains pCE + CRF + expand only, once per CRF weight,
and chooses the CRF weight with the highest selection mIoU (the demo's ``DEMO_CRF`` for tags: ``TAGS_CRF``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch

from segops.demo import DEMO_CRF, demo_config, run_settings
from segops.weak.tags import CAMSettings
from segops.weak.tags_demo import _cam_stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--expand-weights", default="0.3,1.0")
    ap.add_argument("--fg-decays", default="sec,0.99,0.98", help="'sec': SEC's 0.996 at 41x41, carried over")
    ap.add_argument("--crf-weights", default=None, help="CRF weights for pCE + CRF + expand only (see above)")
    ap.add_argument("--no-expand", action="store_true", help="also train pCE and pCE + CRF without the expand term")
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--train-images", type=int, default=400)
    ap.add_argument("--val-images", type=int, default=200)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--work-dir", default="runs/tags-weights")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    weights = [float(v) for v in a.expand_weights.split(",")]
    decays = [None if v == "sec" else float(v) for v in a.fg_decays.split(",")]

    t0 = time.perf_counter()
    os.makedirs(a.work_dir, exist_ok=True)
    cam = _cam_stage((a.work_dir, a.seed, a.train_images, a.val_images, 1, dataclasses.asdict(CAMSettings()), False))
    print("cam stage: %.1f s, seeds label %.1f%% of the pixels, %.1f%% correctly, background level %.2f"
          % (cam["time_s"], 100 * cam["seed_coverage"], 100 * cam["seed_precision"], cam["bg_level"]))  # type: ignore[operator]

    def cfg(loss: str, weight: float, decay, crf_w=None):
        name = "%s@expand=%g@fgdecay=%s" % (loss, weight, "sec" if decay is None else "%g" % decay)
        name += "" if crf_w is None else "@crf=%g" % crf_w
        c = demo_config(loss, a.work_dir, a.seed, a.epochs, a.train_images, a.val_images,
                        crf=None if crf_w is None else {"crf_weight": crf_w})
        c = dataclasses.replace(c, supervision="tags", cam_seeds=str(cam["seeds_file"]), expand_weight=weight,
                                expand_fg_decay=decay,
                                out_dir=os.path.join(a.work_dir, name.replace("+", "_").replace("@", "_").replace("=", "")))
        return name, c

    if a.crf_weights is not None:
        if len(weights) != 1 or len(decays) != 1:
            raise SystemExit("--crf-weights takes exactly one --expand-weights value and one --fg-decays value")
        crf_ws = [float(v) for v in a.crf_weights.split(",")]
        res = run_settings([cfg("pce+crf", weights[0], decays[0], w) for w in crf_ws], a.jobs, 1)
        rows = {k: {"miou": float(v["miou"]), "iou": v["iou"], "cpu_s": v["cpu_s"], "time_s": v["time_s"]} for k, v in res.items()}  # type: ignore[arg-type]
        for k, v in rows.items():
            print("%-52s selection mIoU %.2f%%" % (k, 100 * v["miou"]))
        best_w = max(crf_ws, key=lambda w: rows[cfg("pce+crf", weights[0], decays[0], w)[0]]["miou"])
        chosen = {"crf_weight": best_w, "selection_miou": rows[cfg("pce+crf", weights[0], decays[0], best_w)[0]]["miou"]}
        print("chosen:", json.dumps(chosen))
        _write(a, cam, rows, chosen, t0)
        return
    jobs = [cfg(loss, w, d) for w in weights for d in decays for loss in ("pce+crf", "pce")]
    if a.no_expand:
        jobs += [cfg(loss, 0.0, None) for loss in ("pce+crf", "pce")]
    res = run_settings(jobs, a.jobs, 1)
    rows = {k: {"miou": float(v["miou"]), "iou": v["iou"], "cpu_s": v["cpu_s"], "time_s": v["time_s"]} for k, v in res.items()}  # type: ignore[arg-type]
    for k, v in rows.items():
        print("%-44s selection mIoU %.2f%%" % (k, 100 * v["miou"]))

    def mean_of_pair(w: float, d) -> float:
        tail = "@expand=%g@fgdecay=%s" % (w, "sec" if d is None else "%g" % d)
        return 0.5 * (rows["pce" + tail]["miou"] + rows["pce+crf" + tail]["miou"])

    best = max(((w, d) for w in weights for d in decays), key=lambda p: mean_of_pair(*p))
    chosen = {"expand_weight": best[0], "expand_fg_decay": best[1], "mean_selection_miou": mean_of_pair(*best)}
    print("chosen:", json.dumps(chosen))
    _write(a, cam, rows, chosen, t0)


def _write(a, cam, rows, chosen, t0) -> None:
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump({"selection_seed": a.seed, "validation_seed": a.seed + 1, "epochs": a.epochs,
                       "train_images": a.train_images, "val_images": a.val_images, "crf": DEMO_CRF,
                       "cam_stage": {k: v for k, v in cam.items() if k not in ("seeds_file", "classifier", "settings")},
                       "runs": rows, "chosen": chosen, "wall_s": time.perf_counter() - t0, "jobs": a.jobs,
                       "torch": torch.__version__, "load_avg_end": os.getloadavg()}, f, indent=2)


if __name__ == "__main__":
    main()
