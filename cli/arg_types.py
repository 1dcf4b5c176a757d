"""Arguments shared by the commands: types whose values are checked when the command line is
parsed, and the ``--encoder ID`` option of the commands that read an archive's embeddings."""

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


def positive_number(text: str) -> float:
    """An argparse ``type`` for a number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def whole_numbers(n: int, what: str) -> Callable[[str], tuple[int, ...]]:
    """An argparse ``type`` for ``n`` comma-separated numbers (``what`` names them, e.g.
    "X,Y"), each rounded to a whole number."""

    def parse(text: str) -> tuple[int, ...]:
        parts = text.replace(" ", "").split(",")
        try:
            values = tuple(round(float(p)) for p in parts)
        except ValueError:
            values = ()
        if len(values) != n:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return values

    return parse


def number_list(text: str) -> tuple[float, ...]:
    """An argparse ``type`` for ``0.5`` or ``0.5,1.0``: one or more numbers."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, got {text!r}"
        ) from err


def add_encoder_id(p: argparse.ArgumentParser, what: str, dest: str = "encoder") -> None:
    """``--encoder ID``: which embeddings of the archive ``what`` names (an encoder id or a
    unique prefix of one; default: the archive's only encoder)."""
    p.add_argument(
        "--encoder",
        dest=dest,
        metavar="ENCODER_ID",
        help=f"{what}: an encoder id or a unique prefix (e.g. random-cnn); default: the "
        "archive's only encoder",
    )
