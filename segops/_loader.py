"""Loads the compiled extension, with an actionable message when it is missing or broken."""

import importlib

_BUILD_HINT = (
    "segops' compiled extension (segops._C) could not be loaded: {err}\n"
    "Build it from the source checkout with PyTorch already installed:\n"
    "    pip install --no-build-isolation -e .      (or: make build)\n"
    "The extension must be built against the torch that imports it (this one is torch {torch})."
)


def load_extension() -> None:
    import torch  # noqa: F401  (torch's libraries must be loaded before _C's symbols resolve)

    try:
        importlib.import_module("segops._C")
    except ImportError as err:  # missing file, or built against another torch (undefined symbol)
        raise ImportError(_BUILD_HINT.format(err=err, torch=torch.__version__)) from err
