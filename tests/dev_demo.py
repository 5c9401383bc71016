"""Dev-only: run the demo (or one setting) with the test stand-ins for segops.models / DenseCRFLoss.

    .venv/bin/python tests/dev_demo.py [--epochs N] [--crf-weight W] [--only pce+crf] ...
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from standins import ExactDenseCRFLoss, tiny_fcn  # noqa: E402

import segops.nn  # noqa: E402
from segops import demo  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--out-dir", default="/tmp/trdev/demo")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--epochs", type=int, default=16)
ap.add_argument("--train-images", type=int, default=400)
ap.add_argument("--val-images", type=int, default=200)
ap.add_argument("--crf-weight", type=float, default=None)
ap.add_argument("--crf-sigma-xy", type=float, default=None)
ap.add_argument("--crf-sigma-rgb", type=float, default=None)
ap.add_argument("--width", type=float, default=1.0)
ap.add_argument("--stem-stride", type=int, default=2)
ap.add_argument("--real", action="store_true", help="use segops.nn.DenseCRFLoss / segops.models if present")
a = ap.parse_args()
for k in ("crf_weight", "crf_sigma_xy", "crf_sigma_rgb"):
    if getattr(a, k) is not None:
        demo.DEMO_CRF[k] = getattr(a, k)
model_fn = None if a.real else (lambda K: tiny_fcn("tiny", K, width=a.width, stem_stride=a.stem_stride))
crf_cls = None if a.real else ExactDenseCRFLoss
demo.run_demo(a.out_dir, a.seed, a.epochs, a.train_images, a.val_images, 1, model_fn=model_fn, crf_cls=crf_cls)
