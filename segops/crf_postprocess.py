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


def add_crf_arguments(p: argparse.ArgumentParser) -> None:
    d = DEEPLAB_DEFAULTS
    g = p.add_argument_group("dense CRF post-processing (DeepLab; defaults: DeepLab-LargeFOV's)")
    g.add_argument("--crf", action="store_true",
                   help="refine predictions by mean-field inference in the fully connected CRF on the logits")
    g.add_argument("--crf-iterations", type=int, default=d["iterations"], metavar="N",
                   help="mean-field iterations (DeepLab: %(default)s)")
    g.add_argument("--crf-pos-w", type=float, default=d["gaussian_compat"], metavar="W",
                   help="smoothness kernel weight w2 (DeepLab: %(default)s)")
    g.add_argument("--crf-pos-xy-std", type=float, default=d["gaussian_sxy"], metavar="PIXELS",
                   help="smoothness kernel sigma_gamma (DeepLab: %(default)s)")
    g.add_argument("--crf-bi-w", type=float, default=d["bilateral_compat"], metavar="W",
                   help="appearance kernel weight w1 (DeepLab-LargeFOV: %(default)s)")
    g.add_argument("--crf-bi-xy-std", type=float, default=d["bilateral_sxy"], metavar="PIXELS",
                   help="appearance kernel sigma_alpha (DeepLab-LargeFOV: %(default)s)")
    g.add_argument("--crf-bi-rgb-std", type=float, default=d["bilateral_srgb"], metavar="RGB",
                   help="appearance kernel sigma_beta in 0..255 colour units (DeepLab-LargeFOV: %(default)s)")


def crf_from_args(args: argparse.Namespace) -> Optional[DenseCRF]:
    """The :class:`DenseCRF` the options describe, or None without ``--crf``; ValueError names a bad option."""
    if not getattr(args, "crf", False):
        return None
    try:
        return DenseCRF(
            iterations=args.crf_iterations,
            gaussian_sxy=args.crf_pos_xy_std,
            gaussian_compat=args.crf_pos_w,
            bilateral_sxy=args.crf_bi_xy_std,
            bilateral_srgb=args.crf_bi_rgb_std,
            bilateral_compat=args.crf_bi_w,
        )
    except ValueError as e:
        names = {"iterations": "--crf-iterations", "gaussian_sxy": "--crf-pos-xy-std", "gaussian_compat": "--crf-pos-w",
                 "bilateral_sxy": "--crf-bi-xy-std", "bilateral_srgb": "--crf-bi-rgb-std",
                 "bilateral_compat": "--crf-bi-w"}
        msg = str(e)
        for k, v in names.items():
            if msg.startswith(k):
                msg = v + msg[len(k):]
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
