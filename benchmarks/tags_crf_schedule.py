"""Chooses the CRF-loss schedule of ``segops demo --experiment tags`` (when the CRF term joins the training and how
fast its weight rises) on selection replicates, never on a reported split.

Each replicate is the tags experiment with another seed, as in ``benchmarks/tags_weights.py``: training images,
classifier, seeds, model initialisation and sample order from ``S`` in ``--seeds`` (default 100 and 200),
validation images of synthetic seed ``S + 1``. The demo reports seeds 0, 1, 2 (validation seeds 1, 2, 3), so no
reported image is seen here. Per replicate: one classifier and its seeds (``<work-dir>/cam-s<S>``; an existing
``cam/seeds.pt`` there is reused), pCE + expand once (the reference: the schedule does not touch it) and
pCE + CRF + expand once per schedule, with the demo's expand term and CRF loss. A schedule ``START:RAMP`` is
``--crf-start-epoch START --crf-ramp-epochs RAMP``; ``0:0`` is the CRF loss at full weight from the first step.

The criterion, fixed before the runs: the highest mean selection mIoU of pCE + CRF + expand over the replicates
(a tie goes to the earlier schedule in ``--schedules``). A chosen schedule other than ``0:0`` would go into the
demo's CRF networks (``segops.weak.tags_demo``) by hand; ``0:0`` leaves the demo as it is::

    python benchmarks/tags_crf_schedule.py --out benchmarks/results/<date>-tags-seed1/schedule.json
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
from segops.weak.tags_demo import EXPAND, _cam_stage


def _parse_schedules(text: str):
    out = []
    for item in text.split(","):
        start, ramp = item.split(":")
        out.append((float(start), float(ramp)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="100,200", help="selection replicates (never 0, 1, 2: the demo's)")
    ap.add_argument("--schedules", default="0:0,0:4,0:8,8:0", help="START:RAMP epochs, comma-separated")
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--train-images", type=int, default=400)
    ap.add_argument("--val-images", type=int, default=200)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--work-dir", default="runs/tags-crf-schedule")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    if set(seeds) & {0, 1, 2, 3}:
        raise SystemExit("--seeds: 0, 1, 2 (and their validation seeds 1, 2, 3) are the demo's reported splits")
    schedules = _parse_schedules(a.schedules)

    t0 = time.perf_counter()
    cams = {}
    for s in seeds:
        cam_dir = os.path.join(a.work_dir, "cam-s%d" % s)
        os.makedirs(cam_dir, exist_ok=True)
        seeds_file = os.path.join(cam_dir, "cam", "seeds.pt")
        if os.path.isfile(seeds_file):
            with open(os.path.join(cam_dir, "cam", "settings.json")) as f:
                cams[s] = dict(json.load(f), seeds_file=seeds_file, reused=True)
        else:
            cams[s] = _cam_stage((cam_dir, s, a.train_images, a.val_images, 1, dataclasses.asdict(CAMSettings()), False))
        print("replicate %d: seeds label %.1f%% of the pixels, %.1f%% correctly"
              % (s, 100 * cams[s]["seed_coverage"], 100 * cams[s]["seed_precision"]))

    def cfg(s: int, loss: str, sched=None):
        name = "s%d@%s" % (s, loss) + ("" if sched is None else "@start=%g@ramp=%g" % sched)
        c = demo_config(loss, a.work_dir, s, a.epochs, a.train_images, a.val_images)
        extra = {} if sched is None else {"crf_start_epoch": sched[0], "crf_ramp_epochs": sched[1]}
        c = dataclasses.replace(c, supervision="tags", cam_seeds=str(cams[s]["seeds_file"]), **EXPAND, **extra,
                                out_dir=os.path.join(a.work_dir, name.replace("+", "_").replace("@", "_").replace("=", "")))
        return name, c

    jobs = [cfg(s, "pce+crf", sched) for s in seeds for sched in schedules] + [cfg(s, "pce") for s in seeds]
    res = run_settings(jobs, a.jobs, 1)
    rows = {k: {"miou": float(v["miou"]), "iou": v["iou"], "cpu_s": v["cpu_s"], "time_s": v["time_s"]} for k, v in res.items()}  # type: ignore[arg-type]
    for k, v in rows.items():
        print("%-40s selection mIoU %.2f%%  IoU %s" % (k, 100 * v["miou"], " ".join("%.1f" % (100 * x) for x in v["iou"])))

    def mean_of(sched) -> float:
        return sum(rows[cfg(s, "pce+crf", sched)[0]]["miou"] for s in seeds) / len(seeds)

    table = {"%g:%g" % sched: mean_of(sched) for sched in schedules}
    best = max(schedules, key=lambda sc: (mean_of(sc), -schedules.index(sc)))
    chosen = {"crf_start_epoch": best[0], "crf_ramp_epochs": best[1], "mean_selection_miou": mean_of(best),
              "pce_mean_selection_miou": sum(rows[cfg(s, "pce")[0]]["miou"] for s in seeds) / len(seeds)}
    for k, v in table.items():
        print("schedule %-8s mean pCE + CRF + expand %.2f%%" % (k, 100 * v))
    print("chosen:", json.dumps(chosen))
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump({"selection_seeds": seeds, "validation_seeds": [s + 1 for s in seeds], "epochs": a.epochs,
                       "train_images": a.train_images, "val_images": a.val_images, "crf": DEMO_CRF, "expand": EXPAND,
                       "cam_stage": {s: {k: v for k, v in c.items() if k in ("seed_coverage", "seed_precision", "bg_level", "cam", "tag_accuracy", "reused")}
                                     for s, c in cams.items()},
                       "runs": rows, "mean_by_schedule": table, "chosen": chosen, "wall_s": time.perf_counter() - t0,
                       "jobs": a.jobs, "torch": torch.__version__, "load_avg_end": os.getloadavg()}, f, indent=2)


if __name__ == "__main__":
    main()
