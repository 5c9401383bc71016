"""First lines a user types: lazy `segops.models` / `metrics` / `data` / `train`, builds without CUDA kernels
(the error an op gives on CUDA tensors, what `segops info` says, setup.py's warning)."""

from __future__ import annotations

import importlib
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout

import pytest
import torch

import segops
from segops import cli

# the module (the package attribute `segops.info` is the function info())
info_module = importlib.import_module("segops.info")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAZY = ("segops.models", "segops.metrics", "segops.data", "segops.train")
BUILT_WITH_CUDA = info_module.build_info().get("cuda") == "1"


def test_import_is_lazy_and_attribute_access_imports():
    """In a fresh interpreter: `import segops` leaves the heavy parts unimported; `segops.models.get_model`
    (torchvision-style attribute access) then works and imports exactly what it touches."""
    probe = (
        "import json, sys, segops\n"
        "before = sorted(m for m in %r if m in sys.modules)\n"
        "model = segops.models.get_model('unet', 3, width=0.125)\n"
        "after_models = sorted(m for m in %r if m in sys.modules)\n"
        "names = [segops.metrics.ConfusionMatrix.__name__, segops.data.SyntheticScribbles.__name__,\n"
        "         segops.train.TrainConfig.__name__]\n"
        "print(json.dumps([before, after_models, type(model).__name__, names, 'models' in dir(segops)]))\n"
    ) % (LAZY, LAZY)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after_models, model_type, names, listed = json.loads(out.stdout.strip().splitlines()[-1])
    assert before == []
    assert "segops.models" in after_models and "segops.train" not in after_models
    assert model_type == "UNet"
    assert names == ["ConfusionMatrix", "SyntheticScribbles", "TrainConfig"]
    assert listed


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'modles'"):
        segops.modles  # noqa: B018


def _tensor_ops():
    """(qualified name, OpOverload) of every segops operator that takes tensors."""
    found = []
    for qualified in sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("segops::")):
        overload = getattr(torch.ops.segops, qualified.split("::", 1)[1]).default
        if any("Tensor" in str(arg.type) for arg in overload._schema.arguments):
            found.append((qualified, overload))
    return found


TENSOR_OPS = _tensor_ops()


def test_every_op_has_a_cuda_kernel():
    """Real CUDA kernels in a CUDA build, the explaining stub in a CPU-only one: never the dispatcher's
    "could not run ... with arguments from the 'CUDA' backend"."""
    assert len(TENSOR_OPS) >= 8  # the loss, lattice and convolution ops and their backward ops
    missing = [name for name, _ in TENSOR_OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")]
    assert missing == []


def _placeholder_args(schema):
    """Arguments of the right types for a schema (the CUDA-less stub never reads them)."""
    values = []
    for arg in schema.arguments:
        kind = str(arg.type)
        if kind == "Tensor":
            values.append(torch.zeros(1))
        elif kind == "List[Tensor]":
            values.append([torch.zeros(1)])
        elif kind == "List[float]":
            values.append([0.0])
        elif kind.startswith("Optional") or kind.endswith("?"):
            values.append(None)
        elif kind.startswith("List[int]") or kind == "int[]" or kind.startswith("int["):
            values.append([1, 1])
        elif kind.startswith("List[bool]") or kind.startswith("bool["):
            values.append([True, True, True])
        elif kind == "int":
            values.append(1)
        elif kind == "float":
            values.append(0.0)
        elif kind == "bool":
            values.append(False)
        else:
            raise AssertionError("no placeholder for argument type %s of %s" % (kind, schema.name))
    return values


@pytest.mark.skipif(BUILT_WITH_CUDA, reason="this build has real CUDA kernels (the CUDA parity tests cover them)")
@pytest.mark.parametrize("name, overload", TENSOR_OPS, ids=[n for n, _ in TENSOR_OPS])
def test_cuda_less_build_explains_itself_for_every_op(name, overload):
    """The kernel registered for the CUDA key in this CPU-only build, called straight through the dispatcher
    (no GPU is needed to reach it): the message names the op and the remedy."""
    cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with pytest.raises(RuntimeError) as err:
        overload.redispatch(cuda, *_placeholder_args(overload._schema))
    text = str(err.value)
    assert text.startswith("segops was built without CUDA kernels, so %s cannot run on CUDA tensors" % name)
    assert "move the inputs to the CPU" in text and "SEGOPS_CUDA=1 pip install --no-build-isolation" in text
    assert "segops info" in text


@pytest.mark.skipif(BUILT_WITH_CUDA, reason="this build has real CUDA kernels (the CUDA parity tests cover them)")
def test_cuda_less_build_error_through_the_python_api():
    """The public functions and modules, with the dispatcher told the inputs live on CUDA (the include guard
    adds the CUDA key to every call, as a CUDA tensor would): the same message reaches the user, through the
    Python wrappers and the autograd kernels. Only ops whose wrappers call no aten op first can be reached this
    way without a GPU (an aten op would meet CPU-only torch's own missing CUDA kernel)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 4), generator=g)
    weight = torch.randn(5, 3, 3, 3, generator=g)
    calls = {
        "segops::partial_cross_entropy": lambda: segops.ops.partial_cross_entropy(logits, target),
        "segops::entropy": lambda: segops.nn.EntropyLoss()(logits),
        # forced: "auto" routes a CUDA call of a CUDA-less build to cuDNN (test below)
        "segops::atrous_conv2d": lambda: segops.ops.atrous_conv2d(logits, weight, None, 1, 2, 2, backend="segops"),
    }
    for name, call in calls.items():
        with torch._C._IncludeDispatchKeyGuard(torch._C.DispatchKey.CUDA):
            with pytest.raises(RuntimeError, match="segops was built without CUDA kernels, so %s" % name):
                call()


@pytest.mark.parametrize("transposed, deterministic", [(True, False), (True, True), (False, True)])
def test_auto_conv_runs_cudnn_on_cuda_tensors_in_a_cuda_less_build(monkeypatch, transposed, deterministic):
    """A CUDA torch with a CPU-only segops build: "auto" never picks a segops kernel for a CUDA call (it could only
    raise), even where the rule prefers segops on a GPU (wide depthwise upsampling, deterministic dilation)."""
    from segops.ops import conv_choice

    kernel = (16, 16) if transposed else (3, 3)  # the shapes for which a CUDA build would pick segops
    args = (transposed, "cuda", torch.float32, "depthwise" if transposed else "gemm-rows", kernel, (1, 1), True,
            deterministic)
    monkeypatch.setattr(conv_choice, "_has_cuda_kernels", False)
    vendor_forward, vendor_backward, reason = conv_choice._rule(*args)
    assert vendor_forward and vendor_backward and "no CUDA kernels" in reason
    monkeypatch.setattr(conv_choice, "_has_cuda_kernels", True)
    assert not all(conv_choice._rule(*args)[:2])  # the same calls in a CUDA build: a segops kernel somewhere


def _info_text(monkeypatch, build, torch_cuda, argv=("info",)) -> str:
    monkeypatch.setattr(info_module, "build_info", lambda: build)
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(list(argv)) == 0
    return out.getvalue()


def test_info_warns_when_a_cuda_torch_meets_a_cuda_less_build(monkeypatch):
    """The build-info flag faked both ways: a CPU-only segops under a CUDA torch is flagged with the reason
    setup.py recorded and the remedy; a CUDA build lists its archs and warns nothing."""
    cpu_only = {"cuda": "0", "cuda_skipped": "3", "openmp": "201511", "compiler": "12.2.0"}
    text = _info_text(monkeypatch, cpu_only, "12.8")
    assert "CUDA kernels  not compiled: no CUDA toolkit (nvcc) was found when segops was built" in text
    assert "WARNING: segops was built without CUDA kernels" in text and "CUDA 12.8 build" in text
    assert "SEGOPS_CUDA=1 pip install --no-build-isolation -e ." in text
    as_json = json.loads(_info_text(monkeypatch, cpu_only, "12.8", ("info", "--json")))
    assert as_json["cuda_kernels_compiled"] is False and len(as_json["warnings"]) == 1

    by_request = dict(cpu_only, cuda_skipped="1")
    text = _info_text(monkeypatch, by_request, None)  # a CPU torch: nothing to warn about
    assert "not compiled: left out on request (SEGOPS_CUDA=0)" in text and "WARNING" not in text

    cuda_build = {"cuda": "1", "cuda_archs": "800,900", "openmp": "201511", "compiler": "12.2.0"}
    text = _info_text(monkeypatch, cuda_build, "12.8")
    assert "CUDA kernels  yes, for sm_80, sm_90" in text and "WARNING" not in text


def test_this_build_records_why_it_has_no_cuda_kernels():
    build = info_module.build_info()
    if build["cuda"] == "1":
        assert "cuda_skipped" not in build
    else:
        assert build["cuda_skipped"] in info_module.CUDA_SKIPPED_REASONS


# Runs setup.py (only `--name`: nothing is built) twice in one interpreter, once with SEGOPS_CUDA unset and once
# with SEGOPS_CUDA=0, after making torch look like a CUDA 12.8 build whose toolkit cannot be found.
SETUP_DRIVER = """
import os, runpy, sys
import torch
import torch.utils.cpp_extension as cpp_extension
torch.version.cuda = "12.8"
cpp_extension.CUDA_HOME = None
sys.argv = ["setup.py", "--name"]
for flag in ("", "0"):
    os.environ.pop("SEGOPS_CUDA", None)
    if flag:
        os.environ["SEGOPS_CUDA"] = flag
    print("=== SEGOPS_CUDA=%s" % flag, file=sys.stderr, flush=True)
    runpy.run_path("setup.py", run_name="__main__")
    sys.stderr.flush()
"""


def test_setup_py_warns_loudly_without_nvcc():
    env = {k: v for k, v in os.environ.items() if k != "SEGOPS_CUDA"}
    out = subprocess.run([sys.executable, "-c", SETUP_DRIVER], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["segops", "segops"]
    unset, cpu_on_request = out.stderr.split("=== SEGOPS_CUDA=")[1:]
    assert "!" * 100 in unset
    assert "is a CUDA 12.8 build, but no CUDA toolkit (nvcc) was found" in unset
    assert "WITHOUT CUDA kernels" in unset and "SEGOPS_CUDA=1" in unset
    # a CPU-only build asked for: no warning
    assert cpu_on_request.startswith("0") and "no CUDA toolkit" not in cpu_on_request and "!" * 100 not in cpu_on_request
