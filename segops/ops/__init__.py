"""Functional segops operators (typed wrappers over ``torch.ops.segops`` with autograd)."""

from segops.ops.conv import atrous_conv2d, conv_transpose2d
from segops.ops.crf_losses import dense_crf_loss, normalized_cut_loss
from segops.ops.lattice import PermutohedralLattice, build_lattice, permutohedral_filter
from segops.ops.losses import entropy, partial_cross_entropy
from segops.ops.resize import half_resolution
# dense CRF inference (mean field)
from segops.ops.crf_inference import (CRFKernel, MeanFieldCRF, dense_crf_inference, unary_from_labels,
                                      unary_from_softmax)
from segops.ops.conv_choice import conv_backend, get_conv_backend, set_conv_backend

__all__ = [
    "partial_cross_entropy",
    "entropy",
    "permutohedral_filter",
    "build_lattice",
    "PermutohedralLattice",
    "dense_crf_loss",
    "normalized_cut_loss",
    "half_resolution",
    "atrous_conv2d",
    "conv_transpose2d",
    # dense CRF inference
    "dense_crf_inference",
    "MeanFieldCRF",
    "CRFKernel",
    "unary_from_softmax",
    "unary_from_labels",
    "conv_backend",
    "get_conv_backend",
    "set_conv_backend",
]
