"""What an embedding job did: per-slide :class:`~wsi_ssl.outcome.SlideOutcome` s and totals."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_ssl.listing import first_few
from wsi_ssl.outcome import BatchOutcome

__all__ = ["EmbedSummary", "incomplete_note"]


def incomplete_note(slide_ids: list[str]) -> str:
    """The line naming the stores a job left out as not complete (a tiling running or
    killed)."""
    return (
        f"left out {len(slide_ids)} store(s) that are not complete ({first_few(slide_ids)}: "
        "being tiled or re-tiled now, or by a killed job; `wsi-ssl check` says what to do)"
    )


@dataclass(kw_only=True)
class EmbedSummary(BatchOutcome):
    """The outcome of an embedding job; ``lines()`` is its report, ``to_dict()`` its JSON.

    ``incomplete`` lists the stores left out because they are not complete (tiling unfinished),
    ``loader_wait_s`` the seconds the main process waited for tiles.
    """

    root: str
    encoder_id: str
    encoder: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    compute: dict[str, Any] = field(default_factory=dict)
    incomplete: list[str] = field(default_factory=list)
    seconds: float = 0.0
    loader_wait_s: float = 0.0

    @property
    def tiles_not_embedded(self) -> int:
        """Tiles of the complete slides left without a vector (``skip_flagged_tiles``)."""
        return sum(int(o.details.get("not_embedded", 0)) for o in self.with_status("complete"))

    @property
    def rows_kept(self) -> int:
        """Rows of the complete slides copied from their earlier arrays, not encoded again."""
        return sum(int(o.details.get("rows_kept", 0)) for o in self.with_status("complete"))

    @property
    def rows_cleared(self) -> int:
        """Rows of the complete slides whose vectors were cleared: tiles QC flags that were
        embedded before (``skip_flagged_tiles``), now marked not embedded."""
        return sum(int(o.details.get("rows_cleared", 0)) for o in self.with_status("complete"))

    @property
    def tiles_per_s(self) -> float:
        return round(self.tiles_done / self.seconds, 1) if self.seconds else 0.0

    def total_lines(self) -> list[str]:
        """The counts, tiles and rate, then the stores left out (if any)."""
        out = [
            f"{self.count_line('embedded')}; {self.tiles_done} tiles at {self.tiles_per_s} "
            f"tiles/s with {self.encoder_id}"
        ]
        stain = self.config.get("stain_normalize")
        if stain and self.with_status("complete"):  # said of tiles embedded, not of failures
            reference = Path(str(self.config.get("stain_reference"))).name
            out.append(f"tiles stain-normalised ({stain}) to {reference}")
        if self.tiles_not_embedded:
            out.append(
                f"skipped {self.tiles_not_embedded} tiles flagged by QC (not read, not encoded; "
                "their rows are marked not_embedded)"
            )
        if self.rows_kept:
            out.append(f"kept {self.rows_kept} rows embedded before (not encoded again)")
        if self.rows_cleared:
            out.append(
                f"cleared {self.rows_cleared} rows of tiles QC flags that were embedded before "
                "(now marked not_embedded)"
            )
        if self.incomplete:
            out.append(incomplete_note(self.incomplete))
        return out

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` output: counts, totals, the encoder, the settings, every slide."""
        outcomes = self.outcomes_dict()
        # each slide entry keeps the key it had before the shared outcome type: slide_id
        slides = [{"slide_id": entry["slide"], **entry} for entry in outcomes.pop("slides")]
        return {
            "root": self.root,
            "encoder_id": self.encoder_id,
            **outcomes,
            "tiles_embedded": self.tiles_done,
            "tiles_not_embedded": self.tiles_not_embedded,
            "rows_kept": self.rows_kept,
            "rows_cleared": self.rows_cleared,
            "seconds": round(self.seconds, 3),
            "loader_wait_s": round(self.loader_wait_s, 3),
            "tiles_per_s": self.tiles_per_s,
            "incomplete_stores": self.incomplete,
            "encoder": self.encoder,
            "config": self.config,
            "compute": self.compute,
            "slides": slides,
        }
