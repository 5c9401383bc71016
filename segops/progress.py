"""Progress bars (tqdm on stderr) that stay out of logs: shown only when asked for AND stderr is a terminal."""

from __future__ import annotations

from typing import Any, Iterable, Optional


def progress_bar(iterable: Optional[Iterable[Any]] = None, *, enabled: bool = True, **tqdm_args: Any):
    """A ``tqdm`` bar over ``iterable``; a silent pass-through when ``enabled`` is False or stderr is not a
    TTY (files, pipes, CI logs). Extra keyword arguments go to ``tqdm`` (``desc``, ``total``, ``leave``...)."""
    from tqdm import tqdm

    # disable=None is tqdm's "off when the output is not a terminal"
    return tqdm(iterable, disable=None if enabled else True, dynamic_ncols=True, **tqdm_args)
