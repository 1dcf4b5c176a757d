"""Tile one slide or a batch of slides into an archive root: resume, failure isolation, progress,
and several scales from one read of each slide.

Every slide (at every scale) gets a :class:`~wsi_ssl.outcome.SlideOutcome` whose ``details``
hold the slide id, the scale, the archive root written, the embeddings a re-tile kept or
discarded and the file it is a copy of; a batch returns a
:class:`~wsi_ssl.tiling.summary.TileSummary` (its report).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from wsi_ssl.config import TilingConfig
from wsi_ssl.errors import DiskFullError, WsiSslError
from wsi_ssl.interrupts import interrupts_held
from wsi_ssl.outcome import SlideOutcome, interrupt_report
from wsi_ssl.slide import same_instance
from wsi_ssl.storage import STATUS_COMPLETE, Archive
from wsi_ssl.storage.atomic import is_no_space
from wsi_ssl.storage.locks import slide_lock
from wsi_ssl.storage.slide_store import is_complete_store, recover_swap, staging_path
from wsi_ssl.tiling.legacy_ids import adopt_existing_store
from wsi_ssl.tiling.preflight import check_batch, check_output
from wsi_ssl.tiling.replace import Replacement, previous_store, replace_store
from wsi_ssl.tiling.resume import (
    existing_store,
    kept_series_file,
    kept_store_tiles,
    record_slide,
    update_qc_thresholds,
    update_source_path,
)
from wsi_ssl.tiling.scales import scale_roots
from wsi_ssl.tiling.slide_table import (
    SlideTable,
    TableScaledSource,
    override_unused_note,
    slide_config,
)
from wsi_ssl.tiling.source import collect_slide_paths, open_for_tiling, thumbnail_and_mask
from wsi_ssl.tiling.summary import TileSummary
from wsi_ssl.tiling.write import write_store

__all__ = [
    "collect_slide_paths",
    "open_for_tiling",
    "thumbnail_and_mask",
    "tile_slide",
    "tile_slide_scales",
    "tile_slides",
]


class ScalesInterrupted(KeyboardInterrupt):
    """Ctrl-C while one slide was tiled at several scales: the ``finished`` scales' outcomes
    and the names (``"<path> (mpp <mpp>)"``) of those ``not_done``."""

    def __init__(self, finished: list[SlideOutcome], not_done: list[str]) -> None:
        super().__init__()
        self.finished, self.not_done = finished, not_done


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
) -> SlideOutcome:
    """Tile one slide into ``<root>/slides/<slide_id>.zarr``.

    ``path`` is a slide file, or for DICOM a folder of the series' instances (or any one of
    them). ``scheduler`` runs the extraction graph: "threads" (default) or "processes" locally
    with ``workers`` of them, or a ``dask.distributed.Client``. Raises the slide's typed error
    (``MissingMppError``, ``CorruptSlideError``, ...) after recording it in the catalog; a store
    is marked complete only after its last chunk is written.

    The slide's writer lock is held throughout: another job on the same slide waits up to
    ``lock_wait`` seconds, then gets ``StoreLockedError`` ("being written by pid N on HOST").
    A re-tile writes the new store beside the old one and swaps it in when complete
    (`wsi_ssl.tiling.replace`); it keeps the old store's embeddings when the tiles are the
    same, and refuses to drop them unless ``discard_embeddings``.

    Returns:
        The slide's outcome, "complete" or "skipped" (already complete); ``details`` hold
        ``path``, ``slide_id``, ``mpp``, ``root``, ``kept_embeddings`` and
        ``discarded_embeddings``.
    """
    config = TilingConfig() if config is None else config
    check_output(Path(root), config)
    started = time.perf_counter()
    source = TableScaledSource(path, config)
    with source:
        return _tile_scale(
            source,
            Path(root),
            config,
            started,
            scheduler=scheduler,
            workers=workers,
            resume=resume,
            progress=progress,
            discard_embeddings=discard_embeddings,
            lock_wait=lock_wait,
        )


def tile_slide_scales(
    path: str | Path,
    root: str | Path,
    config: TilingConfig | None = None,
    mpps: Sequence[float] | None = None,
    *,
    first_of: dict[str, Path] | None = None,
    mpp: float | None = None,
    **options: Any,
) -> list[SlideOutcome]:
    """Tile one slide at every scale of ``mpps`` (default: ``config.mpp`` into ``root``).

    The slide is opened, and its thumbnail and tissue mask made, once for all scales; each
    scale's store (under :func:`scale_roots`) is written, locked, resumed and replaced on its
    own, as by :func:`tile_slide` (``options`` are its keyword arguments). Never raises for
    the slide: a scale that fails is a "failed" (or "busy") outcome, the others go on. With
    several scales each outcome's ``slide`` is ``"<path> (mpp <mpp>)"``.

    ``first_of`` (a batch's fingerprints, updated here): a file with the content of one
    tiled before in the batch is the same slide; it is "skipped" (``details["same_as"]``
    names that file, no tiles counted twice), and the catalog keeps the first file's name.

    ``mpp``: the slide's scale as its mpp table row states it, over the file's own
    (:class:`TableScaledSource`; ``details["mpp_from_table"]`` says what it replaced).
    """
    config = config or TilingConfig()
    scales = scale_roots(root, config, mpps)
    started = time.perf_counter()
    outcomes = []
    try:
        source = TableScaledSource(path, config, mpp)
    except Exception as err:
        outcomes = [_failure(Path(path), None, err, started, r, c) for r, c in scales]
        return _name_scales(outcomes)
    if first_of is not None:
        first = first_of.setdefault(source.fingerprint, source.path)
        if first != source.path:  # a DICOM slide's other file is its series' other file
            dicom = source.path.is_dir() or source.path.suffix.lower() == ".dcm"
            copy = dicom and same_instance(first, source.path)  # not another of its files
            source.close()
            return _name_scales(
                [
                    SlideOutcome(
                        str(source.path),
                        "skipped",
                        0,
                        details={
                            **_details(source.path, source.slide_id, r, c),
                            "same_as": str(first),
                            "same_series": dicom and not copy,
                            "same_instance": copy,
                        },
                    )
                    for r, c in scales
                ]
            )
    with source:
        for i, (scale_dir, scale_config) in enumerate(scales):
            started = time.perf_counter()
            try:
                outcome = _tile_scale(source, scale_dir, scale_config, started, **options)
            except KeyboardInterrupt as err:
                if len(scales) == 1:
                    raise
                rest = [f"{source.path} (mpp {c.mpp:g})" for _, c in scales[i:]]
                raise ScalesInterrupted(_name_scales(outcomes, several=True), rest) from err
            except Exception as err:  # one scale's failure, whatever it is, ends only that scale
                outcome = _failure(
                    source.path, source.slide_id, err, started, scale_dir, scale_config
                )
            outcomes.append(outcome)
        for outcome in outcomes:  # what the slide's scale was, once it was opened
            outcome.details |= source.scale_details()
    return _name_scales(outcomes)


def _name_scales(outcomes: list[SlideOutcome], several: bool | None = None) -> list[SlideOutcome]:
    """Several scales of one slide (default: several outcomes): each outcome's ``slide``
    names its scale."""
    if len(outcomes) > 1 if several is None else several:
        for o in outcomes:
            o.slide = f"{o.slide} (mpp {o.details['mpp']:g})"
    return outcomes


def _details(
    path: Path,
    slide_id: str | None,
    root: Path,
    config: TilingConfig,
    replacement: Replacement | None = None,
) -> dict[str, Any]:
    return {
        "path": str(path),
        "slide_id": slide_id,
        "mpp": config.mpp,
        "root": str(root),
        "kept_embeddings": [] if replacement is None else replacement.kept_embeddings,
        "discarded_embeddings": [] if replacement is None else replacement.discarded_embeddings,
    }


def _failure(
    path: Path,
    slide_id: str | None,
    err: BaseException,
    started: float,
    root: Path,
    config: TilingConfig,
) -> SlideOutcome:
    """A failed (or busy) outcome; an error of no wsi-ssl type says the file may be malformed,
    unless it is the archive's: a full disk, or its catalog (not the slide's fault)."""
    seconds = time.perf_counter() - started
    if is_no_space(err):
        err = DiskFullError(err.filename or root)
    elif isinstance(err, sqlite3.Error):  # typed by the catalog where it can be (full, read-only)
        err = WsiSslError(f"{root / 'catalog.sqlite'}: the archive's catalog: {err}; re-run")
    kept = kept_store_tiles(root, slide_id)  # a failed re-tile leaves a complete store
    details = _details(path, slide_id, root, config)
    outcome = SlideOutcome.failure(str(path), err, seconds, kept_store_tiles=kept, **details)
    if not isinstance(err, WsiSslError):
        outcome.error = (
            f"{path}: cannot be tiled ({type(err).__name__}: {err}); the file may be "
            "malformed: check it opens in QuPath or re-export it"
        )
    return outcome


def _tile_scale(
    source: TableScaledSource,
    root: Path,
    config: TilingConfig,
    started: float,
    *,
    scheduler: Any = "threads",
    workers: int | None = None,
    resume: bool = True,
    progress: bool = False,
    discard_embeddings: bool = False,
    lock_wait: float = 0.0,
) -> SlideOutcome:
    """Tile ``source`` at ``config.mpp`` into ``root`` under the slide's lock (see
    :func:`tile_slide`); raises the slide's error."""
    archive = Archive(root)
    slide_id = adopt_existing_store(source, archive)  # a DICOM slide's older id, if tiled so
    read_only = root.is_dir() and not os.access(root, os.W_OK)  # skipping needs no lock there
    found_now = functools.partial(
        existing_store, archive, slide_id, source.fingerprint, config, source.stated
    )
    found = found_now() if read_only else None
    n = found.n_tiles if found is not None and not found.qc_thresholds else None
    if resume and n is not None:
        details = _details(source.path, slide_id, root, config)
        return SlideOutcome(str(source.path), "skipped", n, 0.0, details=details)
    with slide_lock(root, slide_id, wait=lock_wait):
        recover_swap(archive.store_path(slide_id))  # what a killed job left
        found = found_now()
        current, why = found.n_tiles, found.redo_because
        if resume and current is not None:  # an identical copy keeps the slide's name
            details = _details(source.path, slide_id, root, config)
            if found.qc_thresholds:
                update_qc_thresholds(archive.store_path(slide_id), found.qc_thresholds)
                details["qc_thresholds_updated"] = ", ".join(found.qc_changes)
            if same_as := archive.catalog.other_copy(slide_id, source.path):
                details["same_as"] = same_as
            else:  # another file of its DICOM series is not a move: its store keeps its name
                path = archive.store_path(slide_id)
                kept = kept_series_file(path, source.path)
                record_slide(archive, source, config, STATUS_COMPLETE, current, kept, found)
                if not kept and (moved_from := update_source_path(path, source.path)):
                    details["moved_from"] = moved_from
            seconds = time.perf_counter() - started
            return SlideOutcome(str(source.path), "skipped", current, seconds, details=details)
        n_tiles, replacement, roi_notes = _retile(
            archive,
            source,
            config,
            scheduler=scheduler,
            workers=workers,
            progress=progress,
            discard_embeddings=discard_embeddings,
        )
    details = _details(source.path, slide_id, root, config, replacement)
    details["roi_notes"] = list(roi_notes)
    if redone := why or ("resume off" if current is not None else None):
        details["retiled_because"] = redone
    spellings = {source.path, source.path.resolve()}  # older catalogs kept the path as given
    details["earlier_versions"] = sorted(  # the file held other content when these were tiled
        {
            e.slide_id
            for path in spellings
            for e in archive.catalog.by_path(path)
            if e.slide_id != slide_id and e.status == STATUS_COMPLETE
        }
    )
    seconds = time.perf_counter() - started
    return SlideOutcome(str(source.path), "complete", n_tiles, seconds, details=details)


def _retile(
    archive: Archive,
    source: TableScaledSource,
    config: TilingConfig,
    *,
    scheduler: Any,
    workers: int | None,
    progress: bool,
    discard_embeddings: bool,
) -> tuple[int, Replacement, tuple[str, ...]]:
    """Write the slide's store beside the current one and swap it in (holding the slide lock).
    On failure the previous complete store stays in place (and the catalog with it); the
    catalog records the failure only when no complete store is left."""
    store_path = archive.store_path(source.slide_id)
    try:
        n_tiles, roi_notes = write_store(
            source,
            staging_path(store_path),
            config,
            scheduler,
            workers,
            progress,
            previous=previous_store(store_path),
            discard_embeddings=discard_embeddings,
        )
        replacement = replace_store(store_path, staging_path(store_path), discard_embeddings)
    except BaseException as err:
        with interrupts_held():  # Ctrl-C too, pressed twice: no half-written store stays
            recover_swap(store_path, roll_forward=False)
        if not isinstance(err, Exception):
            raise
        full = isinstance(err, OSError) and err.errno == errno.ENOSPC
        failure = DiskFullError(store_path) if full else err
        if not is_complete_store(store_path):
            with contextlib.suppress(OSError, sqlite3.Error):  # the catalog may be on the full disk
                error = f"{type(failure).__name__}: {failure}"
                record_slide(archive, source, config, "failed", error=error)
        if full:
            raise failure from err
        raise
    record_slide(archive, source, config, STATUS_COMPLETE, n_tiles=n_tiles)
    return n_tiles, replacement, roi_notes


def tile_slides(
    inputs: Iterable[str | Path],
    root: str | Path,
    config: TilingConfig | None = None,
    *,
    mpps: Sequence[float] | None = None,
    mpp_overrides: Mapping[str, float] | None = None,
    rois: Mapping[str, str] | None = None,
    scheduler: Any = "threads",
    workers: int | None = None,
    resume: bool = True,
    progress: bool = True,
    discard_embeddings: bool = False,
    lock_wait: float = 0.0,
) -> TileSummary:
    """Tile every slide in ``inputs`` (files or folders); a failing slide never stops the batch.

    A slide another job is writing is reported "busy" (after ``lock_wait`` seconds) and left
    to that job; ``discard_embeddings`` as in :func:`tile_slide`.

    Args:
        mpps: several target scales in one run: each slide is read once and tiled at each
            into its own archive root, ``<root>/mpp-<mpp>`` (:func:`scale_root`), one outcome
            per slide and scale. None (default) tiles at ``config.mpp`` into ``root``.
        mpp_overrides: per-slide mpp by path, file name or stem (e.g. from a CSV): a slide's
            row states its scale, over the one its file records (the report says so);
            ``config.mpp_override`` only fills in a missing scale (the summary's notes name
            the slides that kept their own).
        rois: per-slide annotation file by path, file name or stem (``config.roi`` for the
            rest). Rows of either that name no slide of the batch are noted in the summary.
    """
    config = TilingConfig() if config is None else config
    check_output(Path(root), config)
    roots = [str(r) for r, _ in scale_roots(root, config, mpps)]
    paths = collect_slide_paths(inputs)
    overrides = SlideTable("the mpp table", mpp_overrides or {})
    roi_files = SlideTable("the ROI table", rois or {})
    for table in (overrides, roi_files):
        table.check_unambiguous(paths)
    notes = [n for t in (overrides, roi_files) if (n := t.unmatched_note(paths)) is not None]
    check_batch([Path(r) for r in roots], config, paths, rois, roi_files)
    summary = TileSummary(roots=roots, notes=notes)
    options = {
        "scheduler": scheduler,
        "workers": workers,
        "resume": resume,
        "progress": progress,
        "discard_embeddings": discard_embeddings,
        "lock_wait": lock_wait,
    }
    batch_started = time.perf_counter()
    first_of: dict[str, Path] = {}  # fingerprint -> the batch's first file with that content
    done, unfinished = 0, list[str]()  # slides finished; an interrupted slide's scales not done
    bar = tqdm(paths, desc="slides", unit="slide", disable=not progress, dynamic_ncols=True)
    with bar, interrupt_report(summary, lambda: [*unfinished, *map(str, paths[done:])]):
        for path in bar:
            scaled, stated = slide_config(config, path, overrides, roi_files)
            try:
                summary.outcomes += tile_slide_scales(
                    path, root, scaled, mpps, first_of=first_of, mpp=stated, **options
                )
            except ScalesInterrupted as err:
                summary.outcomes += err.finished
                done, unfinished = done + 1, err.not_done
                raise
            done += 1
            rate = summary.tiles_done / max(time.perf_counter() - batch_started, 1e-9)
            bar.set_postfix(
                tiles=summary.tiles_done, tiles_s=f"{rate:.0f}", failed=len(summary.failed)
            )
    if note := override_unused_note(config.mpp_override, summary.outcomes):
        summary.notes.append(note)
    return summary
