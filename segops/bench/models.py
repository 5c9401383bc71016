"""Suite 'models': forward + backward of every reference model, segops conv layers vs torch.nn conv layers.

Each model is timed as built (every conv an ``AtrousConv2d`` / ``ConvTranspose2d``) and as
``segops.models.to_torch_layers(model)`` (a deep copy with the same weights whose conv layers are their torch.nn
parents), in the same process, on one 321x321 image (DeepLab's crop size), batch 1, in training mode with frozen
BatchNorm statistics (DeepLab's small-batch fine-tuning; batch-1 BN training is undefined for the image-pooling
branch), loss = cross-entropy against a fixed random target. Widths: 0.25 for every model; 1.0 for every model on
CUDA but only for a subset on the CPU (full-width FCN / ResNet-101 at 321x321 take many seconds per step on a small
CPU): set SEGOPS_BENCH_MODELS=name,name and SEGOPS_BENCH_WIDTHS=0.25,1.0 to choose.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List

import torch
import torch.nn.functional as F

from segops.bench import BenchContext, cudnn_full_fp32
from segops.models import count_parameters, freeze_bn, get_model, list_models, to_torch_layers

# Full-width models timed on the CPU by default (the others are only timed at width 0.25 there).
CPU_FULL_WIDTH = ("unet", "deeplabv2_largefov", "deeplabv3plus_resnet50")
ROUNDS = 2


def _step(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> None:
        for p in params:
            p.grad = None
        F.cross_entropy(model(x), target).backward()

    return run


def _plan(ctx: BenchContext):
    names = [n for n in os.environ.get("SEGOPS_BENCH_MODELS", "").split(",") if n] or list_models()
    widths_env = [float(w) for w in os.environ.get("SEGOPS_BENCH_WIDTHS", "").split(",") if w]
    if ctx.quick:
        return [(n, 0.125) for n in names if n in ("fcn8s", "unet", "deeplabv3plus_resnet50")], 65
    plan = []
    for w in widths_env or [0.25, 1.0]:
        for n in names:
            if w == 1.0 and not widths_env and ctx.device.type == "cpu" and n not in CPU_FULL_WIDTH:
                continue
            plan.append((n, w))
    return plan, 321


def run(ctx: BenchContext) -> List[Dict[str, Any]]:
    with cudnn_full_fp32():
        return _run(ctx)


def _run(ctx: BenchContext) -> List[Dict[str, Any]]:
    plan, size = _plan(ctx)
    rows: List[Dict[str, Any]] = []
    K = 21
    for name, width in plan:
        torch.manual_seed(0)
        model = get_model(name, K, width=width).to(ctx.device)
        model.train()
        freeze_bn(model)
        ref = to_torch_layers(model)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 3, size, size, generator=g).to(ctx.device)
        target = torch.randint(0, K, (1, size, size), generator=g).to(ctx.device)
        ours, theirs = _step(model, x, target), _step(ref, x, target)
        # Alternate the two (ours, theirs, ours, theirs) and keep each one's best median: on a shared machine the
        # load drifts between measurements, and the minimum is the least disturbed estimate of either.
        t_ours, t_theirs = [], []
        for _ in range(ROUNDS):
            t_ours.append(ctx.time_ms(ours))
            t_theirs.append(ctx.time_ms(theirs))
        rows.append(
            dict(
                op=name,
                case="width %g, 1x3x%dx%d, fwd+bwd" % (width, size, size),
                params=count_parameters(model),
                segops_ms=min(t_ours),
                torch_ms=min(t_theirs),
                segops_mem=ctx.peak_bytes(ours),
                torch_mem=ctx.peak_bytes(theirs),
            )
        )
        del model, ref
    return rows
