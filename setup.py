"""Build script for segops._C (one extension: C++ CPU kernels always, CUDA kernels when available).

Switches (environment variables):
  SEGOPS_CUDA=0|1     force the CUDA sources off / on. Unset: on when torch is a CUDA build
                      (torch.version.cuda) AND a CUDA toolkit (nvcc) is found. Never decided by
                      torch.cuda.is_available(): a GPU-less build machine must still ship CUDA kernels.
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


def _want_cuda() -> bool:
    flag = os.environ.get("SEGOPS_CUDA", "").strip()
    if flag == "0":
        return False
    # torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script there yields a folder without headers.
    if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda/include"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    from torch.utils.cpp_extension import CUDA_HOME

    have = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "1" and not have:
        sys.exit(
            "segops: SEGOPS_CUDA=1 but torch.version.cuda=%r and CUDA_HOME=%r; "
            "install a CUDA build of torch and a CUDA toolkit" % (torch.version.cuda, CUDA_HOME)
        )
    return have


WITH_CUDA = _want_cuda()
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
    ext = CppExtension("segops._C", sources, extra_compile_args={"cxx": cxx_flags}, **kwargs)

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
