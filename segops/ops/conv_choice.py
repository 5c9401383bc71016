"""Which kernel runs a convolution: segops' own or the vendor's (ATen: oneDNN / native on the CPU, cuDNN on CUDA).

The backend setting, most specific first:

1. ``backend=`` of the call (:func:`segops.ops.atrous_conv2d`, :func:`segops.ops.conv_transpose2d`) or of the layer
   (``AtrousConv2d(..., backend="vendor")``);
2. the innermost :func:`conv_backend` context;
3. the process-wide :func:`set_conv_backend` (default ``"auto"``).

``"segops"`` and ``"vendor"`` force a side; ``"auto"`` applies the rule of :func:`choose`: a fixed table, measured with
``segops bench conv`` (the measurements are in the project's benchmark notes), per device, dtype, geometry,
determinism setting and, on the CPU, whether segops' own AVX-512 GEMM runs there (read once, at import). The rule
is a pure function of the call's arguments: the same call always gets the same kernel (no timing at run time), it
costs a few microseconds, and ``torch.compile`` traces it like any Python code.

Forward and backward are chosen separately: under ``torch.use_deterministic_algorithms(True)`` on CUDA a dilated
convolution runs cuDNN forward but segops' backward (gather-formulated, deterministic, unlike cuDNN's fast backward
algorithms; cuDNN's deterministic ones are 10-80x slower there).

A call the vendor cannot run (an empty image or channel dimension, which ATen refuses or special-cases) always runs
segops, whatever the setting; :func:`explain` says so.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["BACKENDS", "set_conv_backend", "get_conv_backend", "conv_backend", "choose", "explain", "KernelChoice"]

BACKENDS = ("auto", "segops", "vendor")

_backend = "auto"

# Whether segops' CPU convolutions multiply with segops' own AVX-512 GEMM (AMD CPUs with AVX-512, or
# SEGOPS_CPU_GEMM=segops) rather than ATen's BLAS, read once when segops is imported: the rule stays a pure
# function of the call, which torch.compile can trace. (The GEMM itself reads SEGOPS_CPU_GEMM at each call.)
_OWN_CPU_GEMM = bool(torch.ops.segops._cpu_gemm_enabled())

# Bit flags of the ops' `route` argument: which side runs the forward, which the backward.
VENDOR_FORWARD = 1
VENDOR_BACKWARD = 2


def _checked(backend: str, what: str = "backend") -> str:
    if backend not in BACKENDS:
        raise ValueError("%s must be one of %s, got %r" % (what, ", ".join(repr(b) for b in BACKENDS), backend))
    return backend


def set_conv_backend(backend: str) -> None:
    """Set the process-wide convolution backend: ``"auto"`` (default), ``"segops"`` or ``"vendor"``.

    A layer's or a call's own ``backend=`` still wins; :func:`conv_backend` sets it for a ``with`` block.
    """
    global _backend
    _backend = _checked(backend)


def get_conv_backend() -> str:
    """The current process-wide (or innermost :func:`conv_backend` context's) backend."""
    return _backend


@contextlib.contextmanager
def conv_backend(backend: str) -> Iterator[None]:
    """``with segops.ops.conv_backend("vendor"): ...`` runs the convolutions inside on that backend (unless a layer
    or call sets its own); the previous setting comes back on exit, also on an exception."""
    global _backend
    previous = _backend
    _backend = _checked(backend)
    try:
        yield
    finally:
        _backend = previous


# ---- the segops kernel a geometry takes (mirrors the C++ selection in conv_host.h) -----------------------------


def segops_kernel(depthwise: bool, kernel: Sequence[int], stride_h: int, stride_w: int,
                  padding: Sequence[int]) -> str:
    """Name of the segops kernel family for a geometry (the same for forward and backward).

    ``depthwise``: direct per-channel gather kernels (no matrix product). ``gemm-1x1``: 1x1, stride 1, no padding:
    one matrix product per sample and group over the input itself. ``gemm-rows``: vertical stride 1: each kernel
    row's taps, grouped by the output columns they reach inside the image, are matrix products over a shifted range
    of rows and those columns (the input unfolded along the width per group), so rows and columns that only meet
    zero padding are skipped. ``gemm-im2col``: the general im2col + matrix product.
    """
    if depthwise:
        return "depthwise"
    if kernel[0] == 1 and kernel[1] == 1 and stride_h == 1 and stride_w == 1 and padding[0] == 0 and padding[1] == 0:
        return "gemm-1x1"
    if stride_h == 1:
        return "gemm-rows"
    return "gemm-im2col"


# ---- the rule ---------------------------------------------------------------------------------------------------


_has_cuda_kernels: Optional[bool] = None


def _build_has_cuda_kernels() -> bool:
    """Whether segops._C was compiled with CUDA kernels (read once from the build info)."""
    global _has_cuda_kernels
    if _has_cuda_kernels is None:
        from segops.info import build_info

        _has_cuda_kernels = build_info().get("cuda") == "1"
    return _has_cuda_kernels


def _rule(transposed: bool, device: str, dtype: torch.dtype, kernel_family: str, kernel: Sequence[int],
          stride: Sequence[int], dilated: bool, deterministic: bool, spatial: int = 0,
          macs: int = 0, own_cpu_gemm: bool = False, share: float = 1.0, rate: int = 1) -> Tuple[bool, bool, str]:
    """(vendor forward, vendor backward, reason) under "auto". ``spatial``: input H W; ``macs``: multiply-adds
    per sample and kernel tap (input channels x output channels per group x H W); ``own_cpu_gemm``: segops' CPU
    products run its AVX-512 GEMM; ``share``: the share of the dense work the gemm-rows kernel computes (it
    skips the (tap, output pixel) pairs that only meet zero padding; 1.0 for other geometries); ``rate``: the
    largest dilation of a kernel axis longer than 1.

    The table behind it: ``benchmarks/conv_rule_sweep.py`` (segops against the vendor, forward + backward, at the
    reference models' shapes) and ``segops bench conv``; the measured ratios are in the benchmark notes.
    """
    wide = max(kernel) >= 8  # upsampling filters (x4 and more: kernel 2s)
    if device == "cuda" and not _build_has_cuda_kernels():
        # a CUDA torch with a CPU-only segops build: cuDNN still runs the layer on the GPU, where segops' kernels
        # would raise "built without CUDA kernels"
        return True, True, "cuda: this segops build has no CUDA kernels: cuDNN"
    if device == "cuda":
        if kernel_family == "depthwise" and transposed and wide:
            return False, False, "cuda: wide depthwise transposed kernel (upsampling): segops 3.9-38x cuDNN"
        if deterministic and dilated:
            # cuDNN's deterministic dilated backward algorithms are 10-80x slower than its default ones, segops'
            # gather-formulated backward is deterministic at full speed
            if transposed:
                return False, False, "cuda, deterministic, dilated: segops' deterministic kernels"
            return True, False, "cuda, deterministic, dilated: cuDNN forward, segops' deterministic backward"
        return True, True, "cuda: cuDNN (segops' dense kernels 0.5-1.1x on an H200)"
    if device != "cpu":
        return True, True, "%s: the vendor's kernels" % device
    # ---- CPU: oneDNN for float32 / bfloat16; ATen's generic im2col kernels for float64 / float16 ----
    if dtype == torch.float16:
        return False, False, "cpu float16: ATen's generic kernel (2.5-14x slower than segops')"
    if dtype == torch.float64:
        return False, False, "cpu float64: ATen's generic kernel (segops 0.9-3.6x, mostly > 1)"
    if kernel_family == "depthwise":
        if dtype == torch.bfloat16 and transposed and not wide:
            return True, True, "cpu bfloat16: small depthwise transposed kernel: oneDNN"
        return False, False, "cpu: depthwise: segops' direct kernels (1.4-3.9x oneDNN)"
    if dtype == torch.float32 and max(kernel) == 1 and max(stride) > 1:
        return False, False, "cpu: strided 1x1: segops' im2col + GEMM (1.4x oneDNN)"
    if own_cpu_gemm and dtype == torch.float32 and not transposed and macs >= 1_000_000:
        # segops' AVX-512 GEMM against oneDNN on an AMD CPU (where MKL runs AVX2 code), forward + backward; below
        # ~1M multiply-adds per tap a call is a few tens of microseconds, where segops' per-call overhead loses
        # (1x1 64->21 on 5x5: 0.46x; 256->64 on 11x11, 2M: 1.33x)
        if kernel_family == "gemm-1x1":
            return False, False, "cpu: 1x1 with segops' AVX-512 GEMM (1.4-1.8x oneDNN)"
        # gemm-rows multiplies only the taps' pixels inside the image; oneDNN computes the padding too and slows
        # down at large rates (its time grows from rate 6 to 24 on the same map). Measured (forward + backward,
        # DeepLab heads at 11x11 to 81x81): rate >= 12 1.08-10x oneDNN, rate 6 0.70-0.95x (1.02x at 11x11, 40%
        # of the work inside), rates 2 / 4 0.58-0.94x.
        if kernel_family == "gemm-rows" and ((rate >= 12 and share <= 0.85) or share <= 0.45):
            return False, False, ("cpu: dilated, rate %d, %.0f%% of the dense work inside the image: segops' "
                                  "gemm-rows (1.1-10x oneDNN at rates >= 12)" % (rate, 100 * share))
    # U-Net's up-convolution on the larger maps. With ATen's GEMM the crossover depends on the CPU: on one EPYC
    # segops won from 28x28 up (1.27-2.50x), on a newer one (family 26) only at 224x224 (1.42-2.47x; 0.59-0.80x
    # from 28x28 to 112x112): 160x160 keeps every measured CPU at least level with oneDNN. With segops' AVX-512
    # GEMM: 1.0-1.31x from 56x56 to 112x112, 1.7-1.8x at 224x224.
    side = 56 if own_cpu_gemm else 160
    if (transposed and dtype == torch.float32 and tuple(kernel) == (2, 2) and tuple(stride) == (2, 2)
            and spatial >= side * side and macs >= 20_000_000):
        speed = "segops' AVX-512 GEMM (1.0-1.8x oneDNN)" if own_cpu_gemm else "segops' GEMM (1.4-2.5x oneDNN)"
        return False, False, "cpu: 2x2/2 transposed on maps of %dx%d and more: %s" % (side, side, speed)
    return True, True, "cpu: dense convolution: oneDNN (segops' GEMMs 0.5-0.95x here)"


@dataclass(frozen=True)
class KernelChoice:
    """The kernels one convolution call runs, and why."""

    op: str  # "atrous_conv2d" or "conv_transpose2d"
    forward: str  # "segops" or "vendor"
    backward: str  # "segops" or "vendor"
    segops_kernel: str  # the segops kernel family of this geometry (see segops_kernel)
    backend: str  # the setting in force: "auto", "segops" or "vendor"
    reason: str

    def kernel_name(self, side: str) -> str:
        """``"segops:<family>"`` or ``"vendor"`` for ``side`` = ``"forward"`` / ``"backward"``."""
        s = getattr(self, side)
        return "segops:" + self.segops_kernel if s == "segops" else "vendor"

    @property
    def code(self) -> int:
        """The ops' ``route`` argument: VENDOR_FORWARD | VENDOR_BACKWARD bits."""
        forward = VENDOR_FORWARD if self.forward == "vendor" else 0
        return forward | (VENDOR_BACKWARD if self.backward == "vendor" else 0)


def _tap_share(size: int, k: int, pad: int, dil: int, stride: int = 1) -> float:
    """Share of the (kernel tap, output position) pairs along one axis whose input position lies inside the image
    (input = output * stride + tap * dil - pad); the gemm-rows kernel computes only those."""
    out = (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
    if out <= 0:
        return 1.0
    inside = 0
    for i in range(k):
        off = i * dil - pad
        # outputs o with 0 <= o * stride + off < size: o from ceil(-off / stride) to below ceil((size - off) / stride)
        lo, hi = max(0, -(off // stride)), min(out, -((off - size) // stride))
        inside += max(0, hi - lo)
    return inside / float(k * out)


def _decide(transposed: bool, input: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
            dilation: Sequence[int], groups: int, setting: str) -> Tuple[bool, bool, str, str]:
    """(vendor forward, vendor backward, segops kernel family, reason): the whole rule, cheap enough for every call."""
    w_shape = weight.shape
    if transposed:
        depthwise = w_shape[1] == 1 and groups == w_shape[0] and groups == w_shape[1] * groups
    else:
        depthwise = w_shape[1] == 1 and groups == input.shape[1] and groups == w_shape[0]
    kernel = (w_shape[2], w_shape[3])
    family = segops_kernel(depthwise, kernel, stride[0], stride[1], padding)
    if input.numel() == 0 or weight.numel() == 0:
        # ATen refuses an empty image ("Only zero batch or zero channel inputs are supported") or returns its
        # own shapes for empty channel dimensions; segops computes the defined result (the bias).
        return False, False, family, "empty input or weight: segops' defined result"
    if setting == "segops":
        return False, False, family, "forced: segops"
    if setting == "vendor":
        return True, True, family, "forced: vendor"
    rate = max([d for d, k in zip(dilation, kernel) if k > 1] or [1])  # the largest dilation that spreads taps
    dilated = rate > 1
    spatial = input.shape[2] * input.shape[3]
    share = 1.0
    if _OWN_CPU_GEMM and family == "gemm-rows" and not transposed and input.device.type == "cpu":
        # read by the CPU GEMM rule only
        share = (_tap_share(input.shape[2], kernel[0], padding[0], dilation[0], stride[0])
                 * _tap_share(input.shape[3], kernel[1], padding[1], dilation[1], stride[1]))
    vf, vb, reason = _rule(transposed, input.device.type, input.dtype, family, kernel, stride, dilated,
                           torch.are_deterministic_algorithms_enabled(), spatial,
                           input.shape[1] * w_shape[1] * spatial if transposed else w_shape[0] * w_shape[1] * spatial,
                           _OWN_CPU_GEMM, share, rate)
    return vf, vb, family, "auto: " + reason


def explain(transposed: bool, input: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
            dilation: Sequence[int], groups: int, backend: Optional[str] = None) -> KernelChoice:
    """The :class:`KernelChoice` for a call (4-D input; arguments as the ops take them, as pairs)."""
    op = "conv_transpose2d" if transposed else "atrous_conv2d"
    setting = _checked(backend, op + ": backend") if backend is not None else _backend
    vf, vb, family, reason = _decide(transposed, input, weight, stride, padding, dilation, groups, setting)
    return KernelChoice(op, "vendor" if vf else "segops", "vendor" if vb else "segops", family, setting, reason)


def choose(transposed: bool, input: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
           dilation: Sequence[int], groups: int, backend: Optional[str] = None) -> int:
    """The ops' ``route`` code for a call (see :func:`explain`)."""
    if backend is None:
        setting = _backend
    elif backend in BACKENDS:
        setting = backend
    else:
        setting = _checked(backend, ("conv_transpose2d" if transposed else "atrous_conv2d") + ": backend")
    if _recorder is not None:
        choice = explain(transposed, input, weight, stride, padding, dilation, groups, setting)
        _recorder.append(choice, input, weight, stride, padding, dilation, groups)
        return choice.code
    vf, vb, _, _ = _decide(transposed, input, weight, stride, padding, dilation, groups, setting)
    return (VENDOR_FORWARD if vf else 0) | (VENDOR_BACKWARD if vb else 0)


# ---- recording, for segops.nn.describe_kernels ------------------------------------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.layer: Optional[str] = None
        self.rows: List[dict] = []

    def append(self, choice: KernelChoice, input: Tensor, weight: Tensor, stride, padding, dilation, groups) -> None:
        self.rows.append(dict(layer=self.layer, choice=choice, input_shape=tuple(input.shape),
                              weight_shape=tuple(weight.shape), dtype=input.dtype, device=input.device,
                              stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation),
                              groups=int(groups)))


_recorder: Optional[_Recorder] = None


@contextlib.contextmanager
def recording() -> Iterator[_Recorder]:
    """Collects the :class:`KernelChoice` of every convolution call inside (not thread-safe; not under compile)."""
    global _recorder
    previous = _recorder
    _recorder = _Recorder()
    try:
        yield _recorder
    finally:
        _recorder = previous
