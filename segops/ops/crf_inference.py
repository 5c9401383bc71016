"""Mean-field inference in the fully connected CRF (Kraehenbuehl & Koltun, NIPS'11): DeepLab's post-processing.

The energy of a labelling x of N pixels with K labels is ``E(x) = sum_i U_i(x_i) + sum_m sum_{i != j}
mu_m(x_i, x_j) k_m(f_i, f_j)`` with Gaussian kernels ``k_m`` on per-pixel features (positions, colours) and
label compatibilities ``mu_m``. Mean-field inference approximates the posterior by independent marginals
``Q (B, K, N)``; with pydensecrf's (densecrf 2's) conventions it iterates::

    Q = softmax(-U)
    repeat: Q = softmax(-U - sum_m compat_m(filter_m(Q)))

where ``filter_m`` is the kernel applied on the permutohedral lattice of its features (built once per call and
reused for every iteration; all K channels in one splat / blur / slice pass), scaled by the kernel's
normalisation mode, and ``compat_m`` is pydensecrf's compatibility: a number ``w`` (Potts) gives ``-w x``, a
``(K,)`` vector ``v`` gives ``v * x`` and a ``(K, K)`` matrix ``M`` gives ``((M + M^T) / 2) x``. So a Potts weight
``w`` is the matrix ``-w I`` (pydensecrf's sign convention, kept so that ported settings mean the same).

Everything is differentiable in the unary and in compatibility tensors (CRF-as-RNN, Zheng et al. ICCV'15):
the filter's gradient is the adjoint lattice pass ``W^T`` on the saved lattice; features (positions,
colours) get no gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Number
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from segops.ops._checks import check_same_device
from segops.ops.lattice import build_lattice

__all__ = [
    "dense_crf_inference",
    "MeanFieldCRF",
    "CRFKernel",
    "unary_from_softmax",
    "unary_from_labels",
    "crf_mean_field_update",
    "NORMALIZATIONS",
]

# pydensecrf's NormalizationType values (dcrf.NO_NORMALIZATION = 0, ..., dcrf.NORMALIZE_SYMMETRIC = 3), by name.
NORMALIZATIONS = ("none", "before", "after", "symmetric")
_NORMALIZATION_ALIASES = {
    "no_normalization": "none",
    "normalize_before": "before",
    "normalize_after": "after",
    "normalize_symmetric": "symmetric",
}
# the one-op schedule (_crf_mean_field_iterate) takes up to 64 classes and the codes above (their index)
_FUSED_MAX_CLASSES = 64


def _fused_cpu_is_fast() -> bool:
    """The one-op CPU schedule is written for AVX2 / AVX-512 (x86-64); elsewhere (or under
    ATEN_CPU_CAPABILITY=default) its portable build is slower than the separate ops, which run instead."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


Compat = Union[float, int, Tensor, Sequence[float], Sequence[Sequence[float]]]
Pair = Union[float, Tuple[float, float]]


@dataclass
class CRFKernel:
    """A user pairwise kernel ``compat * exp(-|f_i - f_j|^2 / 2)`` (pydensecrf's ``addPairwiseEnergy``).

    Attributes:
        features: ``(B, d, *spatial)`` or ``(1, d, *spatial)`` (shared by the batch) floating features,
            already divided by their bandwidths; ``1 <= d <= 16``.
        compat: Potts weight (number or 0-dim tensor), ``(K,)`` diagonal or ``(K, K)`` matrix compatibility.
        normalization: ``"symmetric"`` (pydensecrf's default), ``"before"``, ``"after"`` or ``"none"``, or
            pydensecrf's constants ``dcrf.NORMALIZE_SYMMETRIC`` (3) ... ``dcrf.NO_NORMALIZATION`` (0).
    """

    features: Tensor
    compat: Compat
    normalization: Union[str, int] = "symmetric"


def _normalization(value: Union[str, int], what: str = "normalization") -> str:
    if isinstance(value, bool):
        raise ValueError("%s must be one of %s (or pydensecrf's 0..3), got %r" % (what, NORMALIZATIONS, value))
    if isinstance(value, int):  # pydensecrf's enum (also matches IntEnum-like constants)
        if 0 <= value < len(NORMALIZATIONS):
            return NORMALIZATIONS[value]
    elif isinstance(value, str):
        v = value.lower()
        v = _NORMALIZATION_ALIASES.get(v, v)
        if v in NORMALIZATIONS:
            return v
    raise ValueError("%s must be one of %s (or pydensecrf's 0..3), got %r" % (what, NORMALIZATIONS, value))


def _positive(what: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, Number) or not (0 < float(v) < math.inf):  # type: ignore[arg-type]
        raise ValueError("%s must be a positive finite number, got %r" % (what, v))
    return float(v)  # type: ignore[arg-type]


def _bandwidths(what: str, v: object, n: int) -> List[float]:
    """A positive number, or a sequence of ``n`` positive numbers (per axis / per channel)."""
    if isinstance(v, (list, tuple)):
        if len(v) != n:
            raise ValueError("%s must be a number or %d numbers, got %r" % (what, n, v))
        return [_positive(what, x) for x in v]
    return [_positive(what, v)] * n


def _all_finite(t: Tensor) -> bool:
    """Whether every element is finite, with one reduction and one host read: a NaN or Inf makes the sum
    non-finite; only then (or when finite values overflow the sum) is each element checked."""
    if t.numel() == 0:
        return True
    t = t.detach()
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Marginals and lattices are computed in float64 for float64 unaries, else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- the fused update op -----------------------------------------------------------------------------------

MAX_TERMS = 8  # messages per crf_mean_field_update call (the Python layer folds any beyond that)


def crf_mean_field_update(unary: Tensor, messages: Sequence[Tensor], scales: Sequence[Optional[Tensor]],
                          weights: Sequence[float]) -> Tensor:
    """One mean-field update in one pass: ``softmax over dim 1 of (-unary + sum_j weights[j] * scales[j] *
    messages[j])``.

    Args:
        unary: ``(B, K, *spatial)`` float32 / float64 / float16 / bfloat16 energies.
        messages: up to 8 tensors shaped like ``unary`` (filtered marginals, or compatibilities applied to them).
        scales: one per message: ``(B, 1, *spatial)`` per-pixel factors (a kernel's normalisation) or None.
        weights: one finite number per message (a Potts weight; -1 subtracts a message as it is).

    Returns:
        The marginals, contiguous, ``unary``'s shape and dtype (half types accumulate in float32).
        Differentiable in every tensor argument.
    """
    fixed = [s if s is not None else unary.new_empty((0,)) for s in scales]
    return torch.ops.segops.crf_mean_field_update.default(unary, list(messages), fixed, [float(w) for w in weights])


@torch.library.register_fake("segops::crf_mean_field_update")
def _update_fake(unary, messages, scales, weights):
    torch._check(unary.dim() >= 2, lambda: "crf_mean_field_update: unary must have shape (B, K, *spatial)")
    torch._check(len(messages) == len(scales) == len(weights),
                 lambda: "crf_mean_field_update: messages, scales and weights must have the same length")
    torch._check(len(messages) <= MAX_TERMS, lambda: "crf_mean_field_update: at most 8 messages")
    for m in messages:
        torch._check(m.shape == unary.shape, lambda: "crf_mean_field_update: messages must have the unary's shape")
        check_same_device("crf_mean_field_update", "unary", unary, messages=m)
    for t in scales:
        check_same_device("crf_mean_field_update", "unary", unary, scales=t)
    return torch.empty_like(unary, memory_format=torch.contiguous_format)


@torch.library.register_fake("segops::_crf_mean_field_update_out")
def _update_out_fake(unary, messages, scales, weights, out):
    _update_fake(unary, messages, scales, weights)
    torch._check(out.shape == unary.shape, lambda: "crf_mean_field_update: out must have the unary's shape")


@torch.library.register_fake("segops::_crf_mean_field_update_backward")
def _update_backward_fake(grad, q):
    torch._check(grad.shape == q.shape, lambda: "_crf_mean_field_update_backward: grad must have q's shape")
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("segops::_crf_mean_field_iterate")
def _iterate_fake(unary, vertex, bary, neighbors, normalization, weights, iterations):
    torch._check(unary.dim() >= 3, lambda: "_crf_mean_field_iterate: unary must have shape (B, K, *spatial)")
    torch._check(1 <= len(vertex) <= MAX_TERMS, lambda: "_crf_mean_field_iterate: 1 to 8 kernels")
    torch._check(len(bary) == len(neighbors) == len(normalization) == len(weights) == len(vertex),
                 lambda: "_crf_mean_field_iterate: one entry per kernel in every list")
    torch._check(iterations >= 1, lambda: "_crf_mean_field_iterate: iterations must be >= 1")
    return torch.empty_like(unary, memory_format=torch.contiguous_format)


def _update_setup_context(ctx, inputs, output) -> None:
    _, messages, scales, weights = inputs
    ctx.n = len(messages)
    ctx.weights = list(weights)
    ctx.has_scale = [s.numel() > 0 for s in scales]
    # the messages are needed only for the scales' gradient (normalisation scales are constants in inference)
    ctx.scale_grad = any(s.requires_grad for s in scales)
    ctx.save_for_backward(output, *scales, *(messages if ctx.scale_grad else ()))


def _update_backward(ctx, grad: Tensor):
    q, *rest = ctx.saved_tensors
    scales, messages = rest[: ctx.n], rest[ctx.n:]
    gl = torch.ops.segops._crf_mean_field_update_backward.default(grad.contiguous(), q)
    grad_messages = [gl * (w * s) if has else gl * w for w, s, has in zip(ctx.weights, scales, ctx.has_scale)]
    grad_scales = [None] * ctx.n
    if ctx.scale_grad:
        grad_scales = [(gl * m).sum(1, keepdim=True) * w if has else None
                       for w, m, has in zip(ctx.weights, messages, ctx.has_scale)]
    # torch.library treats a non-empty list of floats as one leaf (gradient None), an empty one as an empty list
    return -gl, grad_messages, grad_scales, (None if ctx.n else [])


def _update_backward_setup_context(ctx, inputs, output) -> None:
    grad, q = inputs
    ctx.save_for_backward(grad, q)


def _update_backward_backward(ctx, c: Tensor):
    # gl_k = q_k (g_k - <g, q>): d/dg is the same map applied to c; d/dq_j = c_j (g_j - <g, q>) - g_j <c, q>
    grad, q = ctx.saved_tensors
    gg = torch.ops.segops._crf_mean_field_update_backward.default(c.contiguous(), q)
    gq = c * (grad - (grad * q).sum(1, keepdim=True)) - grad * (c * q).sum(1, keepdim=True)
    return gg, gq


torch.library.register_autograd("segops::crf_mean_field_update", _update_backward, setup_context=_update_setup_context)
torch.library.register_autograd("segops::_crf_mean_field_update_backward", _update_backward_backward,
                                setup_context=_update_backward_setup_context)


# ---- the lattice (one adapter over the lattice ops) --------------------------------------------------------


class _Lattice:
    """The permutohedral lattice of one kernel's features, built once; ``filter`` applies ``W`` to any values.

    ``features`` with batch 1 serve every image of a batch of B (the position-only kernel is the same for all
    images): the B K value channels are then filtered through the one lattice in a single pass.
    """

    def __init__(self, features: Tensor, dtype: torch.dtype) -> None:
        self._lattice = build_lattice(features.to(dtype))
        self.shared = features.shape[0] == 1

    @property
    def w1(self) -> Tensor:
        """``W 1``, ``(B or 1, 1, *spatial)``: the normalisation modes' degree vector (computed on first use;
        the one-op CPU schedule computes it itself)."""
        return self._lattice.norm()

    def filter(self, values: Tensor) -> Tensor:
        """``W values`` per image, ``values (B, C, *spatial)``; differentiable (the gradient is ``W^T grad``)."""
        shape = values.shape
        if self.shared and shape[0] != 1:
            values = values.reshape((1, shape[0] * shape[1]) + tuple(shape[2:]))
        return self._lattice.filter(values.contiguous()).reshape(shape)

    def tensors(self) -> Tuple[Tensor, Tensor, Tensor]:
        """``(vertex, bary, neighbors)`` of the built lattice (batch 1 when shared by the images)."""
        return self._lattice.tensors()


# ---- compatibilities and kernels ---------------------------------------------------------------------------


def _compat(what: str, compat: Compat, K: int, dtype: torch.dtype, device: torch.device) -> Tuple[str, object]:
    """(kind, value): ("off", None) for a Potts weight 0, ("potts", float or 0-dim tensor), ("diag", (K,) tensor)
    or ("matrix", symmetrised (K, K) tensor)."""
    if isinstance(compat, bool):
        raise TypeError("%s must be a number, a (K,) vector or a (K, K) matrix, got %r" % (what, compat))
    if isinstance(compat, Number):
        w = float(compat)  # type: ignore[arg-type]
        if not math.isfinite(w):
            raise ValueError("%s must be finite, got %r" % (what, compat))
        return ("off", None) if w == 0.0 else ("potts", w)
    try:
        t = torch.as_tensor(compat)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError("%s must be a number, a (K,) vector or a (K, K) matrix, got %r" % (what, compat)) from e
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise TypeError("%s must be real-valued, got dtype %s" % (what, t.dtype))
    if t.device != device and t.device.type != "cpu":
        raise ValueError("%s is on %s but the unary is on %s" % (what, t.device, device))
    t = t.to(device=device, dtype=dtype)
    if not _all_finite(t):
        raise ValueError("%s contains NaN or Inf" % what)
    if t.dim() == 0:
        return "potts", t
    if t.dim() == 1 and t.shape[0] == K:
        return "diag", t
    if t.dim() == 2 and tuple(t.shape) == (K, K):
        return "matrix", 0.5 * (t + t.t())  # pydensecrf symmetrises the matrix
    raise ValueError("%s must be a number, a (K,) = (%d,) vector or a (K, K) = (%d, %d) matrix, got shape %s"
                     % (what, K, K, K, tuple(t.shape)))


class _Kernel:
    """One pairwise term: its lattice, normalisation scales and compatibility (pydensecrf's PairwisePotential)."""

    def __init__(self, lattice: _Lattice, normalization: str, kind: str, compat: object, batch: int) -> None:
        self.lattice = lattice
        self.normalization = normalization
        self.kind = kind
        self.compat = compat
        self.batch = batch
        self._scales: Optional[Tuple[Optional[Tensor], Optional[Tensor]]] = None

    def _pre_post(self) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """(pre, post): pydensecrf's DenseKernel norm = 1 / (W 1 + 1e-20) (its square root for "symmetric"),
        per pixel, applied before / after filtering (None: not applied). Computed on first use."""
        if self._scales is None:
            pre = post = None
            if self.normalization != "none":
                # a lattice shared by the batch has one W 1 for all images: per image for the fused update
                w1 = self.lattice.w1
                w1 = w1.expand((self.batch,) + tuple(w1.shape[1:])).contiguous()
                if self.normalization == "symmetric":
                    pre = post = torch.rsqrt(w1 + 1e-20)
                elif self.normalization == "before":
                    pre = 1.0 / (w1 + 1e-20)
                else:
                    post = 1.0 / (w1 + 1e-20)
            self._scales = (pre, post)
        return self._scales

    @property
    def pre(self) -> Optional[Tensor]:
        """Multiplies the values before filtering, per pixel (or None)."""
        return self._pre_post()[0]

    @property
    def post(self) -> Optional[Tensor]:
        """Multiplies the filtered values, per pixel (or None)."""
        return self._pre_post()[1]

    def filtered(self, q: Tensor) -> Tensor:
        """The kernel applied to the marginals, normalisation included: ``post * W (pre * q)``."""
        x = self.lattice.filter(q if self.pre is None else q * self.pre)
        return x if self.post is None else x * self.post

    def message(self, q: Tensor) -> Tensor:
        """pydensecrf's ``PairwisePotential::apply``: the compatibility applied to the filtered marginals;
        the update subtracts it from the logits."""
        x = self.filtered(q)
        if self.kind == "potts":
            return x * (-self.compat)  # type: ignore[operator]
        if self.kind == "diag":
            return x * self.compat.view((1, -1) + (1,) * (x.dim() - 2))  # type: ignore[union-attr]
        return torch.einsum("kl,bl...->bk...", self.compat, x)  # type: ignore[arg-type]


# ---- the inference object ------------------------------------------------------------------------------------


class MeanFieldCRF:
    """A batch of fully connected CRFs, built the way pydensecrf's ``DenseCRF2D`` is, for line-by-line ports.

    ``MeanFieldCRF(unary)`` is ``DenseCRF2D(W, H, K)`` + ``setUnaryEnergy(U)`` for B images at once; then
    ``add_pairwise_gaussian`` / ``add_pairwise_bilateral`` / ``add_pairwise_energy`` (each builds its lattice
    once, here) and ``inference(n)``, ``start_inference()`` / ``step_inference(Q)``, ``kl_divergence(Q)``.

    Args:
        unary: ``(B, K, H, W)`` (or ``(B, K, N)`` for :meth:`add_pairwise_energy` only) energies ``-log p``,
            finite; float32 / float64 (float16 / bfloat16 are computed in float32). Differentiable.
    """

    def __init__(self, unary: Tensor) -> None:
        if not isinstance(unary, Tensor):
            raise TypeError("unary must be a torch.Tensor, got %s" % type(unary).__name__)
        if unary.dim() not in (3, 4):
            raise ValueError("unary must be (B, K, H, W) or (B, K, N) energies, got shape %s" % (tuple(unary.shape),))
        if not unary.is_floating_point():
            raise TypeError("unary must be floating point (energies -log p), got %s" % unary.dtype)
        if unary.shape[1] < 1:
            raise ValueError("unary must have K >= 1 labels, got shape %s" % (tuple(unary.shape),))
        if not _all_finite(unary):
            raise ValueError("unary contains NaN or Inf (energies are -log p: clip p, e.g. unary_from_softmax)")
        self.out_dtype = unary.dtype
        self.dtype = _acc_dtype(unary.dtype)
        self.unary = unary.to(self.dtype)
        self.device = unary.device
        self.kernels: List[_Kernel] = []

    @property
    def _empty(self) -> bool:
        return self.unary.numel() == 0

    def _spatial(self, what: str) -> Tuple[int, int, int]:
        if self.unary.dim() != 4:
            raise ValueError("%s needs a (B, K, H, W) unary, got shape %s" % (what, tuple(self.unary.shape)))
        B, _, H, W = self.unary.shape
        return B, H, W

    def _add(self, features: Tensor, compat: Compat, normalization: Union[str, int], what: str) -> None:
        kind, value = _compat("%s: compat" % what, compat, self.unary.shape[1], self.dtype, self.device)
        norm = _normalization(normalization, "%s: normalization" % what)
        if kind == "off" or self._empty:
            return  # a Potts weight of 0 adds nothing: no lattice is built
        self.kernels.append(_Kernel(_Lattice(features, self.dtype), norm, kind, value, self.unary.shape[0]))

    def _positions(self, sxy: List[float], out: Optional[Tensor] = None) -> Tensor:
        """``(1, 2, H, W)``: (column / sx, row / sy), 0-based, as pydensecrf's features; written into ``out``
        ``(B, >= 2, H, W)`` (its first two channels) when given."""
        _, H, W = self._spatial("add_pairwise_gaussian")
        if out is None:
            out = torch.empty((1, 2, H, W), device=self.device, dtype=self.dtype)
        out[:, 0] = torch.arange(W, device=self.device, dtype=self.dtype).div_(sxy[0]).view(1, W)
        out[:, 1] = torch.arange(H, device=self.device, dtype=self.dtype).div_(sxy[1]).view(H, 1)
        return out

    def add_pairwise_gaussian(self, sxy: Pair, compat: Compat, normalization: Union[str, int] = "symmetric") -> None:
        """The smoothness kernel ``compat * exp(-|p_i - p_j|^2 / (2 sxy^2))`` on pixel positions p.

        ``sxy``: pixels, a number or ``(sx, sy)``. The lattice is built once for the whole batch (positions
        are the same in every image).
        """
        s = _bandwidths("add_pairwise_gaussian: sxy", sxy, 2)
        self._spatial("add_pairwise_gaussian")
        self._add(self._positions(s), compat, normalization, "add_pairwise_gaussian")

    def add_pairwise_bilateral(self, sxy: Pair, srgb: Union[float, Sequence[float]], images: Tensor, compat: Compat,
                               normalization: Union[str, int] = "symmetric") -> None:
        """The appearance kernel ``compat * exp(-|p_i - p_j|^2 / (2 sxy^2) - |I_i - I_j|^2 / (2 srgb^2))``.

        Args:
            sxy: pixels, a number or ``(sx, sy)``.
            srgb: colour units, a number or one per image channel.
            images: ``(B, C, H, W)`` uint8 or floating, RGB in 0..255 (any C in 1..14; ``d = 2 + C``). The
                range is not checked; other ranges change the meaning of ``srgb``.
        """
        B, H, W = self._spatial("add_pairwise_bilateral")
        if not isinstance(images, Tensor):
            raise TypeError("add_pairwise_bilateral: images must be a torch.Tensor, got %s" % type(images).__name__)
        if images.dim() != 4 or images.shape[0] != B or tuple(images.shape[2:]) != (H, W):
            raise ValueError("add_pairwise_bilateral: images must be (B, C, H, W) = (%d, C, %d, %d) like the unary, "
                             "got shape %s" % (B, H, W, tuple(images.shape)))
        C = images.shape[1]
        if not 1 <= C <= 14:
            raise ValueError("add_pairwise_bilateral: images must have 1..14 channels (d = 2 + C <= 16), got %d" % C)
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise TypeError("add_pairwise_bilateral: images must be uint8 or floating point, got %s" % images.dtype)
        if images.device != self.device:
            raise ValueError("add_pairwise_bilateral: images are on %s but the unary is on %s"
                             % (images.device, self.device))
        s = _bandwidths("add_pairwise_bilateral: sxy", sxy, 2)
        srgb_ = _bandwidths("add_pairwise_bilateral: srgb", srgb, C)
        if images.is_floating_point() and not _all_finite(images):
            raise ValueError("add_pairwise_bilateral: images contain NaN or Inf")
        # Written in place instead of stacked and concatenated copies (at 512² their ops took 2.7 ms under
        # torch.profiler, these 0.4 ms). The colours are converted to the CRF's dtype before the division, as
        # pydensecrf divides float32 values.
        feats = torch.empty((B, 2 + C, H, W), dtype=self.dtype, device=self.device)
        self._positions(s, out=feats)
        colours = feats[:, 2:]
        colours.copy_(images)
        colours.div_(torch.tensor(srgb_, dtype=self.dtype, device=self.device).view(1, C, 1, 1))
        self._add(feats, compat, normalization, "add_pairwise_bilateral")

    def add_pairwise_energy(self, features: Tensor, compat: Compat,
                            normalization: Union[str, int] = "symmetric") -> None:
        """A kernel ``compat * exp(-|f_i - f_j|^2 / 2)`` on user features ``(B or 1, d, *spatial)``, already
        divided by their bandwidths (pydensecrf's ``addPairwiseEnergy``, with the point axis last here)."""
        what = "add_pairwise_energy"
        if not isinstance(features, Tensor):
            raise TypeError("%s: features must be a torch.Tensor, got %s" % (what, type(features).__name__))
        B = self.unary.shape[0]
        spatial = tuple(self.unary.shape[2:])
        if features.dim() != self.unary.dim() or features.shape[0] not in (1, B) or tuple(features.shape[2:]) != spatial:
            raise ValueError("%s: features must be (B or 1, d) + %s like the unary %s, got shape %s"
                             % (what, spatial, tuple(self.unary.shape), tuple(features.shape)))
        if not 1 <= features.shape[1] <= 16:
            raise ValueError("%s: features must have 1..16 dimensions d, got %d" % (what, features.shape[1]))
        if not features.is_floating_point():
            raise TypeError("%s: features must be floating point, got %s" % (what, features.dtype))
        if features.device != self.device:
            raise ValueError("%s: features are on %s but the unary is on %s" % (what, features.device, self.device))
        if not _all_finite(features):
            raise ValueError("%s: features contain NaN or Inf" % what)
        self._add(features.detach(), compat, normalization, what)

    # -- inference --

    def _out(self, q: Tensor) -> Tensor:
        return q.to(self.out_dtype)

    def _logits(self, q: Tensor) -> Tensor:
        """``-U - sum_m compat_m(filter_m(q))`` in plain torch ops (the reference of :meth:`_update`)."""
        logits = -self.unary
        for k in self.kernels:
            logits = logits - k.message(q)
        return logits

    def _terms(self, q: Tensor, pre_out: Optional[List[Tensor]] = None
               ) -> Tuple[List[Tensor], List[Optional[Tensor]], List[float]]:
        """The update's (messages, scales, weights): a Potts kernel with a number as weight passes its filtered
        marginals, normalisation scale and weight (the sum is fused into the update); other compatibilities
        pass their message with weight -1. ``pre_out[m]``: a buffer for kernel m's pre-scaled marginals."""
        messages: List[Tensor] = []
        scales: List[Optional[Tensor]] = []
        weights: List[float] = []
        for m, k in enumerate(self.kernels):
            if k.kind == "potts" and not isinstance(k.compat, Tensor):
                x = q
                if k.pre is not None:
                    x = torch.mul(q, k.pre, out=pre_out[m]) if pre_out is not None else q * k.pre
                messages.append(k.lattice.filter(x))
                scales.append(k.post)
                weights.append(k.compat)  # type: ignore[arg-type]
            else:
                messages.append(k.message(q))
                scales.append(None)
                weights.append(-1.0)
        if len(messages) > MAX_TERMS:  # fold the rest into one message
            rest = zip(messages[MAX_TERMS - 1:], scales[MAX_TERMS - 1:], weights[MAX_TERMS - 1:])
            folded = sum(mm * w if sc is None else mm * (w * sc) for mm, sc, w in rest)
            del messages[MAX_TERMS - 1:], scales[MAX_TERMS - 1:], weights[MAX_TERMS - 1:]
            messages.append(folded)  # type: ignore[arg-type]
            scales.append(None)
            weights.append(1.0)
        return messages, scales, weights

    def _update(self, q: Tensor) -> Tensor:
        """``softmax(self._logits(q))`` with the sum and the softmax fused into one pass (differentiable)."""
        return crf_mean_field_update(self.unary, *self._terms(q))

    def _fused_terms(self) -> Optional[Tuple[List[Tensor], ...]]:
        """The arguments of the one-op schedule (``_crf_mean_field_iterate``: all iterations in one op, one pass
        over the points per iteration), or None where it does not apply: float64, a compatibility other than a
        Potts number, more than 64 classes or 8 kernels, a device other than CPU or CUDA."""
        if self.unary.device.type not in ("cpu", "cuda"):
            return None
        if self.dtype != torch.float32 or not 1 <= len(self.kernels) <= MAX_TERMS:
            return None
        if any(k.kind != "potts" or isinstance(k.compat, Tensor) for k in self.kernels):
            return None
        if self.unary.shape[1] > _FUSED_MAX_CLASSES:
            return None
        vertex, bary, neighbors, modes, weights = [], [], [], [], []
        for k in self.kernels:
            v, w, nb = k.lattice.tensors()
            vertex.append(v)
            bary.append(w)
            neighbors.append(nb)
            modes.append(NORMALIZATIONS.index(k.normalization))
            weights.append(float(k.compat))  # type: ignore[arg-type]
        return vertex, bary, neighbors, modes, weights  # type: ignore[return-value]

    def _iterate_without_grad(self, q: Tensor, iterations: int) -> Tensor:
        """The same updates, reusing the marginals' and pre-scaled marginals' buffers across iterations: a fresh
        (B, K, H, W) tensor per pass costs more in first-touch page faults than the pass itself."""
        pre_out = [torch.empty_like(q) if k.pre is not None else q for k in self.kernels]
        spare = torch.empty_like(q)
        for _ in range(iterations):
            messages, scales, weights = self._terms(q, pre_out)
            fixed = [sc if sc is not None else q.new_empty((0,)) for sc in scales]
            torch.ops.segops._crf_mean_field_update_out(self.unary, messages, fixed, weights, spare)
            q, spare = spare, q
        return q

    def _needs_grad(self) -> bool:
        if not torch.is_grad_enabled():
            return False
        return self.unary.requires_grad or any(isinstance(k.compat, Tensor) and k.compat.requires_grad
                                               for k in self.kernels)

    def start_inference(self) -> Tensor:
        """``Q = softmax(-U)`` over the labels (pydensecrf's ``startInference``), ``(B, K, ...)``."""
        return self._out(self._softmax_of_unary())

    def _softmax_of_unary(self) -> Tensor:
        return crf_mean_field_update(self.unary, [], [], [])  # no messages: softmax(-U) in one pass

    def step_inference(self, q: Tensor) -> Tensor:
        """One mean-field update ``softmax(-U - sum_m compat_m(filter_m(q)))`` (pydensecrf's ``stepInference``,
        returning the new marginals instead of updating in place)."""
        self._check_marginals("step_inference", q)
        return self._out(self._update(q.to(self.dtype)))

    def inference(self, iterations: int = 5) -> Tensor:
        """The marginals after ``iterations`` mean-field updates (0: ``softmax(-U)``), ``(B, K, ...)``."""
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ValueError("iterations must be an integer >= 0, got %r" % (iterations,))
        if self.kernels and iterations > 0 and not self._needs_grad():
            with torch.no_grad():
                # (on a CPU without AVX2 / AVX-512 the one-op schedule's portable build is slower than the ops)
                fast = self.unary.device.type != "cpu" or _fused_cpu_is_fast()
                fused = self._fused_terms() if fast else None
                if fused is not None:  # one op, one pass per iteration: the same marginals to float rounding
                    return self._out(torch.ops.segops._crf_mean_field_iterate(self.unary, *fused, iterations))
        q = self._softmax_of_unary()
        if not self.kernels or iterations == 0:
            return self._out(q)
        if not self._needs_grad():
            with torch.no_grad():
                return self._out(self._iterate_without_grad(q, iterations))
        for _ in range(iterations):
            q = self._update(q)
        return self._out(q)

    def kl_divergence(self, q: Tensor) -> Tensor:
        """pydensecrf's ``klDivergence(Q)`` per image, ``(B,)`` float64: ``sum Q log Q + sum U Q +
        sum_m sum Q * compat_m(filter_m(Q))`` (the mean-field free energy up to a constant; the pairwise
        sum counts every pair in both orders, and includes each pixel's own kernel weight)."""
        self._check_marginals("kl_divergence", q)
        q = q.to(self.dtype)
        B = q.shape[0]
        total = (q * torch.log(q.clamp_min(1e-20))).reshape(B, -1).sum(1, dtype=torch.float64)
        total = total + (self.unary * q).reshape(B, -1).sum(1, dtype=torch.float64)
        for k in self.kernels:
            total = total + (q * k.message(q)).reshape(B, -1).sum(1, dtype=torch.float64)
        return total

    def _check_marginals(self, what: str, q: Tensor) -> None:
        if not isinstance(q, Tensor) or q.shape != self.unary.shape:
            raise ValueError("%s: Q must have the unary's shape %s, got %s"
                             % (what, tuple(self.unary.shape), tuple(q.shape) if isinstance(q, Tensor) else q))
        if q.device != self.device or not q.is_floating_point():
            raise ValueError("%s: Q must be floating point on %s, got %s on %s" % (what, self.device, q.dtype, q.device))


def dense_crf_inference(
    unary: Tensor,
    images: Optional[Tensor] = None,
    iterations: int = 5,
    gaussian_sxy: Pair = 3.0,
    gaussian_compat: Compat = 3.0,
    bilateral_sxy: Pair = 80.0,
    bilateral_srgb: Union[float, Sequence[float]] = 13.0,
    bilateral_compat: Compat = 10.0,
    normalization: Union[str, int] = "symmetric",
    kernels: Sequence[CRFKernel] = (),
) -> Tensor:
    """Marginals of the fully connected CRF after mean-field inference, for a batch of images.

    The pydensecrf program ``d = DenseCRF2D(W, H, K); d.setUnaryEnergy(U);
    d.addPairwiseGaussian(sxy=3, compat=3); d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=im, compat=10);
    Q = d.inference(5)`` is ``dense_crf_inference(U, im)`` with U ``(B, K, H, W)`` and im ``(B, 3, H, W)``.

    Args:
        unary: ``(B, K, H, W)`` energies ``-log p`` (see :func:`unary_from_softmax`), finite, float32 / float64.
        images: ``(B, C, H, W)`` uint8 or float in 0..255 (C in 1..14, usually RGB); needed unless
            ``bilateral_compat`` is 0.
        iterations: mean-field updates (0 returns ``softmax(-unary)``).
        gaussian_sxy, gaussian_compat: the smoothness kernel on positions (pixels; a number or ``(sx, sy)``)
            and its compatibility; a compat of 0 switches the kernel off.
        bilateral_sxy, bilateral_srgb, bilateral_compat: the appearance kernel on positions and colours
            (colour units: a number or one per channel) and its compatibility; 0 switches it off.
        normalization: the normalisation mode of both built-in kernels: ``"symmetric"`` (pydensecrf's
            default), ``"before"``, ``"after"``, ``"none"`` or pydensecrf's constants 0..3.
        kernels: further :class:`CRFKernel` terms on user features.

    A compatibility is a number (Potts), a 0-dim tensor (Potts, differentiable), a ``(K,)`` vector or a
    ``(K, K)`` matrix, with pydensecrf's meaning (a Potts weight ``w`` equals the matrix ``-w I``).

    Returns:
        ``(B, K, H, W)`` marginals (each pixel sums to 1), in the unary's dtype; differentiable in ``unary`` and
        in compatibility tensors.
    """
    crf = MeanFieldCRF(unary)
    if unary.dim() != 4:
        raise ValueError("unary must be (B, K, H, W) energies, got shape %s" % (tuple(unary.shape),))
    crf.add_pairwise_gaussian(gaussian_sxy, gaussian_compat, normalization)
    if images is None:
        if not (isinstance(bilateral_compat, Number) and float(bilateral_compat) == 0.0):  # type: ignore[arg-type]
            raise ValueError("images are needed for the bilateral kernel; pass images or bilateral_compat=0")
        _bandwidths("bilateral_sxy", bilateral_sxy, 2)
    else:
        crf.add_pairwise_bilateral(bilateral_sxy, bilateral_srgb, images, bilateral_compat, normalization)
    for i, k in enumerate(kernels):
        if not isinstance(k, CRFKernel):
            raise TypeError("kernels[%d] must be a segops.ops.CRFKernel, got %s" % (i, type(k).__name__))
        crf.add_pairwise_energy(k.features, k.compat, k.normalization)
    return crf.inference(iterations)


# ---- unaries (pydensecrf.utils) ------------------------------------------------------------------------------


def unary_from_softmax(probs: Tensor, scale: Optional[float] = None, clip: Optional[float] = 1e-5) -> Tensor:
    """``-log p`` per pixel and label (pydensecrf's ``utils.unary_from_softmax``), same shape as ``probs``
    ``(B, K, ...)``.

    ``scale`` in (0, 1] mixes with the uniform distribution first (``scale p + (1 - scale) / K``); ``clip``
    bounds the probabilities below (``log 0``) and is applied after the mixing, as pydensecrf does.
    """
    if not isinstance(probs, Tensor) or probs.dim() < 2 or not probs.is_floating_point():
        raise ValueError("probs must be a floating (B, K, ...) tensor")
    p = probs
    if scale is not None:
        if not 0 < scale <= 1:
            raise ValueError("scale must be in (0, 1], got %r" % (scale,))
        p = scale * p + (1 - scale) / p.shape[1]
    if clip is not None:
        if not 0 < clip <= 1:
            raise ValueError("clip must be in (0, 1], got %r" % (clip,))
        p = p.clamp(clip, 1.0)
    return -torch.log(p)


def unary_from_labels(labels: Tensor, n_labels: int, gt_prob: float, zero_unsure: bool = True) -> Tensor:
    """Unary ``(B, n_labels, ...)`` float32 from an integer label map ``(B, ...)`` (pydensecrf's
    ``utils.unary_from_labels``): each pixel is ``gt_prob`` certain of its label and spreads the rest evenly.

    With ``zero_unsure`` label 0 means "unknown" (uniform) and labels 1..n_labels map to classes 0..n_labels-1.
    """
    if not 0 < gt_prob < 1:
        raise ValueError("gt_prob must be in (0, 1), got %r" % (gt_prob,))
    if isinstance(n_labels, bool) or not isinstance(n_labels, int) or n_labels < 2:
        raise ValueError("n_labels must be an integer >= 2, got %r" % (n_labels,))
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool or labels.dim() < 1:
        raise ValueError("labels must be an integer (B, ...) tensor")
    cls = labels.long() - 1 if zero_unsure else labels.long()
    lo, hi = (0, n_labels) if zero_unsure else (0, n_labels - 1)
    if labels.numel() > 0 and (int(labels.min()) < lo or int(labels.max()) > hi):
        raise ValueError("labels must lie in [%d, %d], got [%d, %d]" % (lo, hi, int(labels.min()), int(labels.max())))
    n_energy = -math.log((1.0 - gt_prob) / (n_labels - 1))
    p_energy = -math.log(gt_prob)
    shape = (labels.shape[0], n_labels) + tuple(labels.shape[1:])
    u = torch.full(shape, n_energy, dtype=torch.float32, device=labels.device)
    u.scatter_(1, cls.clamp_min(0).unsqueeze(1), p_energy)
    if zero_unsure:
        u = torch.where((labels == 0).unsqueeze(1), torch.full_like(u, -math.log(1.0 / n_labels)), u)
    return u
