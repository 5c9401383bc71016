"""The CRF loss's schedule: ``crf_schedule``, ``RegularizedLoss.crf_factor`` and ``--crf-start-epoch`` /
``--crf-ramp-epochs`` in the trainer."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from segops import cli
from segops.train import TrainConfig, register_model, train
from segops.weak.losses import RegularizedLoss, crf_schedule

sys.path.insert(0, os.path.dirname(__file__))
from standins import ExactDenseCRFLoss, tiny_fcn  # noqa: E402

register_model("tiny", tiny_fcn)


def test_crf_schedule_values():
    # full weight from the first step (the default)
    assert [crf_schedule(s, 5) for s in range(12)] == [1.0] * 12
    # two epochs of 5 steps without the CRF term, then the full weight at once
    assert [crf_schedule(s, 5, start_epoch=2) for s in range(12)] == [0.0] * 10 + [1.0] * 2
    # a two-epoch ramp from the first step: (i + 1) / 10, then 1
    assert [crf_schedule(s, 5, ramp_epochs=2) for s in range(12)] == pytest.approx([0.1 * (i + 1) for i in range(10)] + [1.0] * 2)
    # one epoch off, then a one-epoch ramp
    got = [crf_schedule(s, 4, start_epoch=1, ramp_epochs=1) for s in range(10)]
    assert got == pytest.approx([0.0] * 4 + [0.25, 0.5, 0.75, 1.0] + [1.0] * 2)
    # fractional epochs count in steps
    assert [crf_schedule(s, 4, start_epoch=0.5) for s in range(4)] == [0.0, 0.0, 1.0, 1.0]
    for bad in (dict(start_epoch=-1), dict(ramp_epochs=float("nan")), dict(ramp_epochs=float("inf"))):
        with pytest.raises(ValueError, match="finite number >= 0"):
            crf_schedule(0, 4, **bad)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        crf_schedule(0, 0)


class _CountingCRF(ExactDenseCRFLoss):
    calls = 0

    def forward(self, images, segmentations, rois=None):
        type(self).calls += 1
        return super().forward(images, segmentations, rois)


def test_crf_factor_scales_the_crf_term_only():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 12, 10, generator=g)
    target = torch.randint(0, 3, (2, 12, 10), generator=g)
    target[torch.rand(2, 12, 10, generator=g) < 0.7] = 255
    images = torch.rand(2, 3, 12, 10, generator=g) * 255
    cfg = TrainConfig(loss="pce+crf", crf_weight=1e-2, crf_sigma_xy=5.0)
    loss = RegularizedLoss(cfg, crf_cls=_CountingCRF)
    full, t_full = loss(logits, target, images, None)
    assert t_full["crf"] < 0  # the CRF loss is a negative association
    loss.crf_factor = 0.25
    quarter, t_quarter = loss(logits, target, images, None)
    assert t_quarter["pce"] == t_full["pce"]
    assert t_quarter["crf"] == pytest.approx(0.25 * t_full["crf"], rel=1e-6)
    assert float(quarter) == pytest.approx(t_full["pce"] + 0.25 * t_full["crf"], rel=1e-6)
    # the gradient of the CRF part scales with the factor too
    x = logits.clone().requires_grad_(True)
    loss.crf_factor = 1.0
    g1 = torch.autograd.grad(loss(x, target, images, None)[0], x)[0]
    loss.crf_factor = 0.0
    _CountingCRF.calls = 0
    g0 = torch.autograd.grad(loss(x, target, images, None)[0], x)[0]
    assert _CountingCRF.calls == 0  # off: not computed
    loss.crf_factor = 0.5
    g_half = torch.autograd.grad(loss(x, target, images, None)[0], x)[0]
    torch.testing.assert_close(g_half, 0.5 * (g1 + g0), rtol=1e-5, atol=1e-7)
    off = RegularizedLoss(cfg, crf_cls=_CountingCRF)
    off.crf_factor = 0.0
    total, t_off = off(logits, target, images, None)
    assert t_off == {"pce": t_full["pce"], "crf": 0.0} and float(total) == t_full["pce"]


def test_training_adds_the_crf_term_after_the_start_epoch(tmp_path):
    torch.set_num_threads(1)
    base = dict(model="tiny", model_width=0.5, data="synthetic", synthetic_train=8, synthetic_val=4, image_size=32,
                batch_size=4, epochs=3, lr=0.01, progress=False, panels=0, crf_weight=1e-4, crf_sigma_xy=20.0,
                workers=0, loss="pce+crf", seed=0)
    # 2 steps per epoch: epoch 1 without the CRF term, epoch 2 ramps it in (factors 0.5, 1), epoch 3 at full weight
    out = train(TrainConfig(out_dir=str(tmp_path / "a"), crf_start_epoch=1, crf_ramp_epochs=1, **base),
                crf_cls=ExactDenseCRFLoss, log=lambda s: None)
    h = out["history"]
    assert [r["epoch"] for r in h] == [1, 2, 3]
    assert h[0]["crf"] == 0.0 and h[0]["loss"] == pytest.approx(h[0]["pce"], rel=1e-6)
    assert h[1]["crf"] < 0 and h[2]["crf"] < 0
    # the first epoch trains on pCE alone: its steps are those of a run without the CRF loss
    ref = train(TrainConfig(out_dir=str(tmp_path / "b"), **dict(base, loss="pce", epochs=1)), log=lambda s: None)
    assert ref["history"][0]["pce"] == h[0]["pce"]
    # the schedule's defaults keep the CRF term at full weight from the first step
    plain = train(TrainConfig(out_dir=str(tmp_path / "c"), **dict(base, epochs=1)), crf_cls=ExactDenseCRFLoss, log=lambda s: None)
    assert plain["history"][0]["crf"] < 0
    assert np.isfinite(plain["history"][0]["loss"])


def test_schedule_flags_and_errors(tmp_path, capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["train", "--crf-start-epoch", "2", "--crf-ramp-epochs", "3.5"])
    from segops.train_cli import config_from_args

    cfg = config_from_args(args)
    assert (cfg.crf_start_epoch, cfg.crf_ramp_epochs) == (2.0, 3.5)
    for name in ("crf_start_epoch", "crf_ramp_epochs"):
        for bad in (-1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="--%s must be a finite number >= 0" % name.replace("_", "-")):
                TrainConfig(**{name: bad}).validate()
