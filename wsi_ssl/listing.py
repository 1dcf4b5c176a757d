"""Lists of things: one given where several are asked for, and how messages name many (the
first few, then how many more)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

__all__ = ["first_few", "one_or_many"]


def one_or_many(items: str | os.PathLike[str] | Iterable[Any]) -> list[Any]:
    """``items`` as a list, where a single string or path is one item (a string is iterable:
    ``slides="a.svs"`` would otherwise name the slides "a", ".", "s", "v", "s")."""
    if isinstance(items, str | bytes | os.PathLike):
        return [items]
    return list(items)


def first_few(items: Iterable[object], limit: int = 5) -> str:
    """``items`` as comma-separated text, at most ``limit`` of them and then "and N more"."""
    texts = [str(item) for item in items]
    shown = ", ".join(texts[:limit])
    return shown + (f" and {len(texts) - limit} more" if len(texts) > limit else "")
