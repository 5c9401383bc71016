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

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LOSS_GRAMMAR", "REGULARIZERS", "LossSpec", "parse_loss", "loss_choice", "RegularizedLoss", "expand_loss",
    "sec_decay", "SEC_FG_DECAY", "SEC_BG_DECAY", "crf_schedule",
]

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

    With ``cfg.supervision == "tags"`` and ``cfg.expand_weight > 0`` the total also has SEC's expand term
    ``expand_weight * expand_loss(logits, tags, roi, expand_fg_decay, expand_bg_decay)`` (:func:`expand_loss`;
    a decay of ``None`` is SEC's, carried over to the size of the logits), which needs each image's tags.

    :attr:`crf_factor` (default 1) multiplies the CRF term: the trainer sets it before every step from
    ``cfg.crf_start_epoch`` and ``cfg.crf_ramp_epochs`` (:func:`crf_schedule`). At 0 the CRF term is not computed
    and is logged as 0.

    ``forward(logits (B, K, H, W), target (B, H, W) int64 with 255 = unlabelled, images (B, 3, H, W) 0..255,
    roi (B, H, W) or None, tags (B, K) or None)`` returns ``(total, terms)`` with ``terms`` a dict of detached
    per-term values (``ce``/``pce``, ``crf``, ``ncut``, ``entropy``, ``expand``; the regularizers already weighted).
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
        self.expand_weight = float(getattr(cfg, "expand_weight", 0.0)) if getattr(cfg, "supervision", None) == "tags" else 0.0
        self.expand_decays = (getattr(cfg, "expand_fg_decay", None), getattr(cfg, "expand_bg_decay", None))
        self.crf_factor = 1.0

    def forward(
        self, logits: Tensor, target: Tensor, images: Tensor, roi: Optional[Tensor], tags: Optional[Tensor] = None
    ) -> Tuple[Tensor, Dict[str, float]]:
        logits = logits.float()  # the regularizers and the CE run in float32 under AMP
        terms: Dict[str, float] = {}
        if self.ce_name == "pce":
            total = self.pce(logits, target)
        else:
            total = F.cross_entropy(logits, target, ignore_index=255)
        terms[self.ce_name] = float(total.detach())
        crf_on = self.crf is not None and self.crf_factor > 0
        if self.crf is not None and not crf_on:
            terms["crf"] = 0.0
        if crf_on or self.ncut is not None:
            probs = logits.softmax(1)
            roi_f = None if roi is None else roi.float()
            if crf_on:
                t = self.crf(images.float(), probs, roi_f)  # type: ignore[misc]
                if self.crf_factor != 1.0:
                    t = self.crf_factor * t
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
        if self.expand_weight > 0:
            if tags is None:
                raise ValueError("RegularizedLoss: the expand term (--supervision tags, --expand-weight %g) needs the "
                                 "images' tags, got tags=None" % self.expand_weight)
            t = self.expand_weight * expand_loss(logits, tags, roi, *self.expand_decays)
            terms["expand"] = float(t.detach())
            total = total + t
        return total, terms


def crf_schedule(step: int, steps_per_epoch: int, start_epoch: float = 0.0, ramp_epochs: float = 0.0) -> float:
    """The factor on the CRF loss's weight at optimizer step ``step`` (0-based): 0 for the first ``start_epoch``
    epochs (the data term alone, as when Tang et al. fine-tune a pCE model with the CRF loss), then rising linearly
    over ``ramp_epochs`` epochs to 1, where it stays. With ``ramp_epochs`` 0 the full weight starts at once.

    The step ``start_epoch * steps_per_epoch + i`` (``i >= 0``) gets ``min(1, (i + 1) / (ramp_epochs *
    steps_per_epoch))``: the first step of the ramp carries a small weight, its last step the full one.
    """
    if int(steps_per_epoch) < 1:
        raise ValueError("crf_schedule: steps_per_epoch must be >= 1, got %r" % (steps_per_epoch,))
    for name, v in (("start_epoch", start_epoch), ("ramp_epochs", ramp_epochs)):
        if not (math.isfinite(float(v)) and float(v) >= 0):
            raise ValueError("crf_schedule: %s must be a finite number >= 0, got %r" % (name, v))
    i = int(step) - float(start_epoch) * int(steps_per_epoch)
    if i < 0:
        return 0.0
    ramp_steps = float(ramp_epochs) * int(steps_per_epoch)
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, (i + 1) / ramp_steps)


# ----------------------------------------------------------------------------------------------- expand (SEC)

#: SEC's decay parameters (Kolesnikov & Lampert, ECCV'16), chosen there for 41 x 41 score maps.
SEC_FG_DECAY = 0.996
SEC_BG_DECAY = 0.999
SEC_MAP_PIXELS = 41 * 41


def sec_decay(decay: float, pixels: int) -> float:
    """SEC's decay ``decay`` (for a 41 x 41 map) carried over to a map of ``pixels`` pixels: ``decay ** (1681 /
    pixels)``. The weight of the pixel of rank ``j`` is ``d ** j``; with this ``d`` the pixel at a given fraction
    ``q`` of the image (rank ``q * pixels``) gets the same weight ``decay ** (1681 q)`` as in SEC, so the loss asks
    each class to cover the same share of the image whatever the resolution."""
    if not 0.0 < float(decay) <= 1.0:
        raise ValueError("sec_decay: decay must be in (0, 1], got %r" % (decay,))
    if int(pixels) < 1:
        raise ValueError("sec_decay: pixels must be >= 1, got %r" % (pixels,))
    return float(decay) ** (SEC_MAP_PIXELS / int(pixels))


def _check_decay(name: str, d: Optional[float], pixels: int, sec: float) -> float:
    if d is None:
        return sec_decay(sec, pixels)
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < float(d) <= 1.0:
        raise ValueError("expand_loss: %s must be a number in (0, 1], got %r" % (name, d))
    return float(d)


def expand_loss(
    logits: Tensor,
    tags: Tensor,
    roi: Optional[Tensor] = None,
    fg_decay: Optional[float] = None,
    bg_decay: Optional[float] = None,
) -> Tensor:
    """SEC's "expand" loss (Kolesnikov & Lampert, ECCV'16 "Seed, expand and constrain"), mean over the batch.

    For one image with softmax probabilities ``P = softmax(logits)`` over ``K`` classes (class 0 = background)
    and the set ``T`` of its foreground tags, the global weighted rank pooling of class ``c`` with decay ``d`` is

    ``G_c(d) = sum_j d^j P_c[j] / sum_j d^j``, ``P_c[0] >= P_c[1] >= ...`` the class's probabilities sorted
    over the image's pixels (descending), ``j = 0 .. n-1``;

    ``d = 1`` is the mean (global average pooling), ``d -> 0`` the maximum. The loss is

    ``- 1/|T| sum_{c in T} log G_c(fg_decay) - 1/|A| sum_{c in A} log(1 - max_xy P_c) - log G_0(bg_decay)``

    with ``A`` the absent foreground classes (a term whose set is empty is 0). The first term makes every
    tagged class cover a share of the image set by ``fg_decay``, the second keeps absent classes out
    everywhere, the third does the same for the background (always present). Everything is computed from
    the log-softmax: ``log G_c`` is a log-sum-exp over the sorted log-probabilities and ``log(1 - P_c)`` is
    ``logsumexp_{k != c} f_k - logsumexp_k f_k`` at the pixel where ``P_c`` is largest, so neither term
    saturates to ``log 0`` in floating point.

    Args:
        logits: ``(B, K, H, W)`` floating point scores, ``K >= 2``.
        tags: ``(B, K)`` (column 0, the background, is ignored: it is always present) or ``(B, K - 1)``
            presence of each foreground class, 0/1 (bool, integer or floating point).
        roi: ``(B, H, W)`` or ``None``: the pixels that count (> 0.5; padding excluded). An image without any
            pixel in its ROI contributes 0, with zero gradient.
        fg_decay / bg_decay: the decays in ``(0, 1]``; ``None`` takes SEC's 0.996 / 0.999 (for 41 x 41 maps)
            carried over to ``H * W`` pixels by :func:`sec_decay`.

    Returns a scalar tensor (the mean of the per-image losses over the ``B`` images), differentiable in
    ``logits``. ``ValueError`` names the argument that is wrong: shapes, dtypes, devices, tags other than
    0/1, NaN/Inf logits, decays outside ``(0, 1]``.
    """
    if not isinstance(logits, Tensor) or logits.dim() != 4 or not logits.is_floating_point():
        raise ValueError("expand_loss: logits must be a floating point (B, K, H, W) tensor, got %s"
                         % (_describe(logits),))
    B, K, H, W = logits.shape
    if K < 2:
        raise ValueError("expand_loss: logits need K >= 2 classes (background and a foreground class), got K = %d" % K)
    if not isinstance(tags, Tensor) or tags.dim() != 2 or tags.shape[0] != B or tags.shape[1] not in (K, K - 1):
        raise ValueError("expand_loss: tags must be (B, K) = (%d, %d) or (B, K - 1) = (%d, %d), got %s"
                         % (B, K, B, K - 1, _describe(tags)))
    if tags.is_complex():
        raise ValueError("expand_loss: tags must be bool, integer or real, got %s" % (tags.dtype,))
    if tags.device != logits.device:
        raise ValueError("expand_loss: tags are on %s but logits on %s" % (tags.device, logits.device))
    if roi is not None:
        if not isinstance(roi, Tensor) or tuple(roi.shape) != (B, H, W):
            raise ValueError("expand_loss: roi must be None or (B, H, W) = (%d, %d, %d), got %s" % (B, H, W, _describe(roi)))
        if roi.device != logits.device:
            raise ValueError("expand_loss: roi is on %s but logits on %s" % (roi.device, logits.device))
    N = H * W
    dfg = _check_decay("fg_decay", fg_decay, max(N, 1), SEC_FG_DECAY)
    dbg = _check_decay("bg_decay", bg_decay, max(N, 1), SEC_BG_DECAY)
    fg_tags = tags[:, 1:] if tags.shape[1] == K else tags
    # one read-back for both value checks
    bad_tags = ((fg_tags != 0) & (fg_tags != 1)).any()
    bad_logits = ~torch.isfinite(logits).all()
    flags = torch.stack([bad_tags, bad_logits]).tolist()
    if flags[0]:
        raise ValueError("expand_loss: tags must be 0 or 1, got the values %s" % (torch.unique(fg_tags).tolist(),))
    if flags[1]:
        raise ValueError("expand_loss: logits contain NaN or Inf")
    if B == 0 or N == 0:
        return logits.sum() * 0.0  # nothing to pool: loss 0, zero gradient

    present = fg_tags.to(torch.bool)  # (B, K - 1)
    valid = torch.ones((B, N), dtype=torch.bool, device=logits.device) if roi is None else (roi.reshape(B, N) > 0.5)
    counts = valid.sum(1)  # (B,)
    has_pixels = counts > 0
    # an image with an empty ROI is computed on all of its pixels (finite values) and then weighted 0
    valid = valid | ~has_pixels[:, None]
    counts = valid.sum(1)

    work = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    flat = work.reshape(B, K, N)
    logp = flat.log_softmax(1)  # (B, K, N)
    neg_inf = torch.tensor(float("-inf"), dtype=logp.dtype, device=logp.device)
    logp_roi = torch.where(valid[:, None, :], logp, neg_inf)

    # global weighted rank pooling, in log space: log G_c = logsumexp_j (s_j + j log d_c) - log sum_{j<n} d_c^j;
    # pixels outside the ROI sort last with log-probability -inf and add nothing
    ranked = logp_roi.sort(-1, descending=True).values  # (B, K, N)
    j = torch.arange(N, dtype=torch.float64, device=logp.device)
    decay = torch.tensor([dbg] + [dfg] * (K - 1), dtype=torch.float64, device=logp.device)  # (K,)
    log_w = j[None, :] * torch.log(decay)[:, None]  # (K, N), float64: d^j underflows for large j otherwise
    norm = torch.logcumsumexp(log_w, 1)  # (K, N): log sum_{j <= i} d^j
    log_norm = norm[:, counts - 1].T  # (B, K): the normaliser over each image's own ROI pixels
    log_g = torch.logsumexp(ranked + log_w.to(logp.dtype)[None], -1) - log_norm.to(logp.dtype)  # (B, K)

    # absent classes: log(1 - max_xy P_c) at the pixel where P_c is largest, as logsumexp_{k != c} - logsumexp_k
    peak = logp_roi.detach().argmax(-1)  # (B, K): the pixel of each class's maximum
    at_peak = flat.gather(2, peak[:, None, :].expand(B, K, K)).transpose(1, 2)  # [b, c, k] = f_k at c's peak
    others = at_peak.masked_fill(torch.eye(K, dtype=torch.bool, device=logp.device)[None], float("-inf"))
    log_not_c = torch.logsumexp(others, -1) - torch.logsumexp(at_peak, -1)  # (B, K): log(1 - max P_c)

    fg = present.to(logp.dtype)
    absent = 1.0 - fg
    seed_term = -(log_g[:, 1:] * fg).sum(1) / fg.sum(1).clamp_min(1.0)
    absent_term = -(log_not_c[:, 1:] * absent).sum(1) / absent.sum(1).clamp_min(1.0)
    bg_term = -log_g[:, 0]
    per_image = (seed_term + absent_term + bg_term) * has_pixels.to(logp.dtype)
    return per_image.mean().to(logits.dtype)


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return "a %s tensor of shape %s" % (x.dtype, tuple(x.shape))
    return "a %s" % type(x).__name__
