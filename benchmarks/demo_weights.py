"""Chooses the regularizer weights of ``segops demo`` on a selection replicate, never on a reported split.

The replicate is the demo's experiment with another seed: training images of synthetic seed ``--seed`` (100),
validation images of seed ``--seed + 1`` (101), model initialisation and sample order from ``--seed``. The demo
reports seeds 0, 1 and 2 (validation seeds 1, 2, 3), so no reported image is ever seen here. Phase 1 trains
full, pCE, pCE + CRF for each CRF weight and pCE + entropy for each entropy weight; phase 2 trains
pCE + CRF + entropy with the best CRF weight of phase 1 and each entropy weight (``--no-phase2``: the two
weights chosen separately in phase 1). The best weights (highest
selection mIoU) go into ``segops.demo.DEMO_CRF`` / ``DEMO_ENTROPY`` by hand::

    python benchmarks/demo_weights.py --out benchmarks/results/<date>-demo-weights/sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from segops.demo import DEMO_CRF, DEMO_ENTROPY, demo_config, run_settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--crf-weights", default="1e-4,2e-4,4e-4")
    ap.add_argument("--entropy-weights", default="0.03,0.1,0.3,1.0")
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--train-images", type=int, default=400)
    ap.add_argument("--val-images", type=int, default=200)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--work-dir", default="runs/demo-weights")
    ap.add_argument("--extend", action="store_true",
                    help="an extension of an earlier sweep: no full / pCE / pCE + CRF runs; the one --crf-weights value "
                         "is the CRF weight of the pCE + CRF + entropy runs")
    ap.add_argument("--no-phase2", dest="phase2", action="store_false",
                    help="skip phase 2: pCE + CRF + entropy takes the CRF and entropy weights chosen separately")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    crf_ws = [float(v) for v in a.crf_weights.split(",")]
    ent_ws = [float(v) for v in a.entropy_weights.split(",")]

    def cfg(key: str, crf_w=None, ent_w=None):
        name = key + ("@crf=%g" % crf_w if crf_w is not None else "") + ("@entropy=%g" % ent_w if ent_w is not None else "")
        c = demo_config(key, os.path.join(a.work_dir, name.replace("@", "_").replace("=", "")), a.seed, a.epochs,
                        a.train_images, a.val_images,
                        crf=None if crf_w is None else {"crf_weight": crf_w},
                        entropy=None if ent_w is None else {"entropy_weight": ent_w})
        c.out_dir = os.path.join(a.work_dir, name.replace("+", "_").replace("@", "_").replace("=", ""))
        return name, c

    t0 = time.perf_counter()
    phase1 = [] if a.extend else [cfg("full"), cfg("pce")] + [cfg("pce+crf", crf_w=w) for w in crf_ws]
    phase1 += [cfg("pce+entropy", ent_w=w) for w in ent_ws]
    res = run_settings(phase1, a.jobs, 1)
    if a.extend and len(crf_ws) != 1:
        raise SystemExit("--extend takes exactly one --crf-weights value")
    best_crf = crf_ws[0] if a.extend else max(crf_ws, key=lambda w: float(res["pce+crf@crf=%g" % w]["miou"]))  # type: ignore[arg-type]
    best_ent = max(ent_ws, key=lambda w: float(res["pce+entropy@entropy=%g" % w]["miou"]))  # type: ignore[arg-type]
    best_both = best_ent
    if a.phase2:
        phase2 = [cfg("pce+crf+entropy", crf_w=best_crf, ent_w=w) for w in ent_ws]
        res.update(run_settings(phase2, a.jobs, 1))
        best_both = max(ent_ws, key=lambda w: float(res["pce+crf+entropy@crf=%g@entropy=%g" % (best_crf, w)]["miou"]))  # type: ignore[arg-type]
    rows = {k: {"miou": float(v["miou"]), "iou": v["iou"], "cpu_s": v["cpu_s"], "time_s": v["time_s"]} for k, v in res.items()}  # type: ignore[arg-type]
    for k, v in rows.items():
        print("%-40s selection mIoU %.2f%%" % (k, 100 * v["miou"]))
    chosen = {"crf_weight": best_crf, "entropy_weight (pce+entropy)": best_ent, "entropy_weight (pce+crf+entropy)": best_both}
    print("chosen:", json.dumps(chosen))
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump({"selection_seed": a.seed, "validation_seed": a.seed + 1, "epochs": a.epochs,
                       "train_images": a.train_images, "val_images": a.val_images, "fixed": {"crf": DEMO_CRF, "entropy": DEMO_ENTROPY},
                       "runs": rows, "chosen": chosen, "wall_s": time.perf_counter() - t0, "jobs": a.jobs,
                       "torch": torch.__version__, "load_avg_end": os.getloadavg()}, f, indent=2)


if __name__ == "__main__":
    main()
