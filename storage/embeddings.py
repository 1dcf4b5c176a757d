"""Patch embeddings inside a slide store: ``<slide_id>.zarr/embeddings/<encoder_id>``.

Layout (Zarr v3, one array per encoder)::

    <slide_id>.zarr/embeddings/                 group
        <encoder_id>/                           float16 or float32 (N, D), row i = tile i
            attributes: status "complete", encoder_id, encoder (the frozen encoder config),
                        weights_sha256, n_tiles, dim, dtype, coords_sha256, compute, ...
                        not_embedded (only when tiles were left out, see below)
        .writing-<encoder_id>/                  only while a job writes it (or after a kill)
        .replaced-<encoder_id>/                 the old array, only during the swap

Writes are atomic at the level of one slide and one encoder, and there is one writer: the
:class:`EmbeddingWriter` holds the array's lock (``wsi_ssl.storage.locks.embeddings_lock``)
and a shared lock on the slide store (so the store is not re-tiled under it) from creation to
commit or abort; a second writer gets :class:`~wsi_ssl.errors.StoreLockedError` naming the
holder. The array is written under ``.writing-<encoder_id>`` with status "writing"; when the
last row is written every file is fsync'ed, the status becomes "complete", an older array of
that id is renamed aside to ``.replaced-<encoder_id>``, the new one renamed into place and the
old one removed. A kill between the two renames leaves the complete new array under the
partial name, which the next writer (or ``wsi-ssl check --repair``) renames into place.

Completeness is judged by content, not attributes alone (:func:`embeddings_problem`): status,
shape against the store's tiles, coords hash, every chunk file present, every row decodable
and finite. Resume redoes any array with a problem. Chunks are zstd frames with the content
checksum, so a changed byte fails to decode instead of reading back as a wrong vector (arrays
written before the checksum carry none).

Rows without a vector (an embedding job run with ``skip_flagged_tiles``): NaN, named by the
attribute ``not_embedded``, and the only rows allowed to be non-finite; readers take the rows
that hold vectors (:mod:`wsi_ssl.storage.embedding_rows`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from wsi_ssl.errors import (
    EmbeddingsCorruptError,
    EmbeddingsIncompleteError,
    EmbeddingsNotFoundError,
    EmbeddingWriteError,
    SchemaMismatchError,
    StoreLockedError,
)
from wsi_ssl.interrupts import interrupts_held
from wsi_ssl.storage.atomic import fsync_dir, fsync_file, fsync_tree, rename_into_place
from wsi_ssl.storage.codecs import CHECKED_ZSTD
from wsi_ssl.storage.embedding_rows import (
    NOT_EMBEDDED,
    Embeddings,
    embedded_rows,
    not_embedded_tiles,
)
from wsi_ssl.storage.locks import (
    embeddings_lock,
    embeddings_lock_path,
    is_locked,
    read_holder,
    slide_lock,
    slide_lock_path,
)
from wsi_ssl.storage.slide_store import STATUS_COMPLETE, STATUS_WRITING, SlideStore

if TYPE_CHECKING:
    import dask.array as da

__all__ = [
    "EMBEDDINGS_GROUP",
    "EMBEDDING_DTYPES",
    "NOT_EMBEDDED",
    "EmbeddingWriter",
    "Embeddings",
    "clear_partial",
    "coords_sha256",
    "embedded_rows",
    "embedding_ids",
    "embedding_status",
    "embeddings_busy",
    "embeddings_problem",
    "finish_interrupted_swap",
    "not_embedded_tiles",
    "open_embeddings_array",
    "read_embeddings",
    "resolve_encoder_id",
]

EMBEDDINGS_GROUP = "embeddings"
PARTIAL_PREFIX = ".writing-"
REPLACED_PREFIX = ".replaced-"
EMBEDDING_DTYPES = ("float16", "float32")
STATUS_MISSING = "missing"
DEFAULT_CHUNK_BYTES = 1 << 20  # ~1 MiB chunks of whole rows


def coords_sha256(coords: np.ndarray) -> str:
    """Hash of the tile coordinates, recorded so vectors are never paired with other tiles."""
    return hashlib.sha256(np.ascontiguousarray(coords, dtype="<i8").tobytes()).hexdigest()


def _group_dir(store_path: Path) -> Path:
    return Path(store_path) / EMBEDDINGS_GROUP


def _array_dir(store_path: Path, encoder_id: str) -> Path:
    return _group_dir(store_path) / encoder_id


def _partial_dir(store_path: Path, encoder_id: str) -> Path:
    return _group_dir(store_path) / f"{PARTIAL_PREFIX}{encoder_id}"


def _replaced_dir(store_path: Path, encoder_id: str) -> Path:
    return _group_dir(store_path) / f"{REPLACED_PREFIX}{encoder_id}"


def _read_attrs(array_dir: Path) -> dict[str, Any] | None:
    """Attributes of an array directory, or None when it is absent or unreadable."""
    if not (array_dir / "zarr.json").is_file():
        return None
    try:
        return dict(zarr.open_array(array_dir, mode="r", zarr_format=3).attrs)
    except Exception:  # truncated metadata after a kill counts as not there
        return None


def embedding_status(store: SlideStore | Path, encoder_id: str) -> str:
    """Status of an array: "complete", "writing" (being written, or killed) or "missing"."""
    path = store.path if isinstance(store, SlideStore) else Path(store)
    attrs = _read_attrs(_array_dir(path, encoder_id))
    if attrs is not None:
        return str(attrs.get("status", STATUS_WRITING))
    if _partial_dir(path, encoder_id).exists():
        return STATUS_WRITING
    return STATUS_MISSING


def complete_embedding_attrs(store_path: str | Path, encoder_id: str) -> dict[str, Any] | None:
    """The attributes of a store's complete embeddings ``encoder_id`` (provenance,
    ``coords_sha256``, ``created``), or None when they are not complete or not there."""
    attrs = _read_attrs(_array_dir(Path(store_path), encoder_id))
    return attrs if attrs is not None and attrs.get("status") == STATUS_COMPLETE else None


def embedding_ids(store: SlideStore | Path) -> list[str]:
    """Encoder ids of the complete embeddings in a slide store, sorted."""
    path = store.path if isinstance(store, SlideStore) else Path(store)
    group = _group_dir(path)
    if not group.is_dir():
        return []
    ids = []
    for child in sorted(group.iterdir()):
        if child.name.startswith(".") or not child.is_dir():
            continue
        attrs = _read_attrs(child)
        if attrs is not None and attrs.get("status") == STATUS_COMPLETE:
            ids.append(child.name)
    return ids


def resolve_encoder_id(store: SlideStore | Path, name: str | None) -> str:
    """An exact encoder id, or the one complete id that starts with ``name`` (e.g. "resnet18");
    see :func:`wsi_ssl.storage.resolve.resolve_encoder`."""
    from wsi_ssl.storage.resolve import resolve_encoder

    path = store.path if isinstance(store, SlideStore) else Path(store)
    return resolve_encoder(embedding_ids(path), name, path)


def open_embeddings_array(store_path: str | Path, encoder_id: str) -> zarr.Array[Any]:
    """The stored array of ``encoder_id`` (read-only, unchecked: its shape and attributes;
    :func:`read_embeddings` for vectors that are checked)."""
    return zarr.open_array(_array_dir(Path(store_path), encoder_id), mode="r")


def read_embeddings(store: SlideStore, encoder_id: str, *, lazy: bool = False) -> Embeddings:
    """The complete embeddings ``encoder_id`` of a slide store, as numpy (or dask if ``lazy``).

    Raises:
        EmbeddingsNotFoundError: no such array (the message lists the available ids).
        EmbeddingsIncompleteError: the array exists but is not marked complete.
        SchemaMismatchError: the row count or coords hash does not match the store's tiles.
    """
    status = embedding_status(store, encoder_id)
    if status == STATUS_MISSING:
        raise EmbeddingsNotFoundError(store.path, encoder_id, embedding_ids(store))
    if status != STATUS_COMPLETE:
        raise EmbeddingsIncompleteError(store.path, encoder_id, status)
    array = zarr.open_array(_array_dir(store.path, encoder_id), mode="r", zarr_format=3)
    attrs = dict(array.attrs)
    coords = store.coords
    if array.shape[0] != len(coords) or attrs.get("coords_sha256") not in (
        None,
        coords_sha256(coords),
    ):
        raise SchemaMismatchError(
            f"{store.path}: embeddings {encoder_id!r} have {array.shape[0]} rows for "
            f"{len(coords)} tiles (or were made for other tiles); re-embed this slide with "
            "resume=False",
            parameters=("resume",),
        )
    missing, expected = _missing_chunks(_array_dir(store.path, encoder_id), array)
    if missing:
        raise EmbeddingsCorruptError(
            store.path, encoder_id, f"{missing} of {expected} chunk files missing"
        )
    if lazy:
        import dask.array as da

        features: np.ndarray | da.Array = da.from_zarr(array)  # type: ignore[no-untyped-call]
    else:
        try:
            features = np.asarray(array[:])
        except Exception as err:  # a chunk the codec cannot decode
            raise EmbeddingsCorruptError(
                store.path, encoder_id, f"{type(err).__name__}: {err}"
            ) from err
        bad = ~np.isfinite(features).all(axis=1)
        bad[not_embedded_tiles(attrs)] = False  # NaN by design (see the module docstring)
        if bad.any():  # the writer refuses non-finite rows: these are missing chunks (NaN fill)
            raise EmbeddingsCorruptError(
                store.path, encoder_id, f"{int(bad.sum())} of {len(bad)} rows missing or not finite"
            )
    return Embeddings(store.slide_id, encoder_id, features, coords, attrs)


def _missing_chunks(array_dir: Path, array: zarr.Array[Any]) -> tuple[int, int]:
    """(missing, expected) chunk files of an (N, D) array chunked by whole rows."""
    rows = int(array.chunks[0])
    expected = math.ceil(array.shape[0] / rows) if array.shape[0] else 0
    missing = sum(not (array_dir / "c" / str(i) / "0").is_file() for i in range(expected))
    return missing, expected


def _undecodable_rows(array: zarr.Array[Any], attrs: Mapping[str, Any]) -> str | None:
    """Decode an array chunk by chunk; what is wrong, or None (rows ``not_embedded`` may be
    NaN)."""
    rows = int(array.chunks[0])
    expected_nan = np.zeros(array.shape[0], dtype=bool)
    expected_nan[not_embedded_tiles(attrs)] = True
    bad = 0
    for start in range(0, array.shape[0], rows):
        try:
            block = np.asarray(array[start : start + rows])
        except Exception as err:  # a chunk the codec cannot decode
            return f"rows {start}.. cannot be decoded ({type(err).__name__}: {err})"
        finite = np.isfinite(block).all(axis=1)
        bad += int((~finite & ~expected_nan[start : start + rows]).sum())
    return f"{bad} of {array.shape[0]} rows missing or not finite" if bad else None


def embeddings_problem(store: SlideStore, encoder_id: str, *, decode: bool = True) -> str | None:
    """What is wrong with the embeddings ``encoder_id`` of ``store``, or None when complete.

    Checks the status, the row count against the store's tiles, the coords hash, that every
    chunk file is present and (``decode``) that every row decodes to finite values.
    """
    array_dir = _array_dir(store.path, encoder_id)
    attrs = _read_attrs(array_dir)
    if attrs is None:
        if _partial_dir(store.path, encoder_id).exists():
            return "unfinished (a job writing them was interrupted)"
        return "missing" if not array_dir.exists() else "metadata unreadable"
    if attrs.get("status") != STATUS_COMPLETE:
        return f"status {attrs.get('status')!r}, not 'complete'"
    array = zarr.open_array(array_dir, mode="r", zarr_format=3)
    coords = store.coords
    if array.shape[0] != len(coords) or len(array.shape) != 2:
        return f"shape {array.shape} for {len(coords)} tiles"
    if attrs.get("coords_sha256") not in (None, coords_sha256(coords)):
        return "made for other tiles (coords differ)"
    missing, expected = _missing_chunks(array_dir, array)
    if missing:
        return f"{missing} of {expected} chunk files missing"
    return _undecodable_rows(array, attrs) if decode else None


def embeddings_busy(store_path: str | Path, encoder_id: str) -> StoreLockedError | None:
    """The error an :class:`EmbeddingWriter` would raise now without waiting, or None: another
    process writes these embeddings, or tiles the slide."""
    store_path = Path(store_path)
    root, slide_id = store_path.parent.parent, store_path.name.removesuffix(".zarr")
    slide_path = slide_lock_path(root, slide_id)
    if is_locked(slide_path, shared=True):
        return StoreLockedError(store_path, read_holder(slide_path))
    array_path = embeddings_lock_path(root, slide_id, encoder_id)
    if is_locked(array_path):
        return StoreLockedError(_array_dir(store_path, encoder_id), read_holder(array_path))
    return None


def finish_interrupted_swap(store_path: str | Path, encoder_id: str) -> None:
    """Complete or undo a commit cut between its two renames (call with the array's lock).

    A complete array under the partial name with none under the final name is renamed into
    place; an old array renamed aside is put back if nothing replaced it, else removed.
    """
    store_path = Path(store_path)
    final = _array_dir(store_path, encoder_id)
    tmp = _partial_dir(store_path, encoder_id)
    old = _replaced_dir(store_path, encoder_id)
    if _read_attrs(final) is None:
        for candidate in (tmp, old):
            attrs = _read_attrs(candidate)
            if attrs is not None and attrs.get("status") == STATUS_COMPLETE:
                if final.exists():
                    shutil.rmtree(final)
                rename_into_place(candidate, final)
                break
    if old.exists():
        shutil.rmtree(old)


def clear_partial(store_path: str | Path, encoder_id: str) -> bool:
    """Remove what a killed writer left of the embeddings ``encoder_id`` (a swap cut between
    its renames finished first), under the array's lock; True when nothing is left.

    Raises:
        StoreLockedError: another process is writing them now.
    """
    store_path = Path(store_path)
    root, slide_id = store_path.parent.parent, store_path.name.removesuffix(".zarr")
    with embeddings_lock(root, slide_id, encoder_id):
        finish_interrupted_swap(store_path, encoder_id)
        partial = _partial_dir(store_path, encoder_id)
        shutil.rmtree(partial, ignore_errors=True)
        return not partial.exists()


class EmbeddingWriter:
    """Writes one slide's (N, D) vectors under a temporary name; ``commit`` makes them visible.

    Holds the array's writer lock (and a shared lock on the slide store) from creation to ``commit``
    or ``abort``; ``wait`` seconds to wait for another writer (default: none); ``check()`` runs
    holding them, and what it raises lets them go with nothing made. Rows may arrive in any order as
    blocks ``write(start, block)``; whole chunks are written as soon as their rows are all present,
    so memory stays at about one chunk plus the blocks that arrived early. Any ``OSError`` (a full
    disk) becomes :class:`EmbeddingWriteError` after the partial array is removed.

    Raises:
        StoreLockedError: another process is writing this array (or tiling the slide).
    """

    def __init__(
        self,
        store_path: str | Path,
        encoder_id: str,
        *,
        n_rows: int,
        dim: int,
        dtype: str = "float16",
        attrs: dict[str, Any] | None = None,
        chunk_rows: int | None = None,
        wait: float = 0.0,
        check: Callable[[], object] = lambda: None,
    ) -> None:
        if dtype not in EMBEDDING_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(EMBEDDING_DTYPES)}; got {dtype!r}")
        self.store_path = Path(store_path)
        self.encoder_id = encoder_id
        self.n_rows = int(n_rows)
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        itemsize = self.dtype.itemsize
        self.chunk_rows = int(chunk_rows or max(64, DEFAULT_CHUNK_BYTES // (itemsize * self.dim)))
        self._pending: dict[int, np.ndarray] = {}
        self._buffer = np.empty((0, self.dim), dtype=self.dtype)
        self._flushed = 0  # rows [0, _flushed) are on disk
        self._done = False
        self._tmp = _partial_dir(self.store_path, encoder_id)
        self._final = _array_dir(self.store_path, encoder_id)
        self._locks = _hold_locks(self.store_path, encoder_id, wait, check)
        try:
            finish_interrupted_swap(self.store_path, encoder_id)
            if self._tmp.exists():
                shutil.rmtree(self._tmp)
            slide = zarr.open_group(self.store_path, mode="r+", zarr_format=3)
            group = slide.require_group(EMBEDDINGS_GROUP)
            self._array = group.create_array(
                self._tmp.name,
                shape=(self.n_rows, self.dim),
                dtype=self.dtype,
                chunks=(min(self.chunk_rows, max(1, self.n_rows)), self.dim),
                dimension_names=("tile", "feature"),
                fill_value=np.nan,
                compressors=CHECKED_ZSTD,  # a changed byte fails, not a wrong row
                config={"write_empty_chunks": True},  # rows not embedded are NaN: keep them
            )
            self._array.attrs.update(
                {**(attrs or {}), "status": STATUS_WRITING, "encoder_id": encoder_id}
            )
        except OSError as err:
            self.abort()
            raise EmbeddingWriteError(self.store_path, str(err)) from err
        except BaseException:
            self.abort()
            raise

    @property
    def rows_written(self) -> int:
        return self._flushed + len(self._buffer) + sum(len(b) for b in self._pending.values())

    def write(self, start: int, block: np.ndarray) -> None:
        """Rows ``start .. start + len(block)`` (cast to the array's dtype)."""
        block = np.asarray(block)
        if block.ndim != 2 or block.shape[1] != self.dim or start + len(block) > self.n_rows:
            raise ValueError(
                f"block of shape {block.shape} at row {start} does not fit ({self.n_rows}, "
                f"{self.dim})"
            )
        self._pending[int(start)] = block.astype(self.dtype, copy=False)
        next_row = self._flushed + len(self._buffer)
        while next_row in self._pending:
            blk = self._pending.pop(next_row)
            self._buffer = np.concatenate([self._buffer, blk]) if len(self._buffer) else blk
            next_row += len(blk)
        self._flush(final=False)

    def _flush(self, *, final: bool) -> None:
        n = len(self._buffer)
        whole = n if final else (n // self.chunk_rows) * self.chunk_rows
        # chunk-aligned writes only (the flushed prefix always ends on a chunk boundary)
        if whole == 0:
            return
        try:
            self._array[self._flushed : self._flushed + whole] = self._buffer[:whole]
        except OSError as err:
            self.abort()
            raise EmbeddingWriteError(self.store_path, str(err)) from err
        self._flushed += whole
        self._buffer = self._buffer[whole:]

    def commit(self, extra_attrs: dict[str, Any] | None = None) -> Path:
        """Write the last rows, mark complete, swap into place; returns the array's path."""
        if self._pending or self._flushed + len(self._buffer) != self.n_rows:
            missing = self.n_rows - self.rows_written
            raise RuntimeError(
                f"{self._tmp}: cannot commit, {missing} of {self.n_rows} rows not written"
            )
        self._flush(final=True)
        old = _replaced_dir(self.store_path, self.encoder_id)
        try:
            fsync_tree(self._tmp)
            self._array.attrs.update({**(extra_attrs or {}), "status": STATUS_COMPLETE})
            fsync_file(self._tmp / "zarr.json")
            fsync_dir(self._tmp)
            if self._final.exists():
                if old.exists():
                    shutil.rmtree(old)
                rename_into_place(self._final, old)
            rename_into_place(self._tmp, self._final)
            shutil.rmtree(old, ignore_errors=True)
        except OSError as err:
            self.abort()
            raise EmbeddingWriteError(self.store_path, str(err)) from err
        self._done = True
        self._locks.close()
        return self._final

    def abort(self) -> None:
        """Remove the partial array, put back an old one set aside, let go of the locks
        (best effort; never raises)."""
        self._pending.clear()
        self._buffer = np.empty((0, self.dim), dtype=self.dtype)
        if not self._done:
            with interrupts_held(), contextlib.suppress(OSError):  # a second Ctrl-C waits
                if self._tmp.exists():
                    shutil.rmtree(self._tmp, ignore_errors=True)
                old = _replaced_dir(self.store_path, self.encoder_id)
                if old.exists() and not self._final.exists():  # undo the first rename
                    os.replace(old, self._final)
                    fsync_dir(self._final.parent)
        self._done = True
        self._locks.close()


def _hold_locks(
    store_path: Path, encoder_id: str, wait: float, check: Callable[[], object]
) -> contextlib.ExitStack:
    """The array's writer lock and a shared lock on its slide store, held until closed."""
    root, slide_id = store_path.parent.parent, store_path.name.removesuffix(".zarr")
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(slide_lock(root, slide_id, wait=wait, shared=True))
        stack.enter_context(embeddings_lock(root, slide_id, encoder_id, wait=wait))
        check()  # what it raises lets them go
    except BaseException:
        stack.close()
        raise
    return stack
