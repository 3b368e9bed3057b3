"""Warnings point at the user's line, however deep inside nerve_interp they are raised."""

from __future__ import annotations

import os
import sys

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def user_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` in the caller of this function that names the
    first frame outside nerve_interp (the user's code), at any call depth.

    Python 3.12's ``warnings.warn(skip_file_prefixes=...)`` does this; 3.11 does not have it.
    """
    frame, level = sys._getframe(1), 1
    while frame is not None and _ours(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level


def _ours(filename: str) -> bool:
    """A frame of nerve_interp, or of code generated for it (a dataclass ``__init__`` is
    compiled from ``"<string>"``)."""
    return filename == "<string>" or os.path.abspath(filename).startswith(_PACKAGE)


__all__ = ["user_stacklevel"]
