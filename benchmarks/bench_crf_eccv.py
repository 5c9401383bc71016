"""The ECCV'18 workload on the CPU: DenseCRFLoss forward+backward, one and two threads, against the recorded time.

    python benchmarks/bench_crf_eccv.py [--repeats 15] [--losses crf,ncut] [--out DIR]

Workload (as in the ECCV'18 comparison): scikit-image's ``astronaut`` photo (512 x 512, RGB 0..255), K = 21
softmax maps of N(0, 1) logits, B = 1, ``DenseCRFLoss(weight=2e-9, sigma_rgb=15, sigma_xy=80, scale_factor)``
at scale 1 and 0.5 (and the normalized cut with the same settings). For each (loss, scale) it runs
forward+backward ``--repeats`` times per thread count, interleaving 1 and 2 threads (so a change of load hits
both alike; each timed call follows an untimed one on the same thread count), after two warm-up calls, and reports the median wall time and the median process CPU time (the
machines are shared: CPU time is what the process itself spent; wall time includes waiting for a core), the
2-thread / 1-thread ratio (of the medians, and the quartiles of the per-round ratios: a round's two timed calls
ran back to back, so drift of the machine's speed cancels within it), the ECCV'18 code's recorded time on this
machine class (0.384 s at scale 1, 0.111 s at scale 0.5; dense CRF loss only) and the load average before and
after. Writes
``<out>/<date>-cpu-crf-eccv.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from segops.bench import environment  # noqa: E402
from segops.bench.crf import ECCV18_MS, ECCV_SIGMA_RGB, ECCV_SIGMA_XY, ECCV_WEIGHT, K, photo  # noqa: E402
from segops.nn import DenseCRFLoss, NormalizedCutLoss  # noqa: E402


def measure(loss, img, seg, threads, repeats):
    walls = {t: [] for t in threads}
    cpus = {t: [] for t in threads}

    def step():
        seg.grad = None
        loss(img, seg).backward()

    for t in threads:
        torch.set_num_threads(t)
        step()
        step()
    for _ in range(repeats):
        for t in threads:  # interleaved
            torch.set_num_threads(t)
            # an untimed call first: the timed one finds its data where this thread count leaves it, as in a
            # training loop (straight after a call on the other thread count, 1 thread took ~12% longer and
            # 2 threads ~7%: the data sat in the other core's cache)
            step()
            c0, w0 = time.process_time(), time.perf_counter()
            step()
            walls[t].append((time.perf_counter() - w0) * 1e3)
            cpus[t].append((time.process_time() - c0) * 1e3)
    return ({t: statistics.median(v) for t, v in walls.items()}, {t: statistics.median(v) for t, v in cpus.items()},
            walls)


def round_ratios(slow, fast):
    """Per round, slow / fast: the two timed calls of a round ran next to each other, so the VM's drift (which
    moved the ratio by 0.1-0.15 within an hour) cancels within a round."""
    return [a / b for a, b in zip(slow, fast)]


def quartiles(xs):
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return q[0], q[2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--losses", default="crf,ncut")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = p.parse_args()
    img = photo("astronaut", 512)
    g = torch.Generator().manual_seed(0)
    seg = torch.softmax(torch.randn(1, K, 512, 512, generator=g), 1).requires_grad_()
    classes = {"crf": DenseCRFLoss, "ncut": NormalizedCutLoss}
    rows = []
    old = torch.get_num_threads()
    for name in args.losses.split(","):
        for scale in (1.0, 0.5):
            loss = classes[name](ECCV_WEIGHT, ECCV_SIGMA_RGB, ECCV_SIGMA_XY, scale)
            load0 = os.getloadavg()[0]
            wall, cpu, walls = measure(loss, img, seg, (1, 2), args.repeats)
            load1 = os.getloadavg()[0]
            ratios = round_ratios(walls[1], walls[2])
            q1, q3 = quartiles(ratios)
            row = dict(loss=name, scale=scale, wall_ms_1=wall[1], wall_ms_2=wall[2], cpu_ms_1=cpu[1], cpu_ms_2=cpu[2],
                       two_over_one=wall[1] / wall[2], two_over_one_rounds=ratios,
                       two_over_one_round_median=statistics.median(ratios), two_over_one_round_q1=q1,
                       two_over_one_round_q3=q3, load_before=load0, load_after=load1, repeats=args.repeats)
            if name == "crf":
                row["eccv18_ms"] = ECCV18_MS[scale]
                row["speedup_1thread_wall"] = ECCV18_MS[scale] / wall[1]
            rows.append(row)
            print("%-5s scale %-3g  1 thread: %7.1f ms wall %7.1f ms cpu | 2 threads: %7.1f ms wall (%.2fx; rounds "
                  "%.2f-%.2fx) | %sload %.1f -> %.1f"
                  % (name, scale, wall[1], cpu[1], wall[2], wall[1] / wall[2], q1, q3,
                     "ECCV'18 %.0f ms (%.1fx) | " % (ECCV18_MS[scale], ECCV18_MS[scale] / wall[1])
                     if name == "crf" else "", load0, load1))
    torch.set_num_threads(old)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        env = environment(torch.device("cpu"))
        path = os.path.join(args.out, "%s-cpu-crf-eccv.json" % env["date"])
        with open(path, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=2)
        print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
