"""segops.weak: the loss grammar, clicks and image tags, CAM seeds, the weak-supervision training paths,
and ``segops segment``."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from segops import cli
from segops.data import SyntheticScribbles, connected_components, image_tags, synthesize_clicks
from segops.train import TrainConfig, register_model, train
from segops.weak.losses import LOSS_GRAMMAR, LossSpec, RegularizedLoss, parse_loss
from segops.weak.segment import SegmentSettings, check_strokes, mask_iou, segment_image
from segops.weak.supervision import ClickLabels, SeedLabels, TaggedDataset, check_supervision
from segops.weak.tags import CAMClassifier, cam_seeds, cam_segmentation, load_seeds, normalized_cams

sys.path.insert(0, os.path.dirname(__file__))
from standins import tiny_fcn  # noqa: E402

register_model("tiny", tiny_fcn)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------ loss grammar


@pytest.mark.parametrize("base", ["ce", "pce"])
@pytest.mark.parametrize("crf", [False, True])
@pytest.mark.parametrize("ncut", [False, True])
@pytest.mark.parametrize("entropy", [False, True])
def test_grammar_accepts_every_combination_in_any_order(base, crf, ncut, entropy):
    regs = [r for r, on in (("crf", crf), ("ncut", ncut), ("entropy", entropy)) if on]
    spec = parse_loss("+".join([base] + regs))
    assert spec == LossSpec(base, crf, ncut, entropy)
    assert spec.name == "+".join([base] + regs)  # canonical order is the grammar's
    assert parse_loss("+".join([base] + regs[::-1])).name == spec.name  # any order, same loss
    assert spec.terms == (base,) + tuple(regs)


@pytest.mark.parametrize(
    "text, why",
    [
        ("", "empty loss"),
        ("crf", "must start with the data term"),
        ("pce+cfr", "unknown term 'cfr'"),
        ("pce+crf+crf", "term 'crf' given twice"),
        ("pce++crf", "empty term"),
        ("pce+", "empty term"),
        ("ce+pce", "a second data term 'pce'"),
        ("PCE", "unknown data term 'PCE'"),
        ("pce + crf", "unknown data term 'pce '"),
    ],
)
def test_grammar_errors_show_the_grammar(text, why):
    with pytest.raises(ValueError) as e:
        parse_loss(text)
    assert why in str(e.value) and LOSS_GRAMMAR in str(e.value)


def test_grammar_rejects_non_strings():
    with pytest.raises(ValueError, match=r"expected a string.*\{ce\|pce\}"):
        parse_loss(None)  # type: ignore[arg-type]


def test_cli_loss_error_shows_the_grammar(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--loss", "pce+crff"])
    err = capsys.readouterr().err
    assert "unknown term 'crff'" in err and LOSS_GRAMMAR in err
    with pytest.raises(ValueError, match=r"the grammar is \{ce\|pce\}"):
        TrainConfig(loss="pce+tv").validate()


def test_regularized_loss_is_the_sum_of_its_weighted_terms():
    """pce + crf + entropy (the combination the fixed list refused as pce+entropy) equals the terms added by
    hand through the public modules."""
    import segops.nn as snn

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 12, 10, generator=g, dtype=torch.float64).float()
    target = torch.randint(0, 3, (2, 12, 10), generator=g)
    target[torch.rand(2, 12, 10, generator=g) < 0.8] = 255
    images = torch.rand(2, 3, 12, 10, generator=g) * 255
    cfg = TrainConfig(loss="pce+entropy+crf", crf_weight=1e-3, crf_sigma_xy=5.0, entropy_weight=0.3)
    total, terms = RegularizedLoss(cfg)(logits, target, images, None)
    pce = snn.PartialCrossEntropyLoss()(logits, target)
    crf = snn.DenseCRFLoss(1e-3, 15.0, 5.0, 0.5)(images, logits.softmax(1))
    ent = 0.3 * snn.EntropyLoss()(logits)
    assert set(terms) == {"pce", "crf", "entropy"}
    # the same float32 values summed in the same order: equal to float32 rounding of three additions
    assert float(total) == pytest.approx(float(pce + crf + ent), rel=1e-6, abs=1e-7)
    assert terms["entropy"] == pytest.approx(float(ent), rel=1e-6)
    total_pe, terms_pe = RegularizedLoss(TrainConfig(loss="pce+entropy", entropy_weight=0.3))(logits, target, images, None)
    assert set(terms_pe) == {"pce", "entropy"}
    assert float(total_pe) == pytest.approx(float(pce + ent), rel=1e-6, abs=1e-7)


# ------------------------------------------------------------------------------------------ clicks and tags


def _two_disks_mask() -> np.ndarray:
    yy, xx = np.mgrid[0:40, 0:48]
    m = np.zeros((40, 48), np.uint8)
    m[(yy - 12) ** 2 + (xx - 12) ** 2 <= 64] = 1
    m[(yy - 26) ** 2 + (xx - 34) ** 2 <= 81] = 2
    m[(yy - 30) ** 2 + (xx - 8) ** 2 <= 25] = 1  # a second region of class 1
    return m


def test_one_click_per_region_in_its_core():
    mask = _two_disks_mask()
    clicks = synthesize_clicks(mask, np.random.default_rng(0), radius=1.5, core_ratio=0.5, min_area=16)
    assert clicks.dtype == np.uint8 and clicks.shape == mask.shape
    lab = clicks != 255
    assert (clicks[lab] == mask[lab]).all()  # a click never labels another class's pixel
    from segops.data import distance_to_boundary

    regions = 0
    for c in np.unique(mask):
        comps = connected_components(mask == c)
        for i in range(1, int(comps.max()) + 1):
            region = comps == i
            regions += 1
            inside = lab & region
            assert connected_components(inside).max() == 1, "exactly one click in region %d of class %d" % (i, c)
            assert 5 <= inside.sum() <= 9  # a disk of radius 1.5: 9 pixels, fewer only where clipped
            # the click's centre (the pixel whose 3x3 neighbourhood is inside the click) sits in the core
            dist = distance_to_boundary(region)
            ys, xs = np.nonzero(inside)
            cy, cx = int(np.median(ys)), int(np.median(xs))
            assert dist[cy, cx] >= np.ceil(0.5 * dist.max()) - 1
    assert regions == 4  # background, two class-1 disks, one class-2 disk
    again = synthesize_clicks(mask, np.random.default_rng(0), radius=1.5, core_ratio=0.5, min_area=16)
    assert np.array_equal(clicks, again)  # deterministic given the generator


def test_click_options_and_errors():
    mask = _two_disks_mask()
    single = synthesize_clicks(mask, np.random.default_rng(1), radius=0)
    assert (single != 255).sum() == 4  # one pixel per region
    big_only = synthesize_clicks(mask, np.random.default_rng(1), radius=0, min_area=200)
    assert set(np.unique(big_only)) == {0, 2, 255}  # the class-1 disks (< 200 px) get no click
    with pytest.raises(ValueError, match="radius"):
        synthesize_clicks(mask, np.random.default_rng(0), radius=-1)
    with pytest.raises(ValueError, match="core_ratio"):
        synthesize_clicks(mask, np.random.default_rng(0), core_ratio=1.5)
    with pytest.raises(ValueError, match=r"labels \[2\] outside \[0, 2\)"):
        synthesize_clicks(mask, np.random.default_rng(0), num_classes=2)
    with pytest.raises(ValueError, match="integer class ids"):
        synthesize_clicks(mask.astype(np.float32), np.random.default_rng(0))


def test_image_tags_from_masks():
    mask = _two_disks_mask()
    assert image_tags(mask, 4).tolist() == [True, True, True, False]
    void = mask.copy()
    void[mask == 2] = 255  # void never counts
    assert image_tags(void, 3).tolist() == [True, True, False]
    counts = np.bincount(mask.ravel(), minlength=3)
    assert counts[1] != counts[2]
    small = int(np.argmin(counts[1:])) + 1
    expect = [True, True, True]
    expect[small] = False
    assert image_tags(mask, 3, min_pixels=int(counts[small]) + 1).tolist() == expect
    assert image_tags(mask, 3, min_pixels=int(counts[small])).tolist() == [True, True, True]
    with pytest.raises(ValueError, match="outside"):
        image_tags(mask, 2)
    with pytest.raises(ValueError, match="num_classes"):
        image_tags(mask, 0)


def test_weak_label_wrappers_on_the_synthetic_data():
    ds = SyntheticScribbles(3, size=32, seed=5)
    tagged = TaggedDataset(ds, ds.num_classes)
    for i in range(3):
        m = ds.raw(i)["mask"]
        assert tagged[i]["tags"].tolist() == image_tags(m, 3).astype(np.float32).tolist()
    clicks = ClickLabels(ds, seed=7)
    a, b = clicks[1]["scribble"], ClickLabels(ds, seed=7)[1]["scribble"]
    assert torch.equal(a, b) and not torch.equal(a, ds[1]["scribble"])
    lab = a != 255
    assert torch.equal(a[lab], ds[1]["mask"][lab]) and clicks.num_classes == 3  # attributes pass through
    seeds = [torch.full((32, 32), 255, dtype=torch.int64) for _ in range(3)]
    seeds[2][0, 0] = 1
    assert SeedLabels(ds, seeds)[2]["scribble"][0, 0] == 1
    with pytest.raises(ValueError, match="2 seed maps for 3 samples"):
        SeedLabels(ds, seeds[:2])
    with pytest.raises(ValueError, match="shape"):
        SeedLabels(ds, [torch.zeros(8, 8)] * 3)[0]
    assert check_supervision("scribbles") == "scribble"
    with pytest.raises(ValueError, match="--supervision must be one of full, scribble, clicks, tags"):
        check_supervision("boxes")


# ------------------------------------------------------------------------------------------------------ CAM


def test_cam_is_the_map_whose_mean_is_the_class_score():
    torch.manual_seed(0)
    model = CAMClassifier(2, width=0.125, blocks=4).double().eval()
    x = torch.randn(3, 3, 40, 24, dtype=torch.float64)
    cams = model.cams(x)
    assert cams.shape == (3, 2, 5, 3) and model.stride == 8  # ceil mode
    assert CAMClassifier(2, blocks=3).cams(x.float()).shape == (3, 2, 10, 6)
    # GAP then the linear classifier = the classifier then GAP (Zhou et al.'s identity), in float64
    torch.testing.assert_close(model(x), cams.mean((2, 3)) + model.classifier.bias, rtol=1e-12, atol=1e-12)


class _RedGreenFeatures(torch.nn.Module):
    """A stand-in backbone whose two feature channels are "how red" and "how green" each pixel is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from segops.train import IMAGENET_MEAN, IMAGENET_STD

        rgb = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        return torch.stack([(rgb[:, 0] - rgb[:, 1]).clamp_min(0), (rgb[:, 1] - rgb[:, 0]).clamp_min(0)], 1)


def test_cam_seeds_on_a_scene_whose_answer_is_known():
    """A red square (class 1) and a green bar (class 2) on grey: with features that see red and green and a
    classifier that maps them to the two classes, the seeds are exactly the square, the bar and the grey."""
    model = CAMClassifier(2, width=0.125).eval()
    model.features = _RedGreenFeatures()
    model.classifier = __import__("segops.nn", fromlist=["AtrousConv2d"]).AtrousConv2d(2, 2, 1)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        model.classifier.bias.fill_(-0.01)
    img = torch.full((2, 3, 32, 40), 128.0)
    img[0, :, 4:14, 6:16] = torch.tensor([230.0, 20.0, 20.0]).view(3, 1, 1)  # red square
    img[0, :, 20:26, 10:36] = torch.tensor([20.0, 220.0, 30.0]).view(3, 1, 1)  # green bar
    truth = torch.zeros(2, 32, 40, dtype=torch.int64)
    truth[0, 4:14, 6:16] = 1
    truth[0, 20:26, 10:36] = 2
    cams, logits = normalized_cams(model, img)
    assert cams.shape == (2, 2, 32, 40) and float(cams.max()) == pytest.approx(1.0)
    assert (logits[0] > 0).all() and (logits[1] < 0).all()  # image 0 has both classes, the grey image none
    tags = torch.tensor([[1, 1, 1], [1, 0, 0]])
    seeds = cam_seeds(cams, tags, fg_threshold=0.5, bg_threshold=0.1)
    assert torch.equal(seeds, truth)  # full resolution (no pooling), so every pixel is a confident seed
    assert torch.equal(cam_segmentation(cams, logits, 0.3), truth)
    # an absent class never seeds, even where its map is high; without foreground tags, all is background
    only_red = cam_seeds(cams, torch.tensor([[1, 1, 0], [1, 0, 0]]), 0.5, 0.1)
    assert torch.equal(only_red[0][truth[0] == 1], truth[0][truth[0] == 1]) and not (only_red == 2).any()
    assert (only_red[0][truth[0] == 2] == 0).all() and (only_red[1] == 0).all()


def test_cam_seed_thresholds_leave_the_uncertain_band_unlabelled():
    yy, xx = torch.meshgrid(torch.arange(21.0), torch.arange(21.0), indexing="ij")
    blob = torch.exp(-((yy - 10) ** 2 + (xx - 10) ** 2) / 20.0)  # peak 1 at the centre
    cams = torch.stack([blob, torch.zeros_like(blob)])[None]
    s = cam_seeds(cams, torch.tensor([[1.0, 0.0]]), fg_threshold=0.6, bg_threshold=0.05)[0]
    assert torch.equal(s == 1, blob >= 0.6) and torch.equal(s == 0, blob < 0.05)
    assert torch.equal(s == 255, (blob >= 0.05) & (blob < 0.6))
    with pytest.raises(ValueError, match="bg_threshold <= fg_threshold"):
        cam_seeds(cams, torch.tensor([[1.0, 0.0]]), 0.2, 0.5)
    with pytest.raises(ValueError, match=r"tags must be \(B, 2\) or \(B, 3\)"):
        cam_seeds(cams, torch.ones(1, 4), 0.6, 0.1)


# --------------------------------------------------------------------------------- training with weak labels


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(model="tiny", model_width=0.5, data="synthetic", synthetic_train=8, synthetic_val=4, image_size=32,
                batch_size=4, epochs=1, max_steps=2, lr=0.01, out_dir=str(tmp_path / "run"), progress=False, panels=0,
                crf_weight=1e-6, crf_sigma_xy=20.0)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_training_from_clicks(tmp_path):
    torch.set_num_threads(1)
    out = train(_cfg(tmp_path, supervision="clicks", loss="pce+entropy"), log=lambda s: None)
    assert out["steps"] == 2 and np.isfinite(out["history"][0]["pce"]) and out["history"][0]["entropy"] > 0


def test_training_from_tags_writes_and_reuses_the_seeds(tmp_path):
    torch.set_num_threads(1)
    lines = []
    cfg = _cfg(tmp_path, supervision="tags", loss="pce", cam_epochs=1)
    out = train(cfg, log=lines.append)
    assert out["steps"] == 2 and any(ln.startswith("cam seeds:") for ln in lines)
    # SEC's expand term on the image tags is on by default (--expand-weight 1) and logged with the others
    assert out["history"][0]["expand"] > 0 and np.isfinite(out["history"][0]["expand"])
    off = train(_cfg(tmp_path, supervision="tags", loss="pce", cam_epochs=1, expand_weight=0.0, out_dir=str(tmp_path / "off")),
                log=lambda s: None)
    assert "expand" not in off["history"][0]
    seeds_file = tmp_path / "run" / "cam" / "seeds.pt"
    assert seeds_file.is_file() and (tmp_path / "run" / "cam" / "seeds.png").is_file()
    seeds = load_seeds(str(seeds_file), 8)
    assert len(seeds) == 8 and all(s.shape == (32, 32) for s in seeds)
    assert all(set(torch.unique(s).tolist()) <= {0, 1, 2, 255} for s in seeds)
    # a second run reads the seeds instead of training a classifier, and takes the same steps
    again = train(_cfg(tmp_path, supervision="tags", loss="pce", out_dir=str(tmp_path / "b"), cam_seeds=str(seeds_file)),
                  log=lines.append)
    assert any("read 8 seed maps" in ln for ln in lines)
    assert again["history"][0]["pce"] == out["history"][0]["pce"]
    # resuming the first run continues on its own seeds (no second classifier)
    lines.clear()
    train(_cfg(tmp_path, supervision="tags", loss="pce", resume=str(tmp_path / "run"), max_steps=3), log=lines.append)
    assert any("read 8 seed maps from %s" % seeds_file in ln for ln in lines)
    with pytest.raises(ValueError, match="holds 8 seed maps but the training set has 16"):
        train(_cfg(tmp_path, supervision="tags", synthetic_train=16, out_dir=str(tmp_path / "c"), cam_seeds=str(seeds_file)),
              log=lambda s: None)


# ----------------------------------------------------------------------------------------- segops segment


def _two_region_photo():
    """A 24 x 32 photo: a dark left part and a light right part with a soft, noisy edge; strokes far from it."""
    g = np.random.default_rng(3)
    img = np.zeros((24, 32, 3), np.float64)
    img[:, :15] = (40, 60, 90)
    img[:, 15:] = (200, 170, 120)
    img += g.normal(0, 6, img.shape)
    truth = np.zeros((24, 32), np.uint8)
    truth[:, 15:] = 1
    strokes = np.full((24, 32), 255, np.uint8)
    strokes[4:20, 3] = 0
    strokes[4:20, 28] = 1
    return np.clip(img, 0, 255).astype(np.uint8), strokes, truth


def test_segment_a_tiny_photo_end_to_end(tmp_path, capsys):
    img, strokes, truth = _two_region_photo()
    settings = SegmentSettings(steps=120, crf_sigma_xy=8.0, crf_scale=1.0)
    mask, info = segment_image(img, strokes, settings)
    assert mask.shape == (24, 32) and mask.dtype == np.uint8 and info["num_classes"] == 2
    assert mask_iou(mask, truth, 2)["miou"] > 0.95  # two colours far apart: the CRF term puts the edge there
    settings.crf = False
    alone, _ = segment_image(img, strokes, settings)
    assert mask_iou(alone, truth, 2)["miou"] < 0.9  # the strokes alone do not say where the edge is
    assert (mask[strokes != 255] == strokes[strokes != 255]).all()
    Image.fromarray(img).save(tmp_path / "photo.png")
    Image.fromarray(strokes, mode="L").save(tmp_path / "strokes.png")
    Image.fromarray(truth, mode="L").save(tmp_path / "ref.png")
    rc = cli.main(["segment", str(tmp_path / "photo.png"), "--scribbles", str(tmp_path / "strokes.png"), "--out",
                   str(tmp_path / "mask.png"), "--steps", "120", "--crf-sigma-xy", "8", "--crf-scale", "1",
                   "--reference", str(tmp_path / "ref.png"), "--json", str(tmp_path / "info.json")])
    assert rc == 0
    out = np.asarray(Image.open(tmp_path / "mask.png"))
    assert out.shape == (24, 32) and np.array_equal(out, mask)  # the CLI gives the API's mask, as class ids
    assert "mIoU" in capsys.readouterr().out
    assert json.load(open(tmp_path / "info.json"))["reference"]["miou"] > 0.95


def test_segment_errors(tmp_path, capsys):
    img, strokes, _ = _two_region_photo()
    with pytest.raises(ValueError, match="no labelled pixel"):
        check_strokes(img, np.full_like(strokes, 255))
    with pytest.raises(ValueError, match="at least two classes"):
        check_strokes(img, np.where(strokes == 0, 0, 255).astype(np.uint8))
    three = strokes.copy()
    three[three == 1] = 2
    with pytest.raises(ValueError, match="no stroke has id 1"):
        check_strokes(img, three)
    with pytest.raises(ValueError, match="the strokes are 31x24"):
        check_strokes(img, strokes[:, :31])
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        segment_image(img, strokes, SegmentSettings(steps=0))
    Image.fromarray(img).save(tmp_path / "photo.png")
    Image.fromarray(strokes[:, :31], mode="L").save(tmp_path / "small.png")
    assert cli.main(["segment", str(tmp_path / "photo.png"), "--scribbles", str(tmp_path / "small.png"), "--out",
                     str(tmp_path / "m.png")]) == 2
    assert "segops segment: error: the strokes are 31x24" in capsys.readouterr().err
    assert cli.main(["segment", str(tmp_path / "nope.png"), "--scribbles", str(tmp_path / "small.png"), "--out",
                     str(tmp_path / "m.png")]) == 2
    assert "image file not found" in capsys.readouterr().err


def test_the_shipped_coffee_labels_fit_the_photo():
    """docs/img/segment: the strokes and the reference mask are drawn for scikit-image's coffee photo at
    481 x 321 and agree with each other; the photo itself is loaded at run time."""
    from conftest import require_optional

    data = require_optional("skimage.data")
    photo = data.coffee()
    strokes = np.asarray(Image.open(os.path.join(ROOT, "docs", "img", "segment", "coffee_strokes.png")))
    ref = np.asarray(Image.open(os.path.join(ROOT, "docs", "img", "segment", "coffee_reference.png")))
    assert photo.shape == (400, 600, 3) and strokes.shape == ref.shape == (321, 481)
    assert check_strokes(np.zeros((321, 481, 3), np.uint8), strokes) == 3
    lab = strokes != 255
    assert (strokes[lab] == ref[lab]).all() and 0.005 < lab.mean() < 0.05


def test_crf_refinement_moves_bloated_cams_onto_the_colour_edges():
    """CAMs that spill beyond a red square and a green bar (the truth dilated by 2 pixels and blurred) become the
    exact objects once refined by the dense CRF on the photo's colours; the raw maps do not."""
    from segops.weak.tags import refine_cams

    img = torch.full((1, 3, 32, 40), 128.0)
    img[0, :, 4:14, 6:16] = torch.tensor([230.0, 20.0, 20.0]).view(3, 1, 1)
    img[0, :, 20:26, 10:36] = torch.tensor([20.0, 220.0, 30.0]).view(3, 1, 1)
    img += torch.randn(img.shape, generator=torch.Generator().manual_seed(0)) * 4  # sensor noise, 4 of 255
    truth = torch.zeros(1, 32, 40, dtype=torch.int64)
    truth[0, 4:14, 6:16] = 1
    truth[0, 20:26, 10:36] = 2
    onehot = torch.stack([(truth == 1), (truth == 2)], 1).float()
    bloated = torch.nn.functional.max_pool2d(onehot, 5, 1, 2)  # 2 pixels too far on every side
    yy, xx = torch.meshgrid(torch.arange(-4.0, 5), torch.arange(-4.0, 5), indexing="ij")
    k = torch.exp(-(yy**2 + xx**2) / 8).view(1, 1, 9, 9)
    cams = torch.nn.functional.conv2d(bloated.view(2, 1, 32, 40), k / k.sum(), padding=4).view(1, 2, 32, 40)
    cams = cams / cams.amax((2, 3), keepdim=True)
    tags = torch.tensor([[1, 1, 1]])
    raw = refine_cams(cams, tags, img, bg_level=0.5, iterations=0).argmax(1)
    assert (raw != truth).sum() > 150  # the raw maps take a ring of background around both objects (216 px)
    refined = refine_cams(cams, tags, img, bg_level=0.5, iterations=5, sigma_rgb=15.0, sigma_xy=5.0)
    assert torch.equal(refined.argmax(1), truth)
    torch.testing.assert_close(refined.sum(1), torch.ones(1, 32, 40))  # probabilities; 1e-6: float32 softmax
    only_red = refine_cams(cams, torch.tensor([[1, 1, 0]]), img, 0.5)
    assert (only_red[:, 2] == 0).all()  # an absent class gets no probability anywhere
