"""``catalog.sqlite``: one row per slide with its id, path, fingerprint, status, tile count, error."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import pwd
import shlex
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_ssl.errors import CatalogCorruptError, CatalogWriteError, DiskFullError, WsiSslError
from wsi_ssl.storage.atomic import fsync_file, is_no_space, rename_into_place, temp_name
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
    """The archive's slide table. Short transactions, so several processes can share it.

    Nothing is written until a row is: reading a catalog that is not there (a new archive, or
    a read-only one) finds no rows and creates no file. A full disk is a
    :class:`DiskFullError`, a read-only archive a :class:`CatalogWriteError`, a damaged file a
    :class:`CatalogCorruptError`, each naming the catalog and what to do.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection in a transaction, sqlite's errors typed (:func:`_typed`; busy stays
        sqlite's ``OperationalError``)."""
        try:
            db = sqlite3.connect(self.path, timeout=30)
        except sqlite3.Error as err:
            _raise_typed(self.path, err)
            raise
        try:
            with db:
                yield db
        except sqlite3.Error as err:
            _raise_typed(self.path, err)
            raise
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
        self.upsert_rows(
            [
                {
                    "slide_id": slide_id,
                    "path": path,
                    "fingerprint": fingerprint,
                    "status": status,
                    "n_tiles": n_tiles,
                    "error": error,
                    "tiling": tiling,
                    "name": name,
                }
            ]
        )

    def upsert_rows(self, rows: Iterable[dict[str, Any]], journal: bool = True) -> None:
        """Record several slides (``upsert`` keywords) in one transaction, creating the catalog
        if need be; ``journal=False`` for a file no one else reads yet (no journal file)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            _raise_typed(self.path, err)
            raise
        with self._connect() as db:
            if not journal:
                db.execute("PRAGMA journal_mode=OFF")
            db.execute(_SCHEMA)
            db.executemany(
                "INSERT OR REPLACE INTO slides VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [_row_values(row) for row in rows],
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
        try:
            if self.path.stat().st_size == 0:  # never written, or its creation failed
                return []
        except FileNotFoundError:
            return []  # not created yet: no rows (and reading creates nothing)
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
    if source.get("mpp_source") in ("override", "table"):  # no scale of its own, or a row's
        tiling["mpp_override"] = source.get("mpp")
        tiling["mpp_table"] = source.get("mpp_source") == "table"
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


def keep_aside(path: Path) -> Path:
    """Keep a damaged catalog as ``catalog.sqlite.damaged-<unix time>`` too (a second name of
    the same file: ``path`` stays in place until something replaces it)."""
    aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
    os.link(path, aside)
    return aside


def _row_values(row: dict[str, Any]) -> tuple[Any, ...]:
    """The slides-table values of one row given as :meth:`Catalog.upsert`'s keywords."""
    tiling = row.get("tiling")
    return (
        row["slide_id"],
        str(row["path"]),
        row.get("name") or Path(row["path"]).name,
        row["fingerprint"],
        row["status"],
        row.get("n_tiles"),
        row.get("error"),
        None if tiling is None else json.dumps(tiling, sort_keys=True),
        time.time(),
    )


def rebuild_catalog(path: Path, rows: Iterable[dict[str, Any]]) -> Path | None:
    """Replace the catalog at ``path`` (damaged or missing) by one holding ``rows``, at once:
    written whole in a temp file beside it, then renamed over it, so ``path`` is never absent
    (a reader or a tiling job never finds no catalog) and a full disk or a kill leaves what was
    there. The file it replaces is kept under a second name (:func:`keep_aside`, returned).

    Raises:
        DiskFullError, CatalogWriteError: naming ``path``; nothing was changed.
    """
    temp, aside = path.with_name(temp_name(path.name)), None
    try:
        Catalog(temp).upsert_rows(rows, journal=False)
        fsync_file(temp)
        aside = keep_aside(path) if path.exists() else None
        for side in ("-journal", "-wal", "-shm"):  # the old file's: never applied to the new
            if (old := Path(f"{path}{side}")).exists():
                old.rename(f"{aside}{side}" if aside is not None else f"{path}{side}.old")
        rename_into_place(temp, path)
    except OSError as err:  # the typed errors of the temp file too
        if aside is not None:  # the second name is not needed: path is still the old file
            aside.unlink(missing_ok=True)
        _raise_typed(path, err)
        raise
    finally:
        with contextlib.suppress(OSError):
            temp.unlink()
    return aside


NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
"""The errnos of a write the file system refused (read-only, permissions)."""


def _raise_typed(path: Path, err: OSError | sqlite3.Error) -> None:
    """Raise the typed error (naming the catalog ``path``) of ``err``, if it has one."""
    typed = _os_typed(path, err) if isinstance(err, OSError) else _typed(path, err)
    if typed is not None:
        raise typed from err


def _os_typed(path: Path, err: OSError) -> WsiSslError | None:
    """The typed error naming the catalog ``path`` for a failed write (a typed one of another
    path, a temp file's, is named again); None for other errors."""
    if isinstance(err, DiskFullError) or is_no_space(err):
        return _full(path)
    if isinstance(err, CatalogWriteError):
        return CatalogWriteError(path, err.reason)
    if err.errno in NOT_WRITABLE:
        why = why_not_writable(path)
        return CatalogWriteError(path, why[1] if why else err.strerror or str(err))
    return None


def _typed(path: Path, err: sqlite3.Error) -> WsiSslError | None:
    """sqlite's error of the catalog at ``path`` as a typed error; None: busy, or an I/O error
    (kept as sqlite raised it)."""
    code = getattr(err, "sqlite_errorcode", 0) & 0xFF
    if code == sqlite3.SQLITE_FULL:
        return _full(path)
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
        why = why_not_writable(path)
        words = why[1] if why else str(err)
        if err.sqlite_errorcode == sqlite3.SQLITE_READONLY_ROLLBACK:  # a hot journal
            words = (
                f"an unfinished transaction of a killed writer ({path.name}-journal) must be "
                f"rolled back to read it: {words}"
            )
        return CatalogWriteError(path, words)
    if code == sqlite3.SQLITE_ERROR and "no such table" in str(err):
        return CatalogCorruptError(path, f"not a wsi-ssl catalog: {err}")
    if isinstance(err, sqlite3.OperationalError):
        return None
    if isinstance(err, sqlite3.DatabaseError):  # "malformed", "file is not a database"
        return CatalogCorruptError(path, str(err))
    return None


def _full(path: Path) -> DiskFullError:
    return DiskFullError(
        path,
        "the archive's catalog could not be written: free space, then re-run (the re-run, or "
        f"`wsi-ssl check {shlex.quote(str(path.parent))} --repair`, adds the rows it lacks; the slide stores "
        "written are complete)",
    )


def why_not_writable(path: Path) -> tuple[int, str] | None:
    """Why this process cannot write ``path`` or make files beside it: ``(EROFS, the OS's
    words)`` on a read-only file system, ``(EACCES, "Permission denied: ...")`` where
    permissions refuse it (:func:`permission_denied`); None: it can (or it cannot be told)."""
    with contextlib.suppress(OSError):
        if os.statvfs(path if path.exists() else path.parent).f_flag & os.ST_RDONLY:
            return errno.EROFS, os.strerror(errno.EROFS)
        if denied := permission_denied(path, path.parent):
            return errno.EACCES, f"{os.strerror(errno.EACCES)}: {denied[0]}: {denied[1]}"
    return None


def permission_denied(*paths: Path) -> tuple[str, str] | None:
    """``(the first of paths that exists and this user may not write, with its owner; what to
    do)``, e.g. ``("/a/catalog.sqlite is owned by user ana, uid 1001", "run as that user or
    fix its permissions")``; None when there is none (a read-only mount is not told apart:
    see :func:`why_not_writable`)."""
    for path in paths:
        if not path.exists() or os.access(path, os.W_OK):
            continue
        info, user = path.stat(), ""
        if info.st_uid == os.geteuid():
            mode = f"{info.st_mode & 0o7777:04o}"
            return (
                f"{path} is this user's but its mode {mode} refuses writes",
                "fix its permissions",
            )
        with contextlib.suppress(KeyError):  # a uid with no name here
            user = f"user {pwd.getpwuid(info.st_uid).pw_name}, "
        return (
            f"{path} is owned by {user}uid {info.st_uid}",
            "run as that user or fix its permissions",
        )
    return None
