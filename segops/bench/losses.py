"""Suite 'losses': fused partial cross-entropy and entropy against the peers a user would pick.

Per shape and label share (1%, 3%, 10%, 100% of pixels labelled), forward + backward of the following. The
labels are strokes 3 pixels wide along smooth random walks (the layout of scribbles), and, at 3%, also pixels
scattered independently (the worst case for reading only the labelled pixels):

* segops (``ops.partial_cross_entropy`` / ``ops.entropy``);
* eager PyTorch (``F.cross_entropy(..., ignore_index=255)`` / entropy through ``log_softmax``);
* ``torch.compile`` of the same PyTorch expression (inductor; ``--quick`` uses the ``aot_eager`` backend so that
  the smoke test stays fast: its times say nothing);
* the memory floor: ``torch.zeros_like(logits)``, allocating and zeroing the ``(B, K, H, W)`` gradient that any
  implementation must return, with PyTorch's allocator (on the CPU a tensor this large is mapped afresh each
  time and most of the floor is the kernel's page faults; segops puts large CPU outputs on transparent huge
  pages and can go below it);
* the resident floor: zeroing a gradient-sized buffer that is already mapped, the bytes that must be written
  and nothing else.

The five are timed interleaved in rounds (``torch.utils.benchmark``), and each time is the median over rounds, so
that a load change on a shared machine hits all of them alike. Rows carry ``labelled`` (the share),
``compiled_ms``, ``floor_ms``, ``resident_ms``, ``speedup_compiled``, ``floor_ratio`` (segops time / floor time) and
``resident_ratio`` (segops time / resident floor) besides the common columns; the suite prints its own table with them.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
import torch.utils.benchmark as tbench

from segops import ops
from segops.bench import BenchContext, fwd_bwd, saved_bytes

LABEL_SHARES = (0.01, 0.03, 0.10, 1.0)
ROUNDS = 5


def scribble_target(B: int, K: int, H: int, W: int, labelled: float, device, generator) -> torch.Tensor:
    """(B,H,W) int64 labels with a `labelled` fraction of pixels in [0,K) scattered independently at random,
    the rest 255: the worst case for a kernel that reads only the labelled pixels (every one on its own cache
    lines)."""
    target = torch.randint(0, K, (B, H, W), generator=generator)
    keep = torch.rand((B, H, W), generator=generator) < labelled
    return torch.where(keep, target, torch.full_like(target, 255)).to(device)


def stroke_target(B: int, K: int, H: int, W: int, labelled: float, device, generator,
                  width: int = 3, step: float = 2.0) -> torch.Tensor:
    """(B,H,W) int64 labels drawn as scribbles: strokes `width` pixels wide along smooth random walks (the
    heading turns by up to ~0.3 rad per `step` pixels), one class per stroke, added until `labelled` of each
    image's pixels carry a label (overshooting by at most one stroke stamp); the rest 255. The layout of
    ScribbleSup-style annotations, which a scribble user's loss sees."""
    if labelled >= 1.0:
        return torch.randint(0, K, (B, H, W), generator=generator).to(device)
    target = torch.full((B, H, W), 255, dtype=torch.int64)
    want = int(round(labelled * H * W))
    r = width // 2
    for b in range(B):
        img = target[b]
        count = 0
        while count < want:
            u = torch.rand(4, generator=generator).tolist()
            y, x, heading = u[0] * (H - 1), u[1] * (W - 1), u[2] * math.tau
            cls = int(torch.randint(0, K, (1,), generator=generator))
            length = int(20 + u[3] * 80)  # stamps per stroke
            turns = (torch.rand(length, generator=generator) - 0.5) * 0.6
            for turn in turns.tolist():
                iy, ix = int(round(y)), int(round(x))
                y0, y1, x0, x1 = max(iy - r, 0), min(iy + r + 1, H), max(ix - r, 0), min(ix + r + 1, W)
                if y0 < y1 and x0 < x1:
                    patch = img[y0:y1, x0:x1]
                    count += int((patch == 255).sum())
                    patch.fill_(cls)
                if count >= want:
                    break
                heading += turn
                y = min(max(y + step * math.sin(heading), 0.0), H - 1.0)
                x = min(max(x + step * math.cos(heading), 0.0), W - 1.0)
    return target.to(device)


# label layouts of the suite: strokes (realistic) for every share, scattered pixels (worst case) for one
LAYOUTS = {"strokes": stroke_target, "scattered": scribble_target}
SCATTERED_SHARES = (0.03,)


def _torch_entropy(x: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(x, dim=1)
    return -(logp.exp() * logp).sum(1).mean()


def _torch_pce(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(x, target, ignore_index=255)


def _compile(fn: Callable, quick: bool) -> Optional[Callable]:
    """torch.compile(fn) (inductor), or None where it cannot run here (no compiler, unsupported platform)."""
    try:
        return torch.compile(fn, backend="aot_eager" if quick else "inductor", dynamic=False)
    except Exception:  # torch.compile itself unavailable: the row says so (compiled_ms None)
        return None


def interleaved_ms(ctx: BenchContext, fns: Dict[str, Optional[Callable[[], Any]]], rounds: int) -> Dict[str, float]:
    """Median over `rounds` rounds of each fn's median time (ms); the fns take turns within a round."""
    live = {k: f for k, f in fns.items() if f is not None}
    for f in live.values():  # warm-up (and compilation) outside the timing
        f()
        f()
    ctx.sync()
    per_round = {k: [] for k in live}
    for _ in range(rounds):
        for k, f in live.items():
            timer = tbench.Timer(stmt="fn()", globals={"fn": f})
            per_round[k].append(timer.blocked_autorange(min_run_time=ctx.min_run_time / rounds).median * 1e3)
    out: Dict[str, float] = {}
    for k, v in per_round.items():
        v = sorted(v)
        out[k] = v[len(v) // 2]
    return out


def _failing_ok(fn: Callable[[], Any]) -> Optional[Callable[[], Any]]:
    """fn if one call succeeds, else None (a compiled peer that fails to build is reported as missing)."""
    try:
        fn()
        return fn
    except Exception as e:  # inductor needs a C++ compiler on the CPU, triton on the GPU
        print("segops bench losses: torch.compile peer unavailable:", type(e).__name__, str(e).splitlines()[0][:120])
        return None


def _row(ctx: BenchContext, op: str, case: str, labelled: Optional[float], times: Dict[str, float],
         ours: Callable, theirs: Callable, compile_backend: str) -> Dict[str, Any]:
    seg, tor, comp, floor, resident = (times.get(k) for k in ("segops", "torch", "compiled", "floor", "resident"))
    return dict(
        op=op,
        case=case,
        labelled=labelled,
        segops_ms=seg,
        torch_ms=tor,
        compiled_ms=comp,
        floor_ms=floor,
        resident_ms=resident,
        speedup_compiled=comp / seg if comp and seg else None,
        floor_ratio=seg / floor if seg and floor else None,
        resident_ratio=seg / resident if seg and resident else None,
        compile_backend=compile_backend,
        segops_mem=ctx.peak_bytes(ours),
        torch_mem=ctx.peak_bytes(theirs),
    )


def run(ctx: BenchContext) -> List[Dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    if ctx.quick:
        shapes = [(2, 21, 64, 64)]
    elif ctx.device.type == "cuda":
        shapes = [(8, 21, 256, 256), (16, 21, 512, 512)]
    else:
        shapes = [(8, 21, 256, 256)]
    shares = (0.03, 1.0) if ctx.quick else LABEL_SHARES
    backend = "aot_eager" if ctx.quick else "inductor"
    compiled_pce = _compile(_torch_pce, ctx.quick)
    compiled_entropy = _compile(_torch_entropy, ctx.quick)
    rows: List[Dict[str, Any]] = []
    for B, K, H, W in shapes:
        logits = torch.randn(B, K, H, W, generator=g).mul_(3).to(ctx.device).requires_grad_()
        shape = "%dx%dx%dx%d" % (B, K, H, W)
        floor = lambda: torch.zeros_like(logits)  # noqa: E731
        resident_buffer = torch.empty_like(logits, requires_grad=False)
        resident = resident_buffer.zero_
        cases = [("strokes", frac) for frac in shares]
        cases += [("scattered", frac) for frac in shares if frac in SCATTERED_SHARES]
        for layout, frac in cases:
            target = LAYOUTS[layout](B, K, H, W, frac, ctx.device, g)
            if frac >= 1.0:
                layout = "all"
            ours = fwd_bwd(lambda x: ops.partial_cross_entropy(x, target), logits)
            theirs = fwd_bwd(lambda x: _torch_pce(x, target), logits)
            comp = None
            if compiled_pce is not None:
                comp = _failing_ok(fwd_bwd(lambda x: compiled_pce(x, target), logits))
            times = interleaved_ms(ctx, dict(segops=ours, torch=theirs, compiled=comp, floor=floor, resident=resident),
                                   1 if ctx.quick else ROUNDS)
            share = float((target != 255).float().mean())
            row = _row(ctx, "partial_cross_entropy", "%s %g%% labelled (%s)" % (shape, frac * 100, layout), frac,
                       times, ours, theirs, backend)
            row["layout"] = layout
            row["labelled_measured"] = share
            row["segops_saved_bytes"] = saved_bytes(lambda: ops.partial_cross_entropy(logits, target), [logits, target])
            row["torch_saved_bytes"] = saved_bytes(lambda: _torch_pce(logits, target), [logits, target])
            rows.append(row)
        ours = fwd_bwd(lambda x: ops.entropy(x), logits)
        theirs = fwd_bwd(_torch_entropy, logits)
        comp = _failing_ok(fwd_bwd(compiled_entropy, logits)) if compiled_entropy is not None else None
        times = interleaved_ms(ctx, dict(segops=ours, torch=theirs, compiled=comp, floor=floor, resident=resident),
                               1 if ctx.quick else ROUNDS)
        row = _row(ctx, "entropy", shape, 1.0, times, ours, theirs, backend)
        row["segops_saved_bytes"] = saved_bytes(lambda: ops.entropy(logits), [logits])
        row["torch_saved_bytes"] = saved_bytes(lambda: _torch_entropy(logits), [logits])
        rows.append(row)
    print(format_losses_table(rows, ctx))
    return rows


def format_losses_table(rows: List[Dict[str, Any]], ctx: BenchContext) -> str:
    """The suite's own table: every peer and ratio, the label share as a column."""
    head = ["op", "shape", "labelled", "layout", "segops ms", "eager ms", "compiled ms", "floor ms",
            "resident ms", "vs eager", "vs compiled", "/ floor", "/ resident"]
    lines = [head]
    for r in rows:
        def ms(key: str) -> str:
            return "-" if r.get(key) is None else "%.3f" % r[key]

        def ratio(v: Optional[float]) -> str:
            return "-" if v is None else "%.2fx" % v

        eager = r["torch_ms"] / r["segops_ms"] if r.get("torch_ms") and r.get("segops_ms") else None
        lines.append([
            r["op"], r["case"].split()[0], "-" if r["op"] == "entropy" else "%g%%" % (r["labelled"] * 100),
            r.get("layout", "-"),
            ms("segops_ms"), ms("torch_ms"), ms("compiled_ms"), ms("floor_ms"), ms("resident_ms"),
            ratio(eager), ratio(r.get("speedup_compiled")), ratio(r.get("floor_ratio")),
            ratio(r.get("resident_ratio")),
        ])
    widths = [max(len(str(l[i])) for l in lines) for i in range(len(head))]
    text = ["  ".join(str(c).ljust(w) for c, w in zip(l, widths)) for l in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    title = "losses on %s, %d threads, load %s (compiled: torch.compile, %s backend)" % (
        ctx.device, torch.get_num_threads(),
        " ".join("%.2f" % v for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?",
        rows[0]["compile_backend"] if rows else "-",
    )
    return title + "\n" + "\n".join(text)
