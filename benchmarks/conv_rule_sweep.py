"""The measurements behind the "auto" rule of segops.ops.conv_choice: segops' kernels against the vendor's
(ATen: oneDNN / native on the CPU, cuDNN on CUDA), forward + backward, per kernel family, at the convolution shapes
the reference models run (width 0.25 and 1.0, batch 2).

    python benchmarks/conv_rule_sweep.py [--device cpu|cuda] [--threads 2] [--dtype float32] [--out FILE.json]

Prints one row per shape: the family, the segops and vendor times (min over interleaved rounds) and the ratio
vendor / segops (> 1: segops is faster), and what "auto" picks. The rule is read off these rows; rerun on a
quiet machine to check it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from typing import Callable, List

import torch
import torch.utils.benchmark as tb

import segops
from segops import ops
from segops.bench import environment
from segops.ops import conv_choice

# (name, transposed, batch, C_in, C_out, size, kernel, stride, padding, dilation, groups)
SHAPES = [
    ("vgg 3x3", False, 2, 16, 16, 161, 3, 1, 1, 1, 1),
    ("vgg 3x3", False, 2, 64, 64, 80, 3, 1, 1, 1, 1),
    ("vgg 3x3", False, 2, 128, 128, 20, 3, 1, 1, 1, 1),
    ("aspp 3x3 r12", False, 2, 512, 256, 33, 3, 1, 12, 12, 1),
    ("resnet 3x3/2", False, 2, 32, 32, 81, 3, 2, 1, 1, 1),
    ("resnet 7x7/2", False, 2, 3, 16, 161, 7, 2, 3, 1, 1),
    ("1x1", False, 2, 64, 16, 81, 1, 1, 0, 1, 1),
    ("1x1", False, 2, 256, 64, 41, 1, 1, 0, 1, 1),
    ("1x1", False, 2, 1024, 1024, 21, 1, 1, 0, 1, 1),
    ("1x1/2", False, 2, 64, 128, 81, 1, 2, 0, 1, 1),
    ("depthwise 3x3 r6", False, 2, 64, 64, 41, 3, 1, 6, 6, 64),
    ("unet 2x2/2", True, 2, 256, 128, 20, 2, 2, 0, 1, 1),
    ("unet 2x2/2", True, 2, 32, 16, 80, 2, 2, 0, 1, 1),
    # the full-width U-Net's up-convolutions and the sizes around the rule's bounds
    ("unet 2x2/2", True, 2, 1024, 512, 14, 2, 2, 0, 1, 1),
    ("unet 2x2/2", True, 2, 1024, 512, 28, 2, 2, 0, 1, 1),
    ("unet 2x2/2", True, 2, 512, 256, 28, 2, 2, 0, 1, 1),
    ("unet 2x2/2", True, 2, 256, 128, 28, 2, 2, 0, 1, 1),
    ("unet 2x2/2", True, 2, 512, 256, 56, 2, 2, 0, 1, 1),
    ("unet 2x2/2", True, 2, 256, 128, 56, 2, 2, 0, 1, 1),
    ("unet 2x2/2", True, 2, 128, 64, 112, 2, 2, 0, 1, 1),
    ("unet 2x2/2", True, 2, 64, 32, 112, 2, 2, 0, 1, 1),
    ("unet 2x2/2", True, 2, 128, 64, 224, 2, 2, 0, 1, 1),
    ("unet 2x2/2", True, 2, 64, 32, 224, 2, 2, 0, 1, 1),
    ("fcn up2 4x4/2", True, 2, 21, 21, 12, 4, 2, 0, 1, 1),
    ("depthwise up x2", True, 2, 21, 21, 16, 4, 2, 1, 1, 21),
    ("depthwise up x8", True, 2, 21, 21, 21, 16, 8, 4, 1, 21),
    ("depthwise up x32", True, 2, 21, 21, 6, 64, 32, 16, 1, 21),
    # dilated 3x3 convolutions of the DeepLabs at width 0.25 (161x161 and 321x321 inputs: 11x11 to 41x41 maps) and
    # of the full-width ASPP / LargeFOV heads (`segops bench conv`'s shapes, at batch 2)
    ("dilated resnet r2", False, 2, 64, 64, 21, 3, 1, 2, 2, 1),
    ("dilated resnet r2", False, 2, 64, 64, 41, 3, 1, 2, 2, 1),
    ("dilated resnet r2", False, 2, 128, 128, 11, 3, 1, 2, 2, 1),
    ("dilated resnet r2", False, 2, 128, 128, 21, 3, 1, 2, 2, 1),
    ("dilated resnet r4", False, 2, 128, 128, 21, 3, 1, 4, 4, 1),
    ("dilated resnet r4", False, 2, 128, 128, 41, 3, 1, 4, 4, 1),
] + [("dilated aspp v2 r%d" % r, False, 2, 512, 21, hw, 3, 1, r, r, 1) for hw in (21, 41) for r in (6, 12, 18, 24)] \
  + [("dilated aspp vgg r%d" % r, False, 2, 128, 256, hw, 3, 1, r, r, 1) for hw in (21, 41) for r in (6, 12, 18, 24)] \
  + [("dilated aspp v3+ r%d" % r, False, 2, 512, 64, hw, 3, 1, r, r, 1) for hw in (11, 21) for r in (6, 12, 18)] \
  + [("dilated largefov r12", False, 2, 128, 256, hw, 3, 1, 12, 12, 1) for hw in (21, 41)] \
  + [("dilated aspp full r%d" % r, False, 2, 512, 256, 33, 3, 1, r, r, 1) for r in (6, 12, 18, 24)] \
  + [("dilated aspp full r12", False, 2, 512, 256, 65, 3, 1, 12, 12, 1),
     ("dilated largefov full r12", False, 2, 512, 1024, 33, 3, 1, 12, 12, 1)] \
  + [("dilated large map r%d" % r, False, 2, 128, 256, 81, 3, 1, r, r, 1) for r in (6, 12, 24)] \
  + [("fcn conv1 pad 100", False, 2, 3, 16, hw, 3, 1, 100, 1, 1) for hw in (161, 321)]


def _timer(fn: Callable[[], None], min_run_time: float) -> float:
    fn()
    return tb.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-run-time", type=float, default=0.3)
    p.add_argument("--out", default="")
    p.add_argument("--only", default="", help="run only the shapes whose name contains this text")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dev, dtype = torch.device(a.device), getattr(torch, a.dtype)
    g = torch.Generator().manual_seed(0)
    rows: List[dict] = []
    print("%-18s %-40s %10s %10s %8s  %s" % ("family", "shape", "segops ms", "vendor ms", "v/s", "auto"))
    for name, transposed, B, cin, cout, size, k, s, pad, d, groups in SHAPES:
        if a.only not in name:
            continue
        x = torch.randn(B, cin, size, size, generator=g).to(dev, dtype).requires_grad_()
        wshape = (cin, cout // groups, k, k) if transposed else (cout, cin // groups, k, k)
        w = (torch.randn(*wshape, generator=g) * 0.05).to(dev, dtype).requires_grad_()
        fn = ops.conv_transpose2d if transposed else ops.atrous_conv2d
        args = (s, pad, 0, groups, d) if transposed else (s, pad, d, groups)
        with torch.no_grad():
            gout = torch.randn_like(fn(x, w, None, *args, backend="vendor"))

        def step(backend: str):
            def run() -> None:
                x.grad = w.grad = None
                fn(x, w, None, *args, backend=backend).backward(gout)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            return run

        ts, tv = [], []
        for _ in range(a.rounds):
            ts.append(_timer(step("segops"), a.min_run_time))
            tv.append(_timer(step("vendor"), a.min_run_time))
        choice = conv_choice.explain(transposed, x, w, [s, s], [pad, pad], [d, d], groups, "auto")
        shape = "%dx%d->%d %dx%d k%d s%d p%d d%d g%d" % (B, cin, cout, size, size, k, s, pad, d, groups)
        row = dict(name=name, family=choice.segops_kernel, shape=shape, segops_ms=min(ts), vendor_ms=min(tv),
                   ratio=min(tv) / min(ts), auto_forward=choice.forward, auto_backward=choice.backward,
                   load=os.getloadavg()[0])
        rows.append(row)
        print("%-18s %-40s %10.2f %10.2f %7.2fx  %s/%s  [load %.1f]" % (
            name, shape, row["segops_ms"], row["vendor_ms"], row["ratio"], choice.forward, choice.backward,
            row["load"]), flush=True)
    if a.out:
        env = dict(torch=torch.__version__, segops=segops.__version__ if hasattr(segops, "__version__") else None,
                   device=str(dev), dtype=a.dtype, threads=a.threads, machine=platform.processor() or platform.machine(),
                   **{k: v for k, v in environment(dev).items() if k.startswith(("cpu_", "cache_"))})
        with open(a.out, "w") as f:
            json.dump(dict(environment=env, rows=rows), f, indent=2)
        print("wrote", a.out)


if __name__ == "__main__":
    main()
