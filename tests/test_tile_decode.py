"""Stored tiles: RGB-in-JPEG passed through with openslide's colours, reduced-scale (DCT
domain) decoding for shrink-by-2/4 grids within a stated tolerance of decode-then-shrink, and
threaded JPEG 2000 decoding, on real H&E pixels (CMU-1-Small-Region)."""

from __future__ import annotations

import io
from pathlib import Path

import imagecodecs
import numpy as np
import openslide
import pytest
import simplejpeg
import tifffile
from PIL import Image

from wsi_ssl.config import TilingConfig
from wsi_ssl.errors import CorruptSlideError
from wsi_ssl.slide import open_slide
from wsi_ssl.storage import open_store
from wsi_ssl.testing.tiles import read_tiles
from wsi_ssl.tiling.batch import tile_slide
from wsi_ssl.tiling.decode import (
    ADOBE_RGB,
    J2K_COMPRESSIONS,
    REDUCED_TOLERANCE,
    decode_reduced,
    decode_stored,
    portable_jpeg,
)
from wsi_ssl.tiling.extract import chunk_tiles, strip_source
from wsi_ssl.tiling.grid import TileGrid


def _within_tolerance(got: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    stats = {"mean": float(diff.mean()), "p99": float(np.percentile(diff, 99))}
    for name, limit in REDUCED_TOLERANCE.items():
        assert stats[name] <= limit, (stats, REDUCED_TOLERANCE)
    return stats


@pytest.fixture(scope="module")
def forty_x(cmu_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40x-style pyramid (0.25 µm/px, levels 1/4/16, 256 px YCbCr JPEG q90 tiles) of
    CMU-1's real pixels, 2,100 x 2,900 px: partial stored tiles at the right and bottom."""
    with tifffile.TiffFile(cmu_small) as tif:
        pixels = tif.pages[0].asarray()[:2900, :2100]
    path = tmp_path_factory.mktemp("forty") / "forty-x.tiff"
    per_cm = 1e4 / 0.25
    with tifffile.TiffWriter(path) as tif:
        for ds in (1, 4, 16):
            level = pixels if ds == 1 else np.asarray(Image.fromarray(pixels).reduce(ds))
            tif.write(
                level,
                tile=(256, 256),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 90},
                resolution=(per_cm / ds, per_cm / ds),
                resolutionunit="CENTIMETER",
                subfiletype=0 if ds == 1 else 1,
                metadata=None,
            )
    return path


def test_rgb_jpeg_tiles_are_copied_with_openslides_colours(cmu_small: Path, tmp_path: Path) -> None:
    """CMU-1 stores RGB-in-JPEG without a marker: the copied stream carries Adobe APP14
    (transform 0), so plain decoders and the store give openslide's pixels exactly."""
    config = TilingConfig(tile_size=240, codec="jpeg", tissue_threshold=0.0)
    tile_slide(cmu_small, tmp_path, config)
    (slide_id,) = open_store(tmp_path).slide_ids
    store = open_store(tmp_path).slide(slide_id)
    shard = (tmp_path / "slides" / f"{slide_id}.zarr" / "tiles" / "c/0/0/0/0").read_bytes()
    assert shard.startswith(b"\xff\xd8" + ADOBE_RGB)  # tile (0, 0) copied, marker added
    slide = openslide.OpenSlide(str(cmu_small))
    w, h = slide.dimensions
    inside = 0
    for i, (x, y) in enumerate(store.coords):
        if x + 240 > w or y + 240 > h:
            continue
        expected = np.asarray(slide.read_region((int(x), int(y)), 0, (240, 240)).convert("RGB"))
        np.testing.assert_array_equal(store.tiles[i], expected)
        inside += 1
    assert inside == (w // 240) * (h // 240)
    with open_slide(cmu_small, backend="tiffslide") as reader:
        stored = reader.stored_tiles(0)
        assert stored is not None
        stream = portable_jpeg(stored, 2, 3)
    assert stream is not None
    expected = np.asarray(slide.read_region((3 * 240, 2 * 240), 0, (240, 240)).convert("RGB"))
    for decoded in (
        imagecodecs.jpeg8_decode(stream),
        simplejpeg.decode_jpeg(stream),
        np.asarray(Image.open(io.BytesIO(stream)).convert("RGB")),
    ):
        np.testing.assert_array_equal(decoded, expected)
    # without the marker a plain decoder takes the components for YCbCr: far off
    plain = imagecodecs.jpeg8_decode(stream.replace(ADOBE_RGB, b"", 1))
    assert np.abs(plain.astype(int) - expected).mean() > 20


@pytest.mark.parametrize("k", [2, 4])
def test_reduced_decode_is_close_to_decode_then_shrink(
    cmu_small: Path, forty_x: Path, k: int
) -> None:
    """Every whole stored tile of CMU-1 (RGB 4:4:4) and of its YCbCr 4:2:0 copy, decoded at
    1/k, against the full decode box-averaged k x k."""
    for path in (cmu_small, forty_x):
        with open_slide(path, backend="tiffslide") as reader:
            stored = reader.stored_tiles(0)
            assert stored is not None
            th, tw = stored.tile_shape
            got, expected = [], []
            for row in range(reader.dimensions[1] // th):
                for col in range(reader.dimensions[0] // tw):
                    got.append(decode_reduced(stored, row, col, k))
                    full = Image.fromarray(stored.decode(row, col))
                    expected.append(np.asarray(full.reduce(k)))
        assert got[0].shape == (th // k, tw // k, 3)
        _within_tolerance(np.stack(got), np.stack(expected))


def test_forty_x_grid_at_half_scale_reads_reduced_tiles(forty_x: Path) -> None:
    """Tiling the 0.25 µm/px slide at 0.5 µm/px shrinks level 0 by 2: inside tiles come from
    stored tiles decoded at 1/2 (within tolerance of decode-then-shrink), edge tiles that
    overhang the slide the general way (identical to it)."""
    with open_slide(forty_x, backend="tiffslide") as reader:
        grid = TileGrid.for_slide(reader, reader.require_mpp(), TilingConfig(mpp=0.5))
        assert grid.resize and grid.level == 0
        source = strip_source(reader, grid)
        assert source is not None and source[1] == 2
        coords = grid.all_coords()
        tiles = read_tiles(reader, grid, coords)
        inside = (coords + 512 <= (2100, 2900)).all(axis=1)
        assert inside.sum() == 4 * 5
        expected = []
        for x, y in coords[inside]:
            full = reader.read_region((int(x), int(y)), 0, (512, 512))
            expected.append(np.asarray(Image.fromarray(full).reduce(2)))
        stats = _within_tolerance(tiles[inside], np.stack(expected))
        assert stats["mean"] > 0  # really the reduced decode, not the full one
        for tile, (x, y) in zip(tiles[~inside], coords[~inside], strict=True):
            full = reader.read_region((int(x), int(y)), 0, (512, 512))
            np.testing.assert_array_equal(tile, np.asarray(Image.fromarray(full).reduce(2)))


def test_corrupt_tile_on_a_reduced_read_is_a_corrupt_slide_error(
    forty_x: Path, tmp_path: Path
) -> None:
    slide = tmp_path / "broken.tiff"
    data = bytearray(forty_x.read_bytes())
    with tifffile.TiffFile(forty_x) as tif:
        offset, count = tif.pages[0].dataoffsets[1], tif.pages[0].databytecounts[1]
    data[offset : offset + count] = b"\x00" * count  # tile (0, 1): no JPEG left
    slide.write_bytes(bytes(data))
    with open_slide(slide, backend="tiffslide") as reader:
        grid = TileGrid.for_slide(reader, reader.require_mpp(), TilingConfig(mpp=0.5))
        with pytest.raises(CorruptSlideError, match="row 0, column 1"):
            read_tiles(reader, grid, grid.all_coords()[:2])


def test_jpeg2000_tiles_decode_with_threads_to_the_same_pixels(
    cmu_small: Path, tmp_path: Path
) -> None:
    """A JPEG 2000 TIFF of CMU-1 pixels: tiles decoded with 2 OpenJPEG threads equal the
    reader's own decode, through the tiling path too."""
    with tifffile.TiffFile(cmu_small) as tif:
        pixels = tif.pages[0].asarray()[:1024, :1024]
    path = tmp_path / "j2k.tiff"
    tifffile.imwrite(
        path,
        pixels,
        tile=(256, 256),
        photometric="rgb",
        compression="jpeg2000",
        compressionargs={"level": 80},
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
    )
    with open_slide(path, backend="tiffslide") as reader:
        stored = reader.stored_tiles(0)
        assert stored is not None and stored.page.compression in J2K_COMPRESSIONS
        for row, col in [(0, 0), (1, 2), (3, 3)]:
            np.testing.assert_array_equal(
                decode_stored(stored, row, col, threads=2), stored.decode(row, col)
            )
        grid = TileGrid.for_slide(reader, 0.5, TilingConfig())
        coords = grid.all_coords()
        threaded = chunk_tiles(reader, grid, coords, decode_threads=2)
        np.testing.assert_array_equal(np.stack(threaded), read_tiles(reader, grid, coords))
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[5], tif.pages[0].databytecounts[5]
    data[offset : offset + count] = b"\x00" * count
    path.write_bytes(bytes(data))
    with open_slide(path, backend="tiffslide") as reader:
        stored = reader.stored_tiles(0)
        assert stored is not None
        with pytest.raises(CorruptSlideError, match="row 1, column 1"):
            decode_stored(stored, 1, 1, threads=2)
