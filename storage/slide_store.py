"""One slide's Zarr v3 group: tiles, coords, thumbnail, tissue mask and provenance.

The attribute keys and array names here are a contract other tools read (docs/ARCHITECTURE.md).

Swap, don't delete: a re-tile writes its store beside the old one, at ``<id>.zarr.new``, and
`swap_in` replaces the old one only once the new one is complete: the old store is renamed
to ``<id>.zarr.old``, the new one to ``<id>.zarr``, then the old one is removed. A kill at any
point leaves the previous complete store or the new complete one, which `recover_swap`
(run under the slide lock before the next write) puts back under ``<id>.zarr``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import zarr

from wsi_ssl.errors import (
    SchemaMismatchError,
    StoreCorruptError,
    StoreIncompleteError,
    StoreNotFoundError,
)
from wsi_ssl.listing import first_few
from wsi_ssl.storage.atomic import (
    atomic_write_json,
    fault_point,
    fsync_dir,
    fsync_file,
    fsync_tree,
    remove_path,
    rename_into_place,
)
from wsi_ssl.storage.codecs import CHECKED_ZSTD, read_values, tile_codecs
from wsi_ssl.storage.shards import (
    SHARD_CHECKSUMS,
    shard_checksum,
    shard_files,
    shard_index_ok,
    shard_path,
)
from wsi_ssl.storage.store_digests import (
    array_sha256,
    changed_since_tiling,
    check_digest,
    digested_arrays,
)

if TYPE_CHECKING:
    import dask.array as da

SCHEMA_VERSION = 1
STATUS_WRITING = "writing"
STATUS_COMPLETE = "complete"
PICTURE_ROWS = 512
"""Rows per chunk of the thumbnail and the tissue mask (a few files per picture)."""
STAGING_SUFFIX = ".new"
"""``<id>.zarr.new``: a store being written to replace ``<id>.zarr``."""
ASIDE_SUFFIX = ".old"
"""``<id>.zarr.old``: the replaced store, between the two renames of a swap."""


def same_scale(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two tilings (``tiling`` records, or mappings with ``mpp`` and ``tile_size``)
    give tiles alike to a model: the same µm/px (within 0.1%) and the same tile size. Search,
    MIL training and MIL prediction judge scale by this one test."""
    same_mpp = math.isclose(float(a["mpp"]), float(b["mpp"]), rel_tol=1e-3)
    return same_mpp and int(a["tile_size"]) == int(b["tile_size"])


CONTENTS_SHA256 = "contents_sha256"
"""Group attribute: the sha256 of every array's values but the tiles' (which have their shard
CRC32C) and the embeddings', by array path, taken when the store was completed."""


class SlideStore:
    """A slide's store at ``<root>/slides/<slide_id>.zarr``."""

    def __init__(self, path: str | Path, group: zarr.Group) -> None:
        self.path = Path(path)
        self.group = group
        self._checked: set[str] = set()
        """The arrays whose values were checked against their recorded digest (once each)."""

    # -- creation --------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        source: dict[str, Any],
        tiling: dict[str, Any],
        coords: np.ndarray,
        tile_size: int,
        tiles_per_shard: int,
        codec: str,
        jpeg_quality: int,
        thumbnail: np.ndarray,
        tissue_mask: np.ndarray,
        tissue_fraction: np.ndarray,
    ) -> SlideStore:
        """Create a fresh store with status "writing", replacing whatever was at ``path``."""
        from wsi_ssl import __version__

        path = Path(path)
        if path.exists():
            shutil.rmtree(path)
        group = zarr.open_group(path, mode="w", zarr_format=3)
        group.attrs.update(
            {
                "schema_version": SCHEMA_VERSION,
                "wsi_ssl_version": __version__,
                "status": STATUS_WRITING,
                "source": source,
                "tiling": tiling,
            }
        )
        group.create_array(
            "tiles",
            shape=(len(coords), tile_size, tile_size, 3),
            dtype="uint8",
            chunks=(1, tile_size, tile_size, 3),
            shards=(tiles_per_shard, tile_size, tile_size, 3),
            dimension_names=("tile", "y", "x", "rgb"),
            **tile_codecs(codec, jpeg_quality),
        )
        for name, values in (  # zstd frames with their checksum: damage fails to decode
            ("coords", np.asarray(coords, dtype=np.int64)),
            ("tissue_fraction", np.asarray(tissue_fraction, dtype=np.float32)),
        ):
            group.create_array(name, data=values, compressors=CHECKED_ZSTD)
        for name, picture in (
            ("thumbnail", np.ascontiguousarray(thumbnail, dtype=np.uint8)),
            ("tissue_mask", np.asarray(tissue_mask, dtype=bool)),
        ):  # bands of 512 rows: zarr's own chunking makes 40 files of a 1,792 px thumbnail
            band = (max(1, min(len(picture), PICTURE_ROWS)), *picture.shape[1:])
            group.create_array(name, data=picture, chunks=band, compressors=CHECKED_ZSTD)
        return cls(path, group)

    @classmethod
    def open(
        cls, path: str | Path, *, mode: str = "r", require_complete: bool = True
    ) -> SlideStore:
        """Open an existing store; by default refuse one that is not complete.

        Raises:
            StoreNotFoundError: no store at ``path``.
            StoreCorruptError: its metadata cannot be read.
            SchemaMismatchError, StoreIncompleteError: another schema; not complete.
        """
        path = Path(path)
        if not (path / "zarr.json").is_file():
            swap = path.suffix == ".zarr" and not path.exists()  # a .new is not (no recursion)
            swap = swap and (aside_path(path).exists() or is_complete_store(staging_path(path)))
            raise StoreNotFoundError(path, "slide store", mid_swap=swap)
        try:
            group = zarr.open_group(path, mode=mode, zarr_format=3)  # type: ignore[arg-type]
        except ValueError as err:  # zarr.json cut short or not JSON
            raise StoreCorruptError(path, f"{type(err).__name__}: {err}") from err
        store = cls(path, group)
        version = store.attrs.get("schema_version")
        if version != SCHEMA_VERSION:
            mismatch = SchemaMismatchError(
                f"{path}: schema_version {version!r}, this wsi-ssl reads {SCHEMA_VERSION}; "
                "re-tile the slide with this version"
            )
            mismatch.path = path  # type: ignore[attr-defined]  # archive listings name the slide by it
            raise mismatch
        if require_complete:
            store.require_complete()
        return store

    # -- status ----------------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def status(self) -> str:
        return str(self.group.attrs.get("status", "missing"))

    def require_complete(self) -> None:
        if self.status != STATUS_COMPLETE:
            raise StoreIncompleteError(self.path, self.status)

    def mark_complete(self) -> None:
        """Flip the status once every chunk is on disk (the last write of a slide job).

        Every file of the store is fsync'ed first, and the group's metadata after the flip.
        """
        fsync_tree(self.path)
        self.group.attrs.update(
            {CONTENTS_SHA256: self.contents_sha256(), "status": STATUS_COMPLETE}
        )
        fsync_file(self.path / "zarr.json")

    def contents_sha256(self, names: Sequence[str] | None = None) -> dict[str, str]:
        """sha256 of the values of arrays ``names`` (default: every array but the tiles and
        the embeddings), as read from disk.

        Raises:
            KeyError: an array is not there; ValueError: its metadata cannot be read.
        """
        names = digested_arrays(self.path) if names is None else names
        return {name: array_sha256(self._read(name)) for name in sorted(names)}

    @property
    def recorded_contents(self) -> dict[str, str]:
        """The :data:`CONTENTS_SHA256` taken at completion ({}: a store from before)."""
        recorded = self.group.attrs.get(CONTENTS_SHA256)
        return dict(cast("Mapping[str, str]", recorded)) if isinstance(recorded, dict) else {}

    # -- contents --------------------------------------------------------------------------
    def _array(self, name: str) -> zarr.Array[Any]:
        """The member array ``name`` (zarr types a group's members as array or group)."""
        return cast("zarr.Array[Any]", self.group[name])

    def _read(self, name: str) -> np.ndarray:
        """Member array ``name``'s values as on disk, unchecked against their digest
        (StoreCorruptError: a chunk file does not decode)."""
        return read_values(self._array(name), self.path, name)

    def _values(self, name: str) -> np.ndarray:
        """Member array ``name``'s values (a path such as ``qc/focus``), checked against the
        digest recorded at completion on the first read (storage/store_digests.py).

        Raises:
            StoreCorruptError: a chunk file does not decode, or was lost (read as zeros).
        """
        values = self._read(name)
        if name not in self._checked:
            check_digest(self.path, name, values, self.recorded_contents)
            self._checked.add(name)
        return values

    @property
    def slide_id(self) -> str:
        return self.path.name.removesuffix(".zarr")

    @property
    def source(self) -> dict[str, Any]:
        return dict(cast("Mapping[str, Any]", self.group.attrs["source"]))

    @property
    def source_name(self) -> str:
        """The slide's file name as it was tiled (a link's, not its target's; stores from
        before it was recorded: the file's own)."""
        source = self.source
        return str(source.get("name") or Path(str(source.get("path", ""))).name)

    @property
    def tiling(self) -> dict[str, Any]:
        return dict(cast("Mapping[str, Any]", self.group.attrs["tiling"]))

    @property
    def tiles(self) -> zarr.Array[Any]:
        """uint8 (N, T, T, 3), one tile per inner chunk, ``tiles_per_chunk`` tiles per shard."""
        return self._array("tiles")

    @property
    def n_tiles(self) -> int:
        return int(self.tiles.shape[0])

    @property
    def coords(self) -> np.ndarray:
        """int64 (N, 2): level-0 x, y of each tile's top-left corner."""
        return self._values("coords")

    @property
    def tissue_fraction(self) -> np.ndarray:
        return self._values("tissue_fraction")

    @property
    def thumbnail(self) -> np.ndarray:
        """uint8 (h, w, 3) picture of the whole slide at ``tiling["thumbnail_mpp"]`` µm/px."""
        return self._values("thumbnail")

    @property
    def tissue_mask(self) -> np.ndarray:
        """bool (h, w): the tissue detected on :attr:`thumbnail`, pixel for pixel."""
        return self._values("tissue_mask")

    # -- per-tile tables (storage/per_tile.py) ----------------------------------------------
    def qc(self) -> dict[str, np.ndarray]:
        """``qc/<metric>`` scores, float32 (N,) each; {} for a store tiled without QC."""
        from wsi_ssl.storage.per_tile import read_qc

        return read_qc(self.group, self._values)

    def labels(self, name: str = "annotations") -> tuple[np.ndarray, list[str]]:
        """``labels/<name>``: float32 (N, C) class fractions per tile and the class names."""
        from wsi_ssl.storage.per_tile import read_labels

        return read_labels(self.group, self.path, name, self._values)

    def write_labels(self, name: str, fractions: np.ndarray, classes: Sequence[str]) -> None:
        """Store ``labels/<name>``: each tile's area fraction of the annotation ``classes``."""
        from wsi_ssl.storage.per_tile import write_labels

        write_labels(self.group, name, fractions, classes)

    def write_qc(self, scores: Mapping[str, np.ndarray]) -> None:
        """Store ``qc/<metric>``: each tile's quality scores (float32 (N,) per metric)."""
        from wsi_ssl.storage.per_tile import write_qc

        if scores:
            write_qc(self.group, scores)

    def write_shard_checksums(self, checksums: Sequence[int]) -> None:
        """Record each tile shard file's CRC32C (shard order), as the tiles array's
        ``shard_crc32c`` attribute: ``wsi-ssl check`` compares the files against them."""
        self.tiles.attrs[SHARD_CHECKSUMS] = [int(c) for c in checksums]

    @property
    def shard_checksums(self) -> list[int] | None:
        """The CRC32C of each tile shard file as tiled (None: a store tiled before they were
        recorded, or not by the tiler)."""
        recorded = self.tiles.attrs.get(SHARD_CHECKSUMS)
        return [int(c) for c in recorded] if isinstance(recorded, list) else None

    def damaged_shards(self) -> list[int]:
        """The shards whose files exist but whose bytes are not those recorded at tiling
        (reads every shard; none where nothing was recorded)."""
        recorded = self.shard_checksums or []
        paths = [self.shard_file(i) for i in range(len(recorded))]
        return [
            i
            for i, (path, crc) in enumerate(zip(paths, recorded, strict=True))
            if path.is_file() and shard_checksum(path) != crc
        ]

    def problem(self, *, verify: bool = False) -> str | None:
        """What is wrong with a complete store's contents, or None: tile shard files missing
        or cut short (their index), row counts, the other arrays' values against the sha256
        taken at completion; ``verify`` also reads every shard against its recorded CRC32C."""
        try:
            tiles = self.tiles
            n = int(tiles.shape[0])
            per_shard = int(tiles.shards[0]) if tiles.shards else int(tiles.chunks[0])
            files = shard_files(tiles)
            expected = len(files)
            missing = sum(not f.is_file() for f in files)
            if missing:
                return f"{missing} of {expected} tile shard files missing"
            cut = [
                i for i, f in enumerate(files) if tiles.shards and not shard_index_ok(f, per_shard)
            ]
            damaged = cut or (self.damaged_shards() if verify else [])
            if damaged:
                which = first_few(damaged)
                why = "cut short: no intact index" if cut else "bytes changed since tiling, CRC32C"
                return (
                    f"{len(damaged)} of {expected} tile shard files damaged (shard {which}: {why})"
                )
            for name, rows in (  # unchecked: the digests are compared below, all at once
                ("coords", len(self._read("coords"))),
                ("tissue_fraction", len(self._read("tissue_fraction"))),
            ):
                if rows != n:
                    return f"{name} has {rows} rows for {n} tiles"
            recorded = self.recorded_contents
            now = self.contents_sha256(list(recorded) or None)  # reads every array
            changed = [name for name, digest in recorded.items() if now[name] != digest]
            if changed:
                return changed_since_tiling(changed)
        except StoreCorruptError as err:
            return err.detail
        except (OSError, ValueError, KeyError, TypeError) as err:
            return f"cannot read its arrays ({type(err).__name__}: {err})"
        return None

    def shard_file(self, shard: int) -> Path:
        """The file of tile shard number ``shard``."""
        return shard_path(self.tiles, shard)

    def tiles_dask(self) -> da.Array:
        """The tiles as a dask array, one block per shard."""
        import dask.array as da

        tiles = self.tiles
        return cast("da.Array", da.from_zarr(tiles, chunks=tiles.shards))  # type: ignore[no-untyped-call]

    def write_tiles(self, start: int, tiles: np.ndarray) -> None:
        self.tiles[start : start + len(tiles)] = tiles


def recorded_attrs(path: str | Path) -> dict[str, Any]:
    """The attributes in the ``zarr.json`` of a store (or any array or group) at ``path``,
    read without zarr or checks ({}: unreadable or damaged)."""
    try:
        attrs = json.loads((Path(path) / "zarr.json").read_text(encoding="utf-8"))["attributes"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return attrs if isinstance(attrs, dict) else {}


def rewrite_attrs(path: str | Path, updates: Mapping[str, Any]) -> None:
    """Replace top-level attributes of the group at ``path`` in one atomic rewrite of its
    ``zarr.json`` (a reader sees the old document or the new one, never a mix)."""
    meta_path = Path(path) / "zarr.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["attributes"] = {**meta["attributes"], **updates}
    atomic_write_json(meta_path, meta, indent=2, sort_keys=False)


def open_tiles(path: str | Path, *, writable: bool = False) -> zarr.Array[Any]:
    """The ``tiles`` array at ``path`` (a store's ``tiles`` folder), for a tiling task that
    writes its shard (``writable``) or a reader that picks single tiles."""
    return zarr.open_array(path, mode="r+" if writable else "r")


# -- swap, don't delete ----------------------------------------------------------------------
def staging_path(store_path: str | Path) -> Path:
    """Where a new store for ``store_path`` is written before it is swapped in."""
    path = Path(store_path)
    return path.with_name(path.name + STAGING_SUFFIX)


def aside_path(store_path: str | Path) -> Path:
    """Where the replaced store waits between the two renames of a swap."""
    path = Path(store_path)
    return path.with_name(path.name + ASIDE_SUFFIX)


def is_complete_store(path: str | Path) -> bool:
    """Whether ``path`` holds a readable store marked complete."""
    try:
        return SlideStore.open(path, require_complete=False).status == STATUS_COMPLETE
    except Exception:  # missing, truncated or foreign metadata: not a complete store
        return False


def recover_swap(store_path: str | Path, *, roll_forward: bool = True) -> str | None:
    """Put back what a killed (or failed) swap left; call it holding the slide's lock.

    Without ``<id>.zarr``, a complete ``.new`` is swapped in (``roll_forward``), else ``.old``
    is put back; then leftover ``.new`` and ``.old`` are removed. Returns what was done.
    """
    path = Path(store_path)
    new, old = staging_path(path), aside_path(path)
    done = None
    if not path.exists():
        if roll_forward and new.exists() and is_complete_store(new):
            rename_into_place(new, path)
            done = "rolled forward"
        elif old.exists():
            rename_into_place(old, path)
            done = "rolled back"
    for leftover in (new, old):
        if leftover.exists():
            remove_path(leftover)
            done = done or f"removed {leftover.name}"
    return done


def swap_in(new: str | Path, store_path: str | Path) -> None:
    """Replace the store at ``store_path`` (if any) by the complete store at ``new``.

    Test hooks (``WSI_SSL_FAULT=kill_before_rename:#<point>``, see storage/atomic.py): points
    ``#aside``, ``#swap-in`` and ``#remove-old``, before each step.
    """
    path, old = Path(store_path), aside_path(store_path)
    fault_point(f"{path}#aside")
    if path.exists():
        rename_into_place(path, old)
    fault_point(f"{path}#swap-in")
    rename_into_place(new, path)
    fault_point(f"{path}#remove-old")
    remove_path(old)
    fsync_dir(path.parent)


def carry_embeddings(old: str | Path, new: str | Path, encoder_ids: list[str]) -> None:
    """Give the store at ``new`` the embeddings ``encoder_ids`` of the store at ``old``:
    hard links (copies where the filesystem refuses links), so ``old`` stays whole."""
    src, dst = Path(old) / "embeddings", Path(new) / "embeddings"
    dst.mkdir(exist_ok=True)
    for meta in src.iterdir():
        if meta.is_file() and not meta.name.startswith("."):
            shutil.copy2(meta, dst / meta.name)
    for encoder_id in encoder_ids:
        shutil.copytree(src / encoder_id, dst / encoder_id, copy_function=_link_or_copy)
    fsync_dir(dst)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
