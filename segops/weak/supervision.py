"""The kinds of supervision ``segops train --supervision`` knows, as training-set wrappers.

``full`` trains on the masks, ``scribble`` on the dataset's scribbles; ``clicks`` replaces every training
sample's scribbles with one click per region (:class:`ClickLabels`), and ``tags`` with seeds drawn from class
activation maps of a classifier trained on the image-level tags alone (:func:`segops.weak.tags.tag_seeds`,
:class:`SeedLabels`). The trainer keeps reading the weak label from ``sample["scribble"]``, so every loss of
the grammar works with every kind of weak supervision.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from segops.data.scribbles import image_tags, synthesize_clicks

__all__ = ["SUPERVISIONS", "check_supervision", "ClickLabels", "SeedLabels", "TaggedDataset", "prepare_training_set"]

#: the values of ``--supervision`` (``scribbles`` is accepted as a spelling of ``scribble``).
SUPERVISIONS = ("full", "scribble", "clicks", "tags")
_CLICK_STREAM = 0xC11C  # third word of the click generator's seed: clicks never share a stream with scribbles


def check_supervision(value: str) -> str:
    """The canonical supervision name, or a ``ValueError`` listing the choices."""
    if value == "scribbles":
        return "scribble"
    if value not in SUPERVISIONS:
        raise ValueError("--supervision must be one of %s, got %r" % (", ".join(SUPERVISIONS), value))
    return value


class _Wrapper(Dataset):
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str):  # classes, num_classes, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _mask_of(sample: Dict[str, object]) -> np.ndarray:
    m = sample.get("mask")
    if not isinstance(m, torch.Tensor):
        raise ValueError("this kind of weak supervision is synthesized from full masks, but the samples have no 'mask'")
    return m.numpy()


class ClickLabels(_Wrapper):
    """``dataset`` with ``sample["scribble"]`` replaced by clicks synthesized from ``sample["mask"]``
    (:func:`segops.data.synthesize_clicks`, one click per region); the clicks of sample ``i`` depend only on
    ``(seed, i)`` and are computed once."""

    def __init__(self, dataset: Dataset, seed: int = 0, radius: float = 1.5, ignore_index: int = 255) -> None:
        super().__init__(dataset)
        self.seed, self.radius, self.ignore_index = int(seed), float(radius), int(ignore_index)
        self._cache: Dict[int, torch.Tensor] = {}

    def clicks(self, i: int, sample: Optional[Dict[str, object]] = None) -> torch.Tensor:
        """The click map of sample ``i``: ``(H, W) int64``, 255 off the clicks."""
        if i not in self._cache:
            s = sample if sample is not None else self.dataset[i]
            rng = np.random.default_rng([self.seed, int(i), _CLICK_STREAM])
            c = synthesize_clicks(_mask_of(s), rng, self.radius, self.ignore_index)  # type: ignore[arg-type]
            self._cache[i] = torch.from_numpy(c.astype(np.int64))
        return self._cache[i]

    def __getitem__(self, i: int) -> Dict[str, object]:
        s = dict(self.dataset[i])
        s["scribble"] = self.clicks(i, s).clone()
        return s


class SeedLabels(_Wrapper):
    """``dataset`` with ``sample["scribble"]`` replaced by precomputed seeds (one ``(H, W)`` int map per sample,
    255 = unlabelled), e.g. the class-activation-map seeds of :func:`segops.weak.tags.tag_seeds`."""

    def __init__(self, dataset: Dataset, seeds: Sequence[torch.Tensor]) -> None:
        super().__init__(dataset)
        if len(seeds) != len(dataset):  # type: ignore[arg-type]
            raise ValueError("SeedLabels: %d seed maps for %d samples" % (len(seeds), len(dataset)))  # type: ignore[arg-type]
        self.seeds: List[torch.Tensor] = [torch.as_tensor(s, dtype=torch.int64) for s in seeds]

    def __getitem__(self, i: int) -> Dict[str, object]:
        s = dict(self.dataset[i])
        seed = self.seeds[i]
        img = s["image"]
        if isinstance(img, torch.Tensor) and tuple(seed.shape) != tuple(img.shape[-2:]):
            raise ValueError("SeedLabels: seed map %d has shape %s but its image %s" % (i, tuple(seed.shape), tuple(img.shape[-2:])))
        s["scribble"] = seed.clone()
        return s


class TaggedDataset(_Wrapper):
    """``dataset`` with ``sample["tags"]``: the image-level tags of its mask (:func:`segops.data.image_tags`),
    ``(num_classes,) float32`` multi-hot, computed once per sample. Works for any dataset whose samples have
    a ``mask`` (the synthetic data, VOC)."""

    def __init__(self, dataset: Dataset, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__(dataset)
        self.num_classes_tagged = int(num_classes)
        self.ignore_index = int(ignore_index)
        self._cache: Dict[int, torch.Tensor] = {}

    def tags(self, i: int, sample: Optional[Dict[str, object]] = None) -> torch.Tensor:
        if i not in self._cache:
            s = sample if sample is not None else self.dataset[i]
            t = image_tags(_mask_of(s), self.num_classes_tagged, self.ignore_index)
            self._cache[i] = torch.from_numpy(t.astype(np.float32))
        return self._cache[i]

    def __getitem__(self, i: int) -> Dict[str, object]:
        s = dict(self.dataset[i])
        s["tags"] = self.tags(i, s).clone()
        return s


def prepare_training_set(cfg, train_ds: Dataset, num_classes: int, device: torch.device,
                         log: Callable[[str], None] = print) -> Dataset:
    """The training set as ``cfg.supervision`` asks: unchanged for ``full`` / ``scribble``, clicks for
    ``clicks``, class-activation-map seeds plus each sample's ``tags`` (:class:`TaggedDataset`, for the loss's
    expand term) for ``tags`` (this trains the tag classifier first; its checkpoint,
    the seeds, settings and a seed panel go to ``<out_dir>/cam/``; with ``cfg.cam_seeds`` the seeds are read
    from that file instead, e.g. ``<earlier run>/cam/seeds.pt``; a resumed run reads its own ``cam/seeds.pt``)."""
    sup = check_supervision(cfg.supervision)
    if sup == "clicks":
        return ClickLabels(train_ds, cfg.seed)
    if sup == "tags":
        from segops.weak.tags import CAMSettings, load_seeds, tag_seeds

        seeds_file = getattr(cfg, "cam_seeds", None)
        own_seeds = os.path.join(cfg.out_dir, "cam", "seeds.pt")
        if not seeds_file and getattr(cfg, "resume", None) and os.path.isfile(own_seeds):
            seeds_file = own_seeds  # a resumed run continues on the seeds it started with
        if seeds_file:
            seeds = load_seeds(seeds_file, len(train_ds))  # type: ignore[arg-type]
            log("cam seeds: read %d seed maps from %s" % (len(seeds), seeds_file))
        else:
            # the classifier draws from torch's global generator: leave it as the caller seeded it, so the
            # segmentation network starts the same whether the seeds are computed here or read from a file
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                seeds = tag_seeds(train_ds, num_classes, CAMSettings.from_config(cfg), device, cfg.seed, cfg.out_dir, log)
        # the image tags ride along for the expand term of the loss (segops.weak.losses.expand_loss)
        return TaggedDataset(SeedLabels(train_ds, seeds), num_classes)
    return train_ds
