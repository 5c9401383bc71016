"""Training, evaluation and prediction for (weakly-supervised) semantic segmentation.

``train(cfg)`` runs the whole loop: data (synthetic or PASCAL VOC / ScribbleSup folders), the model, the loss
(any ``{ce|pce}[+crf][+ncut][+entropy]``, see :mod:`segops.weak.losses`), SGD/Adam with DeepLab's poly learning
rate, optional AMP, tqdm progress bars with the loss terms and throughput, a CSV log (and TensorBoard when
installed), checkpoints with exact resume (``last.pt``) and the best validation mIoU (``best.pt``), evaluation
every N epochs, labelled PNG panels (image | scribbles | prediction | ground truth, with a class legend) and a
loss / mIoU curve (``curves.png``). Under ``torchrun`` it trains with DDP (NCCL on GPUs, gloo on CPU); every
rank sees a disjoint shard of each epoch and metrics are all-reduced.

Reproducibility: the model is initialised from ``cfg.seed``; the sample order of epoch ``e`` is a
permutation seeded by ``(seed, e)`` and the augmentation of sample ``i`` in epoch ``e`` is seeded by
``(seed, e, i)``, so a run resumed from a checkpoint takes exactly the steps the uninterrupted run takes.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from segops.figures import colorize, save_labelled_panels, save_training_curves
from segops.metrics import ConfusionMatrix, format_iou_table
from segops.progress import progress_bar
from segops.weak.losses import RegularizedLoss, crf_schedule, parse_loss
from segops.weak.supervision import check_supervision, prepare_training_set

__all__ = [
    "TrainConfig",
    "train",
    "evaluate_checkpoint",
    "predict_files",
    "build_model",
    "register_model",
    "build_datasets",
    "LOSSES",
    "ShardedSampler",
    "RegularizedLoss",
    "load_checkpoint",
    "colorize",
    "head_parameter_names",
    "parameter_groups",
    "default_workers",
    "resolve_resume_checkpoint",
    "saved_config",
    "RUN_CONTROL_KEYS",
    "PANEL_COLUMNS",
]

#: named examples of the loss grammar {ce|pce}[+crf][+ncut][+entropy] (segops.weak.losses parses any of it)
LOSSES = ("ce", "pce", "pce+crf", "pce+entropy", "pce+crf+entropy", "pce+ncut")
# Settings of one invocation, not of the run: left out of the run's saved config.json.
RUN_CONTROL_KEYS = ("resume", "overwrite")
# What `segops train` writes into its output folder (removed first by --overwrite; nothing else is touched).
RUN_FILES = ("config.json", "log.csv", "metrics.json", "last.pt", "best.pt", "last.pt.tmp", "best.pt.tmp", "curves.png")
RUN_FILE_PATTERNS = ("panels_epoch*.png",)
RUN_FOLDERS = ("tb", "cam")  # cam/: the classifier and seeds of --supervision tags
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_workers() -> int:
    """Data loader worker processes by default: min(4, the CPU cores this process may use)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return min(4, cores)


@dataclass
class TrainConfig:
    """All settings of a training run (saved in every checkpoint and, without ``resume`` / ``overwrite``, in
    the run folder's ``config.json``, which ``segops train --config`` reads back)."""

    # model
    model: str = "unet"
    model_width: float = 0.25
    model_args: Dict[str, object] = dataclasses.field(default_factory=dict)  # extra get_model options
    backbone_weights: Optional[str] = None  # local torchvision-format ImageNet checkpoint for the encoder
    # data
    data: str = "synthetic"  # synthetic | voc
    data_root: Optional[str] = None
    mask_dir: Optional[str] = None  # VOC: SegmentationClass / SegmentationClassAug (auto when None)
    scribble_dir: Optional[str] = None  # VOC: ScribbleSup label PNGs; None synthesizes scribbles from masks
    train_split: str = "train"
    val_split: str = "val"
    num_classes: Optional[int] = None  # from the dataset when None
    synthetic_train: int = 512
    synthetic_val: int = 128
    image_size: int = 64  # synthetic images
    synthetic_seed: int = 0  # the val set uses synthetic_seed + 1
    crop_size: Optional[int] = None  # None: synthetic full images; VOC default 321
    scale_min: float = 1.0
    scale_max: float = 1.0
    flip: bool = True
    # supervision and loss
    supervision: str = "scribble"  # full | scribble | clicks | tags (segops.weak.supervision)
    loss: str = "pce"
    crf_weight: float = 2e-9  # ECCV'18 defaults (DeepLab on 513x513 VOC crops)
    crf_sigma_rgb: float = 15.0
    crf_sigma_xy: float = 80.0
    crf_scale: float = 0.5
    crf_start_epoch: float = 0.0  # epochs of the data term (and expand term) alone before the CRF loss joins
    crf_ramp_epochs: float = 0.0  # then its weight rises linearly from 0 to crf_weight over this many epochs
    ncut_weight: float = 0.5
    entropy_weight: float = 0.1
    # image-level tags (--supervision tags): the CAM classifier's epochs and its seed thresholds
    cam_epochs: int = 32
    cam_bg_level: float = 0.6
    cam_confidence: float = 0.9
    cam_seeds: Optional[str] = None  # seeds.pt of an earlier tags run: reuse its seeds, train no classifier
    expand_weight: float = 1.0  # --supervision tags: weight of SEC's expand loss on the tags (0: off)
    expand_fg_decay: Optional[float] = None  # its rank-pooling decays per pixel of the logits (None: SEC's, rescaled)
    expand_bg_decay: Optional[float] = None
    # optimisation
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    head_lr_mult: float = 1.0  # learning-rate multiplier of the head (DeepLab: 10); see head_parameter_names
    epochs: int = 10
    batch_size: int = 8
    max_steps: Optional[int] = None  # stop after this many optimizer steps in total (smoke tests)
    amp: bool = False
    device: str = "auto"
    seed: int = 0
    workers: int = dataclasses.field(default_factory=default_workers)
    # outputs
    out_dir: str = "runs/train"
    eval_every: int = 1
    panels: int = 4
    tensorboard: bool = False
    progress: bool = True
    resume: Optional[str] = None  # a run folder (its last.pt) or a checkpoint file
    overwrite: bool = False  # replace a previous run in out_dir (else a non-empty out_dir is refused)
    save_every: int = 1

    def validate(self) -> None:
        if self.data not in ("synthetic", "voc"):
            raise ValueError("--data must be 'synthetic' or 'voc', got %r" % self.data)
        parse_loss(self.loss)  # ValueError showing the grammar
        self.supervision = check_supervision(self.supervision)
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError("--optimizer must be sgd, adam or adamw, got %r" % self.optimizer)
        for name in ("epochs", "batch_size", "eval_every", "save_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError("--%s must be >= 1, got %r" % (name.replace("_", "-"), getattr(self, name)))
        if self.lr <= 0:
            raise ValueError("--lr must be > 0, got %r" % self.lr)
        if not self.head_lr_mult > 0:
            raise ValueError("--head-lr-mult must be > 0, got %r" % self.head_lr_mult)
        if int(self.workers) < 0:
            raise ValueError("--workers must be >= 0, got %r" % self.workers)
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError("--scale-min/--scale-max must satisfy 0 < min <= max")
        if not (math.isfinite(self.expand_weight) and self.expand_weight >= 0):
            raise ValueError("--expand-weight must be a finite number >= 0, got %r" % (self.expand_weight,))
        for name in ("expand_fg_decay", "expand_bg_decay"):
            d = getattr(self, name)
            if d is not None and not 0.0 < float(d) <= 1.0:
                raise ValueError("--%s must be in (0, 1], got %r" % (name.replace("_", "-"), d))
        for name in ("crf_start_epoch", "crf_ramp_epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
                raise ValueError("--%s must be a finite number >= 0, got %r" % (name.replace("_", "-"), v))
        if self.crf_sigma_rgb <= 0 or self.crf_sigma_xy <= 0 or not 0 < self.crf_scale <= 1:
            raise ValueError("CRF sigmas must be > 0 and --crf-scale in (0, 1]")
        if self.data == "voc" and not self.data_root:
            raise ValueError("--data voc needs --data-root (the VOC2012 folder with JPEGImages/)")


# ---------------------------------------------------------------------------------------------- models

_MODEL_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
    """Makes ``factory(name, num_classes, in_channels=3, width=...)`` available as ``--model name``."""
    _MODEL_REGISTRY[name] = factory


def build_model(
    name: str, num_classes: int, width: float = 1.0, in_channels: int = 3, backbone_weights: Optional[str] = None,
    **model_args,
) -> nn.Module:  # fmt: skip
    """A model by name: registered names first, then ``module.path:callable`` (any importable factory with
    the ``segops.models.get_model`` signature), then ``segops.models.get_model(name, ...)``. ``model_args``
    are passed on (e.g. ``batch_norm=True`` for U-Net); ``backbone_weights`` (a local torchvision-format
    ImageNet checkpoint) too, and to a registered or ``module:callable`` factory only when it is given."""
    if backbone_weights is not None:
        model_args = dict(model_args, backbone_weights=backbone_weights)
    if name in _MODEL_REGISTRY:
        return _MODEL_REGISTRY[name](name, num_classes, in_channels=in_channels, width=width, **model_args)
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError("--model %r: cannot import %s from %s (%s)" % (name, attr, module_name, e)) from e
        return factory(name, num_classes, in_channels=in_channels, width=width, **model_args)
    try:
        from segops.models import get_model  # type: ignore[attr-defined]
    except ImportError as e:
        raise RuntimeError(
            "--model %r needs segops.models, which is not available in this build (%s); pass a factory as "
            "--model package.module:function" % (name, e)
        ) from e
    return get_model(name, num_classes, in_channels=in_channels, width=width, **model_args)


def head_parameter_names(model: nn.Module) -> List[str]:
    """Names of the parameters ``--head-lr-mult`` applies to: the layers that do not come from an ImageNet
    checkpoint (DeepLab trains its new classifier 10x faster than the pretrained encoder).

    - a model with a ``head_parameter_names()`` method decides for itself;
    - a :mod:`segops.models` model with an ImageNet encoder (FCN, SegNet, the DeepLabs): every parameter whose
      name is not among its ``encoder_keys()``;
    - any other model (U-Net, which has no pretrained encoder): ``ValueError``.
    """
    own_rule = getattr(model, "head_parameter_names", None)
    if callable(own_rule):
        return list(own_rule())
    encoder_keys = getattr(model, "encoder_keys", None)
    encoder: set = set()
    if callable(encoder_keys):
        try:
            encoder = set(encoder_keys())
        except ValueError:  # SegmentationModel without an ImageNet encoder
            encoder = set()
    if not encoder:
        raise ValueError(
            "--head-lr-mult needs a model with a pretrained encoder (FCN, SegNet, DeepLab) or a "
            "head_parameter_names() method; %s has neither" % type(model).__name__
        )
    return [name for name, _ in model.named_parameters() if name not in encoder]


def parameter_groups(model: nn.Module, lr: float, head_lr_mult: float = 1.0) -> List[Dict[str, object]]:
    """Optimizer parameter groups: one at ``lr``, or with ``head_lr_mult != 1`` the encoder at ``lr`` (group 0)
    and the head (:func:`head_parameter_names`) at ``lr * head_lr_mult`` (group 1). Frozen parameters are left out."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if head_lr_mult == 1.0:
        return [{"params": [p for _, p in trainable], "lr": lr}]
    head = set(head_parameter_names(model))
    return [
        {"params": [p for name, p in trainable if name not in head], "lr": lr},
        {"params": [p for name, p in trainable if name in head], "lr": lr * head_lr_mult},
    ]


# ------------------------------------------------------------------------------------------------ data


def build_datasets(cfg: TrainConfig) -> Tuple[Dataset, Dataset, int, Sequence[str]]:
    """``(train, val, num_classes, class_names)`` for the configuration (no augmentation applied)."""
    from segops.data import SyntheticScribbles, VOCSegmentation

    if cfg.data == "synthetic":
        train_set = SyntheticScribbles(cfg.synthetic_train, size=cfg.image_size, seed=cfg.synthetic_seed)
        val_set = SyntheticScribbles(cfg.synthetic_val, size=cfg.image_size, seed=cfg.synthetic_seed + 1)
        class_names: Sequence[str] = train_set.classes
        num_classes = train_set.num_classes
    else:
        num_classes = cfg.num_classes or 21
        train_set = VOCSegmentation(
            cfg.data_root, cfg.train_split, cfg.mask_dir, cfg.scribble_dir, num_classes=num_classes, seed=cfg.seed,
            require_masks=cfg.supervision != "scribble" or cfg.scribble_dir is None,
            synthesize=cfg.supervision == "scribble",  # full masks, clicks and tags need no scribbles (nor the warning)
        )  # fmt: skip
        val_set = VOCSegmentation(cfg.data_root, cfg.val_split, cfg.mask_dir, None, num_classes=num_classes, synthesize=False)
        class_names = train_set.classes if num_classes == 21 else [str(i) for i in range(num_classes)]
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise ValueError("--num-classes %d does not match the dataset's %d classes" % (cfg.num_classes, num_classes))
    return train_set, val_set, num_classes, class_names


class ShardedSampler(Sampler):
    """Epoch-seeded permutation (``seed``, ``epoch``) split across ``world`` ranks; ``drop_last`` trims
    the permutation to a multiple of ``world * batch_size`` so every rank takes the same number of steps."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True, batch_size: int = 1, drop_last: bool = True):
        self.n, self.seed, self.rank, self.world = int(n), int(seed), int(rank), int(world)
        self.shuffle, self.batch_size, self.drop_last = bool(shuffle), int(batch_size), bool(drop_last)
        self.epoch = 0
        self.skip = 0  # leading samples of this rank's shard to skip (resuming mid-epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _indices(self) -> List[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=generator).tolist()
        else:
            order = list(range(self.n))
        if self.drop_last:
            per_round = self.world * self.batch_size
            order = order[: (len(order) // per_round) * per_round]
        else:  # pad by wrapping so every rank has the same count
            while len(order) % self.world:
                order.append(order[len(order) % max(self.n, 1)])
        return order[self.rank :: self.world][self.skip :]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


def _collate(batch: List[Dict[str, object]]) -> Dict[str, object]:
    """Samples -> one batch: tensors stacked, ints to a tensor, anything else (names) as a list."""
    out: Dict[str, object] = {}
    for key in batch[0]:
        values = [sample[key] for sample in batch]
        if isinstance(values[0], Tensor):
            out[key] = torch.stack(values)  # type: ignore[arg-type]
        elif isinstance(values[0], int):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


def normalize(images: Tensor) -> Tensor:
    """0..255 RGB ``(B, 3, H, W)`` -> ImageNet-normalised network input."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1) * 255
    return (images - mean) / std


# ------------------------------------------------------------------------------------------ utilities


def _dist_info() -> Tuple[int, int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


def _maybe_init_distributed(device_str: str) -> bool:
    """Initialises the default process group under torchrun (WORLD_SIZE > 1); returns True if it did."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    use_cuda = device_str.startswith("cuda") or (device_str == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return True


def _select_device(spec: str, local_rank: int) -> torch.device:
    """``--device`` (auto | cpu | cuda | cuda:N) -> a device; plain ``cuda`` under torchrun is ``cuda:LOCAL_RANK``."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device %s requested but no CUDA device is available" % spec)
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


PANEL_COLUMNS = ("image", "scribbles", "prediction", "ground truth")


def _panel_cells(image: Tensor, scribble: Tensor, pred: Tensor, gt: Tensor) -> List[np.ndarray]:
    """One panel row, RGB ``(H, W, 3) uint8`` per :data:`PANEL_COLUMNS` entry."""
    image_rgb = image.detach().cpu().permute(1, 2, 0).clamp(0, 255).round().to(torch.uint8).numpy()
    return [image_rgb] + [colorize(labels.detach().cpu().numpy()) for labels in (scribble, pred, gt)]


def save_panels(path: str, rows: List[np.ndarray], scale: int = 1) -> None:
    """Writes rows (equal widths are padded) stacked vertically as one PNG, without titles or legend
    (:func:`segops.figures.save_labelled_panels` draws those)."""
    from PIL import Image

    if not rows:
        return
    width = max(row.shape[1] for row in rows)
    padded = [np.pad(row, ((0, 2), (0, width - row.shape[1]), (0, 0)), constant_values=255) for row in rows]
    picture = Image.fromarray(np.concatenate(padded, 0))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    picture.save(path)


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, object]:
    """A checkpoint written by :func:`train`; ``FileNotFoundError`` / ``ValueError`` naming the file otherwise."""
    if not os.path.isfile(path):
        raise FileNotFoundError("checkpoint not found: %s" % path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - report any unpickling problem with the file name
        raise ValueError("cannot read checkpoint %s: %s" % (path, e)) from e
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise ValueError("%s is not a segops checkpoint (no 'model' / 'config' entries)" % path)
    return checkpoint


def saved_config(cfg: TrainConfig) -> Dict[str, object]:
    """The run's settings as written to its config.json: everything but :data:`RUN_CONTROL_KEYS`."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_CONTROL_KEYS}


def _config_from_dict(values: Dict[str, object]) -> TrainConfig:
    """A saved configuration -> TrainConfig (keys this version does not know are dropped)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in names})


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    device: torch.device,
    amp: bool = False,
    panels: int = 0,
    progress: bool = False,
    crf: Optional[nn.Module] = None,
) -> Tuple[Dict[str, object], List[List[np.ndarray]]]:
    """Confusion-matrix metrics of ``model`` on ``loader`` (all-reduced under DDP) and up to ``panels``
    visualisation rows (from this rank's first batches; cells per :data:`PANEL_COLUMNS`). ``progress``: a
    progress bar on a terminal. With ``crf`` (a :class:`segops.nn.DenseCRF`), the metrics of the CRF-refined
    predictions as well, under the key ``"crf"``."""
    model.eval()
    confusion = ConfusionMatrix(num_classes, 255, device=device)
    confusion_crf = ConfusionMatrix(num_classes, 255, device=device) if crf is not None else None
    rows: List[List[np.ndarray]] = []
    for batch in progress_bar(loader, enabled=progress, desc="evaluating", unit="batch", leave=False):
        images = batch["image"].to(device)  # type: ignore[union-attr]
        mask = batch["mask"].to(device)  # type: ignore[union-attr]
        with torch.autocast(device.type, enabled=amp, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16):
            logits = model(normalize(images))
        if logits.shape[-2:] != mask.shape[-2:]:
            logits = F.interpolate(logits.float(), size=mask.shape[-2:], mode="bilinear", align_corners=False)
        pred = logits.float().argmax(1)
        roi = batch.get("roi")
        if isinstance(roi, Tensor):  # padded pixels are void
            mask = torch.where(roi.to(device) > 0.5, mask, torch.full_like(mask, 255))
        confusion.update(pred, mask)
        if confusion_crf is not None:
            confusion_crf.update(crf(logits.float(), images).argmax(1), mask)  # type: ignore[misc]
        for j in range(pred.shape[0]):
            if len(rows) >= panels:
                break
            rows.append(_panel_cells(images[j], batch["scribble"][j], pred[j], batch["mask"][j]))  # type: ignore[index]
    model.train()
    metrics = confusion.compute(sync=True)
    if confusion_crf is not None:
        metrics["crf"] = confusion_crf.compute(sync=True)
    return metrics, rows


# ---------------------------------------------------------------------------------------------- train


class _CSVLog:
    FIELDS = [
        "epoch", "step", "lr", "loss", "ce", "pce", "crf", "ncut", "entropy", "expand", "img_per_s", "epoch_time_s",
        "val_miou", "val_pixel_acc", "val_mean_acc",
    ]  # fmt: skip

    def __init__(self, path: str, append: bool) -> None:
        self.path = path
        new_file = not (append and os.path.isfile(path))
        fields = self.FIELDS
        if not new_file:  # a resumed run keeps the columns its log started with (an older log may lack some)
            with open(path, newline="") as f:
                fields = next(csv.reader(f), None) or self.FIELDS
        self.file = open(path, "w" if new_file else "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=fields, extrasaction="ignore")
        if new_file:
            self.writer.writeheader()
            self.file.flush()

    def write(self, row: Dict[str, object]) -> None:
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


@dataclass
class _RunContext:
    """Where this process runs: the settings, its device, its rank among ``world_size`` processes, its log."""

    cfg: TrainConfig
    device: torch.device
    rank: int
    world_size: int
    log: Callable[[str], None]

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs and writes files."""
        return self.rank == 0


@dataclass
class _TrainData:
    """The datasets and their loaders; ``augmented_train_set`` and ``sampler`` are re-seeded every epoch."""

    augmented_train_set: Dataset
    sampler: ShardedSampler
    train_loader: DataLoader
    val_loader: DataLoader
    num_classes: int
    class_names: List[str]
    steps_per_epoch: int  # of a whole epoch (len(train_loader) shrinks while the sampler skips on resume)


@dataclass
class _Optimization:
    """The model and everything that updates it."""

    model: nn.Module  # the bare model: checkpoints and evaluation
    forward_model: nn.Module  # what training calls: the DDP wrapper under torchrun, else the model itself
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    uses_scaler: bool  # float16 loss scaling (AMP on CUDA)
    amp_dtype: torch.dtype
    schedule_steps: int  # the poly schedule always spans all epochs
    stop_step: int  # schedule_steps, or fewer with --max-steps


@dataclass
class _Progress:
    """Where the run stands; restored from the checkpoint on resume."""

    epoch: int = 0  # the epoch to (re)start in
    step: int = 0  # optimizer steps taken
    history: List[Dict[str, object]] = dataclasses.field(default_factory=list)  # one row per epoch
    train_time_s: float = 0.0
    val_metrics: Dict[str, object] = dataclasses.field(default_factory=dict)  # the latest validation
    best_miou: float = -1.0  # the best validation mIoU so far (best.pt holds its weights)
    best_epoch: int = 0  # the epoch after which it was measured (1-based; 0: none yet)


def train(
    cfg: TrainConfig,
    model_fn: Optional[Callable[..., nn.Module]] = None,
    crf_cls=None,
    ncut_cls=None,
    log: Callable[[str], None] = print,
) -> Dict[str, object]:
    """Runs training as configured; returns a summary dict (final ``val`` metrics, ``history``, paths,
    ``train_time_s``). ``model_fn(num_classes)`` overrides ``cfg.model``; ``crf_cls`` / ``ncut_cls`` override
    ``segops.nn.DenseCRFLoss`` / ``NormalizedCutLoss`` (same constructor and call)."""
    cfg.validate()
    # every rank checks before the rendezvous in _maybe_init_distributed, so before rank 0 writes anything
    _prepare_output_folder(cfg)
    started_process_group = _maybe_init_distributed(cfg.device)
    rank, world_size, local_rank = _dist_info()
    import torch.distributed as dist

    try:
        ctx = _RunContext(cfg, _select_device(cfg.device, local_rank), rank, world_size, log if rank == 0 else (lambda s: None))
        summary = _run_training(ctx, model_fn, crf_cls, ncut_cls)
        if started_process_group:
            # every rank finishes (rank 0 writes the results) before any tears the process group down: a gloo
            # rank that destroyed its group while rank 0 was still writing aborted once at exit ("terminate
            # called without an active exception", torch 2.14.1, 2 CPU processes)
            dist.barrier()
        return summary
    finally:
        if started_process_group:
            dist.destroy_process_group()


def _run_training(ctx: _RunContext, model_fn, crf_cls, ncut_cls) -> Dict[str, object]:
    _prepare_output_and_seeds(ctx)
    data = _build_data(ctx)
    optim = _build_model_and_optimizer(ctx, data, model_fn, crf_cls, ncut_cls)
    progress = _resume_if_requested(ctx, data, optim)
    if progress.step >= optim.stop_step:
        ctx.log(
            "nothing to train: the run has taken %d of its %d steps (--epochs %d, --max-steps %s); raise them to "
            "continue" % (progress.step, optim.stop_step, ctx.cfg.epochs, ctx.cfg.max_steps)
        )
    logs = _RunLogs(ctx)
    try:
        for epoch in range(progress.epoch, ctx.cfg.epochs):
            if progress.step >= optim.stop_step:
                break
            row = _train_one_epoch(ctx, epoch, data, optim, progress)
            _validate_and_checkpoint(ctx, epoch, row, data, optim, progress, logs)
    finally:
        logs.close()
    return _finish(ctx, data, optim, progress)


def _prepare_output_folder(cfg: TrainConfig) -> None:
    """Refuses to mix two runs in one folder: a non-empty ``out_dir`` must be the folder of the run being resumed,
    or ``overwrite`` is needed (it removes the files a previous run wrote there: :data:`RUN_FILES`, panels,
    ``tb/``; nothing else is touched)."""
    out_dir = cfg.out_dir
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError("--out-dir %s exists and is not a folder" % out_dir)
    if cfg.resume:
        checkpoint = resolve_resume_checkpoint(cfg.resume)
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError("--resume: checkpoint not found: %s" % checkpoint)
        if os.path.isdir(out_dir) and os.path.samefile(out_dir, os.path.dirname(os.path.abspath(checkpoint))):
            return  # continuing the run in its own folder
    if not os.path.isdir(out_dir):
        return
    entries = sorted(os.listdir(out_dir))
    if not entries:
        return
    if not cfg.overwrite:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise FileExistsError(
            "output folder %s is not empty (%s): pass --resume %s to continue the run in it, --overwrite to "
            "replace it, or another --out-dir" % (out_dir, shown, out_dir)
        )
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 alone cleans up
        return
    import fnmatch
    import shutil

    for entry in entries:
        path = os.path.join(out_dir, entry)
        if entry in RUN_FOLDERS and os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.isfile(path) and (entry in RUN_FILES or any(fnmatch.fnmatch(entry, pat) for pat in RUN_FILE_PATTERNS)):
            os.remove(path)


def resolve_resume_checkpoint(resume: str) -> str:
    """``--resume`` value -> the checkpoint file: a run folder means its ``last.pt``."""
    if os.path.isdir(resume):
        path = os.path.join(resume, "last.pt")
        if not os.path.isfile(path):
            raise FileNotFoundError("--resume %s: the folder holds no last.pt (not a segops train run folder?)" % resume)
        return path
    return resume


def _prepare_output_and_seeds(ctx: _RunContext) -> None:
    if ctx.cfg.amp and ctx.device.type == "cpu":
        ctx.log("note: --amp on CPU uses bfloat16 autocast")
    os.makedirs(ctx.cfg.out_dir, exist_ok=True)
    torch.manual_seed(ctx.cfg.seed)  # the model's initialisation
    np.random.seed(ctx.cfg.seed % (2**32))


def _build_data(ctx: _RunContext) -> _TrainData:
    """Training loader (epoch-seeded augmentation, this rank's shard) and validation loader."""
    from segops.data import AugmentedDataset, RandomScaleCropFlip

    cfg = ctx.cfg
    train_set, val_set, num_classes, class_names = build_datasets(cfg)
    train_set = prepare_training_set(cfg, train_set, num_classes, ctx.device, ctx.log)  # clicks / CAM seeds for scribbles
    crop = cfg.crop_size if cfg.crop_size is not None else (None if cfg.data == "synthetic" else 321)
    augmentation = RandomScaleCropFlip(crop, (cfg.scale_min, cfg.scale_max), cfg.flip)
    augmented = AugmentedDataset(train_set, augmentation, seed=cfg.seed)
    sampler = ShardedSampler(len(augmented), cfg.seed, ctx.rank, ctx.world_size, True, cfg.batch_size, drop_last=True)
    if len(sampler) < cfg.batch_size:
        raise ValueError(
            "training set too small: %d images for batch size %d x %d ranks" % (len(augmented), cfg.batch_size, ctx.world_size)
        )
    train_loader = DataLoader(
        augmented, cfg.batch_size, sampler=sampler, num_workers=cfg.workers, collate_fn=_collate, drop_last=True
    )
    # validation: each rank takes every world_size-th image, without padding (a duplicate would count twice)
    val_indices = list(range(len(val_set)))[ctx.rank :: ctx.world_size]
    val_batch_size = cfg.batch_size if cfg.data == "synthetic" else 1  # VOC images differ in size
    val_loader = DataLoader(
        torch.utils.data.Subset(val_set, val_indices), val_batch_size, shuffle=False, num_workers=cfg.workers,
        collate_fn=_collate,
    )  # fmt: skip
    return _TrainData(augmented, sampler, train_loader, val_loader, num_classes, list(class_names), len(train_loader))


def _build_model_and_optimizer(ctx: _RunContext, data: _TrainData, model_fn, crf_cls, ncut_cls) -> _Optimization:
    """The model (DDP-wrapped under torchrun), the loss, the optimizer and its poly learning-rate schedule."""
    cfg, device = ctx.cfg, ctx.device
    if model_fn is not None:
        model = model_fn(data.num_classes)
    else:
        # a resumed run takes every weight from its checkpoint: the ImageNet file is not read again
        backbone_weights = None if cfg.resume else cfg.backbone_weights
        model = build_model(cfg.model, data.num_classes, cfg.model_width, backbone_weights=backbone_weights, **cfg.model_args)
    model = model.to(device)
    forward_model: nn.Module = model
    if ctx.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        forward_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    criterion = RegularizedLoss(cfg, crf_cls, ncut_cls).to(device)

    groups = parameter_groups(model, cfg.lr, cfg.head_lr_mult)
    if cfg.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule_steps = data.steps_per_epoch * cfg.epochs
    stop_step = schedule_steps if cfg.max_steps is None else min(schedule_steps, int(cfg.max_steps))
    power = cfg.poly_power
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1.0 - step / max(schedule_steps, 1)) ** power
    )
    uses_scaler = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=uses_scaler)
    amp_dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    return _Optimization(
        model, forward_model, criterion, optimizer, scheduler, scaler, uses_scaler, amp_dtype, schedule_steps, stop_step
    )


def _resume_if_requested(ctx: _RunContext, data: _TrainData, optim: _Optimization) -> _Progress:
    """Restores model, optimizer, schedule, loss scaler, RNG and history from ``cfg.resume`` (a fresh
    :class:`_Progress` without it)."""
    cfg = ctx.cfg
    if not cfg.resume:
        return _Progress()
    path = resolve_resume_checkpoint(cfg.resume)
    checkpoint = load_checkpoint(path, map_location=ctx.device)
    if "optimizer" not in checkpoint:
        raise ValueError("%s holds the best weights only (no optimizer state); resume from last.pt" % path)
    optim.model.load_state_dict(checkpoint["model"])  # type: ignore[arg-type]
    optim.optimizer.load_state_dict(checkpoint["optimizer"])  # type: ignore[arg-type]
    optim.scheduler.load_state_dict(checkpoint["scheduler"])  # type: ignore[arg-type]
    if checkpoint.get("scaler") is not None:
        optim.scaler.load_state_dict(checkpoint["scaler"])  # type: ignore[arg-type]
    epoch, step = int(checkpoint["epoch"]), int(checkpoint["step"])  # type: ignore[arg-type]
    if step - epoch * data.steps_per_epoch not in range(0, data.steps_per_epoch):
        raise ValueError(
            "checkpoint %s (epoch %d, step %d) does not match this configuration's %d steps per epoch"
            % (path, epoch, step, data.steps_per_epoch)
        )
    if checkpoint.get("torch_rng") is not None:
        torch.set_rng_state(checkpoint["torch_rng"])  # type: ignore[arg-type]
    ctx.log("resumed from %s at epoch %d, step %d" % (path, epoch, step))
    return _Progress(
        epoch=epoch, step=step, history=list(checkpoint.get("history", [])),  # type: ignore[arg-type]
        best_miou=float(checkpoint.get("best_miou", -1.0)), best_epoch=int(checkpoint.get("best_epoch", 0)),  # type: ignore[arg-type]
    )  # fmt: skip


class _RunLogs:
    """Rank 0's outputs besides checkpoints: the CSV log, TensorBoard (optional), config.json (the settings
    without :data:`RUN_CONTROL_KEYS`: ``segops train --config`` reproduces the run from it) and curves.png."""

    def __init__(self, ctx: _RunContext) -> None:
        cfg = ctx.cfg
        self.csv: Optional[_CSVLog] = None
        self.tensorboard = None
        if not ctx.is_main:
            return
        self.csv = _CSVLog(os.path.join(cfg.out_dir, "log.csv"), append=bool(cfg.resume))
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(os.path.join(cfg.out_dir, "tb"))
            except ImportError:
                ctx.log("note: tensorboard is not installed; only the CSV log is written")
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(saved_config(cfg), f, indent=2)
        self.curves_path = os.path.join(cfg.out_dir, "curves.png")

    def write(self, row: Dict[str, object], step: int, history: List[Dict[str, object]]) -> None:
        if self.csv is not None:
            self.csv.write(row)
            save_training_curves(self.curves_path, history)
        if self.tensorboard is not None:
            for key, value in row.items():
                if isinstance(value, float) and key not in ("epoch", "step"):
                    self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self.csv is not None:
            self.csv.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _training_target(cfg: TrainConfig, batch: Dict[str, object]) -> Tensor:
    """The labels the loss sees: full masks or scribbles (255 = unlabelled)."""
    return batch["mask"] if cfg.supervision == "full" else batch["scribble"]  # type: ignore[return-value]


def _train_one_epoch(ctx: _RunContext, epoch: int, data: _TrainData, optim: _Optimization, progress: _Progress) -> Dict[str, object]:
    """Optimizer steps over this rank's shard of ``epoch`` (from where a stopped run left off, up to
    ``stop_step``); returns the epoch's log row (mean loss terms, learning rate, throughput)."""
    cfg, device = ctx.cfg, ctx.device
    # a run stopped mid-epoch (--max-steps) resumes with the next batch of the same epoch
    data.sampler.skip = (progress.step - epoch * data.steps_per_epoch) * cfg.batch_size
    data.sampler.set_epoch(epoch)
    data.augmented_train_set.set_epoch(epoch)  # type: ignore[attr-defined]
    term_sums: Dict[str, float] = {}
    batches_done, images_seen = 0, 0
    epoch_start = time.perf_counter()
    bar = progress_bar(
        data.train_loader, enabled=ctx.is_main and cfg.progress, desc="epoch %d/%d" % (epoch + 1, cfg.epochs),
        leave=False, mininterval=1.0,
    )  # fmt: skip
    optim.model.train()
    for batch in bar:
        if progress.step >= optim.stop_step:
            break
        images = batch["image"].to(device, non_blocking=True)
        target = _training_target(cfg, batch).to(device)
        roi = batch["roi"].to(device)
        with torch.autocast(device.type, enabled=cfg.amp, dtype=optim.amp_dtype):
            logits = optim.forward_model(normalize(images))
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
        tags = batch.get("tags")  # --supervision tags: (B, K) multi-hot, for the expand term
        optim.criterion.crf_factor = crf_schedule(progress.step, data.steps_per_epoch, cfg.crf_start_epoch, cfg.crf_ramp_epochs)
        loss, terms = optim.criterion(logits, target, images, roi, tags.to(device) if isinstance(tags, Tensor) else None)
        if not torch.isfinite(loss):
            raise FloatingPointError("loss became %s at step %d (terms %s); lower --lr" % (float(loss), progress.step, terms))
        optim.optimizer.zero_grad(set_to_none=True)
        optim.scaler.scale(loss).backward()
        optim.scaler.step(optim.optimizer)
        optim.scaler.update()
        optim.scheduler.step()
        progress.step += 1
        batches_done += 1
        images_seen += images.shape[0] * ctx.world_size
        terms["loss"] = float(loss.detach())
        for name, value in terms.items():
            term_sums[name] = term_sums.get(name, 0.0) + value
        elapsed = time.perf_counter() - epoch_start
        bar.set_postfix({**{k: "%.4g" % v for k, v in terms.items()}, "img/s": "%.1f" % (images_seen / max(elapsed, 1e-9))}, refresh=False)
    bar.close()
    epoch_time = time.perf_counter() - epoch_start
    progress.train_time_s += epoch_time
    row: Dict[str, object] = {name: total / max(batches_done, 1) for name, total in term_sums.items()}
    row.update(
        epoch=epoch + 1, step=progress.step, lr=optim.optimizer.param_groups[0]["lr"],
        img_per_s=images_seen / max(epoch_time, 1e-9), epoch_time_s=epoch_time,
    )  # fmt: skip
    return row


def _validate_and_checkpoint(
    ctx: _RunContext, epoch: int, row: Dict[str, object], data: _TrainData, optim: _Optimization, progress: _Progress,
    logs: _RunLogs,
) -> None:  # fmt: skip
    """Evaluates when due (every ``eval_every`` epochs and at the end), writes panels and ``best.pt`` (when the
    validation mIoU improves), logs the epoch's row and saves ``last.pt`` when due."""
    cfg = ctx.cfg
    is_last = (epoch + 1 == cfg.epochs) or progress.step >= optim.stop_step
    epoch_done = progress.step == (epoch + 1) * data.steps_per_epoch
    improved = False
    if (epoch + 1) % cfg.eval_every == 0 or is_last:
        progress.val_metrics, panel_rows = evaluate(
            optim.model, data.val_loader, data.num_classes, ctx.device, cfg.amp, cfg.panels if ctx.is_main else 0,
            progress=ctx.is_main and cfg.progress,
        )  # fmt: skip
        val_miou = float(progress.val_metrics["miou"])  # type: ignore[arg-type]
        row.update(
            val_miou=val_miou, val_pixel_acc=progress.val_metrics["pixel_acc"],
            val_mean_acc=progress.val_metrics["mean_acc"],
        )  # fmt: skip
        if val_miou > progress.best_miou:  # metrics are all-reduced: every rank agrees
            progress.best_miou, progress.best_epoch, improved = val_miou, epoch + 1, True
        if ctx.is_main and panel_rows:
            panel_path = os.path.join(cfg.out_dir, "panels_epoch%03d.png" % (epoch + 1))
            save_labelled_panels(
                panel_path, panel_rows, PANEL_COLUMNS, data.class_names, scale=2 if cfg.data == "synthetic" else 1
            )
    progress.history.append(row)
    if not ctx.is_main:
        return
    ctx.log(_epoch_summary(cfg, row))
    logs.write(row, progress.step, progress.history)
    if improved:
        best = {
            "model": optim.model.state_dict(),
            "config": dataclasses.asdict(cfg),
            "num_classes": data.num_classes,
            "class_names": data.class_names,
            "best_epoch": progress.best_epoch,
            "step": progress.step,
            "val": {k: progress.val_metrics[k] for k in ("miou", "pixel_acc", "mean_acc")},
        }
        _save_atomically(best, os.path.join(cfg.out_dir, "best.pt"))
    if (epoch + 1) % cfg.save_every == 0 or is_last:
        checkpoint = {
            "model": optim.model.state_dict(),
            "optimizer": optim.optimizer.state_dict(),
            "scheduler": optim.scheduler.state_dict(),
            "scaler": optim.scaler.state_dict() if optim.uses_scaler else None,
            "epoch": epoch + 1 if epoch_done else epoch,  # the epoch to resume in
            "step": progress.step,
            "config": dataclasses.asdict(cfg),
            "num_classes": data.num_classes,
            "class_names": data.class_names,
            "history": progress.history,
            "best_miou": progress.best_miou,
            "best_epoch": progress.best_epoch,
            "torch_rng": torch.get_rng_state(),
        }
        _save_atomically(checkpoint, os.path.join(cfg.out_dir, "last.pt"))


def _epoch_summary(cfg: TrainConfig, row: Dict[str, object]) -> str:
    """One log line: epoch, step, loss and its terms, throughput, validation metrics."""
    terms = ", ".join("%s %.4g" % (k, row[k]) for k in ("ce", "pce", "crf", "ncut", "entropy") if k in row)
    msg = "epoch %d/%d step %d loss %.4f (%s) %.1f img/s" % (
        row["epoch"], cfg.epochs, row["step"], row.get("loss", float("nan")), terms, row["img_per_s"]
    )
    if "val_miou" in row:
        msg += " | val mIoU %.2f%% pixel acc %.2f%%" % (100 * row["val_miou"], 100 * row["val_pixel_acc"])  # type: ignore[operator]
    return msg


def _save_atomically(obj: Dict[str, object], path: str) -> None:
    """torch.save to ``path`` through a temporary file, so an interrupted save never leaves a broken checkpoint."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _finish(ctx: _RunContext, data: _TrainData, optim: _Optimization, progress: _Progress) -> Dict[str, object]:
    """Final metrics (evaluating if no epoch ran), the IoU table and metrics.json; returns the summary."""
    cfg = ctx.cfg
    if not progress.val_metrics:
        progress.val_metrics, _ = evaluate(optim.model, data.val_loader, data.num_classes, ctx.device, cfg.amp, 0)
    summary = {
        "val": {k: (v.tolist() if isinstance(v, Tensor) else v) for k, v in progress.val_metrics.items()},
        "history": progress.history,
        "steps": progress.step,
        "train_time_s": progress.train_time_s,
        "checkpoint": os.path.join(cfg.out_dir, "last.pt"),
        "best_checkpoint": os.path.join(cfg.out_dir, "best.pt"),
        "best_miou": progress.best_miou,
        "best_epoch": progress.best_epoch,
        "num_classes": data.num_classes,
        "class_names": data.class_names,
        "model": optim.model,
    }
    if ctx.is_main:
        ctx.log(format_iou_table(progress.val_metrics, data.class_names))
        with open(os.path.join(cfg.out_dir, "metrics.json"), "w") as f:
            final = dict(summary["val"], steps=progress.step, train_time_s=progress.train_time_s)  # type: ignore[call-overload]
            json.dump(dict(final, best_miou=progress.best_miou, best_epoch=progress.best_epoch), f, indent=2)
    return summary


# ---------------------------------------------------------------------------------------- eval / predict


def _model_from_checkpoint(checkpoint: Dict[str, object], device: torch.device, model_fn=None) -> Tuple[nn.Module, TrainConfig]:
    """The checkpoint's model (weights loaded, eval mode, on ``device``) and its run's configuration."""
    cfg = _config_from_dict(checkpoint["config"])  # type: ignore[arg-type]
    num_classes = int(checkpoint["num_classes"])  # type: ignore[arg-type]
    if model_fn is not None:
        model = model_fn(num_classes)
    else:
        model = build_model(cfg.model, num_classes, cfg.model_width, **cfg.model_args)
    model.load_state_dict(checkpoint["model"])  # type: ignore[arg-type]
    return model.to(device).eval(), cfg


def evaluate_checkpoint(
    checkpoint: str,
    data: Optional[str] = None,
    data_root: Optional[str] = None,
    split: Optional[str] = None,
    device: str = "auto",
    batch_size: int = 8,
    model_fn=None,
    progress: bool = False,
    crf: Optional[nn.Module] = None,
) -> Dict[str, object]:
    """Metrics of a checkpoint on its validation set (or ``data`` / ``data_root`` / ``split`` overrides);
    ``progress``: a progress bar on a terminal; with ``crf``, also those of the CRF-refined predictions (key
    ``"crf"``)."""
    target_device = _select_device(device, 0)
    saved = load_checkpoint(checkpoint, map_location=target_device)
    model, cfg = _model_from_checkpoint(saved, target_device, model_fn)
    if data is not None:
        cfg.data = data
    if data_root is not None:
        cfg.data_root = data_root
    if split is not None:
        cfg.val_split = split
    cfg.validate()
    _, val_set, num_classes, class_names = build_datasets(cfg)
    if num_classes != int(saved["num_classes"]):  # type: ignore[arg-type]
        raise ValueError("the checkpoint has %s classes but the dataset has %d" % (saved["num_classes"], num_classes))
    loader = DataLoader(val_set, batch_size if cfg.data == "synthetic" else 1, shuffle=False, collate_fn=_collate)
    metrics, _ = evaluate(model, loader, num_classes, target_device, progress=progress, crf=crf)
    metrics["class_names"] = list(class_names)
    return metrics


@torch.no_grad()
def predict_files(checkpoint: str, inputs: Sequence[str], out_dir: str, device: str = "auto", model_fn=None,
                  crf: Optional[nn.Module] = None) -> List[str]:
    """Writes one palette PNG mask (VOC colours) per input image into ``out_dir``; returns the paths. With
    ``crf`` (a :class:`segops.nn.DenseCRF`) the masks are the argmax of the CRF-refined marginals."""
    from PIL import Image

    from segops.data.voc import read_image, voc_palette

    target_device = _select_device(device, 0)
    saved = load_checkpoint(checkpoint, map_location=target_device)
    model, _ = _model_from_checkpoint(saved, target_device, model_fn)
    os.makedirs(out_dir, exist_ok=True)
    palette = voc_palette(256).reshape(-1).tolist()
    written = []
    for path in inputs:
        image = torch.from_numpy(read_image(path)).permute(2, 0, 1).float()[None].to(target_device)
        logits = model(normalize(image))
        if logits.shape[-2:] != image.shape[-2:]:
            logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        if crf is not None:
            logits = crf(logits.float(), image)
        labels = logits.argmax(1)[0].to(torch.uint8).cpu().numpy()
        mask_png = Image.fromarray(labels, mode="P")
        mask_png.putpalette(palette)
        destination = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
        mask_png.save(destination)
        written.append(destination)
    return written
