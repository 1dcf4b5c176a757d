"""``catalog.sqlite``: one row per slide with its id, path, fingerprint, status, tile count, error."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_ssl.errors import CatalogCorruptError
from wsi_ssl.storage.slide_store import STATUS_COMPLETE, SlideStore

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
        """A connection in a transaction; a damaged file is a :class:`CatalogCorruptError`
        (busy or full stays sqlite's ``OperationalError``)."""
        db = sqlite3.connect(self.path, timeout=30)
        try:
            with db:
                yield db
        except sqlite3.OperationalError:
            raise
        except sqlite3.DatabaseError as err:  # "malformed", "file is not a database"
            raise CatalogCorruptError(self.path, str(err)) from err
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
        name: str | None = None,
    ) -> None:
        """Record a slide; ``name`` is its file name as given (a link's, not its target's;
        default: ``path``'s)."""
        with self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO slides VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    slide_id,
                    str(path),
                    name or Path(path).name,
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

    def other_copy(self, slide_id: str, path: str | Path) -> str | None:
        """The file the slide was tiled from when it is another one that still holds the
        slide's content (``path`` is an identical copy under another name); None when it is
        ``path``, or gone or changed (the slide moved to ``path``)."""
        from wsi_ssl.storage.fingerprint import fingerprint_file

        entry = self.get(slide_id)
        if entry is None or not Path(entry.path).is_file():
            return None
        if os.path.samefile(entry.path, path):  # the same file, by any spelling
            return None
        return entry.path if fingerprint_file(entry.path) == entry.fingerprint else None

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


def row_from_store(store: SlideStore) -> dict[str, Any]:
    """The catalog row (``Catalog.upsert`` keywords) of a complete store, from its own metadata:
    a catalog lost or damaged is rebuilt from the stores."""
    from wsi_ssl.config import TilingConfig

    names = {f.name for f in dataclasses.fields(TilingConfig)} | {"roi_sha256"}
    tiling = {k: v for k, v in store.tiling.items() if k in names}
    source = store.source
    if source.get("mpp_source") == "override":  # the slide records no scale of its own
        tiling["mpp_override"] = source.get("mpp")
    if source.get("mpp") and tiling.get("mpp", 0) * 2 < float(source["mpp"]):
        tiling["allow_upsampling"] = True
    return {
        "slide_id": store.slide_id,
        "path": source["path"],
        "name": source.get("name"),
        "fingerprint": source["fingerprint"],
        "status": STATUS_COMPLETE,
        "n_tiles": store.n_tiles,
        "tiling": tiling,
    }


def set_aside(path: Path) -> Path:
    """Rename a damaged catalog to ``catalog.sqlite.damaged-<unix time>`` (kept, not deleted)."""
    aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
    path.rename(aside)
    return aside
