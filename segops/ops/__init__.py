"""Functional segops operators (typed wrappers over ``torch.ops.segops`` with autograd)."""

from segops.ops.losses import entropy, partial_cross_entropy

__all__ = ["partial_cross_entropy", "entropy"]
