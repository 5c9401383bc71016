"""Suite 'crf': the dense CRF and normalized-cut losses against their pure-PyTorch twins.

Rows (forward and backward timed separately; the backward is re-run on a retained graph):

* ``DenseCRFLoss fwd`` / ``bwd`` on synthetic image-like inputs and on real photos (scikit-image's astronaut and
  coffee, resized to 512 x 512; K = 21 softmax maps of N(0, 1) logits; the ECCV'18 settings weight 2e-9,
  sigma_rgb 15, sigma_xy 80; scale 1 and 0.5), with the lattice's vertex count. The twin computes the same loss
  with the pure-PyTorch lattice (segops.reference_lattice) and the same gradient formula, the ECCV'18 one: it
  keeps W X from its forward and multiplies it by 2 g in its backward, as segops does (segops keeps the
  blurred lattice values instead and slices them in the backward).
* ``NormalizedCutLoss fwd`` / ``bwd``: the twin's gradient is autograd's, exact like segops'.
* ``vs ECCV'18``: segops forward+backward on ONE thread against the ECCV'18 code's recorded timings on this
  machine class (0.384 s at scale 1, 0.111 s at scale 0.5, astronaut 512 x 512, B = 1).
* ``threads 2 vs 1``: segops forward+backward with 2 threads ("segops ms") and 1 thread ("torch ms"), calls
  alternated between the two, minima (:func:`segops.bench.thread_scaling`), with a matmul's 2-vs-1 ratio measured
  in the same rounds (``gemm_speedup``: what a perfectly parallel job got from the machine at the time).
* ``host ops`` (CPU only): per forward+backward, the work ops issued on the host, the lattice kernels and the
  device-to-host reads, for B = 1 and B = 12 (torch.profiler counts, not times; :func:`host_counts`).

Every row records the load average when it was measured (the machines are shared).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from segops import reference_lattice
from segops.bench import BenchContext, thread_scaling
from segops.nn import DenseCRFLoss, NormalizedCutLoss
from segops.ops.lattice import build_lattice, crf_features

ECCV_WEIGHT, ECCV_SIGMA_RGB, ECCV_SIGMA_XY, K = 2e-9, 15.0, 80.0, 21
# The ECCV'18 code's DenseCRFLoss forward+backward on one CPU thread, astronaut 512 x 512, K = 21, B = 1,
# recorded on this project's CPU machine class (seconds -> ms): scale 1, scale 0.5.
ECCV18_MS = {1.0: 384.0, 0.5: 111.0}


def synthetic_image(B: int, H: int, W: int, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) float in 0..255: bicubic-upsampled 8x8 colour field, a red disc, Gaussian noise (sd 4)."""
    low = F.interpolate(torch.rand(B, 3, 8, 8, generator=generator) * 255, size=(H, W), mode="bicubic",
                        align_corners=False)
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    disc = (((yy - H / 2) ** 2 + (xx - W / 3) ** 2) < (H / 5) ** 2).float()
    img = low * (1 - disc) + disc * torch.tensor([200.0, 30.0, 40.0]).view(1, 3, 1, 1)
    return (img + torch.randn(B, 3, H, W, generator=generator) * 4).clamp(0, 255)


def photo(name: str, size: int = 512) -> torch.Tensor:
    """scikit-image's ``data.<name>()`` as (1, 3, size, size) float 0..255 (bilinear resize; a bench-only
    dependency)."""
    from skimage import data  # imported here: scikit-image is a test / benchmark peer, not a dependency

    img = torch.from_numpy(getattr(data, name)().copy()).permute(2, 0, 1)[None].float()
    if img.shape[2:] != (size, size):
        img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 255)
    return img


class _TwinQuadratic(torch.autograd.Function):
    """sum X W X with the pure-PyTorch lattice; keeps W X for the ECCV'18 gradient 2 g W X (segops' formula)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        wx = reference_lattice.permutohedral_filter(x, feats)
        ctx.save_for_backward(wx)
        return (x * wx).sum()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (wx,) = ctx.saved_tensors
        return 2 * g * wx, None


def twin_dense_crf_loss(images: torch.Tensor, segmentations: torch.Tensor, weight: float, sigma_rgb: float,
                        sigma_xy: float, scale_factor: float = 1.0) -> torch.Tensor:
    """The pure-PyTorch twin of :func:`segops.ops.dense_crf_loss` (no rois) with the same gradient formula."""
    B = images.shape[0]
    if scale_factor != 1.0:
        images = F.interpolate(images, scale_factor=scale_factor, mode="nearest")
        segmentations = F.interpolate(segmentations, scale_factor=scale_factor, mode="bilinear", align_corners=False)
        sigma_xy = sigma_xy * scale_factor
    feats = reference_lattice.crf_features(images, sigma_rgb, sigma_xy)
    return -(weight / B) * _TwinQuadratic.apply(segmentations, feats)


def twin_normalized_cut_loss(images, segmentations, weight, sigma_rgb, sigma_xy, scale_factor=1.0):
    return reference_lattice.normalized_cut_loss(images, segmentations, weight, sigma_rgb, sigma_xy, scale_factor)


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _load() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # no load average on this platform
        return None


def _fwd_bwd_ms(ctx: BenchContext, loss_fn: LossFn, img: torch.Tensor, seg: torch.Tensor) -> Tuple[float, float]:
    """Median forward ms (the graph is built, as in training) and backward ms (re-run on a retained graph)."""
    fwd = ctx.time_ms(lambda: loss_fn(img, seg))
    loss = loss_fn(img, seg)

    def backward() -> None:
        seg.grad = None
        loss.backward(retain_graph=True)

    return fwd, ctx.time_ms(backward)


def _step(loss_fn: LossFn, img: torch.Tensor, seg: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        seg.grad = None
        loss_fn(img, seg).backward()

    return run


def _segmentation(B: int, H: int, W: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.softmax(torch.randn(B, K, H, W, generator=g), 1).to(device).requires_grad_()


def _vertices(img: torch.Tensor, scale: float) -> int:
    if scale != 1.0:
        img = F.interpolate(img, scale_factor=scale, mode="nearest")
    return build_lattice(crf_features(img, ECCV_SIGMA_RGB, ECCV_SIGMA_XY * scale)).num_vertices


def _pair_rows(ctx: BenchContext, name: str, ours: LossFn, twin: Optional[LossFn], img: torch.Tensor,
               seg: torch.Tensor, case: str, extra: Dict[str, Any]) -> List[Dict[str, Any]]:
    load = _load()
    f_ours, b_ours = _fwd_bwd_ms(ctx, ours, img, seg)
    f_twin, b_twin = _fwd_bwd_ms(ctx, twin, img, seg) if twin is not None else (None, None)
    rows = []
    for part, mine, theirs in (("fwd", f_ours, f_twin), ("bwd", b_ours, b_twin)):
        rows.append(dict(op="%s %s" % (name, part), case=case, segops_ms=mine, torch_ms=theirs, load=load, **extra))
    return rows


# ---- host-side counts ------------------------------------------------------------------------------------------

# Profiler events that move no data: views, allocations, metadata.
_NOT_WORK = {
    "aten::view", "aten::reshape", "aten::expand", "aten::select", "aten::slice", "aten::unsqueeze", "aten::squeeze",
    "aten::permute", "aten::transpose", "aten::t", "aten::as_strided", "aten::alias", "aten::unbind", "aten::detach",
    "aten::flatten", "aten::_reshape_alias", "aten::narrow", "aten::view_as", "aten::expand_as", "aten::lift_fresh",
    "aten::resolve_conj", "aten::resolve_neg", "aten::empty", "aten::empty_like", "aten::empty_strided",
    "aten::new_empty", "aten::new_empty_strided", "aten::result_type", "aten::size", "aten::stride", "aten::numel",
    "aten::_unsafe_view", "aten::resize_",
}


def issued_work(events) -> List[str]:
    """The work a call issued, from torch.profiler events: every aten op issued by Python, autograd or segops'
    C++ (once, however it is composed inside) that is not a view or an allocation, and every segops kernel
    launch ("segops_kernel::" scopes). ``aten::to`` / ``contiguous`` / ``reshape`` that returned their input
    are not work."""
    out: List[str] = []

    def walk(e) -> None:
        n = e.name
        if n.startswith("segops_kernel::"):
            out.append(n)
        elif n.startswith("segops::"):
            for c in e.cpu_children:
                walk(c)
        elif n.startswith("aten::"):
            if n in _NOT_WORK:
                return
            if n in ("aten::to", "aten::contiguous", "aten::reshape") and all(
                    c.name in _NOT_WORK for c in e.cpu_children):
                return
            out.append(n)
        else:
            for c in e.cpu_children:
                walk(c)

    for e in events:
        if e.cpu_parent is None:
            walk(e)
    return out


def host_counts(loss_fn: LossFn, images: torch.Tensor, segmentations: torch.Tensor) -> Dict[str, int]:
    """Per forward+backward of ``loss_fn(images, segmentations)``: host work ops (:func:`issued_work`, kernels
    apart), lattice kernel launches, and device-to-host reads (``aten::_local_scalar_dense``)."""
    seg = segmentations.detach().requires_grad_()
    loss_fn(images, seg).backward()  # warm-up: one-time work (registration, caches) is not per call
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss_fn(images, seg).backward()
    events = prof.events()
    work = issued_work(events)
    kernels = sum(1 for n in work if n.startswith("segops_kernel::"))
    return dict(ops=len(work) - kernels, kernels=kernels,
                reads=sum(1 for e in events if e.name == "aten::_local_scalar_dense"))


def _host_rows(g: torch.Generator) -> List[Dict[str, Any]]:
    """Host counts with the CPU's own lattice build and with the shared one (CUDA's, run on the CPU through
    SEGOPS_LATTICE_SHARED_BUILD=1: its launches and its one read are what a CUDA call issues)."""
    rows = []
    old = os.environ.get("SEGOPS_LATTICE_SHARED_BUILD")
    try:
        for build, flag in (("CPU build", "0"), ("shared build (CUDA's)", "1")):
            os.environ["SEGOPS_LATTICE_SHARED_BUILD"] = flag
            for name, cls in (("DenseCRFLoss", DenseCRFLoss), ("NormalizedCutLoss", NormalizedCutLoss)):
                for scale in (1.0, 0.5):
                    counts = {}
                    for B in (1, 12):
                        img = synthetic_image(B, 64, 64, g)
                        seg = torch.softmax(torch.randn(B, K, 64, 64, generator=g), 1)
                        counts[B] = host_counts(cls(ECCV_WEIGHT, ECCV_SIGMA_RGB, ECCV_SIGMA_XY, scale), img, seg)
                    rows.append(dict(
                        op="%s host ops" % name,
                        case="fwd+bwd, %s, B=1 / B=12, scale=%g: ops %d / %d, kernels %d / %d, reads %d / %d" % (
                            build, scale, counts[1]["ops"], counts[12]["ops"], counts[1]["kernels"],
                            counts[12]["kernels"], counts[1]["reads"], counts[12]["reads"]),
                        counts={str(b): c for b, c in counts.items()}))
    finally:
        if old is None:
            os.environ.pop("SEGOPS_LATTICE_SHARED_BUILD", None)
        else:
            os.environ["SEGOPS_LATTICE_SHARED_BUILD"] = old
    return rows


# ---- the suite -------------------------------------------------------------------------------------------------


def run(ctx: BenchContext) -> List[Dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    dev = ctx.device
    rows: List[Dict[str, Any]] = []
    losses = (("DenseCRFLoss", DenseCRFLoss, twin_dense_crf_loss),
              ("NormalizedCutLoss", NormalizedCutLoss, twin_normalized_cut_loss))

    # synthetic image-like inputs, segops vs the twin
    if ctx.quick:
        cases = [(1, 64, 1.0), (1, 64, 0.5)]
    elif dev.type == "cuda":
        cases = [(1, 256, 1.0), (1, 512, 1.0), (12, 257, 1.0), (4, 512, 1.0), (4, 512, 0.5)]
    else:
        cases = [(B, S, s) for S in (256, 512) for B in (1, 4) for s in (1.0, 0.5)]
    for B, S, scale in cases:
        img = synthetic_image(B, S, S, g).to(dev)
        seg = _segmentation(B, S, S, g, dev)
        for name, cls, twin in losses:
            ours = cls(ECCV_WEIGHT, ECCV_SIGMA_RGB, ECCV_SIGMA_XY, scale)
            twin_fn = None
            if not (dev.type == "cuda" and B * S * S > 300_000):  # the twin's lattice on big GPU batches: minutes
                twin_fn = (lambda i, s, t=twin, sc=scale: t(i, s, ECCV_WEIGHT, ECCV_SIGMA_RGB, ECCV_SIGMA_XY, sc))
            rows += _pair_rows(ctx, name, ours, twin_fn, img, seg, "synthetic B=%d %dx%d K=%d scale=%g" % (
                B, S, S, K, scale), {})

    # real photos at the ECCV'18 settings
    S = 64 if ctx.quick else 512
    photos = {}
    for pname in ("astronaut", "coffee"):
        try:
            photos[pname] = photo(pname, S)
        except ImportError:  # scikit-image missing: the synthetic rows above still run
            break
    for pname, img in photos.items():
        seg = _segmentation(1, S, S, g, dev)
        for scale in (1.0, 0.5):
            M = _vertices(img, scale)
            for name, cls, twin in losses:
                ours = cls(ECCV_WEIGHT, ECCV_SIGMA_RGB, ECCV_SIGMA_XY, scale)
                twin_fn = (lambda i, s, t=twin, sc=scale: t(i, s, ECCV_WEIGHT, ECCV_SIGMA_RGB, ECCV_SIGMA_XY, sc))
                rows += _pair_rows(ctx, name, ours, twin_fn, img.to(dev), seg,
                                   "%s B=1 %dx%d K=%d scale=%g, M=%d vertices" % (pname, S, S, K, scale, M),
                                   dict(vertices=M))

    # one CPU thread against the ECCV'18 code's recorded time; thread scaling
    if "astronaut" in photos and dev.type == "cpu":
        img = photos["astronaut"]
        seg = _segmentation(1, S, S, g, dev)
        old = torch.get_num_threads()
        try:
            for scale in (1.0, 0.5):
                for name, cls, _ in losses:
                    step = _step(cls(ECCV_WEIGHT, ECCV_SIGMA_RGB, ECCV_SIGMA_XY, scale), img, seg)
                    load = _load()
                    case = "astronaut B=1 %dx%d K=%d scale=%g" % (S, S, K, scale)
                    if name == "DenseCRFLoss" and not ctx.quick:
                        torch.set_num_threads(1)
                        rows.append(dict(op="DenseCRFLoss fwd+bwd 1 thread vs ECCV'18 (recorded)", case=case,
                                         segops_ms=ctx.time_ms(step), torch_ms=ECCV18_MS[scale], load=load))
                    sc = thread_scaling(step, 2 if ctx.quick else 15)
                    note = " (torch ms = 1 thread; minima of alternated calls; a matmul got %.2fx)" % sc["gemm_speedup"]
                    rows.append(dict(op="%s fwd+bwd threads 2 vs 1" % name, case=case + note,
                                     segops_ms=sc["threads_2_ms"], torch_ms=sc["threads_1_ms"], load=load, **sc))
        finally:
            torch.set_num_threads(old)

    if dev.type == "cuda" and "astronaut" in photos:
        # The ECCV'18 comparison on a GPU machine: "torch ms" = segops on 1 CPU thread.
        img = photos["astronaut"]
        seg = _segmentation(1, S, S, g, torch.device("cpu"))
        loss = DenseCRFLoss(ECCV_WEIGHT, ECCV_SIGMA_RGB, ECCV_SIGMA_XY, 1.0)
        gpu = _step(loss, img.to(dev), seg.detach().to(dev).requires_grad_())
        cpu_ctx = BenchContext("cpu", ctx.quick, ctx.min_run_time)
        old = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = cpu_ctx.time_ms(_step(loss, img, seg))
        finally:
            torch.set_num_threads(old)
        rows.append(dict(op="DenseCRFLoss GPU vs 1 CPU thread", case="astronaut B=1 %dx%d K=%d scale=1 (torch ms = "
                         "segops, 1 CPU thread)" % (S, S, K), segops_ms=ctx.time_ms(gpu), torch_ms=one,
                         cpu_1thread_ms=one))

    if dev.type == "cpu":
        rows += _host_rows(g)
    return rows
