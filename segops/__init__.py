"""segops: fast C++/CUDA operators for semantic segmentation in PyTorch.

Importing segops loads the compiled extension ``segops._C`` first (it registers the ``torch.ops.segops``
operators), then the Python wrappers (:mod:`segops.ops`) and modules (:mod:`segops.nn`). The heavier parts —
:mod:`segops.models`, :mod:`segops.metrics`, :mod:`segops.data` and :mod:`segops.train` — are imported on first
attribute access (``segops.models.get_model(...)``), so ``import segops`` does not pay for them.
"""

import importlib
from types import ModuleType

from segops._loader import load_extension as _load_extension

_load_extension()

from segops import ops  # noqa: E402
from segops import nn  # noqa: E402
from segops import reference  # noqa: E402
from segops.info import info  # noqa: E402
from segops.memory import cpu_cached_bytes, empty_cpu_cache  # noqa: E402

__version__ = "0.1.0"

# Submodules imported on first access (PEP 562), like torchvision's `torchvision.models`.
_LAZY_SUBMODULES = ("models", "metrics", "data", "train")

__all__ = ["ops", "nn", "reference", "info", "cpu_cached_bytes", "empty_cpu_cache", "__version__", *_LAZY_SUBMODULES]


def __getattr__(name: str) -> ModuleType:
    if name in _LAZY_SUBMODULES:
        module = importlib.import_module("segops." + name)
        globals()[name] = module  # later accesses skip this hook
        return module
    raise AttributeError("module 'segops' has no attribute %r" % (name,))


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
