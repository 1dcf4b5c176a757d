"""Tile one slide or a batch of slides into an archive root: resume, failure isolation, progress."""

from __future__ import annotations

import contextlib
import errno
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from wsi_ssl.annotations import restrict_to_roi
from wsi_ssl.config import TilingConfig
from wsi_ssl.errors import (
    DiskFullError,
    NoTissueError,
    SlideNotFoundError,
    StoreLockedError,
    WsiSslError,
)
from wsi_ssl.slide import SlideReader, open_slide
from wsi_ssl.storage import (
    STATUS_COMPLETE,
    Archive,
    SlideStore,
    fingerprint_file,
    slide_id_from_fingerprint,
)
from wsi_ssl.storage.locks import slide_lock
from wsi_ssl.storage.slide_store import is_complete_store, recover_swap, staging_path
from wsi_ssl.storage.tile_reader import TileReader
from wsi_ssl.tiling.extract import extract
from wsi_ssl.tiling.grid import TileGrid
from wsi_ssl.tiling.qc import QC_METRICS
from wsi_ssl.tiling.replace import Replacement, check_plan, previous_store, replace_store
from wsi_ssl.tissue import detect_tissue, tissue_fraction

SLIDE_SUFFIXES = frozenset(
    {
        ".svs",
        ".tif",
        ".tiff",
        ".ndpi",
        ".vms",
        ".vmu",
        ".scn",
        ".mrxs",
        ".svslide",
        ".bif",
        ".qptiff",
        ".dcm",
    }
)
THUMBNAIL_MAX_SIDE = 4096
FAST_BACKEND = "tiffslide"


@dataclass
class SlideResult:
    """What happened to one slide of a batch."""

    path: str
    slide_id: str | None
    status: str  # "complete" | "skipped" | "busy" (another job writes it) | "failed"
    n_tiles: int = 0
    error: str | None = None
    error_type: str | None = None
    seconds: float = 0.0
    kept_embeddings: list[str] = field(default_factory=list)
    discarded_embeddings: list[str] = field(default_factory=list)


@dataclass
class BatchSummary:
    results: list[SlideResult] = field(default_factory=list)

    @property
    def failed(self) -> list[SlideResult]:
        return [r for r in self.results if r.status == "failed"]

    def to_dict(self) -> dict[str, Any]:
        counts = {
            s: sum(r.status == s for r in self.results)
            for s in ("complete", "skipped", "busy", "failed")
        }
        return {
            **counts,
            "tiles": sum(r.n_tiles for r in self.results),
            "slides": [asdict(r) for r in self.results],
        }


def collect_slide_paths(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand directories into the slide files they hold (one file per DICOM series folder)."""
    paths: list[Path] = []
    for item in inputs:
        item = Path(item)
        if not item.is_dir():
            paths.append(item)
            continue
        dicom_dirs: set[Path] = set()
        for p in sorted(item.rglob("*")):
            if not p.is_file() or p.suffix.lower() not in SLIDE_SUFFIXES:
                continue
            if p.suffix.lower() == ".dcm":
                if p.parent in dicom_dirs:
                    continue
                dicom_dirs.add(p.parent)
            paths.append(p)
    return paths


def thumbnail_and_mask(
    reader: SlideReader, slide_mpp: float, thumbnail_mpp: float
) -> tuple[np.ndarray, np.ndarray]:
    """The slide's thumbnail (at ``thumbnail_mpp``, at most ``THUMBNAIL_MAX_SIDE`` px) and its
    tissue mask; a level without a usable pyramid is read by blocks, in bounded memory."""
    w, h = reader.dimensions
    factor = min(slide_mpp / thumbnail_mpp, THUMBNAIL_MAX_SIDE / max(w, h))
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    thumbnail = reader.get_thumbnail(size)
    level0_per_px = w / thumbnail.shape[1]
    return thumbnail, detect_tissue(thumbnail, mpp=slide_mpp * level0_per_px)


def open_for_tiling(path: Path, mpp_override: float | None) -> SlideReader:
    """The registry's reader, or tiffslide where it reads the same pyramid faster.

    tiffslide decodes a tiled TIFF's tiles with libjpeg-turbo straight from the file, several
    times faster than openslide (benchmarks/RESULTS.md); it is used when the registry's reader is
    another backend, the file is tiled, and both report the same levels and scale. Anything
    else (NDPI, DICOM, MRXS, disagreeing pyramids) keeps the registry's choice.
    """
    reader = open_slide(path, mpp_override=mpp_override)
    if reader.backend == FAST_BACKEND:
        return reader
    try:
        fast = open_slide(path, mpp_override=mpp_override, backend=FAST_BACKEND)
    except WsiSslError:
        return reader
    same = fast.level_dimensions == reader.level_dimensions and fast.mpp == reader.mpp
    if same and getattr(fast, "tiled", False):
        reader.close()
        return fast
    fast.close()
    return reader


def _store_is_current(
    archive: Archive, slide_id: str, fingerprint: str, config: TilingConfig
) -> int | None:
    """Tile count of a complete store made from this file with this config, else None."""
    try:
        store = SlideStore.open(archive.store_path(slide_id))
    except (WsiSslError, OSError, KeyError):
        return None
    same_config = {k: store.tiling.get(k) for k in config.output_key()} == config.output_key()
    if store.source.get("fingerprint") != fingerprint or not same_config:
        return None
    if TileReader(store.tiles).missing_shards():  # damaged since: redo it
        return None
    return store.n_tiles


def tile_slide(
    path: str | Path,
    root: str | Path,
    config: TilingConfig | None = None,
    *,
    scheduler: Any = "threads",
    workers: int | None = None,
    resume: bool = True,
    progress: bool = False,
    discard_embeddings: bool = False,
    lock_wait: float = 0.0,
) -> SlideResult:
    """Tile one slide into ``<root>/slides/<slide_id>.zarr``.

    ``scheduler`` runs the extraction graph: "threads" (default) or "processes" locally with
    ``workers`` of them, or a ``dask.distributed.Client``. Raises the slide's typed error
    (``MissingMppError``, ``CorruptSlideError``, ...) after recording it in the catalog; a store
    is marked complete only after its last chunk is written.

    The slide's writer lock is held throughout: another job on the same slide waits up to
    ``lock_wait`` seconds, then gets ``StoreLockedError`` ("being written by pid N on HOST").
    A re-tile writes the new store beside the old one and swaps it in when complete
    (`wsi_ssl.tiling.replace`); it keeps the old store's embeddings when the tiles are the
    same, and refuses to drop them unless ``discard_embeddings``.
    """
    config = config or TilingConfig()
    started = time.perf_counter()
    path = Path(path)
    if not path.exists():
        raise SlideNotFoundError(path)
    archive = Archive(root)
    fingerprint = fingerprint_file(path)
    slide_id = slide_id_from_fingerprint(fingerprint)
    with slide_lock(root, slide_id, wait=lock_wait):
        recover_swap(archive.store_path(slide_id))  # what a killed job left
        if resume and (n := _store_is_current(archive, slide_id, fingerprint, config)) is not None:
            archive.catalog.upsert(
                slide_id=slide_id,
                path=path,
                fingerprint=fingerprint,
                status=STATUS_COMPLETE,
                n_tiles=n,
                tiling=config.output_key(),
            )
            return SlideResult(
                str(path), slide_id, "skipped", n, seconds=time.perf_counter() - started
            )
        n_tiles, replacement = _retile(
            archive,
            path,
            fingerprint,
            config,
            scheduler=scheduler,
            workers=workers,
            progress=progress,
            discard_embeddings=discard_embeddings,
        )
    return SlideResult(
        str(path),
        slide_id,
        "complete",
        n_tiles,
        seconds=time.perf_counter() - started,
        kept_embeddings=replacement.kept_embeddings,
        discarded_embeddings=replacement.discarded_embeddings,
    )


def _retile(
    archive: Archive,
    path: Path,
    fingerprint: str,
    config: TilingConfig,
    *,
    scheduler: Any,
    workers: int | None,
    progress: bool,
    discard_embeddings: bool,
) -> tuple[int, Replacement]:
    """Write the slide's store beside the current one and swap it in (holding the slide lock).

    On failure the previous complete store stays in place (and the catalog with it); the
    catalog records the failure only when no complete store is left.
    """
    slide_id = slide_id_from_fingerprint(fingerprint)
    store_path = archive.store_path(slide_id)
    staging = staging_path(store_path)
    previous = previous_store(store_path)
    try:
        with open_for_tiling(path, config.mpp_override) as reader:
            n_tiles = _tile_open_slide(
                reader,
                staging,
                fingerprint,
                config,
                scheduler,
                workers,
                progress,
                previous=previous,
                discard_embeddings=discard_embeddings,
            )
        replacement = replace_store(store_path, staging, discard_embeddings)
    except Exception as err:
        recover_swap(store_path, roll_forward=False)
        full = isinstance(err, OSError) and err.errno == errno.ENOSPC
        failure = DiskFullError(store_path) if full else err
        if not is_complete_store(store_path):
            with contextlib.suppress(OSError, sqlite3.Error):  # the catalog may be on the full disk
                archive.catalog.upsert(
                    slide_id=slide_id,
                    path=path,
                    fingerprint=fingerprint,
                    status="failed",
                    error=f"{type(failure).__name__}: {failure}",
                    tiling=config.output_key(),
                )
        if full:
            raise failure from err
        raise
    archive.catalog.upsert(
        slide_id=slide_id,
        path=path,
        fingerprint=fingerprint,
        status=STATUS_COMPLETE,
        n_tiles=n_tiles,
        tiling=config.output_key(),
    )
    return n_tiles, replacement


def _tile_open_slide(
    reader: SlideReader,
    store_path: Path,
    fingerprint: str,
    config: TilingConfig,
    scheduler: Any,
    workers: int | None,
    progress: bool,
    *,
    previous: SlideStore | None = None,
    discard_embeddings: bool = False,
) -> int:
    """Write the slide's store at ``store_path`` (left with status "writing")."""
    if reader.mpp is None:
        reader.get_thumbnail((64, 64))  # undecodable pixels fail first, before the scale
    slide_mpp = reader.require_mpp()
    grid = TileGrid.for_slide(reader, slide_mpp, config)
    thumbnail, mask = thumbnail_and_mask(reader, slide_mpp, config.thumbnail_mpp)
    level0_per_px = reader.dimensions[0] / thumbnail.shape[1]
    coords = grid.all_coords()
    fraction = tissue_fraction(mask, coords, grid.tile_size_level0, level0_per_px)
    keep = fraction >= config.tissue_threshold
    if not keep.any():
        raise NoTissueError(reader.path, config.tissue_threshold)
    check_plan(previous, fingerprint, config, coords[keep], discard_embeddings)
    keep, labels = restrict_to_roi(
        config, keep, coords, grid.tile_size_level0, mask.shape, level0_per_px
    )
    store = SlideStore.create(
        store_path,
        source={
            "path": str(reader.path.resolve()),
            "fingerprint": fingerprint,
            "reader": reader.backend,
            "vendor": reader.vendor,
            "dimensions": list(reader.dimensions),
            "mpp": slide_mpp,
            "mpp_source": reader.mpp_source,
            "level_count": reader.level_count,
        },
        tiling={**config.output_key(), **grid.to_dict()},
        coords=coords[keep],
        tile_size=config.tile_size,
        tiles_per_shard=config.tiles_per_chunk,
        codec=config.codec,
        jpeg_quality=config.jpeg_quality,
        thumbnail=thumbnail,
        tissue_mask=mask,
        tissue_fraction=fraction[keep],
    )
    store.create_tables(
        QC_METRICS if config.qc else (),
        config.tiles_per_chunk,
        None if labels is None else ("annotations", labels.fractions[keep], labels.classes),
    )
    with tqdm(
        total=int(keep.sum()),
        desc=reader.path.name[:30],
        unit="tile",
        leave=False,
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        written = extract(
            reader,
            grid,
            coords[keep],
            store.path / "tiles",
            config.tiles_per_chunk,
            scheduler=scheduler,
            workers=workers,
            on_chunk=bar.update,
        )
    return written


def tile_slides(
    inputs: Iterable[str | Path],
    root: str | Path,
    config: TilingConfig | None = None,
    *,
    mpp_overrides: Mapping[str, float] | None = None,
    rois: Mapping[str, str] | None = None,
    scheduler: Any = "threads",
    workers: int | None = None,
    resume: bool = True,
    progress: bool = True,
    discard_embeddings: bool = False,
    lock_wait: float = 0.0,
) -> BatchSummary:
    """Tile every slide in ``inputs`` (files or folders); a failing slide never stops the batch.

    A slide another job is writing is reported "busy" (after ``lock_wait`` seconds) and left
    to that job; ``discard_embeddings`` as in :func:`tile_slide`.

    Args:
        mpp_overrides: per-slide mpp by file name or path (e.g. from a CSV), used when the
            slide records no scale of its own; ``config.mpp_override`` applies to the rest.
        rois: per-slide annotation file by file name or path (``config.roi`` for the rest).
    """
    config = config or TilingConfig()
    paths = collect_slide_paths(inputs)
    overrides = dict(mpp_overrides or {})
    summary = BatchSummary()
    batch_started = time.perf_counter()
    with tqdm(paths, desc="slides", unit="slide", disable=not progress, dynamic_ncols=True) as bar:
        for path in bar:
            override = overrides.get(str(path), overrides.get(path.name, config.mpp_override))
            roi = (rois or {}).get(str(path), (rois or {}).get(path.name, config.roi))
            slide_config = replace(config, mpp_override=override, roi=roi)
            started = time.perf_counter()
            try:
                result = tile_slide(
                    path,
                    root,
                    slide_config,
                    scheduler=scheduler,
                    workers=workers,
                    resume=resume,
                    progress=progress,
                    discard_embeddings=discard_embeddings,
                    lock_wait=lock_wait,
                )
            except StoreLockedError as err:  # another job is on it: not this slide's fault
                result = SlideResult(
                    str(path),
                    _slide_id_or_none(path),
                    "busy",
                    error=str(err),
                    error_type=type(err).__name__,
                    seconds=time.perf_counter() - started,
                )
            except Exception as err:  # one slide's failure, whatever it is, ends only that slide
                message = (
                    str(err)
                    if isinstance(err, WsiSslError)
                    else f"{path}: cannot be tiled ({type(err).__name__}: {err}); the file may be "
                    "malformed: check it opens in QuPath or re-export it"
                )
                result = SlideResult(
                    str(path),
                    _slide_id_or_none(path),
                    "failed",
                    error=message,
                    error_type=type(err).__name__,
                    seconds=time.perf_counter() - started,
                )
            summary.results.append(result)
            tiles = sum(r.n_tiles for r in summary.results if r.status == "complete")
            rate = tiles / max(time.perf_counter() - batch_started, 1e-9)
            bar.set_postfix(tiles=tiles, tiles_s=f"{rate:.0f}", failed=len(summary.failed))
    return summary


def _slide_id_or_none(path: Path) -> str | None:
    try:
        return slide_id_from_fingerprint(fingerprint_file(path))
    except OSError:
        return None
