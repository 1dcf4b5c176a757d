"""Deep-zoom pictures of a slide: the DZI pyramid the viewer pulls, and any level-0 box.

A slide of level-0 size (W, H) is a Deep Zoom Image of ``max_level = ceil(log2(max(W, H)))``
levels of ``TILE`` px tiles; level ``l`` is the slide scaled by ``2 ** (l - max_level)``.
Each picture comes from the cheapest source that has its resolution:

* the stored thumbnail, once a screen pixel covers at least a thumbnail pixel;
* the slide file through its reader (:func:`wsi_ssl.slide.open_slide`), at the pyramid level
  just finer than needed (``source="slide"``);
* the archive's stored tiles (``source="tiles"``; also where the slide file is gone), down to
  ``STORED_SPAN`` times their own scale, coarser from the thumbnail.

So one picture reads at most about ``(4 * TILE) ** 2`` pixels, whatever its box.
"""

from __future__ import annotations

import io
import logging
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from wsi_ssl.errors import ConfigError, TileReadError
from wsi_ssl.serve.refusals import TilesDamagedError

if TYPE_CHECKING:
    from PIL.Image import Image

    from wsi_ssl.slide import SlideReader
    from wsi_ssl.storage import SlideStore

__all__ = [
    "FileStamp",
    "Pyramid",
    "TileCache",
    "dzi_xml",
    "encode",
    "file_stamp",
    "open_slide_file",
    "tiles_in",
]

log = logging.getLogger(__name__)

TILE = 256
STORED_SPAN = 4.0
"""Stored tiles draw pictures down to this many times coarser than their own scale."""
MAX_READ_SIDE = 2048
"""A slide read larger than this (a slide without a coarse level) comes from the thumbnail."""
BACKGROUND = (232, 232, 232)
Source = Literal["slide", "tiles"]


def encode(image: Image, fmt: Literal["jpeg", "png"]) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=90, subsampling=0)
    else:
        image.save(buf, format="PNG", compress_level=1)  # lossless; 2x faster than the default
    return buf.getvalue()


FileStamp = tuple[int, int, int]
"""A slide file's inode, size and modification time: another value means it was replaced."""


def file_stamp(path: str | Path) -> FileStamp | None:
    """``path``'s :data:`FileStamp`, or None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def open_slide_file(store: SlideStore) -> tuple[SlideReader | None, FileStamp | None]:
    """The store's slide file through its reader while it is the slide tiled (its content
    fingerprint, a DICOM series' over its instances), and the file's stamp taken before; no
    reader when it is gone, unreadable or now another slide."""
    from wsi_ssl.errors import WsiSslError
    from wsi_ssl.slide import open_slide
    from wsi_ssl.tiling.source import holds_slide

    path = Path(store.source["path"])
    stamp = file_stamp(path)
    recorded = store.source.get("fingerprint")
    if recorded is not None and not holds_slide(path, recorded):
        log.info(
            "slide %s: drawing from the stored tiles (%s gone or changed)", store.slide_id, path
        )
        return None, stamp
    try:
        reader = open_slide(path)
    except (WsiSslError, OSError) as err:
        log.info("slide %s: drawing from the stored tiles (%s)", store.slide_id, type(err).__name__)
        return None, stamp
    if list(reader.dimensions) != [int(v) for v in store.source["dimensions"]]:
        reader.close()
        return None, stamp
    return reader, stamp


@dataclass
class _SlideFile:
    reader: SlideReader
    lock: threading.Lock


class Pyramid:
    """The pictures of one slide store (and, when readable, its slide file)."""

    def __init__(
        self, store: SlideStore, reader: SlideReader | None, stamp: FileStamp | None = None
    ) -> None:
        """``reader``: the store's slide file (None: draw from the store), looked at when the
        file had ``stamp`` (:func:`open_slide_file`)."""
        from PIL import Image

        self.store = store
        self.file = _SlideFile(reader, threading.Lock()) if reader is not None else None
        self.file_stamp = stamp
        self.width, self.height = (int(v) for v in store.source["dimensions"])
        self.max_level = max(0, math.ceil(math.log2(max(self.width, self.height))))
        self.thumbnail = Image.fromarray(store.thumbnail)
        self.thumb_scale = self.width / self.thumbnail.width  # level-0 px per thumbnail px
        self.tile_scale = float(store.tiling["tile_size_level0"]) / int(store.tiling["tile_size"])

    def file_replaced(self) -> bool:
        """Whether the slide file has changed (replaced, removed or back) since it was looked
        at: then it is looked at again."""
        return file_stamp(self.store.source["path"]) != self.file_stamp

    # -- geometry --------------------------------------------------------------------------
    def level_size(self, level: int) -> tuple[int, int]:
        s = 2.0 ** (level - self.max_level)
        return max(1, math.ceil(self.width * s)), max(1, math.ceil(self.height * s))

    def tile_box(self, level: int, col: int, row: int) -> tuple[tuple[float, ...], tuple[int, int]]:
        """Level-0 box (x, y, w, h) and pixel size (w, h) of DZI tile (col, row) of ``level``."""
        if not 0 <= level <= self.max_level:
            raise ConfigError(f"level must be in 0..{self.max_level}, got {level}")
        lw, lh = self.level_size(level)
        if not (0 <= col * TILE < lw and 0 <= row * TILE < lh):
            raise ConfigError(f"tile {col},{row} is outside level {level} ({lw} x {lh} px)")
        tw, th = min(TILE, lw - col * TILE), min(TILE, lh - row * TILE)
        d = 2.0 ** (self.max_level - level)
        return (col * TILE * d, row * TILE * d, tw * d, th * d), (tw, th)

    # -- drawing ---------------------------------------------------------------------------
    def tile(self, level: int, col: int, row: int, source: Source) -> Image:
        box, size = self.tile_box(level, col, row)
        return self.draw(box, size, source)

    def region(
        self, box: tuple[int, int, int, int], size: tuple[int, int], source: Source
    ) -> Image:
        """Level-0 ``box`` at pixel ``size``; what lies off the slide is background."""
        from PIL import Image

        x, y, w, h = box
        canvas = Image.new("RGB", size, BACKGROUND)
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(self.width, x + w), min(self.height, y + h)
        f = size[0] / w
        part = (max(1, round((x1 - x0) * f)), max(1, round((y1 - y0) * f)))
        if x1 > x0 and y1 > y0:
            image = self.draw((x0, y0, x1 - x0, y1 - y0), part, source)
            canvas.paste(image, (round((x0 - x) * f), round((y0 - y) * f)))
        return canvas

    def draw(self, box: tuple[float, ...], size: tuple[int, int], source: Source) -> Image:
        """Level-0 ``box`` (inside the slide) at pixel ``size`` from the cheapest source."""
        d = box[2] / size[0]  # level-0 px per output px
        if d >= self.thumb_scale:
            return self._from_thumbnail(box, size)
        if source == "slide" and self.file is not None:
            image = self._from_slide(box, size, d)
            if image is not None:
                return image
        if d <= STORED_SPAN * self.tile_scale:
            return self._from_tiles(box, size)
        return self._from_thumbnail(box, size)

    def _from_thumbnail(self, box: tuple[float, ...], size: tuple[int, int]) -> Image:
        from PIL import Image

        x, y, w, h = (v / self.thumb_scale for v in box)
        tw, th = self.thumbnail.size
        crop = (max(0.0, x), max(0.0, y), min(tw, x + w), min(th, y + h))
        return self.thumbnail.resize(size, Image.Resampling.BILINEAR, box=crop)

    def _from_slide(self, box: tuple[float, ...], size: tuple[int, int], d: float) -> Image | None:
        from PIL import Image

        assert self.file is not None
        reader = self.file.reader
        level = reader.best_level_for_downsample(d)
        ds = reader.level_downsamples[level]
        read = (max(1, math.ceil(box[2] / ds)), max(1, math.ceil(box[3] / ds)))
        if max(read) > MAX_READ_SIDE:
            return None
        with self.file.lock:
            pixels = reader.read_region((round(box[0]), round(box[1])), level, read)
        image = Image.fromarray(pixels)
        return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)

    def _from_tiles(self, box: tuple[float, ...], size: tuple[int, int]) -> Image:
        from PIL import Image

        from wsi_ssl.search.gallery import paste_tiles
        from wsi_ssl.storage.tile_reader import TileReader

        x, y, w = box[:3]
        coords, size0 = self.store.coords, float(self.store.tiling["tile_size_level0"])
        rows = tiles_in(self.store, box)
        f = size[0] / w
        canvas = Image.new("RGB", size, BACKGROUND)
        if len(rows):
            background = self._from_thumbnail(box, size)  # between tissue tiles: the thumbnail
            canvas.paste(background)
            # each shard read checked against its CRC: bit-rot decodes to wrong pixels
            try:
                tiles = TileReader(self.store.tiles, verify=True).read(rows)
            except TileReadError as err:
                raise TilesDamagedError(self.store.source_name, err) from err
            paste_tiles(canvas, tiles, coords[rows], (x, y), size0, f)
        else:
            canvas = self._from_thumbnail(box, size)
        return canvas


def tiles_in(store: SlideStore, box: tuple[float, ...]) -> np.ndarray:
    """Rows of ``store``'s tiles that overlap level-0 ``box`` (x, y, w, h)."""
    x, y, w, h = box
    coords, size0 = store.coords, float(store.tiling["tile_size_level0"])
    return np.flatnonzero(
        (coords[:, 0] + size0 > x)
        & (coords[:, 0] < x + w)
        & (coords[:, 1] + size0 > y)
        & (coords[:, 1] < y + h)
    )


def dzi_xml(pyramid: Pyramid) -> str:
    """The Deep Zoom descriptor of ``pyramid`` (jpeg tiles of ``TILE`` px, no overlap)."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="jpeg" '
        f'Overlap="0" TileSize="{TILE}"><Size Width="{pyramid.width}" '
        f'Height="{pyramid.height}"/></Image>\n'
    )


class TileCache:
    """Encoded pictures by key, least recently used dropped past ``max_bytes``; thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Any, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: Any) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: Any, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            self._bytes += len(data) - (len(old) if old is not None else 0)
            self._items[key] = data
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "items": len(self._items),
                "bytes": self._bytes,
                "hits": self.hits,
                "misses": self.misses,
            }
