"""Functional segops operators (typed wrappers over ``torch.ops.segops`` with autograd)."""

from segops.ops.losses import entropy, partial_cross_entropy
from segops.ops.lattice import dense_crf_loss, normalized_cut_loss, permutohedral_filter

__all__ = ["partial_cross_entropy", "entropy", "permutohedral_filter", "dense_crf_loss", "normalized_cut_loss"]
