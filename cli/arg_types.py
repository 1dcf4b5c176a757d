"""Argument types shared by the commands: values checked when the command line is parsed."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def whole_number(lo: int, hi: int | None = None, what: str | None = None) -> Callable[[str], int]:
    """An argparse ``type`` accepting whole numbers in ``lo..hi`` (``hi`` None: no upper bound)."""
    what = what or (f"a whole number >= {lo}" if hi is None else f"a whole number {lo}..{hi}")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


def seconds(text: str) -> float:
    """An argparse ``type`` for a duration: a number of seconds >= 0 (``inf``: no limit)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value
