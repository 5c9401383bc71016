"""Suite 'crf-inference': dense CRF mean-field inference against pydensecrf2 (Kraehenbuehl's densecrf 2 code), in
one process.

CPU rows: scikit-image's astronaut at 512 x 512 (a synthetic image-like picture when scikit-image is missing),
random Dirichlet unaries, K = 21. "segops ms" includes building segops' lattices; "torch ms" is the peer:
pydensecrf2's ``inference(n)`` with its lattice built beforehand (as a user's code does), one thread (it has no
threads), or the same mean field written with plain torch ops on segops' lattice. Each row records the largest
difference of the marginals to pydensecrf2's and the machine's load average. The CPU jobs' calls alternate (segops,
torch ops, pydensecrf2, segops, ...) and each keeps its fastest call, so the ratios compare the same machine; the
"threads 2 vs 1" row alternates 1- and 2-thread calls the same way, with a matmul's 2-vs-1 ratio from the same
rounds as the machine's reference (:func:`segops.bench.thread_scaling`). CUDA rows: a batch of 8 on the GPU
against pydensecrf2 over the same 8 images on one CPU thread.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from segops.bench import BenchContext, thread_scaling
from segops.bench.crf import synthetic_image
from segops.ops.crf_inference import MeanFieldCRF, dense_crf_inference

# pydensecrf2's defaults for the two kernels, as in its README: gaussian (sxy, compat), bilateral (sxy, srgb, compat)
BILATERAL = (80.0, 13.0, 10.0)
GAUSSIAN = (3.0, 3.0)


def _optional(name: str):
    try:
        import importlib

        return importlib.import_module(name)
    except ImportError:
        return None


def photo(S: int, generator: torch.Generator) -> Tuple[np.ndarray, str]:
    """(S, S, 3) uint8: the astronaut (resized crop when S != 512), else the synthetic picture of suite 'crf'."""
    skdata = _optional("skimage.data")
    if skdata is not None:
        im = skdata.astronaut()
        if S != im.shape[0]:
            im = torch.nn.functional.interpolate(torch.from_numpy(im).permute(2, 0, 1)[None].float(), size=(S, S),
                                                 mode="area")[0].permute(1, 2, 0).round().byte().numpy()
        return np.ascontiguousarray(im), "astronaut"
    img = synthetic_image(1, S, S, generator)[0].permute(1, 2, 0).round().byte().numpy()
    return np.ascontiguousarray(img), "synthetic"


def unaries(B: int, K: int, S: int, seed: int) -> np.ndarray:
    """(B, K, S, S) float32 -log p of Dirichlet(0.5) class probabilities clipped at 1e-5."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(K, 0.5), size=(B, S, S)).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(-np.log(np.clip(p, 1e-5, 1.0)).astype(np.float32))


def pydensecrf_program(unary: np.ndarray, image: np.ndarray, gaussian, bilateral):
    """A DenseCRF2D with its kernels added (lattices built), or None without pydensecrf2."""
    dcrf = _optional("pydensecrf.densecrf")
    if dcrf is None:
        return None
    K, H, W = unary.shape
    d = dcrf.DenseCRF2D(W, H, K)
    d.setUnaryEnergy(np.ascontiguousarray(unary.reshape(K, -1)))
    if gaussian:
        d.addPairwiseGaussian(sxy=gaussian[0], compat=gaussian[1])
    if bilateral:
        d.addPairwiseBilateral(sxy=bilateral[0], srgb=bilateral[1], rgbim=image, compat=bilateral[2])
    return d


def _min_ms(fns: List[Callable[[], Any]], runs: int) -> List[Tuple[float, float]]:
    """Per job, (smallest wall time, smallest process CPU time) of `runs` calls after a warm-up, in ms: for peers
    too slow for blocked_autorange. The jobs' calls alternate (a, b, c, a, b, c, ...), so that every job sees the
    same machine (the shared VMs drift by up to 1.5x within minutes). On one thread the CPU time is the work
    itself, whatever else loads the machine."""
    for fn in fns:
        fn()
    wall = [float("inf")] * len(fns)
    cpu = [float("inf")] * len(fns)
    for _ in range(runs):
        for i, fn in enumerate(fns):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[i], cpu[i] = min(wall[i], time.perf_counter() - t0), min(cpu[i], time.process_time() - c0)
    return [(w * 1e3, c * 1e3) for w, c in zip(wall, cpu)]


def _threads(n: int):
    class _Scope:
        def __enter__(self):
            self.old = torch.get_num_threads()
            torch.set_num_threads(n)

        def __exit__(self, *exc):
            torch.set_num_threads(self.old)

    return _Scope()


def _torch_ops_inference(unary: torch.Tensor, images: torch.Tensor, iterations: int, gaussian, bilateral):
    """The same mean field in plain torch ops on segops' lattice (no fused update): the 'eager PyTorch' peer."""
    crf = MeanFieldCRF(unary)
    if gaussian:
        crf.add_pairwise_gaussian(gaussian[0], gaussian[1])
    if bilateral:
        crf.add_pairwise_bilateral(bilateral[0], bilateral[1], images, bilateral[2])
    q = torch.softmax(-crf.unary, 1)
    for _ in range(iterations):
        q = torch.softmax(crf._logits(q), 1)
    return q


def _case_name(B: int, S: int, K: int, iterations: int, gaussian, bilateral, picture: str) -> str:
    kernels = "+".join(k for k, on in (("gaussian", gaussian), ("bilateral", bilateral)) if on)
    return "%s B=%d %dx%d K=%d %d it, %s" % (picture, B, S, S, K, iterations, kernels)


def _cpu_rows(ctx: BenchContext, g: torch.Generator) -> List[Dict[str, Any]]:
    S, K = (64, 21) if ctx.quick else (512, 21)
    image, picture = photo(S, g)
    unary = unaries(1, K, S, seed=0)
    u = torch.from_numpy(unary)
    im = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
    runs = 2 if ctx.quick else 5
    rows: List[Dict[str, Any]] = []
    settings = [(5, None, BILATERAL), (10, GAUSSIAN, (121.0, 5.0, 4.0))]  # bilateral only; DeepLab's defaults
    for iterations, gaussian, bilateral in settings[: 1 if ctx.quick else 2]:
        gc = gaussian[1] if gaussian else 0.0
        gs = gaussian[0] if gaussian else 3.0

        def ours() -> torch.Tensor:
            return dense_crf_inference(u, im, iterations, gs, gc, bilateral[0], bilateral[1], bilateral[2])

        d = pydensecrf_program(unary[0], image, gaussian, bilateral)
        diff: Optional[float] = None
        if d is not None:
            ref = np.array(d.inference(iterations)).reshape(K, S, S)
            diff = float(np.abs(ours()[0].numpy() - ref).max())
        case = _case_name(1, S, K, iterations, gaussian, bilateral, picture)
        for threads in (1, 2):
            with _threads(threads):
                jobs = [ours, lambda: _torch_ops_inference(u, im, iterations, gaussian, bilateral)]
                if d is not None:
                    jobs.append(lambda: d.inference(iterations))
                (seg, seg_cpu), (eager, eager_cpu), *more = _min_ms(jobs, runs)
                peer, peer_cpu = more[0] if more else (None, None)
            load = os.getloadavg()[0]
            rows.append(dict(op="dense CRF inference vs pydensecrf2 (1 thread)", case=case + ", %d threads" % threads,
                             segops_ms=seg, torch_ms=peer, threads=threads, max_abs_diff_vs_pydensecrf=diff,
                             segops_cpu_ms=seg_cpu, pydensecrf_cpu_ms=peer_cpu, eager_torch_ops_ms=eager,
                             eager_torch_ops_cpu_ms=eager_cpu, loadavg=load))
            if threads == 1 and d is not None:  # process CPU time: robust on a loaded machine
                rows.append(dict(op="dense CRF inference vs pydensecrf2, CPU time", case=case + ", 1 thread",
                                 segops_ms=seg_cpu, torch_ms=peer_cpu, threads=1, loadavg=load))
            rows.append(dict(op="dense CRF inference vs torch ops (same lattice)", case=case + ", %d threads"
                             % threads, segops_ms=seg, torch_ms=eager, threads=threads, loadavg=load))
        sc = thread_scaling(ours, 2 if ctx.quick else 15)
        rows.append(dict(op="dense CRF inference threads 2 vs 1", case=case + " (torch ms = 1 thread; minima of "
                         "alternated calls; a matmul got %.2fx)" % sc["gemm_speedup"], segops_ms=sc["threads_2_ms"], torch_ms=sc["threads_1_ms"],
                         loadavg=os.getloadavg()[0], **sc))
    return rows


def _cuda_rows(ctx: BenchContext, g: torch.Generator) -> List[Dict[str, Any]]:
    B, S, K = (2, 64, 21) if ctx.quick else (8, 512, 21)
    image, picture = photo(S, g)
    images = torch.from_numpy(image).permute(2, 0, 1)[None].expand(B, 3, S, S).contiguous()
    unary = unaries(B, K, S, seed=1)
    u, im = torch.from_numpy(unary).to(ctx.device), images.to(ctx.device)
    rows: List[Dict[str, Any]] = []
    for iterations, gaussian, bilateral in [(10, None, BILATERAL), (10, GAUSSIAN, (121.0, 5.0, 4.0))]:
        gc = gaussian[1] if gaussian else 0.0
        gs = gaussian[0] if gaussian else 3.0

        def ours() -> torch.Tensor:
            return dense_crf_inference(u, im, iterations, gs, gc, bilateral[0], bilateral[1], bilateral[2])

        seg = ctx.time_ms(ours)
        peer = diff = None
        progs = [pydensecrf_program(unary[b], image, gaussian, bilateral) for b in range(B)]
        if progs[0] is not None:
            q = ours().cpu().numpy()
            diff = max(float(np.abs(q[b] - np.array(p.inference(iterations)).reshape(K, S, S)).max())
                       for b, p in enumerate(progs))
            peer = _min_ms([lambda: [p.inference(iterations) for p in progs]], 1)[0][0]
        rows.append(dict(op="dense CRF inference GPU vs pydensecrf2 (1 CPU thread)",
                         case=_case_name(B, S, K, iterations, gaussian, bilateral, picture), segops_ms=seg,
                         torch_ms=peer, segops_mem=ctx.peak_bytes(ours), max_abs_diff_vs_pydensecrf=diff))
    return rows


def run(ctx: BenchContext) -> List[Dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    if ctx.device.type == "cuda":
        return _cuda_rows(ctx, g)
    return _cpu_rows(ctx, g)
