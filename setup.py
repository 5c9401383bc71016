"""Build script for segops._C (one extension: C++ CPU kernels always, CUDA kernels when available).

Switches (environment variables):
  SEGOPS_CUDA=0|1     force the CUDA sources off / on. Unset: on when torch is a CUDA build
                      (torch.version.cuda) AND a CUDA toolkit (nvcc) is found; a CUDA torch without nvcc
                      prints a loud warning and builds without CUDA kernels (ops then raise on CUDA
                      tensors). Never decided by torch.cuda.is_available(): a GPU-less build machine must
                      still ship CUDA kernels.
  TORCH_CUDA_ARCH_LIST  archs to compile for; default "8.0;9.0" when no GPU is visible.
  SEGOPS_DEBUG=1      -O0 -g builds (and -G for device code).
  SEGOPS_SANITIZE=1   -fsanitize=address,undefined on the C++ sources (see `make sanitize`);
  SEGOPS_SANITIZE=thread  -fsanitize=thread instead (see `make tsan`).
  SEGOPS_LDFLAGS      extra linker arguments (space-separated).
  SEGOPS_NO_BUILD_EXT=1  compile nothing: an editable install that only registers the package and the
                      `segops` command, for a tree whose extension is built in place (`make build` does
                      `setup.py build_ext --inplace` first, so a fresh clone compiles once, not twice).
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

try:
    import torch  # noqa: F401
except ImportError:
    sys.exit(
        "segops: PyTorch must be installed before building segops (e.g. `pip install torch==2.13.0`),\n"
        "then build without build isolation: `pip install --no-build-isolation -e .`"
    )

HERE = os.path.dirname(os.path.abspath(__file__))


# Why the CUDA kernels were left out (compiled into the build info that `segops info` reads).
CUDA_SKIPPED_BY_REQUEST, CUDA_SKIPPED_CPU_TORCH, CUDA_SKIPPED_NO_TOOLKIT = 1, 2, 3


def _cuda_toolkit_home():
    """The CUDA toolkit folder holding bin/nvcc, or None."""
    # torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script there yields a folder without headers.
    if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda/include"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = os.environ.get("PYTORCH_NVCC") or (os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None)
    if CUDA_HOME is None or nvcc is None or not os.path.isfile(nvcc):
        return None
    return CUDA_HOME


def _warn_no_toolkit() -> None:
    bar = "!" * 100
    print(
        "\n%s\n"
        "segops: WARNING: torch %s is a CUDA %s build, but no CUDA toolkit (nvcc) was found\n"
        "        (CUDA_HOME=%r, nvcc on PATH: %r).\n"
        "        segops is being built WITHOUT CUDA kernels: its ops will raise an error on CUDA tensors.\n"
        "        To build them: install the CUDA toolkit matching torch (CUDA %s), put nvcc on PATH or set\n"
        "        CUDA_HOME, and rebuild with SEGOPS_CUDA=1 (which fails instead of leaving CUDA out).\n"
        "        To build for the CPU only on purpose and silence this warning: SEGOPS_CUDA=0.\n"
        "%s\n"
        % (bar, torch.__version__, torch.version.cuda, os.environ.get("CUDA_HOME"), shutil.which("nvcc"),
           torch.version.cuda, bar),
        file=sys.stderr,
    )  # fmt: skip


def _cuda_decision():
    """(build the CUDA kernels?, why not: one of the CUDA_SKIPPED_* codes or 0)."""
    flag = os.environ.get("SEGOPS_CUDA", "").strip()
    if flag == "0":
        return False, CUDA_SKIPPED_BY_REQUEST
    toolkit = _cuda_toolkit_home()
    if flag == "1" and (torch.version.cuda is None or toolkit is None):
        sys.exit(
            "segops: SEGOPS_CUDA=1 but torch.version.cuda=%r and the CUDA toolkit (nvcc) %s; "
            "install a CUDA build of torch and a CUDA toolkit"
            % (torch.version.cuda, "is at %s" % toolkit if toolkit else "was not found (CUDA_HOME, PATH)")
        )
    if torch.version.cuda is None:
        return False, CUDA_SKIPPED_CPU_TORCH
    if toolkit is None:
        _warn_no_toolkit()
        return False, CUDA_SKIPPED_NO_TOOLKIT
    return True, 0


WITH_CUDA, CUDA_SKIPPED = _cuda_decision()
if WITH_CUDA and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    # cpp_extension's arch detection crashes when no GPU is visible.
    if torch.cuda.is_available():
        caps = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(caps)
    else:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

DEBUG = os.environ.get("SEGOPS_DEBUG", "0") == "1"
SANITIZE = os.environ.get("SEGOPS_SANITIZE", "0").strip()

cxx_flags = ["-O0", "-g"] if DEBUG else ["-O3"]
# -fno-trapping-math: segops never relies on floating-point traps, and without it GCC refuses to
# if-convert (and so to vectorise) the branch-free selects of the CPU fast paths.
cxx_flags += ["-fopenmp", "-fvisibility=hidden", "-fno-trapping-math"]  # cpp_extension adds -DPy_LIMITED_API
# -Wno-psabi: GCC notes that a function taking or returning a 32-byte vector has another calling convention with
# AVX than without; the CPU kernels' vector helpers are always inlined (into the baseline loops and their AVX2
# clones alike) and no exported function passes vectors, so the note is noise in every user's build log.
cxx_flags += ["-Wno-psabi"]
link_flags = ["-fopenmp"] + os.environ.get("SEGOPS_LDFLAGS", "").split()
if SANITIZE == "1":
    cxx_flags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
    link_flags += ["-fsanitize=address,undefined"]
elif SANITIZE == "thread":
    cxx_flags += ["-fsanitize=thread", "-fno-omit-frame-pointer", "-O1", "-g"]
    link_flags += ["-fsanitize=thread"]
elif SANITIZE not in ("", "0"):
    sys.exit("segops: SEGOPS_SANITIZE must be 0, 1 (address,undefined) or thread, got %r" % SANITIZE)

sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/common/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
kwargs = dict(
    include_dirs=[os.path.join(HERE, "csrc", "include")],
    extra_link_args=link_flags,
    py_limited_api=True,
)
if WITH_CUDA:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    if DEBUG:
        nvcc_flags = ["-O0", "-g", "-G", "--expt-relaxed-constexpr"]
    ext = CUDAExtension(
        "segops._C",
        sources,
        define_macros=[("SEGOPS_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        **kwargs,
    )
else:
    ext = CppExtension(
        "segops._C", sources, define_macros=[("SEGOPS_CUDA_SKIPPED", str(CUDA_SKIPPED))],
        extra_compile_args={"cxx": cxx_flags}, **kwargs,
    )  # fmt: skip

if shutil.which("ninja") is None:
    print("segops: ninja not found, building without it (slower; `pip install ninja`)", file=sys.stderr)


def check_libstdcxx_linkage(path: str) -> None:
    """Refuses an extension that carries its own copy of libstdc++'s exception runtime.

    Some compiler wrappers link libstdc++ statically (measured on the lent GPU machines: CXX=/opt/gcc/bin/g++).
    torch's c10::Error then crosses two C++ runtimes, and every failing argument check of every op kills
    Python with SIGSEGV instead of raising. `nm` shows it as __cxa_throw defined in the .so.
    """
    nm = shutil.which("nm")
    if nm is None:
        return
    out = subprocess.run([nm, "--defined-only", path], capture_output=True, text=True).stdout
    if re.search(r" [TtWw] __cxa_throw$", out, re.M):
        os.remove(path)
        sys.exit(
            "segops: the C++ compiler (CXX=%s) linked libstdc++ statically into %s; C++ exceptions from torch\n"
            "would then crash Python instead of raising. Build with a compiler that links libstdc++ dynamically,\n"
            "e.g. `CXX=/usr/bin/g++ CC=/usr/bin/gcc pip install --no-build-isolation .`"
            % (os.environ.get("CXX", "c++"), os.path.basename(path))
        )


class SegopsBuildExt(BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)):
    def build_extension(self, extension) -> None:
        super().build_extension(extension)
        check_libstdcxx_linkage(self.get_ext_fullpath(extension.name))


setup(
    ext_modules=[] if os.environ.get("SEGOPS_NO_BUILD_EXT") == "1" else [ext],
    cmdclass={"build_ext": SegopsBuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
