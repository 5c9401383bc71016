"""Fully connected CRF mean-field inference as a module on network logits (DeepLab post-processing, CRF-as-RNN)."""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from segops.ops.crf_inference import CRFKernel, _bandwidths, _normalization, dense_crf_inference

__all__ = ["DenseCRF", "DEEPLAB_DEFAULTS"]

# DeepLab (Chen et al., ICLR'15 and TPAMI'17): 10 mean-field iterations, w2 = 3 and sigma_gamma = 3 fixed by the
# papers, (w1, sigma_alpha, sigma_beta) cross-validated; the released DeepLab-LargeFOV values are (4, 121, 5).
DEEPLAB_DEFAULTS = dict(
    iterations=10,
    gaussian_sxy=3.0,
    gaussian_compat=3.0,
    bilateral_sxy=121.0,
    bilateral_srgb=5.0,
    bilateral_compat=4.0,
)



class DenseCRF(nn.Module):
    """Mean-field inference in the fully connected CRF on top of a network's logits.

    ``crf(logits, images)`` returns the marginals ``(B, K, H, W)`` of the CRF whose unary is ``-logits``
    (equivalently ``-log softmax(logits)``: a per-pixel constant does not change the marginals), with a
    Gaussian smoothness kernel on positions and a bilateral appearance kernel on positions and colours; see
    :func:`segops.ops.dense_crf_inference` for the update and the pydensecrf conventions. The defaults are
    pydensecrf's usual ``addPairwiseGaussian(sxy=3, compat=3)``, ``addPairwiseBilateral(sxy=80, srgb=13,
    compat=10)`` and 5 iterations; DeepLab's are :meth:`deeplab`.

    Args:
        iterations: mean-field updates.
        gaussian_sxy, gaussian_compat: smoothness kernel bandwidth (pixels) and Potts weight (0: off).
        bilateral_sxy, bilateral_srgb, bilateral_compat: appearance kernel bandwidths (pixels, colour units in
            0..255) and Potts weight (0: off).
        normalization: kernel normalisation mode (``"symmetric"``, ``"before"``, ``"after"``, ``"none"``).
        learn_compat: make the two Potts weights parameters (CRF-as-RNN training); the gradient flows to
            them and to the logits.

    Shapes: ``logits (B, K, H, W)`` any float dtype; ``images (B, C, H, W)`` uint8 or float in 0..255 (the
    un-normalised image), same device. Output in the logits' dtype (float16 / bfloat16 computed in float32).
    """

    def __init__(
        self,
        iterations: int = 5,
        gaussian_sxy: Union[float, Tuple[float, float]] = 3.0,
        gaussian_compat: float = 3.0,
        bilateral_sxy: Union[float, Tuple[float, float]] = 80.0,
        bilateral_srgb: Union[float, Sequence[float]] = 13.0,
        bilateral_compat: float = 10.0,
        normalization: str = "symmetric",
        learn_compat: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ValueError("iterations must be an integer >= 0, got %r" % (iterations,))
        _bandwidths("gaussian_sxy", gaussian_sxy, 2)
        _bandwidths("bilateral_sxy", bilateral_sxy, 2)
        if not isinstance(bilateral_srgb, (list, tuple)):
            _bandwidths("bilateral_srgb", bilateral_srgb, 1)
        for what, v in (("gaussian_compat", gaussian_compat), ("bilateral_compat", bilateral_compat)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or abs(v) == float("inf"):
                raise ValueError("%s must be a finite number (a Potts weight), got %r" % (what, v))
        self.iterations = iterations
        self.gaussian_sxy = gaussian_sxy
        self.bilateral_sxy = bilateral_sxy
        self.bilateral_srgb = bilateral_srgb
        self.normalization = _normalization(normalization)
        self.learn_compat = bool(learn_compat)
        if learn_compat:
            self.gaussian_compat = nn.Parameter(torch.tensor(float(gaussian_compat)))
            self.bilateral_compat = nn.Parameter(torch.tensor(float(bilateral_compat)))
        else:
            self.gaussian_compat = float(gaussian_compat)  # type: ignore[assignment]
            self.bilateral_compat = float(bilateral_compat)  # type: ignore[assignment]

    @classmethod
    def deeplab(cls, **overrides) -> "DenseCRF":
        """DeepLab's post-processing: 10 iterations, smoothness kernel ``w2 = 3, sigma_gamma = 3`` (fixed in the
        DeepLab papers), appearance kernel ``w1 = 4, sigma_alpha = 121, sigma_beta = 5`` (DeepLab-LargeFOV's
        cross-validated values from the DeepLab release). Keyword arguments override any of them."""
        args = dict(DEEPLAB_DEFAULTS)
        args.update(overrides)
        return cls(**args)

    def forward(self, logits: Tensor, images: Tensor, kernels: Sequence[CRFKernel] = ()) -> Tensor:
        if not isinstance(logits, Tensor) or not logits.is_floating_point():
            raise TypeError("logits must be a floating point tensor (B, K, H, W)")
        return dense_crf_inference(
            -logits, images, self.iterations,
            gaussian_sxy=self.gaussian_sxy, gaussian_compat=self.gaussian_compat,
            bilateral_sxy=self.bilateral_sxy, bilateral_srgb=self.bilateral_srgb,
            bilateral_compat=self.bilateral_compat, normalization=self.normalization, kernels=kernels,
        )

    def extra_repr(self) -> str:
        def c(v: object) -> str:
            return "%g" % float(v.detach()) if isinstance(v, Tensor) else "%g" % v  # type: ignore[arg-type]

        return ("iterations=%d, gaussian_sxy=%s, gaussian_compat=%s, bilateral_sxy=%s, bilateral_srgb=%s, "
                "bilateral_compat=%s, normalization=%r, learn_compat=%s" % (
                    self.iterations, self.gaussian_sxy, c(self.gaussian_compat), self.bilateral_sxy,
                    self.bilateral_srgb, c(self.bilateral_compat), self.normalization, self.learn_compat))
