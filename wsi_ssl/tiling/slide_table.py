"""Per-slide settings of a batch (an mpp or ROI CSV's rows), matched to the batch's slide files
by path, file name or stem, in that order."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from wsi_ssl.errors import ConfigError
from wsi_ssl.listing import first_few

__all__ = ["SlideTable"]

T = TypeVar("T")


@dataclass(frozen=True)
class SlideTable(Generic[T]):
    """``rows``: slide (path, file name or stem) -> value; ``what`` names them in messages."""

    what: str
    rows: Mapping[str, T]

    @functools.cached_property
    def _paths(self) -> dict[str, str]:
        """Rows that name a path, by the absolute path (a relative one from the working
        folder): a row and a slide given one relative and one absolute still match."""
        return {str(Path(k).resolve()): k for k in self.rows if "/" in k}

    def keys_of(self, path: Path) -> list[str]:
        """The rows naming ``path``: by path, then file name, then stem."""
        named = [str(path), self._paths.get(str(path.resolve())), path.name, path.stem]
        return list(dict.fromkeys(k for k in named if k is not None and k in self.rows))

    def key_of(self, path: Path) -> str | None:
        """The row naming ``path`` (the first of :meth:`keys_of`); None: no row does."""
        return next(iter(self.keys_of(path)), None)

    def get(self, path: Path, default: T | None) -> T | None:
        """The value of the row naming ``path``, else ``default``."""
        key = self.key_of(path)
        return default if key is None else self.rows[key]

    def check_unambiguous(self, paths: Sequence[Path]) -> None:
        """Refuse a row that names several slides of the batch by file name or stem
        (``S.svs`` and ``S.ndpi``, or two folders' ``S.svs``): its value would go to each;
        and several rows naming one slide (by path and by stem): one would win silently.

        Raises:
            ConfigError: such rows, with the slides each names.
        """
        users: dict[str, list[Path]] = {}
        for path in paths:
            keys = self.keys_of(path)
            if len(keys) > 1:
                raise ConfigError(
                    f"rows {', '.join(map(repr, keys))} of {self.what} all name {path}; keep one"
                )
            if keys and keys[0] not in (str(path), str(path.resolve())):
                users.setdefault(keys[0], []).append(path)
        clashes = [f"{k!r} ({', '.join(map(str, ps))})" for k, ps in users.items() if len(ps) > 1]
        if clashes:
            raise ConfigError(
                f"rows of {self.what} name several slides of this batch: {'; '.join(clashes)}; "
                "name each of those slides by its path"
            )

    def unmatched(self, paths: Sequence[Path]) -> list[str]:
        """Rows that name no slide of ``paths``."""
        named = {key for p in paths for key in self.keys_of(p)}
        return [key for key in self.rows if key not in named]

    def unmatched_note(self, paths: Sequence[Path]) -> str | None:
        """A line on the rows that name no slide of the batch (a misspelt name, or a cohort
        table tiled in parts), or None."""
        unmatched = self.unmatched(paths)
        if not unmatched:
            return None
        return (
            f"{len(unmatched)} row(s) of {self.what} name no slide of this batch ({first_few(unmatched)}); "
            "rows match a slide by path, file name or stem"
        )
