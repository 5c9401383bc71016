"""segops.models: the reference segmentation models.

Small widths (0.125) and small inputs keep forward/backward cheap; parameter counts at width 1.0 are taken on the
meta device (no memory). Torchvision-format ImageNet checkpoints are generated here from torchvision's layouts
(written out below from the torchvision architectures, not from segops' modules), so the tests also verify that
segops' key names mirror torchvision's.
"""

from __future__ import annotations

import copy
import warnings
from typing import Dict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segops.models as M
from segops.models import count_parameters, freeze_bn, get_model, list_models, to_torch_layers
from segops.nn import AtrousConv2d, ConvTranspose2d

REQUIRED = [
    "fcn32s", "fcn16s", "fcn8s", "segnet", "unet", "deeplabv2_largefov", "deeplabv2_aspp",
    "deeplabv3plus_resnet50", "deeplabv3plus_resnet101",
]
ALL = list_models()
SMALL = 0.125


# ----------------------------------------------------------------------------------------------------------------
# torchvision-format state_dicts, written from torchvision's architectures (vgg16 / vgg16_bn / resnet50 / resnet101)

def _c(ch: int, width: float) -> int:
    return max(1, int(round(ch * width)))


def _bn(sd: Dict[str, torch.Tensor], name: str, c: int, g: torch.Generator) -> None:
    sd[name + ".weight"] = torch.rand(c, generator=g) + 0.5
    sd[name + ".bias"] = torch.randn(c, generator=g)
    sd[name + ".running_mean"] = torch.randn(c, generator=g)
    sd[name + ".running_var"] = torch.rand(c, generator=g) + 0.5
    sd[name + ".num_batches_tracked"] = torch.tensor(7)


def tv_vgg16(width: float = 1.0, bn: bool = False, device="cpu", seed: int = 0) -> Dict[str, torch.Tensor]:
    """torchvision.models.vgg16(_bn)().state_dict() layout, channels scaled by width."""
    g = torch.Generator().manual_seed(seed)
    mk = (lambda *s: torch.empty(*s, device="meta")) if device == "meta" else (lambda *s: torch.randn(*s, generator=g))
    sd: Dict[str, torch.Tensor] = {}
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    i, cin = 0, 3
    for v in cfg:
        if v == "M":
            i += 1
            continue
        c = _c(v, width)
        sd["features.%d.weight" % i] = mk(c, cin, 3, 3)
        sd["features.%d.bias" % i] = mk(c)
        if bn:
            if device == "meta":
                for s in ("weight", "bias", "running_mean", "running_var"):
                    sd["features.%d.%s" % (i + 1, s)] = mk(c)
                sd["features.%d.num_batches_tracked" % (i + 1)] = torch.empty((), dtype=torch.long, device="meta")
            else:
                _bn(sd, "features.%d" % (i + 1), c, g)
        i += 3 if bn else 2
        cin = c
    fc = _c(4096, width)
    sd["classifier.0.weight"] = mk(fc, cin * 49)
    sd["classifier.0.bias"] = mk(fc)
    sd["classifier.3.weight"] = mk(fc, fc)
    sd["classifier.3.bias"] = mk(fc)
    sd["classifier.6.weight"] = mk(1000, fc)
    sd["classifier.6.bias"] = mk(1000)
    return sd


def tv_resnet(depth: int, width: float = 1.0, device="cpu", seed: int = 0) -> Dict[str, torch.Tensor]:
    """torchvision.models.resnet50/101().state_dict() layout, channels scaled by width."""
    g = torch.Generator().manual_seed(seed)
    meta = device == "meta"
    mk = (lambda *s: torch.empty(*s, device="meta")) if meta else (lambda *s: torch.randn(*s, generator=g) * 0.05)

    def bn(name, c):
        if meta:
            for s in ("weight", "bias", "running_mean", "running_var"):
                sd[name + "." + s] = mk(c)
            sd[name + ".num_batches_tracked"] = torch.empty((), dtype=torch.long, device="meta")
        else:
            _bn(sd, name, c, g)

    sd: Dict[str, torch.Tensor] = {}
    base = _c(64, width)
    sd["conv1.weight"] = mk(base, 3, 7, 7)
    bn("bn1", base)
    blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    cin = base
    for li, n in enumerate(blocks):
        planes = _c(64 * 2 ** li, width)
        for b in range(n):
            p = "layer%d.%d." % (li + 1, b)
            sd[p + "conv1.weight"] = mk(planes, cin, 1, 1)
            bn(p + "bn1", planes)
            sd[p + "conv2.weight"] = mk(planes, planes, 3, 3)
            bn(p + "bn2", planes)
            sd[p + "conv3.weight"] = mk(planes * 4, planes, 1, 1)
            bn(p + "bn3", planes * 4)
            if b == 0:
                sd[p + "downsample.0.weight"] = mk(planes * 4, cin, 1, 1)
                bn(p + "downsample.1", planes * 4)
            cin = planes * 4
    sd["fc.weight"] = mk(1000, cin)
    sd["fc.bias"] = mk(1000)
    return sd


def _n_params(sd: Dict[str, torch.Tensor]) -> int:
    return sum(v.numel() for k, v in sd.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))


@pytest.mark.parametrize(
    "make, published",
    [
        # torchvision model cards: vgg16 138,357,544; vgg16_bn 138,365,992; resnet50 25,557,032; resnet101 44,549,160
        (lambda: tv_vgg16(device="meta"), 138_357_544),
        (lambda: tv_vgg16(bn=True, device="meta"), 138_365_992),
        (lambda: tv_resnet(50, device="meta"), 25_557_032),
        (lambda: tv_resnet(101, device="meta"), 44_549_160),
    ],
)
def test_generated_torchvision_state_dicts_match_published_counts(make, published):
    assert _n_params(make()) == published


# ----------------------------------------------------------------------------------------------------------------
# registry / API

def test_list_models_has_required_names():
    assert set(REQUIRED) <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_every_conv_is_a_segops_layer(name):
    m = get_model(name, 3, width=SMALL)
    convs = [x for x in m.modules() if isinstance(x, (nn.Conv2d, nn.ConvTranspose2d))]
    assert convs
    for x in convs:
        assert isinstance(x, (AtrousConv2d, ConvTranspose2d)), (name, type(x))
    if name.startswith("deeplab"):
        assert any(x.dilation[0] > 1 for x in convs)
    if name.startswith("fcn") or name == "unet":
        assert any(isinstance(x, ConvTranspose2d) for x in convs)


# ----------------------------------------------------------------------------------------------------------------
# forward + backward at odd sizes, any size

@pytest.mark.parametrize("name", ALL)
def test_forward_backward_odd_sizes(name):
    torch.manual_seed(0)
    K = 5
    m = get_model(name, K, in_channels=3, width=SMALL).train()
    for H, W in [(17, 23), (35, 9)]:
        m.zero_grad(set_to_none=True)
        x = torch.randn(2, 3, H, W, requires_grad=True)
        y = m(x)
        assert y.shape == (2, K, H, W)
        assert torch.isfinite(y).all()
        target = torch.randint(0, K, (2, H, W))
        F.cross_entropy(y, target).backward()
        grads = [p.grad for p in m.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
        assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", ["fcn8s", "segnet", "unet", "deeplabv3plus_resnet50"])
@pytest.mark.parametrize("size", [(1, 1), (2, 5)])
def test_any_input_size(name, size):
    m = get_model(name, 4, width=SMALL).eval()
    with torch.no_grad():
        y = m(torch.randn(1, 3, *size))
    assert y.shape == (1, 4) + size and torch.isfinite(y).all()


def test_in_channels_and_output_stride():
    m = get_model("deeplabv3plus_resnet50", 3, in_channels=1, output_stride=8, width=SMALL).eval()
    assert m.backbone.output_stride == 8
    assert m(torch.randn(1, 1, 33, 31)).shape == (1, 3, 33, 31)
    feats = m.backbone(torch.randn(1, 1, 64, 64))
    assert feats["layer4"].shape[-1] == 8 and feats["layer1"].shape[-1] == 16
    m16 = get_model("deeplabv3plus_resnet50", 3, width=SMALL)
    assert m16.backbone(torch.randn(1, 3, 64, 64))["layer4"].shape[-1] == 4
    assert m.aspp.rates == (12, 24, 36) and m16.aspp.rates == (6, 12, 18)
    v2 = get_model("deeplabv2_aspp", 3, width=SMALL)
    assert v2.backbone(torch.randn(1, 3, 64, 64))["layer4"].shape[-1] == 8
    # dilation pattern of the OS-8 trunk: layer3 rate 2 (first block 1), layer4 rate 4 (first block 2)
    assert [b.conv2.dilation[0] for b in m.backbone.layer3] == [1] + [2] * 5
    assert [b.conv2.dilation[0] for b in m.backbone.layer4] == [2, 4, 4]
    mg = get_model("deeplabv3plus_resnet101", 3, width=SMALL, multi_grid=(1, 2, 4))
    assert [b.conv2.dilation[0] for b in mg.backbone.layer4] == [2, 4, 8]


# ----------------------------------------------------------------------------------------------------------------
# parameter counts at width 1.0 (meta device: nothing allocated)

def conv(cin, cout, k, bias=True):
    return cin * cout * k * k + (cout if bias else 0)


def bn(c):
    return 2 * c


VGG_CONVS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256), (256, 512), (512, 512),
             (512, 512), (512, 512), (512, 512), (512, 512)]
VGG16_CONV = sum(conv(a, b, 3) for a, b in VGG_CONVS)  # 14,714,688
VGG16_BN_CONV = VGG16_CONV + sum(bn(b) for _, b in VGG_CONVS)
RESNET101_TRUNK = 44_549_160 - conv(2048, 1000, 1)  # torchvision resnet101 minus its fc layer
RESNET50_TRUNK = 25_557_032 - conv(2048, 1000, 1)


def fcn_count(K, stride):
    n = VGG16_CONV + conv(512, 4096, 7) + conv(4096, 4096, 1) + conv(4096, K, 1)
    if stride <= 16:
        n += conv(512, K, 1) + K * K * 16  # score_pool4 + learned upscore2 (4x4, no bias)
    if stride == 8:
        n += conv(256, K, 1) + K * K * 16  # score_pool3 + learned upscore_pool4
    return n  # the final bilinear upsampling is fixed (not trained), as in the paper


def segnet_count(K):
    dec = [(512, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 256), (256, 256), (256, 256),
           (256, 128), (128, 128), (128, 64), (64, 64)]
    return VGG16_BN_CONV + sum(conv(a, b, 3) + bn(b) for a, b in dec) + conv(64, K, 3)


def unet_count(cin, K):
    n, c = 0, cin
    for co in (64, 128, 256, 512, 1024):
        n += conv(c, co, 3) + conv(co, co, 3)
        c = co
    for co in (512, 256, 128, 64):
        n += conv(c, co, 2) + conv(2 * co, co, 3) + conv(co, co, 3)
        c = co
    return n + conv(64, K, 1)


def largefov_count(K):
    return VGG16_CONV + conv(512, 1024, 3) + conv(1024, 1024, 1) + conv(1024, K, 1)


def v3plus_count(trunk, K):
    aspp = 15_535_104  # tests/test_aspp.py: 1x1 + 3 atrous + pooling (256 each, BN) + projection
    dec = conv(256, 48, 1, False) + bn(48) + conv(304, 256, 3, False) + bn(256) + conv(256, 256, 3, False) + bn(256)
    return trunk + aspp + dec + conv(256, K, 1)


# (name, kwargs, exact count derived from the paper's layer table, published count or None, source)
COUNTS = [
    ("fcn32s", dict(num_classes=21), fcn_count(21, 32), 134e6, "Long et al. CVPR'15 Table 1: FCN-VGG16 134M"),
    ("fcn16s", dict(num_classes=21), fcn_count(21, 16), 134e6, "same net + skip scores (Table 1: 134M)"),
    ("fcn8s", dict(num_classes=21), fcn_count(21, 8), 134e6, "FCN-8s VGG16 ~134M (the brief / Table 1)"),
    ("segnet", dict(num_classes=11), segnet_count(11), 29.5e6,
     "Badrinarayanan et al. TPAMI'17 (CamVid, 11 classes): SegNet 29.5M"),
    ("unet", dict(num_classes=2, in_channels=1), unet_count(1, 2), 31.0e6,
     "Ronneberger et al. Fig. 1 (1 input channel, 2 classes): ~31.0M (no count printed in the paper)"),
    ("deeplabv2_largefov", dict(num_classes=21), largefov_count(21), 20.5e6,
     "Chen et al. ICLR'15 (DeepLab-LargeFOV, Table 2): 20.5M"),
    ("deeplabv2_aspp", dict(num_classes=21), RESNET101_TRUNK + 4 * conv(2048, 21, 3), None,
     "torchvision resnet101 (44,549,160) - fc + 4 x 3x3 atrous 2048->21"),
    ("deeplabv2_aspp_vgg16", dict(num_classes=21),
     VGG16_CONV + 4 * (conv(512, 1024, 3) + conv(1024, 1024, 1) + conv(1024, 21, 1)), None,
     "VGG16 + 4 x (fc6 3x3 1024, fc7 1024, fc8 21), DeepLab v2 ASPP-L"),
    ("deeplabv3plus_resnet50", dict(num_classes=21), v3plus_count(RESNET50_TRUNK, 21), None,
     "torchvision resnet50 trunk + ASPP + decoder"),
    ("deeplabv3plus_resnet101", dict(num_classes=21), v3plus_count(RESNET101_TRUNK, 21), None,
     "torchvision resnet101 trunk + ASPP + decoder"),
]


@pytest.mark.parametrize("name, kwargs, exact, published, source", COUNTS, ids=[c[0] for c in COUNTS])
def test_parameter_counts_width_1(name, kwargs, exact, published, source):
    with torch.device("meta"):
        m = get_model(name, **kwargs)
    assert all(p.is_meta for p in m.parameters())
    n = count_parameters(m)
    assert n == exact, (name, n, exact, source)
    if published is not None:
        # Published counts are rounded to 3 significant digits.
        assert abs(n - published) / published < 0.005, (name, n, published, source)


def test_counts_table_covers_every_model():
    assert {c[0] for c in COUNTS} == set(ALL)


def test_fcn_upsampling_layers():
    m = get_model("fcn8s", 21, width=SMALL)
    assert m.upscore.weight.requires_grad is False and m.upscore.groups == 21
    assert m.upscore2.weight.requires_grad and m.upscore_pool4.weight.requires_grad
    # Bilinear init: kernel 2s, stride s, per channel; the learned x2 layers are diagonal bilinear at init.
    k = m.upscore.weight[0, 0]
    assert m.upscore.kernel_size == (16, 16) and m.upscore.stride == (8, 8)
    f = torch.tensor([1 - abs(i - 7.5) / 8 for i in range(16)])
    torch.testing.assert_close(k, f[:, None] * f[None, :])
    w2 = m.upscore2.weight
    assert float(w2[0, 1].detach().abs().sum()) == 0.0 and float(w2[3, 3].detach().sum()) > 0
    # Zero-initialised class scores (the paper) give zero logits at init.
    with torch.no_grad():
        assert float(m(torch.randn(1, 3, 9, 9)).abs().max()) == 0.0


@pytest.mark.parametrize("name", ["fcn32s", "fcn16s", "fcn8s"])
def test_fcn_crop_alignment(name):
    """The crops put every output pixel at the centre of its receptive field.

    With max-pools replaced by 2x2 average pools, all weights positive and no dropout, the net is linear and
    symmetric about each output pixel's true position, so the centroid of d out[i, j] / d input is (i, j) exactly;
    a wrong crop offset would shift it by the error.
    """
    m = get_model(name, 1, width=1 / 64).eval()
    feats = m.features
    for i, mod in enumerate(feats):
        if isinstance(mod, nn.MaxPool2d):
            feats[i] = nn.AvgPool2d(2, 2, ceil_mode=True)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, AtrousConv2d):
                mod.weight.fill_(1.0 / mod.weight[0].numel())
                mod.bias.zero_()
    H = W = 461  # the receptive field (~440 px) of the tested pixels lies inside the image
    x = torch.ones(1, 3, H, W, requires_grad=True)
    for i, j in [(230, 230), (226, 235)]:
        x.grad = None
        m(x)[0, 0, i, j].backward()
        g = x.grad[0].sum(0)
        g = g.double()
        ys = torch.arange(H, dtype=torch.float64)
        total = g.sum()
        cy = float((g.sum(1) * ys).sum() / total)
        cx = float((g.sum(0) * ys).sum() / total)
        # float32 gradients: centroid exact to ~1e-4 px; a wrong offset moves it by >= 0.5 px
        assert abs(cy - i) < 1e-2 and abs(cx - j) < 1e-2, (name, i, j, cy, cx)


def test_fcn_convolutionalized_fc6_equals_linear():
    """fc6 loaded from classifier.0 computes the VGG Linear layer on a 7x7 pool5 map (FCN Sec. 3.1)."""
    sd = {k: v.double() for k, v in tv_vgg16(width=SMALL).items()}
    m = get_model("fcn32s", 3, width=SMALL).double()
    m.load_backbone(sd)
    g = torch.Generator().manual_seed(0)
    pool5 = torch.randn(2, _c(512, SMALL), 7, 7, dtype=torch.float64, generator=g)
    conv_out = m.fc6(pool5)[:, :, 0, 0]
    lin = F.linear(pool5.flatten(1), sd["classifier.0.weight"], sd["classifier.0.bias"])
    # float64 on both sides; each output sums n = 64*49 = 3136 products of N(0,1) values (sum of |terms| ~ 2000),
    # in different orders. Worst-case reordering error n * eps64 * sum|terms| = 3136 * 1.1e-16 * 2000 ~ 7e-10.
    torch.testing.assert_close(conv_out, lin, rtol=0, atol=1e-9)


def test_segnet_unpools_with_encoder_indices():
    """Decoder stage 5 starts from pool5's output max-unpooled with pool5's own argmax indices."""
    m = get_model("segnet", 3, width=SMALL).eval()
    x = torch.randn(1, 3, 37, 29)
    seen = {}
    hook = m.decoder[0][0].register_forward_pre_hook(lambda mod, inp: seen.update(inp=inp[0]))
    with torch.no_grad():
        m(x)
        h = x
        for mod in m.features:
            if isinstance(mod, nn.MaxPool2d):
                pre = h
                h, idx = mod(h)
            else:
                h = mod(h)
    hook.remove()
    unpooled = seen["inp"]
    assert unpooled.shape[-2:] == pre.shape[-2:] == (3, 2)
    assert torch.equal(unpooled, F.max_unpool2d(h, idx, 2, 2, output_size=pre.shape[-2:]))
    # every pooled value sits at its argmax position of the pre-pool map
    torch.testing.assert_close(unpooled.flatten(2).gather(2, idx.flatten(2)), h.flatten(2))


# ----------------------------------------------------------------------------------------------------------------
# ImageNet backbone loading (torchvision format)

BACKBONES = [
    ("fcn8s", lambda w, d="cpu": tv_vgg16(w, device=d), {"classifier.6.weight", "classifier.6.bias"}),
    ("fcn32s", lambda w, d="cpu": tv_vgg16(w, device=d), {"classifier.6.weight", "classifier.6.bias"}),
    ("segnet", lambda w, d="cpu": tv_vgg16(w, bn=True, device=d),
     {"classifier.%d.%s" % (i, s) for i in (0, 3, 6) for s in ("weight", "bias")}),
    ("deeplabv2_largefov", lambda w, d="cpu": tv_vgg16(w, device=d), {"classifier.6.weight", "classifier.6.bias"}),
    ("deeplabv2_aspp_vgg16", lambda w, d="cpu": tv_vgg16(w, device=d), {"classifier.6.weight", "classifier.6.bias"}),
    ("deeplabv2_aspp", lambda w, d="cpu": tv_resnet(101, w, device=d), {"fc.weight", "fc.bias"}),
    ("deeplabv3plus_resnet50", lambda w, d="cpu": tv_resnet(50, w, device=d), {"fc.weight", "fc.bias"}),
    ("deeplabv3plus_resnet101", lambda w, d="cpu": tv_resnet(101, w, device=d), {"fc.weight", "fc.bias"}),
]


@pytest.mark.parametrize("name, make, head", BACKBONES, ids=[b[0] for b in BACKBONES])
def test_backbone_keys_width_1_meta(name, make, head):
    """Full-size torchvision layouts map onto the encoders with no missing / unexpected keys (shapes checked)."""
    with torch.device("meta"):
        m = get_model(name, 21)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = m.load_backbone(make(1.0, "meta"))
    assert rep.missing == [] and rep.unexpected == []
    assert set(rep.ignored) == head
    assert rep.loaded and set(rep.loaded) == set(m.encoder_keys())


@pytest.mark.parametrize("name, make, head", BACKBONES, ids=[b[0] for b in BACKBONES])
def test_backbone_values_loaded(name, make, head, tmp_path):
    sd = make(SMALL)
    path = tmp_path / "imagenet.pth"
    torch.save(sd, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = get_model(name, 4, width=SMALL, backbone_weights=str(path))
    rep = m.backbone_report
    assert rep.missing == [] and rep.unexpected == [] and set(rep.ignored) == head
    own = m.state_dict()
    if name.startswith(("deeplabv2_aspp", "deeplabv3")) and name != "deeplabv2_aspp_vgg16":
        for k in ("conv1.weight", "layer1.0.downsample.1.running_var", "layer4.2.conv3.weight", "bn1.bias"):
            assert torch.equal(own["backbone." + k], sd[k])
    else:
        assert torch.equal(own["features.0.weight"], sd["features.0.weight"])
        last = max(int(k.split(".")[1]) for k in sd if k.startswith("features."))
        assert torch.equal(own["features.%d.bias" % last], sd["features.%d.bias" % last])
    if name.startswith("fcn"):
        torch.testing.assert_close(own["fc6.weight"].flatten(1), sd["classifier.0.weight"])
        torch.testing.assert_close(own["fc7.weight"].flatten(1), sd["classifier.3.weight"])
    if name == "deeplabv2_largefov":
        # DeepLab's decimation: every 4th filter, every 3rd tap of the 7x7 kernel.
        w = sd["classifier.0.weight"].reshape(-1, _c(512, SMALL), 7, 7)
        torch.testing.assert_close(own["fc6.weight"], w[::4, :, ::3, ::3])
        torch.testing.assert_close(own["fc7.weight"][:, :, 0, 0], sd["classifier.3.weight"][::4, ::4])
        torch.testing.assert_close(own["fc7.bias"], sd["classifier.3.bias"][::4])
    if name == "segnet":
        assert torch.equal(own["features.1.running_mean"], sd["features.1.running_mean"])
    assert torch.isfinite(m.eval()(torch.randn(1, 3, 19, 21))).all()


def test_backbone_checkpoint_wrappers(tmp_path):
    sd = tv_resnet(50, SMALL)
    for i, obj in enumerate([{"state_dict": sd}, {"model": {"module." + k: v for k, v in sd.items()}}]):
        p = tmp_path / ("ck%d.pt" % i)
        torch.save(obj, p)
        m = get_model("deeplabv3plus_resnet50", 2, width=SMALL, backbone_weights=str(p))
        assert m.backbone_report.missing == [] and m.backbone_report.unexpected == []
        assert torch.equal(m.backbone.conv1.weight, sd["conv1.weight"])


def test_backbone_missing_and_unexpected_are_reported():
    sd = tv_resnet(50, SMALL)
    del sd["layer2.1.conv2.weight"]
    sd["extra.weight"] = torch.zeros(1)
    m = get_model("deeplabv3plus_resnet50", 2, width=SMALL)
    with pytest.warns(UserWarning, match="missing 1"):
        rep = m.load_backbone(sd)
    assert rep.missing == ["backbone.layer2.1.conv2.weight"] and rep.unexpected == ["extra.weight"]


def test_backbone_errors(tmp_path):
    m = get_model("deeplabv3plus_resnet50", 2, width=0.25)
    with pytest.raises(ValueError, match="backbone.conv1.weight.*width=1.0"):
        m.load_backbone(tv_resnet(50, SMALL))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        get_model("fcn8s", 2, width=SMALL, backbone_weights=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="no ImageNet encoder"):
        get_model("unet", 2, width=SMALL, backbone_weights=str(tmp_path / "x.pth"))
    p = tmp_path / "bad.pt"
    torch.save({"a": [1, 2]}, p)
    with pytest.raises(ValueError, match="state_dict"):
        get_model("segnet", 2, width=SMALL, backbone_weights=str(p))


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: get_model("fcn4s", 2), ValueError, "unknown model 'fcn4s'"),
        (lambda: get_model("fcn8s", 2, output_stride=8), ValueError, "output_stride must be one of"),
        (lambda: get_model("deeplabv3plus_resnet50", 2, output_stride=4), ValueError, "output_stride"),
        (lambda: get_model("unet", 0), ValueError, "num_classes"),
        (lambda: get_model("segnet", 2, in_channels=0), ValueError, "in_channels"),
        (lambda: get_model("unet", 2, width=0), ValueError, "width"),
        (lambda: get_model("unet", 2, width=float("nan")), ValueError, "width"),
    ],
)
def test_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("name", ["fcn8s", "segnet", "unet", "deeplabv3plus_resnet50"])
def test_bad_input(name):
    m = get_model(name, 2, width=SMALL)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        m(torch.randn(1, 4, 9, 9))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        m(torch.randn(3, 9, 9))


# ----------------------------------------------------------------------------------------------------------------
# segops layers vs torch.nn layers, training, modes, compile

@pytest.mark.parametrize("name", ALL)
def test_same_as_torch_layers_float64(name):
    """The model with segops conv layers equals the same model with torch.nn's conv layers (float64)."""
    torch.manual_seed(0)
    m = get_model(name, 3, width=SMALL).double().eval()
    if name.startswith("fcn"):
        for s in (m.score_fr, getattr(m, "score_pool4", None), getattr(m, "score_pool3", None)):
            if s is not None:
                nn.init.normal_(s.weight, std=0.1)  # non-zero scores so that the comparison means something
    ref = to_torch_layers(m)
    assert not any(isinstance(x, (AtrousConv2d, ConvTranspose2d)) for x in ref.modules())
    assert ref.state_dict().keys() == m.state_dict().keys()
    x = torch.randn(1, 3, 13, 11, dtype=torch.float64)
    with torch.no_grad():
        y, r = m(x), ref(x)
    assert float(y.abs().max()) > 0
    # float64 on both sides; the two conv implementations sum the same <= C_in*k*k (~5k) products per output in
    # different orders, over ~20 layers: reordering error ~ depth * n * eps64 ~ 1e-11 relative to the largest
    # logit, so 1e-9 of it leaves a 100x margin and still catches any wrong tap or offset (errors of O(1)).
    torch.testing.assert_close(y, r, rtol=1e-9, atol=1e-9 * float(r.abs().max()))


@pytest.mark.parametrize("name", ["unet", "deeplabv3plus_resnet50"])
def test_few_steps_reduce_loss(name):
    torch.manual_seed(0)
    m = get_model(name, 3, width=SMALL).train()
    x = torch.randn(2, 3, 16, 16)
    target = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)

    def loss_now():
        torch.manual_seed(1)  # the same dropout masks each time
        return F.cross_entropy(m(x), target)

    with torch.no_grad():
        first = float(loss_now())
    for _ in range(6):
        opt.zero_grad()
        loss = loss_now()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = float(loss_now())
    assert last < 0.9 * first, (name, first, last)


def test_eval_train_batchnorm():
    torch.manual_seed(0)
    m = get_model("deeplabv3plus_resnet50", 3, width=SMALL)
    x = torch.randn(3, 3, 25, 27)
    bn = m.backbone.bn1
    m.train()
    assert all(mod.training for mod in m.modules())
    with torch.no_grad():
        y_train = m(x)
    assert int(bn.num_batches_tracked) == 1 and float(bn.running_mean.abs().sum()) > 0
    # Train mode: a sample's output depends on the rest of the batch (batch statistics).
    with torch.no_grad():
        # batch statistics of 2 vs 3 samples differ at O(1e-1) of the activations; 1e-5 is float32 noise level
        assert not torch.allclose(m(x[:2])[:1], y_train[:1], atol=1e-5)
    m.eval()
    assert not any(mod.training for mod in m.modules())
    stats = bn.running_mean.clone()
    with torch.no_grad():
        a, b = m(x), m(x[:1])
    # float32; batch size changes the GEMM blocking, so sums of up to ~C_in*9 (~2k) terms per layer are reordered:
    # ~sqrt(2k) * 6e-8 ~ 3e-6 relative per layer over a few dozen layers -> 1e-4 relative, 1e-5 absolute near zero.
    torch.testing.assert_close(a[:1], b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m(x), a)  # deterministic: no dropout, no stat update
    assert torch.equal(bn.running_mean, stats)
    # frozen BN in train mode (DeepLab's small-batch fine-tuning): batch-1 works, statistics stay put
    m.train()
    freeze_bn(m)
    m(x[:1]).sum().backward()
    assert torch.equal(bn.running_mean, stats)


def test_segnet_batchnorm_modes():
    m = get_model("segnet", 2, width=SMALL)
    x = torch.randn(2, 3, 17, 15)
    m.eval()
    with torch.no_grad():
        # float32, batch-size-dependent GEMM blocking over ~26 conv layers: as in the ResNet BN test above
        torch.testing.assert_close(m(x)[1:], m(x[1:]), rtol=1e-4, atol=1e-5)
    m.train()
    with torch.no_grad():
        m(x)
    assert int(m.features[1].num_batches_tracked) == 1


@pytest.mark.parametrize(
    "backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]
)
def test_torch_compile_unet(backend):
    """fullgraph torch.compile of a small U-Net, forward and backward, against eager. aot_eager (dynamo tracing +
    AOT autograd with fake tensors, where the segops layers' fake kernels matter) runs in CI; inductor (code
    generation, ~1 min of compiling on 2 cores) is marked slow."""
    torch.manual_seed(0)
    m = get_model("unet", 2, width=0.0625, dropout=0.0).train()
    x = torch.randn(1, 3, 19, 17)
    ref = m(x)
    ref.square().mean().backward()
    ref_grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(m, backend=backend, fullgraph=True)
    out = compiled(x)
    out.square().mean().backward()
    # float32; the compiled graph may fuse and reorder the elementwise / BN / pooling work between the convs
    # (the convs themselves are the same segops ops): reordering error ~ eps32 * sqrt(n) per layer, ~1e-5
    # relative after the U-Net's ~20 layers, so rtol 1e-4 (atol 1e-5 for values near zero).
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for p, g in zip(m.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


def test_bench_models_suite_quick(monkeypatch):
    from segops import bench

    monkeypatch.setenv("SEGOPS_BENCH_MODELS", "unet")
    ctx = bench.BenchContext("cpu", quick=True, min_run_time=0.01)
    rows = bench.run_suites(["models"], ctx)
    assert [r["op"] for r in rows] == ["unet"]
    r = rows[0]
    assert r["segops_ms"] > 0 and r["torch_ms"] > 0 and r["speedup"] > 0 and r["params"] > 0


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["fcn8s", "segnet", "unet", "deeplabv2_largefov", "deeplabv3plus_resnet50"])
def test_cuda_matches_cpu(name):
    """The same model (same weights) on CUDA and CPU, float64: logits and parameter gradients."""
    torch.manual_seed(0)
    m = get_model(name, 3, width=SMALL).double().train()
    freeze_bn(m)
    for mod in m.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    if name.startswith("fcn"):
        nn.init.normal_(m.score_fr.weight, std=0.1)
    g = copy.deepcopy(m).cuda()
    x = torch.randn(2, 3, 23, 19, dtype=torch.float64)
    y = m(x)
    y.square().mean().backward()
    yg = g(x.cuda())
    yg.square().mean().backward()
    # float64 on both devices; CPU and CUDA reduce the same ~5k-term conv sums in different orders (cuBLAS vs MKL
    # blocking) over ~20 layers: ~1e-11 relative to the largest value, so 1e-9 (1e-8 for the gradients, which
    # add the backward's reductions over the batch and the pixels) with a 100x margin.
    torch.testing.assert_close(yg.cpu(), y, rtol=1e-9, atol=1e-9 * float(y.abs().max()))
    for (k, p), (_, q) in zip(m.named_parameters(), g.named_parameters()):
        if p.grad is not None:
            scale = float(p.grad.abs().max()) or 1.0
            torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-8, atol=1e-8 * scale, msg=k)


def test_deeplab_largefov_geometry():
    """DeepLab's 321x321 crops give a 41x41 score map (output stride 8, Caffe ceil-mode pools); fc6 is 3x3 rate 12."""
    m = get_model("deeplabv2_largefov", 2, width=1 / 16).eval()
    assert m.fc6.dilation == (12, 12) and m.fc6.kernel_size == (3, 3) and m.fc6.padding == (12, 12)
    assert all(m.features[i].dilation == (2, 2) for i in (24, 26, 28))
    seen = {}
    h = m.fc8.register_forward_hook(lambda mod, inp, out: seen.update(s=out.shape[-2:]))
    with torch.no_grad():
        y = m(torch.randn(1, 3, 321, 321))
    h.remove()
    assert tuple(seen["s"]) == (41, 41) and y.shape[-2:] == (321, 321)


def test_fcn8s_at_once_and_channels_last():
    torch.manual_seed(0)
    m = get_model("fcn8s", 3, width=SMALL, at_once=True).eval()
    for s in (m.score_fr, m.score_pool4, m.score_pool3):
        nn.init.normal_(s.weight, std=0.1)
    ref = copy.deepcopy(m)
    ref.at_once = False
    x = torch.randn(1, 3, 27, 33)
    with torch.no_grad():
        y, y_plain = m(x), ref(x)
        # the at-once net damps the pool skips (x0.01, x1e-4): same shape, different logits
        assert y.shape == y_plain.shape == (1, 3, 27, 33) and not torch.allclose(y, y_plain)
        # channels_last input: same logits. float32; only the first layer reads another layout, which may change
        # its summation order (27 terms), after which ~15 VGG layers carry a ~1e-6 relative difference: 1e-4.
        torch.testing.assert_close(m(x.contiguous(memory_format=torch.channels_last)), y, rtol=1e-4, atol=1e-5)


def test_parameter_counts_of_options():
    """Model options change the counts exactly as their layer tables say (meta device)."""
    K = 21
    with torch.device("meta"):
        unet_bn = get_model("unet", 2, in_channels=1, batch_norm=True)
        v2_hidden = get_model("deeplabv2_aspp", K, aspp_hidden=1024)
        v3p_sep = get_model("deeplabv3plus_resnet101", K, separable=True)
    # U-Net + BN: the 3x3 convs lose their biases, each gains a BN (2 x channels).
    n3x3 = [64, 64, 128, 128, 256, 256, 512, 512, 1024, 1024, 512, 512, 256, 256, 128, 128, 64, 64]
    assert count_parameters(unet_bn) == unet_count(1, 2) - sum(n3x3) + sum(2 * c for c in n3x3)
    # DeepLab-v2 ASPP-L branches on ResNet-101: fc6 (3x3 atrous 1024) -> fc7 (1024) -> fc8 (K) per rate.
    assert count_parameters(v2_hidden) == RESNET101_TRUNK + 4 * (
        conv(2048, 1024, 3) + conv(1024, 1024, 1) + conv(1024, K, 1)
    )

    def sep(cin, cout):  # depthwise 3x3 + BN + pointwise 1x1 + BN, no conv biases
        return cin * 9 + bn(cin) + cin * cout + bn(cout)

    aspp = conv(2048, 256, 1, False) + bn(256) + 3 * sep(2048, 256) + conv(2048, 256, 1, False) + bn(256)
    aspp += conv(1280, 256, 1, False) + bn(256)
    dec = conv(256, 48, 1, False) + bn(48) + sep(304, 256) + sep(256, 256) + conv(256, K, 1)
    assert count_parameters(v3p_sep) == RESNET101_TRUNK + aspp + dec


def test_deeplabv2_msc_max_fusion():
    torch.manual_seed(0)
    m = get_model("deeplabv2_aspp", 3, width=SMALL, msc_scales=(1.0, 0.5)).eval()
    x = torch.randn(1, 3, 33, 27)
    with torch.no_grad():
        y = m(x)
        m.msc_scales = None
        full = m(x)
        xs = F.interpolate(x, size=(17, 14), mode="bilinear", align_corners=True)  # round(33 / 2), round(27 / 2)
        half = F.interpolate(m.aspp(m.backbone(xs)["layer4"]), size=(33, 27), mode="bilinear", align_corners=True)
    torch.testing.assert_close(y, torch.maximum(full, half))
    with pytest.raises(ValueError, match="msc_scales"):
        get_model("deeplabv2_aspp", 3, width=SMALL, msc_scales=(1.0, 0.0))
