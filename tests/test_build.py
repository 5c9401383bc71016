"""The build itself: the extension loads, reports what it contains, and OpenMP really runs in parallel."""

import subprocess
import sys

import pytest
import torch

import segops


def test_info_reports_build():
    d = segops.info()
    assert d["segops"] == segops.__version__
    assert d["torch"] == torch.__version__
    assert d["openmp"] is True, "extension compiled without -fopenmp: at::parallel_for runs on one thread"
    if d["cuda_kernels_compiled"]:
        assert d["cuda_archs"].startswith("sm_")


def test_parallel_for_uses_two_threads():
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.ops.segops._parallel_threads(100_000) == 2
        torch.set_num_threads(1)
        assert torch.ops.segops._parallel_threads(100_000) == 1
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("argv", [["info"], ["info", "--json"], ["--help"], ["bench", "--help"]])
def test_cli_runs(argv):
    r = subprocess.run([sys.executable, "-m", "segops"] + argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_cli_bench_quick(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "segops", "bench", "losses", "--quick", "--device", "cpu", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "partial_cross_entropy" in r.stdout and "speed-up" in r.stdout
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    import json

    data = json.loads(files[0].read_text())
    assert data["environment"]["torch"] == torch.__version__
    assert all(row["segops_ms"] > 0 and row["torch_ms"] > 0 for row in data["rows"])


def test_thread_scaling_alternates_and_restores_the_thread_count():
    from segops.bench import thread_scaling

    seen = []

    def job():
        seen.append(torch.get_num_threads())
        return sum(range(20000))  # a few hundred microseconds of Python: a nonzero time

    before = torch.get_num_threads()
    out = thread_scaling(job, rounds=3)
    assert torch.get_num_threads() == before
    # a warm-up round, then 3 rounds, each calling 1 thread then 2 threads, twice each: an untimed call after the
    # switch (the data moves to where this thread count leaves it), then the timed one
    assert seen == [1, 1, 2, 2] * 4
    for key in ("threads_1_ms", "threads_2_ms", "gemm_threads_1_ms", "gemm_threads_2_ms"):
        assert out[key] > 0
    assert out["threads_1_ms"] <= out["threads_1_median_ms"] and out["threads_2_ms"] <= out["threads_2_median_ms"]
    assert out["speedup"] == out["threads_1_ms"] / out["threads_2_ms"]
    assert out["gemm_speedup"] == out["gemm_threads_1_ms"] / out["gemm_threads_2_ms"]


def _extension_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("segops._C")
    assert spec is not None and spec.origin, "segops._C not found"
    return spec.origin


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_failed_check_raises_not_crashes(device):
    # In a fresh process: a compiler that links libstdc++ statically turns every failing argument check into
    # SIGSEGV (seen on the GPU machines), which would otherwise only show up as a crashed test worker.
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    code = (
        "import segops, torch\n"
        "x = torch.randn(1, 3, 2, 2, device=%r); t = torch.zeros(1, 2, 2, dtype=torch.long, device=%r)\n"
        "t[0, 0, 0] = 7\n"
        "try:\n"
        "    segops.ops.partial_cross_entropy(x, t, check_labels=True)\n"  # CUDA: the synchronous check raises
        "except IndexError as e:\n"
        "    print('raised', 'target value 7' in str(e))\n" % (device, device)
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, "process died with %d: %s" % (r.returncode, r.stderr[-2000:])
    assert r.stdout.strip() == "raised True", r.stdout + r.stderr


def test_extension_links_libstdcxx_dynamically():
    import re
    import shutil

    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("needs binutils' nm")
    out = subprocess.run([nm, "--defined-only", _extension_path()], capture_output=True, text=True).stdout
    assert not re.search(r" [TtWw] __cxa_throw$", out, re.M), "segops._C carries a static libstdc++"
