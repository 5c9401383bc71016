"""segops.train and the train / eval / predict / demo CLI: smoke tests per loss, resume, DDP, errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import segops.nn
from segops import cli
from segops.train import LOSSES, TrainConfig, evaluate_checkpoint, predict_files, register_model, train

sys.path.insert(0, os.path.dirname(__file__))
from standins import tiny_fcn  # noqa: E402

register_model("tiny", tiny_fcn)
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(
        model="tiny", model_width=0.5, data="synthetic", synthetic_train=8, synthetic_val=4, image_size=32,
        batch_size=2, epochs=1, max_steps=2, lr=0.01, out_dir=str(tmp_path / "run"), progress=False, panels=2,
        crf_weight=1e-6, crf_sigma_xy=20.0, ncut_weight=0.1, workers=0,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _needs(loss: str):
    need = []
    if "crf" in loss:
        need.append("DenseCRFLoss")
    if "ncut" in loss:
        need.append("NormalizedCutLoss")
    missing = [n for n in need if not hasattr(segops.nn, n)]
    return missing


@pytest.mark.parametrize("loss", LOSSES)
def test_two_step_smoke_per_loss(tmp_path, loss):
    missing = _needs(loss)
    if missing:
        pytest.skip("segops.nn lacks %s on this branch (lands with the lattice loss work; rerun after merging)" % missing)
    sup = "full" if loss == "ce" else "scribble"
    torch.set_num_threads(1)
    out = train(_cfg(tmp_path, loss=loss, supervision=sup), log=lambda s: None)
    assert out["steps"] == 2
    hist = out["history"]
    assert len(hist) == 1 and np.isfinite(hist[0]["loss"])
    for term in loss.split("+"):
        assert term in hist[0], term  # every term is logged
    run = tmp_path / "run"
    assert (run / "last.pt").is_file() and (run / "metrics.json").is_file() and (run / "config.json").is_file()
    with open(run / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["val_miou"] != ""
    panel = Image.open(run / "panels_epoch001.png")
    assert panel.width > 4 * 32  # image | scribbles | prediction | ground truth
    m = json.load(open(run / "metrics.json"))
    assert 0.0 <= m["miou"] <= 1.0 and sum(map(sum, m["matrix"])) == 4 * 32 * 32


def test_amp_bfloat16_on_cpu(tmp_path):
    out = train(_cfg(tmp_path, loss="pce", amp=True, max_steps=1), log=lambda s: None)
    assert np.isfinite(out["history"][0]["loss"])


def test_resume_reproduces_the_next_steps(tmp_path):
    torch.set_num_threads(1)
    # 8 images, batch 2: 4 steps per epoch; 2 epochs
    kw = dict(loss="pce", epochs=2, max_steps=None, scale_min=0.75, scale_max=1.25, crop_size=32)
    full = train(_cfg(tmp_path / "a", **kw), log=lambda s: None)
    # stop mid-epoch after 3 steps, then resume: steps 4..8 must be the ones the uninterrupted run took
    train(_cfg(tmp_path / "b", **dict(kw, max_steps=3)), log=lambda s: None)
    ck = torch.load(tmp_path / "b" / "run" / "last.pt", weights_only=False)
    assert ck["step"] == 3 and ck["epoch"] == 0
    resumed = train(_cfg(tmp_path / "b", **dict(kw, resume=str(tmp_path / "b" / "run" / "last.pt"))), log=lambda s: None)
    assert resumed["steps"] == full["steps"] == 8
    sa, sb = full["model"].state_dict(), resumed["model"].state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg="parameter %s differs after resume" % k)
    # identical weights (checked bitwise above) give the same float32 loss; 1e-6 only absorbs the float64
    # averaging of the logged per-step values, which may group the steps differently after a resume
    assert resumed["history"][-1]["loss"] == pytest.approx(full["history"][-1]["loss"], rel=1e-6)
    # a checkpoint from another configuration is refused
    with pytest.raises(ValueError, match="steps per epoch"):
        train(_cfg(tmp_path / "c", **dict(kw, batch_size=4, resume=str(tmp_path / "b" / "run" / "last.pt"))), log=lambda s: None)


def test_ddp_two_gloo_processes(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "segops", "train", "--model", "standins:tiny_fcn", "--model-width", "0.5", "--synthetic-train", "8",
        "--synthetic-val", "5", "--image-size", "32", "--batch-size", "2", "--epochs", "2", "--loss", "pce",
        "--device", "cpu", "--out-dir", str(out), "--no-progress", "--workers", "0",
    ]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = json.load(open(out / "metrics.json"))
    # 2 ranks x batch 2 over 8 images = 2 steps per epoch; validation of all 5 images all-reduced (3 + 2)
    assert m["steps"] == 4
    assert sum(map(sum, m["matrix"])) == 5 * 32 * 32
    assert r.stdout.count("epoch 2/2") == 1  # only rank 0 logs


def test_eval_and_predict_from_checkpoint(tmp_path):
    train(_cfg(tmp_path, loss="ce", supervision="full"), log=lambda s: None)
    ck = str(tmp_path / "run" / "last.pt")
    res = evaluate_checkpoint(ck)
    m = json.load(open(tmp_path / "run" / "metrics.json"))
    # the same checkpoint on the same images: equal confusion counts, so equal float64 ratios (approx's 1e-6 default
    # only absorbs a JSON round trip)
    assert res["miou"] == pytest.approx(m["miou"])
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(img)
    outs = predict_files(ck, [str(img)], str(tmp_path / "pred"))
    p = Image.open(outs[0])
    assert p.mode == "P" and p.size == (48, 40)
    assert int(np.asarray(p).max()) < 3
    assert cli.main(["eval", ck, "--json", str(tmp_path / "e.json")]) == 0
    assert json.load(open(tmp_path / "e.json"))["miou"] == pytest.approx(m["miou"])
    assert cli.main(["predict", ck, str(img), "-o", str(tmp_path / "pred2")]) == 0
    assert (tmp_path / "pred2" / "x.png").is_file()


@pytest.mark.parametrize("command", ["train", "eval", "predict", "demo", None])
def test_cli_help(command, capsys):
    argv = ([command] if command else []) + ["--help"]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "usage: segops" in text
    if command == "train":
        for opt in ("--model", "--data", "--data-root", "--supervision", "--loss", "--crf-weight", "--crf-sigma-rgb",
                    "--crf-sigma-xy", "--crf-scale", "--optimizer", "--epochs", "--batch-size", "--amp", "--device",
                    "--seed", "--out-dir", "--resume", "--eval-every"):  # fmt: skip
            assert opt in text, opt


def _fake_voc(root, corrupt=False, bad_label=False):
    os.makedirs(os.path.join(root, "JPEGImages"))
    os.makedirs(os.path.join(root, "SegmentationClass"))
    os.makedirs(os.path.join(root, "ImageSets", "Segmentation"))
    rng = np.random.default_rng(0)
    names = ["img%d" % i for i in range(4)]
    for i, n in enumerate(names):
        path = os.path.join(root, "JPEGImages", n + ".jpg")
        if corrupt and i == 0:
            open(path, "wb").write(b"\x00garbage")
        else:
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
        m = np.zeros((24, 24), np.uint8)
        m[5:15, 5:15] = 40 if (bad_label and i == 0) else 3
        Image.fromarray(m, mode="L").save(os.path.join(root, "SegmentationClass", n + ".png"))
    for split in ("train", "val"):
        open(os.path.join(root, "ImageSets", "Segmentation", split + ".txt"), "w").write("\n".join(names) + "\n")


def _cli_train(tmp_path, *extra):
    return cli.main(["train", "--model", "tiny", "--out-dir", str(tmp_path / "o"), "--no-progress", "--max-steps", "1",
                     "--batch-size", "2", "--crop-size", "16", "--model-width", "0.5", "--workers", "0",
                     "--overwrite"] + list(extra))  # fmt: skip


def test_voc_training_smoke(tmp_path):
    root = str(tmp_path / "VOC")
    _fake_voc(root)
    assert _cli_train(tmp_path, "--data", "voc", "--data-root", root, "--loss", "pce") == 0
    m = json.load(open(tmp_path / "o" / "metrics.json"))
    assert len(m["iou"]) == 21


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    assert _cli_train(tmp_path, "--data", "voc") == 2
    assert "--data voc needs --data-root" in capsys.readouterr().err
    assert _cli_train(tmp_path, "--data", "voc", "--data-root", str(tmp_path / "missing")) == 2
    assert "VOC data root not found" in capsys.readouterr().err
    (tmp_path / "flat").mkdir()
    assert _cli_train(tmp_path, "--data", "voc", "--data-root", str(tmp_path / "flat")) == 2
    assert "wrong VOC folder layout" in capsys.readouterr().err
    _fake_voc(str(tmp_path / "corrupt"), corrupt=True)
    assert _cli_train(tmp_path, "--data", "voc", "--data-root", str(tmp_path / "corrupt"), "--seed", "1") == 2
    assert "cannot decode image" in capsys.readouterr().err
    _fake_voc(str(tmp_path / "badlab"), bad_label=True)
    assert _cli_train(tmp_path, "--data", "voc", "--data-root", str(tmp_path / "badlab")) == 2
    assert "values [40] outside [0, 21)" in capsys.readouterr().err
    assert cli.main(["eval", str(tmp_path / "nope.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert cli.main(["predict", str(junk), str(junk)]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--loss", "crf-only"])  # argparse refuses unknown choices
    with pytest.raises(ValueError, match="--epochs must be >= 1"):
        _cfg(tmp_path, epochs=0).validate()


@pytest.mark.parametrize("loss", ["pce+crf", "pce+crf+entropy", "pce+ncut"])
def test_regularizer_plumbing_with_exact_standins(tmp_path, loss):
    """The trainer's CRF / ncut wiring, with the exact dense-Gaussian stand-ins behind the segops.nn
    interfaces (the real lattice losses are exercised by test_two_step_smoke_per_loss once merged)."""
    from standins import ExactDenseCRFLoss, ExactNormalizedCutLoss

    cfg = _cfg(tmp_path, loss=loss, crf_scale=0.5)
    out = train(cfg, crf_cls=ExactDenseCRFLoss, ncut_cls=ExactNormalizedCutLoss, log=lambda s: None)
    h = out["history"][0]
    reg = "ncut" if "ncut" in loss else "crf"
    assert np.isfinite(h[reg]) and h[reg] != 0.0
    if "entropy" in loss:
        assert h["entropy"] > 0
    # the logged total is the sum of the terms
    # the total is a float32 sum of <= 4 float32 terms, logged per term: rounding ~4 * eps32 = 5e-7 relative per
    # step, averaged over the epoch's steps in float64; 1e-5 leaves 20x margin
    assert h["loss"] == pytest.approx(sum(h[t] for t in ("pce", "crf", "ncut", "entropy") if t in h), rel=1e-5)


def test_demo_end_to_end_tiny(tmp_path):
    """`segops demo`'s pipeline on a tiny budget (stand-ins for the model and the CRF loss): writes the table,
    results.json with the three keys, and the comparison PNG."""
    from standins import ExactDenseCRFLoss

    from segops import demo

    lines = []
    out = demo.run_demo(str(tmp_path / "demo"), seed=0, epochs=1, train_images=16, val_images=4, threads=None,
                        model_fn=lambda K: tiny_fcn("t", K, width=0.5, stem_stride=2), crf_cls=ExactDenseCRFLoss,
                        log=lines.append)  # fmt: skip
    res = json.load(open(tmp_path / "demo" / "results.json"))
    for k in ("full", "pce", "pce+crf"):
        # results.json holds the returned float64 value through a JSON round trip (repr: exact)
        assert 0.0 <= res[k] <= 1.0 and res[k] == pytest.approx(out[k])
    assert any("gap closed" in ln for ln in lines)
    im = Image.open(tmp_path / "demo" / "comparison.png")
    assert im.width > 6 * 64  # image | scribbles | full | pCE | pCE+CRF | ground truth


def test_exact_crf_standin_matches_the_formula():
    """The stand-in used to tune the demo equals -(w/B) sum_k sum_ij W_ij X_ik X_jk, brute force."""
    import math

    from standins import ExactDenseCRFLoss

    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 3, 4, generator=g, dtype=torch.float64) * 255
    seg = torch.rand(2, 2, 3, 4, generator=g, dtype=torch.float64).softmax(1)
    roi = (torch.rand(2, 3, 4, generator=g) > 0.2).double()
    w, srgb, sxy = 0.7, 40.0, 2.0
    got = ExactDenseCRFLoss(w, srgb, sxy, 1.0)(img, seg, roi)
    ref = 0.0
    for b in range(2):
        pix = [(r, c) for r in range(3) for c in range(4)]
        for (r1, c1) in pix:
            for (r2, c2) in pix:
                d2 = ((c1 - c2) / sxy) ** 2 + ((r1 - r2) / sxy) ** 2 + float(((img[b, :, r1, c1] - img[b, :, r2, c2]) / srgb).pow(2).sum())
                wij = math.exp(-0.5 * d2)
                for k in range(2):
                    ref -= wij * float(seg[b, k, r1, c1] * roi[b, r1, c1] * seg[b, k, r2, c2] * roi[b, r2, c2])
    # float64 on both sides, 2 images x 12^2 pixel pairs x 2 classes = 576 terms: reordering error
    # ~576 * eps64 ~ 1e-13 relative, so 1e-10 (a wrong pair, factor or sigma moves it by >= 1e-3)
    assert float(got) == pytest.approx(w * ref / 2, rel=1e-10)


def test_model_args_reach_get_model():
    from segops.train import TrainConfig, build_model
    from segops.train_cli import parse_model_args

    args = parse_model_args(["batch_norm=True", "dropout=0.0", "name=abc"])
    assert args == {"batch_norm": True, "dropout": 0.0, "name": "abc"}
    cfg = TrainConfig(model="unet", model_width=0.125, model_args={"batch_norm": True, "dropout": 0.0})
    model = build_model(cfg.model, 3, cfg.model_width, **cfg.model_args)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        parse_model_args(["batch_norm"])
