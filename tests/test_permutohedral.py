"""permutohedral_filter: kernel vs the pure-PyTorch lattice twin, identities, gradients, errors, CUDA parity."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from segops import reference_lattice as R
from segops.ops import build_lattice, permutohedral_filter
from segops.ops.lattice import crf_features

ops = torch.ops.segops


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


# Same dtype => same lattice (the reference replays the kernel's float operations); what differs is the order
# of accumulation: a vertex sums up to a few hundred weighted values here (the reference with index_add, the
# kernel in entry order), then d+1 blur passes and a (d+1)-term slice. With unit roundoff u (6e-8 / 1.1e-16) and
# ~200 terms, 2e-5 and 1e-12 (relative to the largest output) are ~the worst-case bound n u, far below the
# O(1) change of a wrong vertex, weight or blur neighbour.
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def smooth_image(B: int, H: int, W: int, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """A synthetic (B, 3, H, W) image in 0..255: low-frequency colour field, a disc, mild noise."""
    low = torch.nn.functional.interpolate(torch.rand(B, 3, 4, 4, generator=gen) * 255, size=(H, W), mode="bilinear",
                                          align_corners=False)
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    disc = (((yy - H / 2) ** 2 + (xx - W / 3) ** 2) < (H / 4) ** 2).float()
    img = low * (1 - disc) + disc * torch.tensor([200.0, 30.0, 40.0]).view(1, 3, 1, 1)
    return (img + torch.randn(B, 3, H, W, generator=gen) * 3).clamp(0, 255).to(dtype)


@pytest.mark.parametrize("d", list(range(1, 9)) + [12, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_lattice_reference(d, dtype):
    g = torch.Generator().manual_seed(d)
    C = int(torch.randint(1, 7, (1,), generator=g))
    v = torch.randn(2, C, 7, 9, generator=g, dtype=dtype)
    f = torch.randn(2, d, 7, 9, generator=g, dtype=dtype) * 1.5
    for normalize in (False, True):
        out = permutohedral_filter(v, f, normalize)
        ref = R.permutohedral_filter(v, f, normalize)
        assert out.shape == v.shape and out.dtype == dtype
        assert rel_err(out, ref) < TOL[dtype]


@given(
    d=st.integers(1, 8),
    C=st.integers(1, 9),
    B=st.integers(1, 3),
    H=st.integers(1, 10),
    W=st.integers(1, 10),
    spread=st.sampled_from([0.05, 0.7, 3.0, 40.0]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    normalize=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference_property(d, C, B, H, W, spread, dtype, normalize, seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(B, C, H, W, generator=g, dtype=dtype)
    f = torch.randn(B, d, H, W, generator=g, dtype=dtype) * spread
    out = permutohedral_filter(v, f, normalize)
    assert rel_err(out, R.permutohedral_filter(v, f, normalize)) < TOL[dtype]


def test_ties_and_integer_features():
    # Many equal remainders (constant and integer-valued features, e.g. black padding): the tie rule matters.
    g = torch.Generator().manual_seed(3)
    f = torch.zeros(1, 5, 6, 6)
    f[:, 2:] = torch.randint(0, 3, (1, 3, 6, 6), generator=g).float()
    f[:, 0] = torch.arange(6.0).view(1, 6)
    v = torch.rand(1, 4, 6, 6, generator=g)
    assert rel_err(permutohedral_filter(v, f), R.permutohedral_filter(v, f)) < TOL[torch.float32]


def test_many_distinct_colours_capacity():
    # Random colours: (almost) every point opens new vertices; the table must hold up to N (d+1) keys.
    g = torch.Generator().manual_seed(4)
    img = torch.rand(1, 3, 48, 48, generator=g) * 255
    f = crf_features(img, 0.5, 0.3)
    v = torch.rand(1, 2, 48, 48, generator=g)
    out = ops.permutohedral_filter.default(v, f, False)
    M = out[3].shape[0]
    assert M > 48 * 48 * 3  # far more vertices than points: the worst case of the hash table
    assert rel_err(out[0], R.permutohedral_filter(v, f)) < TOL[torch.float32]


def test_impulse_response_constant_colour():
    # Documented shape (docs/lattice.md): on a constant-colour image an impulse spreads into a bump with the
    # Gaussian's width sigma (second moment within 10%), centred on the impulse (centroid within 0.5 px),
    # non-negative, carrying about half the exact Gaussian's mass (0.45..0.65).
    H = W = 41
    sigma = 4.0
    img = torch.full((1, 3, H, W), 100.0, dtype=torch.float64)
    f = crf_features(img, 15.0, sigma)
    v = torch.zeros(1, 1, H, W, dtype=torch.float64)
    v[0, 0, 20, 20] = 1.0
    out = permutohedral_filter(v, f)[0, 0]
    exact = R.dense_gaussian_filter(v, f)[0, 0]
    assert bool((out >= 0).all())
    ratio = float(out.sum() / exact.sum())
    assert 0.45 < ratio < 0.65
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    m = out.sum()
    cy, cx = float((out * yy).sum() / m), float((out * xx).sum() / m)
    assert abs(cy - 20) < 0.5 and abs(cx - 20) < 0.5
    width = math.sqrt(float((out * ((yy - cy) ** 2 + (xx - cx) ** 2)).sum() / m) / 2)
    assert abs(width - sigma) / sigma < 0.1
    peak = torch.nonzero(out == out.max())[0]
    assert (peak - torch.tensor([20, 20])).abs().max() <= 1
    assert float(out[0, :].max()) < 0.01 * float(out.max())  # 5 sigma away: negligible


def test_dense_reference_agreement():
    # The lattice approximates the Gaussian: W x has ~0.5-0.6x the exact mass on image features, and the
    # normalised filters agree closely (mean |difference| of filtered probabilities < 0.03).
    g = torch.Generator().manual_seed(1)
    img = smooth_image(1, 40, 40, g, torch.float64)
    f = crf_features(img, 15.0, 10.0)
    x = torch.softmax(torch.randn(1, 3, 40, 40, generator=g, dtype=torch.float64), 1)
    mass = float(permutohedral_filter(x, f).sum() / R.dense_gaussian_filter(x, f).sum())
    assert 0.4 < mass < 0.7
    diff = (permutohedral_filter(x, f, True) - R.dense_gaussian_filter(x, f, True)).abs()
    assert float(diff.mean()) < 0.03


def test_adjoint_and_approximate_symmetry():
    g = torch.Generator().manual_seed(5)
    f = crf_features(smooth_image(1, 24, 24, g, torch.float64), 15.0, 6.0)
    u = torch.rand(1, 2, 24, 24, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.rand(1, 2, 24, 24, generator=g, dtype=torch.float64)
    wu = permutohedral_filter(u, f)
    (wtv,) = torch.autograd.grad(wu, u, v)  # W^T v from the backward op
    lhs, rhs = float((wu.detach() * v).sum()), float((u.detach() * wtv).sum())
    assert abs(lhs - rhs) <= 1e-12 * abs(lhs)  # exact adjoint
    wv = permutohedral_filter(v, f)
    sym = float((u.detach() * wv).sum())
    assert abs(lhs - sym) <= 1e-2 * abs(lhs)  # <Wu, v> ~ <u, Wv>: blur order makes W slightly asymmetric


def test_linearity():
    g = torch.Generator().manual_seed(6)
    f = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    u = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    lhs = permutohedral_filter(2.5 * u - 0.75 * v, f)
    rhs = 2.5 * permutohedral_filter(u, f) - 0.75 * permutohedral_filter(v, f)
    assert rel_err(lhs, rhs) < 1e-12  # float64: two evaluation orders of the same linear map, a few ulps x d+1 passes


def test_batched_equals_per_image():
    g = torch.Generator().manual_seed(7)
    img = smooth_image(3, 16, 12, g)
    f = crf_features(img, 10.0, 5.0)
    v = torch.rand(3, 5, 16, 12, generator=g)
    for normalize in (False, True):
        batched = permutohedral_filter(v, f, normalize)
        single = torch.cat([permutohedral_filter(v[b : b + 1], f[b : b + 1], normalize) for b in range(3)])
        assert torch.equal(batched, single)  # the CPU kernel is deterministic


def test_channels_filtered_together_equal_separately():
    g = torch.Generator().manual_seed(8)
    f = torch.randn(1, 3, 9, 9, generator=g)
    v = torch.randn(1, 4, 9, 9, generator=g)
    together = permutohedral_filter(v, f)
    apart = torch.cat([permutohedral_filter(v[:, c : c + 1], f) for c in range(4)], 1)
    assert torch.equal(together, apart)


def test_strided_inputs_and_shapes():
    g = torch.Generator().manual_seed(9)
    v = torch.randn(2, 3, 10, 12, generator=g)
    f = torch.randn(2, 5, 10, 12, generator=g)
    ref = permutohedral_filter(v, f)
    cl = permutohedral_filter(v.to(memory_format=torch.channels_last), f.to(memory_format=torch.channels_last))
    assert torch.equal(cl, ref)
    big_v = torch.randn(2, 6, 10, 24, generator=g)
    sliced = big_v[:, ::2, :, ::2]
    assert torch.equal(permutohedral_filter(sliced, f), permutohedral_filter(sliced.contiguous(), f))
    flat = permutohedral_filter(v.flatten(2), f.flatten(2))  # (B, C, N) form
    assert torch.equal(flat.view_as(ref), ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_values(dtype):
    g = torch.Generator().manual_seed(10)
    v = torch.rand(1, 3, 8, 8, generator=g)
    f = torch.randn(1, 5, 8, 8, generator=g)
    out = permutohedral_filter(v.to(dtype), f)
    assert out.dtype == dtype
    tol = 1e-2 if dtype == torch.float16 else 2e-2  # one rounding of inputs and outputs
    assert rel_err(out.float(), permutohedral_filter(v.to(dtype).float(), f)) < tol


def test_thread_count_does_not_change_results():
    g = torch.Generator().manual_seed(11)
    f = crf_features(smooth_image(2, 64, 64, g), 10.0, 8.0)
    v = torch.rand(2, 4, 64, 64, generator=g)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = permutohedral_filter(v, f)
        torch.set_num_threads(2)
        two = permutohedral_filter(v, f)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


@pytest.mark.parametrize("normalize", [False, True])
def test_gradcheck_float64(normalize):
    g = torch.Generator().manual_seed(12)
    f = torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: permutohedral_filter(x, f, normalize), (v,))
    assert torch.autograd.gradgradcheck(lambda x: permutohedral_filter(x, f, normalize), (v,), fast_mode=True)


def test_features_get_no_gradient():
    f = torch.randn(1, 3, 4, 4, requires_grad=True)
    v = torch.randn(1, 2, 4, 4, requires_grad=True)
    out = permutohedral_filter(v, f)
    assert out.requires_grad
    out.sum().backward()
    assert f.grad is None and v.grad is not None


@pytest.mark.parametrize("normalize", [False, True])
def test_opcheck(normalize):
    g = torch.Generator().manual_seed(13)
    v = torch.randn(2, 3, 5, 6, generator=g, requires_grad=True)
    f = torch.randn(2, 4, 5, 6, generator=g)
    torch.library.opcheck(ops.permutohedral_filter.default, (v, f, normalize))
    _, vertex, bary, nbr, norm = ops.permutohedral_filter.default(v.detach(), f, normalize)
    grad = torch.randn(2, 3, 5, 6, generator=g)
    for transposed in (True, False):
        torch.library.opcheck(
            ops._permutohedral_filter_backward.default,
            (grad.requires_grad_(), vertex, bary, nbr, norm, normalize, transposed),
        )


def test_torch_compile():
    g = torch.Generator().manual_seed(14)
    v = torch.randn(1, 2, 6, 7, generator=g, requires_grad=True)
    f = torch.randn(1, 5, 6, 7, generator=g)

    def fn(x, feats):
        return (permutohedral_filter(x * 2.0, feats) ** 2).sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out = compiled(v, f)
    (gc,) = torch.autograd.grad(out, v)
    ref = fn(v, f)
    (gr,) = torch.autograd.grad(ref, v)
    # float32, the same kernels compiled and eager: equal up to a few ulps (allclose's defaults, 1e-5 relative)
    assert torch.allclose(out, ref) and torch.allclose(gc, gr)


# ---- bad input ---------------------------------------------------------------------------------------

BAD = [
    ("values 2-D", lambda: (torch.rand(2, 3), torch.rand(2, 3)), "values must have shape"),
    ("spatial mismatch", lambda: (torch.rand(1, 2, 4, 4), torch.rand(1, 3, 4, 5)), "must match values"),
    ("batch mismatch", lambda: (torch.rand(2, 2, 4, 4), torch.rand(1, 3, 4, 4)), "must match values"),
    ("dim mismatch", lambda: (torch.rand(1, 2, 4, 4), torch.rand(1, 3, 16)), "features must have shape"),
    ("d = 0", lambda: (torch.rand(1, 2, 4, 4), torch.rand(1, 0, 4, 4)), r"d = features.size\(1\) must be in \[1, 16\]"),
    ("d = 17", lambda: (torch.rand(1, 2, 4, 4), torch.rand(1, 17, 4, 4)), r"must be in \[1, 16\]"),
    ("integer values", lambda: (torch.ones(1, 2, 4, 4, dtype=torch.long), torch.rand(1, 3, 4, 4)), "values must be float"),
    ("integer features", lambda: (torch.rand(1, 2, 4, 4), torch.ones(1, 3, 4, 4, dtype=torch.long)), "features must be floating"),
    ("NaN features", lambda: (torch.rand(1, 2, 4, 4), torch.rand(1, 3, 4, 4).index_put_((torch.tensor([0]),) * 4, torch.tensor(float("nan")))), "NaN or Inf"),
    ("Inf features", lambda: (torch.rand(1, 2, 4, 4), torch.full((1, 3, 4, 4), float("inf"))), "NaN or Inf"),
    ("huge features", lambda: (torch.rand(1, 2, 4, 4), torch.full((1, 3, 4, 4), 1e12)), "exceed 1e9"),
]


@pytest.mark.parametrize("name,make,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, make, match):
    v, f = make()
    with pytest.raises(RuntimeError, match=match):
        permutohedral_filter(v, f)


@pytest.mark.parametrize("shape", [(0, 2, 4, 4), (2, 2, 0, 4), (1, 0, 3, 3)])
def test_empty_inputs(shape):
    v = torch.rand(*shape, requires_grad=True)
    f = torch.rand(shape[0], 3, *shape[2:])
    out = permutohedral_filter(v, f)
    assert out.shape == v.shape
    out.sum().backward()
    assert v.grad.shape == v.shape and not bool(v.grad.isnan().any())


def test_backward_op_checks_lattice():
    v = torch.rand(1, 2, 4, 4)
    f = torch.rand(1, 3, 4, 4)
    _, vertex, bary, nbr, norm = ops.permutohedral_filter.default(v, f, False)
    with pytest.raises(RuntimeError, match="does not match the lattice"):
        ops._permutohedral_filter_backward.default(torch.rand(1, 2, 5, 4), vertex, bary, nbr, norm, False, True)


# ---- CUDA parity -----------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("d", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize("normalize", [False, True])
def test_cuda_parity(d, normalize):
    g = torch.Generator().manual_seed(20 + d)
    v = torch.randn(2, 4, 17, 19, generator=g, dtype=torch.float64)
    f = torch.randn(2, d, 17, 19, generator=g, dtype=torch.float64) * 1.3
    cpu = permutohedral_filter(v, f, normalize)
    vc = v.cuda().requires_grad_()
    gpu = permutohedral_filter(vc, f.cuda(), normalize)
    # float64; both devices sum each vertex in ascending entry order, but nvcc contracts multiply-adds into FMAs
    # (one rounding fewer per term): ~1e-16 per term over at most a few hundred terms and d+1 blur passes
    assert rel_err(gpu.cpu(), cpu) < 1e-10
    vr = v.clone().requires_grad_()
    go = torch.randn(2, 4, 17, 19, generator=g, dtype=torch.float64)
    (gcpu,) = torch.autograd.grad(permutohedral_filter(vr, f, normalize), vr, go)
    (ggpu,) = torch.autograd.grad(gpu, vc, go.cuda())
    assert rel_err(ggpu.cpu(), gcpu) < 1e-10  # as above: FMA contraction only


@pytest.mark.cuda
def test_cuda_parity_image_float32():
    g = torch.Generator().manual_seed(30)
    img = smooth_image(3, 96, 80, g)
    f = crf_features(img, 15.0, 20.0)
    v = torch.softmax(torch.randn(3, 21, 96, 80, generator=g), 1)
    cpu = permutohedral_filter(v, f)
    gpu = permutohedral_filter(v.cuda(), f.cuda())
    # float32 with FMA contraction on the GPU: ~6e-8 per term over up to ~1000 terms per vertex (3 x 96 x 80
    # points on few vertices) and d+1 blur passes
    assert rel_err(gpu.cpu(), cpu) < 1e-5


@pytest.mark.cuda
def test_cuda_bad_features_and_devices():
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        permutohedral_filter(torch.rand(1, 2, 4, 4, device="cuda"), torch.full((1, 3, 4, 4), float("nan"), device="cuda"))
    with pytest.raises(RuntimeError, match="features are on"):
        permutohedral_filter(torch.rand(1, 2, 4, 4, device="cuda"), torch.rand(1, 3, 4, 4))



@pytest.mark.parametrize("d,spread", [(8, 3000.0), (16, 50.0), (3, 1e6)])
def test_general_key_path(d, spread):
    # Key ranges too wide to pack into one int64: the general path (per-entry int32 keys) runs instead.
    g = torch.Generator().manual_seed(40 + d)
    f = torch.randn(1, d, 9, 8, generator=g, dtype=torch.float64) * spread
    v = torch.randn(1, 3, 9, 8, generator=g, dtype=torch.float64)
    assert rel_err(permutohedral_filter(v, f), R.permutohedral_filter(v, f)) < TOL[torch.float64]


# ---- build once, filter many (segops.ops.build_lattice) ----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lattice_api_equals_filter(dtype):
    # The same lattice and the same splat / blur / slice: bitwise equal to the one-op filter, many times over;
    # normalised, (alpha s) / (alpha s_1) against the kernel's s / s_1: two more roundings (TOL: a few ulps).
    g = torch.Generator().manual_seed(50)
    f = crf_features(smooth_image(2, 12, 10, g, dtype), 12.0, 4.0)
    lat = build_lattice(f)
    assert lat.dtype == dtype and lat.d == 5 and lat.batch_size == 2
    for C in (1, 4, 21):
        v = torch.rand(2, C, 12, 10, generator=g, dtype=dtype)
        assert torch.equal(lat.filter(v), permutohedral_filter(v, f))
        assert rel_err(lat.filter(v, normalize=True), permutohedral_filter(v, f, True)) < TOL[dtype]
        vr = v.clone().requires_grad_()
        go = torch.rand(2, C, 12, 10, generator=g, dtype=dtype)
        (wt,) = torch.autograd.grad(permutohedral_filter(vr, f), vr, go)
        assert torch.equal(lat.filter(go, transposed=True), wt)  # W^T: the filter's own backward


def test_lattice_representation_per_image_ranges():
    # Vertex ids are image-major, each image's a contiguous range starting at its first point's vertex 0,
    # numbered in order of first appearance (so the first point's d+1 vertices are 0..d of its image).
    g = torch.Generator().manual_seed(51)
    f = crf_features(smooth_image(3, 9, 11, g), 10.0, 3.0)
    vertex, bary, neighbors = ops.permutohedral_lattice.default(f)
    assert vertex.dtype == torch.int32 and neighbors.dtype == torch.int32 and bary.dtype == torch.float32
    M = neighbors.shape[0]
    starts = [int(vertex[b, 0, 0]) for b in range(3)] + [M]
    for b in range(3):
        ids = vertex[b].flatten()
        assert int(ids.min()) == starts[b] and int(ids.max()) == starts[b + 1] - 1
        assert torch.equal(torch.unique(ids), torch.arange(starts[b], starts[b + 1], dtype=torch.int32))
        assert torch.equal(vertex[b, 0], torch.arange(starts[b], starts[b] + 6, dtype=torch.int32))
        first = torch.full((M,), 2**31 - 1, dtype=torch.int64).scatter_reduce(
            0, ids.long(), torch.arange(ids.numel()), "amin")[starts[b]:starts[b + 1]]
        assert bool((first[1:] > first[:-1]).all())  # first appearances in increasing entry order
    nb = neighbors[neighbors >= 0]
    assert int(nb.max()) < M
    # neighbours stay within the image
    for b in range(3):
        rows = neighbors[starts[b]:starts[b + 1]]
        inside = rows[rows >= 0]
        assert bool(((inside >= starts[b]) & (inside < starts[b + 1])).all())
    # barycentric: weights of a point sum to 1 (float32 sums of d+2 terms: a few ulps, allclose's 1e-5 default)
    assert torch.allclose(bary.sum(2), torch.ones(3, 99))


def test_lattice_matches_reference_lattice():
    # Same vertices as the pure-PyTorch lattice (up to numbering), same weights.
    g = torch.Generator().manual_seed(52)
    f = torch.randn(1, 4, 7, 9, generator=g, dtype=torch.float64) * 2
    vertex, bary, neighbors = ops.permutohedral_lattice.default(f)
    ref = R.build_lattice(f[0].reshape(4, -1).t())
    assert neighbors.shape[0] == ref.num_vertices
    assert torch.equal(bary[0], ref.bary)
    # the two numberings are a bijection
    pairs = torch.unique(torch.stack([vertex[0].flatten().long(), ref.vertex.flatten()]), dim=1)
    assert pairs.shape[1] == ref.num_vertices


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_lattice_filter_gradcheck_float64(normalize, transposed):
    g = torch.Generator().manual_seed(53)
    lat = build_lattice(torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64))
    v = torch.randn(2, 2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda x: lat.filter(x, normalize, transposed)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (v,))
    assert torch.autograd.gradgradcheck(fn, (v,), fast_mode=True)


def test_lattice_ops_opcheck():
    g = torch.Generator().manual_seed(54)
    f = torch.randn(2, 4, 5, 6, generator=g, requires_grad=True)
    torch.library.opcheck(ops.permutohedral_lattice.default, (f,))
    vertex, bary, neighbors = ops.permutohedral_lattice.default(f.detach())
    v = torch.randn(2, 3, 5, 6, generator=g, requires_grad=True)
    torch.library.opcheck(ops._permutohedral_splat_plan.default, (vertex, neighbors))
    plan = ops._permutohedral_splat_plan.default(vertex, neighbors)
    for transposed in (False, True):
        torch.library.opcheck(ops.permutohedral_apply.default, (v, vertex, bary, neighbors, transposed))
        torch.library.opcheck(ops.permutohedral_apply.default, (v, vertex, bary, neighbors, transposed, plan))


def test_splat_plan_sorts_entries_and_is_reused_bitwise(monkeypatch):
    # The plan: entry ids sorted stably by vertex, each vertex's first position, the inclusive scans of its pieces
    # of <= 128 entries and of the pieces stored by multi-piece vertices. The gather with a given plan makes the
    # same bits as the gather that sorts for itself (the CPU runs CUDA's gather under the variable).
    g = torch.Generator().manual_seed(59)
    f = crf_features(smooth_image(2, 40, 36, g), 100.0, 30.0)
    lat = build_lattice(f)
    vertex, _, neighbors = lat.tensors()
    assert lat.splat_plan() is None  # the CPU's scatter does not sort
    T, M = vertex.numel(), lat.num_vertices
    plan = ops._permutohedral_splat_plan.default(vertex, neighbors)
    assert plan.shape == (T + 3 * M + 1,) and plan.dtype == torch.int64
    flat = vertex.flatten().long()
    order, start = plan[:T], plan[T:T + M + 1]
    assert torch.equal(order, torch.sort(flat, stable=True).indices)
    counts = torch.bincount(flat, minlength=M)
    assert torch.equal(start, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
    pieces = (counts + 127) // 128
    assert int(pieces.max()) > 1  # some vertices have several pieces
    assert torch.equal(plan[T + M + 1:T + 2 * M + 1], pieces.cumsum(0))
    assert torch.equal(plan[T + 2 * M + 1:], torch.where(pieces > 1, pieces, 0).cumsum(0))
    v = torch.randn(2, 6, 40, 36, generator=g)
    monkeypatch.setenv("SEGOPS_LATTICE_GATHER_SPLAT", "1")
    for transposed in (False, True):
        sorting = ops.permutohedral_apply.default(v, *lat.tensors(), transposed)
        planned = ops.permutohedral_apply.default(v, *lat.tensors(), transposed, plan)
        assert torch.equal(sorting, planned)


def test_splat_plan_of_ids_that_leave_vertices_empty():
    # Image 0's vertex ids paired with the batch's neighbours (M counts both images' vertices): vertices with no
    # entries start where the next one does, and the trailing ones at T, so every start is written (a
    # vertex's pieces count start[v + 1] - start[v] = 0) and the gather splat leaves those vertices at 0.
    g = torch.Generator().manual_seed(61)
    lat = build_lattice(crf_features(smooth_image(2, 20, 18, g), 100.0, 30.0))
    vertex, bary, neighbors = lat.tensors()
    one = vertex[:1].contiguous()
    T, M = one.numel(), neighbors.shape[0]
    assert int(one.max()) + 1 < M
    plan = ops._permutohedral_splat_plan.default(one, neighbors)
    counts = torch.bincount(one.flatten().long(), minlength=M)
    assert torch.equal(plan[T:T + M + 1], torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
    assert torch.equal(plan[T + M + 1:T + 2 * M + 1], ((counts + 127) // 128).cumsum(0))


def test_lattice_built_once_filters_many_without_rebuilding():
    from torch.utils._python_dispatch import TorchDispatchMode

    g = torch.Generator().manual_seed(55)
    f = torch.randn(1, 3, 6, 6, generator=g)
    calls = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "segops":
                calls.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with Count():
        lat = build_lattice(f)
        x = torch.rand(1, 2, 6, 6, generator=g, requires_grad=True)
        y = x
        for _ in range(5):
            y = lat.filter(y, normalize=True)
        y.sum().backward()
    assert calls.count("permutohedral_lattice.default") == 1
    assert calls.count("permutohedral_apply.default") == 1 + 5 + 5  # W 1 once, 5 forward, 5 backward


LATTICE_BAD = [
    ("values of another B", lambda lat: lat.filter(torch.rand(3, 2, 4, 5)), "does not match the lattice"),
    ("values of another size", lambda lat: lat.filter(torch.rand(2, 2, 4, 6)), "does not match the lattice"),
    ("float64 values on a float32 lattice", lambda lat: lat.filter(torch.rand(2, 2, 4, 5, dtype=torch.float64)),
     "need a Double lattice"),
    ("integer values", lambda lat: lat.filter(torch.ones(2, 2, 4, 5, dtype=torch.long)), "must be floating point"),
    ("int64 vertex ids", lambda lat: ops.permutohedral_apply.default(torch.rand(2, 1, 4, 5), lat.vertex.long(),
                                                                    lat.bary, lat.neighbors, False), "int32"),
    ("a plan of another lattice", lambda lat: ops.permutohedral_apply.default(
        torch.rand(2, 1, 4, 5), *lat.tensors(), False, torch.zeros(7, dtype=torch.long)), "splat_plan must be"),
    ("an int32 plan", lambda lat: ops.permutohedral_apply.default(
        torch.rand(2, 1, 4, 5), *lat.tensors(), False,
        ops._permutohedral_splat_plan.default(lat.vertex, lat.neighbors).int()), "splat_plan must be"),
    ("a plan of int64 ids", lambda lat: ops._permutohedral_splat_plan.default(lat.vertex.long(), lat.neighbors),
     "vertex must be"),
]


@pytest.mark.parametrize("name,call,match", LATTICE_BAD, ids=[b[0] for b in LATTICE_BAD])
def test_lattice_bad_input(name, call, match):
    lat = build_lattice(torch.rand(2, 3, 4, 5))
    with pytest.raises(RuntimeError, match=match):
        call(lat)


@pytest.mark.parametrize("make,match", [
    (lambda: torch.rand(2, 3), "features must have shape"),
    (lambda: torch.rand(1, 17, 4, 4), r"must be in \[1, 16\]"),
    (lambda: torch.ones(1, 3, 4, 4, dtype=torch.long), "features must be floating"),
    (lambda: torch.full((1, 3, 4, 4), float("nan")), "NaN or Inf"),
], ids=["2-D", "d = 17", "integer", "NaN"])
def test_build_lattice_bad_features(make, match):
    with pytest.raises(RuntimeError, match=match):
        build_lattice(make())


def test_crf_features_poison_is_exact():
    # The losses fold the images' finiteness into the colour features by adding a 0-dim "poison" (0 or NaN)
    # to sigma_rgb: 0 (or -0) must leave finite features bitwise unchanged (the lattice decisions depend on
    # every bit), NaN must poison them.
    g = torch.Generator().manual_seed(56)
    img = torch.rand(2, 3, 5, 7, generator=g) * 255
    for sigma in (15.0, 0.3, 7.1):
        for zero in (0.0, -0.0):
            assert torch.equal(crf_features(img, sigma, 3.0, torch.tensor(zero)), crf_features(img, sigma, 3.0))
        assert not bool(torch.isfinite(crf_features(img, sigma, 3.0, torch.tensor(float("nan")))[:, 2:]).any())


def test_gather_splat_equals_scatter(monkeypatch):
    # CUDA's splat (entries sorted stably by vertex, ordered sums) run on the CPU. Where no vertex has more than
    # one piece (128 entries) of entries, it makes the same sums in the same order as the CPU's scatter: the same
    # bits.
    g = torch.Generator().manual_seed(57)
    f = crf_features(smooth_image(3, 23, 19, g), 12.0, 5.0)
    v = torch.randn(3, 7, 23, 19, generator=g)
    lat = build_lattice(f)
    assert int(torch.bincount(lat.tensors()[0].flatten().long()).max()) <= 128
    scatter = [lat.filter(v), lat.filter(v, transposed=True), permutohedral_filter(v, f, True)]
    monkeypatch.setenv("SEGOPS_LATTICE_GATHER_SPLAT", "1")
    gather = [lat.filter(v), lat.filter(v, transposed=True), permutohedral_filter(v, f, True)]
    for a, b in zip(scatter, gather):
        assert torch.equal(a, b)


def test_gather_splat_pieces_of_crowded_vertices(monkeypatch):
    # Wide kernels crowd hundreds of entries onto one vertex: the gather sums them in pieces of 128, then the
    # pieces. Another grouping of the same terms than the scatter's one ordered sum, so compared in float64 (the
    # two groupings of <= 662 terms agree to ~1e-13 relative: default float64 tolerance), and reproducible to the
    # bit in float32.
    g = torch.Generator().manual_seed(58)
    f = crf_features(smooth_image(2, 48, 40, g), 100.0, 30.0)
    lat = build_lattice(f)
    counts = torch.bincount(lat.tensors()[0].flatten().long())
    assert int(counts.max()) > 3 * 128 and int((counts > 128).sum()) > 10  # several multi-piece vertices
    v64 = torch.randn(2, 5, 48, 40, generator=g, dtype=torch.float64)
    f64 = f.double()
    lat64 = build_lattice(f64)
    scatter = [lat64.filter(v64), lat64.filter(v64, transposed=True), permutohedral_filter(v64, f64, True)]
    monkeypatch.setenv("SEGOPS_LATTICE_GATHER_SPLAT", "1")
    gather = [lat64.filter(v64), lat64.filter(v64, transposed=True), permutohedral_filter(v64, f64, True)]
    for a, b in zip(scatter, gather):
        torch.testing.assert_close(b, a)
    v32 = v64.float()
    runs = [(lat.filter(v32), permutohedral_filter(v32, f, True)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    # float32 against the float64 result: sums of <= 662 positive-weight terms, ~1e-7 relative each
    torch.testing.assert_close(runs[0][0].double(), scatter[0], rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("d,spread", [(5, 1.0), (8, 3000.0)])  # d=8 x3000: keys too wide to pack (second read)
def test_cuda_lattice_bitwise_reproducible_and_matches_cpu(d, spread):
    # Vertex ids follow the first appearance of each key (not the atomics' insertion order), the splat gathers
    # in entry order: the same lattice and the same bits from run to run; the same lattice as the CPU's.
    g = torch.Generator().manual_seed(60 + d)
    f = torch.randn(3, d, 31, 27, generator=g) * spread
    v = torch.randn(3, 6, 31, 27, generator=g)
    cpu = ops.permutohedral_lattice.default(f)
    runs = [ops.permutohedral_lattice.default(f.cuda()) for _ in range(2)]
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    for a, b in zip(runs[0], cpu):
        assert torch.equal(a.cpu(), b)  # deterministic numbering: the CPU's ids, weights and neighbours
    lat = build_lattice(f.cuda())
    outs = [(lat.filter(v.cuda()), lat.filter(v.cuda(), transposed=True)) for _ in range(2)]
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    # filter() sorts once (its splat plan) and reuses the order: the same bits as the op sorting for itself
    assert lat.splat_plan() is not None
    assert torch.equal(outs[0][0], ops.permutohedral_apply.default(v.cuda(), *lat.tensors(), False))
    ref = build_lattice(f).filter(v)
    # float32, same lattice; the CPU sums each vertex in one ordered sum, CUDA in pieces of 128 entries, and nvcc
    # contracts multiply-adds into FMAs: ~6e-8 relative per term
    assert rel_err(outs[0][0].cpu(), ref) < 1e-5


@pytest.mark.cuda
def test_cuda_splat_pieces_on_crowded_vertices():
    # Wide kernels put up to ~700 entries on one vertex: CUDA sums them in pieces of 128, then the pieces. Float64
    # against the CPU's one ordered sum per vertex: the groupings differ by ~1e-16 relative per term (and nvcc's
    # FMAs), 1e-10 leaves room for the blur's d+1 passes; run to run, the same bits.
    g = torch.Generator().manual_seed(62)
    f = crf_features(smooth_image(2, 48, 40, g, dtype=torch.float64), 100.0, 30.0)
    v = torch.randn(2, 5, 48, 40, generator=g, dtype=torch.float64)
    lat_cpu = build_lattice(f)
    assert int(torch.bincount(lat_cpu.tensors()[0].flatten().long()).max()) > 3 * 128
    lat = build_lattice(f.cuda())
    runs = [(lat.filter(v.cuda()), lat.filter(v.cuda(), normalize=True, transposed=True)) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert rel_err(runs[0][0].cpu(), lat_cpu.filter(v)) < 1e-10
    assert rel_err(runs[0][1].cpu(), lat_cpu.filter(v, normalize=True, transposed=True)) < 1e-10


@pytest.mark.cuda
def test_cuda_lattice_api_sync_debug():
    # Building reads one word (exempt from the sync debug mode); filtering reads nothing.
    g = torch.Generator().manual_seed(61)
    f = torch.randn(2, 5, 17, 13, generator=g).cuda()
    v = torch.randn(2, 4, 17, 13, generator=g).cuda().requires_grad_()
    build_lattice(f).filter(v).sum().backward()  # warm-up
    prev = torch.cuda.get_sync_debug_mode()
    try:
        torch.cuda.set_sync_debug_mode("error")
        lat = build_lattice(f)
        out = lat.filter(v, normalize=True)
        out.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    assert torch.isfinite(v.grad).all()
