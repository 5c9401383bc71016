"""segops.nn.ASPP: DeepLab v2 (sum of branches) and v3 (concat + image pooling + projection)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segops.nn import ASPP, AtrousConv2d
from segops.models import ResNet, count_parameters, freeze_bn


def _conv(cin, cout, k, bias=True):
    return cin * cout * k * k + (cout if bias else 0)


def test_v2_shapes_and_sum_of_branches():
    torch.manual_seed(0)
    a = ASPP(16, 5, rates=(1, 2, 3), variant="v2", hidden_channels=8).eval()
    x = torch.randn(2, 16, 9, 11)
    y = a(x)
    assert y.shape == (2, 5, 9, 11)
    # The v2 output is the plain sum of the branch outputs. Default float32 tolerance (rtol 1.3e-6, atol 1e-5): the
    # same branch outputs (same kernels) added in the same order; only the sum's association could differ.
    torch.testing.assert_close(y, sum(b(x) for b in a.branches))
    # Each branch: fc6 (3x3 atrous) -> fc7 (1x1) -> fc8 (1x1), as in DeepLab-ASPP-L.
    convs = [m for m in a.branches[1] if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size, c.dilation) for c in convs] == [((3, 3), (2, 2)), ((1, 1), (1, 1)), ((1, 1), (1, 1))]
    assert count_parameters(a) == 3 * (_conv(16, 8, 3) + _conv(8, 8, 1) + _conv(8, 5, 1))


def test_v2_single_conv_branches_param_count():
    with torch.device("meta"):
        a = ASPP(2048, 21, variant="v2", hidden_channels=None)
    # The released DeepLab-v2 ResNet-101 classifier: four 3x3 atrous convs 2048 -> 21 (fc1_voc12_c0..3).
    assert a.rates == (6, 12, 18, 24)
    assert count_parameters(a) == 4 * _conv(2048, 21, 3)


@pytest.mark.parametrize("rate", [1, 2, 5])
def test_v2_atrous_receptive_field(rate):
    """Output pixel (i, j) of a single-rate branch sees exactly the 3x3 taps at offsets 0, +-rate."""
    torch.manual_seed(0)
    a = ASPP(1, 1, rates=(rate,), variant="v2", hidden_channels=None).double()
    with torch.no_grad():
        a.branches[0].conv.weight.fill_(1.0)
    x = torch.randn(1, 1, 15, 15, dtype=torch.float64, requires_grad=True)
    a(x)[0, 0, 7, 7].backward()
    nz = (x.grad[0, 0] != 0).nonzero().tolist()
    expect = sorted([7 + u * rate, 7 + v * rate] for u in (-1, 0, 1) for v in (-1, 0, 1))
    assert sorted(nz) == expect


def test_v3_structure_and_param_count():
    with torch.device("meta"):
        a = ASPP(2048, 256, variant="v3")
    assert a.rates == (6, 12, 18)
    # 1x1 + 3 atrous + image pooling, 256 channels each, BN; projection 1280 -> 256 with BN.
    expect = _conv(2048, 256, 1, False) + 3 * _conv(2048, 256, 3, False) + _conv(2048, 256, 1, False)
    expect += 5 * 2 * 256 + _conv(5 * 256, 256, 1, False) + 2 * 256
    assert count_parameters(a) == expect == 15_535_104


def test_v3_matches_torchvision_deeplabv3_resnet50_count():
    """torchvision's deeplabv3_resnet50 has 42,004,074 parameters (its model card): ResNet-50 trunk +
    DeepLabHead(ASPP rates 12/24/36, 3x3 conv 256, BN, 1x1 classifier) + FCNHead aux classifier on layer3.
    Our ResNet trunk and v3 ASPP reproduce that number, cross-checking both against a published count."""
    K = 21
    with torch.device("meta"):
        trunk = ResNet(50, output_stride=8)
        aspp = ASPP(2048, 256, rates=(12, 24, 36), variant="v3")
    head = _conv(256, 256, 3, False) + 2 * 256 + _conv(256, K, 1)
    aux = _conv(1024, 256, 3, False) + 2 * 256 + _conv(256, K, 1)
    assert count_parameters(trunk) + count_parameters(aspp) + head + aux == 42_004_074


def test_v3_forward_image_pooling_and_separable():
    torch.manual_seed(0)
    x = torch.randn(2, 12, 7, 9)
    a = ASPP(12, 8, rates=(1, 2), variant="v3").train()
    y = a(x)
    assert y.shape == (2, 8, 7, 9) and torch.isfinite(y).all()
    pooled = a.branches[-1](x)
    # The image-pooling branch is constant over the image (an expand: bitwise equal; default tolerance).
    torch.testing.assert_close(pooled, pooled[..., :1, :1].expand_as(pooled))
    s = ASPP(12, 8, rates=(3,), variant="v3", separable=True, image_pooling=False)
    dw = [m for m in s.modules() if isinstance(m, AtrousConv2d) and m.groups > 1]
    assert len(dw) == 1 and dw[0].groups == 12 and dw[0].dilation == (3, 3)
    assert s(x).shape == (2, 8, 7, 9)
    assert len(s.branches) == 2  # 1x1 + one atrous branch, no pooling


def test_v3_backward_and_batchnorm_modes():
    torch.manual_seed(0)
    a = ASPP(6, 4, rates=(2,), variant="v3", dropout=0.0)
    x = torch.randn(3, 6, 5, 5, requires_grad=True)
    a.train()
    a(x).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in a.parameters())
    assert x.grad.abs().sum() > 0
    bn = a.project[1]
    assert int(bn.num_batches_tracked) == 1
    a.eval()
    # Eval: per-sample output independent of the rest of the batch. Default float32 tolerance: the kernels may
    # block or parallelise the batch differently, reordering sums of at most 6 * 9 = 54 (projection: 3 * 4 = 12)
    # products per output.
    torch.testing.assert_close(a(x[:1]), a(x)[:1])
    # Batch-1 training with the image-pooling BN needs frozen BN (one value per channel otherwise).
    a.train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        a(x[:1])
    freeze_bn(a)
    before = bn.running_mean.clone()
    a(x[:1]).sum().backward()
    torch.testing.assert_close(bn.running_mean, before)  # frozen: untouched, bitwise (default tolerance is ample)


def test_dilated_convs_are_segops_layers():
    a = ASPP(8, 4, variant="v3")
    convs = [m for m in a.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, AtrousConv2d) for m in convs)
    assert {m.dilation for m in convs if m.kernel_size == (3, 3)} == {(6, 6), (12, 12), (18, 18)}


def test_matches_plain_conv_reference():
    """v2 with single-conv branches equals sum_r conv2d(x, W_r, dilation=r) computed with F.conv2d."""
    torch.manual_seed(0)
    a = ASPP(3, 2, rates=(1, 3), variant="v2", hidden_channels=None).double()
    x = torch.randn(1, 3, 10, 8, dtype=torch.float64)
    ref = sum(
        F.conv2d(x, b.conv.weight, b.conv.bias, padding=r, dilation=r) for b, r in zip(a.branches, (1, 3))
    )
    # default float64 tolerance (rtol 1e-7, atol 1e-7): two branches of 3 * 9 = 27 products each, error ~1e-15
    torch.testing.assert_close(a(x), ref)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(variant="v4"), "variant"),
        (dict(rates=()), "rates"),
        (dict(rates=(6, 0)), "rates"),
        (dict(dropout=1.5), "dropout"),
        (dict(hidden_channels=-1), "hidden_channels"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ASPP(4, 2, **kwargs)


def test_bad_input():
    a = ASPP(4, 2, rates=(1,))
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        a(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match="out_channels"):
        ASPP(4, 0)
