"""Suite 'models': forward + backward of every reference model, segops conv layers vs torch.nn conv layers.

Each model is timed as built (every conv an ``AtrousConv2d`` / ``ConvTranspose2d``) with the kernel choice ``"auto"``
(the default), forced ``"segops"`` and forced ``"vendor"``, and as ``segops.models.to_torch_layers(model)`` (a deep
copy with the same weights whose conv layers are their torch.nn parents), in the same process, interleaved, in
training mode with frozen BatchNorm statistics (DeepLab's small-batch fine-tuning), loss = cross-entropy against a
fixed random target. ``segops_ms`` is the auto time (the summary's speed-up is torch / auto); ``auto_ratio``,
``segops_ratio``, ``vendor_ratio`` are torch's time over each variant's; ``auto_kernels`` counts what auto ran
(forward / backward per conv call, from :func:`segops.nn.describe_kernels`). On CUDA each row also times auto and
torch under ``torch.use_deterministic_algorithms(True)`` (``det_ratio``).

Default plan: batch 2, width 0.25, images 161x161 and 321x321 (DeepLab's crop), every model; on CUDA also width 1.0.
Environment knobs: SEGOPS_BENCH_MODELS=name,name  SEGOPS_BENCH_WIDTHS=0.25,1.0  SEGOPS_BENCH_SIZES=161,321
SEGOPS_BENCH_BATCH=2  SEGOPS_BENCH_ROUNDS=2 (interleaved rounds; more rounds steady the ratios on a loaded machine).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, List

import torch
import torch.nn.functional as F

from segops.bench import BenchContext, cudnn_full_fp32
from segops.models import count_parameters, freeze_bn, get_model, list_models, to_torch_layers
from segops.nn import describe_kernels
from segops.nn.describe import text_table
from segops.ops import conv_backend

VARIANTS = ("torch", "auto", "segops", "vendor")
ROUNDS = int(os.environ.get("SEGOPS_BENCH_ROUNDS", "2"))  # interleaved rounds; each variant keeps its best


def _step(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, backend: str = "auto"):
    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> None:
        for p in params:
            p.grad = None
        with conv_backend(backend):
            F.cross_entropy(model(x), target).backward()

    return run


def _env_list(name: str, cast) -> List[Any]:
    return [cast(v) for v in os.environ.get(name, "").split(",") if v]


def _plan(ctx: BenchContext):
    names = _env_list("SEGOPS_BENCH_MODELS", str) or list_models()
    batch = int(os.environ.get("SEGOPS_BENCH_BATCH", "2"))
    if ctx.quick:
        return [(n, 0.125, 65) for n in names if n in ("fcn8s", "unet", "deeplabv3plus_resnet50")], 1
    widths = _env_list("SEGOPS_BENCH_WIDTHS", float) or ([0.25, 1.0] if ctx.device.type == "cuda" else [0.25])
    sizes = _env_list("SEGOPS_BENCH_SIZES", int) or [161, 321]
    return [(n, w, s) for w in widths for s in sizes for n in names], batch


def _summary(counts: Dict[Any, int]) -> str:
    parts = ["%s/%s x%d" % (f, b, c) if f != b else "%s x%d" % (f, c) for (f, b), c in sorted(counts.items())]
    return ", ".join(parts)


@contextlib.contextmanager
def _deterministic():
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


def run(ctx: BenchContext) -> List[Dict[str, Any]]:
    with cudnn_full_fp32():
        rows = _run(ctx)
    print(format_choices(rows))
    return rows


def format_choices(rows: List[Dict[str, Any]]) -> str:
    head = ["model", "case", "auto", "segops", "vendor", "auto ran"]
    det = any("det_ratio" in r for r in rows)
    if det:
        head.insert(5, "deterministic auto")
    table = [head]
    for r in rows:
        line = [r["op"], r["case"], "%.2fx" % r["auto_ratio"], "%.2fx" % r["segops_ratio"], "%.2fx" % r["vendor_ratio"],
                r["auto_kernels"]]
        if det:
            line.insert(5, "%.2fx" % r["det_ratio"] if "det_ratio" in r else "-")
        table.append(line)
    return "models (speed-ups over the torch.nn-layer model; > 1 is faster):\n" + text_table(table)


def _run(ctx: BenchContext) -> List[Dict[str, Any]]:
    plan, batch = _plan(ctx)
    rows: List[Dict[str, Any]] = []
    K = 21
    for name, width, size in plan:
        torch.manual_seed(0)
        model = get_model(name, K, width=width).to(ctx.device)
        model.train()
        freeze_bn(model)
        ref = to_torch_layers(model)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, size, size, generator=g).to(ctx.device)
        target = torch.randint(0, K, (batch, size, size), generator=g).to(ctx.device)
        steps = {v: _step(ref if v == "torch" else model, x, target, "auto" if v == "torch" else v) for v in VARIANTS}
        # Alternate the variants and keep each one's best median: on a shared machine the load drifts between
        # measurements, and the minimum is the least disturbed estimate of each.
        best: Dict[str, float] = {}
        for _ in range(ROUNDS):
            for v in VARIANTS:
                t = ctx.time_ms(steps[v])
                best[v] = min(best.get(v, t), t)
        report = describe_kernels(model, x)
        row = dict(
            op=name,
            case="width %g, %dx3x%dx%d, fwd+bwd" % (width, batch, size, size),
            params=count_parameters(model),
            segops_ms=best["auto"],
            torch_ms=best["torch"],
            segops_mem=ctx.peak_bytes(steps["auto"]),
            torch_mem=ctx.peak_bytes(steps["torch"]),
            segops_forced_ms=best["segops"],
            vendor_ms=best["vendor"],
            auto_ratio=best["torch"] / best["auto"],
            segops_ratio=best["torch"] / best["segops"],
            vendor_ratio=best["torch"] / best["vendor"],
            auto_kernels=_summary(report.counts()),
        )
        if ctx.device.type == "cuda":
            with _deterministic():
                t_torch, t_auto = ctx.time_ms(steps["torch"]), ctx.time_ms(steps["auto"])
                det_report = describe_kernels(model, x)
            row.update(det_torch_ms=t_torch, det_auto_ms=t_auto, det_ratio=t_torch / t_auto,
                       det_auto_kernels=_summary(det_report.counts()))
        rows.append(row)
        del model, ref
    return rows
