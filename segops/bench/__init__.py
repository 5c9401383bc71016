"""Microbenchmarks: segops ops against their pure-PyTorch twins, timed in one process.

``segops bench [SUITE ...] [--device cpu|cuda] [--quick] [--threads N] [--out DIR]`` prints a table and writes
``<out>/<date>-<device>-<suite>.json`` with the device, versions and every measured row (``--out`` defaults to
``./segops-bench-results`` in the current folder). Times are medians of
``torch.utils.benchmark`` ``blocked_autorange``; the headline is the ratio, since absolute times on shared
machines move with the load.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib
import json
import os
import platform
import statistics
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
import torch.utils.benchmark as tbench

# Suite name -> module under segops.bench exposing run(ctx) -> list of row dicts.
SUITES = ("losses", "crf", "conv", "models", "crf-inference")
# Where `segops bench` writes its JSON unless --out says otherwise: a folder of the current directory whose
# name says what it holds.
DEFAULT_OUT = "segops-bench-results"


class BenchContext:
    """What a suite needs: the device, the quick flag (small shapes for smoke tests), and timing helpers."""

    def __init__(self, device: str, quick: bool, min_run_time: float, progress=None) -> None:
        self.device = torch.device(device)
        self.quick = quick
        self.min_run_time = min_run_time
        self.progress = progress  # a progress bar counting timings (segops.progress.progress_bar), or None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn: Callable[[], Any]) -> float:
        """Median wall time of fn() in milliseconds (one warm-up call first)."""
        fn()
        self.sync()
        timer = tbench.Timer(stmt="fn()", globals={"fn": fn})
        m = timer.blocked_autorange(min_run_time=self.min_run_time)
        if self.progress is not None:
            self.progress.update(1)
        return m.median * 1e3

    def peak_bytes(self, fn: Callable[[], Any]) -> Optional[int]:
        """Peak device memory allocated during fn() (CUDA only; None on the CPU)."""
        if self.device.type != "cuda":
            return None
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        fn()
        self.sync()
        return torch.cuda.max_memory_allocated(self.device) - base


@contextlib.contextmanager
def cudnn_full_fp32() -> Iterator[None]:
    """cuDNN's TF32 shortcut off (it is on by default for convolutions): segops computes float32 products in
    full float32, so both sides of a convolution comparison must do the same arithmetic."""
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = prev


def saved_bytes(fn: Callable[[], Any], inputs: List[torch.Tensor]) -> int:
    """Bytes of storage saved for backward by fn(), not counting storage owned by `inputs`."""
    owned = {t.untyped_storage().data_ptr() for t in inputs}
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in owned:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
    """A closure running loss = fn(x); loss.backward() on a leaf x (grad cleared each call)."""

    def step() -> None:
        x.grad = None
        fn(x).backward()

    return step


def thread_scaling(fn: Callable[[], Any], rounds: int) -> Dict[str, float]:
    """fn() on 1 and on 2 CPU threads, alternated call by call, and beside it a compute-bound reference (a 768 x 768
    float32 matmul) alternated the same way: the ratio a perfectly parallel job got at the same moments. Each
    timed call follows an untimed one on the same thread count, as in a loop that keeps its thread count (timed
    straight after the other count, the dense CRF loss took ~12% longer on 1 thread, ~7% on 2: its data sat in
    the other core's cache).

    Shared virtual machines drift by up to 1.5x within minutes and lend the second core intermittently, so two
    blocks of timings taken one after the other compare two machines; calls interleaved with each other do not.
    The minimum of each is the call that ran with both cores available. Returns, in ms, ``threads_1_ms`` and
    ``threads_2_ms`` (minima over `rounds` calls each, after a warm-up call of each), their medians
    (``*_median_ms``), ``speedup`` (ratio of the minima) and the reference's ``gemm_threads_1_ms``,
    ``gemm_threads_2_ms`` and ``gemm_speedup``. The thread count is restored afterwards."""
    a = torch.randn(768, 768, generator=torch.Generator().manual_seed(0))
    jobs = {"": fn, "gemm_": lambda: torch.mm(a, a)}
    times: Dict[str, List[float]] = {"%sthreads_%d" % (name, n): [] for name in jobs for n in (1, 2)}
    old = torch.get_num_threads()
    try:
        for r in range(rounds + 1):
            for name, job in jobs.items():
                for n in (1, 2):
                    torch.set_num_threads(n)
                    job()  # untimed: the timed call finds the data where this thread count leaves it
                    t0 = time.perf_counter()
                    job()
                    if r > 0:  # round 0 warms each job up at each thread count
                        times["%sthreads_%d" % (name, n)].append((time.perf_counter() - t0) * 1e3)
    finally:
        torch.set_num_threads(old)
    out: Dict[str, float] = {}
    for key, ts in times.items():
        out[key + "_ms"] = min(ts)
        if not key.startswith("gemm_"):
            out[key + "_median_ms"] = statistics.median(ts)
    out["speedup"] = out["threads_1_ms"] / out["threads_2_ms"]
    out["gemm_speedup"] = out["gemm_threads_1_ms"] / out["gemm_threads_2_ms"]
    return out


def _cpu_model() -> Dict[str, Any]:
    """The CPU's model name and cache sizes (Linux), so that timings from different machine classes are not
    compared as one: the same 2-core VM type has run on CPUs 1.7x apart."""
    out: Dict[str, Any] = {"cpu_model": platform.processor() or None}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    out["cpu_model"] = value.strip()
                elif key in ("cpu family", "model"):  # a VM may show only the vendor in the name
                    out[{"cpu family": "cpu_family", "model": "cpu_model_number"}[key]] = value.strip()
                elif not line.strip():
                    break  # the first CPU's block is enough
    except OSError:  # not Linux: platform.processor() is what there is
        pass
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in sorted(os.listdir(base)):
            with open(os.path.join(base, idx, "level")) as fh:
                level = fh.read().strip()
            with open(os.path.join(base, idx, "type")) as fh:
                kind = fh.read().strip()
            with open(os.path.join(base, idx, "size")) as fh:
                size = fh.read().strip()
            if kind != "Instruction":
                out["cache_l%s" % level] = size
    except OSError:
        pass
    return out


def environment(device: torch.device) -> Dict[str, Any]:
    from segops.info import info

    env = info()
    env["date"] = _dt.date.today().isoformat()
    env["bench_device"] = str(device)
    env["machine"] = platform.machine()
    env["cpu_count"] = os.cpu_count()
    env.update(_cpu_model())
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        try:
            import subprocess

            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            ).stdout.strip()
        except Exception:  # nvidia-smi missing: the versions above still identify the run
            env["driver"] = None
    return env


def format_table(rows: List[Dict[str, Any]]) -> str:
    cols = [
        ("suite", "suite", "%s"),
        ("op", "op", "%s"),
        ("case", "case", "%s"),
        ("device", "device", "%s"),
        ("segops_ms", "segops ms", "%.3f"),
        ("torch_ms", "torch ms", "%.3f"),
        ("speedup", "speed-up", "%.2fx"),
        ("segops_mem", "segops mem", "%s"),
        ("torch_mem", "torch mem", "%s"),
    ]

    def cell(row: Dict[str, Any], key: str, fmt: str) -> str:
        v = row.get(key)
        if v is None:
            return "-"
        if key.endswith("_mem"):
            return _human_bytes(v)
        return fmt % v

    table = [[title for _, title, _ in cols]] + [[cell(r, k, f) for k, _, f in cols] for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return ("%.0f %s" if unit == "B" else "%.1f %s") % (n, unit)
        n /= 1024.0
    return str(n)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("suites", nargs="*", help="suites to run (default: all): " + ", ".join(SUITES))
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    p.add_argument("--quick", action="store_true", help="small shapes, short timing (smoke test)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before timing")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds per timing (default 1.0, quick 0.05)")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="folder for the JSON results, created if needed ('' = none; default ./%(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (shown only on a terminal anyway)")


def run_suites(names: List[str], ctx: BenchContext) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    for name in names:
        if name not in SUITES:
            raise SystemExit("segops bench: unknown suite %r (known: %s)" % (name, ", ".join(SUITES)))
        if ctx.progress is not None:
            ctx.progress.set_description("bench %s (timings)" % name)
        mod = importlib.import_module("segops.bench." + name.replace("-", "_"))
        for row in mod.run(ctx):
            row.setdefault("suite", name)
            row.setdefault("device", str(ctx.device))
            if row.get("segops_ms") and row.get("torch_ms"):
                row["speedup"] = row["torch_ms"] / row["segops_ms"]
            rows.append(row)
    return rows


def main(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    min_run = args.min_run_time if args.min_run_time is not None else (0.05 if args.quick else 1.0)
    from segops.progress import progress_bar

    names = list(args.suites) or list(SUITES)
    with progress_bar(enabled=getattr(args, "progress", True), unit="timing", leave=False) as bar:
        ctx = BenchContext(device, args.quick, min_run, progress=bar)
        rows = run_suites(names, ctx)
    print(format_table(rows))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        env = environment(ctx.device)
        tag = "gpu" if ctx.device.type == "cuda" else "cpu"
        name = "%s-%s-%s-%dthreads%s.json" % (
            env["date"], tag, "-".join(names), torch.get_num_threads(), "-quick" if args.quick else ""
        )
        path = os.path.join(args.out, name)
        with open(path, "w") as f:
            json.dump({"environment": env, "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)
        print("wrote", path)
    return 0
