"""Export embeddings to the files existing MIL code reads.

``clam-h5``: one ``<out>/<name>.h5`` per slide, as CLAM's ``extract_features_fp.py`` and
TRIDENT's patch-feature extraction write them:

- ``features``: float32 (N, D); attributes ``encoder_id``, ``encoder`` (JSON), ``slide_id``.
- ``coords``: int64 (N, 2), level-0 x, y of each tile's top-left corner (row i <-> features i);
  attributes, so readers can re-read a tile from the slide:

  ================== ===========================================================================
  patch_level        0: coords and patch_size are in level-0 pixels (CLAM reads
                     ``read_region(coord, patch_level, (patch_size, patch_size))``)
  patch_size         the tile's footprint in level-0 pixels, rounded (CLAM)
  patch_size_level0  the same (TRIDENT; slide encoders such as GigaPath use it as the grid step)
  target_patch_size  tile edge in pixels at the stored scale (= the encoder's tiles)
  level0_magnification  round(10 / level-0 mpp), e.g. 20 for 0.5 µm/px (TRIDENT)
  target_magnification  round(10 / tile mpp)
  mpp, level0_mpp    exact microns per pixel of the tiles and of level 0
  overlap            tile overlap in pixels at the stored scale
  downsample, level_dim, downsampled_level_dim   CLAM's level-0 bookkeeping ([1, 1], [w, h])
  name               the file's slide name
  ================== ===========================================================================

CLAM expects ``h5_files/`` and ``pt_files/`` folders: pass ``--out FEATURES/h5_files`` and
``--out FEATURES/pt_files``.

``pt``: ``<out>/<name>.pt`` is the float32 (N, D) features tensor (what CLAM's ``pt_files``
hold) and ``<out>/coords/<name>.pt`` the int64 (N, 2) coords tensor.

Only the tiles that hold vectors are written: those an embedding job with
``skip_flagged_tiles`` left out are not (row i of ``features`` still pairs with row i of
``coords``; the slide's entry in ``export.json`` counts them as ``not_embedded``).

A slide caught mid-swap (:mod:`wsi_ssl.storage.swaps`: being re-tiled or re-embedded, or left
so by a killed job) is left out and named, as ``embed`` and ``index`` leave it out and name it:
a note, not a failure (its vectors are on disk; the job may still be running); ``export.json``
lists it under ``left_out``.

Both write ``<out>/export.json`` (encoder, ``name_by``, slide ids, names, files) and build
each file in memory, then write it with ``wsi_ssl.storage.atomic`` (temp file, fsync, rename),
so a killed export or a full disk never leaves a truncated file under the final name, nor a
``pt`` features file without its coords; a slide whose file meets a full disk fails with a
``DiskFullError``.
Slides may be named by id, file name, stem or unique id prefix (``wsi_ssl.storage.resolve``);
a slide named twice is exported once. Exporting into a folder that holds an earlier export adds
to it, and is refused for another format, encoder or ``name_by`` (a folder holds each slide's
bag once, all of one width).
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from wsi_ssl.embedding.summary import incomplete_note
from wsi_ssl.errors import ConfigError, DiskFullError, WsiSslError
from wsi_ssl.listing import one_or_many
from wsi_ssl.outcome import BatchOutcome, SlideOutcome
from wsi_ssl.storage import Archive, SlideStore, open_store
from wsi_ssl.storage.archive import damaged_slide_id
from wsi_ssl.storage.atomic import (
    atomic_write_bytes,
    atomic_write_json,
    is_no_space,
    sweep_temp_files,
)
from wsi_ssl.storage.embeddings import Embeddings, embedding_ids, read_embeddings
from wsi_ssl.storage.resolve import damaged_stores_advice, resolve_encoder, resolve_slide
from wsi_ssl.storage.swaps import mid_swap_note, split_mid_swap

__all__ = ["EXPORT_FORMATS", "NAME_BY", "ExportResult", "clam_coords_attrs", "export"]

EXPORT_FORMATS = ("clam-h5", "pt")
NAME_BY = ("stem", "slide_id")


@dataclass(kw_only=True)
class ExportResult(BatchOutcome):
    """What :func:`export` wrote: one :class:`SlideOutcome` per slide (``details``: slide_id,
    name, dim, file, coords_file for ``pt``, source_path); ``left_out``: the slides caught
    mid-swap (``slide``: id, ``name``: file name), not tried, and ``notes`` naming them."""

    out: Path
    format: str
    encoder_id: str
    left_out: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def exported(self) -> list[SlideOutcome]:
        return self.with_status("complete")

    @property
    def files(self) -> list[Path]:
        return [Path(o.details["file"]) for o in self.exported]

    def total_lines(self) -> list[str]:
        return [
            f"{len(self.exported)} slide(s) exported as {self.format} ({self.encoder_id}) "
            f"to {self.out}; {len(self.failed)} failed",
            *self.notes,
        ]

    def to_dict(self) -> dict[str, Any]:
        """``out``, ``format``, ``encoder_id``, ``exported`` and the outcome counts, ``slides``
        (every slide tried, with its status), ``errors`` (the failed ones), ``left_out`` and
        ``notes`` (the slides mid-swap)."""
        return {
            "out": str(self.out),
            "format": self.format,
            "encoder_id": self.encoder_id,
            "exported": len(self.exported),
            **self.outcomes_dict(),
            "errors": [o.to_dict() for o in self.failed],
            "left_out": self.left_out,
            "notes": self.notes,
        }


def clam_coords_attrs(store: SlideStore, name: str) -> dict[str, Any]:
    """The ``coords`` attributes CLAM and TRIDENT readers use (see the module docstring)."""
    tiling, source = store.tiling, store.source
    tile_mpp = float(tiling.get("mpp_effective") or tiling["mpp"])
    slide_mpp = float(source["mpp"])
    size0 = round(float(tiling["tile_size_level0"]))
    dims = [int(v) for v in source["dimensions"]]
    return {
        "patch_level": 0,
        "patch_size": size0,
        "patch_size_level0": size0,
        "target_patch_size": int(tiling["tile_size"]),
        "level0_magnification": round(10.0 / slide_mpp),
        "target_magnification": round(10.0 / tile_mpp),
        "mpp": tile_mpp,
        "level0_mpp": slide_mpp,
        "overlap": int(tiling.get("overlap", 0)),
        "downsample": np.array([1.0, 1.0]),
        "level_dim": np.array(dims, dtype=np.int64),
        "downsampled_level_dim": np.array(dims, dtype=np.int64),
        "name": name,
    }


def _write_h5(path: Path, emb: Embeddings, store: SlideStore, name: str) -> None:
    """The file is built in memory and written by Python (HDF5's C library crashes the process
    on a full disk), so a full disk is an ``OSError`` and leaves nothing."""
    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        feats = f.create_dataset("features", data=np.asarray(emb.features, dtype=np.float32))
        feats.attrs["encoder_id"] = emb.encoder_id
        feats.attrs["encoder"] = json.dumps(emb.encoder, sort_keys=True)
        feats.attrs["slide_id"] = emb.slide_id
        feats.attrs["name"] = name
        coords = f.create_dataset("coords", data=np.asarray(emb.coords, dtype=np.int64))
        for key, value in clam_coords_attrs(store, name).items():
            coords.attrs[key] = value
        f.attrs["slide_id"] = emb.slide_id
        f.attrs["source_path"] = str(store.source.get("path", ""))
        f.attrs["encoder_id"] = emb.encoder_id
    with buffer.getbuffer() as view:
        atomic_write_bytes(path, view)


def _write_pt(path: Path, coords_path: Path, emb: Embeddings) -> None:
    """The coords file first, then the features file: a features file is never there
    without its coords (a failure between the two leaves no features file, which a re-run
    writes). Each tensor is saved in memory and written by Python, so a full disk is an
    ``OSError`` (torch's own writer reports it as an untyped ``RuntimeError``)."""
    import torch

    path.unlink(missing_ok=True)  # an older features file must not outlive new coords
    for p, data in (
        (coords_path, np.asarray(emb.coords, dtype=np.int64)),
        (path, np.asarray(emb.features, dtype=np.float32)),
    ):
        buffer = io.BytesIO()
        torch.save(torch.from_numpy(np.ascontiguousarray(data)), buffer)
        with buffer.getbuffer() as view:
            atomic_write_bytes(p, view)


def _names(stores: list[SlideStore], name_by: str) -> dict[str, str]:
    if name_by not in NAME_BY:
        raise ConfigError(
            f"name_by must be one of {', '.join(NAME_BY)}; got {name_by!r}", parameters=("name_by",)
        )
    names = {
        s.slide_id: (
            Path(str(s.source.get("path", s.slide_id))).stem if name_by == "stem" else s.slide_id
        )
        for s in stores
    }
    seen: dict[str, str] = {}
    for sid, name in names.items():
        if name in seen:
            raise ConfigError(
                f"slides {seen[name]} and {sid} are both named {name!r} by file stem; "
                "use name_by='slide_id'",
                parameters=("name_by",),
            )
        seen[name] = sid
    return names


def export(
    root: str | Path,
    out: str | Path,
    *,
    format: str = "clam-h5",
    encoder: str | None = None,
    slides: Sequence[str] | None = None,
    name_by: str | None = None,
    progress: bool = False,
) -> ExportResult:
    """Write one file per slide with its features and coords (see the module docstring).

    Args:
        encoder: an ``encoder_id`` or a unique prefix of one (e.g. the encoder name); None
            when the archive holds embeddings of exactly one encoder.
        slides: slide ids (default: every complete store).
        name_by: file names from the slide file's stem (what MIL CSVs list) or the slide id;
            None: as the export already in ``out`` names them, else by stem.
        progress: show a slides progress bar.

    Every slide gets a :class:`~wsi_ssl.outcome.SlideOutcome`: one without those embeddings (or
    whose file cannot be written) is ``failed`` and the rest are written; one caught mid-swap
    is left out and named (``left_out``, ``notes``).
    """
    if format not in EXPORT_FORMATS:
        raise ConfigError(
            f"format must be one of {', '.join(EXPORT_FORMATS)}; got {format!r}",
            parameters=("format",),
        )
    archive = open_store(root)
    stores, failed, incomplete = _stores(archive, slides)
    have = {i for s in stores for i in embedding_ids(s)}
    eid = resolve_encoder(have, encoder, archive.root, why=_none_usable(stores, failed, archive))
    stores, left_out = _left_out_mid_swap(archive, stores, eid, every=slides is None)
    out = Path(out)
    name_by = name_by or _named_by(_manifest(out)) or "stem"
    names = _names(stores, name_by)
    earlier = _earlier_export(out, format, eid, name_by)
    out.mkdir(parents=True, exist_ok=True)
    sweep_temp_files(out, recursive=True)  # what a killed export left
    result = ExportResult(outcomes=failed, out=out, format=format, encoder_id=eid)
    if left_out:  # named as embed and index name them: a note, not a failure
        held = [row["name"] for row in left_out]
        note = mid_swap_note(held, archive.root, kept=False, then="export again to add them")
        result.left_out, result.notes = left_out, [note]
    result.notes += [incomplete_note(incomplete)] if incomplete else []
    bar = tqdm(stores, desc="export", unit="slide", disable=not progress, dynamic_ncols=True)
    result.outcomes += [_export_one(s, eid, out, format, names[s.slide_id]) for s in bar]
    tried = {o.slide for o in result.outcomes} | {names[s.slide_id] for s in stores}
    manifest = {
        "format": format,
        "encoder_id": eid,
        "name_by": name_by,
        "root": str(Path(root).resolve()),
        "encoder": _encoder_of(stores, eid) or earlier.get("encoder", {}),
        "slides": _merged(earlier, "slides", [o.to_dict() for o in result.exported], tried),
        "errors": _merged(earlier, "errors", [o.to_dict() for o in result.failed], tried),
        "left_out": _merged(earlier, "left_out", left_out, tried | {r["slide"] for r in left_out}),
    }
    _write_manifest(out / "export.json", manifest)
    return result


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write ``export.json``.

    Raises:
        DiskFullError: the disk filled up (the bag files written before are whole).
    """
    try:
        atomic_write_json(path, manifest, indent=2, sort_keys=False)
    except OSError as err:
        if not is_no_space(err):
            raise
        advice = (
            "free space, then re-run the export (the bag files written are whole; export.json, "
            "which lists them, was not updated)"
        )
        raise DiskFullError(path, advice) from err


def _stores(
    archive: Archive, slides: Sequence[str] | None
) -> tuple[list[SlideStore], list[SlideOutcome], list[str]]:
    """The stores to export (each slide once, however often ``slides`` names it), the
    failed outcomes of the slides that cannot be opened (every damaged one when ``slides`` is
    None) and (``slides`` None) the ids of the stores not complete.

    Raises:
        WsiSslError: none of the named ``slides`` exists (say so, not "no embeddings").
    """
    stores: list[SlideStore] = []
    scan = archive.scan()
    damaged = scan.damaged if slides is None else []
    failed = [SlideOutcome.failure(damaged_slide_id(e), e) for e in damaged]
    seen: set[str] = set()
    for name in dict.fromkeys(one_or_many(slides)) if slides is not None else scan.complete:
        try:
            sid = resolve_slide(archive, name) if slides is not None else name
            if sid in seen:  # "s00.tiff" and its id name one slide: export it once
                continue
            seen.add(sid)
            stores.append(archive.slide(sid))
        except WsiSslError as err:
            failed.append(SlideOutcome.failure(name, err))
    if slides is not None and not stores and failed and failed[-1].exception is not None:
        raise failed[-1].exception
    return stores, failed, scan.incomplete if slides is None else []


def _none_usable(stores: list[SlideStore], failed: list[SlideOutcome], archive: Archive) -> str:
    """What to do when no store could be opened, only damaged ones ("" otherwise): the
    advice of an export that finds no embeddings, in place of "embed"."""
    damaged = [str(getattr(o.exception, "path", o.slide)) for o in failed]
    if stores or not damaged:
        return ""
    return damaged_stores_advice(archive.root, damaged)


def _left_out_mid_swap(
    archive: Archive, stores: list[SlideStore], eid: str, *, every: bool
) -> tuple[list[SlideStore], list[dict[str, str]]]:
    """``stores`` less those whose embeddings ``eid`` are caught mid-swap, and the slides left
    out (``slide``: id, ``name``: catalog file name): those, and (``every``: no slides were
    named) the slides whose store is caught mid-swap, not in place."""
    ids = [s.slide_id for s in stores] + (archive.swapping() if every else [])
    _, held = split_mid_swap(archive.root, eid, ids)
    if not held:
        return stores, []
    try:
        names = {e.slide_id: e.name for e in archive.catalog.entries()}
    except (WsiSslError, sqlite3.Error):  # a damaged or busy catalog only costs the names
        names = {}
    why = f"caught mid-swap; when its job ends (or after `wsi-ssl check {shlex.quote(str(archive.root))} --repair`)"
    why += ", export again"
    rows = [{"slide": sid, "name": names.get(sid) or sid, "why": why} for sid in held]
    return [s for s in stores if s.slide_id not in held], rows


def _export_one(store: SlideStore, eid: str, out: Path, format: str, name: str) -> SlideOutcome:
    """Write one slide's file(s); a slide that cannot be read or written is a failed outcome."""
    started = time.perf_counter()
    path = out / f"{name}.{'h5' if format == 'clam-h5' else 'pt'}"
    try:
        emb = read_embeddings(store, eid).embedded_only()
        details: dict[str, Any] = {"slide_id": store.slide_id, "name": name}
        if emb.n_not_embedded:
            details["not_embedded"] = emb.n_not_embedded
        details["dim"] = int(emb.features.shape[1])
        details["file"] = str(path)
        if format == "clam-h5":
            _write_h5(path, emb, store, name)
        else:
            (out / "coords").mkdir(exist_ok=True)
            coords_path = out / "coords" / f"{name}.pt"
            _write_pt(path, coords_path, emb)
            details["coords_file"] = str(coords_path)
    except (WsiSslError, OSError) as err:
        full = not isinstance(err, WsiSslError) and is_no_space(err)
        error = DiskFullError(path) if full else err  # what was half written is removed
        return SlideOutcome.failure(store.slide_id, error, time.perf_counter() - started, name=name)
    details["source_path"] = str(store.source.get("path", ""))
    return SlideOutcome(
        store.slide_id,
        "complete",
        n_tiles=len(emb),
        seconds=time.perf_counter() - started,
        details=details,
    )


def _encoder_of(stores: list[SlideStore], eid: str) -> dict[str, Any]:
    """The description of encoder ``eid`` from the first store whose embeddings read (a damaged
    one, first in the list, aborted the whole export)."""
    for store in stores:
        with contextlib.suppress(WsiSslError):
            if eid in embedding_ids(store):
                return read_embeddings(store, eid, lazy=True).encoder
    return {}


def _earlier_export(out: Path, format: str, eid: str, name_by: str) -> dict[str, Any]:
    """The manifest of an export already in ``out`` (empty when none), refused when it is of
    another format or encoder (a folder of MIL bags of two widths) or names its files the other
    way (every bag twice, under its stem and its slide id).

    Raises:
        ConfigError: ``out`` holds another format's, encoder's or naming's export.
    """
    earlier = _manifest(out)
    if not earlier:
        return {}
    if (earlier.get("format"), earlier.get("encoder_id")) != (format, eid):
        raise ConfigError(
            f"{out}: holds a {earlier.get('format')} export of encoder "
            f"{earlier.get('encoder_id')!r}; export {eid!r} as {format} into another folder "
            "(one folder holds bags of one encoder and format)",
            parameters=("out",),
        )
    named_by = _named_by(earlier)
    if named_by not in (None, name_by):
        raise ConfigError(
            f"{out}: holds an export whose files are named by {named_by}; export with "
            f"name_by={named_by!r}, or by {name_by} into another folder (one folder holds "
            "each slide's bag once)",
            parameters=("name_by", "out"),
        )
    return earlier


def _manifest(out: Path) -> dict[str, Any]:
    """The manifest of the export in ``out`` (empty when none can be read)."""
    try:
        manifest = json.loads((out / "export.json").read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _named_by(manifest: dict[str, Any]) -> str | None:
    """How an export named its files: the manifest's ``name_by``, else (written before it was
    recorded) ``slide_id`` when every file is named by its slide id and ``stem`` when one is
    not; None when it names no file."""
    if "name_by" in manifest:
        return str(manifest["name_by"])
    rows = manifest.get("slides") or []
    if not rows:
        return None
    return "slide_id" if all(r.get("name") == r.get("slide") for r in rows) else "stem"


def _merged(
    earlier: dict[str, Any], key: str, now: list[dict[str, Any]], redone: set[str]
) -> list[dict[str, Any]]:
    """``earlier[key]`` rows of slides not tried now (by id, or by the file name written now:
    another archive's slide of that name was overwritten), then this export's ``now`` rows."""
    kept = [r for r in earlier.get(key, []) if not {r.get("slide"), r.get("name")} & redone]
    return kept + now
