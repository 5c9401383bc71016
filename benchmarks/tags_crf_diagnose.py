"""Follows one seed-trained network of ``segops demo --experiment tags`` epoch by epoch: the mean loss terms, the
validation mIoU and per-class IoU, and the share of the validation pixels predicted as each class against the truth.

It trains the demo's configuration of ``--loss`` (``pce`` or ``pce+crf``, with the demo's expand term) on an existing
seeds file (``cam/seeds.pt`` of a demo or ``benchmarks/tags_weights.py`` run with the same ``--seed``), evaluating
after every epoch; evaluation does not change the training (no gradient, the model back in training mode after),
so the last epoch's numbers are the demo's::

    python benchmarks/tags_crf_diagnose.py --seed 1 --seeds runs/demo-tags-s1/cam/seeds.pt --loss pce+crf \\
        --out benchmarks/results/<date>-tags-seed1/diagnose-s1-pce_crf.json

``--crf-ramp-epochs`` / ``--crf-start-epoch`` pass the CRF schedule options of ``segops train``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch

import segops.train as train_mod
from segops.demo import demo_config
from segops.weak.tags_demo import EXPAND


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--seeds", required=True, help="cam/seeds.pt of a run with the same --seed")
    ap.add_argument("--loss", default="pce+crf")
    ap.add_argument("--crf-weight", type=float, default=None)
    ap.add_argument("--crf-ramp-epochs", type=int, default=None)
    ap.add_argument("--crf-start-epoch", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--train-images", type=int, default=400)
    ap.add_argument("--val-images", type=int, default=200)
    ap.add_argument("--work-dir", default="runs/tags-diagnose")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)

    crf = None if a.crf_weight is None else {"crf_weight": a.crf_weight}
    cfg = demo_config(a.loss, a.work_dir, a.seed, a.epochs, a.train_images, a.val_images, crf=crf)
    extra = {}
    if a.crf_ramp_epochs is not None:
        extra["crf_ramp_epochs"] = a.crf_ramp_epochs
    if a.crf_start_epoch is not None:
        extra["crf_start_epoch"] = a.crf_start_epoch
    cfg = dataclasses.replace(cfg, supervision="tags", cam_seeds=a.seeds, eval_every=1, progress=False,
                              out_dir=os.path.join(a.work_dir, "seed%d-%s" % (a.seed, a.loss.replace("+", "_"))), **EXPAND, **extra)

    per_epoch = []
    evaluate = train_mod.evaluate

    def recording_evaluate(model, loader, num_classes, device, *args, **kwargs):
        metrics, panels = evaluate(model, loader, num_classes, device, *args, **kwargs)
        # the share of the validation pixels predicted as / labelled as each class
        was_training = model.training
        model.eval()
        pred_counts = torch.zeros(num_classes, dtype=torch.float64)
        true_counts = torch.zeros(num_classes, dtype=torch.float64)
        max_prob = []
        with torch.no_grad():
            for batch in loader:
                logits = model(train_mod.normalize(batch["image"].to(device)))
                p = logits.float().softmax(1)
                pred_counts += torch.bincount(p.argmax(1).flatten(), minlength=num_classes).double()
                m = batch["mask"].flatten()
                true_counts += torch.bincount(m[m != 255], minlength=num_classes).double()
                max_prob.append(p.max(1).values.flatten())
        model.train(was_training)
        per_epoch.append({
            "miou": float(metrics["miou"]), "iou": [float(v) for v in metrics["iou"]],
            "pred_share": (pred_counts / pred_counts.sum()).tolist(), "true_share": (true_counts / true_counts.sum()).tolist(),
            "mean_max_prob": float(torch.cat(max_prob).mean()),
        })
        return metrics, panels

    train_mod.evaluate = recording_evaluate
    t0 = time.perf_counter()
    summary = train_mod.train(cfg, log=lambda s: None)
    wall = time.perf_counter() - t0
    rows = []
    for h, e in zip(summary["history"], per_epoch):  # type: ignore[arg-type]
        rows.append(dict({k: h[k] for k in ("epoch", "loss", "pce", "crf", "expand") if k in h}, **e))
        print("epoch %2d loss %.4f pce %.4f crf %s expand %.4f | val mIoU %.2f IoU %s | pred share %s (true %s) max p %.3f"
              % (h["epoch"], h["loss"], h["pce"], ("%.4f" % h["crf"]) if "crf" in h else "-", h.get("expand", float("nan")),
                 100 * e["miou"], " ".join("%.1f" % (100 * v) for v in e["iou"]),
                 " ".join("%.3f" % v for v in e["pred_share"]), " ".join("%.3f" % v for v in e["true_share"]), e["mean_max_prob"]))
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump({"seed": a.seed, "seeds": a.seeds, "loss": a.loss, "config": dataclasses.asdict(cfg),
                       "epochs": rows, "wall_s": wall, "torch": torch.__version__, "load_avg_end": os.getloadavg()}, f, indent=1)


if __name__ == "__main__":
    main()
