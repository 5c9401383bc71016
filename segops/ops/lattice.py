"""Permutohedral lattice: Gaussian filtering in a feature space, built once and applied many times.

``W_ij ~ exp(-|f_i - f_j|^2 / 2)`` per image (self term included, no normalisation), on the permutohedral
lattice of Adams, Baek & Davis (2010) in exactly the form of Kraehenbuehl & Koltun's densecrf code used by
the ECCV'18 regularized-loss code, so their hyper-parameters carry over (docs/lattice.md has the contract).

The lattice approximates the Gaussian: on real images ``W x`` carries about 0.5-0.6x the mass of the exact
dense Gaussian filter (the blur kernel 1/2, 1, 1/2 per direction and ``alpha = 1 / (1 + 2^-d)`` are the
densecrf constants, not a normalised Gaussian). ``normalize=True`` returns ``(W x) / (W 1)`` instead, for
which the overall scale cancels.

Two ways in:

* :func:`permutohedral_filter` ``(values, features)`` builds the lattice and filters in one op; its backward
  op reuses the lattice.
* :func:`build_lattice` ``(features)`` returns a :class:`PermutohedralLattice` that filters any number of
  value tensors with ``W`` or ``W^T`` (``.filter(values, normalize, transposed)``), differentiably in the
  values: for iterative uses such as mean-field inference, where one lattice serves many filterings.

Gradients: ``W^T`` is ``W`` with the blur directions in reverse order (each direction's blur is symmetric,
their ordered product is not quite: ``<W u, v>`` and ``<u, W v>`` differ by ~1e-4 relative on image
features). The features get NO gradient (the lattice is piecewise constant in them).

Determinism: every result is bitwise reproducible, on the CPU whatever the thread count, and on CUDA from
run to run (no floating-point atomics). Building a lattice reads one word (vertex count and error flags)
back to the host; filtering reads nothing.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from segops.ops._checks import check_same_device

__all__ = ["permutohedral_filter", "build_lattice", "PermutohedralLattice", "crf_features"]

ops = torch.ops.segops


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n = n * s
    return n


# ---- permutohedral_filter: build + filter in one op ----------------------------------------------------------


def permutohedral_filter(values: Tensor, features: Tensor, normalize: bool = False) -> Tensor:
    """Gaussian filtering of ``values`` in the feature space ``features`` on the permutohedral lattice.

    Args:
        values: ``(B, C, H, W)`` or ``(B, C, N)`` (any ``(B, C, *spatial)``) float32 / float64 / float16 /
            bfloat16; all C channels are filtered in one splat / blur / slice pass.
        features: ``(B, d, *spatial)`` floating, already scaled (e.g. position / sigma), 1 <= d <= 16;
            computed in float64 when ``values`` are float64, else float32. Must be finite.
        normalize: return ``(W values) / (W 1)`` instead of ``W values``.

    Returns:
        ``W values``, same shape and dtype as ``values`` (contiguous). Differentiable in ``values`` only.
    """
    out, _, _, _, _ = ops.permutohedral_filter.default(values, features, bool(normalize))
    return out


@torch.library.register_fake("segops::permutohedral_filter")
def _filter_fake(values, features, normalize):
    torch._check(values.dim() >= 3, lambda: "permutohedral_filter: values must be (B, C, *spatial)")
    torch._check(features.dim() == values.dim(), lambda: "permutohedral_filter: features must be (B, d, *spatial)")
    torch._check(1 <= features.shape[1] <= 16, lambda: "permutohedral_filter: d must be in [1, 16]")
    check_same_device("permutohedral_filter", "values", values, features=features)
    B, d = values.shape[0], features.shape[1]
    n = _numel(values.shape[2:])
    acc = _acc_dtype(values.dtype)
    m = torch.library.get_ctx().new_dynamic_size()
    out = values.new_empty(values.shape)
    vertex = values.new_empty((B, n, d + 1), dtype=torch.int32)
    bary = values.new_empty((B, n, d + 1), dtype=acc)
    neighbors = values.new_empty((m, d + 1, 2), dtype=torch.int32)
    norm = values.new_empty((B, n) if normalize else (0,), dtype=acc)
    return out, vertex, bary, neighbors, norm


@torch.library.register_fake("segops::_permutohedral_filter_backward")
def _filter_backward_fake(grad, vertex, bary, neighbors, norm, normalize, transposed):
    return grad.new_empty(grad.shape)


def _filter_setup_context(ctx, inputs, output) -> None:
    _, _, normalize = inputs
    _, vertex, bary, neighbors, norm = output
    # the lattice and the normaliser are returned for reuse; the gradient w.r.t. the features is not
    # provided (the lattice is piecewise constant in them), so none flows through these, and autograd builds no
    # zero gradients for them (a (B, N, d+1) and a (B, N) one per backward)
    ctx.mark_non_differentiable(bary, norm)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(vertex, bary, neighbors, norm)
    ctx.normalize = normalize


def _filter_backward(ctx, grad_out: Tensor, *_unused: Tensor):
    vertex, bary, neighbors, norm = ctx.saved_tensors
    grad_values = None
    if ctx.needs_input_grad[0] and grad_out is not None:
        grad_values = ops._permutohedral_filter_backward.default(
            grad_out.contiguous(), vertex, bary, neighbors, norm, ctx.normalize, True
        )
    return grad_values, None, None


def _backward_setup_context(ctx, inputs, output) -> None:
    _, vertex, bary, neighbors, norm, normalize, transposed = inputs
    ctx.save_for_backward(vertex, bary, neighbors, norm)
    ctx.args = (normalize, not transposed)


def _backward_backward(ctx, grad_out: Tensor):
    vertex, bary, neighbors, norm = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = ops._permutohedral_filter_backward.default(grad_out.contiguous(), vertex, bary, neighbors, norm, *ctx.args)
    return grad, None, None, None, None, None, None


torch.library.register_autograd(
    "segops::_permutohedral_filter_backward", _backward_backward, setup_context=_backward_setup_context
)
torch.library.register_autograd("segops::permutohedral_filter", _filter_backward, setup_context=_filter_setup_context)


# ---- build once, filter many ------------------------------------------------------------------------------------


@torch.library.register_fake("segops::permutohedral_lattice")
def _lattice_fake(features):
    torch._check(features.dim() >= 3, lambda: "permutohedral_lattice: features must be (B, d, *spatial)")
    torch._check(1 <= features.shape[1] <= 16, lambda: "permutohedral_lattice: d must be in [1, 16]")
    B, d = features.shape[0], features.shape[1]
    n = _numel(features.shape[2:])
    m = torch.library.get_ctx().new_dynamic_size()
    vertex = features.new_empty((B, n, d + 1), dtype=torch.int32)
    bary = features.new_empty((B, n, d + 1), dtype=_acc_dtype(features.dtype))
    neighbors = features.new_empty((m, d + 1, 2), dtype=torch.int32)
    return vertex, bary, neighbors


def _lattice_setup_context(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(*output)


def _lattice_backward(ctx, *_grads: Tensor):
    return None  # the lattice is piecewise constant in the features: no gradient


torch.library.register_autograd("segops::permutohedral_lattice", _lattice_backward, setup_context=_lattice_setup_context)


@torch.library.register_fake("segops::permutohedral_apply")
def _apply_fake(values, vertex, bary, neighbors, transposed, splat_plan=None):
    torch._check(values.dim() >= 3, lambda: "permutohedral_apply: values must be (B, C, *spatial)")
    check_same_device("permutohedral_apply", "values", values, vertex=vertex, bary=bary, neighbors=neighbors)
    return values.new_empty(values.shape)


@torch.library.register_fake("segops::_permutohedral_splat_plan")
def _splat_plan_fake(vertex, neighbors):
    torch._check(vertex.dim() == 3, lambda: "_permutohedral_splat_plan: vertex must be (B, N, d+1)")
    return vertex.new_empty((vertex.numel() + 3 * neighbors.shape[0] + 1,), dtype=torch.int64)


def _apply_setup_context(ctx, inputs, output) -> None:
    _, vertex, bary, neighbors, transposed = inputs[:5]
    plan = inputs[5] if len(inputs) > 5 else None
    ctx.save_for_backward(vertex, bary, neighbors, plan)
    ctx.transposed = transposed


def _apply_backward(ctx, grad_out: Tensor):
    vertex, bary, neighbors, plan = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = ops.permutohedral_apply.default(grad_out.contiguous(), vertex, bary, neighbors, not ctx.transposed,
                                               plan)
    return grad, None, None, None, None, None


torch.library.register_autograd("segops::permutohedral_apply", _apply_backward, setup_context=_apply_setup_context)


class PermutohedralLattice:
    """The permutohedral lattice of a batch of feature maps, built once, applied to any number of values.

    Made by :func:`build_lattice`. Holds, per point, its d+1 vertex ids and barycentric weights and, per
    vertex, its blur neighbours (the three tensors of ``torch.ops.segops.permutohedral_lattice``).

    Attributes:
        vertex: ``(B, N, d+1)`` int32 vertex ids; image b's vertices are a contiguous id range, in order of
            first appearance (so ``vertex[b, 0, 0]`` is image b's first vertex id).
        bary: ``(B, N, d+1)`` barycentric weights (float64 for float64 features, else float32).
        neighbors: ``(M, d+1, 2)`` int32: the vertex before / after each vertex along each of the d+1 blur
            directions, -1 where absent.
        spatial_shape: the features' spatial shape (``N`` = its product).
    """

    def __init__(self, vertex: Tensor, bary: Tensor, neighbors: Tensor, spatial_shape: Sequence[int]) -> None:
        self.vertex = vertex
        self.bary = bary
        self.neighbors = neighbors
        self.spatial_shape = tuple(int(s) for s in spatial_shape)
        self._norm: Optional[Tensor] = None
        self._plan: Optional[Tensor] = None

    @property
    def d(self) -> int:
        """Feature dimensions."""
        return int(self.vertex.shape[2]) - 1

    @property
    def num_vertices(self) -> int:
        """M, the lattice vertices over the whole batch (the memory of a filtering is M x C values)."""
        return int(self.neighbors.shape[0])

    @property
    def batch_size(self) -> int:
        return int(self.vertex.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype: float64 lattices filter float64 values, float32 ones all other dtypes."""
        return self.bary.dtype

    @property
    def device(self) -> torch.device:
        return self.vertex.device

    def tensors(self) -> Tuple[Tensor, Tensor, Tensor]:
        """``(vertex, bary, neighbors)``, the arguments of ``torch.ops.segops.permutohedral_apply``."""
        return self.vertex, self.bary, self.neighbors

    def splat_plan(self) -> Optional[Tensor]:
        """On CUDA, the splat's entries sorted by vertex (int64, ``B N (d+1) + 3 M + 1``: 8 bytes per entry, as
        much again as the lattice), made at the first filtering and reused by the next ones instead of sorting
        again; None on the CPU, whose splat does not sort."""
        if self._plan is None and self.vertex.is_cuda:
            self._plan = ops._permutohedral_splat_plan.default(self.vertex, self.neighbors)
        return self._plan

    def norm(self) -> Tensor:
        """``W 1``, ``(B, 1, *spatial)`` in the lattice's dtype (computed once, then cached)."""
        if self._norm is None:
            ones = self.bary.new_ones((self.batch_size, 1) + self.spatial_shape)
            self._norm = ops.permutohedral_apply.default(ones, self.vertex, self.bary, self.neighbors, False,
                                                         self.splat_plan())
        return self._norm

    def filter(self, values: Tensor, normalize: bool = False, transposed: bool = False) -> Tensor:
        """``W values`` (``W^T values`` when ``transposed``), differentiable in ``values``.

        Args:
            values: ``(B, C, *spatial)`` with the lattice's B and spatial shape; float64 values need a
                float64 lattice, float32 / float16 / bfloat16 values a float32 one.
            normalize: ``(W values) / (W 1)``; with ``transposed``, the adjoint of that map,
                ``W^T (values / (W 1))``.
            transposed: apply ``W^T`` (W with the blur directions in reverse order).

        Returns:
            Same shape and dtype as ``values``.
        """
        vertex, bary, neighbors = self.tensors()
        plan = self.splat_plan()
        if not normalize:
            return ops.permutohedral_apply.default(values, vertex, bary, neighbors, bool(transposed), plan)
        norm = self.norm()
        if transposed:
            return ops.permutohedral_apply.default((values / norm).to(values.dtype), vertex, bary, neighbors, True,
                                                   plan)
        return (ops.permutohedral_apply.default(values, vertex, bary, neighbors, False, plan) / norm).to(values.dtype)

    def __repr__(self) -> str:
        return "PermutohedralLattice(B=%d, N=%d, d=%d, vertices=%d, dtype=%s, device=%s)" % (
            self.batch_size, _numel(self.spatial_shape), self.d, self.num_vertices, self.dtype, self.device)


def build_lattice(features: Tensor) -> PermutohedralLattice:
    """Builds the permutohedral lattice of ``features`` once, for any number of filterings.

    Args:
        features: ``(B, d, *spatial)`` floating, already scaled (e.g. position / sigma), 1 <= d <= 16, finite.
            The lattice is computed in float64 for float64 features, else in float32. No gradient flows to
            the features.

    Returns:
        A :class:`PermutohedralLattice`; ``.filter(values)`` computes ``W values``.

    Raises:
        RuntimeError: features of the wrong shape or dtype, NaN / Inf / huge features, more than 2^30
            lattice entries (B N (d+1)) per call.
    """
    vertex, bary, neighbors = ops.permutohedral_lattice.default(features.detach())
    return PermutohedralLattice(vertex, bary, neighbors, features.shape[2:])


def crf_features(images: Tensor, sigma_rgb: float, sigma_xy: float, poison: Optional[Tensor] = None) -> Tensor:
    """Bilateral features ``(B, 2 + Ci, H, W)``: (column / sigma_xy, row / sigma_xy, image channels / sigma_rgb).

    Rows and columns are 0-based pixel indices; float32 (float64 for float64 images). ``poison``, a 0-dim
    tensor added to sigma_rgb, is 0 (leaving the features bitwise unchanged) or NaN (making every colour
    feature NaN): it carries a check made elsewhere into the lattice build, which reports it with its one
    host read instead of a read of its own.
    """
    B, C, H, W = images.shape
    acc = _acc_dtype(images.dtype)
    # Written in place: the colour planes' quotients straight into the output, the position planes broadcast from
    # one divided row and column (the same quotients as whole planes'). Building the colour planes apart and
    # concatenating moved the images' size twice more (the ECCV'18 photo at 512^2, caches flushed: 0.38-0.39
    # against 0.53-0.58 ms on one thread, 0.22-0.24 against 0.25-0.28 on two).
    out = torch.empty((B, 2 + C, H, W), dtype=acc, device=images.device)
    out[:, 0].copy_((torch.arange(W, device=images.device, dtype=acc) / sigma_xy).expand(B, H, W))
    out[:, 1].copy_((torch.arange(H, device=images.device, dtype=acc) / sigma_xy).view(H, 1).expand(B, H, W))
    divisor = sigma_rgb if poison is None else poison + sigma_rgb  # sigma_rgb + (+-0) is sigma_rgb exactly
    # divided in the features' dtype (a float16 image is first widened, as a quotient in float16 would round)
    colours = images.detach()  # (no gradient flows into the lattice; out= takes no autograd inputs)
    torch.div(colours if colours.dtype == acc else colours.to(acc), divisor, out=out[:, 2:])
    return out
