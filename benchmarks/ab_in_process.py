"""Two variants of one workload, interleaved in one process (the machines' speed drifts between processes).

    python benchmarks/ab_in_process.py huge-pages [--threads 1,2] [--repeats 15]
    python benchmarks/ab_in_process.py resize [--threads 1] [--repeats 25]

``huge-pages``: segops' large CPU outputs on transparent huge pages against PyTorch's allocator
(``SEGOPS_HUGE_PAGES`` set to 1 / 0 before each call; it is read at each allocation), on the partial
cross-entropy (8x21x256², 3% strokes and 100% labelled, forward + backward), the ECCV'18 dense CRF loss
(astronaut 512², K = 21, scale 1, forward + backward) and dense CRF inference (astronaut 512², K = 21, one
bilateral kernel, 5 iterations).

``resize``: the dense CRF loss at scale 0.5 (the ECCV'18 workload) with segops' half-resolution op against
``F.interpolate`` (what the loss called before), and whether loss and gradient are bitwise equal.

Prints the median and range of the wall times per variant.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import segops  # noqa: E402
import segops.ops.crf_losses as crf_losses  # noqa: E402
from segops import reference  # noqa: E402
from segops.bench import fwd_bwd  # noqa: E402
from segops.bench.crf import ECCV_SIGMA_RGB, ECCV_SIGMA_XY, ECCV_WEIGHT, K, photo  # noqa: E402
from segops.bench.losses import stroke_target  # noqa: E402
from segops.nn import DenseCRFLoss  # noqa: E402
from segops.ops.resize import half_resolution  # noqa: E402


def interleaved(variants: Dict[str, Callable[[], None]], repeats: int) -> Dict[str, list]:
    times = {k: [] for k in variants}
    for f in variants.values():
        f()
        f()
    for _ in range(repeats):
        for k, f in variants.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def report(name: str, times: Dict[str, list]) -> None:
    print("%-34s " % name + "  ".join("%s %.1f ms (%.1f-%.1f)" % (k, statistics.median(v), min(v), max(v))
                                      for k, v in times.items()), flush=True)


def with_env(value: str, fn: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        os.environ["SEGOPS_HUGE_PAGES"] = value
        fn()
    return run


def huge_pages(threads, repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 21, 256, 256, generator=g).mul_(3).requires_grad_()
    img = photo("astronaut", 512)
    seg = torch.softmax(torch.randn(1, K, 512, 512, generator=g), 1).requires_grad_()
    unary = -torch.randn(1, K, 512, 512, generator=g).log_softmax(1)
    loss = DenseCRFLoss(ECCV_WEIGHT, ECCV_SIGMA_RGB, ECCV_SIGMA_XY, 1.0)
    workloads = {}
    for frac in (0.03, 1.0):
        target = stroke_target(8, 21, 256, 256, frac, "cpu", g)
        workloads["pce 8x21x256² %g%% labelled" % (frac * 100)] = fwd_bwd(
            lambda x, t=target: segops.ops.partial_cross_entropy(x, t), logits)
    workloads["DenseCRFLoss ECCV'18 scale 1"] = fwd_bwd(lambda s: loss(img, s), seg)
    workloads["dense_crf_inference 512² 5 it"] = lambda: segops.ops.dense_crf_inference(
        unary, img, iterations=5, gaussian_compat=0.0, bilateral_sxy=80.0, bilateral_srgb=13.0,
        bilateral_compat=10.0)
    for t in threads:
        torch.set_num_threads(t)
        for name, fn in workloads.items():
            report("%s, %d thread(s)" % (name, t), interleaved({"huge": with_env("1", fn), "4k": with_env("0", fn)},
                                                               repeats))
    os.environ.pop("SEGOPS_HUGE_PAGES", None)


def resize(threads, repeats: int) -> None:
    img = photo("astronaut", 512)
    g = torch.Generator().manual_seed(0)
    seg = torch.softmax(torch.randn(1, K, 512, 512, generator=g), 1).requires_grad_()
    loss = DenseCRFLoss(ECCV_WEIGHT, ECCV_SIGMA_RGB, ECCV_SIGMA_XY, 0.5)
    impl = {"segops": half_resolution, "interpolate": reference.half_resolution}
    results = {}
    for k, f in impl.items():
        crf_losses.half_resolution = f
        seg.grad = None
        value = loss(img, seg)
        value.backward()
        results[k] = (value.detach().clone(), seg.grad.clone())

    def using(f):
        def run() -> None:
            crf_losses.half_resolution = f
            seg.grad = None
            loss(img, seg).backward()
        return run

    for t in threads:
        torch.set_num_threads(t)
        report("DenseCRFLoss ECCV'18 scale 0.5, %d thread(s)" % t,
               interleaved({k: using(f) for k, f in impl.items()}, repeats))
    crf_losses.half_resolution = half_resolution
    print("bitwise equal: loss %s, gradient %s" % (torch.equal(results["segops"][0], results["interpolate"][0]),
                                                   torch.equal(results["segops"][1], results["interpolate"][1])))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["huge-pages", "resize"])
    p.add_argument("--threads", default=None, help="comma-separated thread counts")
    p.add_argument("--repeats", type=int, default=None)
    a = p.parse_args()
    if a.what == "huge-pages":
        huge_pages([int(t) for t in (a.threads or "1,2").split(",")], a.repeats or 15)
    else:
        resize([int(t) for t in (a.threads or "1").split(",")], a.repeats or 25)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
