"""The slide stores a pretraining run reads: found, checked and described.

:func:`scan_stores` checks what a run is given (an archive root written by ``wsi-ssl tile``,
one ``<slide_id>.zarr`` store, or a list of either) and refuses what it cannot train on with a
typed error: an empty root (``StoreNotFoundError``), an incomplete store
(``StoreIncompleteError``, unless ``skip_incomplete``), tiles of another size or scale than
the config expects or than the other stores (``SchemaMismatchError``). With
``mixed_scales`` stores at several magnifications train together (every scale is drawn
equally often), and with ``mixed_sizes`` (crops made per tile, which makes them uniform)
stores of several tile sizes. :func:`describe_sources` is what a run records of them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_ssl.errors import SchemaMismatchError, StoreIncompleteError, StoreNotFoundError
from wsi_ssl.listing import one_or_many
from wsi_ssl.storage import open_store

__all__ = ["SlideEntry", "describe_sources", "scale_groups", "scan_stores"]


@dataclass(frozen=True)
class SlideEntry:
    """One complete slide store a run trains on."""

    slide_id: str
    root: str
    path: str
    n_tiles: int
    tile_size: int
    mpp: float | None
    fingerprint: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scan_stores(
    sources: str | Path | Sequence[str | Path],
    *,
    tile_size: int | None = None,
    mpp: float | None = None,
    skip_incomplete: bool = False,
    mixed_scales: bool = False,
    mixed_sizes: bool = False,
) -> list[SlideEntry]:
    """The complete, non-empty slide stores under ``sources``, checked for consistency.

    Args:
        sources: archive root(s) (folders with ``slides/``) and/or slide stores (``*.zarr``);
            a store named twice (a root and one of its stores) is taken once.
        tile_size: required tile side in pixels, or None to accept the stores' own (all equal).
        mpp: required microns per pixel of the tiles, or None likewise.
        skip_incomplete: leave out incomplete stores instead of raising.
        mixed_scales: accept stores at different scales.
        mixed_sizes: accept stores of different tile sizes.

    Raises:
        StoreNotFoundError: a path is neither, or no store with tiles is found.
        StoreIncompleteError: a store is not complete (and ``skip_incomplete`` is false).
        SchemaMismatchError: tile sizes or scales differ from ``tile_size`` / ``mpp`` or
            from one store to another.
    """
    paths = one_or_many(sources)
    if not paths:
        raise StoreNotFoundError("(no path given)", "archive root")
    entries: list[SlideEntry] = []
    seen: set[Path] = set()  # a root given twice, or a root and one of its stores: once each
    for path in map(Path, paths):
        for root, slide_id in _store_ids(path):
            store_path = (root / "slides" / f"{slide_id}.zarr").resolve()
            if store_path in seen:
                continue
            seen.add(store_path)
            try:
                store = open_store(root).slide(slide_id)
            except StoreIncompleteError:
                if skip_incomplete:
                    continue
                raise
            entries.append(_entry(root, slide_id, store))
    entries = [e for e in entries if e.n_tiles > 0]
    if not entries:
        where = ", ".join(map(str, paths))
        raise StoreNotFoundError(where, "complete slide store with tiles")
    _check_consistent(entries, tile_size, mpp, mixed_scales=mixed_scales, mixed_sizes=mixed_sizes)
    return entries


def _store_ids(path: Path) -> list[tuple[Path, str]]:
    """``(archive root, slide id)`` of every store at ``path`` (a root or one store)."""
    if path.suffix == ".zarr" and (path / "zarr.json").is_file():
        return [(path.parent.parent, path.name.removesuffix(".zarr"))]
    archive = open_store(path)  # StoreNotFoundError when not an archive root
    return [(path, p.name.removesuffix(".zarr")) for p in sorted(archive.slides_dir.glob("*.zarr"))]


def _entry(root: Path, slide_id: str, store: Any) -> SlideEntry:
    tiles = store.tiles
    tiling = store.tiling
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.shape[1] != tiles.shape[2]:
        raise SchemaMismatchError(
            f"{store.path}: tiles array has shape {tuple(tiles.shape)}, expected (N, T, T, 3); "
            "re-tile the slide with this wsi-ssl version"
        )
    if str(tiles.dtype) != "uint8":
        raise SchemaMismatchError(f"{store.path}: tiles are {tiles.dtype}, expected uint8")
    size = int(tiles.shape[1])
    if int(tiling.get("tile_size", size)) != size:
        raise SchemaMismatchError(
            f"{store.path}: tiling.tile_size {tiling.get('tile_size')} disagrees with the tiles "
            f"array ({size} px); the store is damaged, re-tile the slide"
        )
    mpp = tiling.get("mpp_effective", tiling.get("mpp"))
    source = store.source
    return SlideEntry(
        slide_id=slide_id,
        root=str(Path(root).resolve()),
        path=str(Path(store.path).resolve()),
        n_tiles=int(tiles.shape[0]),
        tile_size=size,
        mpp=None if mpp is None else float(mpp),
        fingerprint=source.get("fingerprint"),
    )


def _check_consistent(
    entries: list[SlideEntry],
    tile_size: int | None,
    mpp: float | None,
    *,
    mixed_scales: bool = False,
    mixed_sizes: bool = False,
) -> None:
    for e in entries:
        if tile_size is not None and e.tile_size != tile_size:
            raise SchemaMismatchError(
                f"{e.path}: tiles are {e.tile_size} px but the config expects tile_size="
                f"{tile_size}; re-tile with tile_size={tile_size} or train with "
                f"tile_size={e.tile_size}",
                parameters=("tile_size",),
            )
        if mpp is not None and e.mpp is not None and not math.isclose(e.mpp, mpp, rel_tol=0.02):
            raise SchemaMismatchError(
                f"{e.path}: tiles are at {e.mpp:g} µm/px but the config expects mpp={mpp:g}; "
                f"re-tile with mpp={mpp:g} or train with mpp={e.mpp:g}",
                parameters=("mpp",),
            )
    first = entries[0]
    for e in entries[1:]:
        if e.tile_size != first.tile_size and not mixed_sizes:
            raise SchemaMismatchError(
                f"{e.path}: tiles are {e.tile_size} px but {first.path} has {first.tile_size} px; "
                "train on stores tiled at one tile_size (or set tile_size to pick one); "
                "crops made per tile (augment='loader') accept mixed sizes",
                parameters=("tile_size", "augment"),
            )
        if (
            not mixed_scales
            and e.mpp is not None
            and first.mpp is not None
            and not math.isclose(e.mpp, first.mpp, rel_tol=0.02)
        ):
            raise SchemaMismatchError(
                f"{e.path}: tiles are at {e.mpp:g} µm/px but {first.path} at {first.mpp:g}; "
                "train on stores tiled at one mpp, or set mixed_scales=True",
                parameters=("mpp", "mixed_scales"),
            )


def scale_groups(entries: Sequence[SlideEntry]) -> list[int]:
    """Scale index of every store: stores within 2% of one ``mpp`` share one index."""
    scales: list[float] = []
    groups = []
    for e in entries:
        mpp = e.mpp if e.mpp is not None else 0.0
        found = next((i for i, s in enumerate(scales) if math.isclose(s, mpp, rel_tol=0.02)), None)
        if found is None:
            scales.append(mpp)
            found = len(scales) - 1
        groups.append(found)
    return groups


def describe_sources(
    entries: Sequence[SlideEntry], keep: Sequence[np.ndarray] | None = None
) -> dict[str, Any]:
    """JSON-able description of what a run trains on (recorded in checkpoints)."""
    counts = [e.n_tiles for e in entries] if keep is None else [len(k) for k in keep]
    groups = scale_groups(entries)
    scales: dict[str, int] = {}
    for g, n in zip(groups, counts, strict=True):
        key = f"{entries[groups.index(g)].mpp or 0:g}"
        scales[key] = scales.get(key, 0) + n
    return {
        "n_selected": sum(counts),
        "selected_sha256": None if keep is None else _selection_digest(entries, keep),
        "scales": scales,
        "roots": sorted({e.root for e in entries}),
        "n_slides": len(entries),
        "n_tiles": sum(e.n_tiles for e in entries),
        "tile_size": entries[0].tile_size,
        "tile_sizes": sorted({e.tile_size for e in entries}),
        "mpp": entries[0].mpp,
        "slides": [
            {"slide_id": e.slide_id, "n_tiles": e.n_tiles, "fingerprint": e.fingerprint}
            for e in entries
        ],
    }


def _selection_digest(entries: Sequence[SlideEntry], keep: Sequence[np.ndarray]) -> str:
    """sha256 of which tiles of which slides are kept (a curation file, QC and the tissue
    thresholds decide): a resume must train on the same ones."""
    digest = hashlib.sha256()
    for entry, rows in zip(entries, keep, strict=True):
        digest.update(entry.slide_id.encode() + np.asarray(rows, dtype=np.int64).tobytes())
    return digest.hexdigest()
