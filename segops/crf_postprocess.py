"""``--crf`` for ``segops eval`` / ``segops predict``: DeepLab's dense CRF post-processing of a network's output.

The network's logits (upsampled to the image) are the unary (``-logits``) of a fully connected CRF with DeepLab's
kernels; mean-field inference (:class:`segops.nn.DenseCRF`) refines them and the prediction is the argmax of the
marginals. The option names are DeepLab's own (``pos_w``, ``pos_xy_std``, ``bi_w``, ``bi_xy_std``,
``bi_rgb_std``, ``iter_max``) and their defaults DeepLab-LargeFOV's (:data:`segops.nn.dense_crf.DEEPLAB_DEFAULTS`).
"""

from __future__ import annotations

import argparse
from typing import Callable, Dict, Optional

from segops.nn.dense_crf import DEEPLAB_DEFAULTS, DenseCRF

__all__ = ["add_crf_arguments", "crf_from_args", "crf_report"]


# (option, DenseCRF argument, type, metavar, what it is, whose default)
_OPTIONS = (
    ("--crf-iterations", "iterations", int, "N", "mean-field iterations", "DeepLab"),
    ("--crf-pos-w", "gaussian_compat", float, "W", "smoothness kernel weight w2", "DeepLab"),
    ("--crf-pos-xy-std", "gaussian_sxy", float, "PIXELS", "smoothness kernel sigma_gamma", "DeepLab"),
    ("--crf-bi-w", "bilateral_compat", float, "W", "appearance kernel weight w1", "DeepLab-LargeFOV"),
    ("--crf-bi-xy-std", "bilateral_sxy", float, "PIXELS", "appearance kernel sigma_alpha", "DeepLab-LargeFOV"),
    ("--crf-bi-rgb-std", "bilateral_srgb", float, "RGB", "appearance kernel sigma_beta in 0..255 colour units",
     "DeepLab-LargeFOV"),
)


def add_crf_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dense CRF post-processing (DeepLab; defaults: DeepLab-LargeFOV's)")
    g.add_argument("--crf", action="store_true",
                   help="refine predictions by mean-field inference in the fully connected CRF on the logits")
    for flag, key, kind, metavar, what, whose in _OPTIONS:
        g.add_argument(flag, type=kind, default=DEEPLAB_DEFAULTS[key], metavar=metavar,
                       help="%s (%s: %%(default)s)" % (what, whose))


def crf_from_args(args: argparse.Namespace) -> Optional[DenseCRF]:
    """The :class:`DenseCRF` the options describe, or None without ``--crf``; ValueError names a bad option."""
    if not getattr(args, "crf", False):
        return None
    kwargs = {key: getattr(args, flag[2:].replace("-", "_")) for flag, key, *_ in _OPTIONS}
    try:
        return DenseCRF(**kwargs)
    except ValueError as e:
        msg = str(e)
        for flag, key, *_ in _OPTIONS:  # the module's message names its argument: name the option instead
            if msg.startswith(key + " "):
                msg = flag + msg[len(key):]
                break
        raise ValueError(msg) from None


def crf_report(res: Dict[str, object], table: Callable[..., str]) -> str:
    """The CRF-refined metrics' table and the mIoU / pixel accuracy with and without the CRF (percent)."""
    crf = res["crf"]
    assert isinstance(crf, dict)
    lines = ["", "with the dense CRF:", table(crf, res.get("class_names")), ""]
    for k in ("miou", "pixel_acc"):
        a, b = 100 * float(res[k]), 100 * float(crf[k])  # type: ignore[arg-type]
        lines.append("%-9s without CRF %6.2f  with CRF %6.2f  (%+.2f)" % (k, a, b, b - a))
    return "\n".join(lines)
