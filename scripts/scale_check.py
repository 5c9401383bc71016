"""`make scale`: the losses at 4096 x 4096 (B=1, K=21) on the CPU -- correct, memory bounded, 64-bit clean.

Each case runs in its own subprocess (so its peak RSS, ``ru_maxrss`` from ``os.wait4``, is its own) with
``torch.set_num_threads(THREADS)``, and reports: wall time of forward+backward, peak RSS, the RSS of the
bare process (torch + segops imported, no tensors) and the theoretical minimum (inputs + outputs +
gradients, what any implementation must hold at once), the lattice size (vertices M) where there is a
lattice, and the result of a correctness spot check against the pure-PyTorch references:

* partial cross-entropy: the loss of a pixel and its gradient depend on that pixel only, so the gradient on
  a crop (times the 'mean' denominator) equals ``segops.reference.partial_cross_entropy(..., 'sum')`` on
  the crop alone; the full-image loss is compared with the reference's full-image loss (affordable: one
  log-softmax).
* dense CRF loss: W is global, but its reach is bounded. Elevation is an isometry up to the factor
  ``c = sqrt(2/3) (d+1)``; a point lies within the simplex diameter ``(d+1)^1.5 / 2`` of each of its
  d+1 vertices; one blur step moves ``sqrt(d (d+1))`` and there are d+1 of them. So ``(W x)_i`` depends only
  on points j with ``|f_i - f_j| <= (2 (d+1)^1.5 / 2 + (d+1) sqrt(d (d+1))) / c`` (9.71 feature units for
  d = 5), and since the xy part of the distance never exceeds the whole, on pixels within
  ``9.71 sigma_xy`` of pixel i. Every decision of the lattice (simplex, keys) is a function of the point's
  own features. Hence on a crop of the *full image's features* (absolute coordinates, not re-based) with
  a margin of that reach, the reference lattice (``segops.reference_lattice``) gives the full image's
  ``W x`` exactly (to rounding) on the crop's interior. The check compares the full-image gradient
  ``-(2 weight / B) W X`` there, and the loss against ``1/2 <X, grad>`` (the quadratic form identity) over
  the whole image.
* normalized cut: the same crop argument for ``W [X, 1]``; checked through the filter itself.

Results: JSON in benchmarks/results/<date>-cpu-scale-<size>.json (with segops.bench.environment()).

    python scripts/scale_check.py [--size 4096] [--classes 21] [--threads 2] [--cases a,b] [--no-check]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import resource
import subprocess
import sys
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CASES = ("pce", "crf", "crf_half", "ncut", "crf_distinct", "filter_worst")


def _rss_now() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak_rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def lattice_reach_features(d: int) -> float:
    """Feature-space radius beyond which a point cannot influence (W x)_i (see the module docstring)."""
    c = math.sqrt(2.0 / 3.0) * (d + 1)
    diameter = (d + 1) ** 1.5 / 2.0
    blur = (d + 1) * math.sqrt(d * (d + 1))
    return (2 * diameter + blur) / c


def rel_err(a, b) -> float:
    import torch

    a = a.double()
    b = b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ---- children ------------------------------------------------------------------------------------------


def _images(kind: str, S: int):
    import torch

    if kind == "distinct":
        # All 2^24 RGB colours once each (for S = 4096; a subset for smaller S): 16 x 16 tiles of 256 x 256
        # pixels, r = column % 256, g = row % 256, b = the tile index.
        yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
        img = torch.stack([xx % 256, yy % 256, (xx // 256) + 16 * (yy // 256)]).float().unsqueeze(0)
        return img
    from segops.bench.crf import synthetic_image

    return synthetic_image(1, S, S, torch.Generator().manual_seed(0))


def child(case: str, S: int, K: int, threads: int, check: bool) -> Dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    import segops  # noqa: F401
    from segops import reference as R
    from segops import reference_lattice as RL
    from segops.nn import DenseCRFLoss, NormalizedCutLoss
    from segops.ops import partial_cross_entropy
    from segops.ops.lattice import crf_features

    torch.manual_seed(0)
    res: Dict[str, Any] = dict(case=case, size=S, K=K, threads=torch.get_num_threads())
    res["baseline_rss"] = _rss_now()
    N = S * S
    weight, srgb, sxy = 2e-9, 15.0, 80.0

    if case == "pce":
        g = torch.Generator().manual_seed(1)
        logits = torch.randn(1, K, S, S, generator=g).requires_grad_()
        # dense labels with 10% void (255): both the blocked and the per-pixel paths run
        target = torch.randint(0, K, (1, S, S), generator=g, dtype=torch.uint8)
        target[torch.rand(1, S, S, generator=g) < 0.1] = 255
        res["min_bytes"] = logits.numel() * 4 * 2 + target.numel()  # logits + grad + labels
        res["inputs_rss"] = _rss_now()
        t0 = time.perf_counter()
        loss = partial_cross_entropy(logits, target, ignore_index=255)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        res.update(forward_s=t1 - t0, backward_s=t2 - t1, seconds=t2 - t0, peak_rss=_peak_rss(), loss=float(loss))
        if check:
            count = int((target != 255).sum())
            with torch.no_grad():
                ref = R.partial_cross_entropy(logits.detach(), target, ignore_index=255)
            res["check_loss_rel_err"] = abs(float(loss) - float(ref)) / abs(float(ref))
            errs = []
            for (r0, c0) in ((0, 0), (S // 2 - 64, S // 2 - 64), (S - 128, S - 128)):
                lc = logits.detach()[:, :, r0:r0 + 128, c0:c0 + 128].clone().requires_grad_()
                R.partial_cross_entropy(lc, target[:, r0:r0 + 128, c0:c0 + 128], ignore_index=255,
                                        reduction="sum").backward()
                errs.append(rel_err(logits.grad[:, :, r0:r0 + 128, c0:c0 + 128] * count, lc.grad))
            res["check_grad_crop_rel_err"] = max(errs)
            res["check_ok"] = res["check_loss_rel_err"] < 1e-5 and res["check_grad_crop_rel_err"] < 1e-5
        return res

    if case in ("crf", "crf_half", "ncut", "crf_distinct"):
        scale = 0.5 if case == "crf_half" else 1.0
        img = _images("distinct" if case == "crf_distinct" else "natural", S)
        if case == "crf_distinct":
            res["distinct_colours"] = int(torch.unique((img[0, 0] * 65536 + img[0, 1] * 256 + img[0, 2]).long()).numel())
        seg = torch.softmax(torch.randn(1, K, S, S), 1).requires_grad_()
        res["min_bytes"] = img.numel() * 4 + seg.numel() * 4 * 2
        res["inputs_rss"] = _rss_now()
        mod = NormalizedCutLoss(1.0, srgb, sxy, scale) if case == "ncut" else DenseCRFLoss(weight, srgb, sxy, scale)
        t0 = time.perf_counter()
        loss = mod(img, seg)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        res.update(forward_s=t1 - t0, backward_s=t2 - t1, seconds=t2 - t0, peak_rss=_peak_rss(), loss=float(loss))
        res["settings"] = dict(weight=mod.weight, sigma_rgb=srgb, sigma_xy=sxy, scale_factor=scale)
        grad = seg.grad
        seg = seg.detach()
        # lattice size: the filter op on one channel over the same (resized) features
        img_s = img if scale == 1.0 else torch.nn.functional.interpolate(img, scale_factor=scale, mode="nearest")
        feats = crf_features(img_s, srgb, sxy * scale)
        one = torch.ones(1, 1, *feats.shape[2:])
        M = torch.ops.segops.permutohedral_filter.default(one, feats, False)[3].shape[0]
        res["lattice_points"] = int(feats.shape[2] * feats.shape[3])
        res["lattice_vertices"] = int(M)
        del one
        if check and case != "crf_half":
            d = feats.shape[1]
            margin = int(math.ceil(lattice_reach_features(d) * sxy * scale)) + 2
            res["check_margin_px"] = margin
            inner = 96
            errs = []
            # two interior windows: the disc edge / a tile corner of the distinct-colour image, and elsewhere
            for (r0, c0) in ((S // 2 - S // 5 - inner // 2, S // 3 - inner // 2), (S // 4, (3 * S) // 4)):
                a0, b0 = max(0, r0 - margin), max(0, c0 - margin)
                a1, b1 = min(S, r0 + inner + margin), min(S, c0 + inner + margin)
                fc = feats[:, :, a0:a1, b0:b1]
                if case == "ncut":
                    xc = torch.cat([seg[:, :, a0:a1, b0:b1], torch.ones(1, 1, a1 - a0, b1 - b0)], 1)
                    full = torch.ops.segops.permutohedral_filter.default(torch.cat([seg, torch.ones(1, 1, S, S)], 1),
                                                                         feats, False)[0]
                    got = full[:, :, r0:r0 + inner, c0:c0 + inner]
                    del full
                else:
                    xc = seg[:, :, a0:a1, b0:b1]
                    got = grad[:, :, r0:r0 + inner, c0:c0 + inner] / (-2.0 * weight)
                want = RL.permutohedral_filter(xc, fc)[:, :, r0 - a0:r0 - a0 + inner, c0 - b0:c0 - b0 + inner]
                errs.append(rel_err(got, want))
            res["check_crop_rel_err"] = max(errs)
            if case != "ncut":
                # loss = -(w / B) <X, W X> and grad = -(2 w / B) W X  =>  loss = <X, grad> / 2
                half = 0.5 * float((seg.double() * grad.double()).sum())
                res["check_loss_identity_rel_err"] = abs(float(loss) - half) / abs(half)
                res["check_ok"] = res["check_crop_rel_err"] < 1e-5 and res["check_loss_identity_rel_err"] < 1e-5
            else:
                res["check_ok"] = res["check_crop_rel_err"] < 1e-5
        return res

    if case == "filter_worst":
        # Every pixel on its own d+1 vertices (M = N (d+1), the hash table's worst case): distinct colours
        # spread far apart in feature space (sigma_rgb = sigma_xy = 0.1), one value channel.
        img = _images("distinct", S)
        feats = crf_features(img, 0.1, 0.1)
        v = torch.rand(1, 1, S, S).requires_grad_()
        res["min_bytes"] = img.numel() * 4 + v.numel() * 4 * 2
        res["inputs_rss"] = _rss_now()
        t0 = time.perf_counter()
        out = torch.ops.segops.permutohedral_filter.default(v, feats, False)
        t1 = time.perf_counter()
        res["lattice_points"] = N
        res["lattice_vertices"] = int(out[3].shape[0])
        out[0].backward(torch.ones_like(out[0]))
        t2 = time.perf_counter()
        res.update(forward_s=t1 - t0, backward_s=t2 - t1, seconds=t2 - t0, peak_rss=_peak_rss())
        if check:
            # Isolated points: W x = alpha * (sum_k b_k^2) x per point (no neighbour is present). Compare with
            # the reference on a crop (same features, so the same isolated vertices).
            fc = feats[:, :, :64, :64]
            want = RL.permutohedral_filter(v.detach()[:, :, :64, :64], fc)
            res["check_crop_rel_err"] = rel_err(out[0].detach()[:, :, :64, :64], want)
            res["check_ok"] = res["check_crop_rel_err"] < 1e-5 and res["lattice_vertices"] == N * 6
        return res

    raise SystemExit("unknown case %r" % case)


# ---- parent ------------------------------------------------------------------------------------------------


def run_case(case: str, args) -> Dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", case, "--size", str(args.size),
           "--classes", str(args.classes), "--threads", str(args.threads), "--max-gb", str(args.max_gb)] + (
               ["--no-check"] if args.no_check else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    out, err = proc.communicate()
    # communicate() reaps the child; its rusage is in RUSAGE_CHILDREN only cumulatively, so the child
    # reports VmHWM itself and we also keep the status.
    wall = time.perf_counter() - t0
    row: Dict[str, Any]
    last = out.strip().splitlines()[-1] if out.strip() else ""
    try:
        row = json.loads(last)
    except ValueError:
        row = dict(case=case, error=(err or out)[-2000:])
    row["returncode"] = proc.returncode
    row["process_wall_s"] = wall
    if proc.returncode != 0 and "error" not in row:
        row["error"] = err[-2000:]
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--classes", type=int, default=21)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cases", default="pce,crf,crf_half,ncut,crf_distinct")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--max-gb", type=float, default=0.0,
                   help="cap each case's address space at the bare process + this many GiB (RLIMIT_AS): "
                        "a case that needs more must fail with the allocator's error, reported as oom_error")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        if args.max_gb:
            # address-space cap: beyond it the allocator must raise (a clear error), not crash
            vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
            limit = vm + int(args.max_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            res = child(args.child, args.size, args.classes, args.threads, not args.no_check)
        except RuntimeError as e:
            if not args.max_gb:
                raise
            res = dict(case=args.child, size=args.size, max_gb=args.max_gb, oom_error=str(e).splitlines()[0],
                       peak_rss=_peak_rss())
        ru = resource.getrusage(resource.RUSAGE_SELF)
        res["ru_maxrss"] = ru.ru_maxrss * 1024
        print(json.dumps(res))
        return 0

    import torch

    from segops.bench import environment

    rows: List[Dict[str, Any]] = []
    fmt = "%-13s %8s %8s %9s %9s %9s %10s %s"
    print(fmt % ("case", "time s", "fwd s", "peak GB", "base GB", "min GB", "vertices", "check"))
    for case in [c for c in args.cases.split(",") if c]:
        if case not in CASES:
            raise SystemExit("unknown case %r (choose from %s)" % (case, ", ".join(CASES)))
        row = run_case(case, args)
        rows.append(row)
        if "error" in row:
            print("%-13s FAILED (rc %s): %s" % (case, row["returncode"], row["error"][-600:]))
            continue
        if "oom_error" in row:
            print("%-13s over --max-gb %g: %s" % (case, args.max_gb, row["oom_error"]))
            continue
        gb = lambda b: "%.2f" % (b / 2 ** 30)  # noqa: E731
        chk = {k: ("%.1e" % v if isinstance(v, float) else v) for k, v in row.items() if k.startswith("check_")}
        print(fmt % (case, "%.2f" % row["seconds"], "%.2f" % row["forward_s"], gb(row["peak_rss"]),
                     gb(row["baseline_rss"]), gb(row["min_bytes"]), row.get("lattice_vertices", "-"), chk))
        sys.stdout.flush()
    os.makedirs(args.out, exist_ok=True)
    tag = "" if args.cases == p.get_default("cases") else "-" + args.cases.replace(",", "-")
    path = os.path.join(args.out, "%s-cpu-scale-%d%s.json" % (_dt.date.today().isoformat(), args.size, tag))
    with open(path, "w") as fh:
        json.dump(dict(environment=environment(torch.device("cpu")), threads=args.threads, size=args.size,
                       classes=args.classes, max_gb=args.max_gb or None, rows=rows), fh, indent=1)
    print("wrote", path)
    bad = [r["case"] for r in rows if "error" in r or r.get("check_ok") is False]
    if bad:
        print("FAILED:", ", ".join(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
