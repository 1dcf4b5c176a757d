"""How messages name many things: the first few, then how many more."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["first_few"]


def first_few(items: Iterable[object], limit: int = 5) -> str:
    """``items`` as comma-separated text, at most ``limit`` of them and then "and N more"."""
    texts = [str(item) for item in items]
    shown = ", ".join(texts[:limit])
    return shown + (f" and {len(texts) - limit} more" if len(texts) > limit else "")
