"""Argument parsing for ``segops train / eval / predict / demo`` (kept apart from :mod:`segops.train` so that
``segops --help`` does not import the training stack).

``segops train`` settings come from, in increasing priority: :class:`segops.train.TrainConfig`'s defaults, the
run being resumed (``--resume RUN_DIR`` restores its ``config.json``), a config file (``--config run.yaml``:
YAML or JSON, keys are the long option names with dashes or underscores alike), and the flags typed on the
command line. To tell typed flags from defaults the training options default to "absent" (argparse.SUPPRESS);
their help still states the TrainConfig default.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["add_subcommands", "config_from_args", "load_config_file", "config_file_values", "parse_model_args"]


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    from segops.train import LOSSES, TrainConfig
    from segops.weak.losses import LOSS_GRAMMAR, loss_choice

    defaults = TrainConfig()
    group = parser.add_argument_group("run")
    group.add_argument("--config", metavar="FILE", default=None,
                       help="YAML or JSON file of settings (keys: the long option names below, e.g. batch-size or "
                            "batch_size); flags typed here override it. A run folder's config.json reproduces the run")
    group.add_argument("--resume", metavar="RUN_DIR", default=None,
                       help="continue the run in RUN_DIR (its last.pt; a checkpoint file works too) with its saved "
                            "settings; flags typed here override them (e.g. --epochs to train longer)")
    group.add_argument("--overwrite", action="store_true",
                       help="replace a previous run in --out-dir (without it a non-empty --out-dir is refused)")
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=defaults.model,
                       help="segops.models name (unet, deeplabv2_largefov, fcn8s, segnet, deeplabv3plus_resnet50) or "
                            "package.module:factory (default %(default)s)")
    group.add_argument("--model-width", type=float, default=defaults.model_width, help="channel width multiplier (default %(default)s)")
    group.add_argument("--model-arg", dest="model_args", action="append", default=None, metavar="KEY=VALUE",
                       help="extra get_model option, repeatable; values are Python literals "
                            "(e.g. --model-arg batch_norm=True --model-arg dropout=0.0)")
    group.add_argument("--backbone-weights", metavar="PATH", default=None,
                       help="local torchvision-format ImageNet checkpoint for the encoder (vgg16 for FCN / DeepLab-VGG, "
                            "vgg16_bn for SegNet, resnet50/101 for the ResNet DeepLabs; needs --model-width 1); "
                            "nothing is downloaded")
    group = parser.add_argument_group("data")
    group.add_argument("--data", choices=("synthetic", "voc"), default=defaults.data, help="dataset (default %(default)s)")
    group.add_argument("--data-root", default=None, help="VOC2012 folder with JPEGImages/, SegmentationClass[Aug]/, ImageSets/")
    group.add_argument("--mask-dir", default=None, help="mask folder under the root (default: SegmentationClassAug if present)")
    group.add_argument("--scribble-dir", default=None,
                       help="ScribbleSup label PNG folder (255 = unlabelled); without it scribbles are synthesized from "
                            "the masks (with a warning)")
    group.add_argument("--train-split", default=defaults.train_split,
                       help="split list name for training, looked up in ImageSets/Segmentation/, then "
                            "ImageSets/SegmentationAug/ (e.g. train_aug), then the root (default %(default)s)")
    group.add_argument("--val-split", default=defaults.val_split, help="split list name for evaluation (default %(default)s)")
    group.add_argument("--num-classes", type=int, default=None, help="number of classes (default: the dataset's)")
    group.add_argument("--synthetic-train", type=int, default=defaults.synthetic_train, help="synthetic training images (default %(default)s)")
    group.add_argument("--synthetic-val", type=int, default=defaults.synthetic_val, help="synthetic validation images (default %(default)s)")
    group.add_argument("--image-size", type=int, default=defaults.image_size, help="synthetic image size (default %(default)s)")
    group.add_argument("--synthetic-seed", type=int, default=defaults.synthetic_seed, help="synthetic dataset seed (val uses seed+1)")
    group.add_argument("--crop-size", type=int, default=None, help="training crop (default: none for synthetic, 321 for VOC)")
    group.add_argument("--scale-min", type=float, default=defaults.scale_min, help="random scale lower bound (default %(default)s)")
    group.add_argument("--scale-max", type=float, default=defaults.scale_max, help="random scale upper bound (default %(default)s)")
    group.add_argument("--no-flip", dest="flip", action="store_false", help="disable random horizontal flips")
    group = parser.add_argument_group("supervision and loss")
    group.add_argument("--supervision", choices=("full", "scribble", "scribbles", "clicks", "tags"), default=defaults.supervision,
                       help="full masks; scribbles; clicks (one per object region, synthesized from the masks); tags "
                            "(image-level tags: a CAM classifier's seeds) (default %(default)s)")
    group.add_argument("--cam-epochs", type=int, default=defaults.cam_epochs,
                       help="--supervision tags: classifier epochs (default %(default)s)")
    group.add_argument("--cam-bg-level", type=float, default=defaults.cam_bg_level,
                       help="--supervision tags: background score against the normalised CAMs (default %(default)s)")
    group.add_argument("--cam-confidence", type=float, default=defaults.cam_confidence,
                       help="--supervision tags: refined class probability of a seed, at least (default %(default)s)")
    group.add_argument("--cam-seeds", default=None, metavar="SEEDS.pt",
                       help="--supervision tags: reuse the seeds an earlier run wrote (<out-dir>/cam/seeds.pt)")
    group.add_argument("--expand-weight", type=float, default=defaults.expand_weight,
                       help="--supervision tags: weight of SEC's expand loss on the image tags, added to --loss "
                            "(0: off; default %(default)s)")
    group.add_argument("--expand-fg-decay", type=float, default=None, metavar="D",
                       help="--supervision tags: the expand loss's rank-pooling decay per pixel for the tagged classes "
                            "(default: SEC's 0.996 on 41x41 maps carried over to the label size)")
    group.add_argument("--expand-bg-decay", type=float, default=None, metavar="D",
                       help="the same for the background (default: SEC's 0.999 on 41x41 maps, carried over)")
    group.add_argument("--loss", type=loss_choice, default=defaults.loss, metavar="LOSS",
                       help="%s: data term plus any regularizers, e.g. %s (default %%(default)s)" % (LOSS_GRAMMAR, ", ".join(LOSSES)))
    group.add_argument("--crf-weight", type=float, default=defaults.crf_weight, help="dense CRF loss weight (ECCV'18: %(default)s)")
    group.add_argument("--crf-sigma-rgb", type=float, default=defaults.crf_sigma_rgb, help="colour bandwidth (ECCV'18: %(default)s)")
    group.add_argument("--crf-sigma-xy", type=float, default=defaults.crf_sigma_xy, help="spatial bandwidth in pixels (ECCV'18: %(default)s)")
    group.add_argument("--crf-scale", type=float, default=defaults.crf_scale,
                       help="resolution at which the CRF / ncut loss runs (ECCV'18: %(default)s)")
    group.add_argument("--crf-start-epoch", type=float, default=defaults.crf_start_epoch, metavar="E",
                       help="train the first E epochs without the CRF loss, then add it (default %(default)s)")
    group.add_argument("--crf-ramp-epochs", type=float, default=defaults.crf_ramp_epochs, metavar="E",
                       help="from --crf-start-epoch on, raise the CRF loss's weight linearly from 0 to --crf-weight "
                            "over E epochs (0: at once; default %(default)s)")
    group.add_argument("--ncut-weight", type=float, default=defaults.ncut_weight, help="normalized cut loss weight (default %(default)s)")
    group.add_argument("--entropy-weight", type=float, default=defaults.entropy_weight, help="entropy loss weight (default %(default)s)")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default=defaults.optimizer, help="(default %(default)s)")
    group.add_argument("--lr", type=float, default=defaults.lr, help="base learning rate, poly-decayed per step (default %(default)s)")
    group.add_argument("--head-lr-mult", type=float, default=defaults.head_lr_mult,
                       help="learning-rate multiplier of the head, the layers not taken from ImageNet weights "
                            "(DeepLab: 10; default %(default)s)")
    group.add_argument("--momentum", type=float, default=defaults.momentum, help="SGD momentum (default %(default)s)")
    group.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="(default %(default)s)")
    group.add_argument("--poly-power", type=float, default=defaults.poly_power, help="lr = base * (1 - step/total)^power (default %(default)s)")
    group.add_argument("--epochs", type=int, default=defaults.epochs, help="(default %(default)s)")
    group.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per process (default %(default)s)")
    group.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total")
    group.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
    group.add_argument("--device", default=defaults.device, help="auto | cpu | cuda | cuda:N (default %(default)s)")
    group.add_argument("--seed", type=int, default=defaults.seed, help="(default %(default)s)")
    group.add_argument("--workers", type=int, default=defaults.workers,
                       help="data loader worker processes (default min(4, CPU cores) = %(default)s)")
    group = parser.add_argument_group("outputs")
    group.add_argument("--out-dir", "--output-dir", dest="out_dir", default=defaults.out_dir, help="(default %(default)s)")
    group.add_argument("--eval-every", type=int, default=defaults.eval_every, help="evaluate every N epochs (default %(default)s)")
    group.add_argument("--save-every", type=int, default=defaults.save_every, help="checkpoint every N epochs (default %(default)s)")
    group.add_argument("--panels", type=int, default=defaults.panels, help="validation images in each PNG panel (default %(default)s)")
    group.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (if installed)")
    group.add_argument("--no-progress", dest="progress", action="store_false",
                       help="no progress bars (they are shown only on a terminal anyway)")
    _absent_unless_given(parser, {f.name for f in dataclasses.fields(TrainConfig)})


def _absent_unless_given(parser: argparse.ArgumentParser, dests: set) -> None:
    """Options for ``dests`` stay out of the parsed namespace unless typed, so that a config file or a resumed
    run fills them and only typed flags override; their help keeps the default it showed."""
    for action in parser._actions:
        if action.dest in dests:
            if action.help and "%(default)s" in action.help:
                action.help = action.help.replace("%(default)s", str(action.default).replace("%", "%%"))
            action.default = argparse.SUPPRESS


def _training_options() -> List[argparse.Action]:
    parser = argparse.ArgumentParser(add_help=False)
    _add_train_args(parser)
    return [action for action in parser._actions if action.option_strings]


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


# Settings holding paths: a leading ~ in a config file is expanded, as the shell expands it on the command line.
PATH_SETTINGS = ("data_root", "mask_dir", "scribble_dir", "backbone_weights", "out_dir", "resume", "cam_seeds")


class ConfigFileError(ValueError):
    """A config file that cannot be read, or a key / value in it that is not a valid setting."""


def load_config_file(path: str) -> Dict[str, Any]:
    """The mapping in a YAML (``.yaml`` / ``.yml``, or any other name) or JSON (``.json``) file, as written."""
    if not os.path.isfile(path):
        raise FileNotFoundError("--config %s: no such file" % path)
    with open(path) as f:
        text = f.read()
    if path.lower().endswith(".json"):
        try:
            data = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as e:
            raise ConfigFileError("--config %s is not valid JSON: %s" % (path, e)) from e
    else:
        try:
            import yaml
        except ImportError as e:  # a declared dependency; a stripped-down environment may still lack it
            raise ConfigFileError("--config %s: reading YAML needs PyYAML (pip install pyyaml); JSON works without" % path) from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigFileError("--config %s is not valid YAML: %s" % (path, e)) from e
        data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigFileError("--config %s must hold a mapping of option names to values, not a %s" % (path, type(data).__name__))
    return data


def _option_table() -> Dict[str, Tuple[argparse.Action, bool]]:
    """Config key (underscores) -> (the training option's action, whether the value is inverted): each option's
    long names (``batch_size``; ``no_flip``, which inverts) and its TrainConfig field (``flip``, ``model_args``)."""
    table: Dict[str, Tuple[argparse.Action, bool]] = {}
    for action in _training_options():
        if action.dest == "config":
            continue
        table[action.dest] = (action, False)
        for option in action.option_strings:
            if option.startswith("--"):
                key = option[2:].replace("-", "_")
                table.setdefault(key, (action, isinstance(action, argparse._StoreFalseAction)))
    return table


def _config_value(source: str, key: str, value: Any, action: argparse.Action, inverted: bool, nullable: bool) -> Any:
    """One config-file value, checked and converted as the command line would (``1e-3``, which YAML reads as
    text, becomes a float)."""

    def bad(expected: str) -> ConfigFileError:
        return ConfigFileError("%s: %r must be %s, got %r" % (source, key, expected, value))

    if action.dest == "model_args":
        if isinstance(value, dict):
            return dict(value)
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return parse_model_args(value)
        raise bad("a mapping (batch_norm: true) or a list of KEY=VALUE strings")
    if action.nargs == 0:  # a flag: --amp, --no-flip
        if not isinstance(value, bool):
            raise bad("true or false")
        return not value if inverted else value
    if value is None:
        if nullable:
            return None
        raise bad("set (it has no 'none' value)")
    if action.type is not None:
        if isinstance(value, bool) or isinstance(value, (list, dict)):
            raise bad("a %s" % action.type.__name__)
        if action.type is int and isinstance(value, float) and not value.is_integer():
            raise bad("an integer")
        try:
            value = action.type(value)
        except argparse.ArgumentTypeError as e:  # a type with its own message (--loss shows the grammar)
            raise ConfigFileError("%s: %r: %s" % (source, key, e)) from None
        except (TypeError, ValueError):
            raise bad("a %s" % action.type.__name__) from None
    elif not isinstance(value, str):
        raise bad("text")
    if action.choices is not None and value not in action.choices:
        raise bad("one of %s" % ", ".join(map(str, action.choices)))
    return value


def config_file_values(path: str) -> Dict[str, Any]:
    """A config file's settings as TrainConfig field values; ``ConfigFileError`` names an unknown key (with the
    closest option) or a bad value."""
    from segops.train import TrainConfig

    nullable = {f.name for f in dataclasses.fields(TrainConfig) if f.default is None}
    table = _option_table()
    values: Dict[str, Any] = {}
    for raw_key, value in load_config_file(path).items():
        key = str(raw_key).replace("-", "_")
        if key == "config":
            raise ConfigFileError("%s: 'config' cannot be set inside a config file" % path)
        if key not in table:
            close = difflib.get_close_matches(key, list(table), n=1)
            hint = " (did you mean %r?)" % close[0].replace("_", "-") if close else ""
            raise ConfigFileError("%s: unknown option %r%s; keys are the long option names of segops train" % (path, raw_key, hint))
        action, inverted = table[key]
        values[action.dest] = _config_value(path, str(raw_key), value, action, inverted, action.dest in nullable)
        if action.dest in PATH_SETTINGS and isinstance(values[action.dest], str):
            values[action.dest] = os.path.expanduser(values[action.dest])  # the shell does this for typed flags
    return values


def restored_run_config(resume: str) -> Dict[str, Any]:
    """The settings of the run ``--resume`` points at (its folder's config.json, else the checkpoint's copy), with
    ``out_dir`` set to the folder holding the checkpoint."""
    from segops.train import RUN_CONTROL_KEYS, TrainConfig, load_checkpoint, resolve_resume_checkpoint

    checkpoint_path = resolve_resume_checkpoint(resume)
    run_dir = os.path.dirname(os.path.abspath(checkpoint_path))
    saved_path = os.path.join(run_dir, "config.json")
    if os.path.isfile(saved_path):
        saved = load_config_file(saved_path)
    else:
        saved = dict(load_checkpoint(checkpoint_path)["config"])  # type: ignore[arg-type]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in saved.items() if k in fields and k not in RUN_CONTROL_KEYS}
    values["out_dir"] = os.path.dirname(checkpoint_path) or "."
    return values


def config_from_args(args: argparse.Namespace) -> Any:
    """The TrainConfig of a ``segops train`` command line: defaults < resumed run < --config file < typed flags
    (``--model-arg`` entries are merged into the model_args of the file / resumed run)."""
    from segops.train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    typed = {k: v for k, v in vars(args).items() if k in fields}
    if "model_args" in typed:
        typed["model_args"] = parse_model_args(typed["model_args"])
    from_file = config_file_values(args.config) if getattr(args, "config", None) else {}
    resume = typed.get("resume", from_file.get("resume"))
    values: Dict[str, Any] = restored_run_config(resume) if resume else {}
    model_args = dict(values.get("model_args", {}))
    for layer in (from_file, typed):
        model_args.update(layer.get("model_args", {}))
        values.update(layer)
    values["model_args"] = model_args
    return TrainConfig(**values)


def _user_errors():
    from segops.data import DatasetError

    return (DatasetError, ValueError, FileNotFoundError, FileExistsError)


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


def _checkpoint_file(path: str) -> str:
    """A checkpoint argument: a file as is; a run folder means its best.pt (its last.pt before any evaluation)."""
    if os.path.isdir(path):
        for name in ("best.pt", "last.pt"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise FileNotFoundError("%s holds neither best.pt nor last.pt (not a segops train run folder?)" % path)
    return path


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
    metrics = evaluate_checkpoint(
        _checkpoint_file(args.checkpoint), args.data, args.data_root, args.split, args.device, args.batch_size,
        progress=args.progress, crf=crf,
    )  # fmt: skip
    print(format_iou_table(metrics, metrics["class_names"]))  # type: ignore[arg-type]
    if crf is not None:
        print(crf_report(metrics, format_iou_table))
    if args.json:
        as_json = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in metrics.items()}
        if crf is not None:
            as_json["crf"] = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in metrics["crf"].items()}
        with open(args.json, "w") as f:
            json.dump(as_json, f, indent=2)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from segops.crf_postprocess import crf_from_args
    from segops.train import predict_files

    try:
        written = predict_files(_checkpoint_file(args.checkpoint), args.images, args.out_dir, args.device,
                                crf=crf_from_args(args))
    except _user_errors() as e:
        print("segops predict: error: %s" % e, file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from segops import demo

    return demo.main(args)


def add_subcommands(subcommands: Any) -> None:
    from segops.crf_postprocess import add_crf_arguments

    command = subcommands.add_parser("train", help="train a segmentation model (full masks or scribbles; CE / pCE / CRF / ncut losses)")
    _add_train_args(command)
    command.set_defaults(func=_cmd_train)

    command = subcommands.add_parser("eval", help="mIoU table of a checkpoint on its (or another) validation set")
    command.add_argument("checkpoint", help="run folder of segops train (its best.pt) or a checkpoint file (last.pt, best.pt)")
    command.add_argument("--data", choices=("synthetic", "voc"), default=None, help="override the checkpoint's dataset")
    command.add_argument("--data-root", default=None, help="override the VOC folder")
    command.add_argument("--split", default=None, help="split list to evaluate (default: the checkpoint's val split)")
    command.add_argument("--device", default="auto")
    command.add_argument("--batch-size", type=int, default=8)
    command.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    command.add_argument("--no-progress", dest="progress", action="store_false",
                         help="no progress bar (shown only on a terminal anyway)")
    add_crf_arguments(command)
    command.set_defaults(func=_cmd_eval)

    command = subcommands.add_parser("predict", help="segment image files into colour (VOC palette) PNG masks")
    command.add_argument("checkpoint", help="run folder of segops train (its best.pt) or a checkpoint file")
    command.add_argument("images", nargs="+", help="input image files")
    command.add_argument("--out-dir", "-o", default="predictions", help="output folder (default %(default)s)")
    command.add_argument("--device", default="auto")
    add_crf_arguments(command)
    command.set_defaults(func=_cmd_predict)

    from segops import demo

    command = subcommands.add_parser("demo", help="the lecture's weak-supervision table in miniature: full, pCE, pCE+CRF, "
                                                  "pCE+entropy, pCE+CRF+entropy (and clicks, image-level tags)")
    demo.add_arguments(command)
    command.set_defaults(func=_cmd_demo)

    from segops.weak import segment

    command = subcommands.add_parser("segment", help="segment one photo from a few strokes (pCE + dense CRF loss, no dataset)")
    segment.add_arguments(command)
    command.set_defaults(func=segment.main)
