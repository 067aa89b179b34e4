"""argparse value types shared by the command lines (``visreg-hub``, ``python -m demo.app``).

A bad value is an ``argparse`` error (usage line, exit 2) naming the flag, before anything starts: a
server that would start and then refuse or hang on every request is worse than one that does not start.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An integer in ``[low, high]`` (``high`` None: no upper bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"expected an integer {bounds}, got {text!r}")
        return value

    parse.__name__ = "integer"  # what argparse calls the type in its messages
    return parse


port_number = int_range(0, 65535)  # 0: the OS picks a free port


def user_path(text: str) -> str:
    """A path with ``~`` expanded: the shell leaves it alone in ``--output=~/x``, in quotes and in values
    read from files, and a folder literally named ``~`` is a trap (``rm -rf ~``)."""
    return os.path.expanduser(text)


user_path.__name__ = "path"


def float_range(low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = False):
    """A finite float in the interval from ``low`` to ``high`` (``*_open``: that end excluded)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        below = value <= low if low_open else value < low
        above = high is not None and (value >= high if high_open else value > high)
        if value != value or value in (float("inf"), float("-inf")) or below or above:  # NaN != NaN
            left, right = "(" if low_open else "[", ")" if high_open or high is None else "]"
            bounds = f"{left}{low:g}, {'inf' if high is None else f'{high:g}'}{right}"
            raise argparse.ArgumentTypeError(f"expected a number in {bounds}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def file_size(text: str) -> int:
    """``"10mb"``, ``"500kb"``, ``"2048"`` (bytes) -> bytes, at least 1."""
    match = _SIZE.match(text)
    size = 0 if match is None else int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower() or None])
    if size < 1:
        raise argparse.ArgumentTypeError(f"expected a size like 10mb, 500kb or 2048 (bytes), got {text!r}")
    return size
