"""One slide's Zarr v3 group: tiles, coords, thumbnail, tissue mask and provenance.

The attribute keys and array names here are a contract other tools read (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import zarr

from wsi_ssl.errors import SchemaMismatchError, StoreIncompleteError, StoreNotFoundError
from wsi_ssl.storage.codecs import tile_codecs

if TYPE_CHECKING:
    import dask.array as da

SCHEMA_VERSION = 1
STATUS_WRITING = "writing"
STATUS_COMPLETE = "complete"


class SlideStore:
    """A slide's store at ``<root>/slides/<slide_id>.zarr``."""

    def __init__(self, path: str | Path, group: zarr.Group) -> None:
        self.path = Path(path)
        self.group = group

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
        group.create_array("coords", data=np.asarray(coords, dtype=np.int64))
        group.create_array("tissue_fraction", data=np.asarray(tissue_fraction, dtype=np.float32))
        group.create_array("thumbnail", data=np.ascontiguousarray(thumbnail, dtype=np.uint8))
        group.create_array("tissue_mask", data=np.asarray(tissue_mask, dtype=bool))
        return cls(path, group)

    @classmethod
    def open(
        cls, path: str | Path, *, mode: str = "r", require_complete: bool = True
    ) -> SlideStore:
        """Open an existing store; by default refuse one that is not complete."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise StoreNotFoundError(path, "slide store")
        group = zarr.open_group(path, mode=mode, zarr_format=3)  # type: ignore[arg-type]
        store = cls(path, group)
        version = store.attrs.get("schema_version")
        if version != SCHEMA_VERSION:
            raise SchemaMismatchError(
                f"{path}: schema_version {version!r}, this wsi-ssl reads {SCHEMA_VERSION}; "
                "re-tile the slide with this version"
            )
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
        """Flip the status once every chunk is on disk (the last write of a slide job)."""
        self.group.attrs["status"] = STATUS_COMPLETE

    # -- contents --------------------------------------------------------------------------
    def _array(self, name: str) -> zarr.Array:
        """The member array ``name`` (zarr types a group's members as array or group)."""
        return cast(zarr.Array, self.group[name])

    @property
    def slide_id(self) -> str:
        return self.path.name.removesuffix(".zarr")

    @property
    def source(self) -> dict[str, Any]:
        return dict(cast("Mapping[str, Any]", self.group.attrs["source"]))

    @property
    def tiling(self) -> dict[str, Any]:
        return dict(cast("Mapping[str, Any]", self.group.attrs["tiling"]))

    @property
    def tiles(self) -> zarr.Array:
        """uint8 (N, T, T, 3), one tile per inner chunk, ``tiles_per_chunk`` tiles per shard."""
        return self._array("tiles")

    @property
    def n_tiles(self) -> int:
        return int(self.tiles.shape[0])

    @property
    def coords(self) -> np.ndarray:
        """int64 (N, 2): level-0 x, y of each tile's top-left corner."""
        return np.asarray(self._array("coords")[:])

    @property
    def tissue_fraction(self) -> np.ndarray:
        return np.asarray(self._array("tissue_fraction")[:])

    @property
    def thumbnail(self) -> np.ndarray:
        return np.asarray(self._array("thumbnail")[:])

    @property
    def tissue_mask(self) -> np.ndarray:
        return np.asarray(self._array("tissue_mask")[:])

    def tiles_dask(self) -> da.Array:
        """The tiles as a dask array, one block per shard."""
        import dask.array as da

        tiles = self.tiles
        return da.from_zarr(tiles, chunks=tiles.shards)

    def write_tiles(self, start: int, tiles: np.ndarray) -> None:
        self.tiles[start : start + len(tiles)] = tiles
