"""Phase breakdown of the CUDA dense CRF / normalized-cut losses and the CUDA mean-field inference (torch.profiler
with CUDA activity). Run on a GPU machine: ``python3 scripts/gpu_phases.py [--calls N]``.

For each workload it prints the wall time per call (CUDA events, median of 20 after 5 warm-ups), the summed kernel
time per call, the kernel launches and device-to-host copies per call, and the kernels ranked by their time. The
workloads are the benchmark targets: the losses forward+backward at B=12 257x257 K=21 (scale 1 and 0.5) and the
inference at B=8 512x512 K=21, 10 iterations, one bilateral kernel.
"""
from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from typing import Callable, Dict, List, Tuple

import torch

import segops
from segops.bench.crf import synthetic_image
from segops.bench.crf_inference import photo, unaries
from segops.ops.crf_inference import MeanFieldCRF


def _event_ms(fn: Callable[[], object], warmup: int = 5, reps: int = 20) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _kernels(fn: Callable[[], object], calls: int) -> Tuple[Dict[str, Tuple[int, float]], int, int]:
    """{kernel name: (launches per call, us per call)}, device-to-host copies per call, syncs per call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per: Dict[str, List[float]] = defaultdict(lambda: [0, 0.0])
    dtoh = syncs = 0
    for e in prof.events():
        name = e.name
        dev_type = str(getattr(e, "device_type", ""))
        # CUDA-side events are kernels, copies, and the GPU images of the profiler ranges (segops_kernel::*,
        # which would count each kernel twice)
        if ("CUDA" in dev_type and "Memcpy" not in name and "Memset" not in name
                and not name.startswith(("segops_kernel::", "segops::"))):
            t = getattr(e, "device_time", None)
            if t is None:
                t = e.cuda_time
            per[name][0] += 1
            per[name][1] += t
        if "DtoH" in name and "memcpy" in name.lower():
            dtoh += 1
        if name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"):
            syncs += 1
    table = {k: (round(v[0] / calls, 2), v[1] / calls) for k, v in per.items()}
    # the profiled block's own final synchronize is not the calls'
    return table, dtoh // max(calls, 1), max(syncs - 1, 0) // max(calls, 1)


def _report(title: str, fn: Callable[[], object], calls: int) -> None:
    try:
        _report_one(title, fn, calls)
    except Exception as e:  # one failing workload must not hide the others' numbers
        import traceback

        print("\n## %s: FAILED" % title)
        traceback.print_exc()


def _report_one(title: str, fn: Callable[[], object], calls: int) -> None:
    ms = _event_ms(fn)
    table, dtoh, syncs = _kernels(fn, calls)
    total_us = sum(t for _, t in table.values())
    launches = sum(n for n, _ in table.values())
    print("\n## %s" % title)
    print("wall %.3f ms per call (median of 20, CUDA events); kernels %.3f ms in %.1f launches; "
          "DtoH copies %d, host syncs %d per call (profiled calls: %d)"
          % (ms, total_us / 1e3, launches, dtoh, syncs, calls))
    print("| kernel | launches/call | us/call | share |")
    print("|---|---|---|---|")
    for name, (n, t) in sorted(table.items(), key=lambda kv: -kv[1][1])[:18]:
        print("| %s | %g | %.1f | %.0f%% |" % (name[:90].replace("|", "/"), n, t, 100 * t / max(total_us, 1e-9)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=5)
    args = ap.parse_args()
    dev = torch.device("cuda")
    print("# %s, torch %s, segops %s" % (torch.cuda.get_device_name(), torch.__version__, segops.__version__))
    g = torch.Generator().manual_seed(0)

    B, S, K = 12, 257, 21
    img = synthetic_image(B, S, S, g).to(dev)
    seg = torch.softmax(torch.randn(B, K, S, S, generator=g), 1).to(dev)
    for name, fn in (("DenseCRFLoss", segops.ops.dense_crf_loss), ("NormalizedCutLoss", segops.ops.normalized_cut_loss)):
        for scale in (1.0, 0.5):
            def step(fn=fn, scale=scale) -> None:
                s = seg.detach().requires_grad_()
                fn(img, s, 2e-9, 15.0, 80.0, scale).backward()

            _report("%s fwd+bwd B=%d %dx%d K=%d scale %g (synthetic image)" % (name, B, S, S, K, scale), step,
                    args.calls)

    B, S = 8, 512
    image, picture = photo(S, g)
    images = torch.from_numpy(image).permute(2, 0, 1)[None].expand(B, 3, S, S).contiguous().to(dev)
    u = torch.from_numpy(unaries(B, K, S, seed=1)).to(dev)
    for its in (10, 5):
        _report("dense_crf_inference B=%d %dx%d K=%d, %d iterations, one bilateral kernel (%s)" % (B, S, S, K, its, picture),
                lambda its=its: segops.ops.dense_crf_inference(u, images, its, 3.0, 0.0, 80.0, 13.0, 10.0), args.calls)
    # the two schedules on the same built lattice, 10 iterations: the one op (_crf_mean_field_iterate) and the
    # separate ops (gather splat -> blur -> slice, then crf_mean_field_update)
    crf = MeanFieldCRF(u)
    crf.add_pairwise_bilateral(80.0, 13.0, images, 10.0)
    fused = crf._fused_terms()
    with torch.no_grad():
        _report("one-op schedule, lattice built, B=%d %dx%d K=%d, 10 iterations" % (B, S, S, K),
                lambda: torch.ops.segops._crf_mean_field_iterate(crf.unary, *fused, 10), args.calls)
        _report("op-by-op schedule, lattice built, B=%d %dx%d K=%d, 10 iterations" % (B, S, S, K),
                lambda: crf._iterate_without_grad(crf._softmax_of_unary(), 10), args.calls)


if __name__ == "__main__":
    main()
