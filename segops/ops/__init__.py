"""Functional segops operators (typed wrappers over ``torch.ops.segops`` with autograd)."""

from segops.ops.conv import atrous_conv2d, conv_transpose2d
from segops.ops.crf_losses import dense_crf_loss, normalized_cut_loss
from segops.ops.lattice import PermutohedralLattice, build_lattice, permutohedral_filter
from segops.ops.losses import entropy, partial_cross_entropy

__all__ = [
    "partial_cross_entropy",
    "entropy",
    "permutohedral_filter",
    "build_lattice",
    "PermutohedralLattice",
    "dense_crf_loss",
    "normalized_cut_loss",
    "atrous_conv2d",
    "conv_transpose2d",
]
