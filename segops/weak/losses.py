"""The training-loss grammar ``{ce|pce}[+crf][+ncut][+entropy]`` and the composed regularized loss.

A loss is a data term on the labelled pixels plus any of three regularizers on the softmax of the logits
(Tang et al., ECCV'18 "On regularized losses for weakly-supervised CNN segmentation"):

* ``ce``: cross-entropy on every labelled pixel (full masks; 255 = void is skipped);
* ``pce``: partial cross-entropy, the same sum over the labelled pixels only (scribbles, clicks, seeds), fused;
* ``crf``: the dense CRF loss ``-(w / B) sum_k S_k^T W S_k`` with a bilateral Gaussian ``W``;
* ``ncut``: the normalized-cut loss ``(w / B) sum_k S_k^T W (1 - S_k) / (d^T S_k)``;
* ``entropy``: the mean pointwise Shannon entropy of the softmax, times its weight.

``parse_loss`` reads a loss name into a :class:`LossSpec` (terms may come in any order after the data term,
each at most once; :attr:`LossSpec.name` is the canonical spelling); :class:`RegularizedLoss` sums the terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LOSS_GRAMMAR", "REGULARIZERS", "LossSpec", "parse_loss", "loss_choice", "RegularizedLoss"]

#: what ``--loss`` accepts, as shown in error messages and ``--help``.
LOSS_GRAMMAR = "{ce|pce}[+crf][+ncut][+entropy]"
#: the regularizer terms, in their canonical order.
REGULARIZERS: Tuple[str, ...] = ("crf", "ncut", "entropy")
_BASES = ("ce", "pce")
_EXAMPLES = "e.g. pce, pce+crf, pce+entropy, pce+crf+entropy, ce+ncut"


@dataclass(frozen=True)
class LossSpec:
    """A parsed loss: the data term (``"ce"`` or ``"pce"``) and which regularizers are on."""

    base: str
    crf: bool = False
    ncut: bool = False
    entropy: bool = False

    @property
    def regularizers(self) -> Tuple[str, ...]:
        """The regularizers that are on, in canonical order."""
        return tuple(r for r in REGULARIZERS if getattr(self, r))

    @property
    def name(self) -> str:
        """The canonical spelling, e.g. ``"pce+crf+entropy"``."""
        return "+".join((self.base,) + self.regularizers)

    @property
    def terms(self) -> Tuple[str, ...]:
        """Every term, the data term first (the names the trainer logs)."""
        return (self.base,) + self.regularizers


def _error(text: object, why: str) -> ValueError:
    return ValueError("loss %r: %s; the grammar is %s (%s)" % (text, why, LOSS_GRAMMAR, _EXAMPLES))


def parse_loss(text: str) -> LossSpec:
    """Parses ``{ce|pce}[+crf][+ncut][+entropy]`` (case-sensitive, no spaces).

    Raises ``ValueError`` showing the grammar when ``text`` is not a string, is empty, does not start with a
    data term, names an unknown term, repeats a term or has an empty term (``"pce++crf"``).
    """
    if not isinstance(text, str):
        raise _error(text, "expected a string")
    if not text:
        raise _error(text, "empty loss")
    parts = text.split("+")
    if any(p == "" for p in parts):
        raise _error(text, "empty term (a leading, trailing or doubled '+')")
    base, rest = parts[0], parts[1:]
    if base not in _BASES:
        if base in REGULARIZERS:
            raise _error(text, "it must start with the data term ce or pce, got regularizer %r first" % base)
        raise _error(text, "unknown data term %r (expected ce or pce)" % base)
    seen = set()
    for p in rest:
        if p in _BASES:
            raise _error(text, "a second data term %r (only one of ce, pce)" % p)
        if p not in REGULARIZERS:
            raise _error(text, "unknown term %r (regularizers: %s)" % (p, ", ".join(REGULARIZERS)))
        if p in seen:
            raise _error(text, "term %r given twice" % p)
        seen.add(p)
    return LossSpec(base, *(r in seen for r in REGULARIZERS))


def loss_choice(text: str) -> str:
    """``argparse`` type for ``--loss``: the canonical name, or an ``ArgumentTypeError`` with the grammar."""
    import argparse

    try:
        return parse_loss(text).name
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class RegularizedLoss(nn.Module):
    """The training loss named by ``cfg.loss``: ``ce`` / ``pce`` on the target plus the dense CRF, normalized
    cut and entropy regularizers on the softmax of the logits over the unpadded region (``roi``).

    ``cfg`` is any object with the :class:`segops.train.TrainConfig` attributes ``loss``, ``crf_weight``,
    ``crf_sigma_rgb``, ``crf_sigma_xy``, ``crf_scale``, ``ncut_weight`` and ``entropy_weight``; the CRF and
    normalized-cut terms carry their weight inside their modules, the entropy term is multiplied by
    ``entropy_weight``. ``crf_cls`` / ``ncut_cls`` replace ``segops.nn.DenseCRFLoss`` / ``NormalizedCutLoss``
    (same constructor and call).

    ``forward(logits (B, K, H, W), target (B, H, W) int64 with 255 = unlabelled, images (B, 3, H, W) 0..255,
    roi (B, H, W) or None)`` returns ``(total, terms)`` with ``terms`` a dict of detached per-term values
    (``ce``/``pce``, ``crf``, ``ncut``, ``entropy``; the regularizers already weighted).
    """

    def __init__(self, cfg, crf_cls=None, ncut_cls=None) -> None:
        super().__init__()
        import segops.nn as snn

        self.spec = parse_loss(cfg.loss)
        self.kind = self.spec.name
        self.ce_name = self.spec.base
        if self.ce_name == "pce":
            self.pce = snn.PartialCrossEntropyLoss(ignore_index=255)
        self.crf: Optional[nn.Module] = None
        self.ncut: Optional[nn.Module] = None
        self.entropy: Optional[nn.Module] = None
        self.entropy_weight = float(cfg.entropy_weight)
        if self.spec.crf:
            cls = crf_cls or getattr(snn, "DenseCRFLoss", None)
            if cls is None:
                raise RuntimeError("--loss %s needs segops.nn.DenseCRFLoss, which this build lacks" % self.kind)
            self.crf = cls(cfg.crf_weight, cfg.crf_sigma_rgb, cfg.crf_sigma_xy, cfg.crf_scale)
        if self.spec.ncut:
            cls = ncut_cls or getattr(snn, "NormalizedCutLoss", None)
            if cls is None:
                raise RuntimeError("--loss %s needs segops.nn.NormalizedCutLoss, which this build lacks" % self.kind)
            self.ncut = cls(cfg.ncut_weight, cfg.crf_sigma_rgb, cfg.crf_sigma_xy, cfg.crf_scale)
        if self.spec.entropy:
            self.entropy = snn.EntropyLoss()

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
