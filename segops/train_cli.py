"""Argument parsing for ``segops train / eval / predict / demo`` (kept apart from :mod:`segops.train` so that
``segops --help`` does not import the training stack)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any, Dict, List, Optional

__all__ = ["add_subcommands", "config_from_args"]


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from segops.train import LOSSES, TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model,
                   help="segops.models name (unet, deeplabv2_largefov, fcn8s, segnet, deeplabv3plus_resnet50) or "
                        "package.module:factory (default %(default)s)")
    g.add_argument("--model-width", type=float, default=d.model_width, help="channel width multiplier (default %(default)s)")
    g.add_argument("--model-arg", dest="model_args", action="append", default=None, metavar="KEY=VALUE",
                   help="extra get_model option, repeatable; values are Python literals "
                        "(e.g. --model-arg batch_norm=True --model-arg dropout=0.0)")
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=("synthetic", "voc"), default=d.data, help="dataset (default %(default)s)")
    g.add_argument("--data-root", default=None, help="VOC2012 folder with JPEGImages/, SegmentationClass[Aug]/, ImageSets/")
    g.add_argument("--mask-dir", default=None, help="mask folder under the root (default: SegmentationClassAug if present)")
    g.add_argument("--scribble-dir", default=None,
                   help="ScribbleSup label PNG folder (255 = unlabelled); without it scribbles are synthesized from masks")
    g.add_argument("--train-split", default=d.train_split, help="split list name for training (default %(default)s)")
    g.add_argument("--val-split", default=d.val_split, help="split list name for evaluation (default %(default)s)")
    g.add_argument("--num-classes", type=int, default=None, help="number of classes (default: the dataset's)")
    g.add_argument("--synthetic-train", type=int, default=d.synthetic_train, help="synthetic training images (default %(default)s)")
    g.add_argument("--synthetic-val", type=int, default=d.synthetic_val, help="synthetic validation images (default %(default)s)")
    g.add_argument("--image-size", type=int, default=d.image_size, help="synthetic image size (default %(default)s)")
    g.add_argument("--synthetic-seed", type=int, default=d.synthetic_seed, help="synthetic dataset seed (val uses seed+1)")
    g.add_argument("--crop-size", type=int, default=None, help="training crop (default: none for synthetic, 321 for VOC)")
    g.add_argument("--scale-min", type=float, default=d.scale_min, help="random scale lower bound (default %(default)s)")
    g.add_argument("--scale-max", type=float, default=d.scale_max, help="random scale upper bound (default %(default)s)")
    g.add_argument("--no-flip", dest="flip", action="store_false", help="disable random horizontal flips")
    g = p.add_argument_group("supervision and loss")
    g.add_argument("--supervision", choices=("full", "scribble"), default=d.supervision,
                   help="train on full masks or on scribbles (default %(default)s)")
    g.add_argument("--loss", choices=LOSSES, default=d.loss, help="loss (default %(default)s)")
    g.add_argument("--crf-weight", type=float, default=d.crf_weight, help="dense CRF loss weight (ECCV'18: %(default)s)")
    g.add_argument("--crf-sigma-rgb", type=float, default=d.crf_sigma_rgb, help="colour bandwidth (ECCV'18: %(default)s)")
    g.add_argument("--crf-sigma-xy", type=float, default=d.crf_sigma_xy, help="spatial bandwidth in pixels (ECCV'18: %(default)s)")
    g.add_argument("--crf-scale", type=float, default=d.crf_scale,
                   help="resolution at which the CRF / ncut loss runs (ECCV'18: %(default)s)")
    g.add_argument("--ncut-weight", type=float, default=d.ncut_weight, help="normalized cut loss weight (default %(default)s)")
    g.add_argument("--entropy-weight", type=float, default=d.entropy_weight, help="entropy loss weight (default %(default)s)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default=d.optimizer, help="(default %(default)s)")
    g.add_argument("--lr", type=float, default=d.lr, help="base learning rate, poly-decayed per step (default %(default)s)")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum (default %(default)s)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="(default %(default)s)")
    g.add_argument("--poly-power", type=float, default=d.poly_power, help="lr = base * (1 - step/total)^power (default %(default)s)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="(default %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="per process (default %(default)s)")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total")
    g.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
    g.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N (default %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed, help="(default %(default)s)")
    g.add_argument("--workers", type=int, default=d.workers, help="data loader workers (default %(default)s)")
    g = p.add_argument_group("outputs")
    g.add_argument("--out-dir", "--output-dir", dest="out_dir", default=d.out_dir, help="(default %(default)s)")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="evaluate every N epochs (default %(default)s)")
    g.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N epochs (default %(default)s)")
    g.add_argument("--panels", type=int, default=d.panels, help="validation images in each PNG panel (default %(default)s)")
    g.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (if installed)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    g.add_argument("--resume", default=None, help="checkpoint (last.pt) to resume from")


def parse_model_args(items: Optional[List[str]]) -> Dict[str, Any]:
    """['batch_norm=True', 'dropout=0.0'] -> {'batch_norm': True, 'dropout': 0.0} (non-literals stay strings)."""
    import ast

    out: Dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit("--model-arg expects KEY=VALUE, got %r" % (item,))
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def config_from_args(args: argparse.Namespace) -> Any:
    from segops.train import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    if "model_args" in values:
        values["model_args"] = parse_model_args(values["model_args"])
    return TrainConfig(**values)


def _user_errors():
    from segops.data import DatasetError

    return (DatasetError, ValueError, FileNotFoundError)


def _cmd_train(args: argparse.Namespace) -> int:
    from segops.train import train

    try:
        cfg = config_from_args(args)
        cfg.validate()
        train(cfg)
    except _user_errors() as e:
        print("segops train: error: %s" % e, file=sys.stderr)
        return 2
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    try:
        return _eval(args)
    except _user_errors() as e:
        print("segops eval: error: %s" % e, file=sys.stderr)
        return 2


def _eval(args: argparse.Namespace) -> int:
    from segops.crf_postprocess import crf_from_args, crf_report
    from segops.metrics import format_iou_table
    from segops.train import evaluate_checkpoint

    crf = crf_from_args(args)
    res = evaluate_checkpoint(args.checkpoint, args.data, args.data_root, args.split, args.device, args.batch_size,
                              crf=crf)
    print(format_iou_table(res, res["class_names"]))  # type: ignore[arg-type]
    if crf is not None:
        print(crf_report(res, format_iou_table))
    if args.json:
        out = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in res.items()}
        if crf is not None:
            out["crf"] = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in res["crf"].items()}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from segops.crf_postprocess import crf_from_args
    from segops.train import predict_files

    try:
        outs = predict_files(args.checkpoint, args.images, args.out_dir, args.device, crf=crf_from_args(args))
    except _user_errors() as e:
        print("segops predict: error: %s" % e, file=sys.stderr)
        return 2
    for o in outs:
        print(o)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from segops import demo

    return demo.main(args)


def add_subcommands(sub: Any) -> None:
    from segops.crf_postprocess import add_crf_arguments

    p = sub.add_parser("train", help="train a segmentation model (full masks or scribbles; CE / pCE / CRF / ncut losses)")
    _add_train_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="mIoU table of a checkpoint on its (or another) validation set")
    p.add_argument("checkpoint", help="checkpoint file written by segops train (last.pt)")
    p.add_argument("--data", choices=("synthetic", "voc"), default=None, help="override the checkpoint's dataset")
    p.add_argument("--data-root", default=None, help="override the VOC folder")
    p.add_argument("--split", default=None, help="split list to evaluate (default: the checkpoint's val split)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    add_crf_arguments(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("predict", help="segment image files into colour (VOC palette) PNG masks")
    p.add_argument("checkpoint", help="checkpoint file written by segops train")
    p.add_argument("images", nargs="+", help="input image files")
    p.add_argument("--out-dir", "-o", default="predictions", help="output folder (default %(default)s)")
    p.add_argument("--device", default="auto")
    add_crf_arguments(p)
    p.set_defaults(func=_cmd_predict)

    from segops import demo

    p = sub.add_parser("demo", help="the ECCV'18 experiment in miniature: full+CE vs scribbles+pCE vs pCE+DenseCRF")
    demo.add_arguments(p)
    p.set_defaults(func=_cmd_demo)
