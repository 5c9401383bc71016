"""Thread scaling of dense CRF inference on the CPU, by part: 1 and 2 threads interleaved in one process.

    python benchmarks/crf_inference_scaling.py [--repeats 15]

Workload: scikit-image's ``astronaut`` at 512 x 512, K = 21 random unaries (-log softmax of N(0, 1) logits), one
bilateral kernel (sxy 80, srgb 13, compat 10), 5 iterations. Parts, each timed ``--repeats`` times per thread
count after two warm-up calls, 1 and 2 threads alternating (so a change of machine speed hits both alike):

* ``build``: ``MeanFieldCRF`` with the bilateral kernel (features, lattice) and the one-op schedule's arguments;
* ``iterate``: the one-op CPU schedule alone (``_crf_mean_field_iterate``) on that lattice;
* ``full``: ``segops.ops.dense_crf_inference`` (both).

Prints the median milliseconds per thread count and the 2-thread / 1-thread speed-up of each part.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import segops  # noqa: E402
from segops.bench.crf import photo  # noqa: E402
from segops.ops.crf_inference import MeanFieldCRF  # noqa: E402


def alternated_medians(fn, repeats: int) -> tuple[float, float]:
    """Median milliseconds of ``fn()`` on 1 and on 2 threads: two warm-up calls each, then ``repeats`` rounds
    alternating the thread counts (a change of machine speed hits both alike), each timed call after an untimed
    one on its thread count."""
    for t in (1, 2):
        torch.set_num_threads(t)
        fn()
        fn()
    times = {1: [], 2: []}
    for _ in range(repeats):
        for t in (1, 2):
            torch.set_num_threads(t)
            fn()  # untimed: the timed call finds the data where this thread count leaves it (see thread_scaling)
            t0 = time.perf_counter()
            fn()
            times[t].append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[1]), statistics.median(times[2])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    a = p.parse_args()
    img = photo("astronaut", 512)
    g = torch.Generator().manual_seed(0)
    unary = -torch.randn(1, 21, 512, 512, generator=g).log_softmax(1)

    def build():
        crf = MeanFieldCRF(unary)
        crf.add_pairwise_bilateral(80.0, 13.0, img, 10.0)
        return crf, crf._fused_terms()

    crf, args = build()
    parts = [
        ("build", build),
        ("iterate", lambda: torch.ops.segops._crf_mean_field_iterate(crf.unary, *args, 5)),
        ("full", lambda: segops.ops.dense_crf_inference(unary, img, iterations=5, gaussian_compat=0.0,
                                                        bilateral_sxy=80.0, bilateral_srgb=13.0,
                                                        bilateral_compat=10.0)),
    ]
    for name, fn in parts:
        m1, m2 = alternated_medians(fn, a.repeats)
        print("%-8s 1 thread %7.1f ms  2 threads %7.1f ms  speed-up %.2fx" % (name, m1, m2, m1 / m2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
