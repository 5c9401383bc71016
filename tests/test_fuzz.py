"""Fuzzing the public API: every op in ``segops.ops`` and every module in ``segops.nn``.

Each example draws shapes (zero-sized dims, B = 0, K = 1, large K, 1x1 images), memory layouts (contiguous,
permuted views, stepped slices, expanded stride-0, channels_last), dtypes (float16 / bfloat16 / float32 /
float64, integers where floats are expected), NaN / Inf values, out-of-range / negative / void labels, wrongly
shaped optional arguments and mismatched devices ('meta' here; cuda vs cpu where CUDA exists).

The oracle (see README, "Fuzzing the public API"). The generator knows whether the example is a valid call:

* valid: the op must return, and the result (and the gradient, where defined and finite) must match the
  pure-PyTorch reference evaluated in float64 on the same (already rounded) input values, within a tolerance
  derived from the dtype (``TOL``), scaled by the magnitude of the terms that were summed (``scale``), with
  NaN exactly where the reference has NaN;
* invalid: the op must raise a *clear* error: ``ValueError``, ``TypeError``, ``RuntimeError`` or ``IndexError``
  (torch's own error classes subclass these), whose message names the offending argument (one of the words
  given for that defect), and is not an internal assertion.

A crash (the process dies) fails the whole run, a hang trips the per-example alarm (``TIMEOUT_S``). Found
failures are kept as regression tests (``test_regression_*`` at the end), each docstring naming the bug.
Profiles: tests/conftest.py ("ci" 25 examples per test, "fuzz" 3000; ``SEGOPS_FUZZ_EXAMPLES`` overrides).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given, note, settings
from hypothesis import strategies as st
from torch import nn

import segops
from segops import ops, reference
from segops import reference_lattice as rl
from conftest import HAS_CUDA

# ---- profile: example counts ------------------------------------------------------------------------------

_N = os.environ.get("SEGOPS_FUZZ_EXAMPLES")
fuzz_settings = settings(max_examples=int(_N)) if _N else settings()

TIMEOUT_S = float(os.environ.get("SEGOPS_FUZZ_TIMEOUT", "60"))


@contextlib.contextmanager
def alarm(seconds: float = TIMEOUT_S):
    """Per-example hang guard: SIGALRM raises TimeoutError in the test (Linux; a no-op elsewhere)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def handler(signum, frame):
        raise TimeoutError("fuzz example ran longer than %.0f s (hang?)" % seconds)

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---- tolerances ----------------------------------------------------------------------------------------------
#
# The reference runs in float64 on exactly the values segops saw (inputs are rounded to the test dtype first),
# so the only differences are segops' own rounding. For a result that sums n terms t_i, the error of a float
# accumulation is bounded by ~ n * u * sum |t_i| (u = unit roundoff) and is ~ sqrt(n) * u * sum|t_i| in
# practice; the tests use ``|out - ref| <= TOL[dtype] * scale`` with ``scale = 1 + sum |t_i|`` computed in
# float64 per output element (e.g. conv(|x|, |w|) + |b|), and TOL:
#   float64: 1e-9   (u = 1.1e-16; leaves 10^6 of room for n and for exp/log rounding)
#   float32: 2e-5   (u = 6e-8; n <= a few hundred terms here, so n*u ~ 1e-5)
#   float16: 2e-3   (computed in float32, result rounded once to half: u = 4.9e-4, plus the float32 part;
#                    the loss of a half input also rounds exp/log at float32, far below that)
#   bfloat16: 1.6e-2 (rounded once to bfloat16: u = 3.9e-3, times ~4 for the rounding of intermediate
#                    products that conv and the CRF losses round back to bfloat16 before reducing)
TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# plus one unit in the last place of the subnormal range (results below the smallest normal number have an
# absolute, not relative, spacing: for float16 2^-24 = 6e-8, e.g. a conv output of 7e-7 rounds by 2.5e-8)
ATOL = {t: torch.finfo(t).smallest_normal * torch.finfo(t).eps for t in TOL}
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INTS = [torch.int64, torch.int32, torch.uint8]
CLEAR_TYPES = (ValueError, TypeError, RuntimeError, IndexError)


def assert_close_scaled(out: torch.Tensor, ref: torch.Tensor, scale, dtype: torch.dtype, what: str,
                        inf_inputs: bool = False) -> None:
    """|out - ref| <= TOL[dtype] * scale elementwise, same shape, and non-finite values where the reference has
    them: NaN exactly where ref is NaN, the same +-Inf where ref is +-Inf. With +-Inf among the inputs
    (``inf_inputs``) only "non-finite exactly where ref is non-finite" is required: torch's own mix of Inf and
    NaN there depends on its operation order (log_softmax computes inf - inf = NaN for a loss whose exact value
    is +Inf), so Inf vs NaN is not a defined part of the result."""
    assert tuple(out.shape) == tuple(ref.shape), "%s: shape %s, reference %s" % (what, tuple(out.shape), tuple(ref.shape))
    o = out.detach().to(torch.float64).cpu()
    r = ref.detach().to(torch.float64).cpu()
    s = torch.as_tensor(scale, dtype=torch.float64).cpu() if not isinstance(scale, torch.Tensor) else scale.detach().double().cpu()
    if inf_inputs:
        rn, on = ~torch.isfinite(r), ~torch.isfinite(o)
        assert torch.equal(rn, on), "%s: non-finite at %s, reference non-finite at %s" % (
            what, on.nonzero()[:5].tolist(), rn.nonzero()[:5].tolist())
    rn, on = torch.isnan(r), torch.isnan(o)
    if not inf_inputs:
        assert torch.equal(rn, on), "%s: NaN at %s, reference NaN at %s" % (
            what, on.nonzero()[:5].tolist(), rn.nonzero()[:5].tolist())
    ri = torch.isinf(r)
    if ri.any() and not inf_inputs:
        assert torch.equal(o[ri], r[ri]), "%s: Inf mismatch" % what
    rn = ~torch.isfinite(r)
    ri = rn
    fin = ~(rn | ri)
    s = torch.broadcast_to(s, r.shape)
    err = (o - r).abs()
    bad = fin & ~(err <= TOL[dtype] * s + ATOL[dtype])
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError("%s (%s): |out - ref| = %g > %g * scale %g at %s (out %r, ref %r)" % (
            what, dtype, float(err[tuple(i)]), TOL[dtype], float(s[tuple(i)]), i, float(o[tuple(i)]), float(r[tuple(i)])))


def assert_clear(exc: BaseException, words: Sequence[str]) -> None:
    """A *clear* error: one of the documented classes, and its message names the offending argument."""
    assert isinstance(exc, CLEAR_TYPES), "unexpected exception class %s: %s" % (type(exc).__name__, exc)
    msg = str(exc)
    assert "INTERNAL ASSERT" not in msg, "internal assertion instead of an argument check: %s" % msg
    low = msg.lower()
    assert any(w.lower() in low for w in words), "error message does not name %s: %s" % (" / ".join(words), msg)


def expect_error(fn: Callable, words: Sequence[str]):
    try:
        with alarm():
            out = fn()
    except TimeoutError:
        raise
    except BaseException as e:  # noqa: BLE001 (anything else is judged by assert_clear)
        assert_clear(e, words)
        return e
    raise AssertionError("expected an error naming %s, got a result %r" % (" / ".join(words), _short(out)))


def _short(x):
    if isinstance(x, torch.Tensor):
        return "tensor%s %s" % (tuple(x.shape), x.dtype)
    return repr(x)[:200]


# ---- inputs ----------------------------------------------------------------------------------------------

LAYOUTS = ["contiguous", "channels_last", "permuted", "stepped", "expanded"]


def make_tensor(shape: Sequence[int], dtype: torch.dtype, layout: str, seed: int, scale: float = 1.0,
                kind: str = "normal", high: int = 1, device: str = "cpu") -> torch.Tensor:
    """A tensor of the given logical shape and dtype in the given memory layout, seeded values.

    layouts: contiguous; channels_last (4-D only, else contiguous); permuted (the storage is in reversed dim
    order, the result is a permuted view); stepped (every other element of a twice-larger last dim);
    expanded (dim 0 has stride 0: all batch items share storage, values equal across the batch).
    kind: 'normal' (N(0, scale)), 'uniform' (U(0, scale)) or 'int' (integers in [0, high)).
    """
    shape = tuple(int(s) for s in shape)
    g = torch.Generator().manual_seed(seed)

    def draw(shp):
        if kind == "int":
            return torch.randint(0, max(high, 1), shp, generator=g, dtype=torch.int64).to(dtype)
        if kind == "uniform":
            base = torch.rand(shp, generator=g, dtype=torch.float64) * scale
        else:
            base = torch.randn(shp, generator=g, dtype=torch.float64) * scale
        return base.to(dtype)

    n = len(shape)
    if layout == "channels_last" and n == 4:
        t = draw(shape).contiguous(memory_format=torch.channels_last)
    elif layout == "permuted" and n >= 2:
        perm = list(range(n))[::-1]
        t = draw([shape[p] for p in perm]).permute(*perm)  # permute is its own inverse for a reversal
    elif layout == "stepped" and n >= 1:
        big = list(shape)
        big[-1] = 2 * big[-1]
        t = draw(big)[..., ::2]
    elif layout == "expanded" and n >= 1 and shape[0] != 1:
        t = draw((1,) + shape[1:]).expand(shape)
    else:
        t = draw(shape)
    assert tuple(t.shape) == shape
    return t.to(device)


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout: 'permuted' (reversed-dim storage), 'stepped' (every other
    element of a larger last dim) or 'channels_last' (4-D); anything else returns t."""
    n = t.dim()
    if layout == "permuted" and n >= 2:
        rev = list(range(n))[::-1]
        return t.permute(*rev).contiguous().permute(*rev)
    if layout == "stepped" and n >= 1:
        return torch.stack([t, torch.zeros_like(t)], -1).flatten(-2)[..., ::2] if t.numel() else t
    if layout == "channels_last" and n == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t


def poison(t: torch.Tensor, seed: int, value: float, count: int = 1) -> torch.Tensor:
    """A copy of t (same layout where possible) with `count` seeded elements set to value (NaN / Inf)."""
    if t.numel() == 0:
        return t
    out = t.clone() if t.stride() and 0 not in t.stride() else t.contiguous().clone()
    g = torch.Generator().manual_seed(seed)
    for _ in range(count):
        i = int(torch.randint(0, t.numel(), (1,), generator=g))
        idx = []
        for s in reversed(out.shape):
            idx.append(i % s)
            i //= s
        out[tuple(reversed(idx))] = value
    return out


def meta_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, device="meta")


OTHER_DEVICE = "cuda" if HAS_CUDA else "meta"


def other_device(t: torch.Tensor) -> torch.Tensor:
    """t on a device different from the CPU: CUDA when present, else 'meta'."""
    return t.to(OTHER_DEVICE) if OTHER_DEVICE == "cuda" else meta_like(t)


seeds = st.integers(0, 2**31 - 1)
float_dtypes = st.sampled_from(FLOATS)
layouts = st.sampled_from(LAYOUTS)


def spatial_shapes(max_dims: int = 3, max_size: int = 5):
    """Spatial shapes with 0..max_dims dims, sizes 0..max_size (0 and 1 favoured: empty and 1x1 images)."""
    size = st.sampled_from([0] + [1] * 2 + list(range(1, max_size + 1)) * 2)  # P(0) ~ 1/13 per dim
    return st.integers(0, max_dims).flatmap(lambda n: st.tuples(*([size] * n)))


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@dataclass
class Case:
    """One fuzz example: the call's arguments, what is wrong with it (None: valid) and the words a clear
    error must contain."""

    args: dict
    defect: Optional[str] = None
    words: List[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)


def classify(case: "Case", t: torch.Tensor) -> None:
    """Hypothesis statistics (--hypothesis-show-statistics): which defect, or valid with / without elements and
    with / without NaN / Inf."""
    if case.defect is not None:
        event("invalid: %s" % case.defect)
    else:
        event("valid: %s%s" % ("empty" if t.numel() == 0 else "non-empty",
                               " + non-finite" if case.info.get("nan") is not None else ""))


def grad_seeded(shape, dtype, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float64).to(dtype)


def has_inf(t: torch.Tensor) -> bool:
    return bool(torch.isinf(t.detach()).any())


def finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.detach().double()).all())


# ==== partial_cross_entropy / PartialCrossEntropyLoss ===============================================================

PCE_DEFECTS = ["int_logits", "float_target", "bool_target", "label_too_big", "label_negative", "weight_shape",
               "weight_dtype", "weight_device", "target_device", "target_shape", "reduction", "label_smoothing",
               "logits_1d", "k_zero"]


@st.composite
def pce_cases(draw, module: bool = False):
    defect = draw(st.one_of(st.none(), st.none(), st.sampled_from(PCE_DEFECTS)))
    B = draw(st.sampled_from([0, 1, 1, 2, 2, 3]))
    K = draw(st.one_of(st.just(1), st.integers(2, 6), st.sampled_from([64, 255, 256, 300])))
    spatial = draw(spatial_shapes(3, 2 if K > 6 else 5))
    dtype = draw(float_dtypes)
    layout = draw(layouts)
    seed = draw(seeds)
    scale = draw(st.sampled_from([1.0, 10.0]))
    tdtype = draw(st.sampled_from(INTS))
    ignore_index = draw(st.sampled_from([255, -100, 0]))
    void_frac = draw(st.sampled_from([0.0, 0.3, 0.9, 1.0]))
    reduction = draw(st.sampled_from(["none", "mean", "sum"]))
    label_smoothing = draw(st.sampled_from([0.0, 0.0, 0.1, 1.0]))
    with_weight = draw(st.booleans())
    nan = draw(st.sampled_from([None, None, None, float("nan"), float("inf"), float("-inf")]))
    words = []
    if defect == "k_zero":
        K = 0
        words = ["K", "class"]
    logits_shape = (B, K) + tuple(spatial)
    if defect == "logits_1d":
        logits_shape = (max(B, 1),)
        words = ["logits"]
    ldtype = dtype
    if defect == "int_logits":
        ldtype = draw(st.sampled_from([torch.int64, torch.int32]))
        words = ["logits"]
    logits = make_tensor(logits_shape, ldtype, layout, seed, scale, kind="int" if ldtype in INTS else "normal",
                         high=5)
    # labels: uniform in [0, K) (uint8 can hold only 0..255), a share void
    g = torch.Generator().manual_seed(seed + 7)
    tshape = (B,) + tuple(spatial)
    hi = max(1, min(K, 256 if tdtype == torch.uint8 else K))
    labels = torch.randint(0, hi, tshape, generator=g)
    void = torch.rand(tshape, generator=g) < void_frac
    if ignore_index != -100 or tdtype != torch.uint8:
        labels = torch.where(void, torch.full_like(labels, ignore_index), labels)
    elif tdtype == torch.uint8:  # ignore_index -100 cannot appear in uint8: no void pixels
        pass
    labelled_any = bool(((labels != ignore_index)).any())
    if defect in ("label_too_big", "label_negative") and numel(tshape) > 0:
        pos = int(torch.randint(0, numel(tshape), (1,), generator=g))
        bad = K if defect == "label_too_big" else -1
        if bad == ignore_index or (tdtype == torch.uint8 and not 0 <= bad <= 255) or (bad == 255 and ignore_index == 255):
            bad = -3 if tdtype != torch.uint8 else None
        if bad is not None and not (bad == -3 and tdtype == torch.uint8):
            labels.view(-1)[pos] = bad
            words = ["target"]
        else:
            defect = None
    elif defect in ("label_too_big", "label_negative"):
        defect = None
    target = relayout(labels.to(tdtype), draw(layouts))
    if defect == "float_target":
        target = labels.to(torch.float32)
        words = ["target"]
    elif defect == "bool_target":
        target = labels != 0
        words = ["target"]
    elif defect == "target_shape":
        target = target.reshape(-1) if len(tshape) != 1 else target.unsqueeze(-1).expand(*tshape, 2)
        words = ["target"]
    elif defect == "target_device":
        target = other_device(target)
        words = ["target"]
    weight = None
    if with_weight or defect in ("weight_shape", "weight_dtype", "weight_device"):
        weight = (torch.rand((K,), generator=g, dtype=torch.float64) + 0.1).to(dtype)
        if defect == "weight_shape":
            weight = weight.new_ones((K + 1,))
            words = ["weight"]
        elif defect == "weight_dtype":
            weight = weight.to(torch.float64 if dtype != torch.float64 else torch.float32)
            words = ["weight"]
            if module:  # the module casts its weight buffer to the logits' dtype: valid there
                defect = None
                words = []
        elif defect == "weight_device":
            weight = other_device(weight)
            words = ["weight"]
    if defect == "reduction":
        reduction = draw(st.sampled_from(["avg", "elementwise_mean", "", "MEAN"]))
        words = ["reduction"]
    if defect == "label_smoothing":
        label_smoothing = draw(st.sampled_from([-0.1, 1.5, float("nan")]))
        words = ["label_smoothing"]
    if nan is not None and defect is None:
        logits = poison(logits, seed + 3, nan, count=1 + seed % 3)
    return Case(
        dict(logits=logits, target=target, ignore_index=ignore_index, weight=weight, reduction=reduction,
             label_smoothing=label_smoothing),
        defect, words, dict(dtype=dtype, seed=seed, labelled_any=labelled_any, nan=nan, layout=layout),
    )


def _pce_call(case: Case, module: bool):
    a = case.args
    if module:
        crit = segops.nn.PartialCrossEntropyLoss(a["weight"], a["ignore_index"], a["reduction"], a["label_smoothing"])
        return lambda logits: crit(logits, a["target"])
    return lambda logits: ops.partial_cross_entropy(logits, a["target"], a["ignore_index"], a["weight"],
                                                    a["reduction"], a["label_smoothing"])


def _pce_reference(case: Case, logits64: torch.Tensor, reduction: Optional[str] = None) -> torch.Tensor:
    a = case.args
    w = a["weight"].double() if a["weight"] is not None else None
    return reference.partial_cross_entropy(logits64, a["target"].long(), a["ignore_index"], w,
                                           reduction or a["reduction"], a["label_smoothing"])


def check_pce(case: Case, module: bool) -> None:
    note("defect=%s info=%s shapes logits %s target %s" % (case.defect, case.info, tuple(case.args["logits"].shape),
                                                          tuple(case.args["target"].shape)))
    classify(case, case.args["logits"])
    if case.defect is not None:
        expect_error(lambda: _pce_call(case, module)(case.args["logits"]), case.words)
        return
    dtype = case.info["dtype"]
    logits = case.args["logits"].detach().requires_grad_(dtype.is_floating_point)
    with alarm():
        out = _pce_call(case, module)(logits)
    x64 = case.args["logits"].detach().double().requires_grad_(True)
    ref = _pce_reference(case, x64)
    assert out.dtype == dtype
    # scale: per labelled pixel |loss_i| + max_k |x_ik| (the log-sum-exp rounds relative to the largest logit),
    # weighted like the reduction
    with torch.no_grad():
        # magnitudes from the finite logits only: a -inf logit has p = 0 and adds nothing to the sums
        xf = torch.where(torch.isfinite(x64.detach()), x64.detach(), torch.zeros_like(x64.detach())).abs()
        per = _pce_reference(case, xf, "none").abs() if x64.numel() else x64.new_zeros(case.args["target"].shape)
        mag = xf.amax(1) if x64.shape[1] > 0 and x64.numel() else torch.zeros_like(per)
        lab = (case.args["target"].long() != case.args["ignore_index"]).double()
        w = case.args["weight"].double() if case.args["weight"] is not None else None
        pix = torch.nan_to_num((per + mag + 1) * lab, posinf=float("inf"))
        if case.args["reduction"] == "none":
            scale = 1 + pix
        else:
            wmax = float(w.max()) if w is not None and w.numel() else 1.0
            tot = float(pix.sum()) * wmax
            if case.args["reduction"] == "mean":
                den = float(((w[case.args["target"].long().clamp(0, x64.shape[1] - 1)] if w is not None
                              else torch.ones_like(lab)) * lab).sum())
                tot = tot / den if den > 0 else 0.0
            scale = 1 + tot
    assert_close_scaled(out, ref, scale, dtype, "partial_cross_entropy forward", has_inf(x64))
    if not finite(ref) or not finite(x64):
        return  # gradients of NaN / Inf losses are not compared (both are NaN-polluted by definition)
    gout = grad_seeded(out.shape, dtype, case.info["seed"])
    (gx,) = torch.autograd.grad(out, logits, gout, allow_unused=True)
    (gr,) = torch.autograd.grad(ref, x64, gout.double(), allow_unused=True)
    gr = torch.zeros_like(x64) if gr is None else gr
    gx = torch.zeros_like(logits) if gx is None else gx
    gscale = 1 + gr.abs() + (float(gout.double().abs().max()) if gout.numel() else 0.0) * (
        float(case.args["weight"].double().max()) if case.args["weight"] is not None and case.args["weight"].numel() else 1.0)
    assert_close_scaled(gx, gr, gscale, dtype, "partial_cross_entropy backward")


@fuzz_settings
@given(case=pce_cases())
def test_fuzz_partial_cross_entropy(case):
    check_pce(case, module=False)


@fuzz_settings
@given(case=pce_cases(module=True))
def test_fuzz_partial_cross_entropy_loss_module(case):
    check_pce(case, module=True)


# ==== entropy / EntropyLoss =========================================================================================

ENT_DEFECTS = ["int_logits", "mask_shape", "mask_device", "reduction", "logits_1d", "k_zero"]


@st.composite
def entropy_cases(draw):
    defect = draw(st.one_of(st.none(), st.none(), st.sampled_from(ENT_DEFECTS)))
    B = draw(st.sampled_from([0, 1, 1, 2, 2, 3]))
    K = draw(st.one_of(st.just(1), st.integers(2, 6), st.sampled_from([64, 255, 300])))
    spatial = draw(spatial_shapes(3, 2 if K > 6 else 5))
    dtype = draw(float_dtypes)
    layout = draw(layouts)
    seed = draw(seeds)
    scale = draw(st.sampled_from([1.0, 10.0]))
    reduction = draw(st.sampled_from(["none", "mean", "sum"]))
    mask_kind = draw(st.sampled_from([None, torch.bool, torch.uint8, torch.float32, torch.int64]))
    mask_frac = draw(st.sampled_from([0.0, 0.5, 1.0]))
    nan = draw(st.sampled_from([None, None, None, float("nan"), float("inf"), float("-inf")]))
    words: List[str] = []
    if defect == "k_zero":
        K = 0
        words = ["K", "class"]
    shape = (B, K) + tuple(spatial)
    if defect == "logits_1d":
        shape = (max(B, 1),)
        words = ["logits"]
    ldtype = dtype
    if defect == "int_logits":
        ldtype = torch.int64
        words = ["logits"]
    logits = make_tensor(shape, ldtype, layout, seed, scale, kind="int" if ldtype in INTS else "normal", high=5)
    mask = None
    g = torch.Generator().manual_seed(seed + 11)
    mshape = (B,) + tuple(spatial)
    if mask_kind is not None or defect in ("mask_shape", "mask_device"):
        m = torch.rand(mshape, generator=g) < mask_frac
        mask = relayout(m.to(mask_kind or torch.bool), draw(layouts))
        if defect == "mask_shape":
            mask = mask.reshape(-1) if len(mshape) != 1 else mask.unsqueeze(-1).expand(*mshape, 2)
            words = ["mask"]
        elif defect == "mask_device":
            mask = other_device(mask)
            words = ["mask"]
    if defect == "reduction":
        reduction = "avg"
        words = ["reduction"]
    if nan is not None and defect is None:
        logits = poison(logits, seed + 3, nan, count=1 + seed % 3)
    return Case(dict(logits=logits, mask=mask, reduction=reduction), defect, words,
                dict(dtype=dtype, seed=seed, nan=nan, layout=layout))


def entropy_reference64(logits64: torch.Tensor, mask: Optional[torch.Tensor], reduction: str) -> torch.Tensor:
    """Float64 entropy where masked-out pixels are exactly 0 even when their logits are NaN (segops never reads
    them, like partial_cross_entropy's unlabelled pixels; segops.reference multiplies by the mask, 0 * NaN = NaN),
    and a class with logit -inf contributes 0 log 0 = 0."""
    logp = F.log_softmax(logits64, dim=1)
    h = -(logp.exp() * logp.masked_fill(logp == float("-inf"), 0)).sum(1)  # 0 log 0 = 0 (logit -inf: p = 0)
    m = None if mask is None else (mask != 0)
    if m is not None:
        h = torch.where(m, h, torch.zeros_like(h))
    if reduction == "none":
        return h
    if reduction == "sum":
        return h.sum()
    count = int(m.sum()) if m is not None else h.numel()
    return h.sum() / count if count > 0 else h.sum() * 0


def check_entropy(case: Case, module: bool) -> None:
    a = case.args
    note("defect=%s info=%s shape %s mask %s" % (case.defect, case.info, tuple(a["logits"].shape),
                                                 None if a["mask"] is None else (tuple(a["mask"].shape), a["mask"].dtype)))

    def call(logits):
        if module:
            return segops.nn.EntropyLoss(a["reduction"])(logits, a["mask"])
        return ops.entropy(logits, a["mask"], a["reduction"])

    classify(case, a["logits"])
    if case.defect is not None:
        expect_error(lambda: call(a["logits"]), case.words)
        return
    dtype = case.info["dtype"]
    logits = a["logits"].detach().requires_grad_(True)
    with alarm():
        out = call(logits)
    assert out.dtype == dtype
    x64 = a["logits"].detach().double().requires_grad_(True)
    ref = entropy_reference64(x64, a["mask"], a["reduction"])
    if not torch.isnan(x64).any() and a["mask"] is None:  # the shipped twin agrees where it defines the result
        # both in float64 over <= 300 classes and a few dozen pixels: ~1e-14 relative, 1e-12 leaves margin
        torch.testing.assert_close(reference.entropy(x64.detach(), None, a["reduction"]), ref.detach(),
                                   rtol=1e-12, atol=1e-12, equal_nan=True)
    # scale: H_i <= log K plus the log-sum-exp rounding relative to max_k |x_ik|
    with torch.no_grad():
        K = x64.shape[1]
        xf = torch.where(torch.isfinite(x64), x64, torch.zeros_like(x64)).abs()  # -inf logits: p = 0, no term
        mag = (xf.amax(1) if x64.numel() else x64.new_zeros((x64.shape[0],) + x64.shape[2:])) + math.log(K) + 1
        if a["mask"] is not None:
            mag = mag * (a["mask"] != 0)
        mag = torch.nan_to_num(mag, nan=0.0)
        if a["reduction"] == "none":
            scale = mag
        else:
            cnt = int((a["mask"] != 0).sum()) if a["mask"] is not None else mag.numel()
            scale = 1 + float(mag.sum()) / (cnt if a["reduction"] == "mean" and cnt > 0 else 1)
    assert_close_scaled(out, ref, scale, dtype, "entropy forward", has_inf(x64))
    if not finite(ref) or not finite(x64):
        return
    gout = grad_seeded(out.shape, dtype, case.info["seed"])
    (gx,) = torch.autograd.grad(out, logits, gout, allow_unused=True)
    (gr,) = torch.autograd.grad(ref, x64, gout.double(), allow_unused=True)
    gr = torch.zeros_like(x64) if gr is None else gr
    gx = torch.zeros_like(logits) if gx is None else gx
    # dH/dx_k = -p_k (x_k - E_p[x]): |.| <= |x_k| + max |x|, times |g|
    gmax = float(gout.double().abs().max()) if gout.numel() else 0.0
    gscale = 1 + gr.abs() + gmax * 2 * (float(x64.detach().abs().max()) if x64.numel() else 0.0)
    assert_close_scaled(gx, gr, gscale, dtype, "entropy backward")


@fuzz_settings
@given(case=entropy_cases())
def test_fuzz_entropy(case):
    check_entropy(case, module=False)


@fuzz_settings
@given(case=entropy_cases())
def test_fuzz_entropy_loss_module(case):
    check_entropy(case, module=True)


# ==== permutohedral_filter ========================================================================================

FILTER_DEFECTS = ["int_values", "int_features", "d_zero", "d_17", "features_shape", "features_nan", "features_inf",
                  "features_device", "values_2d"]


def make_features(kind: str, B: int, d: int, spatial, dtype, layout, seed, spread: float) -> torch.Tensor:
    """Features (B, d, *spatial): random points, an image-like grid + colour, constant (all ties), or few
    distinct points repeated (duplicates)."""
    shape = (B, d) + tuple(spatial)
    if kind == "random":
        return make_tensor(shape, dtype, layout, seed, spread, kind="normal")
    g = torch.Generator().manual_seed(seed)
    n = numel(spatial)
    if kind == "constant":
        f = torch.full(shape, 0.37 * spread, dtype=torch.float64)
    elif kind == "duplicates":
        pts = torch.randn((B, d, 3), generator=g, dtype=torch.float64) * spread
        idx = torch.randint(0, 3, (n,), generator=g)
        f = pts[:, :, idx].reshape(shape)
    else:  # image-like: position / sigma on the first axes, blocky colour on the rest
        f = torch.zeros(shape, dtype=torch.float64)
        flat = f.view(B, d, n)
        pos = torch.arange(n, dtype=torch.float64)
        if d > 0:
            flat[:, 0] = pos / 3.0
        if d > 1:
            flat[:, 1:] = torch.floor(torch.rand((B, d - 1, 1), generator=g, dtype=torch.float64) * 4 + pos / 5) * spread
    t = f.to(dtype)
    if layout == "permuted" and t.dim() >= 2:
        t = t.permute(*range(t.dim() - 1, -1, -1)).contiguous().permute(*range(t.dim() - 1, -1, -1))
    return t


@st.composite
def filter_cases(draw):
    defect = draw(st.one_of(st.none(), st.none(), st.sampled_from(FILTER_DEFECTS)))
    B = draw(st.sampled_from([0, 1, 1, 1, 2, 2]))
    C = draw(st.sampled_from([0, 1, 1, 2, 2, 3, 5]))
    spatial = draw(st.one_of(st.tuples(st.sampled_from([0] + list(range(1, 13)))),
                             st.tuples(st.sampled_from([0, 1, 1, 2, 3, 4, 5, 6]), st.sampled_from([0, 1, 2, 3, 4, 5, 7]))))
    d = draw(st.one_of(st.integers(1, 5), st.sampled_from([8, 15, 16])))
    dtype = draw(float_dtypes)
    fdtype = draw(st.sampled_from([torch.float32, torch.float64, None]))  # None: same as values
    layout = draw(layouts)
    seed = draw(seeds)
    normalize = draw(st.booleans())
    fkind = draw(st.sampled_from(["random", "image", "constant", "duplicates"]))
    spread = draw(st.sampled_from([0.3, 1.0, 4.0]))
    nan = draw(st.sampled_from([None, None, None, float("nan"), float("inf")]))
    words: List[str] = []
    vshape = (B, C) + tuple(spatial)
    vdtype = dtype
    if defect == "int_values":
        vdtype = torch.int32
        words = ["values"]
    values = make_tensor(vshape, vdtype, layout, seed, 1.0, kind="int" if vdtype in INTS else "uniform", high=3)
    if defect == "d_zero":
        d = 0
        words = ["d", "features"]
    elif defect == "d_17":
        d = 17
        words = ["d", "features"]
    feats = make_features(fkind, B, d, spatial, fdtype or (dtype if dtype in (torch.float32, torch.float64) else torch.float32),
                          layout, seed + 5, spread)
    if defect == "int_features":
        feats = feats.round().to(torch.int64)
        words = ["features"]
    elif defect == "features_shape":
        feats = torch.zeros((B, d) + tuple(s + 1 for s in spatial))
        words = ["features"]
    elif defect in ("features_nan", "features_inf"):
        if B * numel(spatial) == 0 or C == 0:
            defect = None  # no point is filtered: nothing to complain about
            words = []
        else:
            feats = poison(feats, seed, float("nan") if defect == "features_nan" else float("-inf"))
            words = ["features", "finite", "nan", "inf"]
    elif defect == "features_device":
        feats = other_device(feats)
        words = ["features"]
    elif defect == "values_2d":
        values = values.reshape(B, C * numel(spatial))
        feats = feats.reshape(B, d * numel(spatial))
        words = ["values"]
    if nan is not None and defect is None:
        values = poison(values, seed + 1, nan)
    return Case(dict(values=values, features=feats, normalize=normalize), defect, words,
                dict(dtype=dtype, seed=seed, fkind=fkind, nan=nan, layout=layout, d=d))


def lattice_reference64(values: torch.Tensor, features: torch.Tensor, normalize: bool):
    """The reference lattice (segops.reference_lattice) built like the kernel's, in the kernel's lattice dtype
    (float64 for float64 values, else float32) so both make the same discrete choices; then splat / blur / slice
    in float64 on that lattice (its barycentric weights are exact in float64). Returns (W v, W |v|) per image as
    float64 (B, C, *spatial), differentiable in the float64 values it returns as the third element."""
    B, C = values.shape[:2]
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    d = features.shape[1]
    v64 = values.detach().double().requires_grad_(True)
    n = numel(values.shape[2:])
    outs, mags = [], []
    for b in range(B):
        f = features[b].reshape(d, n).t().to(acc)
        lat = rl.build_lattice(f)
        lat = lat._replace(bary=lat.bary.double())
        x = v64[b].reshape(C, n).t()
        outs.append(rl.lattice_filter(lat, x, normalize).t().reshape(values.shape[1:]))
        with torch.no_grad():
            ax = torch.nan_to_num(x.detach().abs(), nan=0.0, posinf=0.0)
            wx = rl.lattice_filter(lat, ax, False)
            if normalize:
                wx = wx / rl.lattice_filter(lat, torch.ones_like(ax[:, :1]), False)
            mags.append(wx.t().reshape(values.shape[1:]))
    if not outs:
        return v64 * 1, v64.detach().abs(), v64
    return torch.stack(outs), torch.stack(mags), v64


def check_filter(case: Case) -> None:
    a = case.args
    note("defect=%s info=%s values %s features %s" % (case.defect, case.info, tuple(a["values"].shape),
                                                     (tuple(a["features"].shape), a["features"].dtype)))
    classify(case, a["values"])
    if case.defect is not None:
        expect_error(lambda: ops.permutohedral_filter(a["values"], a["features"], a["normalize"]), case.words)
        return
    dtype = case.info["dtype"]
    values = a["values"].detach().requires_grad_(True)
    with alarm():
        out = ops.permutohedral_filter(values, a["features"], a["normalize"])
    assert out.dtype == dtype and out.shape == values.shape
    ref, mag, v64 = lattice_reference64(a["values"], a["features"], a["normalize"])
    # float rounding of a sum of non-negative weights times values: relative to W |v| (+1e-30 for empty rows)
    d = a["features"].shape[1]
    assert_close_scaled(out, ref, (mag + 1e-30) * (d + 1), dtype, "permutohedral_filter forward", has_inf(v64))
    if not finite(ref) or not finite(v64):
        return
    gout = grad_seeded(out.shape, dtype, case.info["seed"]).abs()  # non-negative: W^T |g| bounds the rounding
    (gv,) = torch.autograd.grad(out, values, gout, allow_unused=True)
    (gr,) = torch.autograd.grad(ref, v64, gout.double(), allow_unused=True)
    gr = torch.zeros_like(v64) if gr is None else gr
    gv = torch.zeros_like(values) if gv is None else gv
    gscale = (gr.abs() + 1e-30) * (d + 1) if not a["normalize"] else (gr.abs() + 1e-30) * (d + 1) + 1e-30
    if a["normalize"]:
        # W^T (g / W1): the division rounds too; scale by the unnormalised magnitude W^T g / min(W1)
        gscale = gscale * 4
    assert_close_scaled(gv, gr, gscale, dtype, "permutohedral_filter backward")


@fuzz_settings
@given(case=filter_cases())
def test_fuzz_permutohedral_filter(case):
    check_filter(case)


# ==== dense_crf_loss / normalized_cut_loss / DenseCRFLoss / NormalizedCutLoss =====================================

CRF_DEFECTS = ["images_3d", "segs_3d", "batch_mismatch", "size_mismatch", "channels_0", "channels_15", "int_segs",
               "rois_shape", "rois_device", "segs_device", "sigma_rgb", "sigma_xy", "scale_factor", "scale_empty",
               "images_nan"]


@st.composite
def crf_cases(draw):
    defect = draw(st.one_of(st.none(), st.none(), st.sampled_from(CRF_DEFECTS)))
    B = draw(st.sampled_from([0, 1, 1, 1, 2, 2]))
    K = draw(st.sampled_from([1, 2, 3, 5, 40]))
    H = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 8]))
    W = draw(st.sampled_from([0, 1, 2, 3, 5, 7, 9]))
    Ci = draw(st.sampled_from([1, 3, 3, 4, 14]))
    sdtype = draw(float_dtypes)
    idtype = draw(st.sampled_from([torch.float32, torch.float64, torch.uint8, torch.float16]))
    layout = draw(layouts)
    seed = draw(seeds)
    weight = draw(st.sampled_from([1.0, 1e-3, -0.5, 0.0]))
    sigma_rgb = draw(st.sampled_from([15.0, 3.0, 100.0]))
    sigma_xy = draw(st.sampled_from([80.0, 1.0, 5.0]))
    scale_factor = draw(st.sampled_from([1.0, 1.0, 0.5, 2.0, 0.75]))
    roi_kind = draw(st.sampled_from([None, torch.float32, torch.bool, torch.uint8]))
    nan = draw(st.sampled_from([None, None, None, float("nan"), float("inf")]))
    words: List[str] = []
    if defect == "scale_empty":
        scale_factor = 0.4
        H = draw(st.sampled_from([1, 2]))
        words = ["scale_factor"]
    if defect == "channels_0":
        Ci = 0
        words = ["images", "channels"]
    elif defect == "channels_15":
        Ci = 15
        words = ["images", "channels"]
    images = make_tensor((B, Ci, H, W), idtype, layout, seed, 255.0,
                         kind="int" if idtype == torch.uint8 else "uniform", high=256)
    segs = make_tensor((B, K, H, W), sdtype, layout, seed + 1, 1.0, kind="uniform")
    rois = None
    if roi_kind is not None or defect in ("rois_shape", "rois_device"):
        g = torch.Generator().manual_seed(seed + 2)
        rois = relayout((torch.rand((B, H, W), generator=g) < 0.6).to(roi_kind or torch.float32), draw(layouts))
    if defect == "images_3d":
        images = images[:, 0]
        words = ["images"]
    elif defect == "segs_3d":
        segs = segs[:, 0]
        words = ["segmentations"]
    elif defect == "batch_mismatch":
        segs = torch.cat([segs, segs[:1] if B else segs.new_zeros((1,) + segs.shape[1:])])
        words = ["images", "segmentations"]
    elif defect == "size_mismatch":
        segs = segs.new_zeros((B, K, H + 1, W))
        words = ["images", "segmentations"]
    elif defect == "int_segs":
        segs = (segs > 0.5).to(torch.int64)
        words = ["segmentations"]
    elif defect == "rois_shape":
        rois = rois.unsqueeze(1)
        words = ["rois"]
    elif defect == "rois_device":
        rois = other_device(rois)
        words = ["rois"]
    elif defect == "segs_device":
        segs = other_device(segs)
        words = ["segmentations"]
    elif defect == "sigma_rgb":
        sigma_rgb = draw(st.sampled_from([0.0, -1.0, float("inf"), float("nan")]))
        words = ["sigma_rgb"]
    elif defect == "sigma_xy":
        sigma_xy = draw(st.sampled_from([0.0, -2.0, float("inf"), float("nan")]))
        words = ["sigma_xy"]
    elif defect == "scale_factor":
        scale_factor = draw(st.sampled_from([0.0, -0.5, float("inf"), float("nan")]))
        words = ["scale_factor"]
    elif defect == "images_nan":
        if B * H * W == 0 or not images.is_floating_point():
            defect = None
        else:
            images = poison(images, seed, float("nan") if nan is None else nan)
            words = ["images"]
    if defect in (None, "scale_empty"):  # a resize to nothing is an error unless there is nothing to resize
        if B * K * H * W > 0 and scale_factor != 1 and min(math.floor(H * scale_factor), math.floor(W * scale_factor)) < 1:
            defect, words = "scale_empty", ["scale_factor"]
        elif defect == "scale_empty":
            defect, words = None, []
    if nan is not None and defect is None:
        segs = poison(segs, seed + 4, nan)
    return Case(dict(images=images, segmentations=segs, weight=weight, sigma_rgb=sigma_rgb, sigma_xy=sigma_xy,
                     scale_factor=scale_factor, rois=rois), defect, words,
                dict(dtype=sdtype, seed=seed, layout=layout, nan=nan))


def _lattice_filter_as(acc: torch.dtype) -> Callable:
    """A filter for segops.reference_lattice's losses: lattice built in `acc` (the kernel's choice for the
    segmentations' dtype), splat / blur / slice in float64 on it."""

    def filt(x: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        B, C = x.shape[:2]
        d = feats.shape[1]
        outs = []
        n = numel(x.shape[2:])
        for b in range(B):
            lat = rl.build_lattice(feats[b].reshape(d, n).t().to(acc))
            lat = lat._replace(bary=lat.bary.double())
            outs.append(rl.lattice_filter(lat, x[b].reshape(C, n).t().double()).t().reshape(x.shape[1:]))
        return torch.stack(outs) if outs else x * 1

    return filt


def check_crf(case: Case, which: str, module: bool) -> None:
    a = case.args
    note("defect=%s info=%s images %s segs %s rois %s scale %s" % (
        case.defect, case.info, (tuple(a["images"].shape), a["images"].dtype), tuple(a["segmentations"].shape),
        None if a["rois"] is None else (tuple(a["rois"].shape), a["rois"].dtype), a["scale_factor"]))
    fn = ops.dense_crf_loss if which == "crf" else ops.normalized_cut_loss
    cls = segops.nn.DenseCRFLoss if which == "crf" else segops.nn.NormalizedCutLoss

    def call(segs):
        if module:
            return cls(a["weight"], a["sigma_rgb"], a["sigma_xy"], a["scale_factor"])(a["images"], segs, a["rois"])
        return fn(a["images"], segs, a["weight"], a["sigma_rgb"], a["sigma_xy"], a["scale_factor"], a["rois"])

    classify(case, a["segmentations"])
    if case.defect is not None:
        expect_error(lambda: call(a["segmentations"]), case.words)
        return
    dtype = case.info["dtype"]
    segs = a["segmentations"].detach().requires_grad_(True)
    with alarm():
        out = call(segs)
    assert out.shape == ()
    s64 = a["segmentations"].detach().double().requires_grad_(True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rfn = rl.dense_crf_loss if which == "crf" else rl.normalized_cut_loss
    B = a["images"].shape[0]
    if B == 0 or s64.numel() == 0:
        ref = s64.sum() * 0
    else:
        ref = rfn(a["images"], s64, a["weight"], a["sigma_rgb"], a["sigma_xy"], a["scale_factor"], a["rois"],
                  filter=_lattice_filter_as(acc))
    d = 2 + a["images"].shape[1]
    with torch.no_grad():
        if which == "crf":
            # |loss| <= |w| / B * sum |X| W |X|; the rounding is relative to that sum (times d + 1 blur passes)
            mag = 0.0 if B == 0 or s64.numel() == 0 else float(rl.dense_crf_loss(
                a["images"], torch.nan_to_num(s64.detach().abs(), nan=0.0, posinf=0.0), 1.0, a["sigma_rgb"],
                a["sigma_xy"], a["scale_factor"], a["rois"], filter=_lattice_filter_as(acc)).abs())
            scale = 1e-30 + abs(a["weight"]) * mag * (d + 1)
        else:
            # every (b, k) term is cut / degree in [0, 1] up to a cancellation relative to 1
            scale = 1e-30 + abs(a["weight"]) * s64.shape[1] * (d + 1) * 4
    assert_close_scaled(out, ref, scale, dtype, "%s forward" % which, has_inf(s64))
    if not finite(ref) or not finite(s64):
        return
    (gs,) = torch.autograd.grad(out, segs, allow_unused=True)
    gs = torch.zeros_like(segs) if gs is None else gs
    if which == "crf":
        # the op's gradient is the ECCV'18 -(2 w / B) (W X) * roi (W taken as symmetric), not autograd of the
        # reference's <X, W X> ((W + W^T) X): compare against 2 W X on the reference lattice
        ref2 = ref if B == 0 or s64.numel() == 0 else rl.dense_crf_loss(
            a["images"], s64, a["weight"], a["sigma_rgb"], a["sigma_xy"], a["scale_factor"], a["rois"],
            filter=_symmetric_filter(acc))
        (gr,) = torch.autograd.grad(ref2, s64, allow_unused=True)
    else:
        (gr,) = torch.autograd.grad(ref, s64, allow_unused=True)
    gr = torch.zeros_like(s64) if gr is None else gr
    gscale = 1e-30 + (gr.abs() + abs(a["weight"]) / max(B, 1) * (1 if which == "crf" else 4 * s64.shape[1])) * (d + 1) * 4
    if which == "ncut":
        # d/dS (cut / degree) ~ |W 1| / degree: no simple elementwise bound; relative to the largest entry
        gscale = gscale + (gr.abs().max() if gr.numel() else 0.0) * (d + 1)
    assert_close_scaled(gs, gr, gscale, dtype, "%s backward" % which)


def _symmetric_filter(acc: torch.dtype) -> Callable:
    """x -> W x (reference lattice) whose backward is g -> W g instead of W^T g. In the reference loss
    c * sum(x * f(x)) autograd then gives c (W x + W x) = 2 c W x: the ECCV'18 gradient the op implements."""
    base = _lattice_filter_as(acc)

    class Sym(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, feats):
            ctx.feats = feats
            return base(x, feats)

        @staticmethod
        def backward(ctx, g):
            return base(g, ctx.feats), None

    return Sym.apply


@fuzz_settings
@given(case=crf_cases(), module=st.booleans())
def test_fuzz_dense_crf_loss(case, module):
    check_crf(case, "crf", module)


@fuzz_settings
@given(case=crf_cases(), module=st.booleans())
def test_fuzz_normalized_cut_loss(case, module):
    check_crf(case, "ncut", module)


# ==== atrous_conv2d / conv_transpose2d =============================================================================

CONV_DEFECTS = ["int_input", "weight_dtype", "weight_3d", "bias_shape", "bias_dtype", "weight_device", "bias_device",
                "stride_zero", "padding_negative", "dilation_zero", "groups_zero", "groups_mismatch",
                "output_padding", "stride_triple"]

# segops restrictions where torch returns a result, each a documented clear error (not a failure):
#   conv_transpose2d with an empty (0-sized) spatial input: torch returns a bias-only or empty map, segops
#   raises "input spatial size must be positive" or "the output size (0 x 0) would not be positive" (also
#   when B = 0 and the formula's output size is 0, where torch returns an empty tensor)
ALLOWED_STRICTER = {"conv_transpose2d": ["spatial size", "input", "output size"]}


@st.composite
def conv_cases(draw, transposed: bool):
    defect = draw(st.one_of(st.none(), st.none(), st.sampled_from(CONV_DEFECTS)))
    N = draw(st.sampled_from([0, 1, 1, 1, 2, 2]))
    depthwise = draw(st.booleans())
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    if depthwise:
        C = draw(st.integers(1, 4))
        groups, cin, cout = C, C, C
    else:
        cin = groups * draw(st.sampled_from([0, 1, 1, 2, 2, 3, 3]))
        cout = groups * draw(st.sampled_from([0, 1, 1, 2, 2, 3, 3]))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation)) if transposed else (0, 0)
    H, W = draw(st.sampled_from([0, 1, 1, 2, 3, 4, 6, 7])), draw(st.sampled_from([0, 1, 1, 2, 3, 5, 8]))
    has_bias = draw(st.booleans())
    dtype = draw(float_dtypes)
    layout = draw(layouts)
    wlayout = draw(layouts)
    seed = draw(seeds)
    nan = draw(st.sampled_from([None, None, None, float("nan"), float("inf")]))
    unbatched = draw(st.sampled_from([False, False, False, True]))
    words: List[str] = []
    wshape = (cin, cout // groups, kh, kw) if transposed else (cout, cin // groups, kh, kw)
    x = make_tensor((N, cin, H, W), dtype, layout, seed)
    w = make_tensor(wshape, dtype, wlayout, seed + 1, 0.5)
    b = make_tensor((cout,), dtype, "contiguous", seed + 2) if has_bias else None
    if unbatched and N == 1:
        x = x[0]
    if defect == "int_input":
        x = make_tensor(tuple(x.shape), torch.int64, layout, seed, kind="int", high=3)
        words = ["input", "float", "dtype"]
    elif defect == "weight_dtype":
        w = w.to(torch.float64 if dtype != torch.float64 else torch.float32)
        words = ["weight"]
    elif defect == "weight_3d":
        w = w[:, :, 0]
        words = ["weight"]
    elif defect == "bias_shape":
        b = torch.zeros((cout + 1,), dtype=dtype)
        words = ["bias"]
    elif defect == "bias_dtype":
        b = torch.zeros((cout,), dtype=torch.float64 if dtype != torch.float64 else torch.float32)
        words = ["bias"]
    elif defect == "weight_device":
        w = other_device(w)
        words = ["weight"]
    elif defect == "bias_device":
        b = other_device(torch.zeros((cout,), dtype=dtype))
        words = ["bias"]
    elif defect == "stride_zero":
        stride = (0, stride[1])
        words = ["stride"]
    elif defect == "padding_negative":
        padding = (padding[0], -1)
        words = ["padding"]
    elif defect == "dilation_zero":
        dilation = (dilation[0], 0)
        words = ["dilation"]
    elif defect == "groups_zero":
        groups = 0
        words = ["groups"]
    elif defect == "groups_mismatch":
        if cin == 0 or cout == 0:
            defect = None
        else:
            groups = groups * (cin + cout + 1)  # divides neither channel count
            words = ["groups", "divisible", "channels"]
    elif defect == "output_padding":
        if transposed:
            output_padding = (max(stride[0], dilation[0]), 0)
            words = ["output_padding"]
        else:
            defect = None
    elif defect == "stride_triple":
        stride = (1, 1, 1)
        words = ["stride"]
    if nan is not None and defect is None:
        if seed % 2:
            x = poison(x, seed + 3, nan)
        else:
            w = poison(w, seed + 3, nan)
    return Case(dict(input=x, weight=w, bias=b, stride=stride, padding=padding, dilation=dilation, groups=groups,
                     output_padding=output_padding), defect, words,
                dict(dtype=dtype, seed=seed, layout=layout, wlayout=wlayout, nan=nan, transposed=transposed))


def _conv(transposed: bool, lib: str):
    def run(a: dict, x, w, b):
        if lib == "segops":
            if transposed:
                return ops.conv_transpose2d(x, w, b, a["stride"], a["padding"], a["output_padding"], a["groups"],
                                            a["dilation"])
            return ops.atrous_conv2d(x, w, b, a["stride"], a["padding"], a["dilation"], a["groups"])
        if transposed:
            return F.conv_transpose2d(x, w, b, a["stride"], a["padding"], a["output_padding"], a["groups"],
                                      a["dilation"])
        return F.conv2d(x, w, b, a["stride"], a["padding"], a["dilation"], a["groups"])

    return run


def conv_geometry(a: dict, transposed: bool):
    """(H_out, W_out) by the documented formulas."""
    x, w = a["input"], a["weight"]
    out = []
    for i in range(2):
        size, k = x.shape[-2 + i], w.shape[2 + i]
        s, p, d = a["stride"][i], a["padding"][i], a["dilation"][i]
        if transposed:
            out.append((size - 1) * s - 2 * p + d * (k - 1) + a["output_padding"][i] + 1)
        else:
            out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return tuple(out)


def check_conv(case: Case) -> None:
    a = case.args
    transposed = case.info["transposed"]
    name = "conv_transpose2d" if transposed else "atrous_conv2d"
    note("%s defect=%s info=%s input %s weight %s bias %s stride %s padding %s dilation %s groups %s op %s" % (
        name, case.defect, case.info, tuple(a["input"].shape), tuple(a["weight"].shape),
        None if a["bias"] is None else tuple(a["bias"].shape), a["stride"], a["padding"], a["dilation"], a["groups"],
        a["output_padding"]))
    seg, tor = _conv(transposed, "segops"), _conv(transposed, "torch")
    classify(case, a["input"])
    if case.defect is not None:
        expect_error(lambda: seg(a, a["input"], a["weight"], a["bias"]), case.words)
        return
    dtype = case.info["dtype"]
    x64 = a["input"].detach().double().requires_grad_(True)
    w64 = a["weight"].detach().double().requires_grad_(True)
    b64 = a["bias"].detach().double().requires_grad_(True) if a["bias"] is not None else None
    try:
        ref = tor(a, x64, w64, b64)
    except (RuntimeError, IndexError) as e:  # geometry torch rejects (kernel larger than the padded input, ...)
        note("torch raises: %s" % e)
        xs, ws = a["input"].shape, a["weight"].shape
        cout = ws[1] * a["groups"] if transposed else ws[0]
        if xs[-1] == 0 or xs[-2] == 0 or xs[-3] == 0 or cout == 0:
            # torch refuses an empty image ("Only zero batch or zero channel inputs are supported") even when
            # padding makes the output non-empty, and weights with zero channels; segops may instead return
            # the defined result: every tap reads zero padding (or there is no input channel), so the output
            # is the bias (0 without one) at the formula's size
            try:
                out = seg(a, a["input"], a["weight"], a["bias"])
            except CLEAR_TYPES as e2:
                assert_clear(e2, ["input", "weight", "kernel", "output", "padding", "size", "channels"])
                return
            geo = conv_geometry(a, transposed)
            assert tuple(out.shape[-2:]) == geo and out.shape[-3] == cout, "%s: output shape %s, formula %s" % (
                name, tuple(out.shape), (cout,) + geo)
            want = torch.zeros_like(out) if a["bias"] is None else a["bias"].view(-1, 1, 1).expand_as(out)
            fin = torch.isfinite(out) if not finite(w64) else torch.ones_like(out, dtype=torch.bool)
            assert torch.equal(out[fin], want.to(out.dtype)[fin]), "%s of an empty image must be the bias" % name
            return
        expect_error(lambda: seg(a, a["input"], a["weight"], a["bias"]),
                     ["input", "weight", "kernel", "output", "padding", "size", "channels"])
        return
    ws = a["weight"].shape
    cout = ws[1] * a["groups"] if transposed else ws[0]
    want_shape = tuple(a["input"].shape[:-3]) + (cout,) + conv_geometry(a, transposed)
    if tuple(ref.shape) != want_shape:
        # torch's empty-input shortcut returns the input's shape for an input without elements
        # (F.conv2d(empty (1, 0, 1, 1), weight (1, 0, 1, 1)) -> (1, 0, 1, 1)): the formula's shape is right, and
        # the values are the empty sum over input channels: the bias (0 without one)
        note("torch returns shape %s, formula %s" % (tuple(ref.shape), want_shape))
        assert ref.numel() == 0
        out = seg(a, a["input"], a["weight"], a["bias"])
        assert tuple(out.shape) == want_shape
        want = torch.zeros_like(out) if a["bias"] is None else a["bias"].view(-1, 1, 1).expand_as(out)
        assert torch.equal(out, want.to(out.dtype))
        return
    x = a["input"].detach().requires_grad_(True)
    w = a["weight"].detach().requires_grad_(True)
    b = a["bias"].detach().requires_grad_(True) if a["bias"] is not None else None
    try:
        with alarm():
            out = seg(a, x, w, b)
    except CLEAR_TYPES as e:
        allowed = ALLOWED_STRICTER.get(name)
        if allowed and (x.shape[-1] == 0 or x.shape[-2] == 0 or min(want_shape[-2:]) <= 0) and any(
                word in str(e) for word in allowed):
            return
        raise
    assert out.dtype == dtype
    # scale: conv of the magnitudes (float64), + |bias|: every output is a sum of those terms
    with torch.no_grad():
        ax, aw = torch.nan_to_num(x64.detach().abs(), posinf=0.0), torch.nan_to_num(w64.detach().abs(), posinf=0.0)
        mag = tor(a, ax, aw, b64.detach().abs() if b64 is not None else None)
    if finite(x64) and finite(w64):
        assert_close_scaled(out, ref, mag + 1e-30, dtype, "%s forward" % name)
    else:
        # NaN / Inf: an output must be non-finite where a non-finite input reaches it through any tap, or a
        # non-finite weight tap lands on a real input pixel ("defined"). Whether a non-finite weight tap that
        # lands on zero *padding* also poisons an output is implementation-specific: im2col + GEMM (torch, and
        # segops' general path) multiplies the padding zeros (0 * NaN = NaN), segops' direct depthwise kernels
        # skip them. So: defined <= non-finite(out) <= defined | non-finite(torch). Values are compared where
        # both are finite.
        nf = lambda t: (~torch.isfinite(t)).double()
        defined = (tor(a, nf(x64.detach()), torch.ones_like(w64), None) > 0) | (
            tor(a, torch.ones_like(x64), nf(w64.detach()), None) > 0)
        got = ~torch.isfinite(out.detach().double())
        upper = defined | ~torch.isfinite(ref.detach())
        assert not bool((defined & ~got).any()), "%s: finite at %s where a non-finite input reaches" % (
            name, (defined & ~got).nonzero()[:5].tolist())
        assert not bool((got & ~upper).any()), "%s: non-finite at %s where neither definition nor torch is" % (
            name, (got & ~upper).nonzero()[:5].tolist())
        both = ~got & torch.isfinite(ref.detach())
        assert_close_scaled(out.detach().double()[both], ref.detach()[both], mag[both] + 1e-30, dtype,
                            "%s forward (finite part)" % name)
    if not finite(ref) or not finite(x64) or not finite(w64):
        return
    gout = grad_seeded(out.shape, dtype, case.info["seed"])
    inputs = [x, w] + ([b] if b is not None else [])
    inputs64 = [x64, w64] + ([b64] if b64 is not None else [])
    grads = torch.autograd.grad(out, inputs, gout, allow_unused=True)
    grads64 = torch.autograd.grad(ref, inputs64, gout.double(), allow_unused=True)
    # magnitudes of the gradient sums: the same products with |g|, |x|, |w|
    ax2, aw2 = ax.clone().requires_grad_(True), aw.clone().requires_grad_(True)
    mag2 = tor(a, ax2, aw2, None)
    gmag = torch.autograd.grad(mag2, [ax2, aw2], gout.double().abs(), allow_unused=True)
    gmag = [gm if gm is not None else torch.zeros_like(t) for gm, t in zip(gmag, [ax2, aw2])]
    gmag.append(torch.full((a["bias"].shape[0],) if b is not None else (0,), float(gout.double().abs().sum())))
    for what, g, gr, gm, t in zip(["grad_input", "grad_weight", "grad_bias"], grads, grads64, gmag, inputs):
        g = torch.zeros_like(t) if g is None else g
        gr = torch.zeros_like(t, dtype=torch.float64) if gr is None else gr
        assert g.dtype == dtype
        assert_close_scaled(g, gr, gm + 1e-30, dtype, "%s %s" % (name, what))


@fuzz_settings
@given(case=conv_cases(transposed=False))
def test_fuzz_atrous_conv2d(case):
    check_conv(case)


@fuzz_settings
@given(case=conv_cases(transposed=True))
def test_fuzz_conv_transpose2d(case):
    check_conv(case)


# ==== modules: AtrousConv2d / ConvTranspose2d / ASPP ==============================================================


@contextlib.contextmanager
def torch_forwards():
    """Inside: segops' conv modules run torch.nn's forward (same parameters): the modules' reference."""
    saved = segops.nn.AtrousConv2d.forward, segops.nn.ConvTranspose2d.forward
    segops.nn.AtrousConv2d.forward = nn.Conv2d.forward
    segops.nn.ConvTranspose2d.forward = nn.ConvTranspose2d.forward
    try:
        yield
    finally:
        segops.nn.AtrousConv2d.forward, segops.nn.ConvTranspose2d.forward = saved


def compare_module(mod: nn.Module, x: torch.Tensor, dtype: torch.dtype, seed: int, what: str, call=None) -> None:
    """mod(x) and its parameter / input gradients against the same module run with torch.nn's forwards in
    float64 (a deep copy). Scale: the same network on |x| with |parameters| (every conv output is a sum of those
    products; ReLU / BN in eval mode / sums keep the bound)."""
    import copy

    call = call or (lambda m, t: m(t))
    x = x.detach().requires_grad_(True)
    with alarm():
        out = call(mod, x)
    assert out.dtype == dtype
    ref_mod = copy.deepcopy(mod).double()
    x64 = x.detach().double().requires_grad_(True)
    with torch_forwards():
        ref = call(ref_mod, x64)
        abs_mod = copy.deepcopy(ref_mod)
        with torch.no_grad():
            for p in abs_mod.parameters():
                p.abs_()
            for name, buf in abs_mod.named_buffers():
                if name.endswith("running_var"):
                    buf.clamp_(min=1e-3)
        mag = call(abs_mod, x64.detach().abs()).abs()
    # eval-mode BN divides by sqrt(var + eps) >= sqrt(eps): bound its amplification by the largest factor
    amp = 1.0
    for m in ref_mod.modules():
        if isinstance(m, nn.BatchNorm2d):
            amp *= float((m.weight.detach().abs() / (m.running_var + m.eps).sqrt()).max()) if m.weight is not None else 1.0
            amp = max(amp, 1.0)
    assert_close_scaled(out, ref, (mag + 1e-30) * amp * 4, dtype, "%s forward" % what)
    if not finite(ref) or out.numel() == 0:
        return
    gout = grad_seeded(out.shape, dtype, seed)
    params = [p for p in mod.parameters() if p.requires_grad]
    params64 = [p for p in ref_mod.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [x] + params, gout, allow_unused=True)
    grads64 = torch.autograd.grad(ref, [x64] + params64, gout.double(), allow_unused=True)
    for i, (g, gr) in enumerate(zip(grads, grads64)):
        if gr is None:
            assert g is None or not bool(g.any()), "%s: gradient %d should be zero" % (what, i)
            continue
        assert g is not None, "%s: gradient %d missing" % (what, i)
        gscale = (gr.abs().max() + 1) * (mag.max() + 1) * amp * 4
        assert_close_scaled(g, gr, gscale, dtype, "%s grad %d" % (what, i))


@fuzz_settings
@given(seed=seeds, dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), layout=layouts,
       cin=st.integers(1, 4), cout=st.integers(1, 4), k=st.integers(1, 3), d=st.integers(1, 3), s=st.integers(1, 2),
       padding=st.sampled_from([0, 1, 2, "same", "valid"]), mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
       depthwise=st.booleans(), bias=st.booleans(), N=st.sampled_from([0, 1, 2]), H=st.integers(1, 7), W=st.integers(1, 7))
def test_fuzz_atrous_conv2d_module(seed, dtype, layout, cin, cout, k, d, s, padding, mode, depthwise, bias, N, H, W):
    groups = 1
    if depthwise:
        cout, groups = cin, cin
    if padding == "same":
        s = 1
    note("cin %d cout %d k %d d %d s %d padding %r mode %s groups %d N %d H %d W %d" % (cin, cout, k, d, s, padding,
                                                                                      mode, groups, N, H, W))
    torch.manual_seed(seed)
    mod = segops.nn.AtrousConv2d(cin, cout, k, stride=s, padding=padding, dilation=d, groups=groups, bias=bias,
                                 padding_mode=mode).to(dtype)
    x = make_tensor((N, cin, H, W), dtype, layout, seed)
    try:
        with torch_forwards():
            torch_out = mod.double()(x.double())
        mod = mod.to(dtype)
    except RuntimeError as e:  # torch rejects the geometry (e.g. reflect padding wider than the input)
        mod = mod.to(dtype)
        note("torch raises: %s" % e)
        expect_error(lambda: mod(x), ["input", "padding", "kernel", "size", "pad", "output"])
        return
    del torch_out
    compare_module(mod, x, dtype, seed, "AtrousConv2d")


@fuzz_settings
@given(seed=seeds, dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]), layout=layouts,
       cin=st.integers(1, 4), cout=st.integers(1, 4), s=st.integers(1, 3), k=st.integers(1, 4),
       p=st.integers(0, 2), d=st.integers(1, 2), init=st.sampled_from([None, "bilinear"]), trainable=st.booleans(),
       square=st.booleans(), depthwise=st.booleans(), bias=st.booleans(), N=st.sampled_from([0, 1, 2]),
       H=st.integers(1, 5), W=st.integers(1, 5), extra=st.integers(0, 2))
def test_fuzz_conv_transpose2d_module(seed, dtype, layout, cin, cout, s, k, p, d, init, trainable, square,
                                      depthwise, bias, N, H, W, extra):
    groups = 1
    if square or init == "bilinear":
        cout = cin
    if depthwise:
        cout, groups = cin, cin
    note("cin %d cout %d k %d s %d p %d d %d groups %d init %s trainable %s N %d H %d W %d extra %d" % (
        cin, cout, k, s, p, d, groups, init, trainable, N, H, W, extra))
    torch.manual_seed(seed)
    mod = segops.nn.ConvTranspose2d(cin, cout, k, stride=s, padding=p, groups=groups, bias=bias, dilation=d,
                                    init=init, trainable=trainable).to(dtype)
    if not trainable:
        mod.weight.requires_grad_(False)
    x = make_tensor((N, cin, H, W), dtype, layout, seed)
    # output_size: the default size plus `extra` rows / columns (< stride: nn.ConvTranspose2d's rule)
    ho = (H - 1) * s - 2 * p + d * (k - 1) + 1
    wo = (W - 1) * s - 2 * p + d * (k - 1) + 1
    room = s - 1
    size = [ho + min(extra, room), wo + min(extra, room)]
    if ho <= 0 or wo <= 0:
        expect_error(lambda: mod(x), ["output", "size", "input"])
        return
    compare_module(mod, x, dtype, seed, "ConvTranspose2d", call=lambda m, t: m(t, output_size=size))


@fuzz_settings
@given(seed=seeds, dtype=st.sampled_from([torch.float32, torch.float64]), layout=layouts,
       variant=st.sampled_from(["v2", "v3"]), cin=st.integers(1, 4), cout=st.integers(1, 3),
       rates=st.lists(st.integers(1, 4), min_size=1, max_size=3), hidden=st.sampled_from([None, 0, 3]),
       separable=st.booleans(), pooling=st.booleans(), N=st.sampled_from([0, 1, 2]), H=st.integers(1, 6),
       W=st.integers(1, 6), bad_channels=st.sampled_from([False, False, False, True]))
def test_fuzz_aspp(seed, dtype, layout, variant, cin, cout, rates, hidden, separable, pooling, N, H, W, bad_channels):
    note("variant %s cin %d cout %d rates %s hidden %s separable %s pooling %s N %d H %d W %d" % (
        variant, cin, cout, rates, hidden, separable, pooling, N, H, W))
    torch.manual_seed(seed)
    mod = segops.nn.ASPP(cin, cout, rates, variant, hidden_channels=hidden, separable=separable,
                         image_pooling=pooling).to(dtype).eval()
    # non-trivial eval-mode BN statistics
    with torch.no_grad():
        for m in mod.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = make_tensor((N, cin + (1 if bad_channels else 0), H, W), dtype, layout, seed)
    if bad_channels:
        expect_error(lambda: mod(x), ["input", "in_channels", "channels"])
        return
    out = mod(x)
    assert out.shape == (N, cout, H, W)
    compare_module(mod, x, dtype, seed, "ASPP")


@pytest.mark.parametrize("args", [
    ("PartialCrossEntropyLoss", dict(reduction="avg"), ["reduction"]),
    ("PartialCrossEntropyLoss", dict(label_smoothing=1.5), ["label_smoothing"]),
    ("PartialCrossEntropyLoss", dict(label_smoothing=float("nan")), ["label_smoothing"]),
    ("EntropyLoss", dict(reduction="batchmean"), ["reduction"]),
    ("DenseCRFLoss", dict(weight=1.0, sigma_rgb=0.0, sigma_xy=1.0), ["sigma_rgb"]),
    ("DenseCRFLoss", dict(weight=1.0, sigma_rgb=1.0, sigma_xy=float("inf")), ["sigma_xy"]),
    ("NormalizedCutLoss", dict(weight=1.0, sigma_rgb=1.0, sigma_xy=1.0, scale_factor=-1.0), ["scale_factor"]),
    ("NormalizedCutLoss", dict(weight=1.0, sigma_rgb=float("nan"), sigma_xy=1.0), ["sigma_rgb"]),
    ("ConvTranspose2d", dict(in_channels=2, out_channels=2, kernel_size=2, init="nearest"), ["init"]),
    ("ConvTranspose2d", dict(in_channels=2, out_channels=2, kernel_size=2, padding_mode="reflect"), ["padding_mode", "padding mode"]),
    ("AtrousConv2d", dict(in_channels=2, out_channels=3, kernel_size=3, groups=2), ["groups", "divisible"]),
    ("AtrousConv2d", dict(in_channels=2, out_channels=2, kernel_size=3, stride=2, padding="same"), ["padding", "same"]),
    ("ASPP", dict(in_channels=2, out_channels=2, variant="v4"), ["variant"]),
    ("ASPP", dict(in_channels=0, out_channels=2), ["in_channels"]),
    ("ASPP", dict(in_channels=2, out_channels=2, rates=[0, 6]), ["rates"]),
    ("ASPP", dict(in_channels=2, out_channels=2, dropout=1.0), ["dropout"]),
], ids=lambda a: a[0])
def test_fuzz_module_constructors(args):
    """Bad constructor arguments raise a clear error naming the argument."""
    name, kwargs, words = args
    expect_error(lambda: getattr(segops.nn, name)(**kwargs), words)


# ==== regression tests: one per bug the fuzzer found =================================================================


@pytest.mark.parametrize("call", [
    # bug 1: a 'meta' tensor among CPU arguments dispatched to the fake kernel, which returned an uninitialised
    # CPU tensor (garbage) instead of raising; the fake kernels now check devices (segops/ops/_checks.py)
    ("weight", lambda: ops.partial_cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long),
                                                 weight=torch.ones(3, device="meta"), reduction="none")),
    ("mask", lambda: ops.entropy(torch.zeros(2, 3, 4), torch.ones(2, 4, dtype=torch.bool, device="meta"), "none")),
    ("weight", lambda: ops.atrous_conv2d(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 1, 1, device="meta"))),
    ("bias", lambda: ops.atrous_conv2d(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 1, 1), torch.zeros(1, device="meta"))),
    ("weight", lambda: ops.conv_transpose2d(torch.zeros(1, 2, 3, 3), torch.zeros(2, 1, 1, 1, device="meta"))),
    ("bias", lambda: ops.conv_transpose2d(torch.zeros(1, 2, 3, 3), torch.zeros(2, 1, 1, 1), torch.zeros(1, device="meta"))),
    ("features", lambda: ops.permutohedral_filter(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3, device="meta"))),
], ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_regression_meta_device_mix_raises(call):
    word, fn = call
    expect_error(fn, [word])


@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (2, 3, 1, 1), (2, 4, 8, 8), (1, 3, 16)])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_regression_entropy_propagates_nan(shape, value):
    """bug 2: entropy clamped H = lse - E[x] at 0 with max(h, 0), which turns NaN into 0: all-NaN / Inf logits
    gave entropy 0 (per-pixel functor and the CPU's blocked NCHW path, both fixed). torch gives NaN."""
    x = torch.randn(shape)
    x[0, :] = value
    out = ops.entropy(x, reduction="none")
    ref = entropy_reference64(x.double(), None, "none")
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and bool(torch.isnan(out[0]).all())
    assert bool(torch.isnan(ops.entropy(x))) and bool(torch.isnan(ops.entropy(x, reduction="sum")))


def test_regression_reference_pce_no_labels_ignores_nan():
    """bug 3 (in the pure-PyTorch twin): 'mean' over a batch with no labelled pixel returned (logits * 0).sum(),
    which is NaN when an unlabelled logit is NaN; the op (which never reads unlabelled logits) returns 0."""
    x = torch.tensor([[float("nan"), 1.0]], requires_grad=True)
    t = torch.tensor([255])
    r = reference.partial_cross_entropy(x, t)
    assert float(r.detach()) == 0.0 and float(ops.partial_cross_entropy(x, t).detach()) == 0.0
    r.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("fn", [ops.dense_crf_loss, ops.normalized_cut_loss])
@pytest.mark.parametrize("scale_factor", [1.0, 0.5])
def test_regression_crf_nan_images_named(fn, scale_factor):
    """bug 4: NaN / Inf in the images of the CRF losses raised "permutohedral_filter: features contain NaN or
    Inf" (an argument the caller never passed), or, with scale_factor 0.5, nothing at all when the nearest
    resize happened to drop the NaN pixel. Now always RuntimeError naming the images."""
    images = torch.rand(1, 3, 2, 2) * 255
    images[0, 1, 1, 1] = float("nan")
    expect_error(lambda: fn(images, torch.rand(1, 2, 2, 2), 1.0, 15.0, 80.0, scale_factor), ["images"])


@pytest.mark.parametrize("fn", [ops.dense_crf_loss, ops.normalized_cut_loss])
def test_regression_crf_empty_and_tiny_resize(fn):
    """bug 5: with scale_factor != 1, an empty batch / image failed inside F.interpolate ("Input and output sizes
    should be greater than 0"; the unscaled call returns 0), and a resize to nothing (1x1 image, scale 0.5)
    failed there too without naming scale_factor. Now: empty input -> 0 with a zero gradient; resize to
    nothing -> ValueError naming scale_factor."""
    for shape in [(0, 3, 4, 4), (1, 3, 0, 4)]:
        segs = torch.rand(shape[0], 2, *shape[2:], requires_grad=True)
        out = fn(torch.rand(shape) * 255, segs, 1.0, 15.0, 80.0, 0.5)
        assert float(out.detach()) == 0.0
        out.backward()
    expect_error(lambda: fn(torch.rand(1, 3, 1, 1), torch.rand(1, 2, 1, 1), 1.0, 15.0, 80.0, 0.5), ["scale_factor"])


@pytest.mark.parametrize("fn", [ops.dense_crf_loss, ops.normalized_cut_loss])
def test_regression_crf_rois_device(fn):
    """bug 6: rois on another device than the segmentations failed with torch's "Tensor on device meta is not
    on the expected device cpu!" (no argument named); now ValueError naming rois."""
    expect_error(lambda: fn(torch.rand(1, 3, 2, 2), torch.rand(1, 2, 2, 2), 1.0, 15.0, 80.0, 1.0,
                            other_device(torch.ones(1, 2, 2))), ["rois"])


@pytest.mark.parametrize("shape", [(3, 5), (1, 5, 3), (2, 5, 8, 8)])  # per-pixel functors; (2, 5, 8, 8): CPU block path
def test_regression_neg_inf_logits(shape):
    """bug 7: a logit of -inf (a class masked out, p = 0) made the streaming log-sum-exp NaN when it came first
    (t = -inf * 0) or after another -inf (exp(-inf - -inf)): partial_cross_entropy was NaN where
    F.cross_entropy is finite, and entropy was NaN (torch too, by 0 * log 0; the defined value is finite: 0 log 0
    = 0, now also in segops.reference.entropy). Fixed in OnlineLse and the blocked CPU path."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x[:, 0] = float("-inf")
    x[:, 1] = float("-inf")
    t = torch.randint(2, 5, (shape[0],) + shape[2:], generator=g)
    for dtype in (torch.float32, torch.float64):
        xs = x.to(dtype).requires_grad_(True)
        x64 = x.clone().requires_grad_(True)
        for name, out, ref in [
            ("pce", ops.partial_cross_entropy(xs, t), F.cross_entropy(x64, t)),
            ("pce smoothing", ops.partial_cross_entropy(xs, t, label_smoothing=0.1, reduction="sum"),
             F.cross_entropy(x64, t, label_smoothing=0.1, reduction="sum")),
            ("entropy", ops.entropy(xs), entropy_reference64(x64, None, "mean")),
        ]:
            if name == "pce smoothing":  # -(sum_k log p_k) is +inf for a p_k = 0, in torch and segops alike
                assert out.item() == ref.item() == float("inf"), name
                continue
            assert finite(out) and finite(ref), name
            (gx,) = torch.autograd.grad(out, xs)
            (gr,) = torch.autograd.grad(ref, x64)
            assert finite(gx), name
            # K = 5 classes and <= 128 pixels: float32 rounding ~ (K + log-sum-exp) * eps32 ~ 1e-6 relative per
            # pixel, mean of <= 128 of them, so 1e-5; float64 the same with eps64: 1e-10 leaves 1e4x margin.
            tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(out.double(), ref.detach(), **tol)
            torch.testing.assert_close(gx.double(), gr, **tol)


@pytest.mark.parametrize("vshape", [(1, 0, 5), (1, 2, 0), (2, 0, 3, 0)])
def test_regression_reference_lattice_empty(vshape):
    """bug 8 (in the pure-PyTorch twin): segops.reference_lattice.permutohedral_filter failed on C = 0
    (reshape(C, -1) is ambiguous) and build_lattice on N = 0 points (amin of an empty tensor); the op returns an
    empty result. Both now agree."""
    values = torch.rand(vshape)
    feats = torch.rand((vshape[0], 3) + vshape[2:])
    out = ops.permutohedral_filter(values, feats)
    ref = rl.permutohedral_filter(values, feats)
    assert out.shape == ref.shape == values.shape
