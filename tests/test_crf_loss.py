"""Dense CRF loss and normalized-cut loss: against the pure-PyTorch lattice twin, rois, resizing, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segops import nn as snn
from segops import reference_lattice as R
from segops.ops import dense_crf_loss, normalized_cut_loss
from segops.ops.resize import half_resolution

ops = torch.ops.segops


def make_inputs(B=2, K=4, H=13, W=17, C_img=3, seed=0, dtype=torch.float64, roi_frac=0.7):
    g = torch.Generator().manual_seed(seed)
    img = (torch.rand(B, C_img, H, W, generator=g, dtype=dtype) * 255).round()
    seg = torch.softmax(torch.randn(B, K, H, W, generator=g, dtype=dtype) * 2, 1).requires_grad_()
    roi = (torch.rand(B, H, W, generator=g) < roi_frac).to(dtype)
    return img, seg, roi


def crf_reference(img, seg, weight, srgb, sxy, scale, roi):
    """Loss -(w/B) sum X^T W X and the ECCV'18 gradient -(2w/B) (W X) roi through the resize, from twin (b)."""
    B = img.shape[0]
    if roi is None:
        roi = torch.ones(seg.shape[0], *seg.shape[2:], dtype=seg.dtype)
    if scale != 1.0:
        img = F.interpolate(img, scale_factor=scale, mode="nearest")
        seg_s = F.interpolate(seg, scale_factor=scale, mode="bilinear", align_corners=False)
        roi = F.interpolate(roi.unsqueeze(1), scale_factor=scale, mode="nearest").squeeze(1)
        sxy = sxy * scale
    else:
        seg_s = seg
    feats = R.crf_features(img, srgb, sxy)
    x = seg_s * roi.unsqueeze(1)
    wx = R.permutohedral_filter(x.detach(), feats)
    loss = -(weight / B) * (x.detach() * wx).sum()
    surrogate = -(2 * weight / B) * (x * wx).sum()  # d/dX = -(2w/B) W X
    (grad,) = torch.autograd.grad(surrogate, seg)
    return loss, grad


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.6])
@pytest.mark.parametrize("use_roi", [True, False])
def test_dense_crf_loss_matches_reference(scale, use_roi):
    img, seg, roi = make_inputs(seed=int(scale * 10) + use_roi, H=15, W=18)
    roi = roi if use_roi else None
    loss = dense_crf_loss(img, seg, 2e-3, 15.0, 5.0, scale, roi)
    (grad,) = torch.autograd.grad(loss, seg)
    ref_loss, ref_grad = crf_reference(img, seg, 2e-3, 15.0, 5.0, scale, roi)
    # float64: the op sums <x, W x> over the lattice's vertices, the twin over the pixels (same lattice, other
    # order): ~n u with n ~ 1e3 terms is 1e-13
    assert torch.allclose(loss, ref_loss, rtol=1e-12, atol=0)
    # float64 per-pixel gradient, (d+1)-term slices after d+1 blur passes, relative 1e-10 leaves room for
    # cancellation; atol 1e-18 is far below the gradient's scale (2 w / B * W X ~ 1e-3)
    assert torch.allclose(grad, ref_grad, rtol=1e-10, atol=1e-18)
    assert float(loss.detach()) <= 0


@pytest.mark.parametrize("fn", [dense_crf_loss, normalized_cut_loss])
@pytest.mark.parametrize("size", [(16, 20), (15, 19)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_scale_equals_resized_inputs(fn, size, channels_last):
    """At scale 0.5 the images and rois are taken as views of their even rows and columns, which is what nearest
    resizing at one half selects: the loss and its gradient are bitwise those of inputs resized beforehand
    (F.interpolate for the images and rois, the half-resolution op for the segmentations) at scale 1 with
    sigma_xy halved, for even and odd sizes and channels-last images."""
    img, seg, roi = make_inputs(B=2, K=4, H=size[0], W=size[1], seed=31, dtype=torch.float32)
    if channels_last:
        img = img.contiguous(memory_format=torch.channels_last)
    w = 2e-3 if fn is dense_crf_loss else 1.0
    loss = fn(img, seg, w, 15.0, 5.0, 0.5, roi)
    (grad,) = torch.autograd.grad(loss, seg)
    img_h = F.interpolate(img, scale_factor=0.5, mode="nearest")
    roi_h = F.interpolate(roi.unsqueeze(1), scale_factor=0.5, mode="nearest").squeeze(1)
    seg_h = half_resolution(seg)
    ref = fn(img_h, seg_h, w, 15.0, 2.5, 1.0, roi_h)
    (ref_grad,) = torch.autograd.grad(ref, seg)
    assert torch.equal(loss, ref) and torch.equal(grad, ref_grad)


def test_dense_crf_loss_float32_and_many_classes():
    img, seg, roi = make_inputs(B=1, K=70, H=12, W=11, dtype=torch.float32, seed=3)
    loss = dense_crf_loss(img, seg, 1e-2, 10.0, 4.0, 1.0, roi)
    (grad,) = torch.autograd.grad(loss, seg)
    ref_loss, ref_grad = crf_reference(img, seg, 1e-2, 10.0, 4.0, 1.0, roi)
    # float32 splat / blur / slice against the float64 twin on the same lattice: u = 6e-8 over ~100 terms per
    # vertex and 70 classes summed: 1e-5 / 2e-5 relative
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    assert float((grad - ref_grad).abs().max() / ref_grad.abs().max()) < 2e-5


@pytest.mark.parametrize("C_img", [1, 3, 5])
def test_any_number_of_image_channels(C_img):
    img, seg, roi = make_inputs(B=2, K=3, H=9, W=10, C_img=C_img, seed=C_img)
    loss = dense_crf_loss(img, seg, 1e-3, 20.0, 3.0, 1.0, roi)
    ref_loss, _ = crf_reference(img, seg, 1e-3, 20.0, 3.0, 1.0, roi)
    assert torch.allclose(loss, ref_loss, rtol=1e-12)  # float64, vertex vs pixel summation order (see above)


def test_roi_zero_pixels_get_exactly_zero_gradient():
    img, seg, roi = make_inputs(seed=5)
    loss = dense_crf_loss(img, seg, 1.0, 15.0, 5.0, 1.0, roi)
    (grad,) = torch.autograd.grad(loss, seg)
    outside = (roi == 0).unsqueeze(1).expand_as(grad)
    assert bool((grad[outside] == 0).all())
    assert bool((grad[~outside] != 0).any())
    # all-zero roi, also through the resize: zero loss, zero gradient
    loss0 = dense_crf_loss(img, seg, 1.0, 15.0, 5.0, 0.5, torch.zeros_like(roi))
    (g0,) = torch.autograd.grad(loss0, seg)
    assert float(loss0.detach()) == 0 and bool((g0 == 0).all())


def test_eccv_identity_and_weight_scaling():
    # -sum_k S_k^T W S_k = sum_k S_k^T W (1 - S_k) - 1^T W 1 for softmax S: the two ECCV'18 forms.
    img, seg, _ = make_inputs(B=1, K=3, H=10, W=12, seed=6)
    loss = dense_crf_loss(img, seg, 1.0, 15.0, 4.0)
    feats = R.crf_features(img, 15.0, 4.0)
    ones = torch.ones(1, 1, 10, 12, dtype=torch.float64)
    cut = (seg.detach() * R.permutohedral_filter(1 - seg.detach(), feats)).sum()
    total = (ones * R.permutohedral_filter(ones, feats)).sum()
    # float64: the two forms differ by 1^T W 1, which cancels against terms of similar size: 1e-10 relative
    assert torch.allclose(loss, cut - total, rtol=1e-10)
    # scaling the weight is one more float64 multiplication (the forms are the same bits)
    assert torch.allclose(dense_crf_loss(img, seg, 3.0, 15.0, 4.0), 3 * loss, rtol=1e-14)


def test_module_equals_functional_and_repr():
    img, seg, roi = make_inputs(seed=7)
    m = snn.DenseCRFLoss(weight=2e-9, sigma_rgb=15, sigma_xy=80, scale_factor=0.5)
    assert "sigma_xy=80" in repr(m)
    assert torch.equal(m(img, seg, roi), dense_crf_loss(img, seg, 2e-9, 15, 80, 0.5, roi))
    nc = snn.NormalizedCutLoss(weight=0.5, sigma_rgb=15, sigma_xy=5)
    assert torch.equal(nc(img, seg, roi), normalized_cut_loss(img, seg, 0.5, 15, 5, 1.0, roi))


def test_lattice_built_once_per_evaluation():
    # Forward + backward build the lattice once and filter once; the backward reuses the forward's vertex
    # values (one slice), it neither rebuilds nor re-filters.
    from torch.utils._python_dispatch import TorchDispatchMode

    img, seg, roi = make_inputs(B=2, K=3, H=8, W=8, seed=8)
    calls = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "segops":
                calls.append(func.__name__)
            return func(*args, **(kwargs or {}))

    for fn in (dense_crf_loss, normalized_cut_loss):
        calls.clear()
        with Count():
            fn(img, seg, 1.0, 10.0, 3.0, 1.0, roi).backward()
        assert sorted(calls) == ["_lattice_quadratic_forms.default", "_lattice_quadratic_forms_backward.default",
                                 "permutohedral_lattice.default"], calls


def test_dense_reference_within_documented_approximation():
    # Versus the exact dense Gaussian (twin a): the lattice loss carries 0.4-0.7x of its mass.
    img, seg, roi = make_inputs(B=1, K=3, H=20, W=20, seed=9)
    img = torch.nn.functional.avg_pool2d(img, 5, 1, 2, count_include_pad=False)  # smoother image
    lat = dense_crf_loss(img, seg.detach(), 1.0, 15.0, 6.0)
    exact = R.dense_crf_loss(img, seg.detach(), 1.0, 15.0, 6.0, filter=R.dense_gaussian_filter)
    assert 0.4 < float(lat / exact) < 0.7


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_normalized_cut_matches_reference(scale):
    img, seg, roi = make_inputs(seed=10, H=14, W=16)
    loss = normalized_cut_loss(img, seg, 0.7, 15.0, 5.0, scale, roi)
    (grad,) = torch.autograd.grad(loss, seg)
    ref = R.normalized_cut_loss(img, seg, 0.7, 15.0, 5.0, scale, roi)
    (ref_grad,) = torch.autograd.grad(ref, seg)
    assert torch.allclose(loss, ref, rtol=1e-12)  # float64, vertex vs pixel summation order
    # float64 gradient through cut / degree: one more division and cancellation in (W + W^T) X / d - a / d^2 W r
    assert torch.allclose(grad, ref_grad, rtol=1e-9, atol=1e-16)
    assert 0 <= float(loss) <= 0.7 * seg.shape[1]  # each class's cut ratio lies in [0, 1]


def test_normalized_cut_gradcheck_and_absent_class():
    img, seg, roi = make_inputs(B=1, K=3, H=4, W=5, seed=11)
    assert torch.autograd.gradcheck(lambda x: normalized_cut_loss(img, x, 1.0, 15.0, 2.0, 1.0, roi), (seg,))
    s = seg.detach().clone()
    s[:, 2] = 0  # a class absent everywhere: its term is 0 (not NaN) and so is its gradient
    s = (s / s.sum(1, keepdim=True)).requires_grad_()
    loss = normalized_cut_loss(img, s, 1.0, 15.0, 2.0, 1.0, roi)
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(s.grad).all())


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_torch_compile_losses(scale):
    # (scale 0.5 on the CPU: the forms of the resized segmentation in one autograd.Function)
    img, seg, roi = make_inputs(B=1, K=3, H=8, W=9, seed=12)
    for fn in (dense_crf_loss, normalized_cut_loss):
        compiled = torch.compile(lambda i, s, r: fn(i, s, 1.0, 15.0, 3.0, scale, r), backend="aot_eager")
        out = compiled(img, seg, roi)
        (gc,) = torch.autograd.grad(out, seg)
        ref = fn(img, seg, 1.0, 15.0, 3.0, scale, roi)
        (gr,) = torch.autograd.grad(ref, seg)
        # float64, the same kernels compiled and eager: rounding only (the tolerances of the twin comparison)
        assert torch.allclose(out, ref, rtol=1e-12) and torch.allclose(gc, gr, rtol=1e-10, atol=1e-18)


def test_empty_batches_and_images():
    for B, H, W in ((0, 8, 8), (2, 0, 8)):
        img = torch.rand(B, 3, H, W) * 255
        seg = torch.rand(B, 3, H, W, requires_grad=True)
        for fn in (dense_crf_loss, normalized_cut_loss):
            loss = fn(img, seg, 1.0, 15.0, 3.0)
            loss.backward()
            assert float(loss) == 0 and bool((seg.grad == 0).all())
            seg.grad = None


BAD = [
    ("images 3-D", lambda i, s, r: (i[0], s, r), ValueError, "images must be"),
    ("segs 3-D", lambda i, s, r: (i, s[0], r), ValueError, "segmentations must be"),
    ("size mismatch", lambda i, s, r: (i[..., :-1], s, r), ValueError, "must agree"),
    ("batch mismatch", lambda i, s, r: (i[:1], s, r), ValueError, "must agree"),
    ("roi shape", lambda i, s, r: (i, s, r[..., :-1]), ValueError, "rois must be"),
    ("15 channels", lambda i, s, r: (torch.rand(2, 15, 13, 17), s, r), ValueError, "1..14 channels"),
    ("int segs", lambda i, s, r: (i, (s > 0.5).long(), r), TypeError, "floating point"),
    ("NaN image", lambda i, s, r: (i.clone().fill_(float("nan")), s, r), RuntimeError, "NaN or Inf"),
]


@pytest.mark.parametrize("name,mutate,exc,match", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("fn", [dense_crf_loss, normalized_cut_loss])
def test_bad_input(name, mutate, exc, match, fn):
    img, seg, roi = make_inputs(dtype=torch.float32)
    i, s, r = mutate(img, seg, roi)
    with pytest.raises(exc, match=match):
        fn(i, s, 1.0, 15.0, 5.0, 1.0, r)


@pytest.mark.parametrize("kw", [dict(sigma_rgb=0.0), dict(sigma_xy=-1.0), dict(scale_factor=0.0),
                                dict(sigma_xy=float("nan"))])
def test_bad_parameters(kw):
    args = dict(weight=1.0, sigma_rgb=15.0, sigma_xy=5.0, scale_factor=1.0)
    args.update(kw)
    with pytest.raises(ValueError, match="positive finite"):
        snn.DenseCRFLoss(**args)
    img, seg, roi = make_inputs()
    with pytest.raises(ValueError, match="positive finite"):
        dense_crf_loss(img, seg, **args)


@pytest.mark.cuda
@pytest.mark.parametrize("fn", [dense_crf_loss, normalized_cut_loss])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_cuda_parity_losses(fn, scale):
    img, seg, roi = make_inputs(B=3, K=21, H=33, W=29, seed=13)
    loss = fn(img, seg, 1e-3, 15.0, 8.0, scale, roi)
    (grad,) = torch.autograd.grad(loss, seg)
    seg_c = seg.detach().cuda().requires_grad_()
    loss_c = fn(img.cuda(), seg_c, 1e-3, 15.0, 8.0, scale, roi.cuda())
    (grad_c,) = torch.autograd.grad(loss_c, seg_c)
    # float64; same summation order on both devices, FMA contraction on the GPU: ~1e-16 per term
    assert torch.allclose(loss_c.cpu(), loss, rtol=1e-10)
    assert float((grad_c.cpu() - grad).abs().max() / grad.abs().max()) < 1e-10


def test_channels_last_and_strided_inputs():
    img, seg, roi = make_inputs(B=2, K=5, H=12, W=14, seed=14)
    ref = dense_crf_loss(img, seg, 1.0, 15.0, 4.0, 1.0, roi)
    (gref,) = torch.autograd.grad(ref, seg)
    seg_cl = seg.detach().to(memory_format=torch.channels_last).requires_grad_()
    out = dense_crf_loss(img.to(memory_format=torch.channels_last), seg_cl, 1.0, 15.0, 4.0, 1.0, roi)
    (gcl,) = torch.autograd.grad(out, seg_cl)
    # float64: the strided reads see the same values; the loss's resize and product may round differently
    assert torch.allclose(out, ref, rtol=1e-12) and torch.allclose(gcl, gref, rtol=1e-12, atol=0)
    wide = torch.cat([seg.detach(), seg.detach()], 3)[..., ::2].requires_grad_()  # non-contiguous view input
    out2 = normalized_cut_loss(img, wide, 1.0, 15.0, 4.0, 1.0, roi)
    ref2 = normalized_cut_loss(img, wide.detach().contiguous(), 1.0, 15.0, 4.0, 1.0, roi)
    assert torch.allclose(out2, ref2, rtol=1e-12)  # float64, as above


# ---- one pass over the batch: host work and reads ------------------------------------------------------------


@pytest.mark.parametrize("fn", [dense_crf_loss, normalized_cut_loss])
@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("use_roi", [False, True])
@pytest.mark.parametrize("shared_build", [True, False])
def test_host_work_independent_of_batch_and_one_read(fn, scale, use_roi, shared_build, monkeypatch):
    # Counts, not times: torch.profiler's events of one forward+backward on the CPU. The work issued (aten ops
    # that are not views or allocations, plus segops' kernel launches) is the same for 1 and 12 images. With the
    # shared lattice build (CUDA's: SEGOPS_LATTICE_SHARED_BUILD=1 runs it on the CPU) exactly one value is read
    # back (the lattice's vertex count and flags); the CPU's own build (one table per thread's range of points)
    # reads none.
    from segops.bench.crf import host_counts

    monkeypatch.setenv("SEGOPS_LATTICE_SHARED_BUILD", "1" if shared_build else "0")
    counts = {}
    for B in (1, 12):
        img, seg, roi = make_inputs(B=B, K=21, H=16, W=20, seed=20 + B, dtype=torch.float32)
        kw = dict(weight=2e-9, sigma_rgb=15.0, sigma_xy=80.0, scale_factor=scale)
        counts[B] = host_counts(lambda i, s: fn(i, s, rois=roi if use_roi else None, **kw), img, seg.detach())
    assert abs(counts[1]["ops"] - counts[12]["ops"]) <= 5, counts
    assert counts[1]["kernels"] == counts[12]["kernels"], counts
    assert counts[1]["ops"] <= 60 and counts[12]["ops"] <= 60, counts
    reads = 1 if shared_build else 0
    assert counts[1]["reads"] == counts[12]["reads"] == reads, counts


# ---- images and rois on another device than the segmentations ----------------------------------------------


@pytest.mark.parametrize("fn", [dense_crf_loss, normalized_cut_loss])
def test_meta_images_or_rois_are_named(fn):
    # Images and rois are moved to the segmentations' device; a 'meta' tensor has no values to move.
    img, seg, roi = make_inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="images are on meta but segmentations are on cpu"):
        fn(img.to("meta"), seg, 1.0, 15.0, 5.0, 1.0, roi)
    with pytest.raises(ValueError, match="rois are on meta"):
        fn(img, seg, 1.0, 15.0, 5.0, 1.0, roi.to("meta"))
    with pytest.raises(ValueError, match="images are on cpu but segmentations are on meta"):
        fn(img, seg.detach().to("meta"), 1.0, 15.0, 5.0, 1.0, roi)


def test_to_device_copies_to_gpu_without_blocking():
    # The move itself, with a stand-in for a tensor on another device (no GPU here): CPU -> CUDA copies do not
    # block the host (pageable memory is staged before the call returns); CUDA -> CPU copies must block.
    from segops.ops.crf_losses import _to_device

    class OnDevice:
        def __init__(self, device):
            self.device = torch.device(device)
            self.calls = []

        def to(self, device, non_blocking=False):
            self.calls.append((torch.device(device), non_blocking))
            return self

    cpu = OnDevice("cpu")
    _to_device(cpu, torch.device("cuda"))
    assert cpu.calls == [(torch.device("cuda"), True)]
    gpu = OnDevice("cuda")
    _to_device(gpu, torch.device("cpu"))
    assert gpu.calls == [(torch.device("cpu"), False)]
    same = OnDevice("cpu")
    assert _to_device(same, torch.device("cpu")) is same and same.calls == []


@pytest.mark.cuda
@pytest.mark.parametrize("fn", [dense_crf_loss, normalized_cut_loss])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_cuda_cpu_images_and_rois(fn, scale):
    # The ECCV'18 code's call: CPU images and crop masks, CUDA probabilities. Same bits as all-CUDA inputs.
    img, seg, roi = make_inputs(B=2, K=21, H=33, W=29, seed=30, dtype=torch.float32)
    seg_c = seg.detach().cuda().requires_grad_()
    mixed = fn(img, seg_c, 1e-3, 15.0, 8.0, scale, roi)
    (g_mixed,) = torch.autograd.grad(mixed, seg_c)
    cuda = fn(img.cuda(), seg_c, 1e-3, 15.0, 8.0, scale, roi.cuda())
    (g_cuda,) = torch.autograd.grad(cuda, seg_c)
    assert mixed.device.type == "cuda"
    assert torch.equal(mixed, cuda) and torch.equal(g_mixed, g_cuda)


# ---- CUDA: determinism and host synchronisation --------------------------------------------------------------


def _cuda_inputs(B=4, K=21, S=65, seed=31):
    img, seg, roi = make_inputs(B=B, K=K, H=S, W=S, seed=seed, dtype=torch.float32)
    return img.cuda(), seg.detach().cuda(), roi.cuda()


@pytest.mark.cuda
@pytest.mark.parametrize("fn", [dense_crf_loss, normalized_cut_loss])
def test_cuda_losses_bitwise_reproducible(fn):
    # No floating-point atomics anywhere: two runs give the same bits, also under
    # torch.use_deterministic_algorithms(True) (which would raise on a nondeterministic op).
    img, seg, roi = _cuda_inputs()
    runs = []
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        for _ in range(2):
            s = seg.clone().requires_grad_()
            loss = fn(img, s, 1e-3, 15.0, 8.0, 1.0, roi)
            (g,) = torch.autograd.grad(loss, s)
            runs.append((loss, g))
    finally:
        torch.use_deterministic_algorithms(prev)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.cuda
@pytest.mark.parametrize("fn", [dense_crf_loss, normalized_cut_loss])
def test_cuda_losses_sync_only_for_the_documented_read(fn):
    # Under torch.cuda.set_sync_debug_mode("error") every synchronising call raises, except the lattice build's
    # one documented read (vertex count and error flags), which the CUDA backend exempts: forward+backward
    # therefore run through only if nothing else synchronises.
    img, seg, roi = _cuda_inputs(B=2, S=33)
    s = seg.clone().requires_grad_()
    fn(img, s, 1e-3, 15.0, 8.0, 0.5, roi).backward()  # warm-up outside the check (allocator, lazy init)
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    try:
        torch.cuda.set_sync_debug_mode("error")
        for scale in (1.0, 0.5):
            s = seg.clone().requires_grad_()
            fn(img, s, 1e-3, 15.0, 8.0, scale, roi).backward()
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    torch.cuda.synchronize()
    assert torch.isfinite(s.grad).all()


@pytest.mark.cuda
def test_cuda_bad_images_still_named():
    # The images' finiteness travels to the build's one read; the error still names the images.
    img, seg, roi = _cuda_inputs(B=1, S=9)
    img[0, 1, 3, 4] = float("nan")
    for fn in (dense_crf_loss, normalized_cut_loss):
        with pytest.raises(RuntimeError, match="images contain NaN or Inf"):
            fn(img, seg, 1.0, 15.0, 5.0, 0.5, roi)


# ---- the features and the saved grids ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("poison", [None, 0.0, float("nan")])
def test_crf_features_equal_the_concatenated_planes(dtype, poison):
    # crf_features writes its planes in place; the values must be the bits of the plain formula (a lattice built
    # from other bits could differ), also for images that require grad and with the poison of a failed check.
    from segops.ops.lattice import _acc_dtype, crf_features

    g = torch.Generator().manual_seed(3)
    images = (torch.rand(2, 3, 13, 17, generator=g) * 255).to(dtype)
    if dtype.is_floating_point:
        images.requires_grad_()
    acc = _acc_dtype(dtype)
    p = None if poison is None else torch.tensor(poison, dtype=acc)
    got = crf_features(images, 13.7, 80.3, p)
    B, _, H, W = images.shape
    xs = (torch.arange(W, dtype=acc) / 80.3).view(1, 1, 1, W).expand(B, 1, H, W)
    ys = (torch.arange(H, dtype=acc) / 80.3).view(1, 1, H, 1).expand(B, 1, H, W)
    want = torch.cat([xs, ys, images.detach().to(acc) / (13.7 if p is None else p + 13.7)], 1)
    assert got.dtype == acc and not got.requires_grad
    assert torch.equal(got[:, :2], want[:, :2])
    if poison is not None and poison != poison:
        assert got[:, 2:].isnan().all()
    else:
        assert torch.equal(got, want)


def test_saved_grids_and_lattice_outputs_carry_no_gradient():
    # The quadratic forms' grids and the filter's weights and normaliser are returned for reuse, not as results:
    # they must not require grad (a backward through them would be silently wrong), and the backward builds no
    # zero gradients for them.
    from segops.ops import crf_losses

    img, seg, _ = make_inputs(B=1, K=3, H=9, W=11)
    feats = R.crf_features(img, 15.0, 5.0)
    vertex, bary, neighbors = torch.ops.segops.permutohedral_lattice(feats)
    forms, grid, blurred = crf_losses.ops._lattice_quadratic_forms(seg, None, vertex, bary, neighbors, False, False)
    assert forms.requires_grad and not grid.requires_grad and not blurred.requires_grad
    with torch.profiler.profile() as prof:
        forms.select(2, 0).sum().backward()
    zeros = [e for e in prof.events() if e.name == "aten::zeros"]
    assert len(zeros) <= 1, [e.name for e in zeros]  # select's backward: one (B, K, 2) zero tensor
    values = seg.detach()[:, :2].clone().requires_grad_()
    out, _, w, _, norm = torch.ops.segops.permutohedral_filter(values, feats, True)
    assert out.requires_grad and not w.requires_grad and not norm.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad(norm.sum(), values)


# ---- scale 0.5 on the CPU: the resize's backward fused into the slice -----------------------------------------


def _half_scale_forms_inputs(B, K, H, W, dtype, seed):
    """A lattice of a photo-like image's even pixels (the CRF features at one half) and s (B, K, H, W) softmax
    maps of `dtype`, a 0/1 mask (B, 1, H // 2, W // 2) of `dtype`."""
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    img = (torch.rand(B, 3, H, W, generator=g) * 255).round()
    feats = R.crf_features(img[:, :, 0:H // 2 * 2:2, 0:W // 2 * 2:2], 15.0, 2.5).to(acc)
    lattice = ops.permutohedral_lattice.default(feats)
    s = torch.softmax(torch.randn(B, K, H, W, generator=g) * 2, 1).to(dtype)
    mask = (torch.rand(B, 1, H // 2, W // 2, generator=g) < 0.7).to(dtype)
    return lattice, s, mask, g


@pytest.mark.parametrize("size", [(16, 20), (15, 19), (15, 20), (16, 19), (2, 3), (41, 9), (1, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("stream", [False, True])
def test_half_resolution_backward_fused_into_the_slice(size, dtype, stream, monkeypatch):
    """With full_size = [H, W] (and a mask) the forms' backward returns the gradient of s for x =
    half_resolution(s) [* mask]: bitwise the backward without them, times the mask, then the resize's backward
    -- for even and odd sizes, no pixel at half resolution (1 x 6), both forms, with the non-temporal stores
    forced for every size (SEGOPS_SLICE_STREAM_BYTES=0) and never. The trailing odd row / column must be written
    as zeros: a block of the output's size filled with NaN is freed just before (the allocator's next block of
    that size), and NaN never compares equal."""
    monkeypatch.setenv("SEGOPS_SLICE_STREAM_BYTES", "0" if stream else str(1 << 50))
    H, W = size
    B, K = 2, 5
    (vertex, bary, neighbors), s, mask, g = _half_scale_forms_inputs(B, K, H, W, dtype, seed=H * 100 + W)
    for m in (None, mask):
        for degree, exact in ((False, False), (True, True)):
            x = ops._half_resolution.default(s)
            if m is not None:
                x = x * m
            forms, splatted, blurred = ops._lattice_quadratic_forms.default(
                x, m if degree else None, vertex, bary, neighbors, degree, exact)
            grad_forms = torch.randn(B, K, 2, generator=g, dtype=torch.float64)
            apart = ops._lattice_quadratic_forms_backward.default(
                grad_forms, splatted, blurred, vertex, bary, neighbors, exact, dtype).view(x.shape)
            if m is not None:
                apart = apart * m
            apart = ops._half_resolution_backward.default(apart, [H, W])
            torch.full((B, K, H, W), float("nan"), dtype=dtype)
            fused = ops._lattice_quadratic_forms_backward.default(
                grad_forms, splatted, blurred, vertex, bary, neighbors, exact, dtype, [H, W], m)
            assert fused.shape == (B, K, H, W) and fused.dtype == dtype
            assert torch.equal(fused, apart), (m is not None, degree)


def test_half_scale_losses_gradcheck_and_roi_gradient():
    # float64: the normalized cut's gradient is exact, so gradcheck holds through the fused backward; the dense
    # CRF's is the ECCV'18 one (not the derivative), compared above and in the reference tests instead.
    img, seg, roi = make_inputs(B=2, K=3, H=7, W=9, seed=61)
    assert torch.autograd.gradcheck(lambda x: normalized_cut_loss(img, x, 1.0, 15.0, 4.0, 0.5, roi), (seg,))
    # A roi that wants a gradient takes the ops apart (the fused op gives a mask none), with the same seg gradient
    for fn in (dense_crf_loss, normalized_cut_loss):
        (fused,) = torch.autograd.grad(fn(img, seg, 1.0, 15.0, 4.0, 0.5, roi), seg)
        r = roi.clone().requires_grad_()
        g_seg, g_roi = torch.autograd.grad(fn(img, seg, 1.0, 15.0, 4.0, 0.5, r), (seg, r))
        assert torch.equal(g_seg, fused)
        assert g_roi.shape == roi.shape and bool(g_roi.ne(0).any())


def test_forms_ops_opcheck():
    (vertex, bary, neighbors), s, mask, g = _half_scale_forms_inputs(2, 3, 10, 13, torch.float32, seed=62)
    x = ops._half_resolution.default(s).requires_grad_()
    for degree, exact in ((False, False), (True, True)):
        roi = mask if degree else None
        torch.library.opcheck(ops._lattice_quadratic_forms.default, (x, roi, vertex, bary, neighbors, degree, exact))
        _, splatted, blurred = ops._lattice_quadratic_forms.default(x.detach(), roi, vertex, bary, neighbors, degree,
                                                                   exact)
        grad_forms = torch.randn(2, 3, 2, generator=g, dtype=torch.float64)
        args = (grad_forms, splatted, blurred, vertex, bary, neighbors, exact, torch.float32)
        torch.library.opcheck(ops._lattice_quadratic_forms_backward.default, args)
        torch.library.opcheck(ops._lattice_quadratic_forms_backward.default, args + ([10, 13], mask))
        torch.library.opcheck(ops._lattice_quadratic_forms_backward.default, args + ([11, 12], None))


@pytest.mark.parametrize("full_size, mask, match", [
    ([12, 13], None, r"full_size must be \[H, W\] with \(H // 2\) \(W // 2\) = N = 30 points, got \[12, 13\]"),
    ([10], None, r"full_size must be \[H, W\]"),
    (None, "ok", "mask needs full_size"),
    ([10, 13], "shape", r"mask must be \(B, 1, H // 2, W // 2\) = \(2, 1, 5, 6\) Float"),
    ([10, 13], "dtype", r"mask must be .* Float .* got .* Double"),
])
def test_fused_backward_bad_arguments(full_size, mask, match):
    (vertex, bary, neighbors), s, good, g = _half_scale_forms_inputs(2, 3, 10, 13, torch.float32, seed=63)
    x = ops._half_resolution.default(s)
    _, splatted, blurred = ops._lattice_quadratic_forms.default(x, None, vertex, bary, neighbors, False, False)
    m = {None: None, "ok": good, "shape": good[:, :, :4], "dtype": good.double()}[mask]
    grad_forms = torch.randn(2, 3, 2, generator=g, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=match):
        ops._lattice_quadratic_forms_backward.default(grad_forms, splatted, blurred, vertex, bary, neighbors, False,
                                                      torch.float32, full_size, m)
