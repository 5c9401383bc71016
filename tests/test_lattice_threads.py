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
            # vertex ids depend on which thread claims a hash slot first (not part of the contract); the
            # number of vertices and every value do not
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
