"""The OpenMP lattice construction (concurrent hash-table inserts), splat, blur and slice with several threads.

Inputs are large enough that every parallel region splits into several chunks (the build's grain is 8192
points), with many threads inserting the same keys at once (constant colour: every point shares its
vertices with its neighbours), every key new (distinct colours, tiny sigmas), and both key paths (packed
int64 codes; general per-entry int32 keys when the key ranges are too wide to pack). The CPU kernels are
deterministic, so 1, 2 and 4 threads must agree bitwise, forward and backward. `make tsan` runs this file
(and the lattice tests) under ThreadSanitizer with OMP_NUM_THREADS=2 (README, "Thread safety").
"""

from __future__ import annotations

import pytest
import torch

from segops import reference_lattice as RL
from segops.ops import permutohedral_filter
from segops.ops.lattice import crf_features

ops = torch.ops.segops


def _cases():
    g = torch.Generator().manual_seed(0)
    S = 128
    const = torch.full((2, 3, S, S), 77.0)  # every key inserted by many points at once
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    codes = torch.randperm(2**24, generator=g)[: S * S]
    distinct = torch.stack([codes // 65536, (codes // 256) % 256, codes % 256]).float().view(1, 3, S, S)
    natural = (torch.nn.functional.interpolate(torch.rand(2, 3, 4, 4, generator=g) * 255, size=(S, S),
                                               mode="bilinear", align_corners=False)
               + torch.randn(2, 3, S, S, generator=g) * 4)
    wide = torch.randn(1, 8, 96, 96, generator=g) * 3000  # keys too spread to pack: the general path
    return {
        "constant": crf_features(const, 15.0, 10.0),
        "distinct_isolated": crf_features(distinct, 0.2, 0.2),
        "distinct_eccv": crf_features(distinct, 15.0, 20.0),
        "natural_batch": crf_features(natural, 15.0, 10.0),
        "natural_eccv": crf_features(natural, 13.0, 80.0),  # few vertices: the splat runs in two chunks
        "general_keys": wide,
    }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_lattice_threads_bitwise_equal(name):
    f = CASES[name]
    B, _, *sp = f.shape
    g = torch.Generator().manual_seed(1)
    v = torch.rand(B, 4, *sp, generator=g)
    gout = torch.rand(B, 4, *sp, generator=g)
    old = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 4):
            torch.set_num_threads(t)
            x = v.clone().requires_grad_()
            raw = ops.permutohedral_filter.default(x, f, False)
            out = raw[0]
            out.backward(gout)
            norm = permutohedral_filter(v, f, normalize=True)
            # the values and the number of vertices (the lattice itself: test_cpu_range_build_is_the_shared_build)
            results.append((out.detach(), x.grad, norm, torch.tensor(raw[3].shape[0])))
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    if name == "distinct_isolated":
        assert int(results[0][3]) == B * f.shape[2] * f.shape[3] * 6  # every point on its own d+1 vertices


def test_lattice_threads_match_reference():
    # The multi-threaded lattice is the reference lattice (same vertices up to numbering, same values).
    f = CASES["distinct_eccv"]
    v = torch.rand(1, 2, *f.shape[2:], generator=torch.Generator().manual_seed(2))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        out = ops.permutohedral_filter.default(v, f, False)
    finally:
        torch.set_num_threads(old)
    want = RL.permutohedral_filter(v, f)
    err = float((out[0] - want).abs().max() / want.abs().max())
    # float32, the same lattice: accumulation order only, u = 6e-8 over up to ~300 terms per vertex
    assert err < 2e-5
    assert out[3].shape[0] == RL.build_lattice(f[0].reshape(5, -1).t().contiguous()).num_vertices




@pytest.mark.parametrize("name", ["constant", "natural_eccv", "natural_batch", "distinct_eccv"])
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_lattice_chunked_splat_matches_reference(name, threads):
    # 2 x 128^2 points on few vertices ("constant", "natural_eccv") make the CPU splat cut the points into two
    # chunks, each summed into its own grid, the grids then added; with more vertices ("natural_batch", and
    # "distinct_eccv": one image) it splats in one.
    # With 4 threads each chunk's ids are also split between two tasks. In float64 only the order of the sums
    # differs from the reference: u = 1.1e-16 over up to 2 x 128^2 x 6 terms per vertex ("constant": all of
    # them on the same 6 vertices) gives a relative error far below 1e-10; a chunk's grid lost, added twice or
    # not zeroed is off by O(1).
    f = CASES[name].double()
    v = torch.rand(f.shape[0], 3, *f.shape[2:], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = ops.permutohedral_filter.default(v, f, False)[0]
    finally:
        torch.set_num_threads(old)
    want = RL.permutohedral_filter(v, f)
    assert float((out - want).abs().max() / want.abs().max()) < 1e-10


@pytest.mark.parametrize("name", sorted(CASES) + ["odd_sizes_d2", "odd_sizes_d5", "odd_sizes_d7"])
def test_cpu_range_build_is_the_shared_build(name, monkeypatch):
    # The CPU numbers each thread's range of points in a table of its own and merges the ranges in order; the
    # shared build (CUDA's: one table, first entries found by a scan; SEGOPS_LATTICE_SHARED_BUILD=1 runs it on the
    # CPU) numbers the vertices by first appearance over the batch. Both must give the same lattice -- ids,
    # weights, neighbours -- bit for bit, on 1, 2 and 4 threads (2 and 4 ranges above 2 x 8192 points).
    f = _isa_cases()[name][0]
    old = torch.get_num_threads()
    built = {}
    try:
        for shared in ("1", "0"):
            monkeypatch.setenv("SEGOPS_LATTICE_SHARED_BUILD", shared)
            for t in (1, 2, 4):
                torch.set_num_threads(t)
                built[shared, t] = ops.permutohedral_lattice.default(f)
    finally:
        torch.set_num_threads(old)
    want = built["1", 1]
    for key, got in built.items():
        for a, b in zip(want, got):
            assert torch.equal(a, b), key


def _isa_cases():
    """Features for the instruction-set check: every case above, plus odd sizes (runs of 8 points cut by
    an image's end and by a thread's range) and the dimensions 2, 3 and 7; with the values to filter."""
    g = torch.Generator().manual_seed(3)
    cases = dict(CASES)
    photo = (torch.nn.functional.interpolate(torch.rand(3, 3, 5, 5, generator=g) * 255, size=(37, 53),
                                             mode="bilinear", align_corners=False)
             + torch.randn(3, 3, 37, 53, generator=g) * 3)
    cases["odd_sizes_d5"] = crf_features(photo, 13.0, 6.0)
    for d in (2, 3, 7):
        cases[f"odd_sizes_d{d}"] = torch.randn(2, d, 41, 29, generator=g) * 2
    return {name: (f, torch.rand(f.shape[0], 3, *f.shape[2:], generator=g)) for name, f in cases.items()}


def _isa_results(inputs: dict[str, tuple[torch.Tensor, torch.Tensor]], threads: int) -> dict[str, list]:
    old = torch.get_num_threads()
    out = {}
    try:
        torch.set_num_threads(threads)
        for name, (f, v) in sorted(inputs.items()):
            raw = ops.permutohedral_filter.default(v, f, False)
            # the filtered values and the number of vertices (vertex ids may depend on thread timing)
            out[name] = [raw[0], torch.tensor(raw[3].shape[0])]
    finally:
        torch.set_num_threads(old)
    return out


@pytest.mark.parametrize("capability", ["default", "avx2"])
@pytest.mark.parametrize("threads", [1, 2])
def test_lattice_same_bits_on_every_instruction_set(tmp_path, threads, capability):
    """The lattice loops' AVX2 and AVX-512 clones (there the build finds 8 points' simplices at once in vector
    lanes) and the portable build (ATEN_CPU_CAPABILITY=default or avx2, read once per process: so in a
    subprocess, against this process's best) do the same operations in the same order: bitwise equal results
    (on a CPU without AVX2 both runs are portable, without AVX-512 the avx2 case compares AVX2 with itself).
    The inputs are made here and handed over: ATen's own random and resampling kernels round differently
    per instruction set."""
    import os
    import subprocess
    import sys

    inputs = _isa_cases()
    torch.save(inputs, tmp_path / "inputs.pt")
    here = os.path.dirname(os.path.abspath(__file__))
    code = ("import sys, torch; sys.path.insert(0, %r); import test_lattice_threads as t; "
            "torch.save(t._isa_results(torch.load(%r), %d), %r)"
            % (here, str(tmp_path / "inputs.pt"), threads, str(tmp_path / "portable.pt")))
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    portable = torch.load(tmp_path / "portable.pt")
    native = _isa_results(inputs, threads)
    assert sorted(portable) == sorted(native)
    for name in native:
        for a, b in zip(native[name], portable[name]):
            assert torch.equal(a, b), name


def _row_results(f: torch.Tensor, images: torch.Tensor, channels: int, threads: int) -> list[torch.Tensor]:
    from segops.ops import dense_crf_loss, normalized_cut_loss

    g = torch.Generator().manual_seed(4)
    B, _, *sp = f.shape
    v = torch.rand(B, channels, *sp, generator=g)
    seg = torch.softmax(torch.randn(B, channels, *sp, generator=g), 1)
    old = torch.get_num_threads()
    out = []
    try:
        torch.set_num_threads(threads)
        x = v.clone().requires_grad_()
        y = permutohedral_filter(x, f)  # grid rows of C + 1 (the normalising channel); backward: C
        y.backward(torch.rand(y.shape, generator=g))
        out += [y.detach(), x.grad]
        for loss in (dense_crf_loss, normalized_cut_loss):  # rows of K, and K + 1 with the degree channel
            s = seg.clone().requires_grad_()
            value = loss(images, s, 2e-9 if loss is dense_crf_loss else 1.0, 40.0, 40.0)
            value.backward()
            out += [value.detach(), s.grad]
    finally:
        torch.set_num_threads(old)
    return out


@pytest.mark.parametrize("channels", [1, 3, 7, 8, 21, 33])
@pytest.mark.parametrize("threads", [1, 2])
def test_padded_rows_same_bits(channels, threads, monkeypatch):
    """The CPU splats and slices float32 grids in rows padded to whole 8-float vectors, a point's sums over its
    vertex rows kept in registers; SEGOPS_LATTICE_PAD_ROWS=0 keeps the grid's own row width and sums through
    a buffer row. The same products and sums in the same order: the same bits, for the filter, its backward
    and both CRF losses forward and backward, with channel counts around the 8-float pieces and past 32 (then
    the buffer row again). Odd image sizes cut the 256-point blocks."""
    g = torch.Generator().manual_seed(5)
    images = (torch.nn.functional.interpolate(torch.rand(2, 3, 5, 5, generator=g) * 255, size=(37, 53),
                                              mode="bilinear", align_corners=False)
              + torch.randn(2, 3, 37, 53, generator=g))
    f = crf_features(images, 40.0, 40.0)  # the losses' sigma_rgb and sigma_xy
    assert ops.permutohedral_lattice.default(f)[2].shape[0] <= 2 * 37 * 53  # padding applies: M <= points
    monkeypatch.setenv("SEGOPS_LATTICE_PAD_ROWS", "0")
    plain = _row_results(f, images, channels, threads)
    monkeypatch.delenv("SEGOPS_LATTICE_PAD_ROWS")
    with torch.profiler.profile() as prof:
        padded = _row_results(f, images, channels, threads)
    # the padded path ran: the slice copied its grid into padded rows (none needed when the rows are already
    # whole vectors: 8 channels and no extra one in the adjoint slice)
    assert any(e.key == "segops_kernel::pad_rows" for e in prof.key_averages())
    for a, b in zip(plain, padded):
        assert torch.equal(a, b)


@pytest.mark.parametrize("size", [(37, 53), (32, 64)])
@pytest.mark.parametrize("channels", [3, 21])
@pytest.mark.parametrize("threads", [1, 2])
def test_streamed_slice_same_bits(size, channels, threads, monkeypatch):
    """Large float32 outputs of the losses' backward slice are written with non-temporal stores, four values at
    a time where a run of a channel plane is whole and 16-byte aligned (32 x 64: every run; 37 x 53: the planes'
    odd offsets and the blocks' ragged ends take the plain loop). SEGOPS_SLICE_STREAM_BYTES=0 streams at any
    size: the same bits as never streaming, for the filter and both CRF losses forward and backward."""
    g = torch.Generator().manual_seed(6)
    H, W = size
    images = (torch.nn.functional.interpolate(torch.rand(2, 3, 5, 5, generator=g) * 255, size=(H, W),
                                              mode="bilinear", align_corners=False)
              + torch.randn(2, 3, H, W, generator=g))
    f = crf_features(images, 40.0, 40.0)
    monkeypatch.setenv("SEGOPS_SLICE_STREAM_BYTES", str(2**62))
    plain = _row_results(f, images, channels, threads)
    monkeypatch.setenv("SEGOPS_SLICE_STREAM_BYTES", "0")
    streamed = _row_results(f, images, channels, threads)
    for a, b in zip(plain, streamed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(CASES))
def test_follow_same_lattice(name, monkeypatch):
    """On several threads, the thread of the first range of points merges the second range's keys and remaps its
    entries while that range is still being numbered (as far as it is published); SEGOPS_LATTICE_FOLLOW=0 does
    both after every range is numbered. The same lattice either way, whatever the interleaving (10 builds each,
    2 and 3 threads; the distinct-colour cases outgrow the tables' first capacity while being followed)."""
    f = CASES[name]
    old = torch.get_num_threads()
    try:
        for threads in (2, 3):
            torch.set_num_threads(threads)
            monkeypatch.setenv("SEGOPS_LATTICE_FOLLOW", "0")
            want = ops.permutohedral_lattice.default(f)
            monkeypatch.delenv("SEGOPS_LATTICE_FOLLOW")
            for _ in range(10):
                got = ops.permutohedral_lattice.default(f)
                for a, b in zip(want, got):
                    assert torch.equal(a, b)
    finally:
        torch.set_num_threads(old)
