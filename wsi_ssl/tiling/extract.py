"""The Dask extraction graph: one task per chunk of tiles, each reading and writing its chunk.

A task opens the slide through a per-thread cached reader and reads its tiles in the row-major
order TIFF files store theirs. A tile that coincides with one of the file's own tiles is
decoded from it directly, or, for a JPEG store and a JPEG file (YCbCr, or RGB given the Adobe
marker a plain decoder needs), its JPEG stream is copied as it is (no decode, no re-encode, no
second generation of loss). Other tiles are read as horizontal strips of row neighbours,
resampled once when the read level is not the target scale; where that is a shrink by 2, 4 or
8 of a JPEG or JPEG 2000 level, the strip is assembled from stored tiles decoded at reduced
scale (DCT domain, or the wavelet level; :mod:`wsi_ssl.tiling.decode`), and other JPEG 2000
strips from stored tiles decoded with threads. The task writes its chunk, one whole Zarr shard,
straight into the store, and returns the chunk's QC scores (16 bytes a tile), which the
caller writes once. Only coordinates go into the graph and scores come out, so memory per
worker is one chunk whatever the slide size.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np
from PIL import Image

from wsi_ssl.errors import TileWorkerDiedError
from wsi_ssl.parent_watch import die_with_parent
from wsi_ssl.slide import SlideReader, StoredTiles, open_slide, series_files
from wsi_ssl.storage.shards import accepts_jpeg, write_shard
from wsi_ssl.storage.slide_store import STAGING_SUFFIX, open_tiles
from wsi_ssl.storage.writer_token import check_still_ours, claim, release, writing
from wsi_ssl.tiling.decode import (
    J2K_COMPRESSIONS,
    decode_reduced,
    decode_stored,
    portable_jpeg,
    reducible,
)
from wsi_ssl.tiling.grid import TileGrid
from wsi_ssl.tiling.qc import chunk_scores, scratch_tiles

LOCAL_SCHEDULERS = ("threads", "processes")

MAX_RUN = 16
"""Most tiles read in one strip: bounds a strip's memory to 16 tiles."""

_local = threading.local()

SlideIdentity = tuple[tuple[str, int, int, int, int], ...]
"""Which bytes a slide path names now: (file, device, inode, size, mtime_ns) of each file."""


def slide_identity(path: str | Path) -> SlideIdentity:
    """The identity of the slide at ``path``: its file's, or for DICOM (a folder, or a ``.dcm``
    file and its series beside it) every instance's. Another file moved to the same path, or
    the file rewritten, changes it."""
    path = Path(path)
    dicom = path.is_dir() or path.suffix.lower() == ".dcm"
    stats = ((f, f.stat()) for f in (series_files(path) if dicom else [path]))
    return tuple((str(f), s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for f, s in stats)


def cached_reader(path: str, backend: str, identity: SlideIdentity | None = None) -> SlideReader:
    """The calling thread's reader for a slide, opened once per worker thread and kept while
    the path names the same file: ``identity`` (the job's :func:`slide_identity`, taken now when
    None) differing from the one it was opened at, it is closed and the path opened again (a
    long-lived cluster worker never reads a replaced file's old pixels)."""
    cache: dict[tuple[str, str], tuple[SlideIdentity, SlideReader]] = getattr(_local, "readers", {})
    _local.readers = cache
    key, identity = (path, backend), slide_identity(path) if identity is None else identity
    if key in cache and cache[key][0] != identity:
        cache.pop(key)[1].close()
    if key not in cache:
        if len(cache) >= 4:
            cache.pop(next(iter(cache)))[1].close()
        cache[key] = (identity, open_slide(path, backend=backend))
    return cache[key][1]


def _runs(
    coords: np.ndarray, stride: float, group: np.ndarray | None = None
) -> Iterator[tuple[int, int]]:
    """Index ranges of neighbouring tiles in the same grid row, at most ``MAX_RUN`` long (and
    of one ``group`` value each, when given)."""
    cols = np.round(coords[:, 0] / stride).astype(np.int64)
    start = 0
    for i in range(1, len(coords) + 1):
        if (
            i == len(coords)
            or coords[i, 1] != coords[start, 1]
            or cols[i] != cols[i - 1] + 1
            or i - start == MAX_RUN
            or (group is not None and group[i] != group[start])
        ):
            yield start, i
            start = i


def stored_positions(
    reader: SlideReader, grid: TileGrid, coords: np.ndarray
) -> tuple[StoredTiles | None, np.ndarray]:
    """The read level's stored tiles and each tile's (row, col) among them, -1 where it does
    not coincide with one stored tile (resampled grid, other tile size, offset, slide edge)."""
    t = grid.tile_size
    positions = np.full((len(coords), 2), -1, dtype=np.int64)
    stored = None if grid.resize else reader.stored_tiles(grid.level)
    if stored is None or stored.tile_shape != (t, t):
        return None, positions
    lx = coords[:, 0] / grid.level_downsample
    ly = coords[:, 1] / grid.level_downsample
    level_w, level_h = reader.level_dimensions[grid.level]
    ok = (lx % t == 0) & (ly % t == 0) & (lx + t <= level_w) & (ly + t <= level_h)
    positions[ok] = np.stack([ly[ok] // t, lx[ok] // t], axis=1)
    return stored, positions


def _resample(
    strip: np.ndarray, size: tuple[int, int], factor: float, extent: tuple[float, float]
) -> np.ndarray:
    """The first ``extent`` (w, h; fractional) pixels of ``strip`` resized to ``size`` (w, h): a
    k x k box average when shrinking by a whole k (exact area averaging, and several times
    faster), bilinear with antialiasing otherwise (the strip was read whole pixels long: its
    last, partly needed pixel is not stretched into the tiles)."""
    image = Image.fromarray(strip)
    k = round(factor)
    if k > 1 and abs(factor - k) < 1e-9 and (image.width // k, image.height // k) == size:
        return np.asarray(image.reduce(k))
    box = (0.0, 0.0, min(extent[0], image.width), min(extent[1], image.height))
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR, box=box))


def strip_source(reader: SlideReader, grid: TileGrid) -> tuple[StoredTiles, int] | None:
    """Where strips are assembled from the read level's stored tiles, those tiles and the
    scale 1/k they are decoded at: k, the whole factor the grid shrinks the level by, where
    the tiles decode at 1/k (:func:`~wsi_ssl.tiling.decode.reducible`: JPEG in the DCT domain,
    JPEG 2000 from a wavelet level); k = 1 for other JPEG 2000 strips (decoded with threads,
    resampled after). None: the reader's ``read_region``."""
    stored = reader.stored_tiles(grid.level)
    if stored is None:
        return None
    factor = grid.tile_size_level0 / grid.tile_size / grid.level_downsample
    k = round(factor)
    if grid.resize and abs(factor - k) < 1e-9 and reducible(stored, k):
        return stored, k
    return (stored, 1) if stored.page.compression in J2K_COMPRESSIONS else None


def _stored_region(
    stored: StoredTiles,
    k: int,
    origin: tuple[float, float],
    size: tuple[int, int],
    threads: int,
    tiles: np.ndarray | None = None,
) -> np.ndarray | None:
    """The level region at ``origin`` (level pixels) of ``size`` (w, h) shrunk k times, each
    stored tile it covers decoded once at 1/k (``threads`` threads for a full JPEG 2000
    decode); None where the region is not on whole k-pixel blocks inside the level (the caller
    reads it the general way). With ``tiles`` ((n, T, T, 3), the region being n abutting output
    tiles) each decoded piece goes straight into its tiles, and ``tiles`` is returned."""
    x, y = round(origin[0]), round(origin[1])
    w, h = size
    th, tw = stored.tile_shape
    inside = x + w <= stored.page.imagewidth and y + h <= stored.page.imagelength
    whole = all(abs(v - round(v)) < 1e-6 for v in origin) and not (x % k or y % k or w % k or h % k)
    if not (inside and whole):
        return None
    out = np.empty((h // k, w // k, 3), dtype=np.uint8) if tiles is None else tiles
    for row in range(y // th, (y + h - 1) // th + 1):
        for col in range(x // tw, (x + w - 1) // tw + 1):
            tile = decode_reduced(stored, row, col, k, threads)
            ty, tx = row * th, col * tw
            y0, y1 = max(y, ty) // k, min(y + h, ty + th) // k
            x0, x1 = max(x, tx) // k, min(x + w, tx + tw) // k
            piece = tile[y0 - ty // k : y1 - ty // k, x0 - tx // k : x1 - tx // k]
            oy, ox = y0 - y // k, x0 - x // k
            if tiles is None:
                out[oy : oy + piece.shape[0], ox : ox + piece.shape[1]] = piece
            else:
                _place(tiles, piece, oy, ox)
    return out


def _place(tiles: np.ndarray, piece: np.ndarray, oy: int, ox: int) -> None:
    """Write ``piece`` at (oy, ox) of the strip that abutting ``tiles`` form, split at their
    edges."""
    t = tiles.shape[2]
    left = ox
    while left < ox + piece.shape[1]:
        j, c = divmod(left, t)
        n = min(t - c, ox + piece.shape[1] - left)
        tiles[j, oy : oy + piece.shape[0], c : c + n] = piece[:, left - ox : left - ox + n]
        left += n


def _read_strips(
    reader: SlideReader,
    grid: TileGrid,
    coords: np.ndarray,
    threads: int = 1,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Tiles at ``coords`` read in strips of row neighbours: from the stored tiles where
    :func:`strip_source` says so, else through ``read_region``; resampled unless decoded at
    the output scale. Into ``out`` ((N, T, T, 3)) when given."""
    t = grid.tile_size
    out = np.empty((len(coords), t, t, 3), dtype=np.uint8) if out is None else out
    ds = grid.level_downsample
    per_out_px = grid.tile_size_level0 / t  # level-0 pixels per output pixel
    source = strip_source(reader, grid)
    # tiles inside the slide and tiles overhanging its edge go in separate strips
    inside = np.all(coords + grid.tile_size_level0 <= grid.dimensions, axis=1)
    for start, stop in _runs(coords, grid.stride_level0, inside if source else None):
        x0, y0 = (int(v) for v in coords[start])
        offsets = np.round((coords[start:stop, 0] - x0) / per_out_px).astype(np.int64)
        span0 = coords[stop - 1, 0] - x0 + grid.tile_size_level0
        size = (math.ceil(span0 / ds), math.ceil(grid.tile_size_level0 / ds))
        width = int(offsets[-1]) + t
        if (  # decoded at the output scale, tiles side by side: pieces straight into them
            source is not None
            and source[1] > 1
            and size == (width * source[1], t * source[1])
            and np.array_equal(offsets, np.arange(stop - start) * t)
            and _stored_region(*source, (x0 / ds, y0 / ds), size, threads, out[start:stop])
            is not None
        ):
            continue
        strip = None
        if source is not None:
            strip = _stored_region(*source, (x0 / ds, y0 / ds), size, threads)
        at_scale = strip is not None and source is not None and source[1] > 1
        if strip is None:
            strip = reader.read_region((x0, y0), grid.level, size)
        if grid.resize and not at_scale:
            target = (max(width, round(span0 / per_out_px)), t)
            extent = (target[0] * per_out_px / ds, t * per_out_px / ds)
            strip = _resample(strip, target, per_out_px / ds, extent)
        if strip.shape[0] < t or strip.shape[1] < width:
            pad = ((0, max(0, t - strip.shape[0])), (0, max(0, width - strip.shape[1])), (0, 0))
            strip = np.pad(strip, pad, mode="edge")
        for k, off in enumerate(offsets):
            out[start + k] = strip[:t, off : off + t]
    return out


def chunk_tiles(
    reader: SlideReader,
    grid: TileGrid,
    coords: np.ndarray,
    *,
    jpeg_passthrough: bool = False,
    decode_threads: int = 1,
    out: np.ndarray | None = None,
) -> list[np.ndarray | bytes]:
    """The tiles at ``coords`` (level-0 x, y; row-major), in order.

    A tile that coincides with one tile stored in the file is decoded from it directly, or,
    with ``jpeg_passthrough`` and a JPEG file, returned as its portable JPEG stream (bytes,
    :func:`~wsi_ssl.tiling.decode.portable_jpeg`) to be stored as it is. The rest are read
    as strips of row neighbours and resampled once when the grid is not at a stored scale (or
    decoded at it: :func:`strip_source`). ``decode_threads`` threads decode each JPEG 2000
    stored tile decoded at full size. ``out`` ((N, T, T, 3)): where the tiles read in strips
    go when no tile is stored whole (the QC scratch buffer; fresh arrays otherwise).
    """
    stored, positions = stored_positions(reader, grid, coords)
    direct = positions[:, 0] >= 0
    tiles: list[np.ndarray | bytes] = [b""] * len(coords)
    if stored is not None:
        for i in np.flatnonzero(direct):
            row, col = positions[i]
            stream = portable_jpeg(stored, row, col) if jpeg_passthrough else None
            if stream is None:
                tiles[i] = decode_stored(stored, row, col, decode_threads)
            else:
                tiles[i] = stream
    rest = np.flatnonzero(~direct)
    if len(rest):
        into = out if out is not None and len(rest) == len(coords) else None
        strips = _read_strips(reader, grid, coords[rest], decode_threads, into)
        for i, tile in zip(rest, strips, strict=True):
            tiles[i] = tile
    return tiles


@dataclass(frozen=True)
class Extracted:
    """What the extraction graph wrote: the tile count, when scored every tile's QC scores in
    tile order (float32 (N,) per metric), and each shard file's CRC32C in shard order (None
    where the array is not on a local store)."""

    n_tiles: int
    scores: dict[str, np.ndarray]
    shard_checksums: list[int] | None


ChunkResult = tuple[int, int, dict[str, np.ndarray], int | None]
"""A task's result: its first tile, its tile count, its tiles' QC scores (or none) and the
CRC32C of the shard file it wrote."""


def _tiles_array(tiles_path: str, job: str) -> Any:
    """The ``tiles`` array a task writes its shard to, opened once per worker thread and job
    (a re-tile into the same path is another job, so no metadata is carried over)."""
    cached = getattr(_local, "tiles", None)
    if cached is None or cached[0] != (tiles_path, job):
        cached = _local.tiles = ((tiles_path, job), open_tiles(tiles_path, writable=True))
    return cached[1]


def _extract_chunk(
    slide: tuple[str, str] | tuple[str, str, SlideIdentity],
    tiles_path: str,
    grid: TileGrid,
    start: int,
    coords: np.ndarray,
    decode_threads: int = 1,
    qc: bool = False,
    job: str = "",
) -> ChunkResult:
    check_still_ours(tiles_path, job)  # a task of a job killed meanwhile reads nothing
    reader = cached_reader(*slide)
    array = _tiles_array(tiles_path, job)
    tiles = chunk_tiles(
        reader,
        grid,
        coords,
        jpeg_passthrough=accepts_jpeg(array),
        decode_threads=decode_threads,
        out=scratch_tiles(len(coords), grid.tile_size) if qc else None,  # scored where read
    )
    shard = start // array.shards[0]
    with writing(tiles_path, job) as folder:  # ... and writes nothing; a takeover waits
        checksum = write_shard(array, shard, tiles, folder=folder)
    return start, len(tiles), chunk_scores(tiles, grid.tile_size) if qc else {}, checksum


def _gathered(results: list[ChunkResult]) -> Extracted:
    """The tasks' results joined in tile order."""
    results = sorted(results, key=lambda r: r[0])
    metrics = results[0][2].keys() if results else ()
    scores = {m: np.concatenate([r[2][m] for r in results]) for m in metrics}
    checksums = [r[3] for r in results]
    whole = None if None in checksums else [int(c) for c in checksums if c is not None]
    return Extracted(sum(r[1] for r in results), scores, whole)


def extract(
    reader: SlideReader,
    grid: TileGrid,
    coords: np.ndarray,
    tiles_path: str | Path,
    tiles_per_chunk: int,
    *,
    scheduler: Any = "threads",
    workers: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
    qc: bool = False,
) -> Extracted:
    """Run the extraction graph for one slide; returns the tiles written and their scores.

    Args:
        reader: the open slide (its path, backend and :func:`slide_identity` are sent to the
            workers).
        grid: geometry from :meth:`TileGrid.for_slide`.
        coords: kept tiles, row-major; chunk ``i`` is ``coords[i*S:(i+1)*S]``, one Zarr shard.
        tiles_path: the store's ``tiles`` array.
        tiles_per_chunk: S, equal to the shard length so no two tasks write one shard.
        scheduler: "threads" or "processes" (local, ``workers`` of them, default all cores), or
            a ``dask.distributed.Client``.
        workers: threads or processes of the local scheduler; the cores they leave idle go to
            JPEG 2000 decoding (``cores // workers`` threads per tile).
        on_chunk: called with each finished chunk's tile count (progress bars).
        qc: score every tile (:func:`~wsi_ssl.tiling.qc.chunk_scores`) as it is written.
    """
    # absolute: a cluster's workers run elsewhere (the archive at the same absolute path)
    path, tiles_path = str(Path(reader.path).resolve()), Path(tiles_path).resolve()
    slide = (path, reader.backend, slide_identity(path))
    local = scheduler in LOCAL_SCHEDULERS
    cores = os.cpu_count() or 1
    threads = max(1, cores // (workers or cores)) if local else 1
    job = uuid.uuid4().hex
    tasks = [
        dask.delayed(_extract_chunk, pure=False)(
            slide,
            str(tiles_path),
            grid,
            start,
            coords[start : start + tiles_per_chunk],
            threads,
            qc,
            job,
        )
        for start in range(0, len(coords), tiles_per_chunk)
    ]
    notify = on_chunk or (lambda n: None)
    claim(tiles_path, job)  # tasks of a job killed before this one write nothing here
    try:
        if not local:
            return _compute_on_cluster(scheduler, tasks, notify)
        return _compute_locally(scheduler, tasks, workers, notify)
    except BrokenProcessPool as err:  # a worker process killed (the OOM killer): say whose
        store = tiles_path.parent
        raise TileWorkerDiedError(
            reader.path, store.with_name(store.name.removesuffix(STAGING_SUFFIX))
        ) from err
    finally:
        release(tiles_path, job)


def _compute_on_cluster(client: Any, tasks: list[Any], notify: Callable[[int], None]) -> Extracted:
    """The tasks on a ``dask.distributed.Client``, ``notify`` called as each finishes."""
    from distributed import as_completed

    done = []
    for future in as_completed(client.compute(tasks)):
        done.append(future.result())
        notify(done[-1][1])
    return _gathered(done)


def _compute_locally(
    scheduler: str, tasks: list[Any], workers: int | None, notify: Callable[[int], None]
) -> Extracted:
    """The tasks in this process's threads or in worker processes that die with it."""
    from dask.callbacks import Callback

    def posttask(key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        if isinstance(result, tuple) and len(result) == 4 and isinstance(result[2], dict):
            notify(result[1])

    with Callback(posttask=posttask):
        if scheduler == "processes":  # dask shuts its process pool down, waiting, on failure
            from dask.multiprocessing import get as processes_get

            # a callable scheduler: a name makes dask import distributed to look for a client
            results = dask.compute(
                *tasks,
                scheduler=processes_get,
                num_workers=workers,
                initializer=functools.partial(
                    _start_worker, os.getpid(), dask.config.get("multiprocessing.initializer", None)
                ),
            )
        else:
            results = _compute_in_own_threads(tasks, workers)
    return _gathered(list(results))


def _compute_in_own_threads(tasks: list[Any], workers: int | None) -> tuple[Any, ...]:
    """``dask.compute`` on a thread pool of its own that, when a task fails, cancels the queued
    tasks and waits for the running ones: no shard is written after the caller has removed
    the partial store."""
    pool = ThreadPoolExecutor(workers or os.cpu_count() or 1, thread_name_prefix="wsi-ssl-tile")
    try:
        from dask.threaded import get as threads_get

        # a callable scheduler: the name "threads" makes dask import distributed (0.6 s)
        return dask.compute(*tasks, scheduler=threads_get, pool=pool)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _start_worker(parent: int, then: Callable[[], None] | None = None) -> None:
    """In a worker process of job ``parent``: end with it, then run the initializer dask is
    configured with."""
    die_with_parent(parent)
    if then is not None:
        then()
