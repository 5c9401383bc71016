"""Image-level tags: a multi-label classifier with global average pooling, its class activation maps (CAMs)
and the seeds drawn from them.

The pipeline (Zhou et al., CVPR'16 "Learning deep features for discriminative localization"; Kolesnikov &
Lampert, ECCV'16 "Seed, expand and constrain"):

1. **Classifier.** A segops backbone (VGG16's first three blocks, :func:`segops.models.backbones.vgg16_features`,
   width-scaled, with BatchNorm; stride 4) gives features ``f (B, C, h, w)``; a 1x1 convolution ``W`` maps them to one
   map per foreground class and global average pooling makes the image-level logits:
   ``logit_c = mean_xy (W f)_c(x, y) + b_c``. It is trained with binary cross-entropy on the tags (which
   foreground classes the image contains; background is in every image and is not a tag).
2. **CAM.** ``CAM_c = (W f)_c``, the map whose average is the class score, upsampled (bilinear) to the image
   size, ReLU'd and divided by its per-image maximum, so 1 marks the most discriminative pixel of class c.
3. **Constrain to boundaries.** The maps of a stride-4 network with a 40-pixel receptive field spread a few
   pixels beyond their objects (thin bars become blobs). Scores ``s = [bg_level, CAM_c for the tagged classes]``
   become probabilities ``Q = softmax(s / temperature)``, refined by a few mean-field steps of a dense CRF
   with the bilateral kernel of the CRF loss, ``Q <- softmax((s + weight * W~Q) / temperature)`` where ``W~Q``
   is the label distribution averaged over the pixels of similar position and colour (the permutohedral-lattice
   Gaussian, normalised); label changes move onto colour edges (SEC's "constrain to boundary", Kolesnikov &
   Lampert ECCV'16, here as inference on the seeds).
4. **Seeds.** A pixel is a seed of the tagged class with the largest refined probability if that probability
   is at least ``confidence``, a background seed if every tagged class is below ``1 - confidence``, and
   unlabelled (255) otherwise; an image tagged with no foreground class is all background.
5. **Expand and constrain.** A segmentation network is trained on the seeds with pCE plus SEC's expand loss on
   the image's tags (:func:`segops.weak.losses.expand_loss`: every tagged class covers a share of the image, no
   absent class any pixel), optionally with the dense CRF loss, which moves the label changes onto colour edges.

The baseline ``cam`` segmentation of a test image uses the classifier's own tags (sigmoid > 0.5) and labels
each pixel with the argmax of ``[bg_level, CAM_c for the predicted classes]``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from segops.weak.supervision import TaggedDataset

__all__ = [
    "CAMSettings",
    "CAMClassifier",
    "train_cam_classifier",
    "normalized_cams",
    "cam_seeds",
    "refine_cams",
    "cam_segmentation",
    "tag_seeds",
    "load_seeds",
]


@dataclass
class CAMSettings:
    """Settings of the tag classifier and of its seeds (``segops train --cam-*``)."""

    epochs: int = 32  # classifier training epochs
    batch_size: int = 16
    lr: float = 3e-3  # Adam, poly-decayed
    width: float = 0.125  # backbone channel width multiplier
    blocks: int = 3  # VGG16 conv blocks: stride 4 maps
    bg_level: float = 0.6  # the background score against the normalised CAMs
    confidence: float = 0.9  # refined probability of a seed, at least
    temperature: float = 0.2  # softmax temperature of the scores
    crf_iterations: int = 5  # mean-field steps (0: no refinement)
    crf_weight: float = 0.5  # weight of the neighbourhood's label shares
    crf_sigma_rgb: float = 15.0  # the CRF loss's kernel of the demo (64 x 64 images)
    crf_sigma_xy: float = 10.0

    def validate(self) -> None:
        if int(self.epochs) < 1 or int(self.batch_size) < 1 or int(self.crf_iterations) < 0:
            raise ValueError("CAM settings: --cam-epochs and the batch size must be >= 1 and the CRF iterations >= 0, "
                             "got %r, %r, %r" % (self.epochs, self.batch_size, self.crf_iterations))
        for name in ("lr", "width", "temperature", "crf_sigma_rgb", "crf_sigma_xy"):
            if not float(getattr(self, name)) > 0:
                raise ValueError("CAM settings: %s must be > 0, got %r" % (name, getattr(self, name)))
        if not 0.0 <= self.bg_level <= 1.0:
            raise ValueError("--cam-bg-level must be in [0, 1], got %r" % (self.bg_level,))
        if not 0.5 < self.confidence <= 1.0:
            raise ValueError("--cam-confidence must be in (0.5, 1], got %r" % (self.confidence,))

    @classmethod
    def from_config(cls, cfg) -> "CAMSettings":
        """The settings a :class:`segops.train.TrainConfig` carries (``cam_epochs``, ``cam_bg_level``,
        ``cam_confidence``, and the CRF loss's ``crf_sigma_rgb`` / ``crf_sigma_xy`` for the refinement)."""
        d = cls()
        s = cls(
            epochs=int(getattr(cfg, "cam_epochs", d.epochs)),
            bg_level=float(getattr(cfg, "cam_bg_level", d.bg_level)),
            confidence=float(getattr(cfg, "cam_confidence", d.confidence)),
            crf_sigma_rgb=float(getattr(cfg, "crf_sigma_rgb", d.crf_sigma_rgb)),
            crf_sigma_xy=float(getattr(cfg, "crf_sigma_xy", d.crf_sigma_xy)),
        )
        s.validate()
        return s


class CAMClassifier(nn.Module):
    """Multi-label classifier with global average pooling whose 1x1 classifier gives class activation maps.

    Args:
        num_tags: number of foreground classes (the tags; background excluded).
        in_channels: input channels.
        width: channel width multiplier of the VGG16 backbone (with BatchNorm).
        blocks: how many of VGG16's conv blocks to keep (1..5): the maps have stride ``2 ** (blocks - 1)``
            (3: conv1_1 .. conv3_3, stride 4, receptive field 40 px; 4: .. conv4_3, stride 8, 92 px).

    ``forward(x (B, in_channels, H, W)) -> logits (B, num_tags)``; :meth:`cams` gives the maps
    ``(B, num_tags, ceil(H / stride), ceil(W / stride))`` whose spatial mean plus the bias is exactly the logits.
    """

    def __init__(self, num_tags: int, in_channels: int = 3, width: float = 0.125, blocks: int = 3) -> None:
        super().__init__()
        from segops.models.backbones import vgg16_features
        from segops.nn import AtrousConv2d

        if int(num_tags) < 1:
            raise ValueError("CAMClassifier: num_tags must be >= 1, got %r" % (num_tags,))
        if not 1 <= int(blocks) <= 5:
            raise ValueError("CAMClassifier: blocks must be in 1..5, got %r" % (blocks,))
        pools = [nn.MaxPool2d(2, 2, ceil_mode=True) for _ in range(5)]
        feats = vgg16_features(in_channels, width, batch_norm=True, pools=pools)
        cut = [i for i, m in enumerate(feats) if isinstance(m, nn.MaxPool2d)][int(blocks) - 1]  # the pool after the last block
        self.features = nn.Sequential(*list(feats)[:cut])
        channels = [m for m in self.features if isinstance(m, nn.Conv2d)][-1].out_channels
        self.classifier = AtrousConv2d(channels, int(num_tags), 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)
        self.num_tags = int(num_tags)
        self.stride = 2 ** (int(blocks) - 1)

    def cams(self, x: Tensor) -> Tensor:
        """Class activation maps ``sum_k W_ck f_k(x, y)`` (no bias): ``(B, num_tags, h, w)``."""
        f = self.features(x)
        return F.conv2d(f, self.classifier.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.cams(x).mean((2, 3)) + self.classifier.bias


def _normalize_input(images: Tensor) -> Tensor:
    from segops.train import normalize

    return normalize(images)


def train_cam_classifier(
    dataset: Dataset,
    num_classes: int,
    settings: CAMSettings,
    device: torch.device,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> CAMClassifier:
    """Trains a :class:`CAMClassifier` on the image-level tags of ``dataset`` (computed from its masks) with
    binary cross-entropy, Adam and a poly learning rate, random horizontal flips; deterministic given ``seed``."""
    settings.validate()
    tagged = TaggedDataset(dataset, num_classes)
    torch.manual_seed(seed)
    model = CAMClassifier(num_classes - 1, width=settings.width, blocks=settings.blocks).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    n = len(tagged)
    steps_per_epoch = max(n // settings.batch_size, 1)
    total = steps_per_epoch * settings.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total) ** 0.9)
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7)
    model.train()
    t0 = time.perf_counter()
    for epoch in range(settings.epochs):
        order = torch.randperm(n, generator=g).tolist()
        flips = torch.rand(n, generator=g) < 0.5
        loss_sum, correct, count = 0.0, 0, 0
        for b in range(steps_per_epoch):
            idx = order[b * settings.batch_size : (b + 1) * settings.batch_size]
            items = [tagged[i] for i in idx]
            x = torch.stack([it["image"] for it in items])  # type: ignore[misc]
            flip = flips[idx]
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x).to(device)
            y = torch.stack([it["tags"][1:] for it in items]).to(device)  # type: ignore[index]
            logits = model(_normalize_input(x))
            loss = F.binary_cross_entropy_with_logits(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach())
            correct += int(((logits.detach() > 0) == (y > 0.5)).sum())
            count += y.numel()
        log("cam classifier epoch %d/%d: BCE %.4f, tag accuracy %.1f%% (%.1f s)"
            % (epoch + 1, settings.epochs, loss_sum / steps_per_epoch, 100.0 * correct / max(count, 1), time.perf_counter() - t0))
    model.eval()
    return model


@torch.no_grad()
def normalized_cams(model: CAMClassifier, images: Tensor) -> Tuple[Tensor, Tensor]:
    """``(cams, logits)`` of 0..255 RGB ``images (B, 3, H, W)``: the CAMs upsampled (bilinear) to ``(H, W)``,
    ReLU'd and divided by their per-image, per-class maximum (``(B, num_tags, H, W)`` in [0, 1]; a class whose
    map is nowhere positive is all 0), and the image-level logits ``(B, num_tags)``."""
    model.eval()
    x = _normalize_input(images)
    cams = model.cams(x)
    logits = cams.mean((2, 3)) + model.classifier.bias
    cams = F.interpolate(cams, size=images.shape[-2:], mode="bilinear", align_corners=False).clamp_min(0)
    peak = cams.amax((2, 3), keepdim=True)
    return torch.where(peak > 0, cams / peak.clamp_min(1e-12), torch.zeros_like(cams)), logits


def cam_seeds(cams: Tensor, tags: Tensor, fg_threshold: float, bg_threshold: float, ignore_index: int = 255) -> Tensor:
    """Seeds from normalised CAMs.

    Args:
        cams: ``(B, T, H, W)`` normalised class activation maps of the T foreground classes (class ``t + 1``).
        tags: ``(B, T)`` or ``(B, T + 1)`` (with the background column first, ignored) presence of each class.
        fg_threshold: a pixel is a seed of the present class with the largest map there if that value is at
            least this.
        bg_threshold: a pixel is a background seed (0) if every present class's map is below this.

    Returns ``(B, H, W) int64``: class ids on seeds, ``ignore_index`` elsewhere. An image with no present
    foreground class is all background.
    """
    if cams.dim() != 4:
        raise ValueError("cam_seeds: cams must be (B, T, H, W), got shape %s" % (tuple(cams.shape),))
    B, T = cams.shape[:2]
    if tags.shape == (B, T + 1):
        tags = tags[:, 1:]
    if tuple(tags.shape) != (B, T):
        raise ValueError("cam_seeds: tags must be (B, %d) or (B, %d), got shape %s" % (T, T + 1, tuple(tags.shape)))
    if not 0.0 <= bg_threshold <= fg_threshold <= 1.0:
        raise ValueError("cam_seeds: need 0 <= bg_threshold <= fg_threshold <= 1, got %r, %r" % (bg_threshold, fg_threshold))
    present = (tags > 0.5).view(B, T, 1, 1)
    masked = torch.where(present, cams, torch.full_like(cams, -1.0))  # absent classes never win
    best, arg = masked.max(1)
    out = torch.full((B,) + tuple(cams.shape[-2:]), ignore_index, dtype=torch.int64, device=cams.device)
    out[best >= fg_threshold] = arg[best >= fg_threshold] + 1
    out[best < bg_threshold] = 0  # includes images without any present class (best = -1)
    return out


def refine_cams(
    cams: Tensor,
    tags: Tensor,
    images: Tensor,
    bg_level: float,
    temperature: float = 0.2,
    iterations: int = 5,
    weight: float = 0.5,
    sigma_rgb: float = 15.0,
    sigma_xy: float = 10.0,
) -> Tensor:
    """Class probabilities ``(B, T + 1, H, W)`` (background first) from normalised CAMs, refined by a dense CRF.

    Scores ``s = [bg_level, CAM_c]`` (classes absent from ``tags`` get no probability) give
    ``Q = softmax(s / temperature)``; each of ``iterations`` mean-field steps sets
    ``Q = softmax((s + weight * (W Q) / (W 1)) / temperature)`` with ``W`` the bilateral Gaussian on
    ``(x / sigma_xy, y / sigma_xy, RGB / sigma_rgb)`` (:func:`segops.ops.permutohedral_filter`, normalised): a
    pixel's score for a label grows by ``weight`` times the share of that label among the pixels of similar
    position and colour. ``images``: ``(B, 3, H, W)`` RGB 0..255; ``tags``: ``(B, T)`` or ``(B, T + 1)``.
    """
    from segops.ops.lattice import crf_features, permutohedral_filter

    B, T = cams.shape[:2]
    if tags.shape == (B, T + 1):
        tags = tags[:, 1:]
    if tuple(tags.shape) != (B, T):
        raise ValueError("refine_cams: tags must be (B, %d) or (B, %d), got shape %s" % (T, T + 1, tuple(tags.shape)))
    present = (tags > 0.5).view(B, T, 1, 1)
    scores = torch.cat([torch.full_like(cams[:, :1], float(bg_level)), cams], 1)
    absent = torch.cat([torch.zeros_like(present[:, :1]), ~present], 1).expand_as(scores)
    scores = scores.masked_fill(absent, float("-inf"))
    q = (scores / temperature).softmax(1)
    if iterations > 0:
        feats = crf_features(images.float(), sigma_rgb, sigma_xy)
        for _ in range(int(iterations)):
            q = ((scores + weight * permutohedral_filter(q.contiguous(), feats, normalize=True)) / temperature).softmax(1)
    return q


def cam_segmentation(cams: Tensor, logits: Tensor, bg_level: float) -> Tensor:
    """The CAM baseline segmentation ``(B, H, W) int64``: classes predicted present (``logits > 0``) compete
    with a constant background score ``bg_level`` on their normalised CAMs; absent classes never win."""
    B, T = cams.shape[:2]
    present = (logits > 0).view(B, T, 1, 1)
    scores = torch.where(present, cams, torch.full_like(cams, -1.0))
    bg = torch.full_like(cams[:, :1], float(bg_level))
    return torch.cat([bg, scores], 1).argmax(1)


def _loader(dataset: Dataset, batch_size: int) -> DataLoader:
    from segops.train import _collate

    return DataLoader(dataset, batch_size, shuffle=False, collate_fn=_collate)


def tag_seeds(
    dataset: Dataset,
    num_classes: int,
    settings: CAMSettings,
    device: torch.device,
    seed: int = 0,
    out_dir: Optional[str] = None,
    log: Callable[[str], None] = print,
    model: Optional[CAMClassifier] = None,
) -> List[Tensor]:
    """Trains the tag classifier on ``dataset`` (unless ``model`` is given) and returns the seed map of every
    sample (``(H, W) int64``, 255 = unlabelled), from the sample's tags and the classifier's CAMs refined by
    :func:`refine_cams` (see the module docstring).
    With ``out_dir``, writes ``cam/classifier.pt``, ``cam/seeds.pt`` (for :func:`load_seeds`), ``cam/settings.json``
    and ``cam/seeds.png``
    (image | CAM of each class | seeds | mask for the first samples) and logs the seeds' coverage and
    precision against the masks (a diagnostic; the masks never reach the seeds)."""
    from segops.data.scribbles import image_tags

    settings.validate()
    if model is None:
        model = train_cam_classifier(dataset, num_classes, settings, device, seed, log)
    seeds: List[Tensor] = []
    rows: List[np.ndarray] = []
    labelled = correct = pixels = 0
    for batch in _loader(dataset, 32):
        images = batch["image"].to(device)  # type: ignore[union-attr]
        masks = batch["mask"]
        tags = torch.stack([torch.from_numpy(image_tags(m.numpy(), num_classes)) for m in masks]).to(device)  # type: ignore[union-attr]
        cams, _ = normalized_cams(model, images)
        probs = refine_cams(cams, tags, images, settings.bg_level, settings.temperature, settings.crf_iterations,
                            settings.crf_weight, settings.crf_sigma_rgb, settings.crf_sigma_xy)
        s = cam_seeds(probs[:, 1:], tags, settings.confidence, 1.0 - settings.confidence).cpu()
        seeds.extend(list(s))
        lab = s != 255
        labelled += int(lab.sum())
        correct += int((s[lab] == masks[lab]).sum())  # type: ignore[index]
        pixels += s.numel()
        if out_dir is not None and len(rows) < 6:
            rows.extend(_seed_rows(images.cpu(), cams.cpu(), s, masks, 6 - len(rows)))  # type: ignore[arg-type]
    log("cam seeds: %.1f%% of the pixels labelled, %.1f%% of them correct (against the masks)"
        % (100.0 * labelled / max(pixels, 1), 100.0 * correct / max(labelled, 1)))
    if out_dir is not None:
        from segops.train import save_panels

        d = os.path.join(out_dir, "cam")
        os.makedirs(d, exist_ok=True)
        torch.save({"model": model.state_dict(), "settings": asdict(settings), "num_classes": num_classes}, os.path.join(d, "classifier.pt"))
        torch.save({"seeds": torch.stack(seeds).to(torch.uint8), "settings": asdict(settings)}, os.path.join(d, "seeds.pt"))
        with open(os.path.join(d, "settings.json"), "w") as f:
            json.dump(dict(asdict(settings), seed_coverage=labelled / max(pixels, 1), seed_precision=correct / max(labelled, 1)), f, indent=2)
        save_panels(os.path.join(d, "seeds.png"), rows, scale=2)
    return seeds


def _heat(a: Tensor) -> np.ndarray:
    """[0, 1] map -> RGB uint8 (black -> red -> yellow -> white)."""
    v = a.clamp(0, 1).numpy()
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], -1)
    return (255 * rgb).round().astype(np.uint8)


def _seed_rows(images: Tensor, cams: Tensor, seeds: Tensor, masks: Tensor, n: int) -> List[np.ndarray]:
    from segops.train import colorize

    rows = []
    for j in range(min(n, images.shape[0])):
        parts = [images[j].permute(1, 2, 0).clamp(0, 255).round().to(torch.uint8).numpy()]
        parts += [_heat(c) for c in cams[j]]
        parts += [colorize(seeds[j].numpy()), colorize(masks[j].numpy())]
        sep = np.full((parts[0].shape[0], 2, 3), 255, np.uint8)
        row: List[np.ndarray] = []
        for i, p in enumerate(parts):
            row += [p] + ([sep] if i < len(parts) - 1 else [])
        rows.append(np.concatenate(row, 1))
    return rows


def load_seeds(path: str, n: int) -> List[Tensor]:
    """The seed maps saved by :func:`tag_seeds` (``<out_dir>/cam/seeds.pt``); ``ValueError`` if the file does not
    hold ``n`` of them."""
    if not os.path.isfile(path):
        raise FileNotFoundError("CAM seeds file not found: %s" % path)
    d = torch.load(path, map_location="cpu", weights_only=True)
    seeds = d.get("seeds") if isinstance(d, dict) else None
    if not isinstance(seeds, Tensor) or seeds.dim() != 3:
        raise ValueError("%s holds no (N, H, W) 'seeds' tensor" % path)
    if seeds.shape[0] != n:
        raise ValueError("%s holds %d seed maps but the training set has %d images" % (path, seeds.shape[0], n))
    return [s.to(torch.int64) for s in seeds]
