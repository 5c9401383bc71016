"""Argument checks shared by the fake (meta) kernels.

A call that mixes devices where one tensor is on 'meta' is dispatched to the Meta kernel, i.e. to the fake
kernel registered with ``torch.library.register_fake``: without a device check there it would return an
uninitialised tensor on the other tensors' device instead of raising (found by tests/test_fuzz.py).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def check_same_device(op: str, main_name: str, main: Tensor, **others: Optional[Tensor]) -> None:
    """Every tensor in ``others`` (None skipped) must be on ``main``'s device; the error names the argument."""
    for name, t in others.items():
        if t is None:
            continue
        torch._check(
            t.device == main.device,
            lambda: "%s: %s is on %s but %s is on %s" % (op, name, t.device, main_name, main.device),
        )
