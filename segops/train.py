"""Training, evaluation and prediction for (weakly-supervised) semantic segmentation.

``train(cfg)`` runs the whole loop: data (synthetic or PASCAL VOC / ScribbleSup folders), the model, the loss
(``ce``, ``pce``, ``pce+crf``, ``pce+crf+entropy``, ``pce+ncut``), SGD/Adam with DeepLab's poly learning
rate, optional AMP, tqdm progress bars with the loss terms and throughput, a CSV log (and TensorBoard when
installed), checkpoints with exact resume, evaluation every N epochs, PNG panels
(image | scribbles | prediction | ground truth). Under ``torchrun`` it trains with DDP (NCCL on GPUs,
gloo on CPU); every rank sees a disjoint shard of each epoch and metrics are all-reduced.

Reproducibility: the model is initialised from ``cfg.seed``; the sample order of epoch ``e`` is a
permutation seeded by ``(seed, e)`` and the augmentation of sample ``i`` in epoch ``e`` is seeded by
``(seed, e, i)``, so a run resumed from a checkpoint takes exactly the steps the uninterrupted run takes.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from segops.metrics import ConfusionMatrix, format_iou_table

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
]

LOSSES = ("ce", "pce", "pce+crf", "pce+crf+entropy", "pce+ncut")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class TrainConfig:
    """All settings of a training run (saved in every checkpoint)."""

    # model
    model: str = "unet"
    model_width: float = 0.25
    model_args: Dict[str, object] = dataclasses.field(default_factory=dict)  # extra get_model options
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
    supervision: str = "scribble"  # full | scribble
    loss: str = "pce"
    crf_weight: float = 2e-9  # ECCV'18 defaults (DeepLab on 513x513 VOC crops)
    crf_sigma_rgb: float = 15.0
    crf_sigma_xy: float = 80.0
    crf_scale: float = 0.5
    ncut_weight: float = 0.5
    entropy_weight: float = 0.1
    # optimisation
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    epochs: int = 10
    batch_size: int = 8
    max_steps: Optional[int] = None  # stop after this many optimizer steps in total (smoke tests)
    amp: bool = False
    device: str = "auto"
    seed: int = 0
    workers: int = 0
    # outputs
    out_dir: str = "runs/train"
    eval_every: int = 1
    panels: int = 4
    tensorboard: bool = False
    progress: bool = True
    resume: Optional[str] = None
    save_every: int = 1

    def validate(self) -> None:
        if self.data not in ("synthetic", "voc"):
            raise ValueError("--data must be 'synthetic' or 'voc', got %r" % self.data)
        if self.loss not in LOSSES:
            raise ValueError("--loss must be one of %s, got %r" % (", ".join(LOSSES), self.loss))
        if self.supervision not in ("full", "scribble"):
            raise ValueError("--supervision must be 'full' or 'scribble', got %r" % self.supervision)
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError("--optimizer must be sgd, adam or adamw, got %r" % self.optimizer)
        for name in ("epochs", "batch_size", "eval_every", "save_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError("--%s must be >= 1, got %r" % (name.replace("_", "-"), getattr(self, name)))
        if self.lr <= 0:
            raise ValueError("--lr must be > 0, got %r" % self.lr)
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError("--scale-min/--scale-max must satisfy 0 < min <= max")
        if self.crf_sigma_rgb <= 0 or self.crf_sigma_xy <= 0 or not 0 < self.crf_scale <= 1:
            raise ValueError("CRF sigmas must be > 0 and --crf-scale in (0, 1]")
        if self.data == "voc" and not self.data_root:
            raise ValueError("--data voc needs --data-root (the VOC2012 folder with JPEGImages/)")


# ---------------------------------------------------------------------------------------------- models

_MODEL_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
    """Makes ``factory(name, num_classes, in_channels=3, width=...)`` available as ``--model name``."""
    _MODEL_REGISTRY[name] = factory


def build_model(name: str, num_classes: int, width: float = 1.0, in_channels: int = 3, **model_args) -> nn.Module:
    """A model by name: registered names first, then ``module.path:callable`` (any importable factory with
    the ``segops.models.get_model`` signature), then ``segops.models.get_model(name, ...)``. ``model_args``
    are passed on (e.g. ``batch_norm=True`` for U-Net)."""
    if name in _MODEL_REGISTRY:
        return _MODEL_REGISTRY[name](name, num_classes, in_channels=in_channels, width=width, **model_args)
    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError("--model %r: cannot import %s from %s (%s)" % (name, attr, mod, e)) from e
        return factory(name, num_classes, in_channels=in_channels, width=width, **model_args)
    try:
        from segops.models import get_model  # type: ignore[attr-defined]
    except ImportError as e:
        raise RuntimeError(
            "--model %r needs segops.models, which is not available in this build (%s); pass a factory as "
            "--model package.module:function" % (name, e)
        ) from e
    return get_model(name, num_classes, in_channels=in_channels, width=width, **model_args)


# ------------------------------------------------------------------------------------------------ data


def build_datasets(cfg: TrainConfig) -> Tuple[Dataset, Dataset, int, Sequence[str]]:
    """``(train, val, num_classes, class_names)`` for the configuration (no augmentation applied)."""
    from segops.data import SyntheticScribbles, VOCSegmentation

    if cfg.data == "synthetic":
        tr = SyntheticScribbles(cfg.synthetic_train, size=cfg.image_size, seed=cfg.synthetic_seed)
        va = SyntheticScribbles(cfg.synthetic_val, size=cfg.image_size, seed=cfg.synthetic_seed + 1)
        names: Sequence[str] = tr.classes
        k = tr.num_classes
    else:
        k = cfg.num_classes or 21
        tr = VOCSegmentation(
            cfg.data_root, cfg.train_split, cfg.mask_dir, cfg.scribble_dir, num_classes=k, seed=cfg.seed,
            require_masks=cfg.supervision == "full" or cfg.scribble_dir is None,
        )  # fmt: skip
        va = VOCSegmentation(cfg.data_root, cfg.val_split, cfg.mask_dir, None, num_classes=k, synthesize=False)
        names = tr.classes if k == 21 else [str(i) for i in range(k)]
    if cfg.num_classes is not None and cfg.num_classes != k:
        raise ValueError("--num-classes %d does not match the dataset's %d classes" % (cfg.num_classes, k))
    return tr, va, k, names


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
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        if self.drop_last:
            chunk = self.world * self.batch_size
            idx = idx[: (len(idx) // chunk) * chunk]
        else:  # pad by wrapping so every rank has the same count
            while len(idx) % self.world:
                idx.append(idx[len(idx) % max(self.n, 1)])
        return idx[self.rank :: self.world][self.skip :]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


def _collate(batch: List[Dict[str, object]]) -> Dict[str, object]:
    out: Dict[str, object] = {}
    for k in batch[0]:
        vals = [b[k] for b in batch]
        if isinstance(vals[0], Tensor):
            out[k] = torch.stack(vals)  # type: ignore[arg-type]
        elif isinstance(vals[0], int):
            out[k] = torch.tensor(vals)
        else:
            out[k] = vals
    return out


def normalize(images: Tensor) -> Tensor:
    """0..255 RGB ``(B, 3, H, W)`` -> ImageNet-normalised network input."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1) * 255
    return (images - mean) / std


# ------------------------------------------------------------------------------------------------ loss


class RegularizedLoss(nn.Module):
    """The training loss: ``ce`` / ``pce`` on the target, plus the dense CRF, normalized cut or entropy
    regularizers on the softmax of the logits over the unpadded region (``roi``).

    ``forward(logits, target, images_0_255, roi)`` returns ``(total, terms)`` with ``terms`` a dict of
    detached per-term values (``ce``/``pce``, ``crf``, ``ncut``, ``entropy``).
    """

    def __init__(self, cfg: TrainConfig, crf_cls=None, ncut_cls=None) -> None:
        super().__init__()
        import segops.nn as snn

        self.kind = cfg.loss
        parts = self.kind.split("+")
        self.ce_name = parts[0]
        if self.ce_name == "pce":
            self.pce = snn.PartialCrossEntropyLoss(ignore_index=255)
        self.crf = None
        self.ncut = None
        self.entropy = None
        if "crf" in parts:
            cls = crf_cls or getattr(snn, "DenseCRFLoss", None)
            if cls is None:
                raise RuntimeError("--loss %s needs segops.nn.DenseCRFLoss, which this build lacks" % self.kind)
            self.crf = cls(cfg.crf_weight, cfg.crf_sigma_rgb, cfg.crf_sigma_xy, cfg.crf_scale)
        if "ncut" in parts:
            cls = ncut_cls or getattr(snn, "NormalizedCutLoss", None)
            if cls is None:
                raise RuntimeError("--loss %s needs segops.nn.NormalizedCutLoss, which this build lacks" % self.kind)
            self.ncut = cls(cfg.ncut_weight, cfg.crf_sigma_rgb, cfg.crf_sigma_xy, cfg.crf_scale)
        if "entropy" in parts:
            self.entropy = snn.EntropyLoss()
            self.entropy_weight = float(cfg.entropy_weight)

    def forward(self, logits: Tensor, target: Tensor, images: Tensor, roi: Optional[Tensor]) -> Tuple[Tensor, Dict[str, float]]:
        logits = logits.float()  # the regularizers and the CE run in float32 under AMP
        terms: Dict[str, float] = {}
        if self.ce_name == "pce":
            total = self.pce(logits, target)
        else:
            total = F.cross_entropy(logits, target, ignore_index=255)
        terms[self.ce_name] = float(total.detach())
        if self.crf is not None or self.ncut is not None:
            probs = logits.softmax(1)
            roi_f = None if roi is None else roi.float()
            if self.crf is not None:
                t = self.crf(images.float(), probs, roi_f)
                terms["crf"] = float(t.detach())
                total = total + t
            if self.ncut is not None:
                t = self.ncut(images.float(), probs, roi_f)
                terms["ncut"] = float(t.detach())
                total = total + t
        if self.entropy is not None:
            mask = None if roi is None else roi > 0.5
            t = self.entropy_weight * self.entropy(logits, mask)
            terms["entropy"] = float(t.detach())
            total = total + t
        return total, terms


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
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device %s requested but no CUDA device is available" % spec)
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


_PALETTE: Optional[np.ndarray] = None


def colorize(labels: np.ndarray) -> np.ndarray:
    """Class indices ``(H, W)`` -> VOC-palette RGB ``(H, W, 3) uint8`` (255 = light grey-beige)."""
    global _PALETTE
    if _PALETTE is None:
        from segops.data.voc import voc_palette

        _PALETTE = voc_palette(256)
    return _PALETTE[np.clip(labels, 0, 255).astype(np.int64)]


def _panel_row(image: Tensor, scribble: Tensor, pred: Tensor, gt: Tensor) -> np.ndarray:
    img = image.detach().cpu().permute(1, 2, 0).clamp(0, 255).round().to(torch.uint8).numpy()
    parts = [img] + [colorize(t.detach().cpu().numpy()) for t in (scribble, pred, gt)]
    sep = np.full((img.shape[0], 2, 3), 255, np.uint8)
    out = []
    for i, p in enumerate(parts):
        out.append(p)
        if i < len(parts) - 1:
            out.append(sep)
    return np.concatenate(out, 1)


def save_panels(path: str, rows: List[np.ndarray], scale: int = 1) -> None:
    """Writes rows (equal widths are padded) stacked vertically as one PNG."""
    from PIL import Image

    if not rows:
        return
    w = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 2), (0, w - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    im = Image.fromarray(np.concatenate(padded, 0))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    im.save(path)


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, object]:
    if not os.path.isfile(path):
        raise FileNotFoundError("checkpoint not found: %s" % path)
    try:
        ck = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - report any unpickling problem with the file name
        raise ValueError("cannot read checkpoint %s: %s" % (path, e)) from e
    if not isinstance(ck, dict) or "model" not in ck or "config" not in ck:
        raise ValueError("%s is not a segops checkpoint (no 'model' / 'config' entries)" % path)
    return ck


def _config_from_dict(d: Dict[str, object]) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in d.items() if k in names})


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    device: torch.device,
    amp: bool = False,
    panels: int = 0,
    crf: Optional[nn.Module] = None,
) -> Tuple[Dict[str, object], List[np.ndarray]]:
    """Confusion-matrix metrics of ``model`` on ``loader`` (all-reduced under DDP) and up to ``panels``
    visualisation rows (from this rank's first batches). With ``crf`` (a :class:`segops.nn.DenseCRF`), the
    metrics of the CRF-refined predictions as well, under the key ``"crf"``."""
    model.eval()
    cm = ConfusionMatrix(num_classes, 255, device=device)
    cm_crf = ConfusionMatrix(num_classes, 255, device=device) if crf is not None else None
    rows: List[np.ndarray] = []
    for batch in loader:
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
        cm.update(pred, mask)
        if cm_crf is not None:
            cm_crf.update(crf(logits.float(), images).argmax(1), mask)  # type: ignore[misc]
        for j in range(pred.shape[0]):
            if len(rows) >= panels:
                break
            rows.append(_panel_row(images[j], batch["scribble"][j], pred[j], batch["mask"][j]))  # type: ignore[index]
    model.train()
    res = cm.compute(sync=True)
    if cm_crf is not None:
        res["crf"] = cm_crf.compute(sync=True)
    return res, rows


# ---------------------------------------------------------------------------------------------- train


class _CSVLog:
    FIELDS = [
        "epoch", "step", "lr", "loss", "ce", "pce", "crf", "ncut", "entropy", "img_per_s", "epoch_time_s",
        "val_miou", "val_pixel_acc", "val_mean_acc",
    ]  # fmt: skip

    def __init__(self, path: str, append: bool) -> None:
        self.path = path
        new = not (append and os.path.isfile(path))
        self.f = open(path, "w" if new else "a", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=self.FIELDS, extrasaction="ignore")
        if new:
            self.w.writeheader()
            self.f.flush()

    def write(self, row: Dict[str, object]) -> None:
        self.w.writerow(row)
        self.f.flush()

    def close(self) -> None:
        self.f.close()


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
    started_pg = _maybe_init_distributed(cfg.device)
    rank, world, local_rank = _dist_info()
    try:
        return _train(cfg, model_fn, crf_cls, ncut_cls, log if rank == 0 else (lambda s: None), rank, world, local_rank)
    finally:
        if started_pg:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(cfg, model_fn, crf_cls, ncut_cls, log, rank, world, local_rank) -> Dict[str, object]:
    from segops.data import AugmentedDataset, RandomScaleCropFlip

    device = _select_device(cfg.device, local_rank)
    if cfg.amp and device.type == "cpu":
        log("note: --amp on CPU uses bfloat16 autocast")
    os.makedirs(cfg.out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % (2**32))

    train_ds, val_ds, K, class_names = build_datasets(cfg)
    crop = cfg.crop_size if cfg.crop_size is not None else (None if cfg.data == "synthetic" else 321)
    aug = RandomScaleCropFlip(crop, (cfg.scale_min, cfg.scale_max), cfg.flip)
    train_aug = AugmentedDataset(train_ds, aug, seed=cfg.seed)
    sampler = ShardedSampler(len(train_aug), cfg.seed, rank, world, True, cfg.batch_size, drop_last=True)
    if len(sampler) < cfg.batch_size:
        raise ValueError(
            "training set too small: %d images for batch size %d x %d ranks" % (len(train_aug), cfg.batch_size, world)
        )
    loader = DataLoader(train_aug, cfg.batch_size, sampler=sampler, num_workers=cfg.workers, collate_fn=_collate, drop_last=True)
    # validation: each rank takes every world-th image, without padding (a duplicate would count twice)
    val_idx = list(range(len(val_ds)))[rank::world]
    val_bs = cfg.batch_size if cfg.data == "synthetic" else 1
    val_loader = DataLoader(torch.utils.data.Subset(val_ds, val_idx), val_bs, shuffle=False, num_workers=cfg.workers, collate_fn=_collate)

    model = model_fn(K) if model_fn is not None else build_model(cfg.model, K, cfg.model_width, **cfg.model_args)
    model = model.to(device)
    ddp_model: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    criterion = RegularizedLoss(cfg, crf_cls, ncut_cls).to(device)

    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(loader)
    sched_steps = steps_per_epoch * cfg.epochs  # the poly schedule always spans all epochs
    stop_step = sched_steps if cfg.max_steps is None else min(sched_steps, int(cfg.max_steps))
    power = cfg.poly_power
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / max(sched_steps, 1)) ** power)
    use_scaler = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    amp_dtype = torch.bfloat16 if device.type == "cpu" else torch.float16

    start_epoch, step = 0, 0
    history: List[Dict[str, object]] = []
    if cfg.resume:
        ck = load_checkpoint(cfg.resume, map_location=device)
        model.load_state_dict(ck["model"])  # type: ignore[arg-type]
        opt.load_state_dict(ck["optimizer"])  # type: ignore[arg-type]
        sched.load_state_dict(ck["scheduler"])  # type: ignore[arg-type]
        if ck.get("scaler") is not None:
            scaler.load_state_dict(ck["scaler"])  # type: ignore[arg-type]
        start_epoch, step = int(ck["epoch"]), int(ck["step"])  # type: ignore[arg-type]
        if step - start_epoch * steps_per_epoch not in range(0, steps_per_epoch):
            raise ValueError(
                "checkpoint %s (epoch %d, step %d) does not match this configuration's %d steps per epoch"
                % (cfg.resume, start_epoch, step, steps_per_epoch)
            )
        history = list(ck.get("history", []))  # type: ignore[arg-type]
        if ck.get("torch_rng") is not None:
            torch.set_rng_state(ck["torch_rng"])  # type: ignore[arg-type]
        log("resumed from %s at epoch %d, step %d" % (cfg.resume, start_epoch, step))

    csv_log = _CSVLog(os.path.join(cfg.out_dir, "log.csv"), append=bool(cfg.resume)) if rank == 0 else None
    tb = None
    if cfg.tensorboard and rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(os.path.join(cfg.out_dir, "tb"))
        except ImportError:
            log("note: tensorboard is not installed; only the CSV log is written")
    with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)

    from tqdm import tqdm

    val: Dict[str, object] = {}
    t_train = 0.0
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        if step >= stop_step:
            break
        # a run stopped mid-epoch (--max-steps) resumes with the next batch of the same epoch
        sampler.skip = (step - epoch * steps_per_epoch) * cfg.batch_size
        sampler.set_epoch(epoch)
        train_aug.set_epoch(epoch)
        sums: Dict[str, float] = {}
        n_batches, n_images = 0, 0
        t0 = time.perf_counter()
        bar = tqdm(
            loader, desc="epoch %d/%d" % (epoch + 1, cfg.epochs), disable=(rank != 0 or not cfg.progress),
            leave=False, dynamic_ncols=True, mininterval=1.0,
        )  # fmt: skip
        for batch in bar:
            if step >= stop_step:
                break
            images = batch["image"].to(device, non_blocking=True)
            target = (batch["mask"] if cfg.supervision == "full" else batch["scribble"]).to(device)
            roi = batch["roi"].to(device)
            with torch.autocast(device.type, enabled=cfg.amp, dtype=amp_dtype):
                logits = ddp_model(normalize(images))
            if logits.shape[-2:] != target.shape[-2:]:
                logits = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
            loss, terms = criterion(logits, target, images, roi)
            if not torch.isfinite(loss):
                raise FloatingPointError("loss became %s at step %d (terms %s); lower --lr" % (float(loss), step, terms))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            n_batches += 1
            n_images += images.shape[0] * world
            terms["loss"] = float(loss.detach())
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            dt = time.perf_counter() - t0
            bar.set_postfix({**{k: "%.4g" % v for k, v in terms.items()}, "img/s": "%.1f" % (n_images / max(dt, 1e-9))}, refresh=False)
        bar.close()
        epoch_time = time.perf_counter() - t0
        t_train += epoch_time
        row: Dict[str, object] = {k: v / max(n_batches, 1) for k, v in sums.items()}
        row.update(epoch=epoch + 1, step=step, lr=opt.param_groups[0]["lr"], img_per_s=n_images / max(epoch_time, 1e-9), epoch_time_s=epoch_time)
        last = (epoch + 1 == cfg.epochs) or step >= stop_step
        epoch_done = step == (epoch + 1) * steps_per_epoch
        if (epoch + 1) % cfg.eval_every == 0 or last:
            val, rows = evaluate(model, val_loader, K, device, cfg.amp, cfg.panels if rank == 0 else 0)
            row.update(val_miou=val["miou"], val_pixel_acc=val["pixel_acc"], val_mean_acc=val["mean_acc"])
            if rank == 0 and rows:
                save_panels(os.path.join(cfg.out_dir, "panels_epoch%03d.png" % (epoch + 1)), rows, scale=2 if cfg.data == "synthetic" else 1)
        history.append(row)
        if rank == 0:
            msg = "epoch %d/%d step %d loss %.4f (%s) %.1f img/s" % (
                epoch + 1, cfg.epochs, step, row.get("loss", float("nan")),
                ", ".join("%s %.4g" % (k, row[k]) for k in ("ce", "pce", "crf", "ncut", "entropy") if k in row),
                row["img_per_s"],
            )  # fmt: skip
            if "val_miou" in row:
                msg += " | val mIoU %.2f%% pixel acc %.2f%%" % (100 * row["val_miou"], 100 * row["val_pixel_acc"])  # type: ignore[operator]
            log(msg)
            assert csv_log is not None
            csv_log.write(row)
            if tb is not None:
                for k, v in row.items():
                    if isinstance(v, float) and k not in ("epoch", "step"):
                        tb.add_scalar(k, v, step)
            if (epoch + 1) % cfg.save_every == 0 or last:
                ck = {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict() if use_scaler else None,
                    "epoch": epoch + 1 if epoch_done else epoch,  # the epoch to resume in
                    "step": step,
                    "config": dataclasses.asdict(cfg),
                    "num_classes": K,
                    "class_names": list(class_names),
                    "history": history,
                    "torch_rng": torch.get_rng_state(),
                }
                tmp = os.path.join(cfg.out_dir, "last.pt.tmp")
                torch.save(ck, tmp)
                os.replace(tmp, os.path.join(cfg.out_dir, "last.pt"))
    if csv_log is not None:
        csv_log.close()
    if tb is not None:
        tb.close()
    if not val:
        val, _ = evaluate(model, val_loader, K, device, cfg.amp, 0)
    summary = {
        "val": {k: (v.tolist() if isinstance(v, Tensor) else v) for k, v in val.items()},
        "history": history,
        "steps": step,
        "train_time_s": t_train,
        "checkpoint": os.path.join(cfg.out_dir, "last.pt"),
        "num_classes": K,
        "class_names": list(class_names),
        "model": model,
    }
    if rank == 0:
        log(format_iou_table(val, class_names))
        with open(os.path.join(cfg.out_dir, "metrics.json"), "w") as f:
            json.dump(dict(summary["val"], steps=step, train_time_s=t_train), f, indent=2)  # type: ignore[call-overload]
    return summary


# ---------------------------------------------------------------------------------------- eval / predict


def _model_from_checkpoint(ck: Dict[str, object], device: torch.device, model_fn=None) -> Tuple[nn.Module, TrainConfig]:
    cfg = _config_from_dict(ck["config"])  # type: ignore[arg-type]
    K = int(ck["num_classes"])  # type: ignore[arg-type]
    model = model_fn(K) if model_fn is not None else build_model(cfg.model, K, cfg.model_width, **cfg.model_args)
    model.load_state_dict(ck["model"])  # type: ignore[arg-type]
    return model.to(device).eval(), cfg


def evaluate_checkpoint(
    checkpoint: str,
    data: Optional[str] = None,
    data_root: Optional[str] = None,
    split: Optional[str] = None,
    device: str = "auto",
    batch_size: int = 8,
    model_fn=None,
    crf: Optional[nn.Module] = None,
) -> Dict[str, object]:
    """Metrics of a checkpoint on its validation set (or ``data`` / ``data_root`` / ``split`` overrides); with
    ``crf``, also those of the CRF-refined predictions (key ``"crf"``)."""
    dev = _select_device(device, 0)
    ck = load_checkpoint(checkpoint, map_location=dev)
    model, cfg = _model_from_checkpoint(ck, dev, model_fn)
    if data is not None:
        cfg.data = data
    if data_root is not None:
        cfg.data_root = data_root
    if split is not None:
        cfg.val_split = split
    cfg.validate()
    _, val_ds, K, names = build_datasets(cfg)
    if K != int(ck["num_classes"]):  # type: ignore[arg-type]
        raise ValueError("the checkpoint has %s classes but the dataset has %d" % (ck["num_classes"], K))
    loader = DataLoader(val_ds, batch_size if cfg.data == "synthetic" else 1, shuffle=False, collate_fn=_collate)
    res, _ = evaluate(model, loader, K, dev, crf=crf)
    res["class_names"] = list(names)
    return res


@torch.no_grad()
def predict_files(checkpoint: str, inputs: Sequence[str], out_dir: str, device: str = "auto", model_fn=None,
                  crf: Optional[nn.Module] = None) -> List[str]:
    """Writes one palette PNG mask (VOC colours) per input image into ``out_dir``; returns the paths. With
    ``crf`` (a :class:`segops.nn.DenseCRF`) the masks are the argmax of the CRF-refined marginals."""
    from PIL import Image

    from segops.data.voc import read_image, voc_palette

    dev = _select_device(device, 0)
    ck = load_checkpoint(checkpoint, map_location=dev)
    model, _ = _model_from_checkpoint(ck, dev, model_fn)
    os.makedirs(out_dir, exist_ok=True)
    pal = voc_palette(256).reshape(-1).tolist()
    outs = []
    for path in inputs:
        img = read_image(path)
        x = torch.from_numpy(img).permute(2, 0, 1).float()[None].to(dev)
        logits = model(normalize(x))
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if crf is not None:
            logits = crf(logits.float(), x)
        pred = logits.argmax(1)[0].to(torch.uint8).cpu().numpy()
        im = Image.fromarray(pred, mode="P")
        im.putpalette(pal)
        dst = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
        im.save(dst)
        outs.append(dst)
    return outs
