"""``catalog.sqlite``: one row per slide with its id, path, fingerprint, status, tile count, error."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS slides (
    slide_id    TEXT PRIMARY KEY,
    path        TEXT NOT NULL,
    name        TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    status      TEXT NOT NULL,
    n_tiles     INTEGER,
    error       TEXT,
    tiling      TEXT,
    updated_at  REAL NOT NULL
);
"""


@dataclass(frozen=True)
class CatalogEntry:
    slide_id: str
    path: str
    name: str
    fingerprint: str
    status: str
    n_tiles: int | None
    error: str | None
    tiling: dict[str, Any] | None


class Catalog:
    """The archive's slide table. Short transactions, so several processes can share it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        try:
            with db:
                yield db
        finally:
            db.close()

    def upsert(
        self,
        *,
        slide_id: str,
        path: str | Path,
        fingerprint: str,
        status: str,
        n_tiles: int | None = None,
        error: str | None = None,
        tiling: dict[str, Any] | None = None,
    ) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO slides VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    slide_id,
                    str(path),
                    Path(path).name,
                    fingerprint,
                    status,
                    n_tiles,
                    error,
                    None if tiling is None else json.dumps(tiling, sort_keys=True),
                    time.time(),
                ),
            )

    def get(self, slide_id: str) -> CatalogEntry | None:
        rows = self._select("WHERE slide_id = ?", (slide_id,))
        return rows[0] if rows else None

    def by_path(self, path: str | Path) -> list[CatalogEntry]:
        """The slides recorded for the file at ``path`` (several: its content changed)."""
        return self._select("WHERE path = ? ORDER BY slide_id", (str(path),))

    def entries(self, status: str | None = None) -> list[CatalogEntry]:
        if status is None:
            return self._select("ORDER BY name", ())
        return self._select("WHERE status = ? ORDER BY name", (status,))

    def _select(self, where: str, args: tuple[Any, ...]) -> list[CatalogEntry]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT slide_id, path, name, fingerprint, status, n_tiles, error, tiling "
                f"FROM slides {where}",
                args,
            ).fetchall()
        return [
            CatalogEntry(
                slide_id,
                path,
                name,
                fingerprint,
                status,
                n_tiles,
                error,
                None if tiling is None else json.loads(tiling),
            )
            for slide_id, path, name, fingerprint, status, n_tiles, error, tiling in rows
        ]
