"""The report of a tiling job: every slide's outcome at every scale, where the stores went,
and the lines and JSON a person or a script reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from wsi_ssl.outcome import BatchOutcome

__all__ = ["TileSummary"]


@dataclass(kw_only=True)
class TileSummary(BatchOutcome):
    """The outcome of every slide (at every scale) of a tiling job, and where they went."""

    roots: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def tiles(self) -> int:
        """Tiles in the stores this job completed or found complete."""
        return sum(o.n_tiles for o in self.outcomes)

    def total_lines(self) -> list[str]:
        """What re-tiles did with embeddings, then the counts and where the tiles are."""
        lines = []
        for o in self.outcomes:
            if earlier := o.details.get("earlier_versions"):
                lines.append(
                    f"{o.slide}: the file changed since it was tiled as slide "
                    f"{', '.join(earlier)}; that store is kept beside the new one (name the "
                    "slides by id to tell them apart)"
                )
            if why := o.details.get("retiled_because"):
                lines.append(f"{o.slide}: re-tiled: {why}")
            if moved_from := o.details.get("moved_from"):
                lines.append(f"{o.slide}: moved from {moved_from} (its store now names this file)")
            if scale := o.details.get("mpp_from_table"):
                lines.append(f"{o.slide}: {scale}")
            if qc := o.details.get("qc_thresholds_updated"):
                lines.append(f"{o.slide}: QC thresholds updated, tiles kept: {qc}")
            if same_as := o.details.get("same_as"):
                what = "the same file"
                if o.details.get("same_series"):
                    what = "another file of the same DICOM series"
                elif o.details.get("same_instance"):
                    what = "a copy of the same DICOM instance"
                lines.append(f"{o.slide}: {what} as {same_as} (one slide, tiled once)")
            if kept := o.details.get("kept_embeddings"):
                lines.append(f"{o.slide}: embeddings kept (same tiles): {', '.join(kept)}")
            if discarded := o.details.get("discarded_embeddings"):
                lines.append(f"{o.slide}: embeddings discarded: {', '.join(discarded)}")
            lines += [f"{o.slide}: {note}" for note in o.details.get("roi_notes") or []]
        kept = [(o.slide, o.details.get("kept_store_tiles") or 0) for o in self.failed]
        lines += [f"{s}: a complete store of it is in place ({n} tiles)" for s, n in kept if n]
        where, n_kept = ", ".join(self.roots), sum(n for _, n in kept)
        held = f"these slides hold {self.tiles + n_kept} tiles in {where}"  # not the archive's
        return [*lines, *self.notes, f"{self.count_line('tiled')}; {held}"]

    def skipped_counts(self) -> list[str]:
        """Slides found already complete, and files that are the same slide as another of
        the batch (a file given twice, an identical copy), counted apart."""
        duplicates = sum(1 for o in self.outcomes if o.details.get("same_as"))
        complete = f"{self.counts['skipped'] - duplicates} already complete"
        return [complete, f"{duplicates} the same file as another"] if duplicates else [complete]

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.outcomes_dict(),
            "tiles": self.tiles,
            "roots": self.roots,
            "notes": self.notes,
        }
