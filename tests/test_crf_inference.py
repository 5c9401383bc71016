"""Dense CRF mean-field inference: pydensecrf2 parity on real photos, a pure-PyTorch twin, gradients, batches,
the module, errors, CPU/CUDA parity."""

from __future__ import annotations

import math
import platform

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import require_optional
from segops import nn as snn
from segops import reference
from segops import reference_lattice as R
from segops.ops import CRFKernel, MeanFieldCRF, dense_crf_inference, unary_from_labels, unary_from_softmax
from segops.ops.crf_inference import crf_mean_field_update

EPS32 = float(np.finfo(np.float32).eps)


# ---- inputs ----------------------------------------------------------------------------------------------------


def photo(name: str, top: int, left: int, H: int, W: int) -> np.ndarray:
    """A (H, W, 3) uint8 C-contiguous crop of one of scikit-image's photos (test-only dependency)."""
    skimage_data = require_optional("skimage.data")
    im = getattr(skimage_data, name)()
    return np.ascontiguousarray(im[top:top + H, left:left + W, :3])


def random_unary(K: int, H: int, W: int, seed: int, concentration: float = 0.5) -> np.ndarray:
    """(K, H, W) float32 energies -log p of Dirichlet-distributed class probabilities (clipped as pydensecrf's
    unary_from_softmax does), so that unaries range from confident to ambiguous."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(K, concentration), size=(H, W)).transpose(2, 0, 1)
    return np.ascontiguousarray(-np.log(np.clip(p, 1e-5, 1.0)).astype(np.float32))


def to_tensors(unary: np.ndarray, image: np.ndarray):
    return torch.from_numpy(unary)[None], torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()


# ---- pydensecrf2 parity --------------------------------------------------------------------------------------

PYDENSECRF_MODES = {"none": 0, "before": 1, "after": 2, "symmetric": 3}


def pydensecrf_marginals(unary, image, iterations, gaussian, bilateral, mode="symmetric"):
    """pydensecrf2's DenseCRF2D marginals (K, H, W); gaussian = (sxy, compat), bilateral = (sxy, srgb, compat)."""
    dcrf = require_optional("pydensecrf.densecrf")
    K, H, W = unary.shape
    d = dcrf.DenseCRF2D(W, H, K)
    d.setUnaryEnergy(np.ascontiguousarray(unary.reshape(K, -1)))
    norm = PYDENSECRF_MODES[mode]
    if gaussian is not None:
        d.addPairwiseGaussian(sxy=gaussian[0], compat=gaussian[1], normalization=norm)
    if bilateral is not None:
        d.addPairwiseBilateral(sxy=bilateral[0], srgb=bilateral[1], rgbim=image, compat=bilateral[2],
                               normalization=norm)
    return np.array(d.inference(iterations)).reshape(K, H, W)


def segops_crf(unary_t, image_t, gaussian, bilateral, mode="symmetric"):
    crf = MeanFieldCRF(unary_t)
    if gaussian is not None:
        crf.add_pairwise_gaussian(gaussian[0], gaussian[1], mode)
    if bilateral is not None:
        crf.add_pairwise_bilateral(bilateral[0], bilateral[1], image_t, bilateral[2], mode)
    return crf


def pairwise_scale(crf: MeanFieldCRF, q: torch.Tensor) -> float:
    """S = max |sum_m compat_m(filter_m(q))|: the magnitude of the pairwise logits of an update from q."""
    return float((crf._logits(q) + crf.unary).abs().max())


def assert_pydensecrf_close(q: np.ndarray, ref: np.ndarray, crf: MeanFieldCRF) -> None:
    # Both sides compute in float32 and differ only in rounding order: pydensecrf splats, blurs and slices with
    # SSE lanes in its own order, segops in another; each filtered value carries ~10 eps of relative rounding
    # (vertex sums of up to ~10^2 points, d+1 blur passes, a d+1-term slice), so the logits differ by ~10 eps * S
    # with S the pairwise logits' magnitude; a softmax moves a marginal by at most half the logit change, and
    # 5 iterations compound it (measured: <= 25 eps * S on these photos). Bound: 128 eps * S.
    S = pairwise_scale(crf, torch.from_numpy(ref)[None])
    tol = 128 * EPS32 * max(S, 1.0)
    err = float(np.abs(q - ref).max())
    assert err <= tol, "max |Q - Q_pydensecrf| = %.3g > %.3g (S = %.3g)" % (err, tol, S)
    # the labelling agrees wherever the reference's top two marginals are further apart than the tolerance
    top2 = np.sort(ref, axis=0)[-2:]
    decided = (top2[1] - top2[0]) > 2 * tol
    assert (q.argmax(0) == ref.argmax(0))[decided].all()


PHOTOS = [("astronaut", 100, 200, 96, 80), ("coffee", 150, 250, 80, 96)]


@pytest.mark.parametrize("photo_args", PHOTOS, ids=[p[0] for p in PHOTOS])
@pytest.mark.parametrize("K", [2, 21])
@pytest.mark.parametrize("kernels", ["both", "gaussian", "bilateral"])
def test_matches_pydensecrf_potts(photo_args, K, kernels):
    image = photo(*photo_args)
    H, W = image.shape[:2]
    unary = random_unary(K, H, W, seed=K + len(kernels))
    gaussian = (3, 3) if kernels in ("both", "gaussian") else None
    bilateral = (80, 13, 10) if kernels in ("both", "bilateral") else None
    ref = pydensecrf_marginals(unary, image, 5, gaussian, bilateral)
    u, im = to_tensors(unary, image)
    crf = segops_crf(u, im, gaussian, bilateral)
    q = crf.inference(5)[0].numpy()
    assert_pydensecrf_close(q, ref, crf)
    if kernels == "both":  # the functional form is the same program
        q2 = dense_crf_inference(u, im, 5)[0].numpy()
        assert np.array_equal(q, q2)


@pytest.mark.parametrize("mode", ["none", "before", "after", "symmetric"])
@pytest.mark.parametrize("K", [2, 21])
def test_matches_pydensecrf_normalizations(mode, K):
    image = photo("astronaut", 20, 140, 80, 96)
    H, W = image.shape[:2]
    unary = random_unary(K, H, W, seed=7 * K)
    # Without normalisation W 1 is ~10^2..10^3 here: Potts weights of that order would make the pairwise logits
    # ~10^4 and the marginals one-hot; weights / 100 keep the update in the same regime as the normalised modes.
    scale = 0.01 if mode == "none" else 1.0
    gaussian, bilateral = (3, 3 * scale), (60, 10, 10 * scale)
    ref = pydensecrf_marginals(unary, image, 5, gaussian, bilateral, mode)
    u, im = to_tensors(unary, image)
    crf = segops_crf(u, im, gaussian, bilateral, mode)
    assert_pydensecrf_close(crf.inference(5)[0].numpy(), ref, crf)
    # pydensecrf's integer constants are accepted too
    crf2 = segops_crf(u, im, gaussian, bilateral, PYDENSECRF_MODES[mode])
    assert torch.equal(crf2.inference(5), crf.inference(5))


@pytest.mark.parametrize("K", [2, 21])
@pytest.mark.parametrize("compat_kind", ["matrix", "diagonal", "mixed"])
def test_matches_pydensecrf_compatibilities(K, compat_kind):
    image = photo("coffee", 200, 100, 96, 80)
    H, W = image.shape[:2]
    unary = random_unary(K, H, W, seed=K)
    rng = np.random.default_rng(K)
    matrix = (rng.normal(size=(K, K)) * 3).astype(np.float32)  # not symmetric: pydensecrf symmetrises it
    diagonal = (rng.normal(size=K) * 3).astype(np.float32)
    g, b = {"matrix": (matrix, matrix.T.copy()), "diagonal": (diagonal, -diagonal),
            "mixed": (3.0, matrix)}[compat_kind]
    ref = pydensecrf_marginals(unary, image, 5, (3, g), (80, 13, b))
    u, im = to_tensors(unary, image)
    crf = segops_crf(u, im, (3, g), (80, 13, b))
    assert_pydensecrf_close(crf.inference(5)[0].numpy(), ref, crf)


def test_matches_pydensecrf_at_deeplab_size_and_iterations():
    """DeepLab's setting: 10 iterations, its kernels, K = 21, on pydensecrf's full program (start, steps, KL
    divergence); a 128 x 128 crop keeps the suite fast (`segops bench crf-inference` checks 512 x 512)."""
    dcrf = require_optional("pydensecrf.densecrf")
    image = photo("astronaut", 0, 200, 128, 128)
    unary = random_unary(21, 128, 128, seed=1, concentration=0.3)
    ref = pydensecrf_marginals(unary, image, 10, (3, 3), (121, 5, 4))
    u, im = to_tensors(unary, image)
    crf = segops_crf(u, im, (3, 3), (121, 5, 4))
    q = snn.DenseCRF.deeplab()(-u, im)[0].numpy()
    assert_pydensecrf_close(q, ref, crf)
    # startInference / stepInference / klDivergence
    d = dcrf.DenseCRF2D(128, 128, 21)
    d.setUnaryEnergy(np.ascontiguousarray(unary.reshape(21, -1)))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=121, srgb=5, rgbim=image, compat=4)
    Q, t1, t2 = d.startInference()
    d.stepInference(Q, t1, t2)
    q1 = crf.step_inference(crf.start_inference())
    assert_pydensecrf_close(q1[0].numpy(), np.array(Q).reshape(21, 128, 128), crf)
    kl_ref = d.klDivergence(Q)
    kl = float(crf.kl_divergence(q1)[0])
    # a sum of 3 N K = 1e6 float32 terms of either sign, each with ~eps relative rounding on both sides:
    # the difference is ~sqrt(#terms) eps * max term ~ 1e-4 of the largest |term| sum; bound 1e-4 relative.
    assert abs(kl - kl_ref) <= 1e-4 * abs(kl_ref)


def test_pydensecrf_utils_unaries():
    utils = require_optional("pydensecrf.utils")
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5), size=(6, 7)).transpose(2, 0, 1).astype(np.float32)
    for scale in (None, 0.8):
        ref = utils.unary_from_softmax(p, scale=scale)
        # float32 -log of the same clipped probabilities: torch and numpy logs differ by <= 1 ulp
        got = unary_from_softmax(torch.from_numpy(p)[None], scale=scale)[0].reshape(5, -1).numpy()
        np.testing.assert_allclose(got, ref, rtol=2 * EPS32, atol=0)
    labels = rng.integers(0, 6, size=(6, 7))
    for zero_unsure, n in ((True, 5), (False, 6)):
        ref = utils.unary_from_labels(labels, n, 0.7, zero_unsure=zero_unsure)
        got = unary_from_labels(torch.from_numpy(labels)[None], n, 0.7, zero_unsure)[0].reshape(n, -1).numpy()
        np.testing.assert_allclose(got, ref, rtol=2 * EPS32, atol=0)  # float32 constants rounded alike


# ---- the fused update op -------------------------------------------------------------------------------------


def update_twin(unary, messages, scales, weights):
    """segops.reference's twin, in float64."""
    return reference.crf_mean_field_update(unary.double(), [m.double() for m in messages],
                                           [s.double() if s is not None else None for s in scales], weights)


def update_inputs(shape, terms, scaled, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    unary = (torch.rand(shape, generator=g, dtype=torch.float64) * 6 - 1).to(dtype)
    messages = [(torch.rand(shape, generator=g, dtype=torch.float64) * 2).to(dtype) for _ in range(terms)]
    sshape = (shape[0], 1) + tuple(shape[2:])
    scales = [(torch.rand(sshape, generator=g, dtype=torch.float64) + 0.5).to(dtype) if scaled[j % len(scaled)]
              else None for j in range(terms)]
    weights = [float(w) for w in (torch.rand(terms, generator=g, dtype=torch.float64) * 20 - 10)]
    return unary, messages, scales, weights


@given(
    B=st.integers(0, 3), K=st.integers(1, 23), spatial=st.lists(st.integers(0, 70), min_size=0, max_size=2),
    terms=st.integers(0, 8), scaled=st.lists(st.booleans(), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    layout=st.sampled_from(["contiguous", "channels_last", "sliced"]), seed=st.integers(0, 2**16),
)
def test_update_matches_twin(B, K, spatial, terms, scaled, dtype, layout, seed):
    shape = (B, K) + tuple(spatial)
    unary, messages, scales, weights = update_inputs(shape, terms, scaled, dtype, seed)
    if layout == "channels_last" and unary.dim() == 4:
        unary = unary.contiguous(memory_format=torch.channels_last)
        messages = [m.contiguous(memory_format=torch.channels_last) for m in messages]
    if layout == "sliced":  # every other class of twice as many: strided inputs
        unary = torch.cat([unary, unary], 1)[:, ::2]
    q = crf_mean_field_update(unary, messages, scales, weights)
    assert q.shape == unary.shape and q.dtype == dtype and q.is_contiguous()
    want = update_twin(unary, messages, scales, weights)
    # float32: logits |l| <= ~6 + 8 * 10 * 1.5 * 2 accumulate <= 9 rounded terms (~9 eps * 250 absolute) before
    # an exp with ~1 ulp (exp_poly) and a K-term normalisation; marginals <= 1: bound 2e-4 absolute. float64:
    # the same with eps = 2.2e-16. Half types round the inputs first (the twin reads the same rounded values)
    # and the output to 8 (bfloat16) / 11 (float16) bits: half an ulp of a value <= 1.
    atol = {torch.float32: 2e-4, torch.float64: 1e-12, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
    torch.testing.assert_close(q.double(), want, rtol=0, atol=atol)


def test_update_blocked_path_matches_per_pixel_path():
    """float32 NCHW runs the CPU's pixel-blocked path (tails included: N = 3 * 64 + 37); float64 the per-pixel
    functor the GPU runs. Same terms in the same order, so they differ by exp's rounding only."""
    shape = (2, 21, 7, 33)
    unary, messages, scales, weights = update_inputs(shape, 3, [True, False], torch.float32, 0)
    q32 = crf_mean_field_update(unary, messages, scales, weights)
    q64 = crf_mean_field_update(unary.double(), [m.double() for m in messages],
                                [s.double() if s is not None else None for s in scales], weights)
    # the float32 logits carry ~4 eps * 70 of rounding; exp_poly ~1 ulp: bound 1e-5 on marginals <= 1
    torch.testing.assert_close(q32.double(), q64, rtol=0, atol=1e-5)


def test_update_out_op_writes_the_buffer():
    unary, messages, scales, weights = update_inputs((2, 5, 9, 70), 2, [True], torch.float32, 1)
    out = torch.full_like(unary, float("nan"))
    fixed = [s if s is not None else unary.new_empty(0) for s in scales]
    torch.ops.segops._crf_mean_field_update_out(unary, messages, fixed, weights, out)
    assert torch.equal(out, crf_mean_field_update(unary, messages, scales, weights))
    with pytest.raises(RuntimeError, match="out shares memory with messages"):
        torch.ops.segops._crf_mean_field_update_out(unary, messages, fixed, weights, messages[1])
    with pytest.raises(RuntimeError, match="out must be a contiguous tensor of the unary's shape"):
        torch.ops.segops._crf_mean_field_update_out(unary, messages, fixed, weights, out[:1])


def test_update_opcheck():
    unary, messages, scales, weights = update_inputs((2, 4, 5, 6), 2, [True, False], torch.float64, 2)
    fixed = [s if s is not None else unary.new_empty(0) for s in scales]
    unary.requires_grad_()
    for m in messages:
        m.requires_grad_()
    torch.library.opcheck(torch.ops.segops.crf_mean_field_update.default, (unary, messages, fixed, weights))
    q = crf_mean_field_update(unary, messages, scales, weights).detach()
    grad = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.library.opcheck(torch.ops.segops._crf_mean_field_update_backward.default,
                          (grad.requires_grad_(), q.requires_grad_()))
    out = torch.empty_like(unary).detach()
    torch.library.opcheck(torch.ops.segops._crf_mean_field_update_out.default,
                          (unary.detach(), [m.detach() for m in messages], fixed, weights, out))


def test_update_gradcheck_and_double_backward():
    unary, messages, scales, weights = update_inputs((2, 4, 3, 5), 3, [True, False], torch.float64, 3)
    scales = [s.requires_grad_() if s is not None else None for s in scales]
    args = [unary.requires_grad_()] + [m.requires_grad_() for m in messages] + [s for s in scales if s is not None]

    def f(u, m0, m1, m2, *ss):
        it = iter(ss)
        return crf_mean_field_update(u, [m0, m1, m2], [next(it) if s is not None else None for s in scales], weights)

    assert torch.autograd.gradcheck(f, tuple(args))
    assert torch.autograd.gradgradcheck(f, tuple(args))


def test_update_errors():
    unary, messages, scales, weights = update_inputs((1, 3, 4, 5), 2, [True], torch.float32, 4)
    fixed = [s if s is not None else unary.new_empty(0) for s in scales]
    op = torch.ops.segops.crf_mean_field_update.default
    cases = [
        ((unary, messages[:1], fixed, weights), r"messages, scales and weights must have the same length"),
        ((unary, [messages[0][:, :2]] * 2, fixed, weights), r"messages\[0\] must have the unary's shape"),
        ((unary, [messages[0].double()] * 2, fixed, weights), r"dtype Double must equal the unary dtype Float"),
        ((unary, messages, [fixed[0][:, :, :2]] * 2, weights), r"scales\[0\] must be empty or \(B, 1, \*spatial\)"),
        ((unary, messages, fixed, [1.0, float("inf")]), r"weights\[1\] must be finite"),
        ((unary, messages * 5, fixed * 5, weights * 5), r"at most 8 messages"),
        ((unary.long(), [], [], []), r"unary must be float32, float64, float16 or bfloat16"),
        ((unary[:, :0], [], [], []), r"at least one class"),
        ((unary[0, 0, 0], [], [], []), r"unary must have shape \(B, K, \*spatial\)"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            op(*args)
    with pytest.raises(RuntimeError, match="grad must have q's shape"):
        torch.ops.segops._crf_mean_field_update_backward.default(unary[:, :2], unary)


def test_no_grad_path_equals_autograd_path():
    """Inference without autograd reuses buffers (the _out op); with autograd it builds a graph. Same ops."""
    unary, images = small_case(B=2, K=5, H=20, W=70, seed=6)
    kern = [CRFKernel(torch.rand(1, 3, 20, 70, generator=torch.Generator().manual_seed(0)), torch.ones(5) * 0.5)]
    with torch.no_grad():
        a = dense_crf_inference(unary, images, 4, kernels=kern)
    u = unary.clone().requires_grad_()
    b = dense_crf_inference(u, images, 4, kernels=kern)
    assert b.requires_grad
    assert torch.equal(a, b.detach())


# ---- the one-op CPU schedule (_crf_mean_field_iterate) ----------------------------------------------------


def two_kernel_crf(B: int, K: int, H: int, W: int, mode: str, seed: int) -> MeanFieldCRF:
    """A shared (batch-1) position lattice and a per-image bilateral one, Potts weights, float32."""
    unary, images = small_case(B=B, K=K, H=H, W=W, seed=seed)
    crf = MeanFieldCRF(unary)
    crf.add_pairwise_gaussian(3.0, 3.0, normalization=mode)
    crf.add_pairwise_bilateral(20.0, 13.0, images, 10.0, normalization=mode)
    return crf


def op_by_op(crf: MeanFieldCRF, iterations: int) -> torch.Tensor:
    """The same inference through the separate ops (splat -> blur -> slice per kernel, then the update)."""
    with torch.no_grad():
        return crf._iterate_without_grad(crf._softmax_of_unary(), iterations)


def segops_ops_called(fn) -> list:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name.startswith("segops::")]


def iteration_rounding_bound(crf: MeanFieldCRF, K: int) -> float:
    """How far one float32 mean-field iteration, by any of the schedules (the separate ops; the one-op CPU
    schedule, whose AVX2 / AVX-512 builds fuse multiply-adds and sum the softmax as a tree; the shared / CUDA
    schedule with its piece sums and expf), can be from the same iteration in exact arithmetic. Two schedules
    differ by at most twice this. Each rounding counts as eps (twice the unit roundoff: room for the
    second-order terms), along the longest chain of operations:

    - exp within delta = 4 eps relative: the degree-6 Taylor polynomial on |r| <= ln2 / 2 truncates by <= 2 eps
      and its Horner steps round by <= 2 eps, with or without FMA (measured over 8 M arguments: 2.1 eps without,
      1.9 with); CUDA's expf is within 2 ulp;
    - softmax(-U): numerator, K - 1 sums and the division, relative rho0 = 2 delta + (K + 1) eps;
    - a message is non-negative and linear in the marginals, so it keeps rho0 relative and adds its own
      roundings: the splat's n_max contributions with a product each and the pre-scale (2 n_max + 5; summing
      in up to 4 chunks, or in pieces of 128 and then the pieces, makes no chain longer), the blur's two per direction (2 V), the slice's V products and sums and the alpha,
      weight and post-scale products (2 V + 3), and the normalisation scales: the degrees W 1 through the same
      splat, blur and slice, a reciprocal and a square root (n_max + 4 V + 8);
    - a logit adds the unary and T messages (P: the largest sum of the messages' magnitudes at a point): it moves
      by <= P msg + (T + 1) eps (max|U| + P);
    - the last softmax moves a marginal by <= 2 max|logit change|, its arguments' rounding by <= eps |x| e^x <=
      eps, adds its own 2 delta + (K + 1) eps, and flushing denormals to zero moves it by < 1.2e-38.
    """
    eps = EPS32
    lattices = [k.lattice.tensors()[0] for k in crf.kernels]
    n_max = max(int(torch.bincount(v.flatten().long()).max()) for v in lattices)
    V = max(int(v.shape[-1]) for v in lattices)
    messages, scales, weights = crf._terms(crf._softmax_of_unary())
    pairwise = float(sum((m * (w if s is None else s * w)).abs() for m, s, w in zip(messages, scales, weights)).max())
    delta = 4 * eps
    rho0 = 2 * delta + (K + 1) * eps
    msg = rho0 + (3 * n_max + 8 * V + 16) * eps
    dl = pairwise * msg + (len(crf.kernels) + 1) * eps * (float(crf.unary.abs().max()) + pairwise)
    return 2 * dl + 2 * delta + (K + 2) * eps + float(torch.finfo(torch.float32).tiny)


@pytest.mark.parametrize("K", [1, 3, 8, 21, 64])
@pytest.mark.parametrize("mode", ["none", "before", "after", "symmetric"])
def test_one_op_schedule_matches_op_by_op(K, mode):
    # H W = 667 points: five blocks of 128 and a tail, groups of 4 with a remainder; B = 2 with a shared lattice
    crf = two_kernel_crf(2, K, 23, 29, mode, seed=K)
    with torch.no_grad():
        got = crf.inference(1)
    want = op_by_op(crf, 1)
    # the one-op schedule fuses multiply-adds (AVX2 / AVX-512) and sums the softmax as a tree: both schedules are
    # within iteration_rounding_bound of exact arithmetic
    torch.testing.assert_close(got, want, rtol=0, atol=2 * iteration_rounding_bound(crf, K))



def shared_schedule_bound(crf: MeanFieldCRF, K: int) -> float:
    """The bound of test_one_op_schedule_matches_op_by_op for the shared (CUDA's) schedule against the op-by-op
    one. The softmax sums in class order like the update op; the splats (of the marginals and of the ones
    behind the normalisation scales) gather each vertex's n non-negative contributions in pieces of 128 instead
    of one run: each order is within (n - 1) eps of the exact sum, so the splatted values move by <= 2 (n_max - 1)
    eps relative, the scales (1 / w1, or its square root twice) by as much, and each message, through the
    non-negative blur and slice, by <= 4 (n_max - 1) eps relative; marginals move by <= 2 max|logit change|."""
    n_max = max(int(torch.bincount(k.lattice.tensors()[0].flatten().long()).max()) for k in crf.kernels)
    messages, scales, weights = crf._terms(crf._softmax_of_unary())
    pairwise = float(sum((m * (w if s is None else s * w)).abs() for m, s, w in zip(messages, scales, weights)).max())
    return 2 * (K - 1) * EPS32 * (2 * pairwise + 1) + 2 * 4 * (n_max - 1) * EPS32 * pairwise + 4 * EPS32


@pytest.mark.parametrize("K", [1, 3, 21, 64])
@pytest.mark.parametrize("mode", ["none", "before", "after", "symmetric"])
def test_shared_schedule_matches_op_by_op(K, mode, monkeypatch):
    # CUDA's one-op schedule (gather splats, one slice-and-update pass per iteration, marginals in (N, B, K) rows)
    # run on the CPU: B = 2 with a lattice shared by the batch (the positions) and one per image
    crf = two_kernel_crf(2, K, 23, 29, mode, seed=K)
    args = iterate_args(crf)
    monkeypatch.setenv("SEGOPS_MEANFIELD_SHARED", "1")
    got = torch.ops.segops._crf_mean_field_iterate(*args, 1)
    assert torch.equal(torch.ops.segops._crf_mean_field_iterate(*args, 1), got)  # deterministic
    monkeypatch.delenv("SEGOPS_MEANFIELD_SHARED")
    torch.testing.assert_close(got, op_by_op(crf, 1), rtol=0, atol=shared_schedule_bound(crf, K))


@pytest.mark.parametrize("mode", ["none", "before", "symmetric"])
def test_shared_schedule_sums_crowded_vertices_in_pieces(mode, monkeypatch):
    # Positions 10 pixels wide crowd a vertex with up to 268 entries (33 vertices with more than 128): the gather
    # splat sums them in pieces of 128, then sums each vertex's pieces. A vertex's last piece left out moves the
    # marginals by 5e-3 (normalised) to 0.94 (none), beyond the bound; its rounding stays well inside it.
    unary, images = small_case(B=2, K=5, H=48, W=56, seed=4)
    crf = MeanFieldCRF(unary)
    crf.add_pairwise_gaussian(10.0, 3.0, normalization=mode)
    crf.add_pairwise_bilateral(20.0, 13.0, images, 10.0, normalization=mode)
    counts = torch.bincount(crf.kernels[0].lattice.tensors()[0].flatten().long())
    assert int((counts > 128).sum()) > 0
    monkeypatch.setenv("SEGOPS_MEANFIELD_SHARED", "1")
    got = torch.ops.segops._crf_mean_field_iterate(*iterate_args(crf), 1)
    monkeypatch.delenv("SEGOPS_MEANFIELD_SHARED")
    torch.testing.assert_close(got, op_by_op(crf, 1), rtol=0, atol=shared_schedule_bound(crf, 5))


def test_shared_schedule_iterations_opcheck_and_errors(monkeypatch):
    # 4 iterations (the rows overwritten in place after each pass's splats) against the op-by-op schedule: each
    # step adds at most the one-step bound to the difference carried in, and the update passes a difference in
    # the marginals on no larger here (the normalised filters' messages are averages of the marginals times the
    # Potts weights, and the softmax damps): 4 one-step bounds. (Measured: 1.9e-6 against 4 x 2.1e-4.)
    crf = two_kernel_crf(2, 5, 23, 29, "symmetric", seed=31)
    args = iterate_args(crf)
    monkeypatch.setenv("SEGOPS_MEANFIELD_SHARED", "1")
    got = torch.ops.segops._crf_mean_field_iterate(*args, 4)
    torch.testing.assert_close(got, op_by_op(crf, 4), rtol=0, atol=4 * shared_schedule_bound(crf, 5))
    torch.library.opcheck(torch.ops.segops._crf_mean_field_iterate.default, (*args, 2))
    u, vx, ba, nb, modes, w = args
    with pytest.raises(RuntimeError, match="unary must be float32"):
        torch.ops.segops._crf_mean_field_iterate(u.double(), vx, ba, nb, modes, w, 2)
    with pytest.raises(RuntimeError, match="the lattice of kernel 0 has 1 images of 667 points"):
        torch.ops.segops._crf_mean_field_iterate(u[:, :, :8], vx, ba, nb, modes, w, 2)


def test_one_op_schedule_flushes_denormal_marginals_and_restores_the_callers_mode():
    # Classes 2.. lie 200 below two tied ones: their marginals, exp's clamp at -87 over a denominator of ~2, are
    # below float32's smallest normal (1.18e-38). The one-op schedule runs with denormals flushed to zero (x86:
    # FTZ/DAZ in its worker threads, for speed: they take a slow path); the op-by-op schedule keeps them. Nothing
    # else moves beyond the bound of test_one_op_schedule_matches_op_by_op.
    K = 5
    unary, images = small_case(B=2, K=K, H=23, W=29, seed=8)
    unary[:, :2] = 0.0
    unary[:, 2:] = 200.0
    crf = MeanFieldCRF(unary)
    crf.add_pairwise_bilateral(20.0, 13.0, images, 10.0, normalization="none")
    want = op_by_op(crf, 1)
    x = torch.full((4,), 1e-39)  # a float32 denormal
    assert bool((x * 1.0 > 0).all())
    with torch.no_grad():
        got = crf.inference(1)
    assert bool((x * 1.0 > 0).all())  # the calling thread's mode is restored
    tiny = torch.finfo(torch.float32).tiny
    assert bool(((want > 0) & (want < tiny)).any())
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        assert not bool(((got > 0) & (got < tiny)).any())
    torch.testing.assert_close(got, want, rtol=0, atol=2 * iteration_rounding_bound(crf, K))  # (with |U| = 200)


def photo_crf(crops, K: int, seed: int) -> MeanFieldCRF:
    """Photos (name, top, left, H, W crops of one size), a random unary, the positions kernel (shared by the batch)
    and a bilateral one with the benchmark's bandwidths: photos' smooth regions keep the lattices small (~21 K
    vertices at 512²), so the one-op schedule splits each image's pixels into its splat chunks (S = 2 from
    2^17 pixels per image, 4 from 2^18); random colours would give more vertices than pixels and one chunk."""
    images = torch.stack([torch.from_numpy(photo(*c)).permute(2, 0, 1) for c in crops]).contiguous()
    B, _, H, W = images.shape
    unary = torch.rand(B, K, H, W, generator=torch.Generator().manual_seed(seed)) * 3
    crf = MeanFieldCRF(unary)
    crf.add_pairwise_gaussian(3.0, 3.0)
    crf.add_pairwise_bilateral(80.0, 13.0, images, 10.0)
    return crf


@pytest.mark.parametrize("crops", [
    [("astronaut", 0, 0, 512, 512)],                                  # 2^18 pixels: 4 chunks
    [("astronaut", 50, 60, 400, 400), ("coffee", 0, 100, 400, 400)],  # 160 000 pixels per image: 2 chunks each
], ids=["one-image-4-chunks", "two-images-2-chunks"])
def test_one_op_schedule_chunked_splat_matches_and_ignores_threads(crops):
    # each chunk splats into its own grid, the grids are added in chunk order: the same bits for any number of
    # threads, and the sums are among the roundings iteration_rounding_bound counts (a chunk's grid lost or added
    # twice moves the marginals far beyond it)
    crf = photo_crf(crops, K=3, seed=21)
    old = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with torch.no_grad():
                runs.append(crf.inference(1))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    torch.testing.assert_close(runs[0], op_by_op(crf, 1), rtol=0, atol=2 * iteration_rounding_bound(crf, 3))


def _exact_iteration(unary: torch.Tensor, vertex: torch.Tensor, neighbors: torch.Tensor, weight: float):
    """One unnormalised mean-field iteration in float64 from the one-hot marginals of argmin(unary), with every
    barycentric weight 1, and whether each of its sums is exact in float32 too: (marginals (B, K, H, W),
    max |logit|, exact). A lattice of one image for a batch of B (vertex (1, N, V)) is each image's."""
    B, K, H, W = unary.shape
    N, V, M = H * W, vertex.shape[2], neighbors.shape[0]
    nb = torch.where(neighbors < 0, M, neighbors).long()                                 # row M: absent
    ids = vertex.reshape(-1, N * V).long().expand(B, N * V)
    out, L, exact = torch.empty(B, K, N, dtype=torch.float64), 0.0, True
    for b in range(B) if vertex.shape[0] == 1 else [None]:
        images = range(B) if b is None else [b]
        q = torch.cat([torch.nn.functional.one_hot(unary[i].argmin(0).reshape(-1), K).double() for i in images])
        rows = torch.cat([ids[i] for i in images])
        grid = torch.zeros(M + 1, K, dtype=torch.float64)
        grid.index_add_(0, rows, q.repeat_interleave(V, 0))
        exact = exact and torch.equal(grid, grid.float().double())
        for j in range(V):
            grid[:M] = grid[:M] + 0.5 * (grid[nb[:, j, 0]] + grid[nb[:, j, 1]])
            exact = exact and torch.equal(grid, grid.float().double())
        s = grid[rows].reshape(-1, V, K).sum(1)                                           # (points, K)
        exact = exact and torch.equal(s, s.float().double())
        u = torch.cat([unary[i].double().reshape(K, N).T for i in images])
        logits = -u + weight / (1 + 2.0 ** -(V - 1)) * s
        L = max(L, logits.abs().max().item())
        out[list(images)] = torch.softmax(logits, 1).reshape(len(images), N, K).transpose(1, 2)
    return out.reshape(B, K, H, W), L, exact


@pytest.mark.parametrize("crops,shared", [
    ([("astronaut", 0, 0, 512, 512)], False),                                  # 2^18 pixels: 4 chunks
    ([("astronaut", 50, 60, 400, 400), ("coffee", 0, 100, 400, 400)], False),  # 2 chunks per image
    ([("astronaut", 50, 60, 400, 400), ("coffee", 0, 100, 400, 400)], True),   # the first one's lattice for both
], ids=["one-image-4-chunks", "two-images-2-chunks", "two-images-one-lattice"])
@pytest.mark.parametrize("schedule", ["cpu", "shared", "cuda"])
def test_one_op_schedule_chunks_add_up_exactly(crops, shared, schedule, monkeypatch):
    # Photos (4 or 2 splat chunks per image, each touching its own band of vertex rows) with every barycentric
    # weight 1 and one-hot starting marginals (unary 0 for the pixel's label, 100 for the other classes): then
    # every splat, blur and slice sum is an integer times a power of two that float32 holds exactly (checked), so
    # the one-op iteration differs from exact arithmetic only after the sums. The labels are K vertical bands with
    # 30% of the pixels relabelled at random, which the messages mostly correct. After the sums, with
    # L = max |logit| and eps = 2^-23: the weight times alpha, the logit's one or two roundings (<= eps L),
    # l - max (<= eps L), exp (<= 4 eps relative) and the softmax's sum and division (<= 2 eps):
    # |error| <= (4 L + 10) eps. The starting marginals of the other classes are e^-87 in float32 (exp's clamp),
    # not 0: <= 1e-30 in any sum. Measured at 512²: 1.2e-5 against the bound's 1.5e-3 (L = 3125); with the last
    # 50 rows of each chunk's band lost, 0.066. "shared": the same for CUDA's schedule run on the CPU (its splat
    # sums pieces of at most 128 entries; these photos crowd thousands onto a vertex), and on the GPU (expf:
    # within 2 ulp).
    if schedule == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if schedule == "shared":
        monkeypatch.setenv("SEGOPS_MEANFIELD_SHARED", "1")
    images = torch.stack([torch.from_numpy(photo(*c)).permute(2, 0, 1) for c in crops]).float()
    B, _, H, W = images.shape
    feats = R.crf_features(images[:1] if shared else images, sigma_rgb=13.0, sigma_xy=80.0)
    vertex, bary, neighbors = torch.ops.segops.permutohedral_lattice(feats)
    g = torch.Generator().manual_seed(7)
    K = 3
    labels = (torch.arange(W) * K // W).view(1, 1, 1, W).expand(B, 1, H, W)           # K vertical bands
    noise = torch.rand(B, 1, H, W, generator=g) < 0.3                                  # 30% of them wrong
    labels = torch.where(noise, torch.randint(0, K, (B, 1, H, W), generator=g), labels)
    unary = torch.full((B, K, H, W), 100.0).scatter_(1, labels, 0.0)
    weight = 2.0 ** -6
    expected, L, exact = _exact_iteration(unary, vertex, neighbors, weight)
    assert exact, "the premise: every sum is exact in float32"
    # the premise that the test can fail: the messages relabel many pixels (most wrong ones: their band's class)
    assert (expected.argmax(1) != labels[:, 0]).double().mean().item() > 0.1
    dev = "cuda" if schedule == "cuda" else "cpu"
    ones = torch.ones_like(bary, device=dev)
    got = torch.ops.segops._crf_mean_field_iterate(unary.to(dev), [vertex.to(dev)], [ones], [neighbors.to(dev)], [0],
                                                   [weight], 1)
    torch.testing.assert_close(got.cpu().double(), expected, rtol=0, atol=(4 * L + 10) * 2.0 ** -23)


def test_one_op_schedule_runs_for_no_grad_potts_cpu_float32_only():
    crf = two_kernel_crf(2, 5, 12, 14, "symmetric", seed=3)
    with torch.no_grad():
        names = segops_ops_called(lambda: crf.inference(3))
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert names.count("segops::_crf_mean_field_iterate") == 1
        assert "segops::_crf_mean_field_update_out" not in names and "segops::permutohedral_apply" not in names
    else:  # the portable build of the one-op schedule is slower than the separate ops: not chosen
        assert "segops::_crf_mean_field_iterate" not in names and "segops::_crf_mean_field_update_out" in names
    # with a graph to build, float64, a compatibility matrix or more than 64 classes: the separate ops
    unary, images = small_case(B=1, K=5, H=12, W=14, seed=1)
    cases = [
        lambda: dense_crf_inference(unary.clone().requires_grad_(), images, 2),
        lambda: dense_crf_inference(unary.double(), images, 2),
        lambda: dense_crf_inference(unary, images, 2, bilateral_compat=-10 * torch.eye(5)),
        lambda: dense_crf_inference(small_case(B=1, K=65, H=6, W=7)[0], small_case(B=1, H=6, W=7)[1], 2),
    ]
    for case in cases:
        names = segops_ops_called(case)
        assert "segops::_crf_mean_field_iterate" not in names and "segops::crf_mean_field_update" in names


def iterate_args(crf: MeanFieldCRF):
    vertex, bary, neighbors, modes, weights = crf._fused_terms()
    return [crf.unary, vertex, bary, neighbors, modes, weights]


ISA_CLASSES = (5, 16, 21, 40)  # 1, 2, 3 and 5 pieces of 8 classes: the AVX-512 clone's half and whole vectors


def isa_case(k: int) -> MeanFieldCRF:
    return two_kernel_crf(2, k, 23, 29, "symmetric", seed=11)


def iterate_on_every_class_count(iterations: int) -> list:
    return [torch.ops.segops._crf_mean_field_iterate(*iterate_args(isa_case(k)), iterations) for k in ISA_CLASSES]


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_iterate_op_builds_on_every_instruction_set(tmp_path, capability):
    """The one-op schedule's AVX2 clone (ATEN_CPU_CAPABILITY=avx2) and its AVX-512 clone (the native run on an
    AVX-512 CPU) do the same operations in the same order, fused multiply-adds included: identical marginals
    (3 iterations: first, middle and last passes). The portable build (=default; never chosen by inference, which
    runs the separate ops on such CPUs) rounds products separately: one iteration within twice
    iteration_rounding_bound of the clones. The capability is read once per process, so the capped run is a
    subprocess (on a CPU without AVX2 / AVX-512 the runs share a build and the test checks less)."""
    import os
    import subprocess
    import sys

    iterations = 3 if capability == "avx2" else 1
    here = os.path.dirname(os.path.abspath(__file__))
    out = tmp_path / "capped.pt"
    code = ("import sys, torch; sys.path.insert(0, %r); import test_crf_inference as t; "
            "torch.save(t.iterate_on_every_class_count(%d), %r)" % (here, iterations, str(out)))
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for k, capped, native in zip(ISA_CLASSES, torch.load(out), iterate_on_every_class_count(iterations)):
        if capability == "avx2":
            assert torch.equal(capped, native), k
        else:
            torch.testing.assert_close(capped, native, rtol=0, atol=2 * iteration_rounding_bound(isa_case(k), k))


def test_iterate_op_reused_rows_buffer_changes_nothing():
    # The op keeps its largest buffer (the unary's point-major rows) for the next call: a call after a larger
    # one (whose leftover rows are still in the buffer), and one with fewer classes (other pad columns), give
    # the bits of a first call.
    small = two_kernel_crf(1, 5, 12, 14, "symmetric", seed=21)
    first = torch.ops.segops._crf_mean_field_iterate(*iterate_args(small), 2)
    big = two_kernel_crf(2, 21, 23, 29, "symmetric", seed=22)
    torch.ops.segops._crf_mean_field_iterate(*iterate_args(big), 2)
    assert torch.equal(torch.ops.segops._crf_mean_field_iterate(*iterate_args(small), 2), first)
    fewer = two_kernel_crf(1, 3, 12, 14, "symmetric", seed=23)
    alone = torch.ops.segops._crf_mean_field_iterate(*iterate_args(fewer), 2)
    torch.ops.segops._crf_mean_field_iterate(*iterate_args(big), 2)
    assert torch.equal(torch.ops.segops._crf_mean_field_iterate(*iterate_args(fewer), 2), alone)


def test_iterate_op_opcheck_and_errors():
    crf = two_kernel_crf(2, 4, 9, 11, "symmetric", seed=5)
    args = iterate_args(crf)
    torch.library.opcheck(torch.ops.segops._crf_mean_field_iterate.default, (*args, 2))
    op = torch.ops.segops._crf_mean_field_iterate.default
    u, vx, ba, nb, modes, w = args
    cases = [
        ((u.double(), vx, ba, nb, modes, w, 2), "unary must be float32"),
        ((u.new_zeros(2, 65, 9, 11), vx, ba, nb, modes, w, 2), "1 to 64 classes"),
        ((u, vx, ba, nb, modes, w, 0), "iterations must be >= 1"),
        ((u, vx, ba, nb, [1, 4], w, 2), r"normalization\[1\] must be 0 \(none\)"),
        ((u, vx[:1], ba, nb, modes, w, 2), "one entry per kernel"),
        ((u, [vx[0].long(), vx[1]], ba, nb, modes, w, 2), r"vertex\[0\] \(int32\)"),
        ((u[:, :, :8], vx, ba, nb, modes, w, 2), "the lattice of kernel 0 has 1 images of 99 points"),
        ((u, vx, ba, [nb[0], nb[1][:, :2]], modes, w, 2), r"neighbors\[1\] must be \(M, d\+1, 2\)"),
        ((u, vx, ba, [nb[0][:0], nb[1]], modes, w, 2), r"the lattice of kernel 0 has no vertices"),
        ((u, vx, ba, nb, modes, [1.0, math.inf], 2), r"weights\[1\] must be finite"),
        ((u, vx * 9, ba * 9, nb * 9, modes * 9, w * 9, 2), "1 to 8 kernels"),
    ]
    for case, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            op(*case)


# ---- a pure-PyTorch twin (the reference lattice, per image, no shared lattice) -----------------------------


def twin_inference(unary, images, iterations, gsxy, gcompat, bsxy, bsrgb, bcompat, mode):
    """The mean-field loop written out on segops.reference_lattice, one image at a time."""
    B, K, H, W = unary.shape
    dtype = unary.dtype
    outs = []
    for b in range(B):
        u = unary[b:b + 1]
        xs = torch.arange(W, dtype=dtype).view(1, W).expand(H, W)
        ys = torch.arange(H, dtype=dtype).view(H, 1).expand(H, W)
        feats = []
        if gcompat != 0:
            feats.append((torch.stack([xs / gsxy, ys / gsxy])[None], gcompat))
        if bcompat != 0:
            f = torch.cat([torch.stack([xs / bsxy, ys / bsxy]), images[b].to(dtype) / bsrgb])[None]
            feats.append((f, bcompat))
        q = torch.softmax(-u, 1)
        for _ in range(iterations):
            logits = -u
            for f, w in feats:
                n = R.permutohedral_filter(torch.ones_like(u[:, :1]), f)
                pre = {"symmetric": n.rsqrt(), "before": 1 / n}.get(mode)
                post = {"symmetric": n.rsqrt(), "after": 1 / n}.get(mode)
                x = R.permutohedral_filter(q if pre is None else q * pre, f)
                logits = logits + w * (x if post is None else x * post)  # Potts: the message is -w x
            q = torch.softmax(logits, 1)
        outs.append(q)
    return torch.cat(outs)


@given(
    B=st.integers(1, 2), K=st.integers(1, 5), H=st.integers(1, 8), W=st.integers(1, 8),
    iterations=st.integers(0, 3), mode=st.sampled_from(["none", "before", "after", "symmetric"]),
    gcompat=st.sampled_from([0.0, 3.0, -1.5]), bcompat=st.sampled_from([0.0, 10.0, 2.5]),
    seed=st.integers(0, 2**16),
)
def test_matches_twin(B, K, H, W, iterations, mode, gcompat, bcompat, seed):
    g = torch.Generator().manual_seed(seed)
    unary = torch.rand(B, K, H, W, generator=g, dtype=torch.float64) * 4
    images = torch.randint(0, 256, (B, 3, H, W), generator=g, dtype=torch.uint8)
    got = dense_crf_inference(unary, images, iterations, 2.0, gcompat, 5.0, 20.0, bcompat, mode)
    want = twin_inference(unary, images, iterations, 2.0, gcompat, 5.0, 20.0, bcompat, mode)
    # float64 on both sides with the same lattice steps; only summation orders differ: ~1e-15 per filter,
    # times the pairwise weights (<= 10) and W 1 (<= ~10^2 unnormalised) over <= 3 iterations.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


# ---- properties ------------------------------------------------------------------------------------------------


def small_case(B=2, K=4, H=11, W=13, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    unary = (torch.rand(B, K, H, W, generator=g) * 3).to(dtype)
    images = torch.randint(0, 256, (B, 3, H, W), generator=g, dtype=torch.uint8)
    return unary, images


def test_zero_iterations_and_switched_off_kernels_give_softmax():
    unary, images = small_case()
    expected = torch.softmax(-unary, 1)
    got = dense_crf_inference(unary, images, 0)
    # the fused update's exp (~1 ulp) and a K-term normalisation against torch's softmax: 4 eps on values <= 1
    torch.testing.assert_close(got, expected, rtol=0, atol=4 * EPS32)
    assert torch.equal(dense_crf_inference(unary, images, 7, gaussian_compat=0, bilateral_compat=0), got)
    assert torch.equal(dense_crf_inference(unary, None, 3, gaussian_compat=0, bilateral_compat=0), got)


def test_marginals_are_distributions_and_smooth_the_unary():
    unary, images = small_case(K=5, H=20, W=24)
    images = torch.zeros_like(images)  # one colour: only the smoothing remains
    q = dense_crf_inference(unary, images, 5)
    assert q.shape == unary.shape and q.dtype == unary.dtype
    assert bool((q >= 0).all())
    torch.testing.assert_close(q.sum(1), torch.ones_like(q[:, 0]), rtol=0, atol=8 * EPS32 * 5)  # K-term sums
    # Potts smoothing on a constant image pulls labels towards agreement: fewer label changes between
    # neighbours than the unary's own argmax
    def changes(lab):
        return int((lab[:, 1:] != lab[:, :-1]).sum() + (lab[:, :, 1:] != lab[:, :, :-1]).sum())
    assert changes(q.argmax(1)) < changes((-unary).argmax(1))


def test_potts_is_the_negative_identity_matrix():
    unary, images = small_case(K=3, dtype=torch.float64)
    a = dense_crf_inference(unary, images, 4, gaussian_compat=3.0, bilateral_compat=10.0)
    eye = torch.eye(3, dtype=torch.float64)
    b = dense_crf_inference(unary, images, 4, gaussian_compat=-3.0 * eye, bilateral_compat=torch.tensor(10.0))
    c = dense_crf_inference(unary, images, 4, gaussian_compat=torch.full((3,), -3.0), bilateral_compat=-10.0 * eye)
    # the same products in float64, only the order of multiplication differs
    torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    torch.testing.assert_close(a, c, rtol=0, atol=1e-14)


def test_batch_equals_per_image():
    unary, images = small_case(B=3, K=5, H=17, W=19, seed=4)
    feats = torch.rand(3, 2, 17, 19, generator=torch.Generator().manual_seed(1)) * 4
    kern = [CRFKernel(feats, 2.0, "after")]
    batch = dense_crf_inference(unary, images, 5, kernels=kern)
    for b in range(3):
        one = dense_crf_inference(unary[b:b + 1], images[b:b + 1], 5,
                                  kernels=[CRFKernel(feats[b:b + 1], 2.0, "after")])
        # each image runs the same float32 arithmetic alone or in the batch (the shared position lattice filters
        # the batch's channels side by side); 4 eps of marginals <= 1 covers a reordered channel block
        torch.testing.assert_close(batch[b:b + 1], one, rtol=0, atol=4 * EPS32)


def test_float64_agrees_with_float32():
    unary, images = small_case(K=6, H=24, W=20, seed=2)
    q32 = dense_crf_inference(unary, images, 5)
    q64 = dense_crf_inference(unary.double(), images, 5)
    assert q64.dtype == torch.float64
    # float32 rounding of the lattice and the logits (pairwise logits <= ~13 here): ~10 eps * 13 per iteration
    torch.testing.assert_close(q32.double(), q64, rtol=0, atol=128 * EPS32 * 13)


def test_thread_count_does_not_change_results():
    """Each pixel's update is computed alone and the lattice is deterministic: bitwise the same for 1 and 2
    threads (the blocked update splits the pixels into tasks differently)."""
    unary, images = small_case(B=2, K=21, H=33, W=70, seed=8)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dense_crf_inference(unary, images, 3)
        torch.set_num_threads(2)
        two = dense_crf_inference(unary, images, 3)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


def test_half_unary_is_computed_in_float32():
    unary, images = small_case(K=3)
    q = dense_crf_inference(unary.half(), images, 3)
    assert q.dtype == torch.float16
    ref = dense_crf_inference(unary.half().float(), images, 3)
    torch.testing.assert_close(q.float(), ref, rtol=0, atol=2 ** -11)  # one float16 rounding of values <= 1


def test_user_kernel_equals_built_in_bilateral():
    unary, images = small_case(K=3, seed=5)
    B, _, H, W = unary.shape
    xs = torch.arange(W, dtype=torch.float32).view(1, 1, 1, W).expand(B, 1, H, W)
    ys = torch.arange(H, dtype=torch.float32).view(1, 1, H, 1).expand(B, 1, H, W)
    feats = torch.cat([xs / 30, ys / 30, images.float() / 13], 1)
    a = dense_crf_inference(unary, images, 4, bilateral_sxy=30, bilateral_srgb=13)
    b = dense_crf_inference(unary, images, 4, bilateral_compat=0, kernels=[CRFKernel(feats, 10.0)])
    assert torch.equal(a, b)


def test_flat_unary_with_user_features():
    unary, _ = small_case(B=2, K=3, H=1, W=40)
    flat = unary.reshape(2, 3, 40)
    feats = torch.linspace(0, 8, 40).view(1, 1, 40)
    crf = MeanFieldCRF(flat)
    crf.add_pairwise_energy(feats, 5.0)
    q = crf.inference(3)
    crf4 = MeanFieldCRF(unary)
    crf4.add_pairwise_energy(feats.view(1, 1, 1, 40), 5.0)
    assert torch.equal(q, crf4.inference(3).reshape(2, 3, 40))


def test_empty_inputs():
    for shape in [(0, 3, 4, 5), (2, 3, 0, 5), (1, 3, 4, 0)]:
        unary = torch.zeros(shape)
        images = torch.zeros((shape[0], 3) + shape[2:], dtype=torch.uint8)
        q = dense_crf_inference(unary, images, 3)
        assert q.shape == shape


# ---- gradients (CRF-as-RNN) ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["none", "before", "after", "symmetric"])
def test_gradcheck(mode):
    g = torch.Generator().manual_seed(3)
    unary = (torch.rand(1, 3, 3, 4, generator=g, dtype=torch.float64) * 2).requires_grad_()
    images = torch.randint(0, 256, (1, 3, 3, 4), generator=g, dtype=torch.uint8)
    w = 0.3 if mode == "none" else 2.0  # keep the unnormalised logits O(1) so the check is well conditioned
    gauss = torch.tensor(w * 1.5, dtype=torch.float64, requires_grad=True)
    matrix = (torch.randn(3, 3, generator=g, dtype=torch.float64) * w).requires_grad_()

    def f(u, gc, m):
        return dense_crf_inference(u, images, 2, 2.0, gc, 4.0, 30.0, m, mode)

    assert torch.autograd.gradcheck(f, (unary, gauss, matrix))


def test_module_learns_compat():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, 8, 9, generator=g, dtype=torch.float64, requires_grad=True)
    images = torch.randint(0, 256, (1, 3, 8, 9), generator=g, dtype=torch.uint8)
    crf = snn.DenseCRF(iterations=3, learn_compat=True).double()
    q = crf(logits, images)
    q[:, 0].sum().backward()
    assert logits.grad is not None and crf.gaussian_compat.grad is not None and crf.bilateral_compat.grad is not None
    assert float(crf.gaussian_compat.grad.abs()) > 0 and float(crf.bilateral_compat.grad.abs()) > 0
    # the module is the functional op on unary = -logits; tensor weights take the message path (weight * W q
    # in torch, then -1 in the update) instead of passing the weight to the update: float64 rounding order only
    want = dense_crf_inference(-logits.detach(), images, 3, 3.0, 3.0, 80.0, 13.0, 10.0)
    torch.testing.assert_close(q.detach(), want, rtol=0, atol=1e-14)


def test_module_deeplab_defaults_and_overrides():
    m = snn.DenseCRF.deeplab()
    assert (m.iterations, m.gaussian_sxy, m.gaussian_compat) == (10, 3.0, 3.0)
    assert (m.bilateral_sxy, m.bilateral_srgb, m.bilateral_compat) == (121.0, 5.0, 4.0)
    m2 = snn.DenseCRF.deeplab(iterations=3, bilateral_srgb=10.0)
    assert (m2.iterations, m2.bilateral_srgb, m2.bilateral_sxy) == (3, 10.0, 121.0)
    assert "bilateral_sxy=121" in repr(m)


# ---- errors ------------------------------------------------------------------------------------------------------


def test_errors_name_the_argument():
    unary, images = small_case()
    bad = [
        (dict(unary=unary[0]), ValueError, "unary must be"),
        (dict(unary=unary.long()), TypeError, "unary must be floating"),
        (dict(unary=unary.clone().index_fill_(1, torch.tensor([0]), float("nan"))), ValueError, "unary contains NaN"),
        (dict(unary=unary.clone().index_fill_(1, torch.tensor([1]), -float("inf"))), ValueError, "unary contains"),
        (dict(images=images[:1]), ValueError, "images must be"),
        (dict(images=images[:, :, :5]), ValueError, "images must be"),
        (dict(images=images.to(torch.int32)), TypeError, "images must be uint8"),
        (dict(images=torch.zeros(2, 15, 11, 13)), ValueError, "1..14 channels"),
        (dict(images=images.float().index_fill_(2, torch.tensor([3]), float("inf"))), ValueError, "images contain"),
        (dict(images=None), ValueError, "images are needed"),
        (dict(iterations=-1), ValueError, "iterations"),
        (dict(iterations=2.5), ValueError, "iterations"),
        (dict(gaussian_sxy=0.0), ValueError, "sxy must be a positive"),
        (dict(gaussian_sxy=(1.0, 2.0, 3.0)), ValueError, "sxy must be a number or 2"),
        (dict(bilateral_sxy=float("inf")), ValueError, "sxy must be a positive"),
        (dict(bilateral_srgb=-1.0), ValueError, "srgb must be a positive"),
        (dict(bilateral_srgb=(1.0, 2.0)), ValueError, "srgb must be a number or 3"),
        (dict(gaussian_compat=float("nan")), ValueError, "compat must be finite"),
        (dict(bilateral_compat=torch.ones(5)), ValueError, "compat must be a number, a (K,)"),
        (dict(bilateral_compat=torch.ones(4, 3)), ValueError, "compat must be a number, a (K,)"),
        (dict(bilateral_compat=torch.tensor([1.0, float("inf"), 0, 0])), ValueError, "compat contains NaN"),
        (dict(bilateral_compat="potts"), TypeError, "compat must be"),
        (dict(normalization="sym"), ValueError, "normalization must be one of"),
        (dict(normalization=7), ValueError, "normalization must be one of"),
        (dict(kernels=[torch.zeros(2, 2, 11, 13)]), TypeError, "kernels[0] must be a segops.ops.CRFKernel"),
        (dict(kernels=[CRFKernel(torch.zeros(2, 2, 11, 12), 1.0)]), ValueError, "features must be (B or 1, d)"),
        (dict(kernels=[CRFKernel(torch.zeros(2, 17, 11, 13), 1.0)]), ValueError, "1..16 dimensions"),
        (dict(kernels=[CRFKernel(torch.zeros(2, 2, 11, 13, dtype=torch.long), 1.0)]), TypeError, "features must be"),
        (dict(kernels=[CRFKernel(torch.full((2, 2, 11, 13), float("nan")), 1.0)]), ValueError, "features contain"),
    ]
    for kwargs, exc, msg in bad:
        args = dict(unary=unary, images=images)
        args.update(kwargs)
        with pytest.raises(exc) as info:
            dense_crf_inference(**args)
        assert msg in str(info.value), (kwargs, str(info.value))


def test_module_and_helper_errors():
    with pytest.raises(ValueError, match="iterations"):
        snn.DenseCRF(iterations=-2)
    with pytest.raises(ValueError, match="bilateral_compat must be a finite number"):
        snn.DenseCRF(bilateral_compat=float("inf"))
    with pytest.raises(ValueError, match="gaussian_sxy must be a positive"):
        snn.DenseCRF(gaussian_sxy=-3)
    with pytest.raises(TypeError, match="logits must be a floating"):
        snn.DenseCRF()(torch.zeros(1, 2, 3, 3, dtype=torch.long), torch.zeros(1, 3, 3, 3))
    unary, images = small_case()
    crf = MeanFieldCRF(unary)
    with pytest.raises(ValueError, match="Q must have the unary's shape"):
        crf.step_inference(unary[:1])
    with pytest.raises(ValueError, match="needs a \\(B, K, H, W\\) unary"):
        MeanFieldCRF(unary.flatten(2)).add_pairwise_gaussian(3.0, 3.0)
    with pytest.raises(ValueError, match="clip must be in"):
        unary_from_softmax(torch.rand(1, 2, 3), clip=0.0)
    with pytest.raises(ValueError, match="labels must lie in"):
        unary_from_labels(torch.tensor([[0, 9]]), 3, 0.5)
    with pytest.raises(ValueError, match="gt_prob"):
        unary_from_labels(torch.tensor([[0, 1]]), 3, 1.0)


def test_device_mismatch_is_an_error():
    unary, images = small_case()
    with pytest.raises(ValueError, match="images are on meta but the unary is on cpu"):
        dense_crf_inference(unary, images.to("meta"), 2)


# ---- CUDA ----------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["none", "symmetric"])
def test_cuda_matches_cpu(mode):
    unary, images = small_case(B=3, K=21, H=40, W=48, seed=9)
    g = torch.Generator().manual_seed(2)
    matrix = torch.randn(21, 21, generator=g)
    args = (5, 3.0, 0.03 if mode == "none" else 3.0, 20.0, 13.0, matrix, mode)
    cpu = dense_crf_inference(unary, images, *args)
    gpu = dense_crf_inference(unary.cuda(), images.cuda(), *args)
    # float32 on both; the CUDA splat adds in another order (atomics): the pydensecrf bound of rounding-order
    # differences applies, with pairwise logits S <= ~40 here
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=128 * EPS32 * 40)
    # the fused update alone: the same per-pixel functor (float64), and float32 against the CPU's blocked path
    upd = update_inputs((3, 21, 40, 48), 2, [True, False], torch.float64, 5)
    moved = [upd[0].cuda(), [m.cuda() for m in upd[1]], [s.cuda() if s is not None else None for s in upd[2]],
             upd[3]]
    torch.testing.assert_close(crf_mean_field_update(*moved).cpu(), crf_mean_field_update(*upd), rtol=0,
                               atol=1e-14)  # float64 exp rounding on the two devices
    upd32 = update_inputs((3, 21, 40, 48), 2, [True, False], torch.float32, 5)
    moved32 = [upd32[0].cuda(), [m.cuda() for m in upd32[1]],
               [s.cuda() if s is not None else None for s in upd32[2]], upd32[3]]
    torch.testing.assert_close(crf_mean_field_update(*moved32).cpu(), crf_mean_field_update(*upd32), rtol=0,
                               atol=2e-4)  # exp_poly vs expf, logits up to ~250 (see test_update_matches_twin)
    g = torch.randn(3, 21, 40, 48, dtype=torch.float64)
    q = crf_mean_field_update(*upd)
    torch.testing.assert_close(torch.ops.segops._crf_mean_field_update_backward(g.cuda(), q.cuda()).cpu(),
                               torch.ops.segops._crf_mean_field_update_backward(g, q), rtol=0, atol=1e-14)
    u = unary.double().cuda().requires_grad_()
    dense_crf_inference(u, images.cuda(), 3)[:, 0].sum().backward()
    u_cpu = unary.double().requires_grad_()
    dense_crf_inference(u_cpu, images, 3)[:, 0].sum().backward()
    torch.testing.assert_close(u.grad.cpu(), u_cpu.grad, rtol=0, atol=1e-10)  # float64 rounding orders only



@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["none", "symmetric"])
def test_cuda_one_op_schedule_crowded_vertices(mode):
    # test_shared_schedule_sums_crowded_vertices_in_pieces on the GPU: vertices with up to 268 entries, summed in
    # pieces of 128 and then per vertex; within twice iteration_rounding_bound of the CPU's op-by-op schedule (a
    # vertex's last piece left out moved the marginals by 5.4e-3 / 0.94 against bounds of 3.2e-3 / 0.14)
    unary, images = small_case(B=2, K=5, H=48, W=56, seed=4)
    crf = MeanFieldCRF(unary)
    crf.add_pairwise_gaussian(10.0, 3.0, normalization=mode)
    crf.add_pairwise_bilateral(20.0, 13.0, images, 10.0, normalization=mode)
    args = [a.cuda() if isinstance(a, torch.Tensor) else ([t.cuda() for t in a] if isinstance(a[0], torch.Tensor)
            else a) for a in iterate_args(crf)]
    got = torch.ops.segops._crf_mean_field_iterate(*args, 1)
    torch.testing.assert_close(got.cpu(), op_by_op(crf, 1), rtol=0, atol=2 * iteration_rounding_bound(crf, 5))


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["none", "symmetric"])
def test_cuda_one_op_schedule(mode):
    # dense_crf_inference on CUDA with Potts kernels and no graph runs _crf_mean_field_iterate once (the shared
    # schedule); its marginals are bitwise equal run to run and within twice iteration_rounding_bound of the CPU's
    # op-by-op schedule (nvcc fuses multiply-adds; expf is within 2 ulp; the splats sum in pieces)
    crf = two_kernel_crf(2, 21, 40, 48, mode, seed=13)
    args = [a.cuda() if isinstance(a, torch.Tensor) else ([t.cuda() for t in a] if isinstance(a[0], torch.Tensor)
            else a) for a in iterate_args(crf)]
    got = torch.ops.segops._crf_mean_field_iterate(*args, 1)
    assert torch.equal(torch.ops.segops._crf_mean_field_iterate(*args, 1), got)
    torch.testing.assert_close(got.cpu(), op_by_op(crf, 1), rtol=0, atol=2 * iteration_rounding_bound(crf, 21))
    unary, images = small_case(B=2, K=21, H=40, W=48, seed=4)
    with torch.no_grad():
        names = segops_ops_called(lambda: dense_crf_inference(unary.cuda(), images.cuda(), 3))
    assert names.count("segops::_crf_mean_field_iterate") == 1 and "segops::crf_mean_field_update" not in names


# ---- segops eval / predict --crf --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A two-step model on the synthetic scribble data (enough to have logits worth refining)."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from standins import tiny_fcn

    from segops.train import TrainConfig, register_model, train

    register_model("tiny", tiny_fcn)
    out = tmp_path_factory.mktemp("crf_ck")
    cfg = TrainConfig(model="tiny", model_width=0.5, data="synthetic", synthetic_train=8, synthetic_val=4,
                      image_size=32, batch_size=2, epochs=1, max_steps=2, lr=0.01, out_dir=str(out / "run"),
                      progress=False, panels=0, loss="ce", supervision="full")
    train(cfg, log=lambda s: None)
    return str(out / "run" / "last.pt")


def test_eval_with_crf(tiny_checkpoint, tmp_path, capsys):
    import json

    from segops import cli
    from segops.train import evaluate_checkpoint

    plain = evaluate_checkpoint(tiny_checkpoint)
    assert "crf" not in plain
    res = evaluate_checkpoint(tiny_checkpoint, crf=snn.DenseCRF.deeplab(iterations=2))
    assert res["miou"] == plain["miou"] and 0.0 <= float(res["crf"]["miou"]) <= 1.0
    # both kernels off: the refined prediction is argmax softmax(logits) = argmax logits
    off = evaluate_checkpoint(tiny_checkpoint, crf=snn.DenseCRF(iterations=3, gaussian_compat=0, bilateral_compat=0))
    assert torch.equal(off["crf"]["matrix"], off["matrix"])
    out = tmp_path / "e.json"
    assert cli.main(["eval", tiny_checkpoint, "--crf", "--crf-iterations", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "with the dense CRF:" in text and "without CRF" in text
    saved = json.load(open(out))
    assert saved["crf"]["miou"] == pytest.approx(float(res["crf"]["miou"]))
    assert cli.main(["eval", tiny_checkpoint, "--crf", "--crf-bi-xy-std", "0"]) == 2
    assert "--crf-bi-xy-std must be a positive finite number" in capsys.readouterr().err


def test_predict_with_crf(tiny_checkpoint, tmp_path):
    from PIL import Image

    from segops import cli
    from segops.train import predict_files

    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(img)
    crf = snn.DenseCRF(iterations=2, gaussian_compat=0, bilateral_compat=0)
    plain = np.asarray(Image.open(predict_files(tiny_checkpoint, [str(img)], str(tmp_path / "a"))[0]))
    off = np.asarray(Image.open(predict_files(tiny_checkpoint, [str(img)], str(tmp_path / "b"), crf=crf)[0]))
    assert np.array_equal(plain, off)  # kernels off: the argmax of the logits
    assert cli.main(["predict", tiny_checkpoint, str(img), "-o", str(tmp_path / "c"), "--crf",
                     "--crf-iterations", "3"]) == 0
    refined = Image.open(tmp_path / "c" / "x.png")
    assert refined.mode == "P" and refined.size == (48, 40)
