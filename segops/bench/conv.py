"""Suite 'conv': atrous_conv2d / conv_transpose2d forward+backward vs torch (F.conv2d / F.conv_transpose2d,
i.e. oneDNN / native kernels on the CPU, cuDNN on CUDA), on segmentation shapes.

Every row times four variants in the same process, interleaved: torch itself, and segops' op with the kernel choice
``"auto"`` (the default), forced ``"segops"`` and forced ``"vendor"``. ``segops_ms`` is the auto time (so the
summary's speed-up is torch / auto); ``auto_ratio``, ``segops_ratio``, ``vendor_ratio`` are torch's time over each
variant's (> 1: faster than torch); ``auto_kernel`` names what auto ran (forward / backward). On CUDA each row also
times both under ``torch.use_deterministic_algorithms(True)`` (``det_ratio``: torch's deterministic time over auto's).

The "fixed bilinear" rows are FCN's frozen upsampling layer as FCN ships it (``groups=1``, a 21x21 weight that is zero
off the diagonal) against ``torch.nn.ConvTranspose2d`` with the same weight: segops detects the frozen diagonal weight
and runs it as a depthwise convolution, skipping the zero cross-channel terms (a fair user-level comparison, not a
like-for-like kernel one; the depthwise rows above it are that).

CPU default (a few minutes on 2 cores): ASPP and LargeFOV at 33x33 batch 4 (65x65 at batch 1), FCN upsampling at
batch 4, U-Net at batch 2. CUDA: the ASPP / LargeFOV shapes at batch 4 on 33x33 and 65x65. ``--quick``: tiny shapes.
SEGOPS_BENCH_ROUNDS=2: interleaved rounds (each variant keeps its best); more rounds steady the ratios.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from segops import ops
from segops.bench import BenchContext, cudnn_full_fp32
from segops.nn import ConvTranspose2d
from segops.nn.describe import text_table
from segops.ops import conv_choice

VARIANTS = ("torch", "auto", "segops", "vendor")
ROUNDS = int(os.environ.get("SEGOPS_BENCH_ROUNDS", "2"))  # interleaved rounds; each variant keeps its best


def _step(fn: Callable[..., torch.Tensor], leaves: List[torch.Tensor], gout: Optional[torch.Tensor]):
    def step() -> None:
        for t in leaves:
            t.grad = None
        out = fn()
        out.backward(gout)

    return step


@contextlib.contextmanager
def _deterministic() -> Any:
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


def _row(ctx: BenchContext, op: str, case: str, make: Callable[[str], Callable[[], None]],
         explain: Callable[[], conv_choice.KernelChoice], note: str = "") -> Dict[str, Any]:
    """Times make(variant) for every variant, interleaved over ROUNDS (min of each); make("torch") is the peer.
    explain() gives auto's choice under the current settings."""
    steps = {v: make(v) for v in VARIANTS}
    choice = explain()
    best: Dict[str, float] = {}
    for _ in range(ROUNDS):
        for v in VARIANTS:
            t = ctx.time_ms(steps[v])
            best[v] = min(best.get(v, t), t)
    row = dict(op=op, case=case, segops_ms=best["auto"], torch_ms=best["torch"],
               segops_mem=ctx.peak_bytes(steps["auto"]), torch_mem=ctx.peak_bytes(steps["torch"]),
               auto_kernel="%s / %s" % (choice.kernel_name("forward"), choice.kernel_name("backward")),
               auto_reason=choice.reason, segops_forced_ms=best["segops"], vendor_ms=best["vendor"],
               auto_ratio=best["torch"] / best["auto"], segops_ratio=best["torch"] / best["segops"],
               vendor_ratio=best["torch"] / best["vendor"])
    if note:
        row["note"] = note
    if ctx.device.type == "cuda":
        with _deterministic():
            t_torch = ctx.time_ms(steps["torch"])
            t_auto = ctx.time_ms(steps["auto"])
            det = explain()
        row.update(det_torch_ms=t_torch, det_auto_ms=t_auto, det_ratio=t_torch / t_auto,
                   det_auto_kernel="%s / %s" % (det.kernel_name("forward"), det.kernel_name("backward")))
    return row


def run(ctx: BenchContext) -> List[Dict[str, Any]]:
    with cudnn_full_fp32():
        rows = _run(ctx)
    print(format_choices(rows))
    return rows


def format_choices(rows: List[Dict[str, Any]]) -> str:
    """The per-row kernel choice and the three ratios (torch time / variant time)."""
    head = ["op", "case", "auto ran (fwd / bwd)", "auto", "segops", "vendor"]
    det = any("det_ratio" in r for r in rows)
    if det:
        head += ["deterministic: auto ran", "auto vs torch"]
    table = [head]
    for r in rows:
        line = [r["op"], r["case"], r["auto_kernel"], "%.2fx" % r["auto_ratio"], "%.2fx" % r["segops_ratio"],
                "%.2fx" % r["vendor_ratio"]]
        if det:
            line += [r.get("det_auto_kernel", "-"), "%.2fx" % r["det_ratio"] if "det_ratio" in r else "-"]
        table.append(line)
    return "kernel choice (speed-ups over torch; > 1 is faster):\n" + text_table(table)



def _run(ctx: BenchContext) -> List[Dict[str, Any]]:
    dev = ctx.device
    gen = torch.Generator().manual_seed(0)
    cuda = dev.type == "cuda"

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dev)

    rows: List[Dict[str, Any]] = []

    # ---- dense atrous: DeepLab ASPP branches and LargeFOV fc6 ----
    if ctx.quick:
        dense = [("aspp r6", 1, 64, 32, 17, 6)]
    elif cuda:
        dense = [("aspp r%d" % r, 4, 512, 256, hw, r) for hw in (33, 65) for r in (6, 12, 18, 24)]
        dense += [("largefov fc6 r12", 4, 512, 1024, hw, 12) for hw in (33, 65)]
    else:
        dense = [("aspp r%d" % r, 4, 512, 256, 33, r) for r in (6, 12, 18, 24)]
        dense += [("aspp r12", 1, 512, 256, 65, 12), ("largefov fc6 r12", 1, 512, 1024, 33, 12)]
    for name, B, cin, cout, hw, r in dense:
        x = rnd(B, cin, hw, hw).requires_grad_()
        w = rnd(cout, cin, 3, 3, scale=0.02).requires_grad_()
        b = rnd(cout).requires_grad_()
        gout = rnd(B, cout, hw, hw)

        def make(v, x=x, w=w, b=b, gout=gout, r=r):
            if v == "torch":
                return _step(lambda: F.conv2d(x, w, b, 1, r, r), [x, w, b], gout)
            return _step(lambda: ops.atrous_conv2d(x, w, b, 1, r, r, backend=v), [x, w, b], gout)

        explain = lambda x=x, w=w, r=r: conv_choice.explain(False, x, w, [1, 1], [r, r], [r, r], 1, "auto")
        rows.append(_row(ctx, "atrous_conv2d", "%s %dx%d->%d %dx%d" % (name, B, cin, cout, hw, hw), make, explain))
        del x, w, b, gout

    # ---- FCN score upsampling on K=21 maps: depthwise learnable, and the fixed bilinear layer ----
    K = 21
    if ctx.quick:
        ups = [(2, 2, 8)]
    else:
        ups = [(2, 4, 16), (8, 4, 64), (32, 4, 16)]  # (factor, batch, input size): x8 64->512, x32 16->512
    for s, B, hw in ups:
        k, p = 2 * s, s // 2
        x = rnd(B, K, hw, hw).requires_grad_()
        wd = rnd(K, 1, k, k).requires_grad_()
        ho = (hw - 1) * s - 2 * p + k
        gout = rnd(B, K, ho, ho)

        def make_dw(v, x=x, wd=wd, gout=gout, s=s, p=p):
            if v == "torch":
                return _step(lambda: F.conv_transpose2d(x, wd, None, s, p, groups=K), [x, wd], gout)
            return _step(lambda: ops.conv_transpose2d(x, wd, None, s, p, groups=K, backend=v), [x, wd], gout)

        explain = lambda x=x, wd=wd, s=s, p=p: conv_choice.explain(True, x, wd, [s, s], [p, p], [1, 1], K, "auto")
        rows.append(_row(ctx, "conv_transpose2d depthwise", "x%d %dx%dx%dx%d k%d" % (s, B, K, hw, hw, k), make_dw,
                         explain))
        mine = ConvTranspose2d(K, K, k, s, p, bias=False, init="bilinear", trainable=False).to(dev)
        ref = torch.nn.ConvTranspose2d(K, K, k, s, p, bias=False).to(dev).requires_grad_(False)
        ref.load_state_dict(mine.state_dict())

        def make_fixed(v, x=x, gout=gout, mine=mine, ref=ref):
            if v == "torch":
                return _step(lambda: ref(x), [x], gout)

            def fwd():
                with ops.conv_backend(v):
                    return mine(x)

            return _step(fwd, [x], gout)

        dw_weight = mine._depthwise_weight()
        explain = lambda x=x, s=s, p=p, w=dw_weight if dw_weight is not None else mine.weight: conv_choice.explain(
            True, x, w, [s, s], [p, p], [1, 1], K if w.shape[1] == 1 else 1, "auto")
        rows.append(_row(ctx, "fixed bilinear (FCN, groups=1)", "x%d %dx%dx%dx%d k%d" % (s, B, K, hw, hw, k),
                         make_fixed, explain,
                         note="segops detects the frozen diagonal weight and skips the zero cross-channel terms "
                              "(runs it depthwise); torch runs the dense groups=1 convolution"))
        del x, wd, gout

    # ---- U-Net 2x2 stride-2 up-convolutions ----
    if ctx.quick:
        unet = [(1, 64, 32, 16)]
    elif cuda:
        unet = [(8, 1024, 512, 32), (8, 512, 256, 64), (8, 256, 128, 128), (8, 128, 64, 256)]
    else:
        unet = [(2, 1024, 512, 28), (2, 512, 256, 56), (2, 128, 64, 224)]
    for B, cin, cout, hw in unet:
        x = rnd(B, cin, hw, hw).requires_grad_()
        w = rnd(cin, cout, 2, 2, scale=0.02).requires_grad_()
        b = rnd(cout).requires_grad_()
        gout = rnd(B, cout, 2 * hw, 2 * hw)

        def make_up(v, x=x, w=w, b=b, gout=gout):
            if v == "torch":
                return _step(lambda: F.conv_transpose2d(x, w, b, 2), [x, w, b], gout)
            return _step(lambda: ops.conv_transpose2d(x, w, b, 2, backend=v), [x, w, b], gout)

        explain = lambda x=x, w=w: conv_choice.explain(True, x, w, [2, 2], [0, 0], [1, 1], 1, "auto")
        rows.append(_row(ctx, "conv_transpose2d unet 2x2/2", "%dx%d->%d %dx%d" % (B, cin, cout, hw, hw), make_up,
                         explain))
        del x, w, b, gout
    return rows
