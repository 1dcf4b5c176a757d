"""Frozen, validated configuration of the tiling stage (later stages keep theirs beside their code)."""

from __future__ import annotations

import dataclasses
import hashlib
import numbers
import os
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from wsi_ssl.errors import ConfigError
from wsi_ssl.listing import one_or_many

CODECS = ("jpeg", "zstd")
MAX_TILE_SIZE = 4096
"""Default bound on ``tile_size``: a bigger tile is a mistake far more often than a wish."""
MAX_TILES = 10_000_000
"""Default bound on the tiles planned for one slide (a 0.002 µm/px typo plans millions)."""
_TYPES: dict[str, tuple[type | tuple[type, ...], str]] = {
    "int": (numbers.Integral, "a whole number"),
    "float": (numbers.Real, "a number"),
    "bool": ((bool, np.bool_), "True or False"),
    "str": ((str, os.PathLike), "a string"),
}
"""What each field type accepts (numpy numbers too), and how an error names it."""
LIMIT_KEYS = ("mpp_override", "allow_upsampling", "max_tile_size", "max_tiles")
"""Settings that do not change the stored tiles (left out of :meth:`TilingConfig.output_key`)."""


@dataclass(frozen=True)
class TilingConfig:
    """How tiles are cut from a slide.

    Attributes:
        mpp: target microns per pixel of the stored tiles.
        tile_size: tile edge in pixels at the target mpp.
        overlap: pixels shared by neighbouring tiles at the target mpp.
        tissue_threshold: minimum tissue fraction (0..1) of a tile's area for it to be kept.
        codec: "jpeg" (lossy, compact) or "zstd" (lossless).
        jpeg_quality: JPEG quality when codec is "jpeg".
        tiles_per_chunk: tiles per Dask task and per Zarr shard.
        thumbnail_mpp: scale of the stored thumbnail and tissue mask.
        mpp_override: microns per pixel to use when the slide records none.
        allow_upsampling: allow a target ``mpp`` more than 2x finer than the slide's level 0
            (pixels the scanner never recorded); refused by default.
        max_tile_size: largest ``tile_size`` accepted (default 4096).
        max_tiles: largest tile plan (full grid, before tissue filtering) accepted per slide.
        roi: annotation file (QuPath GeoJSON, ASAP XML, PNG/NPY mask) restricting the tiles;
            its classes are stored per tile as ``labels/annotations`` (wsi_ssl.annotations).
        roi_include: classes forming the region (default: every class not excluded).
        roi_exclude: classes cut out of the region.
        roi_min_fraction: minimum fraction of a tile's area inside the region for it to be kept
            (0: any overlap; a tile outside the region is never kept).
        qc: whether the tiling tasks score every tile into ``qc/<metric>`` (about 1 ms a tile).
        qc_min_focus, qc_max_pen, qc_min_tissue, qc_max_dark: tiles past these QC scores are
            flagged, not kept by consumers (wsi_ssl.tiling.qc).
    """

    mpp: float = 0.5
    tile_size: int = 256
    overlap: int = 0
    tissue_threshold: float = 0.1
    codec: str = "jpeg"
    jpeg_quality: int = 90
    tiles_per_chunk: int = 64
    thumbnail_mpp: float = 8.0
    mpp_override: float | None = None
    allow_upsampling: bool = False
    max_tile_size: int = MAX_TILE_SIZE
    max_tiles: int = MAX_TILES
    roi: str | None = None
    roi_include: tuple[str, ...] = ()
    roi_exclude: tuple[str, ...] = ()
    roi_min_fraction: float = 0.5
    qc: bool = True
    qc_min_focus: float = 200.0
    qc_max_pen: float = 0.1
    qc_min_tissue: float = 0.05
    qc_max_dark: float = 0.5

    def __post_init__(self) -> None:
        self._check_types()
        if not self.mpp > 0:
            raise ConfigError(f"mpp must be > 0, got {self.mpp}", parameters=("mpp",))
        if self.tile_size < 16:
            raise ConfigError(
                f"tile_size must be >= 16, got {self.tile_size}", parameters=("tile_size",)
            )
        if self.tile_size > self.max_tile_size:
            raise ConfigError(
                f"tile_size {self.tile_size} is over max_tile_size={self.max_tile_size}; raise "
                "max_tile_size to allow tiles that large",
                parameters=("tile_size", "max_tile_size"),
            )
        if self.max_tiles < 1:
            raise ConfigError(
                f"max_tiles must be >= 1, got {self.max_tiles}", parameters=("max_tiles",)
            )
        if not 0 <= self.overlap < self.tile_size:
            raise ConfigError(
                f"overlap must be in [0, tile_size), got {self.overlap}", parameters=("overlap",)
            )
        if not 0.0 <= self.tissue_threshold <= 1.0:
            raise ConfigError(
                f"tissue_threshold must be in [0, 1], got {self.tissue_threshold}",
                parameters=("tissue_threshold",),
            )
        if self.codec not in CODECS:
            raise ConfigError(
                f"codec must be one of {', '.join(CODECS)}; got {self.codec!r}",
                parameters=("codec",),
            )
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(
                f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}",
                parameters=("jpeg_quality",),
            )
        if self.tiles_per_chunk < 1:
            raise ConfigError(
                f"tiles_per_chunk must be >= 1, got {self.tiles_per_chunk}",
                parameters=("tiles_per_chunk",),
            )
        if not self.thumbnail_mpp > 0:
            raise ConfigError(
                f"thumbnail_mpp must be > 0, got {self.thumbnail_mpp}",
                parameters=("thumbnail_mpp",),
            )
        if self.mpp_override is not None and not self.mpp_override > 0:
            raise ConfigError(
                f"mpp_override must be > 0, got {self.mpp_override}", parameters=("mpp_override",)
            )
        for name in ("roi_include", "roi_exclude"):  # TOML and JSON give lists; one class: str
            classes = one_or_many(getattr(self, name))
            object.__setattr__(self, name, tuple(str(c) for c in classes))
        both = sorted(set(self.roi_include) & set(self.roi_exclude))
        if both:
            raise ConfigError(
                f"class(es) {', '.join(map(repr, both))} both included and excluded; choose one "
                "of roi_include or roi_exclude for each class",
                parameters=("roi_include", "roi_exclude"),
            )
        if self.roi is not None:
            object.__setattr__(self, "roi", str(self.roi))
        for name in ("roi_min_fraction", "qc_max_pen", "qc_min_tissue", "qc_max_dark"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(
                    f"{name} must be in [0, 1], got {getattr(self, name)}", parameters=(name,)
                )
        if not self.qc_min_focus >= 0:
            raise ConfigError(
                f"qc_min_focus must be >= 0, got {self.qc_min_focus}", parameters=("qc_min_focus",)
            )

    def _check_types(self) -> None:
        """Each number, flag and name of the type its field says (``tile_size=128.0`` failed
        deep inside Zarr, ``mpp="0.5"`` with a bare TypeError); numbers become Python's."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), str(f.type).split(" | ")[0]
            if kind not in _TYPES or (value is None and str(f.type).endswith("| None")):
                continue
            wanted, words = _TYPES[kind]
            if not isinstance(value, wanted) or (isinstance(value, bool) and kind != "bool"):
                raise ConfigError(
                    f"{f.name} must be {words}; got {value!r} ({type(value).__name__})",
                    parameters=(f.name,),
                )
            if kind in ("int", "float", "bool"):  # numpy's as Python's, for the stored JSON
                number = cast(float, value)
                python = {"int": int, "float": float, "bool": bool}[kind]
                object.__setattr__(self, f.name, python(number))

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON types (tuples as lists), as stored and compared on resume."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TilingConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def output_key(self) -> dict[str, Any]:
        """The settings that change the stored tiles (resume compares these); with a ``roi``,
        its file's sha256 as ``roi_sha256`` (an annotation file exported again to the same
        path is another region; None: no such file)."""
        d = self.to_dict()
        for key in LIMIT_KEYS:
            d.pop(key)
        if self.roi is not None:
            try:
                with open(self.roi, "rb") as f:
                    d["roi_sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
            except OSError:
                d["roi_sha256"] = None
        return d
