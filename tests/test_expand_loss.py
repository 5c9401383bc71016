"""segops.weak.losses.expand_loss: SEC's expand loss (global weighted rank pooling of the tagged classes, the
maximum of the absent ones) — a hand-computed case, a loop-by-loop twin, identities, gradients, the trainer's
use of it and its errors."""

from __future__ import annotations

import math

import pytest
import torch

from segops.train import TrainConfig
from segops.weak.losses import SEC_BG_DECAY, SEC_FG_DECAY, RegularizedLoss, expand_loss, sec_decay


def _naive(logits: torch.Tensor, tags: torch.Tensor, roi, fg_decay: float, bg_decay: float) -> float:
    """The loss written straight from its definition, one image and one class at a time, on probabilities."""
    B, K, H, W = logits.shape
    probs = logits.double().softmax(1).reshape(B, K, H * W)
    fg_tags = tags[:, 1:] if tags.shape[1] == K else tags
    total = 0.0
    for b in range(B):
        keep = torch.ones(H * W, dtype=torch.bool) if roi is None else roi[b].reshape(-1) > 0.5
        if not bool(keep.any()):
            continue  # an image without ROI pixels adds 0
        present = [c for c in range(1, K) if float(fg_tags[b, c - 1]) == 1.0]
        absent = [c for c in range(1, K) if c not in present]

        def gwrp(c: int, d: float) -> float:
            values = sorted(probs[b, c][keep].tolist(), reverse=True)
            weights = [d**j for j in range(len(values))]
            return sum(w * v for w, v in zip(weights, values)) / sum(weights)

        loss = -math.log(gwrp(0, bg_decay))
        if present:
            loss -= sum(math.log(gwrp(c, fg_decay)) for c in present) / len(present)
        if absent:
            loss -= sum(math.log(1.0 - max(probs[b, c][keep].tolist())) for c in absent) / len(absent)
        total += loss
    return total / B


def _random_case(seed: int, B=3, K=4, H=5, W=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (2.0 * torch.randn(B, K, H, W, generator=g, dtype=torch.float64)).to(dtype)
    tags = (torch.rand(B, K - 1, generator=g) < 0.5).to(torch.float32)
    roi = (torch.rand(B, H, W, generator=g) < 0.8).to(torch.float32)
    return logits, tags, roi


def test_hand_computed_case():
    """Three pixels, background + two classes, decay 0.5 (weights 1, 1/2, 1/4), with the probabilities chosen:
    image 0 is tagged with class 1 (class 2 absent), image 1 has no foreground tag and its ROI drops pixel 2."""
    probs = torch.tensor([[0.1, 0.8, 0.1], [0.5, 0.4, 0.1], [0.7, 0.1, 0.2]], dtype=torch.float64).T  # (K, pixels)
    logits = probs.log().view(1, 3, 1, 3).repeat(2, 1, 1, 1)
    tags = torch.tensor([[1, 1, 0], [1, 0, 0]])  # (B, K): the background column is ignored
    roi = torch.tensor([[[1.0, 1.0, 1.0]], [[1.0, 1.0, 0.0]]])
    # image 0: G_1 = (0.8 + 0.4/2 + 0.1/4) / 1.75, G_0 = (0.7 + 0.5/2 + 0.1/4) / 1.75, max P_2 = 0.2
    image0 = -math.log(1.025 / 1.75) - math.log(1.0 - 0.2) - math.log(0.975 / 1.75)
    # image 1 (pixels 0, 1): both classes absent, max P_1 = 0.8, max P_2 = 0.1; G_0 = (0.5 + 0.1/2) / 1.5
    image1 = -(math.log(1.0 - 0.8) + math.log(1.0 - 0.1)) / 2 - math.log(0.55 / 1.5)
    got = expand_loss(logits, tags, roi, fg_decay=0.5, bg_decay=0.5)
    # float64 through a dozen operations on numbers of order 1: a few ulps (1e-16), so 1e-12 is ample
    assert float(got) == pytest.approx((image0 + image1) / 2, rel=1e-12, abs=1e-12)
    # the (B, K - 1) spelling of the tags is the same
    assert float(expand_loss(logits, tags[:, 1:], roi, 0.5, 0.5)) == float(got)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("decays", [(0.9, 0.97), (None, None), (1.0, 1.0), (0.3, 0.5)])
def test_matches_the_loop_twin(seed, decays):
    logits, tags, roi = _random_case(seed)
    fg, bg = decays
    n = logits.shape[-2] * logits.shape[-1]
    want = _naive(logits, tags, roi, fg if fg is not None else sec_decay(SEC_FG_DECAY, n),
                  bg if bg is not None else sec_decay(SEC_BG_DECAY, n))
    got = float(expand_loss(logits, tags, roi, fg, bg))
    # float64 both ways, different summation orders (log-sum-exp vs direct sums over 30 pixels): ~1e-15
    # relative; 1e-10 leaves room without hiding a wrong weight (which moves the value by 1e-3 or more)
    assert got == pytest.approx(want, rel=1e-10)
    assert float(expand_loss(logits, tags, None, fg, bg)) == pytest.approx(_naive(logits, tags, None, *(
        (fg if fg is not None else sec_decay(SEC_FG_DECAY, n)), (bg if bg is not None else sec_decay(SEC_BG_DECAY, n)))),
        rel=1e-10)  # fmt: skip


def test_decay_one_is_average_pooling_and_pixel_order_does_not_matter():
    logits, tags, _ = _random_case(7)
    tags[:] = 1.0  # every class present: the loss is -mean log(mean P_c) - log(mean P_0)
    probs = logits.softmax(1)
    gap = probs.mean((2, 3))
    want = (-(gap[:, 1:].log().mean(1)) - gap[:, 0].log()).mean()
    # float64, 30-term means: agreement to ~1e-15; 1e-12 relative
    assert float(expand_loss(logits, tags, None, 1.0, 1.0)) == pytest.approx(float(want), rel=1e-12)
    g = torch.Generator().manual_seed(8)
    perm = torch.randperm(30, generator=g)
    shuffled = logits.flatten(2)[:, :, perm].reshape(logits.shape)
    a = expand_loss(logits, tags, None, 0.8, 0.9)
    b = expand_loss(shuffled, tags, None, 0.8, 0.9)
    # rank pooling sorts the pixels: only the summation order of equal terms can differ (1e-15); 1e-13
    assert float(a) == pytest.approx(float(b), rel=1e-13)


def test_adding_a_constant_to_a_pixels_logits_changes_nothing():
    logits, tags, roi = _random_case(9)
    shift = torch.randn(logits.shape[0], 1, *logits.shape[2:], generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    a = float(expand_loss(logits, tags, roi))
    b = float(expand_loss(logits + 5.0 * shift, tags, roi))
    # softmax is shift-invariant; log-softmax of shifted float64 logits of size ~10 differs by ~1e-15: 1e-12
    assert a == pytest.approx(b, rel=1e-12)


def test_gradient_float64():
    logits, tags, roi = _random_case(11, B=2, K=3, H=3, W=4)
    logits.requires_grad_(True)
    # gradcheck's own finite-difference tolerances (eps 1e-6, atol 1e-5, rtol 1e-3) in float64; random
    # continuous logits have no ties, so the sort and the argmax are locally constant
    assert torch.autograd.gradcheck(lambda x: expand_loss(x, tags, roi, 0.7, 0.9), (logits,))
    assert torch.autograd.gradcheck(lambda x: expand_loss(x, tags, None), (logits,))


def test_saturated_probabilities_stay_finite():
    """An absent class that takes a pixel with probability 1 - 1e-44 (1 in float32 and float64) costs its
    log-odds, not log(0); a present class with probability ~e^-60 everywhere costs ~60, not inf."""
    logits = torch.zeros(1, 3, 2, 2, dtype=torch.float32)
    logits[0, 2, 0, 0] = 100.0  # class 2 (absent) dominates pixel (0, 0)
    logits[0, 1] = -60.0  # class 1 (present) nowhere
    logits.requires_grad_(True)
    loss = expand_loss(logits, torch.tensor([[1.0, 0.0]]), None, 0.5, 0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # absent class 2: -log(1 - P_2) at (0, 0) = log(1 + e^100 / (1 + e^-60)) = 100 + O(e^-100);
    # present class 1: P_1 = e^-60 / 2 on three pixels (e^-160 on the fourth), G_1 = e^-60 / 2 * 1.75 / 1.875;
    # background: P_0 = 1/2 on the same three pixels, G_0 = 1/2 * 1.75 / 1.875 (plus e^-100 / 8, negligible)
    want = 100.0 + (60.0 + math.log(2.0) - math.log(1.75 / 1.875)) + (math.log(2.0) - math.log(1.75 / 1.875))
    # float32 log-softmax of logits of size 100: absolute rounding ~100 * 6e-8 = 6e-6 per term; 1e-4
    assert float(loss.detach()) == pytest.approx(want, abs=1e-4)


def test_images_without_roi_pixels_add_zero():
    logits, tags, roi = _random_case(12)
    roi[1] = 0.0
    logits.requires_grad_(True)
    loss = expand_loss(logits, tags, roi)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and bool((logits.grad[1] == 0).all())
    keep = [0, 2]
    rest = expand_loss(logits.detach()[keep], tags[keep], roi[keep])
    # the empty image adds 0 to the sum, the mean still divides by all 3 images; float64: 1e-12
    assert float(loss.detach()) == pytest.approx(float(rest) * 2 / 3, rel=1e-12)
    empty = torch.zeros_like(roi)
    x = logits.detach().clone().requires_grad_(True)
    zero = expand_loss(x, tags, empty)
    zero.backward()
    assert float(zero.detach()) == 0.0 and bool((x.grad == 0).all())


def test_float32_agrees_with_float64():
    logits, tags, roi = _random_case(13, B=2, K=5, H=16, W=16)
    a = float(expand_loss(logits, tags, roi))
    b = float(expand_loss(logits.float(), tags, roi))
    # float32 log-sum-exp over 256 pixels: ~256 * 6e-8 ~ 2e-5 relative at worst; 1e-4
    assert b == pytest.approx(a, rel=1e-4)


def test_sec_decay_keeps_the_weight_at_a_share_of_the_image():
    assert sec_decay(0.996, 41 * 41) == 0.996
    d = sec_decay(0.996, 64 * 64)
    # the pixel ranked at 10% of the image gets the weight SEC gives it on 41 x 41 maps (float64 powers: 1e-12)
    assert d ** (0.1 * 64 * 64) == pytest.approx(0.996 ** (0.1 * 41 * 41), rel=1e-12)
    assert sec_decay(1.0, 10) == 1.0
    with pytest.raises(ValueError, match="decay must be in"):
        sec_decay(0.0, 10)
    with pytest.raises(ValueError, match="pixels must be >= 1"):
        sec_decay(0.5, 0)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda x, t: (x[0], t, None, {}), r"logits must be a floating point \(B, K, H, W\)"),
        (lambda x, t: (x.long(), t, None, {}), r"logits must be a floating point"),
        (lambda x, t: (x[:, :1], t[:, :0], None, {}), r"K >= 2"),
        (lambda x, t: (x, t[:1], None, {}), r"tags must be \(B, K\) = \(2, 3\) or \(B, K - 1\) = \(2, 2\)"),
        (lambda x, t: (x, t * 2, None, {}), r"tags must be 0 or 1"),
        (lambda x, t: (x, t, torch.ones(2, 4, 3), {}), r"roi must be None or \(B, H, W\) = \(2, 3, 4\)"),
        (lambda x, t: (x, t, None, {"fg_decay": 0.0}), r"fg_decay must be a number in \(0, 1\]"),
        (lambda x, t: (x, t, None, {"bg_decay": 1.5}), r"bg_decay must be a number in \(0, 1\]"),
        (lambda x, t: (x, t, None, {"fg_decay": True}), r"fg_decay must be a number"),
        (lambda x, t: (x.index_fill(2, torch.tensor([0]), float("nan")), t, None, {}), r"logits contain NaN or Inf"),
    ],
)
def test_bad_inputs_name_the_argument(make, match):
    x = torch.randn(2, 3, 3, 4, generator=torch.Generator().manual_seed(14))
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    logits, tags, roi, kw = make(x, t)
    with pytest.raises(ValueError, match=match):
        expand_loss(logits, tags, roi, **kw)


def test_the_trainer_adds_the_weighted_term_for_tags_only():
    logits, tags, roi = _random_case(15, B=2, K=3, H=8, W=8, dtype=torch.float32)
    target = torch.full((2, 8, 8), 255, dtype=torch.int64)
    target[:, :2] = 0
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(16)) * 255
    full_tags = torch.cat([torch.ones(2, 1), tags], 1)  # what the tagged dataset yields: (B, K), background first
    plain, terms = RegularizedLoss(TrainConfig(loss="pce", supervision="scribble"))(logits, target, images, roi, full_tags)
    assert set(terms) == {"pce"}
    total, terms = RegularizedLoss(TrainConfig(loss="pce", supervision="tags", expand_weight=0.25))(
        logits, target, images, roi, full_tags)  # fmt: skip
    want = 0.25 * expand_loss(logits, full_tags, roi)
    assert set(terms) == {"pce", "expand"}
    # the same float32 values, one addition: equal to float32 rounding
    assert float(total) == pytest.approx(float(plain + want), rel=1e-6)
    decayed, _ = RegularizedLoss(TrainConfig(loss="pce", supervision="tags", expand_weight=0.25, expand_fg_decay=0.9,
                                             expand_bg_decay=0.95))(logits, target, images, roi, full_tags)
    assert float(decayed) == pytest.approx(float(plain + 0.25 * expand_loss(logits, full_tags, roi, 0.9, 0.95)), rel=1e-6)
    off, terms = RegularizedLoss(TrainConfig(loss="pce", supervision="tags", expand_weight=0.0))(logits, target, images, roi)
    assert set(terms) == {"pce"} and float(off) == float(plain)
    with pytest.raises(ValueError, match="needs the images' tags, got tags=None"):
        RegularizedLoss(TrainConfig(loss="pce", supervision="tags"))(logits, target, images, roi)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="--expand-weight must be a finite number >= 0"):
            TrainConfig(supervision="tags", expand_weight=bad).validate()
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"--expand-fg-decay must be in \(0, 1\]"):
            TrainConfig(supervision="tags", expand_fg_decay=bad).validate()
        with pytest.raises(ValueError, match=r"--expand-bg-decay must be in \(0, 1\]"):
            TrainConfig(supervision="tags", expand_bg_decay=bad).validate()


def test_cli_expand_weight():
    from segops import cli, train_cli

    parse = cli.build_parser().parse_args
    assert train_cli.config_from_args(parse(["train", "--supervision", "tags", "--expand-weight", "0.5"])).expand_weight == 0.5
    default = train_cli.config_from_args(parse(["train", "--supervision", "tags"]))
    assert default.expand_weight == TrainConfig().expand_weight and default.expand_fg_decay is None
    cfg = train_cli.config_from_args(parse(["train", "--expand-fg-decay", "0.99", "--expand-bg-decay", "0.999"]))
    assert (cfg.expand_fg_decay, cfg.expand_bg_decay) == (0.99, 0.999)


def test_the_log_has_an_expand_column_and_an_older_log_keeps_its_columns(tmp_path):
    import csv

    from segops.train import _CSVLog

    log = _CSVLog(str(tmp_path / "new.csv"), append=False)
    log.write({"epoch": 1, "pce": 0.5, "expand": 2.0})
    log.close()
    assert next(csv.DictReader(open(tmp_path / "new.csv")))["expand"] == "2.0"
    # a run resumed from a log written before the column existed appends under the header it has
    old = tmp_path / "old.csv"
    old.write_text("epoch,step,loss,pce,val_miou\n1,10,0.7,0.7,0.5\n")
    log = _CSVLog(str(old), append=True)
    log.write({"epoch": 2, "step": 20, "loss": 0.6, "pce": 0.6, "expand": 1.0, "val_miou": 0.6})
    log.close()
    rows = list(csv.DictReader(open(old)))
    assert rows[1] == {"epoch": "2", "step": "20", "loss": "0.6", "pce": "0.6", "val_miou": "0.6"}
