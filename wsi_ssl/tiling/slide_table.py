"""Per-slide settings of a batch (an mpp or ROI CSV's rows), matched to the batch's slide files
by path, file name or stem, in that order."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

__all__ = ["SlideTable"]

T = TypeVar("T")


@dataclass(frozen=True)
class SlideTable(Generic[T]):
    """``rows``: slide (path, file name or stem) -> value; ``what`` names them in messages."""

    what: str
    rows: Mapping[str, T]

    def get(self, path: Path, default: T | None) -> T | None:
        """The value of the row naming ``path`` (by path, file name, then stem), else ``default``."""
        for key in (str(path), path.name, path.stem):
            if key in self.rows:
                return self.rows[key]
        return default

    def unmatched(self, paths: Sequence[Path]) -> list[str]:
        """Rows that name no slide of ``paths``."""
        names = {key for p in paths for key in (str(p), p.name, p.stem)}
        return [key for key in self.rows if key not in names]

    def unmatched_note(self, paths: Sequence[Path]) -> str | None:
        """A line on the rows that name no slide of the batch (a misspelt name, or a cohort
        table tiled in parts), or None."""
        unmatched = self.unmatched(paths)
        if not unmatched:
            return None
        shown = ", ".join(unmatched[:5]) + (", ..." if len(unmatched) > 5 else "")
        return (
            f"{len(unmatched)} row(s) of {self.what} name no slide of this batch ({shown}); "
            "rows match a slide by path, file name or stem"
        )
