"""What this segops binary was built with and what it can use (``segops info``)."""

from __future__ import annotations

import platform
from typing import Any, Dict

import torch


# setup.py's codes for why a build has no CUDA kernels (the build info's ``cuda_skipped``).
CUDA_SKIPPED_REASONS = {
    "1": "left out on request (SEGOPS_CUDA=0)",
    "2": "torch was a CPU build when segops was built",
    "3": "no CUDA toolkit (nvcc) was found when segops was built",
}


def build_info() -> Dict[str, str]:
    """Facts compiled into ``segops._C``: cuda (0/1), cuda_skipped (why not, a code of
    :data:`CUDA_SKIPPED_REASONS`), openmp (version macro), compiler, cuda_archs."""
    raw = torch.ops.segops._build_info()
    out: Dict[str, str] = {}
    for item in raw.split(";"):
        if "=" in item:
            key, value = item.split("=", 1)
            out[key] = value
    return out


def _format_archs(archs: str) -> str:
    # nvcc's __CUDA_ARCH_LIST__ is "800,900" -> "sm_80, sm_90"
    return ", ".join("sm_%d" % (int(a) // 10) for a in archs.split(",") if a.strip())


def info() -> Dict[str, Any]:
    """A dict describing versions, compiled kernels, visible devices and threads."""
    import segops

    b = build_info()
    d: Dict[str, Any] = {
        "segops": segops.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda_kernels_compiled": b.get("cuda") == "1",
        "cuda_archs": _format_archs(b.get("cuda_archs", "")) if b.get("cuda") == "1" else "",
        "openmp": b.get("openmp", "0") != "0",
        "compiler": b.get("compiler", ""),
        "cpu_threads": torch.get_num_threads(),
        # the CPU convolutions' float matrix products: segops' AVX-512 GEMM or ATen's BLAS (docs/ops/convolution.md)
        "cpu_gemm": "segops (AVX-512)" if torch.ops.segops._cpu_gemm_enabled() else "ATen BLAS",
        "cuda_available": torch.cuda.is_available(),
        "devices": ["cpu"],
        "warnings": [],
    }
    if b.get("cuda") != "1":
        d["cuda_skipped"] = CUDA_SKIPPED_REASONS.get(b.get("cuda_skipped", ""), "unknown reason")
        if torch.version.cuda is not None:
            d["warnings"].append(
                "segops was built without CUDA kernels (%s), but this torch is a CUDA %s build: every segops op "
                "raises an error on CUDA tensors. Rebuild segops with the CUDA toolkit (nvcc) on PATH: "
                "SEGOPS_CUDA=1 pip install --no-build-isolation -e . (see docs/install.md)"
                % (d["cuda_skipped"], torch.version.cuda)
            )
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            d["devices"].append("cuda:%d %s (sm_%d%d, %.0f GiB)" % (i, p.name, p.major, p.minor, p.total_memory / 2**30))
    return d


def format_info(d: Dict[str, Any]) -> str:
    rows = [
        ("segops", d["segops"]),
        ("torch", "%s (CUDA %s)" % (d["torch"], d["torch_cuda"]) if d["torch_cuda"] else d["torch"] + " (CPU build)"),
        ("python", d["python"]),
        ("platform", d["platform"]),
        ("compiler", d["compiler"]),
        ("CPU kernels", "yes, OpenMP %s" % ("on" if d["openmp"] else "OFF (single-threaded)")),
        ("CPU threads", d["cpu_threads"]),
        ("CPU GEMM", d["cpu_gemm"]),
        ("CUDA kernels", ("yes, for " + d["cuda_archs"]) if d["cuda_kernels_compiled"] else "not compiled: " + d["cuda_skipped"]),
        ("devices", ", ".join(d["devices"])),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["%s  %s" % (k.ljust(width), v) for k, v in rows]
    return "\n".join(lines + ["WARNING: " + w for w in d.get("warnings", [])])
