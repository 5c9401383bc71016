"""``segops demo``: the lecture's table and the tags experiment on tiny budgets — keys, table layout, figure, and
determinism (the same seed gives the same numbers, in one process or in several)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image

from segops import cli, demo

TINY = dict(seed=0, epochs=1, train_images=16, val_images=8, threads=1)


def _run(tmp_path, name, jobs, settings):
    lines = []
    out = demo.run_demo(str(tmp_path / name), settings=settings, jobs=jobs, log=lines.append, **TINY)
    return out, lines


def test_demo_is_deterministic_in_one_process_and_in_two(tmp_path):
    """Two runs of the same tiny configuration give identical numbers and identical weights, whether the
    settings train one after the other in this process or side by side in two worker processes."""
    settings = ["full", "pce", "pce+crf", "clicks:pce"]
    a, lines = _run(tmp_path, "a", 1, settings)
    b, _ = _run(tmp_path, "b", 2, settings)
    for k in settings:
        assert a[k] == b[k], k  # exact: same seed, same arithmetic
        wa = torch.load(tmp_path / "a" / k.replace("+", "_").replace(":", "_") / "last.pt", weights_only=False)["model"]
        wb = torch.load(tmp_path / "b" / k.replace("+", "_").replace(":", "_") / "last.pt", weights_only=False)["model"]
        assert all(torch.equal(wa[n], wb[n]) for n in wa), k
    res = json.load(open(tmp_path / "a" / "results.json"))
    for k in settings:
        assert 0.0 <= res[k] <= 1.0
    assert res["gap_closed"] == pytest.approx((res["pce+crf"] - res["pce"]) / (res["full"] - res["pce"]))
    for key in ("times_s", "total_time_s", "seed", "epochs", "train_images", "val_images", "model", "crf", "crf_loss",
                "torch_threads", "comparison_png", "entropy", "settings", "cpu_s"):
        assert key in res, key
    # the lecture's layout: one row per kind of weak labels, the five loss columns
    header = next(ln for ln in lines if ln.startswith("network"))
    assert [c.strip() for c in header.split("|")][2:] == ["full", "pCE", "pCE+CRF", "pCE+entropy", "pCE+CRF+entropy"]
    rows = [ln for ln in lines if ln.startswith("unet")]
    assert [r.split("|")[1].strip() for r in rows] == ["scribbles", "clicks"]
    fig = Image.open(tmp_path / "a" / "comparison.png")
    # image | scribbles | clicks | four settings | truth, 64 px x 3 each, plus the label and legend lines
    assert fig.width >= 8 * 64 * 3 and fig.height > 6 * 64 * 3


def test_demo_settings_and_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unknown demo setting.*'pce\+tv'"):
        demo.check_settings(["pce", "pce+tv"])
    assert demo.check_settings(["pce", "pce", "full"]) == ["pce", "full"]
    assert cli.main(["demo", "--settings", "pce,crf", "--out-dir", str(tmp_path)]) == 2
    assert "unknown demo setting(s) 'crf'" in capsys.readouterr().err
    assert set(demo.DEFAULT_SETTINGS) == {"full", "pce", "pce+crf", "pce+entropy", "pce+crf+entropy"}
    res = {"full": 0.9, "pce": 0.5, "pce+crf": 0.8, "clicks:pce": 0.3, "clicks:pce+crf": 0.6}
    assert demo.gap_closed(res, "pce+crf") == pytest.approx(0.75)
    assert demo.gap_closed(res, "clicks:pce+crf") == pytest.approx(0.5)  # against the clicks' own pCE
    assert demo.gap_closed(res, "pce+entropy") is None


def test_tags_demo_end_to_end_tiny(tmp_path):
    from segops.weak.tags_demo import NO_EXPAND_KEYS, TAG_KEYS, run_tags_demo

    out = run_tags_demo(str(tmp_path / "tags"), jobs=1, cam_settings={"epochs": 1}, log=lambda s: None, **TINY)
    res = json.load(open(tmp_path / "tags" / "results.json"))
    for k in TAG_KEYS + NO_EXPAND_KEYS:
        assert 0.0 <= res[k] <= 1.0 and res[k] == out[k], k
    # the pairs differ by the expand term only: it is in the logs of the first pair, not of the second
    for k, with_expand in (("tags_pce", True), ("tags_pce_crf", True), ("tags_pce_noexpand", False),
                           ("tags_pce_crf_noexpand", False)):
        rows = list(csv.DictReader(open(tmp_path / "tags" / k / "log.csv")))
        row = rows[0]
        assert (row["expand"] != "") == with_expand, k
        assert (row["crf"] != "") == ("crf" in k), k
        # the seed-trained networks train 1.5 times the demo's epochs (rounded up): 2 for 1
        assert [int(r["epoch"]) for r in rows] == [1, 2], k
    assert len(list(csv.DictReader(open(tmp_path / "tags" / "full" / "log.csv")))) == 1
    assert res["epochs"] == 1 and res["seed_epochs"] == 2
    assert res["cam_stage"]["bg_level"] in [round(0.05 * i, 2) for i in range(1, 20)]
    assert (tmp_path / "tags" / "cam" / "seeds.pt").is_file()
    # image | 2 CAMs | CAM argmax | 4 seed-trained networks | full | truth
    assert Image.open(tmp_path / "tags" / "comparison.png").width >= 10 * 64 * 3
