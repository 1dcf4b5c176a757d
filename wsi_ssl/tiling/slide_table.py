"""Per-slide settings of a batch (an mpp or ROI CSV's rows), matched to the batch's slide files
by path, file name or stem, in that order; and a slide whose mpp table row states its scale.

A row of the mpp table is a statement about that slide: its scale wins over the one the file
records (recorded as ``mpp_source`` "table", and said in the job's report), and fills in a
missing one (recorded as an override, as ``mpp_override`` would). ``mpp_override`` is only
the fallback for slides that record no scale."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

from wsi_ssl.config import TilingConfig
from wsi_ssl.errors import ConfigError
from wsi_ssl.listing import first_few
from wsi_ssl.outcome import SlideOutcome
from wsi_ssl.slide import SlideReader, state_mpp
from wsi_ssl.tiling.source import SlideSource

__all__ = ["SlideTable", "TableScaledSource", "override_unused_note", "slide_config"]

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


class TableScaledSource(SlideSource):
    """A slide to tile whose scale ``mpp`` states, when given (its mpp table row), over the
    one the file records (`wsi_ssl.slide.state_mpp`). Once the slide is open, ``replaced``
    is the file's own scale the row replaced, (mpp, source), or None, and ``mpp_source`` is
    where the scale tiled at came from."""

    def __init__(self, path: str | Path, config: TilingConfig, mpp: float | None = None) -> None:
        super().__init__(path, config.mpp_override, config.thumbnail_mpp)
        self.stated = mpp
        self.replaced: tuple[float | None, str] | None = None
        self.mpp_source: str | None = None

    @property
    def reader(self) -> SlideReader:
        """The open slide, its scale the row's where it has one."""
        reader = super().reader
        if self.stated is not None and reader.mpp != self.stated:
            replaced = state_mpp(reader, self.stated, "table")
            self.replaced = replaced if reader.mpp_source == "table" else None
        self.mpp_source = reader.mpp_source
        return reader

    def scale_details(self) -> dict[str, Any]:
        """Its outcomes' details on its scale, once open: ``mpp_from_table`` (``mpp 0.25 from
        the mpp table (the file says 0.499, vendor)``) where the row replaced the file's own,
        or ``kept_own_mpp`` where the file's own scale was used and ``mpp_override`` was not."""
        if self.replaced is not None:
            own, how = self.replaced
            says = f"the file says {'none' if own is None else f'{own:g}'}, {how}"
            return {"mpp_from_table": f"mpp {self.stated:g} from the mpp table ({says})"}
        unused = self.stated is None and self.mpp_override is not None
        if unused and self.mpp_source not in (None, "override"):
            return {"kept_own_mpp": self.mpp_source}
        return {}


def slide_config(
    config: TilingConfig, path: Path, mpps: SlideTable[float], rois: SlideTable[str]
) -> tuple[TilingConfig, float | None]:
    """The batch's ``config`` for the slide at ``path`` (its ROI table row's file, absolute:
    recorded, and named by check; its mpp table row as its ``mpp_override``, which check's
    re-tile command repeats), and the scale its mpp table row states (None: no row)."""
    stated = mpps.get(path, None)
    roi = rois.get(path, config.roi)
    roi = str(Path(roi).resolve()) if roi is not None else None
    override = stated if stated is not None else config.mpp_override
    return replace(config, mpp_override=override, roi=roi), stated


def override_unused_note(override: float | None, outcomes: Sequence[SlideOutcome]) -> str | None:
    """A line naming the slides of ``outcomes`` that kept their own scale though an
    ``override`` was given (it fills in only a missing scale), or None."""
    slides = list(dict.fromkeys(o.details["path"] for o in outcomes if "kept_own_mpp" in o.details))
    if override is None or not slides:
        return None
    return (
        f"the mpp override {override:g} was not used for {len(slides)} slide(s) that record "
        f"their own scale ({first_few(slides)}); it is only for slides without one: to "
        "replace a slide's own scale, give it a row in the mpp table"
    )
