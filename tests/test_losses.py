"""Fused partial cross-entropy and entropy: against segops.reference / F.cross_entropy, autograd, errors."""

from __future__ import annotations

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
        torch.testing.assert_close(out.double(), ref, **TOL[dtype])
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
        (out.double() * go.to(device)).sum().backward()
        (ref * go.to(device)).sum().backward()
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
    torch.testing.assert_close(partial_cross_entropy(poisoned, target), partial_cross_entropy(logits, target))


def test_pce_per_pixel_constant_invariance(device):
    logits, target = make_case(2, 6, (5, 7), 0.5, torch.float64, device, seed=7)
    shift = torch.randn(2, 1, 5, 7, dtype=torch.float64, device=device) * 100
    for reduction in REDUCTIONS:
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
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    a.sum().backward()
    b.sum().backward()
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
    torch.testing.assert_close(out, ref)
    out.backward()
    ref.backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_pce_module(device):
    logits, target = make_case(2, 4, (5, 5), 0.5, torch.float32, device, seed=11)
    w = torch.tensor([1.0, 2.0, 0.5, 1.0])
    crit = segops.nn.PartialCrossEntropyLoss(weight=w, label_smoothing=0.1).to(device)
    assert "weight" in crit.state_dict()
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
        ("label outside", dict(logits=x, target=bad_label), IndexError, r"target value 7 .*outside \[0, K\) = \[0, 3\)"),
        ("negative label", dict(logits=x, target=neg_label), IndexError, r"target value -1"),
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
        torch.testing.assert_close(out.double(), ref, **TOL[dtype])
        go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device)
        (out.double() * go).sum().backward()
        (ref * go).sum().backward()
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
    torch.testing.assert_close(entropy(x + 1e3, reduction="none"), h, rtol=1e-8, atol=1e-8)
    assert (h >= 0).all() and (h <= torch.log(torch.tensor(7.0, dtype=torch.float64)) + 1e-12).all()
    uniform = torch.zeros(1, 7, 2, 2, device=device)
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
    # non-bool masks: nonzero = True
    torch.testing.assert_close(entropy(x, mask.float()), entropy(x, mask))


def test_entropy_module_and_errors(device):
    x = torch.randn(2, 3, 4, 4, device=device)
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
            torch.testing.assert_close(g, c, **TOL[dtype])


@pytest.mark.parametrize("labelled", [1.0, 0.5, 0.03])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_blocked_path_matches_per_pixel_path(labelled, dtype):
    """NCHW float inputs take the CPU's pixel-blocked path, channels_last the per-pixel functors."""
    logits, target = make_case(2, 21, (9, 13), labelled, dtype, "cpu", seed=30)  # S = 117: 3 blocks + tail
    weight = (torch.rand(21, generator=torch.Generator().manual_seed(31)) + 0.5).to(dtype)
    mask = target != 255
    results = []
    for x in (logits.contiguous(), logits.to(memory_format=torch.channels_last)):
        x = x.detach().requires_grad_()
        a = partial_cross_entropy(x, target, 255, weight, "mean", 0.1)
        b = entropy(x, mask, "sum")
        (a + b).backward()
        results.append((a.detach(), b.detach(), x.grad.contiguous()))
    for blocked, per_pixel in zip(*results):
        torch.testing.assert_close(blocked, per_pixel, **TOL[dtype])
