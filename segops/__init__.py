"""segops: fast C++/CUDA operators for semantic segmentation in PyTorch.

Importing segops loads the compiled extension ``segops._C`` first (it registers the ``torch.ops.segops``
operators), then the Python wrappers (:mod:`segops.ops`) and modules (:mod:`segops.nn`).
"""

from segops._loader import load_extension as _load_extension

_load_extension()

from segops import ops  # noqa: E402
from segops import nn  # noqa: E402
from segops import reference  # noqa: E402
from segops.info import info  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ops", "nn", "reference", "info", "__version__"]
