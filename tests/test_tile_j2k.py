"""JPEG 2000 strips: assembled from the stored tiles with OpenJPEG threads (the reader's pixels
exactly at native scale), and at 1/2, 1/4, 1/8 decoded from the codestream's own wavelet
levels, within ``J2K_REDUCED_TOLERANCE`` of decode-then-shrink; on J2K TIFFs of real H&E
pixels (CMU-1-Small-Region) written by tifffile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from tests.conftest import run_cli
from wsi_ssl.config import TilingConfig
from wsi_ssl.errors import CorruptSlideError
from wsi_ssl.slide import SlideReader, open_slide
from wsi_ssl.storage import open_store
from wsi_ssl.tiling.decode import J2K_REDUCED_TOLERANCE, decode_reduced, reduced_scales
from wsi_ssl.tiling.extract import chunk_tiles, strip_source
from wsi_ssl.tiling.grid import TileGrid

WIDTH, HEIGHT = 2148, 2100
"""9 x 9 stored 256 px tiles, the last column and row partial."""


def _write_j2k(pixels: np.ndarray, path: Path, mpp: float, **compressionargs: int) -> Path:
    tifffile.imwrite(
        path,
        pixels,
        tile=(256, 256),
        photometric="rgb",
        compression="jpeg2000",
        compressionargs={"level": 80, **compressionargs},
        resolution=(1e4 / mpp, 1e4 / mpp),
        resolutionunit="CENTIMETER",
        metadata=None,
    )
    return path


@pytest.fixture(scope="module")
def forty_x_j2k(cmu_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CMU-1's pixels as a 0.25 µm/px JPEG 2000 TIFF (256 px tiles, 5 wavelet levels)."""
    with tifffile.TiffFile(cmu_small) as tif:
        pixels = tif.pages[0].asarray()[:HEIGHT, :WIDTH]
    return _write_j2k(pixels, tmp_path_factory.mktemp("j2k") / "forty-x.tiff", 0.25)


def _stats(got: np.ndarray, expected: np.ndarray, limits: dict[str, float]) -> dict[str, float]:
    diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    stats = {"mean": float(diff.mean()), "p99": float(np.percentile(diff, 99))}
    for name, limit in limits.items():
        assert stats[name] <= limit, (stats, limits)
    return stats


def _centred(full: np.ndarray, k: int) -> np.ndarray:
    """``full`` averaged over k-wide windows centred on pixels k*n (half weights at the two
    ends), edges mirrored: where a wavelet's low-pass sample sits."""
    weights = np.full(k + 1, 1 / k)
    weights[[0, -1]] = 0.5 / k
    h = k // 2
    padded = np.pad(full.astype(np.float64), ((h, h), (h, h), (0, 0)), mode="symmetric")
    rows_n, cols_n = full.shape[0] // k, full.shape[1] // k
    rows = sum(w * padded[j : j + k * rows_n : k] for j, w in enumerate(weights))
    out = sum(w * rows[:, j : j + k * cols_n : k] for j, w in enumerate(weights))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _box_tiles(reader: SlideReader, coords: np.ndarray, span: int, k: int) -> np.ndarray:
    """The previous path: each tile's level-0 region from ``read_region``, k x k box shrunk."""
    return np.stack(
        [
            np.asarray(
                Image.fromarray(reader.read_region((int(x), int(y)), 0, (span, span))).reduce(k)
            )
            for x, y in coords
        ]
    )


@pytest.mark.parametrize("k", [2, 4, 8])
def test_wavelet_level_decode_is_within_tolerance_of_decode_then_shrink(
    forty_x_j2k: Path, k: int
) -> None:
    """Every whole stored tile (the partial ones are padded) at 1/k from its wavelet level
    against its full decode shrunk k times: a box (the usual shrink) and a window centred where
    the wavelet samples."""
    with open_slide(forty_x_j2k, backend="tiffslide") as reader:
        stored = reader.stored_tiles(0)
        assert stored is not None
        assert reduced_scales(stored) == (2, 4, 8)
        got, box, centred = [], [], []
        for row in range(HEIGHT // 256):
            for col in range(WIDTH // 256):
                got.append(decode_reduced(stored, row, col, k))
                full = stored.decode(row, col)
                box.append(np.asarray(Image.fromarray(full).reduce(k)))
                centred.append(_centred(full, k))
    assert got[0].shape == (256 // k, 256 // k, 3)
    stats = _stats(np.stack(got), np.stack(box), J2K_REDUCED_TOLERANCE["box"])
    assert stats["mean"] > 0  # really the wavelet level, not the full decode shrunk
    _stats(np.stack(got), np.stack(centred), J2K_REDUCED_TOLERANCE["centred"])


def test_native_scale_offset_grid_strips_equal_the_readers_pixels(forty_x_j2k: Path) -> None:
    """256 px tiles overlapping by 40 px at the slide's own scale (three rows): no tile but the
    first lines up with a stored tile; the strips assembled from stored tiles (1 or 2 OpenJPEG
    threads) equal ``read_region`` exactly, the tiles overhanging the right edge included."""
    config = TilingConfig(mpp=0.25, overlap=40)
    with open_slide(forty_x_j2k, backend="tiffslide") as reader:
        grid = TileGrid.for_slide(reader, reader.require_mpp(), config)
        assert not grid.resize
        source = strip_source(reader, grid)
        assert source is not None and source[1] == 1
        coords = grid.all_coords()
        coords = coords[coords[:, 1] < 500]  # three rows of tiles, the last overhanging
        one = np.stack(chunk_tiles(reader, grid, coords, decode_threads=1))
        two = np.stack(chunk_tiles(reader, grid, coords, decode_threads=2))
        expected = np.stack(
            [reader.read_region((int(x), int(y)), 0, (256, 256)) for x, y in coords]
        )
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(one, expected)


def test_half_scale_grid_reads_the_wavelet_level(forty_x_j2k: Path) -> None:
    """Tiled at 0.5 µm/px, level 0 shrinks by 2: inside tiles come from the stored tiles'
    1/2 wavelet level (within tolerance of read_region + 2 x 2 box, the same with 1 and 2
    threads), tiles overhanging the slide from read_region exactly as before."""
    with open_slide(forty_x_j2k, backend="tiffslide") as reader:
        grid = TileGrid.for_slide(reader, reader.require_mpp(), TilingConfig(mpp=0.5))
        source = strip_source(reader, grid)
        assert grid.resize and source is not None and source[1] == 2
        coords = grid.all_coords()
        one = np.stack(chunk_tiles(reader, grid, coords, decode_threads=1))
        two = np.stack(chunk_tiles(reader, grid, coords, decode_threads=2))
        expected = _box_tiles(reader, coords, 512, 2)
    np.testing.assert_array_equal(one, two)
    inside = (coords + 512 <= (WIDTH, HEIGHT)).all(axis=1)
    assert inside.sum() == 16
    stats = _stats(one[inside], expected[inside], J2K_REDUCED_TOLERANCE["box"])
    assert stats["mean"] > 0
    np.testing.assert_array_equal(one[~inside], expected[~inside])


def test_fewer_wavelet_levels_fall_back_to_full_decode_and_box(
    cmu_small: Path, tmp_path: Path
) -> None:
    """A codestream with one wavelet level holds 1/2 but not 1/4: a 4x shrink assembles the
    strip at full size and box-averages it, the reader's pixels shrunk exactly."""
    with tifffile.TiffFile(cmu_small) as tif:
        pixels = tif.pages[0].asarray()[:1024, :1024]
    slide = _write_j2k(pixels, tmp_path / "one-level.tiff", 0.25, resolutions=2)
    with open_slide(slide, backend="tiffslide") as reader:
        stored = reader.stored_tiles(0)
        assert stored is not None and reduced_scales(stored) == (2,)
        grid = TileGrid.for_slide(reader, reader.require_mpp(), TilingConfig(mpp=1.0))
        assert strip_source(reader, grid) == (stored, 1)
        coords = grid.all_coords()
        tiles = np.stack(chunk_tiles(reader, grid, coords, decode_threads=2))
        np.testing.assert_array_equal(tiles, _box_tiles(reader, coords, 1024, 4))


def test_damaged_tile_on_a_wavelet_level_read_is_a_corrupt_slide_error(
    forty_x_j2k: Path, tmp_path: Path
) -> None:
    slide = tmp_path / "broken.tiff"
    data = bytearray(forty_x_j2k.read_bytes())
    with tifffile.TiffFile(forty_x_j2k) as tif:
        offset, count = tif.pages[0].dataoffsets[1], tif.pages[0].databytecounts[1]
    data[offset : offset + count] = b"\x00" * count  # tile (0, 1): no codestream left
    slide.write_bytes(bytes(data))
    with open_slide(slide, backend="tiffslide") as reader:
        grid = TileGrid.for_slide(reader, reader.require_mpp(), TilingConfig(mpp=0.5))
        for threads in (1, 2):
            with pytest.raises(CorruptSlideError, match="row 0, column 1"):
                chunk_tiles(reader, grid, grid.all_coords()[:2], decode_threads=threads)


def test_tile_command_on_a_j2k_slide_matches_the_previous_path(
    forty_x_j2k: Path, tmp_path: Path
) -> None:
    """``wsi-ssl tile --mpp 0.5`` (lossless store, one worker: two OpenJPEG threads a tile)
    stores what read_region + 2 x 2 box gives, within the stated tolerance."""
    argv = ["tile", str(forty_x_j2k), "--out", str(tmp_path), "--mpp", "0.5", "--codec"]
    code, _, err = run_cli([*argv, "zstd", "--tissue-threshold", "0", "--workers", "1"])
    assert code == 0, err
    archive = open_store(tmp_path)
    (slide_id,) = archive.slide_ids
    store = archive.slide(slide_id)
    coords = np.asarray(store.coords)
    tiles = np.asarray(store.tiles[:])
    assert len(coords) == 25
    with open_slide(forty_x_j2k, backend="tiffslide") as reader:
        expected = _box_tiles(reader, coords, 512, 2)
    inside = (coords + 512 <= (WIDTH, HEIGHT)).all(axis=1)
    _stats(tiles[inside], expected[inside], J2K_REDUCED_TOLERANCE["box"])
    np.testing.assert_array_equal(tiles[~inside], expected[~inside])


def test_aperio_ycbcr_j2k_reads_as_rgb_on_every_path(cmu_small: Path, tmp_path: Path) -> None:
    """Aperio's 33003 (TCGA's JPEG 2000): YCbCr components, no colour transform, page tagged
    RGB. Every read (the reader's regions aligned and not, a stored tile, with threads, at
    1/2, the tile command) gives the slide's RGB, not the raw components (77 levels off)."""
    with tifffile.TiffFile(cmu_small) as tif:
        rgb = tif.pages[0].asarray()[:1024, :1024]
    ycc = np.asarray(Image.fromarray(rgb).convert("YCbCr"))
    path = tmp_path / "aperio-33003.tiff"
    tifffile.imwrite(
        path,
        ycc,
        tile=(256, 256),
        photometric="rgb",
        compression=33003,
        compressionargs={"level": 90},
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
        metadata=None,
    )
    limits = {"mean": 2.0, "p99": 12.0}
    with open_slide(path, backend="tiffslide") as reader:
        _stats(reader.read_region((0, 0), 0, (1024, 1024)), rgb, limits)
        _stats(reader.read_region((3, 5), 0, (300, 200)), rgb[5:205, 3:303], limits)
        stored = reader.stored_tiles(0)
        assert stored is not None
        for threads in (1, 2):
            _stats(decode_reduced(stored, 1, 2, 1, threads), rgb[256:512, 512:768], limits)
        half = np.asarray(Image.fromarray(rgb[:256, :256]).reduce(2))
        _stats(decode_reduced(stored, 0, 0, 2), half, J2K_REDUCED_TOLERANCE["box"])
    out = tmp_path / "out"
    assert run_cli(["tile", str(path), "--out", str(out), "--codec", "zstd", "--quiet"])[0] == 0
    archive = open_store(out)
    store = archive.slide(archive.slide_ids[0])
    for tile, (x, y) in zip(store.tiles[:], store.coords, strict=True):
        _stats(tile, rgb[y : y + 256, x : x + 256], limits)
