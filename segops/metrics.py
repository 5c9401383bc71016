"""Segmentation metrics from a confusion matrix: per-class IoU, mIoU, pixel accuracy, mean accuracy.

Definitions (equal to torchmetrics' ``MulticlassJaccardIndex`` / ``MulticlassAccuracy`` with
``ignore_index=255``; rows of the matrix are targets, columns predictions; pixels whose target is
``ignore_index`` are not counted):

* ``iou[c] = TP_c / (TP_c + FP_c + FN_c)``; ``acc[c] = TP_c / (TP_c + FN_c)`` (recall).
* ``pixel_acc = sum_c TP_c / #counted pixels`` (torchmetrics ``average="micro"`` accuracy).
* ``miou`` and ``mean_acc`` are means over the classes that occur in the target **or** in the prediction.
  A class absent from both has no defined IoU: it is excluded from the means, and its entry in ``iou`` /
  ``acc`` is 0 (torchmetrics' ``zero_division=0``); ``present[c]`` tells which classes count. A class that is
  predicted but absent from the target counts with IoU 0 and accuracy 0 (as in torchmetrics).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["ConfusionMatrix", "format_iou_table"]


class ConfusionMatrix:
    """Accumulates a ``(K, K)`` confusion matrix (int64) over batches and, on demand, across DDP ranks.

    Args:
        num_classes: K.
        ignore_index: target label that is not counted (void / unlabelled).
        device: where the matrix lives (defaults to the device of the first update).
    """

    def __init__(self, num_classes: int, ignore_index: Optional[int] = 255, device=None) -> None:
        if int(num_classes) < 1:
            raise ValueError("ConfusionMatrix: num_classes must be >= 1, got %r" % (num_classes,))
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.mat: Optional[Tensor] = None if device is None else torch.zeros(
            (self.num_classes, self.num_classes), dtype=torch.int64, device=device
        )

    def reset(self) -> None:
        self.mat = None if self.mat is None else torch.zeros_like(self.mat)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Adds a batch.

        Args:
            pred: class indices ``(B, *spatial)`` (integer), or logits / probabilities ``(B, K, *spatial)``
                (floating; argmax over dim 1).
            target: ``(B, *spatial)`` integer labels in ``[0, K)`` or ``ignore_index``.

        Raises:
            ValueError: shape mismatch, wrong number of classes in the logits, or prediction / target
                values outside ``[0, K)`` (other than ``ignore_index`` in the target).
        """
        K = self.num_classes
        if pred.is_floating_point():
            if pred.dim() != target.dim() + 1 or pred.shape[1] != K:
                raise ValueError(
                    "ConfusionMatrix.update: logits must be (B, %d, *spatial) for target %s, got %s"
                    % (K, tuple(target.shape), tuple(pred.shape))
                )
            pred = pred.argmax(1)
        if pred.shape != target.shape:
            raise ValueError(
                "ConfusionMatrix.update: pred %s and target %s shapes differ" % (tuple(pred.shape), tuple(target.shape))
            )
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError("ConfusionMatrix.update: pred / target must be integer class indices")
        p = pred.reshape(-1).long()
        t = target.reshape(-1).long().to(p.device)
        if self.ignore_index is not None:
            keep = t != self.ignore_index
            p, t = p[keep], t[keep]
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= K):
            raise ValueError(
                "ConfusionMatrix.update: target labels must be in [0, %d) or ignore_index=%r, got values in [%d, %d]"
                % (K, self.ignore_index, int(t.min()), int(t.max()))
            )
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= K):
            raise ValueError(
                "ConfusionMatrix.update: predicted classes must be in [0, %d), got values in [%d, %d]"
                % (K, int(p.min()), int(p.max()))
            )
        counts = torch.bincount(t * K + p, minlength=K * K).reshape(K, K)
        if self.mat is None:
            self.mat = torch.zeros((K, K), dtype=torch.int64, device=counts.device)
        self.mat += counts.to(self.mat.device)

    def all_reduce(self) -> None:
        """Sums the matrix over all ranks of the default process group (no-op without DDP)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            if self.mat is None:
                self.mat = torch.zeros((self.num_classes,) * 2, dtype=torch.int64)
            dev = self.mat.device
            if dist.get_backend() == "nccl" and dev.type != "cuda":
                buf = self.mat.cuda()
                dist.all_reduce(buf)
                self.mat = buf.to(dev)
            else:
                dist.all_reduce(self.mat)

    def compute(self, sync: bool = False) -> Dict[str, object]:
        """Returns ``iou`` (K,), ``acc`` (K,), ``present`` (K,) bool, ``miou``, ``pixel_acc``, ``mean_acc``
        (Python floats in [0, 1]; NaN when nothing was counted) and the ``matrix``. ``sync=True`` first
        all-reduces across DDP ranks (every rank must call it)."""
        if sync:
            self.all_reduce()
        K = self.num_classes
        m = self.mat if self.mat is not None else torch.zeros((K, K), dtype=torch.int64)
        m64 = m.double().cpu()
        tp = m64.diag()
        gt = m64.sum(1)
        pr = m64.sum(0)
        union = gt + pr - tp
        present = union > 0
        iou = torch.where(present, tp / union.clamp_min(1), torch.zeros_like(tp))
        acc = torch.where(gt > 0, tp / gt.clamp_min(1), torch.zeros_like(tp))
        total = m64.sum()
        n_present = int(present.sum())
        nan = float("nan")
        return {
            "iou": iou,
            "acc": acc,
            "present": present,
            "miou": float(iou[present].sum() / n_present) if n_present else nan,
            "pixel_acc": float(tp.sum() / total) if total > 0 else nan,
            "mean_acc": float(acc[present].sum() / n_present) if n_present else nan,
            "matrix": m.cpu().clone(),
        }


def format_iou_table(result: Dict[str, object], class_names: Optional[Sequence[str]] = None) -> str:
    """A plain-text table of per-class IoU and the summary metrics (percent)."""
    iou = result["iou"]
    present = result["present"]
    assert isinstance(iou, Tensor) and isinstance(present, Tensor)
    names = list(class_names) if class_names is not None else [str(i) for i in range(iou.numel())]
    w = max(8, max(len(n) for n in names))
    lines = ["%-*s  %7s" % (w, "class", "IoU %")]
    for i, n in enumerate(names):
        lines.append("%-*s  %7s" % (w, n, "%.2f" % (100 * float(iou[i])) if bool(present[i]) else "absent"))
    for k in ("miou", "pixel_acc", "mean_acc"):
        lines.append("%-*s  %7.2f" % (w, k, 100 * float(result[k])))  # type: ignore[arg-type]
    return "\n".join(lines)
