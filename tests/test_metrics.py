"""segops.metrics.ConfusionMatrix against hand-computed confusion matrices."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import require_optional
from segops.metrics import ConfusionMatrix, format_iou_table


def test_hand_computed_matrix():
    # target rows / prediction columns, K = 3, one void pixel
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    r = cm.compute()
    # counted pixels: (t,p) = (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) (1,0)
    expected = torch.tensor([[1, 1, 0], [1, 2, 0], [1, 0, 1]])
    assert torch.equal(r["matrix"], expected)
    # IoU_0 = 1 / (2 + 3 - 1) = 1/4; IoU_1 = 2 / (3 + 3 - 2) = 1/2; IoU_2 = 1 / (2 + 1 - 1) = 1/2
    # The metrics are float64 ratios and means of a few integer counts: exact to a couple of roundings (~1e-16),
    # so allclose's / approx's default tolerances (1e-5 / 1e-6 relative) can only fail on a wrong count.
    assert torch.allclose(r["iou"], torch.tensor([0.25, 0.5, 0.5], dtype=torch.float64))
    assert r["miou"] == pytest.approx((0.25 + 0.5 + 0.5) / 3)
    assert r["pixel_acc"] == pytest.approx(4 / 7)
    # recall: 1/2, 2/3, 1/2
    assert r["mean_acc"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)


def test_logits_equal_indices_and_accumulate():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 5, 6, generator=g)
    target = torch.randint(0, 4, (3, 5, 6), generator=g)
    target[0, 0, :3] = 255
    a = ConfusionMatrix(4)
    a.update(logits, target)
    b = ConfusionMatrix(4)
    for i in range(3):  # batch by batch accumulates to the same matrix
        b.update(logits[i : i + 1].argmax(1), target[i : i + 1])
    assert torch.equal(a.compute()["matrix"], b.compute()["matrix"])
    assert int(a.compute()["matrix"].sum()) == 3 * 30 - 3


def test_absent_classes_are_excluded_from_means():
    # class 2 absent from target and prediction; class 3 predicted but absent from the target
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 3, 1, 1])
    r = ConfusionMatrix(4)
    r.update(pred, target)
    out = r.compute()
    assert out["present"].tolist() == [True, True, False, True]
    # float64 means of 2-3 exact ratios (see above): approx's 1e-6 default only fails on a wrong formula
    assert out["iou"].tolist() == [0.5, 1.0, 0.0, 0.0]
    assert out["miou"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)  # absent class 2 not averaged in
    assert out["mean_acc"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert "absent" in format_iou_table(out, ["a", "b", "c", "d"])


def test_matches_torchmetrics_definitions():
    tm = require_optional("torchmetrics")
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 5, (2, 7, 9), generator=g)
    target[target == 4] = 255  # class 4 never in the target
    pred = torch.randint(0, 4, (2, 7, 9), generator=g)  # class 4 never predicted either
    cm = ConfusionMatrix(5)
    cm.update(pred, target)
    r = cm.compute()
    j = tm.classification.MulticlassJaccardIndex(5, ignore_index=255, average="macro")(pred, target)
    acc = tm.classification.MulticlassAccuracy(5, ignore_index=255, average="micro")(pred, target)
    # torchmetrics computes in float32 from the same integer counts (126 pixels): ~1e-7 relative, under approx's 1e-6
    assert r["miou"] == pytest.approx(float(j))
    assert r["pixel_acc"] == pytest.approx(float(acc))


def test_empty_and_errors():
    cm = ConfusionMatrix(3)
    assert math.isnan(cm.compute()["miou"])
    cm.update(torch.tensor([0, 1]), torch.tensor([255, 255]))  # only void: nothing counted
    assert math.isnan(cm.compute()["pixel_acc"])
    with pytest.raises(ValueError, match="target labels must be in"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="predicted classes"):
        cm.update(torch.tensor([0, 5]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shapes differ"):
        cm.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"logits must be \(B, 3"):
        cm.update(torch.randn(1, 4, 2), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(0)
    cm.reset()
    assert int(cm.compute()["matrix"].sum()) == 0
