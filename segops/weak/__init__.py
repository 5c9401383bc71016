"""Weak supervision: the loss grammar and composed regularized loss, clicks and image-level tags (class
activation maps and the seeds drawn from them), and interactive segmentation of one photo from a few strokes."""

from segops.weak.losses import LOSS_GRAMMAR, LossSpec, RegularizedLoss, expand_loss, parse_loss

__all__ = ["LOSS_GRAMMAR", "LossSpec", "RegularizedLoss", "expand_loss", "parse_loss"]
