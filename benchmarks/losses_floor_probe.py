"""Partial cross-entropy against its memory floor, in CPU time: a load-robust companion to `segops bench losses`.

`segops bench losses` reports wall-clock ratios, which a loaded machine distorts (a thread that waits for a busy
core counts as working). This probe times the same calls by the process's CPU time (`time.process_time`), which
counts only the cycles the process got: on a shared machine it moves far less with the load. It runs the calls
interleaved, `--reps` times each, and reports the lower quartile per call and the ratios.

    python benchmarks/losses_floor_probe.py --threads 1 --labelled 0 0.03 1.0

floor = torch.zeros_like(logits) (allocating and zeroing the gradient every implementation returns);
segops = forward + backward through autograd; fwd / bwd = the forward and backward ops alone; eager =
F.cross_entropy(..., ignore_index=255) forward + backward (with --eager).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

import segops  # noqa: F401  (registers the ops)
from segops import ops


def quartile(v):
    v = sorted(v)
    return v[len(v) // 4]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--labelled", type=float, nargs="+", default=[0.03, 1.0])
    p.add_argument("--shape", type=int, nargs=4, default=[8, 21, 256, 256])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--eager", action="store_true", help="also time F.cross_entropy (slow)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    B, K, H, W = args.shape
    x = (torch.randn(B, K, H, W, generator=g) * 3).requires_grad_()
    results = []
    for frac in args.labelled:
        t = torch.randint(0, K, (B, H, W), generator=g)
        t[torch.rand(B, H, W, generator=g) >= frac] = 255
        _, lse, denom = torch.ops.segops.partial_cross_entropy.default(x.detach(), t, None, 1, 255, 0.0)
        one = torch.ones(())

        def segops_step():
            x.grad = None
            ops.partial_cross_entropy(x, t).backward()

        def fwd():
            torch.ops.segops.partial_cross_entropy.default(x.detach(), t, None, 1, 255, 0.0)

        def bwd():
            torch.ops.segops._partial_cross_entropy_backward.default(one, x.detach(), t, None, lse, denom, 1, 255, 0.0)

        def eager():
            x.grad = None
            F.cross_entropy(x, t, ignore_index=255).backward()

        fns = dict(floor=lambda: torch.zeros_like(x), segops=segops_step, fwd=fwd, bwd=bwd)
        if args.eager:
            fns["eager"] = eager
        cpu = {k: [] for k in fns}
        wall = {k: [] for k in fns}
        for f in fns.values():
            f()
        for _ in range(args.reps):
            for k, f in fns.items():
                c0, w0 = time.process_time(), time.perf_counter()
                f()
                cpu[k].append(time.process_time() - c0)
                wall[k].append(time.perf_counter() - w0)
        row = dict(labelled=frac, shape=args.shape, threads=args.threads,
                   cpu_ms={k: quartile(v) * 1e3 for k, v in cpu.items()},
                   wall_ms={k: min(v) * 1e3 for k, v in wall.items()})
        row["segops_over_floor_cpu"] = row["cpu_ms"]["segops"] / row["cpu_ms"]["floor"]
        if args.eager:
            row["eager_over_segops_cpu"] = row["cpu_ms"]["eager"] / row["cpu_ms"]["segops"]
        results.append(row)
        print("labelled %g%%: CPU ms (lower quartile) %s | segops / floor %.2f%s" % (
            frac * 100, " ".join("%s %.1f" % kv for kv in row["cpu_ms"].items()), row["segops_over_floor_cpu"],
            " | eager / segops %.2f" % row["eager_over_segops_cpu"] if args.eager else ""))
    load = os.getloadavg()
    print("load average %.2f %.2f %.2f, torch %s, %d threads" % (load + (torch.__version__, args.threads)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(load=load, torch=torch.__version__, results=results), f, indent=2)


if __name__ == "__main__":
    main()
