"""Shared test fixtures: the devices to run on, the `cuda` marker, hypothesis profiles."""

from __future__ import annotations

import os
import random
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

import segops  # noqa: F401  (registers torch.ops.segops)

HAS_CUDA = torch.cuda.is_available() and segops.info()["cuda_kernels_compiled"]

# Every op test that takes `device` runs on the CPU and, where a GPU and CUDA kernels exist, on CUDA.
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

# Profiles: "ci" (default) keeps the suite within CI's budget on 2 cores; "dev" explores more;
# "fuzz" is for `make fuzz`. Select with SEGOPS_HYPOTHESIS_PROFILE.
settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
settings.register_profile(
    "fuzz", max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.load_profile(os.environ.get("SEGOPS_HYPOTHESIS_PROFILE", "ci"))


def require_optional(module: str):
    """Imports an optional test dependency (scikit-image, pydensecrf2, ...).

    Under `make test` (SEGOPS_TEST_REQUIRE_OPTIONAL=1, which also installs them) a missing one is an error, so
    CI can never pass by skipping; a bare `pytest` in an environment without it skips with the reason.
    """
    if os.environ.get("SEGOPS_TEST_REQUIRE_OPTIONAL") == "1":
        import importlib

        return importlib.import_module(module)
    return pytest.importorskip(module, reason="optional test dependency %s is not installed" % module)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device and segops built with CUDA kernels")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed_every_test(request):
    """Seeds torch (CPU and CUDA), numpy and random from the test's id before every test.

    A test then draws the same values whatever ran before it, in any order or selection (`-k`, `-m`, one
    file): a pass cannot depend on the random stream other tests left behind. Tests that care about values
    still build their own `torch.Generator`; this is the floor for the ones that call `torch.randn` directly.
    """
    seed = zlib.crc32(request.node.nodeid.encode())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
