"""``describe_kernels(model, example_input)``: which convolution kernel every segops layer of a model runs.

Runs one forward pass (no gradient) with a recorder on, and lists, per call of a segops convolution: the layer's
name, the op, shapes, dtype, device, the kernel of the forward and of the backward (``"vendor"`` or
``"segops:<kernel>"``, see :mod:`segops.ops.conv_choice`) and why. The same choice is made on every call with the
same shapes and settings, so the report holds for training too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import nn

from segops.nn.conv import AtrousConv2d, ConvTranspose2d
from segops.ops import conv_choice

__all__ = ["describe_kernels", "KernelReport", "LayerKernels"]


@dataclass(frozen=True)
class LayerKernels:
    """One convolution call: where it ran (``forward`` / ``backward``: ``"vendor"`` or ``"segops:<kernel>"``)."""

    layer: str
    op: str
    input_shape: Tuple[int, ...]
    weight_shape: Tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    forward: str
    backward: str
    backend: str
    reason: str
    note: str = ""


class KernelReport(list):
    """A list of :class:`LayerKernels`; ``str(report)`` is a table."""

    def __str__(self) -> str:
        head = ("layer", "op", "input", "weight", "dtype", "forward", "backward", "why")
        rows = [head] + [
            (r.layer, r.op, "x".join(map(str, r.input_shape)), "x".join(map(str, r.weight_shape)),
             str(r.dtype).replace("torch.", ""), r.forward, r.backward, r.reason + ("; " + r.note if r.note else ""))
            for r in self
        ]
        return text_table(rows)

    def counts(self) -> dict:
        """How many calls ran each (forward, backward) pair of kernels."""
        out: dict = {}
        for r in self:
            out[(r.forward, r.backward)] = out.get((r.forward, r.backward), 0) + 1
        return out


def text_table(table: List[Sequence[str]]) -> str:
    """Left-aligned columns, the first row a header underlined with dashes."""
    widths = [max(len(t[i]) for t in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip() for t in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def describe_kernels(model: nn.Module, example_input: Any) -> KernelReport:
    """The kernels ``model(example_input)`` runs in each segops convolution layer (one forward pass, no gradient;
    ``example_input`` a tensor or a tuple of positional arguments). Layers are named as in ``model.named_modules()``
    (``"<call>"`` for a functional call outside a segops layer)."""
    hooks = []
    with conv_choice.recording() as rec:
        def enter(name: str):
            def hook(module, args):
                rec.layer = name
            return hook

        def leave(module, args, output):
            rec.layer = None

        for name, m in model.named_modules():
            if isinstance(m, (AtrousConv2d, ConvTranspose2d)):
                hooks.append(m.register_forward_pre_hook(enter(name or "<model>")))
                hooks.append(m.register_forward_hook(leave))
        try:
            args = example_input if isinstance(example_input, tuple) else (example_input,)
            with torch.no_grad():
                model(*args)
        finally:
            for h in hooks:
                h.remove()
        modules = dict(model.named_modules())
        report = KernelReport()
        for row in rec.rows:
            choice: conv_choice.KernelChoice = row["choice"]
            layer = row["layer"] or "<call>"
            report.append(LayerKernels(
                layer=layer, op=choice.op, input_shape=row["input_shape"], weight_shape=row["weight_shape"],
                dtype=row["dtype"], device=row["device"], forward=choice.kernel_name("forward"),
                backward=choice.kernel_name("backward"), backend=choice.backend, reason=choice.reason,
                note=_note(modules.get(layer), row["groups"])))
    return report


def _note(module: Optional[nn.Module], groups: int) -> str:
    if isinstance(module, ConvTranspose2d) and groups != module.groups:
        return "frozen diagonal weight run as a depthwise convolution (zero cross-channel terms skipped)"
    return ""
