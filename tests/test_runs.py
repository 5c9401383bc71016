"""Training runs as users drive them, through `segops train / eval / bench` on the synthetic data: config files,
resuming a run folder, best.pt, the output-folder guard, panels and curves, progress bars, backbone weights, the
head learning-rate multiplier, data loader workers, VOC SegmentationAug lists and the synthesized-scribbles
warning. Every run is a few steps of a tiny model on 32 x 32 images."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from segops import cli, figures, train_cli
from segops.train import (
    RUN_CONTROL_KEYS,
    TrainConfig,
    default_workers,
    head_parameter_names,
    parameter_groups,
    register_model,
)

sys.path.insert(0, os.path.dirname(__file__))
from conftest import require_optional  # noqa: E402
from standins import tiny_fcn  # noqa: E402

register_model("tiny", tiny_fcn)

# a tiny synthetic run: 8 training images, batch 2 -> 4 steps per epoch
TINY = ["--model", "tiny", "--model-width", "0.5", "--synthetic-train", "8", "--synthetic-val", "4", "--image-size", "32",
        "--batch-size", "2", "--workers", "0", "--no-progress"]  # fmt: skip


def _train(*argv) -> int:
    return cli.main(["train", *argv])


def _config_json(run) -> dict:
    with open(os.path.join(run, "config.json")) as f:
        return json.load(f)


def _log_rows(run):
    with open(os.path.join(run, "log.csv")) as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------- config files


def test_config_file_keys_values_and_flag_override(tmp_path):
    require_optional("yaml")  # a dependency of segops; a venv installed with --no-deps may lack it
    config = tmp_path / "run.yaml"
    config.write_text(
        "model: tiny\n"
        "model-width: 0.5\n"
        "synthetic_train: 8\n"  # dashes and underscores alike
        "synthetic-val: 4\n"
        "image-size: 32\n"
        "batch-size: 2\n"
        "workers: 0\n"
        "lr: 1e-3\n"  # YAML reads this as text; the option's type makes it a float
        "momentum: 0.5\n"
        "no-flip: true\n"  # an inverting flag
        "model-arg: [stem_stride=2]\n"
        "progress: false\n"
        "max-steps: 1\n"
    )
    run = tmp_path / "run"
    assert _train("--config", str(config), "--momentum", "0.7", "--out-dir", str(run)) == 0
    saved = _config_json(run)
    assert saved["lr"] == 1e-3 and isinstance(saved["lr"], float)
    assert saved["momentum"] == 0.7  # the typed flag wins over the file
    assert saved["flip"] is False and saved["model_args"] == {"stem_stride": 2}
    assert saved["synthetic_train"] == 8 and saved["max_steps"] == 1
    assert not set(RUN_CONTROL_KEYS) & set(saved)  # resume / overwrite are not settings of the run


def test_saved_config_reproduces_the_run(tmp_path):
    torch.set_num_threads(1)
    first, second = tmp_path / "first", tmp_path / "second"
    assert _train(*TINY, "--lr", "0.05", "--scale-min", "0.75", "--scale-max", "1.25", "--crop-size", "24",
                  "--max-steps", "3", "--out-dir", str(first)) == 0  # fmt: skip
    assert _train("--config", str(first / "config.json"), "--out-dir", str(second)) == 0
    a, b = _config_json(first), _config_json(second)
    assert {k: v for k, v in a.items() if k != "out_dir"} == {k: v for k, v in b.items() if k != "out_dir"}
    weights_a = torch.load(first / "last.pt", weights_only=False)["model"]
    weights_b = torch.load(second / "last.pt", weights_only=False)["model"]
    for key in weights_a:
        torch.testing.assert_close(weights_a[key], weights_b[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize(
    "text, message",
    [
        ("batch-sise: 2\n", "unknown option 'batch-sise' (did you mean 'batch-size'?)"),
        ("epochs: ten\n", "'epochs' must be a int, got 'ten'"),
        ("epochs: 2.5\n", "'epochs' must be an integer"),
        ("amp: 1\n", "'amp' must be true or false"),
        ("loss: crf-only\n", "'loss': loss 'crf-only'"),  # the loss grammar's own message follows
        ("lr: null\n", "'lr' must be set"),
        ("config: other.yaml\n", "'config' cannot be set inside a config file"),
        ("- just\n- a list\n", "must hold a mapping"),
        ("lr: [1\n", "is not valid YAML"),
    ],
)
def test_config_file_errors_name_the_key(tmp_path, capsys, text, message):
    require_optional("yaml")
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    assert _train("--config", str(config), "--out-dir", str(tmp_path / "never")) == 2
    err = capsys.readouterr().err
    assert message in err and str(config) in err
    assert not (tmp_path / "never").exists()


def test_json_config_and_missing_file(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"epochs": 3, "data_root": None, "model_args": {"batch_norm": True}}))
    args = cli.build_parser().parse_args(["train", "--config", str(config), "--model-arg", "dropout=0.0"])
    cfg = train_cli.config_from_args(args)
    assert cfg.epochs == 3 and cfg.model_args == {"batch_norm": True, "dropout": 0.0}
    config.write_text(json.dumps({"data_root": "~/VOC2012", "train-split": "~not-a-path"}))
    cfg = train_cli.config_from_args(cli.build_parser().parse_args(["train", "--config", str(config)]))
    assert cfg.data_root == os.path.join(os.path.expanduser("~"), "VOC2012") and cfg.train_split == "~not-a-path"
    assert cfg.lr == TrainConfig().lr  # untouched settings keep their defaults
    assert _train("--config", str(tmp_path / "absent.yaml")) == 2
    assert "no such file" in capsys.readouterr().err


# ------------------------------------------------------------------------- resume, best.pt, output folder


def test_resume_run_folder_restores_its_config_and_best_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    # 2 epochs of 4 steps, stopped after 3; settings far from the defaults, so a resume that did not restore
    # them would not match the checkpoint's steps per epoch
    assert _train(*TINY, "--epochs", "2", "--max-steps", "3", "--lr", "0.05", "--out-dir", str(run)) == 0
    capsys.readouterr()
    assert _train("--resume", str(run), "--max-steps", "6", "--no-progress") == 0
    assert "resumed from %s at epoch 0, step 3" % os.path.join(str(run), "last.pt") in capsys.readouterr().out
    saved = _config_json(run)
    assert saved["max_steps"] == 6 and saved["lr"] == 0.05 and saved["synthetic_train"] == 8
    with open(run / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["steps"] == 6
    rows = _log_rows(run)
    assert [int(r["step"]) for r in rows] == [3, 4, 6]  # the first run, then the rest of epoch 1 and epoch 2
    # best.pt holds the best validation mIoU of the run, across the resume
    val = [float(r["val_miou"]) for r in rows]
    best = torch.load(run / "best.pt", weights_only=False)
    # best.pt stores the float64 mIoU it was chosen by: the same number, abs 1e-12 only for the JSON round trip
    assert best["val"]["miou"] == pytest.approx(max(val), abs=1e-12)
    assert best["best_epoch"] == [1, 1, 2][int(np.argmax(val))]
    assert metrics["best_miou"] == pytest.approx(max(val), abs=1e-12)
    # `segops eval RUN_DIR` evaluates best.pt and finds the mIoU it was saved with
    assert cli.main(["eval", str(run), "--json", str(tmp_path / "eval.json"), "--no-progress"]) == 0
    with open(tmp_path / "eval.json") as f:
        assert json.load(f)["miou"] == pytest.approx(best["val"]["miou"], abs=1e-6)  # float32 logits, same argmax
    # best.pt cannot be resumed from (no optimizer state); a folder without last.pt is refused
    assert _train("--resume", str(run / "best.pt")) == 2
    assert "resume from last.pt" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _train("--resume", str(tmp_path / "empty")) == 2
    assert "holds no last.pt" in capsys.readouterr().err


def test_non_empty_output_folder_needs_resume_or_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(*TINY, "--max-steps", "1", "--out-dir", str(run)) == 0
    first_config = (run / "config.json").read_text()
    assert _train(*TINY, "--max-steps", "1", "--lr", "0.5", "--out-dir", str(run)) == 2
    err = capsys.readouterr().err
    assert "output folder %s is not empty" % run in err and "--resume" in err and "--overwrite" in err
    assert (run / "config.json").read_text() == first_config  # nothing was touched
    # --overwrite removes what a run wrote and nothing else
    (run / "notes.txt").write_text("mine")
    (run / "panels_epoch009.png").write_bytes(b"stale")
    assert _train(*TINY, "--max-steps", "1", "--lr", "0.5", "--out-dir", str(run), "--overwrite") == 0
    assert (run / "notes.txt").read_text() == "mine"
    assert not (run / "panels_epoch009.png").exists()
    assert _config_json(run)["lr"] == 0.5
    # resuming writes into the run's own folder; into another non-empty one it is refused like a new run
    other = tmp_path / "other"
    other.mkdir()
    (other / "log.csv").write_text("someone else's")
    capsys.readouterr()
    assert _train("--resume", str(run), "--out-dir", str(other), "--max-steps", "2") == 2
    assert "output folder %s is not empty" % other in capsys.readouterr().err
    # an existing but empty folder is fine
    (tmp_path / "empty").mkdir()
    assert _train(*TINY, "--max-steps", "1", "--out-dir", str(tmp_path / "empty")) == 0


# ------------------------------------------------------------------------------------ panels and curves


def _colour_present(region: np.ndarray, colour) -> bool:
    return bool((region.reshape(-1, 3) == np.array(colour, np.uint8)).all(1).any())


def test_labelled_panels_have_titles_and_a_legend():
    rng = np.random.default_rng(0)
    cell = lambda: rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)  # noqa: E731
    rows = [[cell() for _ in range(3)] for _ in range(2)]
    picture = np.asarray(figures.labelled_panels(rows, ["image", "prediction", "truth"], ["background", "cat"], scale=2))
    grid_top = figures.MARGIN + 12  # the title band (text, then the cells)
    title_band, legend_band = picture[:grid_top], picture[-30:]
    assert (title_band.sum(-1) < 200).any()  # dark title text
    for cls, colour in enumerate(figures.colorize(np.array([0, 1, 255]))):
        assert _colour_present(legend_band, colour), "legend swatch of class %d missing" % cls
    with pytest.raises(ValueError, match="every row needs 3 cells"):
        figures.labelled_panels([[cell(), cell()]], ["a", "b", "c"])


def test_training_curves_follow_the_history():
    history = [
        {"step": 4, "loss": 3.0, "val_miou": 0.2},
        {"step": 8, "loss": 2.0},
        {"step": 12, "loss": 1.0, "val_miou": 0.8},
    ]
    picture = np.asarray(figures.training_curves(history))
    half = picture.shape[1] // 2

    def line_rows(panel: np.ndarray, colour):
        """Mean row of the curve's pixels in the left and right thirds of a panel."""
        ys, xs = np.nonzero((panel == np.array(colour, np.uint8)).all(-1))
        assert len(xs) > 0
        left, right = xs < xs.min() + (xs.max() - xs.min()) / 3, xs > xs.max() - (xs.max() - xs.min()) / 3
        return ys[left].mean(), ys[right].mean()

    loss_left, loss_right = line_rows(picture[:, :half], figures.LOSS_COLOUR)
    assert loss_left < loss_right  # a falling loss: image rows grow downwards
    miou_left, miou_right = line_rows(picture[:, half:], figures.MIOU_COLOUR)
    assert miou_left > miou_right  # a rising mIoU


def test_run_folder_has_labelled_panels_and_curves(tmp_path):
    run = tmp_path / "run"
    assert _train(*TINY, "--epochs", "2", "--panels", "2", "--out-dir", str(run)) == 0
    for name in ("panels_epoch001.png", "panels_epoch002.png", "curves.png", "best.pt", "last.pt"):
        assert (run / name).is_file(), name
    panel = np.asarray(Image.open(run / "panels_epoch002.png").convert("RGB"))
    for cls in range(3):  # the synthetic data's background, disk, bar
        assert _colour_present(panel[-40:], figures.colorize(np.array([cls]))[0])
    curves = np.asarray(Image.open(run / "curves.png").convert("RGB"))
    assert _colour_present(curves, figures.LOSS_COLOUR) and _colour_present(curves, figures.MIOU_COLOUR)


# ------------------------------------------------------------------------------------------- progress bars


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("progress") / "run"
    assert _train(*TINY, "--max-steps", "1", "--out-dir", str(run)) == 0
    return run


@pytest.mark.parametrize("stderr_cls, flags, shown", [(_Terminal, [], True), (_Terminal, ["--no-progress"], False), (_Pipe, [], False)])
def test_eval_progress_bar_only_on_a_terminal(tiny_run, monkeypatch, capsys, stderr_cls, flags, shown):
    stderr = stderr_cls()
    monkeypatch.setattr(sys, "stderr", stderr)
    assert cli.main(["eval", str(tiny_run / "last.pt"), *flags]) == 0
    assert ("evaluating" in stderr.getvalue()) == shown


def test_training_and_bench_progress_bars(tmp_path, monkeypatch):
    stderr = _Terminal()
    monkeypatch.setattr(sys, "stderr", stderr)
    argv = [a for a in TINY if a != "--no-progress"]
    assert _train(*argv, "--max-steps", "1", "--out-dir", str(tmp_path / "run")) == 0
    assert "epoch 1/1" in stderr.getvalue() and "evaluating" in stderr.getvalue()
    stderr.truncate(0)
    assert cli.main(["bench", "losses", "--quick", "--min-run-time", "0.001", "--out", str(tmp_path / "b")]) == 0
    assert "bench losses" in stderr.getvalue() and "timing" in stderr.getvalue()


def test_bench_writes_into_a_named_folder_of_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "losses", "--quick", "--min-run-time", "0.001", "--no-progress"]) == 0
    written = os.listdir(tmp_path / "segops-bench-results")
    assert len(written) == 1 and written[0].endswith("-quick.json")
    assert sorted(os.listdir(tmp_path)) == ["segops-bench-results"]  # no benchmarks/results tree
    with open(tmp_path / "segops-bench-results" / written[0]) as f:
        result = json.load(f)
    assert {row["op"] for row in result["rows"]} >= {"partial_cross_entropy", "entropy"}
    # the CPU is named, so that results from different machine classes are not compared as one
    env = result["environment"]
    assert "cpu_model" in env and "cpu_count" in env
    if sys.platform.startswith("linux"):
        assert env["cpu_model"] and env["cache_l2"]


# --------------------------------------------------------------------- backbone weights, head lr, workers


def test_backbone_weights_reach_the_model_factory(tmp_path, capsys):
    seen = []

    def factory(name, num_classes, in_channels=3, width=1.0, backbone_weights=None, **kw):
        seen.append(backbone_weights)
        model = tiny_fcn(name, num_classes, in_channels=in_channels, width=width, **kw)
        if backbone_weights is not None:
            model.load_state_dict(torch.load(backbone_weights, weights_only=True), strict=False)
        return model

    register_model("tiny_with_encoder", factory)
    reference = tiny_fcn("t", 3, width=0.5)
    with torch.no_grad():
        for p in reference.parameters():
            p.fill_(0.25)
    weights = tmp_path / "encoder.pt"
    torch.save(reference.state_dict(), weights)
    run = tmp_path / "run"
    tiny = [a if a != "tiny" else "tiny_with_encoder" for a in TINY]
    assert _train(*tiny, "--backbone-weights", str(weights), "--max-steps", "1", "--lr", "1e-9", "--out-dir", str(run)) == 0
    assert seen == [str(weights)]
    trained = torch.load(run / "last.pt", weights_only=False)["model"]
    first = next(iter(trained))
    # one step at lr 1e-9 moves a weight of 0.25 by far less than 1e-6
    torch.testing.assert_close(trained[first], torch.full_like(trained[first], 0.25), rtol=0, atol=1e-6)
    # a resumed run takes its weights from last.pt, not from the ImageNet file again
    assert _train("--resume", str(run), "--max-steps", "2") == 0
    assert seen == [str(weights), None]
    # the reference models: U-Net has no ImageNet encoder, and says so
    capsys.readouterr()
    args = ["--model", "unet", "--model-width", "0.125", "--synthetic-train", "4", "--synthetic-val", "2", "--image-size", "32",
            "--batch-size", "2", "--workers", "0", "--no-progress", "--max-steps", "1"]  # fmt: skip
    assert _train(*args, "--backbone-weights", str(weights), "--out-dir", str(tmp_path / "unet")) == 2
    assert "unet has no ImageNet encoder" in capsys.readouterr().err


def test_head_parameters_per_model():
    from segops.models import get_model

    largefov = get_model("deeplabv2_largefov", 5, width=0.125)
    assert sorted(head_parameter_names(largefov)) == ["fc8.bias", "fc8.weight"]  # DeepLab's 10x layer
    v3plus = get_model("deeplabv3plus_resnet50", 5, width=0.125)
    head = head_parameter_names(v3plus)
    assert head and not any(n.startswith("backbone.") for n in head)
    assert {n for n, _ in v3plus.named_parameters()} - set(head) == {n for n, _ in v3plus.named_parameters() if n.startswith("backbone.")}
    groups = parameter_groups(largefov, 0.01, 10.0)
    assert [g["lr"] for g in groups] == [0.01, pytest.approx(0.1)]  # 0.01 * 10 in float64: one rounding
    assert sum(len(g["params"]) for g in groups) == len(list(largefov.parameters()))
    assert len(parameter_groups(largefov, 0.01, 1.0)) == 1
    with pytest.raises(ValueError, match="UNet has neither"):
        parameter_groups(get_model("unet", 5, width=0.125), 0.01, 10.0)


def test_head_lr_multiplier_through_the_cli(tmp_path):
    run = tmp_path / "run"
    args = ["--model", "deeplabv2_largefov", "--model-width", "0.125", "--synthetic-train", "4", "--synthetic-val", "2",
            "--image-size", "32", "--batch-size", "2", "--workers", "0", "--no-progress", "--max-steps", "1"]  # fmt: skip
    assert _train(*args, "--lr", "0.01", "--head-lr-mult", "10", "--out-dir", str(run)) == 0
    groups = torch.load(run / "last.pt", weights_only=False)["optimizer"]["param_groups"]
    assert len(groups) == 2 and len(groups[1]["params"]) == 2  # fc8 weight and bias
    # both groups follow the same poly schedule: the ratio stays 10 after the step
    assert groups[1]["lr"] / groups[0]["lr"] == pytest.approx(10.0, rel=1e-12)
    assert groups[0]["initial_lr"] == 0.01


def test_workers_default_and_reach_the_loaders(tmp_path):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert default_workers() == min(4, cores) == TrainConfig().workers
    args = cli.build_parser().parse_args(["train"])
    assert train_cli.config_from_args(args).workers == min(4, cores)
    from segops.train import _build_data, _RunContext

    cfg = TrainConfig(model="tiny", synthetic_train=4, synthetic_val=2, image_size=32, batch_size=2, workers=1)
    data = _build_data(_RunContext(cfg, torch.device("cpu"), 0, 1, lambda s: None))
    assert data.train_loader.num_workers == 1 and data.val_loader.num_workers == 1


# ------------------------------------------------------------------------------------------------- VOC


def _fake_voc_aug(root):
    """A 4-image VOC tree whose training list exists only in ImageSets/SegmentationAug (SBD style)."""
    rng = np.random.default_rng(0)
    for folder in ("JPEGImages", "SegmentationClassAug", "ImageSets/SegmentationAug", "ImageSets/Segmentation"):
        os.makedirs(os.path.join(root, folder))
    names = ["img%d" % i for i in range(4)]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(os.path.join(root, "JPEGImages", name + ".jpg"))
        mask = np.zeros((24, 24), np.uint8)
        mask[4:16, 6:18] = 12
        Image.fromarray(mask, mode="L").save(os.path.join(root, "SegmentationClassAug", name + ".png"))
    with open(os.path.join(root, "ImageSets", "SegmentationAug", "train_aug.txt"), "w") as f:
        f.write("".join("/JPEGImages/%s.jpg /SegmentationClassAug/%s.png\n" % (n, n) for n in names))
    with open(os.path.join(root, "ImageSets", "Segmentation", "val.txt"), "w") as f:
        f.write("\n".join(names[:2]) + "\n")


def test_voc_segmentation_aug_split_and_the_synthesis_warning(tmp_path, capsys):
    root = str(tmp_path / "VOC")
    _fake_voc_aug(root)
    voc = ["--model", "tiny", "--model-width", "0.5", "--data", "voc", "--data-root", root, "--crop-size", "16",
           "--batch-size", "2", "--workers", "0", "--no-progress", "--max-steps", "1", "--val-split", "val"]  # fmt: skip
    with pytest.warns(UserWarning, match="scribbles are SYNTHESIZED from the full masks"):
        assert _train(*voc, "--train-split", "train_aug", "--out-dir", str(tmp_path / "a")) == 0
    assert (tmp_path / "a" / "metrics.json").is_file()
    # full masks: nothing is synthesized, so no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert _train(*voc, "--train-split", "train_aug", "--supervision", "full", "--loss", "ce",
                      "--out-dir", str(tmp_path / "b")) == 0  # fmt: skip
    # a missing list names every place looked at
    capsys.readouterr()
    assert _train(*voc, "--train-split", "nope", "--out-dir", str(tmp_path / "c")) == 2
    err = capsys.readouterr().err
    for folder in ("ImageSets/Segmentation/nope.txt", "ImageSets/SegmentationAug/nope.txt", "VOC/nope.txt"):
        assert folder in err, folder
