"""Functional segops operators (typed wrappers over ``torch.ops.segops`` with autograd)."""

from segops.ops.losses import entropy, partial_cross_entropy

__all__ = ["partial_cross_entropy", "entropy"]

# ---- transposed / atrous convolution (issue: conv) ----
from segops.ops.conv import atrous_conv2d, conv_transpose2d  # noqa: E402

__all__ += ["atrous_conv2d", "conv_transpose2d"]
