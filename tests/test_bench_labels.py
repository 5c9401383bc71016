"""The label layouts of `segops bench losses`: scribble-like strokes and independently scattered pixels."""

from __future__ import annotations

import pytest
import torch

from segops.bench.losses import scribble_target, stroke_target


@pytest.mark.parametrize("share", [0.01, 0.03, 0.10])
def test_strokes_have_the_share_and_are_strokes(share):
    B, K, H, W = 3, 21, 96, 80
    y = stroke_target(B, K, H, W, share, "cpu", torch.Generator().manual_seed(0))
    assert y.shape == (B, H, W) and y.dtype == torch.int64
    lab = y != 255
    assert bool(((y[lab] >= 0) & (y[lab] < K)).all())
    # per image: at least the share, overshooting by at most one 3 x 3 stamp (9 pixels)
    counts = lab.flatten(1).sum(1)
    want = round(share * H * W)
    assert bool((counts >= want).all()) and bool((counts <= want + 9).all()), counts.tolist()
    # strokes, not dust: every labelled pixel has a labelled 8-neighbour (stamps are 3 x 3, clipped at borders)
    padded = torch.nn.functional.pad(lab.float()[:, None], (1, 1, 1, 1))
    neighbours = torch.nn.functional.conv2d(padded, torch.ones(1, 1, 3, 3))[:, 0] - lab.float()
    assert bool((neighbours[lab] >= 1).all())
    # the same generator state gives the same strokes
    assert torch.equal(y, stroke_target(B, K, H, W, share, "cpu", torch.Generator().manual_seed(0)))


def test_all_labelled_and_scattered_layouts():
    g = torch.Generator().manual_seed(1)
    full = stroke_target(2, 5, 16, 16, 1.0, "cpu", g)
    assert bool(((full >= 0) & (full < 5)).all())
    scattered = scribble_target(4, 5, 64, 64, 0.03, "cpu", g)
    share = float((scattered != 255).float().mean())
    # 16384 Bernoulli(0.03) draws: standard deviation 0.0013, so 0.03 +- 0.008 is beyond 6 sigma
    assert abs(share - 0.03) < 0.008
