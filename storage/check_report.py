"""What ``wsi-ssl check`` reports (:func:`wsi_ssl.storage.check.check_archive`): each problem
as a :class:`Finding` with the command that fixes it, and the notes that are not problems."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CheckReport", "Finding"]


@dataclass(frozen=True)
class Finding:
    """One problem: where, what, the command that fixes it, whether ``--repair`` handles it."""

    path: str
    problem: str
    fix: str
    repairable: bool = False
    repaired: bool = False


@dataclass
class CheckReport:
    """The outcome of :func:`check_archive`; ``ok`` when nothing is left to fix."""

    root: Path
    findings: list[Finding] = field(default_factory=list)
    failed_slides: list[str] = field(default_factory=list)
    """Slides whose tiling failed (the catalog keeps each error) and that have no store: not
    a problem of the archive, but not in it."""
    busy: list[str] = field(default_factory=list)
    """Stores a writer held while they were checked (a tiling job): not checked."""
    stale_locks: list[str] = field(default_factory=list)
    """Lock files naming a killed job (without ``repair``): harmless, so not problems; the next
    writer of the same thing, or ``repair``, clears them."""
    stores: int = 0
    arrays: int = 0
    indexes: int = 0

    @property
    def problems(self) -> list[Finding]:
        """Findings still standing (not repaired)."""
        return [f for f in self.findings if not f.repaired]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "ok": self.ok,
            "stores": self.stores,
            "embeddings": self.arrays,
            "indexes": self.indexes,
            "findings": [asdict(f) for f in self.findings],
            "failed_slides": self.failed_slides,
            "busy": self.busy,
            "stale_locks": self.stale_locks,
        }
