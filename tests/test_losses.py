"""Fused partial cross-entropy and entropy: against segops.reference / F.cross_entropy, autograd, errors."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import segops
from segops import reference
from segops.ops import entropy, partial_cross_entropy

from conftest import DEVICES

REDUCTIONS = ["none", "mean", "sum"]

# float32 results are compared at a few ulps of the loss magnitude; half / bfloat16 inputs accumulate in
# float32 here, but the reference rounds log_softmax to the input dtype, so they get the dtype's epsilon.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def make_case(B, K, spatial, labelled, dtype, device, seed, target_dtype=torch.int64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn((B, K) + tuple(spatial), generator=g, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, K, (B,) + tuple(spatial), generator=g)
    keep = torch.rand((B,) + tuple(spatial), generator=g) < labelled
    target = torch.where(keep, target, torch.full_like(target, 255)).to(target_dtype)
    return logits.to(device), target.to(device)


def ref_ce(logits, target, **kw):
    """F.cross_entropy in float64 on the rounded inputs (the exact value the op approximates)."""
    return reference.partial_cross_entropy(logits.double(), target, **kw)


# ---- partial cross-entropy ---------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_pce_matches_f_cross_entropy(device, reduction, label_smoothing, weighted):
    logits, target = make_case(2, 5, (7, 9), 0.4, torch.float32, device, seed=1)
    weight = torch.rand(5, generator=torch.Generator().manual_seed(2)).to(device) if weighted else None
    x = logits.clone().requires_grad_()
    y = logits.clone().requires_grad_()
    ours = partial_cross_entropy(x, target, 255, weight, reduction, label_smoothing)
    theirs = F.cross_entropy(y, target, weight=weight, ignore_index=255, reduction=reduction, label_smoothing=label_smoothing)
    # float32 on both sides, different summation orders: the K = 5 term log-sum-exp and the mean over ~25 labelled
    # pixels round to a few ulp (6e-8 relative each) of a loss ~2; rtol 1e-5 leaves ~100x headroom
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    go = torch.randn_like(ours)
    (ours * go).sum().backward()
    (theirs * go).sum().backward()
    # float32 vs float32 with different rounding: a few ulp at |grad| ~ 1 (the float64 test is tighter)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)


@given(
    B=st.integers(1, 3),
    K=st.sampled_from([1, 2, 3, 21, 64, 300]),
    spatial=st.lists(st.integers(1, 7), min_size=0, max_size=3),
    labelled=st.sampled_from([0.0, 0.03, 0.5, 1.0]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
    target_dtype=st.sampled_from([torch.int64, torch.uint8]),
    reduction=st.sampled_from(REDUCTIONS),
    label_smoothing=st.sampled_from([0.0, 0.1]),
    weighted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_pce_property_vs_reference(B, K, spatial, labelled, dtype, target_dtype, reduction, label_smoothing, weighted, seed):
    if K > 255 and target_dtype == torch.uint8:
        target_dtype = torch.int64  # uint8 cannot hold these labels
    for device in DEVICES:
        logits, target = make_case(B, K, spatial, labelled, dtype, device, seed, target_dtype)
        weight = (torch.rand(K, generator=torch.Generator().manual_seed(seed)) + 0.1).to(dtype).to(device) if weighted else None
        x = logits.clone().requires_grad_()
        out = partial_cross_entropy(x, target, 255, weight, reduction, label_smoothing)
        assert out.dtype == dtype
        xr = logits.double().clone().requires_grad_()
        ref = ref_ce(xr, target.long(), weight=None if weight is None else weight.double(),
                     reduction=reduction, label_smoothing=label_smoothing)
        # TOL (top of file): accumulation in float32 (float64 for float64) over K <= 300 classes and <= 1029 pixels
        torch.testing.assert_close(out.double(), ref, **TOL[dtype])
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
        (out.double() * go.to(device)).sum().backward()
        (ref * go.to(device)).sum().backward()
        # per element: one exp and a few products, rounded to the input dtype (TOL)
        torch.testing.assert_close(x.grad.double(), xr.grad, **TOL[dtype])
        assert torch.isfinite(x.grad).all()


def test_pce_gradcheck(device):
    logits, target = make_case(2, 4, (3, 5), 0.5, torch.float64, device, seed=3)
    weight = torch.tensor([0.5, 1.0, 2.0, 0.1], dtype=torch.float64, device=device)
    for reduction in REDUCTIONS:
        for ls in (0.0, 0.3):
            for w in (None, weight):
                fn = lambda x: partial_cross_entropy(x, target, 255, w, reduction, ls)  # noqa: E731
                assert torch.autograd.gradcheck(fn, (logits.clone().requires_grad_(),))


def test_pce_opcheck(device):
    logits, target = make_case(2, 5, (4, 6), 0.5, torch.float32, device, seed=4)
    weight = torch.rand(5, device=device)
    for reduction in (0, 1, 2):
        for w in (None, weight):
            args = (logits.clone().requires_grad_(), target, w, reduction, 255, 0.1)
            torch.library.opcheck(torch.ops.segops.partial_cross_entropy.default, args)
    lse = torch.randn(2 * 24, device=device)
    grad = torch.randn(2, 4, 6, device=device)
    torch.library.opcheck(
        torch.ops.segops._partial_cross_entropy_backward.default,
        (grad, logits, target, None, lse, torch.ones(1, device=device), 0, 255, 0.0),
    )


def test_pce_all_ignored_gives_zero_and_zero_grad(device):
    logits, _ = make_case(2, 3, (4, 4), 0.0, torch.float32, device, seed=5)
    target = torch.full((2, 4, 4), 255, dtype=torch.long, device=device)
    x = logits.clone().requires_grad_()
    loss = partial_cross_entropy(x, target)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(x.grad) == 0
    assert torch.isnan(F.cross_entropy(logits, target, ignore_index=255))  # what we improve on


def test_pce_ignored_pixels_are_not_read(device):
    logits, target = make_case(1, 4, (5, 5), 0.3, torch.float32, device, seed=6)
    poisoned = logits.clone()
    poisoned[:, :, :][(target == 255).unsqueeze(1).expand_as(poisoned)] = float("nan")
    # the labelled pixels' values are the same and each pixel is computed on its own: equal, NaN-free results
    torch.testing.assert_close(partial_cross_entropy(poisoned, target), partial_cross_entropy(logits, target))


def test_pce_per_pixel_constant_invariance(device):
    logits, target = make_case(2, 6, (5, 7), 0.5, torch.float64, device, seed=7)
    shift = torch.randn(2, 1, 5, 7, dtype=torch.float64, device=device) * 100
    for reduction in REDUCTIONS:
        # float64: logits shifted by up to ~400 round at ulp(400) ~ 6e-14 in each of K = 6 terms; 1e-9 is far above
        torch.testing.assert_close(
            partial_cross_entropy(logits + shift, target, reduction=reduction),
            partial_cross_entropy(logits, target, reduction=reduction),
            rtol=1e-9, atol=1e-9,
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pce_extreme_logits_finite(device, dtype):
    logits, target = make_case(2, 5, (4, 4), 0.7, torch.float32, device, seed=8)
    logits = torch.sign(logits) * 1e4
    x = logits.to(dtype).requires_grad_()
    loss = partial_cross_entropy(x, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    # the loss (~1e4 here) is returned in the input dtype: compare at that dtype's resolution
    torch.testing.assert_close(loss.double(), ref_ce(logits.to(dtype), target), **TOL[dtype])


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed", "2d"])
def test_pce_strided_inputs(device, layout):
    logits, target = make_case(2, 5, (6, 8), 0.5, torch.float32, device, seed=9)
    if layout == "channels_last":
        x = logits.to(memory_format=torch.channels_last)
        t = target
    elif layout == "sliced":
        x = logits[:, :, 1:5, ::2]
        t = target[:, 1:5, ::2]
    elif layout == "transposed":
        x = logits.transpose(2, 3)
        t = target.transpose(1, 2)
    else:
        x = logits.permute(0, 2, 3, 1).reshape(-1, 5)
        t = target.reshape(-1)
    x = x.detach().requires_grad_()
    y = x.detach().contiguous().requires_grad_()
    for red in REDUCTIONS:
        a = partial_cross_entropy(x, t, reduction=red)
        b = F.cross_entropy(y, t, ignore_index=255, reduction=red)
        # float32, K = 5, <= 48 pixels: a few ulp of a loss ~2 either way (as in test_pce_matches_f_cross_entropy)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    a.sum().backward()
    b.sum().backward()
    # float32 defaults (rtol 1.3e-6, atol 1e-5): gradients p_k - [k = t] in [-1, 1] from one exp each
    torch.testing.assert_close(x.grad, y.grad)
    if layout == "channels_last":
        assert x.grad.is_contiguous(memory_format=torch.channels_last)


def test_pce_torch_compile_fullgraph(device):
    logits, target = make_case(2, 5, (6, 6), 0.5, torch.float32, device, seed=10)
    fn = torch.compile(lambda x, t: partial_cross_entropy(x, t) + 0.1 * entropy(x), fullgraph=True, backend="aot_eager")
    x = logits.clone().requires_grad_()
    y = logits.clone().requires_grad_()
    out = fn(x, target)
    ref = partial_cross_entropy(y, target) + 0.1 * entropy(y)
    # the compiled graph runs the same kernels on the same float32 inputs: equal up to the final add's rounding,
    # far inside the float32 defaults (rtol 1.3e-6, atol 1e-5)
    torch.testing.assert_close(out, ref)
    out.backward()
    ref.backward()
    torch.testing.assert_close(x.grad, y.grad)  # same kernels: as above


def test_pce_module(device):
    logits, target = make_case(2, 4, (5, 5), 0.5, torch.float32, device, seed=11)
    w = torch.tensor([1.0, 2.0, 0.5, 1.0])
    crit = segops.nn.PartialCrossEntropyLoss(weight=w, label_smoothing=0.1).to(device)
    assert "weight" in crit.state_dict()
    # float32 vs F.cross_entropy, K = 4, ~13 labelled pixels: a few ulp of a loss ~1.5 (defaults: atol 1e-5)
    torch.testing.assert_close(
        crit(logits, target),
        F.cross_entropy(logits, target, weight=w.to(device), ignore_index=255, label_smoothing=0.1),
    )
    with pytest.raises(ValueError, match="reduction"):
        segops.nn.PartialCrossEntropyLoss(reduction="avg")


def _bad_pce_cases(device):
    x = torch.randn(2, 3, 4, 4, device=device)
    t = torch.zeros(2, 4, 4, dtype=torch.long, device=device)
    bad_label = t.clone()
    bad_label[1, 2, 3] = 7
    neg_label = t.clone()
    neg_label[0, 0, 0] = -1
    return [
        # check_labels: CUDA's synchronous label check (its default is a device-side assertion); the CPU always checks
        ("label outside", dict(logits=x, target=bad_label, check_labels=True), IndexError,
         r"target value 7 .*outside \[0, K\) = \[0, 3\)"),
        ("negative label", dict(logits=x, target=neg_label, check_labels=True), IndexError, r"target value -1"),
        ("shape mismatch", dict(logits=x, target=t[:, :3]), RuntimeError, r"target must have shape"),
        ("float target", dict(logits=x, target=t.float()), RuntimeError, r"target must hold integer class indices"),
        ("int logits", dict(logits=x.long(), target=t), RuntimeError, r"logits must be float32"),
        ("no classes", dict(logits=x[:, :0], target=t), RuntimeError, r"at least one class"),
        ("1-d logits", dict(logits=x.flatten(), target=t), RuntimeError, r"logits must have shape \(B, K\)"),
        ("weight shape", dict(logits=x, target=t, weight=torch.ones(4, device=device)), RuntimeError, r"weight must have shape \(K,\)"),
        ("weight dtype", dict(logits=x, target=t, weight=torch.ones(3, device=device, dtype=torch.float64)), RuntimeError, r"weight dtype"),
        ("reduction", dict(logits=x, target=t, reduction="avg"), ValueError, r"reduction must be one of"),
        ("smoothing", dict(logits=x, target=t, label_smoothing=1.5), RuntimeError, r"label_smoothing must be in \[0, 1\]"),
    ]


@pytest.mark.parametrize("case", range(11))
def test_pce_bad_input(device, case):
    name, kwargs, exc, msg = _bad_pce_cases(device)[case]
    with pytest.raises(exc, match=msg):
        partial_cross_entropy(**kwargs)


def test_pce_device_mismatch_message():
    x = torch.randn(1, 3, 2, 2, device="meta")
    t = torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(RuntimeError, match="target is on cpu but logits are on meta"):
        partial_cross_entropy(x, t)


@pytest.mark.cuda
def test_pce_cpu_cuda_mix_message():
    x = torch.randn(1, 3, 2, 2, device="cuda")
    t = torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(RuntimeError, match="target is on cpu but logits are on cuda"):
        partial_cross_entropy(x, t)


def test_pce_empty_batch(device):
    x = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
    t = torch.zeros(0, 4, 4, dtype=torch.long, device=device)
    assert partial_cross_entropy(x, t).item() == 0.0
    assert partial_cross_entropy(x, t, reduction="none").shape == (0, 4, 4)
    partial_cross_entropy(x, t, reduction="sum").backward()
    assert x.grad.shape == x.shape


# ---- entropy -----------------------------------------------------------------------------------------------


@given(
    B=st.integers(1, 3),
    K=st.sampled_from([1, 2, 5, 21, 300]),
    spatial=st.lists(st.integers(1, 6), min_size=0, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
    reduction=st.sampled_from(REDUCTIONS),
    masked=st.sampled_from([None, 0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_entropy_property_vs_reference(B, K, spatial, dtype, reduction, masked, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (B, K) + tuple(spatial)
    base = torch.randn(shape, generator=g, dtype=torch.float64) * 4
    mask = None if masked is None else torch.rand((B,) + tuple(spatial), generator=g) < masked
    for device in DEVICES:
        logits = base.to(dtype).to(device)
        m = None if mask is None else mask.to(device)
        x = logits.clone().requires_grad_()
        out = entropy(x, m, reduction)
        xr = logits.double().clone().requires_grad_()
        ref = reference.entropy(xr, m, reduction)
        # TOL (top of file): float32 accumulation over K <= 300 classes, <= 648 pixels; inputs rounded to dtype
        torch.testing.assert_close(out.double(), ref, **TOL[dtype])
        go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device)
        (out.double() * go).sum().backward()
        (ref * go).sum().backward()
        # per element: one exp and two products, rounded to the input dtype (TOL)
        torch.testing.assert_close(x.grad.double(), xr.grad, **TOL[dtype])


def test_entropy_gradcheck_and_opcheck(device):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64).to(device)
    mask = (torch.rand(2, 3, 5, generator=g) < 0.6).to(device)
    for reduction in REDUCTIONS:
        for m in (None, mask):
            assert torch.autograd.gradcheck(lambda t: entropy(t, m, reduction), (x.clone().requires_grad_(),))
            torch.library.opcheck(
                torch.ops.segops.entropy.default, (x.float().clone().requires_grad_(), m, {"none": 0, "mean": 1, "sum": 2}[reduction])
            )


def test_entropy_invariance_and_bounds(device):
    g = torch.Generator().manual_seed(13)
    x = (torch.randn(2, 7, 5, 5, generator=g, dtype=torch.float64) * 5).to(device)
    h = entropy(x, reduction="none")
    # float64: H = lse - E[x] of logits near 1000 cancels ~1e3 in each term, leaving ulp(1e3) ~ 1e-13 errors
    torch.testing.assert_close(entropy(x + 1e3, reduction="none"), h, rtol=1e-8, atol=1e-8)
    # the maximum log 7 is reached only by uniform pixels; 1e-12 covers float64 rounding of lse - E
    assert (h >= 0).all() and (h <= torch.log(torch.tensor(7.0, dtype=torch.float64)) + 1e-12).all()
    uniform = torch.zeros(1, 7, 2, 2, device=device)
    # float32: lse of 7 zeros is log 7 up to an ulp, E[x] = 0 exactly (defaults: rtol 1.3e-6)
    torch.testing.assert_close(entropy(uniform), torch.log(torch.tensor(7.0)).to(device))
    onehot = torch.full((1, 7, 2, 2), -1e4, device=device)
    onehot[:, 3] = 1e4
    hx = onehot.clone().requires_grad_()
    val = entropy(hx)
    val.backward()
    assert val.item() == 0.0 and torch.isfinite(hx.grad).all()


def test_entropy_mask_zero_pixels_and_empty(device):
    x = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool, device=device)
    mask[0, 1, 1] = True
    entropy(x, mask).backward()
    nz = x.grad.abs().sum(1) != 0
    assert torch.equal(nz, mask)
    empty = torch.zeros_like(mask)
    y = x.detach().clone().requires_grad_()
    out = entropy(y, empty)
    out.backward()
    assert out.item() == 0.0 and torch.count_nonzero(y.grad) == 0
    # non-bool masks: nonzero = True; the same kernel on the same mask, so equal (any tolerance would do)
    torch.testing.assert_close(entropy(x, mask.float()), entropy(x, mask))


def test_entropy_module_and_errors(device):
    x = torch.randn(2, 3, 4, 4, device=device)
    # float32 vs the log_softmax reference, K = 3, mean of 32 pixels: a few ulp (defaults: rtol 1.3e-6, atol 1e-5)
    torch.testing.assert_close(segops.nn.EntropyLoss()(x), reference.entropy(x))
    with pytest.raises(RuntimeError, match="mask must have shape"):
        entropy(x, torch.ones(2, 4, 5, dtype=torch.bool, device=device))
    with pytest.raises(RuntimeError, match="logits must be float32"):
        entropy(x.long())
    with pytest.raises(RuntimeError, match="at least one class"):
        entropy(x[:, :0])
    with pytest.raises(ValueError, match="reduction"):
        entropy(x, reduction="avg")


# ---- CPU / CUDA parity -------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_parity(dtype, reduction):
    for seed, (B, K, H, W), frac in [(20, (2, 21, 33, 17), 0.03), (21, (1, 300, 9, 8), 1.0), (22, (3, 1, 5, 5), 0.5)]:
        logits, target = make_case(B, K, (H, W), frac, dtype, "cpu", seed)
        weight = torch.rand(K, generator=torch.Generator().manual_seed(seed)).to(dtype)
        mask = target != 255
        outs = {}
        for device in ("cpu", "cuda"):
            x = logits.detach().to(device).requires_grad_()
            a = partial_cross_entropy(x, target.to(device), 255, weight.to(device), reduction, 0.1)
            b = entropy(x, mask.to(device), reduction)
            ((a.float() * 1.3).sum() + b.float().sum()).backward()
            outs[device] = (a.detach().cpu(), b.detach().cpu(), x.grad.cpu())
        for c, g in zip(outs["cpu"], outs["cuda"]):
            # different exp implementations and reduction orders (CPU chunks vs CUDA blocks), float32 accumulation
            # over <= 1122 pixels x K <= 300: a few ulp per term, within the dtype's TOL
            torch.testing.assert_close(g, c, **TOL[dtype])


# K = 21: S = 9 x 13 = 117 pixels, a chunk of 117 pixels per image. K = 300: S = 9 x 29 = 261, a full chunk of
# 256 pixels and a tail of 5; at 20% labelled the full chunk is sparse with ~51 lanes, whose 300 x 51 logits
# exceed the 8192-float staging buffer, so the forward stages its lanes and the backward its classes in groups.
@pytest.mark.parametrize("K, spatial", [(21, (9, 13)), (300, (9, 29))])
@pytest.mark.parametrize("labelled", [1.0, 0.5, 0.2, 0.03])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_blocked_path_matches_per_pixel_path(K, spatial, labelled, dtype):
    """NCHW float inputs take the CPU's pixel-blocked path, channels_last the per-pixel functors."""
    logits, target = make_case(2, K, spatial, labelled, dtype, "cpu", seed=30)
    weight = (torch.rand(K, generator=torch.Generator().manual_seed(31)) + 0.5).to(dtype)
    mask = target != 255
    results = []
    for x in (logits.contiguous(), logits.to(memory_format=torch.channels_last)):
        x = x.detach().requires_grad_()
        a = partial_cross_entropy(x, target, 255, weight, "mean", 0.1)
        b = entropy(x, mask, "sum")
        (a + b).backward()
        results.append((a.detach(), b.detach(), x.grad.contiguous()))
    for blocked, per_pixel in zip(*results):
        # blocked: polynomial exp (~1 ulp) and two-pass max/sum; per-pixel: libm exp and online log-sum-exp; both
        # float32 over K <= 300 and <= 522 pixels, rounded to the dtype: within TOL
        torch.testing.assert_close(blocked, per_pixel, **TOL[dtype])


# Every case of the CPU paths that write outputs without a fill first: dense chunks (the gradient rows streamed
# out; non-temporal stores from 16 MiB on, here with rows that start unaligned: S = 317^2 is odd), sparse chunks
# (rows zeroed in place, the few labelled values stored), mixed batches, a short last chunk (S = 2145 = 8 x 256
# + 97), class-grouped staging (K = 300), bfloat16, and the per-pixel functors (channels_last).
_WRITTEN_CASES = [  # (B, K, spatial, labelled, dtype, layout)
    (2, 21, (33, 65), 0.03, torch.float32, None),
    (2, 21, (33, 65), 0.3, torch.float32, None),
    (2, 21, (33, 65), 1.0, torch.float32, None),
    (2, 21, (33, 65), 0.3, torch.bfloat16, None),
    (2, 21, (33, 65), 0.3, torch.float32, torch.channels_last),
    (1, 300, (9, 29), 0.2, torch.float32, None),
    (2, 21, (317, 317), 1.0, torch.float32, None),  # 16.9 MB gradient: non-temporal stores
]


def test_cpu_every_output_element_is_written():
    """Outputs come from torch.empty and are written once, zeros included: the per-pixel losses, the saved
    log-sum-exp (0 at unlabelled pixels) and every gradient element. Under MALLOC_PERTURB_ (the instruction-set
    subprocesses below) fresh memory holds garbage, so an element a kernel skipped shows up; in-process the same
    checks run on whatever memory the allocator hands out."""
    if os.environ.get("MALLOC_PERTURB_"):
        assert bool((torch.empty(4096) != 0).all()), "MALLOC_PERTURB_ set but fresh memory is zero"
    for B, K, spatial, labelled, dtype, layout in _WRITTEN_CASES:
        logits, target = make_case(B, K, spatial, labelled, dtype, "cpu", seed=35)
        if layout is not None:
            logits = logits.to(memory_format=layout)
        unlabelled = target == 255
        upstream = torch.rand(target.shape, generator=torch.Generator().manual_seed(36)).to(dtype)
        x = logits.detach().requires_grad_()
        loss = partial_cross_entropy(x, target, reduction="none")
        (loss * upstream).sum().backward()
        xr = logits.double().requires_grad_()
        ref = ref_ce(xr, target, reduction="none")
        (ref * upstream.double()).sum().backward()
        case = "%s %s %g%% %s" % ((B, K) + spatial, dtype, labelled * 100, layout)
        assert bool((loss[unlabelled] == 0).all()) and bool((x.grad.movedim(1, -1)[unlabelled] == 0).all()), case
        # TOL: float32 accumulation over K <= 300 classes per pixel (no reduction), rounded to the dtype
        torch.testing.assert_close(loss.double(), ref, **TOL[dtype], msg=case)
        torch.testing.assert_close(x.grad.double(), xr.grad, **TOL[dtype], msg=case)
        _, lse, _ = torch.ops.segops.partial_cross_entropy.default(logits, target, None, 1, 255, 0.0)
        lse = lse.reshape(target.shape)
        assert bool((lse[unlabelled] == 0).all()), case
        # float32 log-sum-exp of K <= 300 logits of magnitude ~10: a few ulp (TOL of float32)
        torch.testing.assert_close(lse[~unlabelled].double(), torch.logsumexp(logits.double(), 1)[~unlabelled],
                                   **TOL[torch.float32], msg=case)

        if logits.numel() > 10**6:
            continue  # entropy writes its gradient through the same row writer; its float64 reference is slow
        y = logits.detach().requires_grad_()
        h = entropy(y, ~unlabelled, "none")
        (h * upstream).sum().backward()
        yr = logits.double().requires_grad_()
        hr = reference.entropy(yr, ~unlabelled, "none")
        (hr * upstream.double()).sum().backward()
        assert bool((h[unlabelled] == 0).all()) and bool((y.grad.movedim(1, -1)[unlabelled] == 0).all()), case
        # TOL: float32 accumulation over K <= 300 classes per pixel, rounded to the dtype
        torch.testing.assert_close(h.double(), hr, **TOL[dtype], msg=case)
        torch.testing.assert_close(y.grad.double(), yr.grad, **TOL[dtype], msg=case)


# ---- one op each way, fixed-order reductions, label errors ----------------------------------------------------


def _profiled_ops(fn):
    """Names of the operator events fn() records on the CPU (allocations included)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if "::" in e.name and not e.name.startswith("autograd::")]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("op", ["pce", "entropy"])
def test_one_segops_op_each_way_and_nothing_else(op, reduction):
    """Forward and backward each run exactly one segops op, which only allocates its outputs: no ATen fill,
    reduction or copy around it (each would be a kernel launch on a GPU), and autograd materialises no zero
    gradients for the state outputs (lse, denominator)."""
    logits, target = make_case(2, 5, (8, 8), 0.4, torch.float32, "cpu", seed=40)
    weight = torch.rand(5, generator=torch.Generator().manual_seed(41))
    mask = target != 255
    x = logits.clone().requires_grad_()
    if op == "pce":
        names = ("segops::partial_cross_entropy", "segops::_partial_cross_entropy_backward")
        call = lambda: partial_cross_entropy(x, target, 255, weight, reduction, 0.1)  # noqa: E731
    else:
        names = ("segops::entropy", "segops::_entropy_backward")
        call = lambda: entropy(x, mask, reduction)  # noqa: E731
    upstream = torch.rand(call().shape, generator=torch.Generator().manual_seed(42))

    def step():
        torch.autograd.grad(call(), x, upstream)

    step()  # warm-up: first-call registrations stay out of the count
    seen = _profiled_ops(step)
    assert seen.count(names[0]) == 1 and seen.count(names[1]) == 1, seen
    others = [n for n in seen if n not in names and n not in ("aten::empty", "aten::empty_strided")]
    assert others == [], others


def _reduced_bits(threads: int):
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch.ops.segops._parallel_threads(64) == threads  # the extension's OpenMP honours the setting
        out = []
        # 2 x 21 x 67 x 129: 8643 pixels per image, i.e. chunks that do not divide the image; dense (100%), sparse
        # (3%) and mixed (30%) chunks; float32 (blocked path), channels_last and float64 (per-pixel path)
        for labelled, dtype, layout in [(1.0, torch.float32, None), (0.03, torch.float32, None),
                                        (0.3, torch.float32, None), (0.3, torch.float32, torch.channels_last),
                                        (0.3, torch.float64, None)]:
            logits, target = make_case(2, 21, (67, 129), labelled, dtype, "cpu", seed=43)
            if layout is not None:
                logits = logits.to(memory_format=layout)
            weight = (torch.rand(21, generator=torch.Generator().manual_seed(44)) + 0.5).to(dtype)
            for reduction in ("mean", "sum"):
                x = logits.clone().requires_grad_()
                a = partial_cross_entropy(x, target, 255, weight, reduction, 0.1)
                b = entropy(x, target != 255, reduction)
                (a + b).backward()
                out += [a.detach(), b.detach(), x.grad]
        return out
    finally:
        torch.set_num_threads(prev)


def test_reductions_are_bitwise_equal_for_any_thread_count():
    """The loss sums are reduced in a fixed order (per-chunk partials, fixed pairwise tree), never by thread:
    1 and 2 threads give the same bits."""
    one, two = _reduced_bits(1), _reduced_bits(2)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fill", [0, 255])  # the other pixels labelled (dense chunks) or not (sparse chunks)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # blocked loops / per-pixel functors
def test_out_of_range_label_names_the_first_bad_pixel(fill, dtype):
    x = torch.randn(2, 3, 4, 4, dtype=dtype)
    t = torch.full((2, 4, 4), fill, dtype=torch.long)
    t[1, 3, 3] = 9  # flat pixel 31
    t[1, 0, 2] = -4  # flat pixel 18: the lowest, whichever thread finds which
    for check in (None, False, True):  # the CPU always checks
        with pytest.raises(IndexError, match=r"target value -4 at flat pixel 18 \(batch 1, pixel 2\)"):
            partial_cross_entropy(x, t, check_labels=check)


def test_check_labels_env_var_sets_the_default():
    import subprocess
    import sys

    code = "import segops.ops.losses as l; print(l._CHECK_LABELS_DEFAULT)"
    for value, expected in (("1", "True"), ("0", "False"), ("", "False")):
        env = dict(os.environ, SEGOPS_CHECK_LABELS=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == expected, out.stderr


# ---- CUDA: no host synchronisation, label errors, determinism, graphs ----------------------------------------


def _cuda_cases():
    logits, target = make_case(2, 21, (33, 47), 0.03, torch.float32, "cpu", seed=50)
    weight = torch.rand(21, generator=torch.Generator().manual_seed(51))
    return logits.cuda(), target.cuda(), weight.cuda()


@pytest.mark.cuda
def test_cuda_calls_never_synchronise():
    logits, target, weight = _cuda_cases()
    x = logits.clone().requires_grad_()
    for reduction in REDUCTIONS:  # warm-up outside the check: first-call setup (occupancy query, slots)
        partial_cross_entropy(x, target, 255, weight, reduction, 0.1).sum().backward()
        entropy(x, target != 255, reduction).sum().backward()
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for reduction in REDUCTIONS:
            partial_cross_entropy(x, target, 255, weight, reduction, 0.1).sum().backward()
            partial_cross_entropy(x, target, reduction=reduction).sum().backward()
            entropy(x, target != 255, reduction).sum().backward()
            entropy(x, None, reduction).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    torch.cuda.synchronize()


@pytest.mark.cuda
@pytest.mark.parametrize("fill", [0, 255])  # dense warps (per-pixel functor) / sparse warps (warp-cooperative)
def test_cuda_check_labels_raises_like_the_cpu(fill):
    x = torch.randn(2, 3, 4, 4)
    t = torch.full((2, 4, 4), fill, dtype=torch.long)
    t[1, 3, 3] = 9
    t[1, 0, 2] = -4
    for device in ("cpu", "cuda"):
        with pytest.raises(IndexError, match=r"target value -4 at flat pixel 18 \(batch 1, pixel 2\)"):
            partial_cross_entropy(x.to(device), t.to(device), check_labels=True)


@pytest.mark.cuda
@pytest.mark.parametrize("K", [2, 21, 33, 300])
@pytest.mark.parametrize("labelled", [0.01, 0.03, 0.2, 1.0])
def test_cuda_warp_cooperative_path_parity(K, labelled):
    """CUDA takes warps with at most 8 labelled pixels together (lanes over classes; K = 33 and 300 need several
    rounds per lane) and the others pixel by pixel; 20% labelled mixes both. Against the CPU, forward and backward,
    weights and smoothing, contiguous and channels_last."""
    logits, target = make_case(2, K, (19, 37), labelled, torch.float32, "cpu", seed=60 + K)
    weight = torch.rand(K, generator=torch.Generator().manual_seed(61)) + 0.5
    for layout in (torch.contiguous_format, torch.channels_last):
        for reduction, ls, w in (("mean", 0.1, weight), ("none", 0.0, None), ("sum", 0.0, weight)):
            outs = []
            for device in ("cpu", "cuda"):
                x = logits.to(memory_format=layout).to(device).detach().requires_grad_()
                loss = partial_cross_entropy(x, target.to(device), 255, None if w is None else w.to(device),
                                             reduction, ls)
                upstream = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape).to(device)
                (loss * upstream).sum().backward()
                outs.append((loss.detach().cpu(), x.grad.cpu()))
            # float32, K <= 300 classes summed per pixel (CPU: chunked two-pass / online; CUDA: warp butterflies),
            # <= 1406 pixels in the reduction: a few ulp per term (TOL)
            torch.testing.assert_close(outs[1][0], outs[0][0], **TOL[torch.float32])
            torch.testing.assert_close(outs[1][1], outs[0][1], **TOL[torch.float32])


@pytest.mark.cuda
def test_cuda_bad_label_default_is_a_device_side_assert():
    """Without check_labels an out-of-range label stops the kernel (PyTorch's nll_loss convention); it poisons the
    CUDA context, hence the subprocess."""
    import subprocess
    import sys

    code = (
        "import torch, segops\n"
        "x = torch.randn(1, 3, 4, 4, device='cuda'); t = torch.zeros(1, 4, 4, dtype=torch.long, device='cuda')\n"
        "t[0, 1, 2] = 7\n"
        "segops.ops.partial_cross_entropy(x, t, check_labels=False)\n"
        "torch.cuda.synchronize()\n"
    )
    env = dict(os.environ, SEGOPS_CHECK_LABELS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "device-side assert" in out.stderr or "assert" in out.stderr.lower(), out.stderr
    assert "target value 7 at flat pixel 6" in out.stdout + out.stderr


@pytest.mark.cuda
def test_cuda_results_are_bitwise_reproducible():
    logits, target, weight = _cuda_cases()
    runs = []
    for _ in range(3):
        x = logits.clone().requires_grad_()
        a = partial_cross_entropy(x, target, 255, weight, "mean", 0.1)
        b = entropy(x, target != 255, "sum")
        (a + b).backward()
        runs.append((a.detach(), b.detach(), x.grad))
    for run in runs[1:]:
        for u, v in zip(runs[0], run):
            assert torch.equal(u, v)


@pytest.mark.cuda
def test_cuda_graph_capture_matches_eager():
    """Under stream capture the reduction brings its own zeroed completion ticket (a memset node in the graph)."""
    logits, target, weight = _cuda_cases()
    static_x = logits.clone().requires_grad_()

    def step():
        static_x.grad = None
        loss = partial_cross_entropy(static_x, target, 255, weight, "mean", 0.1) + entropy(static_x, None, "mean")
        loss.backward()
        return loss.detach()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
        static_grad = static_x.grad
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    y = logits.clone().requires_grad_()
    eager = partial_cross_entropy(y, target, 255, weight, "mean", 0.1) + entropy(y, None, "mean")
    eager.backward()
    # the same kernels and grid on the same inputs: identical bits
    assert torch.equal(static_loss, eager.detach()) and torch.equal(static_grad, y.grad)


@pytest.mark.parametrize("capability", ["native", "default", "avx2"])
def test_cpu_instruction_set_variants_match_the_per_pixel_path(capability):
    """The blocked CPU loops are compiled for SSE2, AVX2 and AVX-512 and the widest the CPU has runs, capped by
    ATEN_CPU_CAPABILITY ("default": SSE2), which is read once per process; so each variant is checked in a
    subprocess (on a CPU without AVX2 all take the SSE2 loops), by the blocked-vs-per-pixel and the
    every-element-written tests above, with MALLOC_PERTURB_ filling every fresh allocation with garbage."""
    import subprocess
    import sys

    env = dict(os.environ, MALLOC_PERTURB_="165")
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability != "native":
        env["ATEN_CPU_CAPABILITY"] = capability
    here = os.path.abspath(__file__)
    tests = [here + "::test_cpu_blocked_path_matches_per_pixel_path", here + "::test_cpu_every_output_element_is_written"]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"] + tests, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
