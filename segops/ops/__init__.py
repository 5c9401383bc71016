"""Functional segops operators (typed wrappers over ``torch.ops.segops`` with autograd)."""

from segops.ops.conv import atrous_conv2d, conv_transpose2d
from segops.ops.lattice import dense_crf_loss, normalized_cut_loss, permutohedral_filter
from segops.ops.losses import entropy, partial_cross_entropy
from segops.ops.conv_choice import conv_backend, get_conv_backend, set_conv_backend

__all__ = [
    "partial_cross_entropy",
    "entropy",
    "permutohedral_filter",
    "dense_crf_loss",
    "normalized_cut_loss",
    "atrous_conv2d",
    "conv_transpose2d",
    "conv_backend",
    "get_conv_backend",
    "set_conv_backend",
]
