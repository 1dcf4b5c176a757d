"""Mask images as annotations: exact per-tile areas, and masks too large to read whole."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
from PIL import Image

from tests.conftest import run_cli
from wsi_ssl.annotations import label_tiles
from wsi_ssl.errors import AnnotationError
from wsi_ssl.mask_images import MAX_MASK_PIXELS, area_fractions, read_mask


def _pixel_union(raster: np.ndarray, sx: float, sy: float) -> shapely.Geometry:
    rows, cols = np.nonzero(raster)
    boxes = shapely.box(cols * sx, rows * sy, (cols + 1) * sx, (rows + 1) * sy)
    return shapely.union_all(boxes)


def test_area_fractions_are_the_exact_covered_areas() -> None:
    rng = np.random.default_rng(3)
    raster = rng.random((23, 31)) < 0.4
    raster[:10, :10] = True  # the tile at (10, 10) lies inside
    sx, sy = 7.5, 5.0  # a mask pixel is not square in level-0 pixels
    coords = np.concatenate([[[10, 10]], rng.integers(-40, 260, size=(200, 2))])
    got = area_fractions(raster, coords, 37.0, (sx, sy))
    union = _pixel_union(raster, sx, sy)
    tiles = shapely.box(coords[:, 0], coords[:, 1], coords[:, 0] + 37.0, coords[:, 1] + 37.0)
    expected = shapely.area(shapely.intersection(tiles, union)) / 37.0**2
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert got[0] == 1.0 and (got == 0).any()
    assert ((got > 0) & (got < 1)).sum() > 50


def test_a_mask_and_its_polygon_give_the_same_labels(tmp_path: Path) -> None:
    """A tile inside the masked region reads 1.0, as with the same region drawn as a
    polygon (the touched-pixel count read 16/17 = 0.94 on the slide's 16 px grid)."""
    mask = np.zeros((297, 222), np.uint8)
    mask[51:154, 77:128] = 255
    Image.fromarray(mask).save(tmp_path / "binary.png")
    ring = [[770, 510], [1280, 510], [1280, 1540], [770, 1540], [770, 510]]
    feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}}
    (tmp_path / "same.geojson").write_text(json.dumps(feature))
    grid_shape, s = (186, 139), 16.0  # 2,224 x 2,976 level-0 px on a 16 px grid
    side = 224.45  # 224 px at 0.5 µm/px on a 0.499 µm/px scan: off the 16 px grid
    xs, ys = np.meshgrid(np.arange(17) * side / 2, np.arange(25) * side / 2)
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)
    on_mask = label_tiles(tmp_path / "binary.png", coords, side, grid_shape, s)
    on_polygon = label_tiles(tmp_path / "same.geojson", coords, side, grid_shape, s)
    # the mask's pixels are 2224/222 x 2976/297 level-0 px: the region is the polygon
    # to within a fraction of one of them
    np.testing.assert_allclose(on_mask.fractions[:, 0], on_polygon.fractions[:, 0], atol=0.03)
    inside = (coords[:, 0] >= 780) & (coords[:, 0] + side <= 1270)
    inside &= (coords[:, 1] >= 520) & (coords[:, 1] + side <= 1530)
    assert inside.sum() >= 8
    np.testing.assert_array_equal(on_mask.in_roi[inside], 1.0)
    assert (on_mask.in_roi >= 0.95).sum() == (on_polygon.in_roi >= 0.95).sum()


def test_a_tiff_mask_beyond_the_bound_is_read_every_kth_pixel(tmp_path: Path) -> None:
    h, w = 6000, 5000  # 30 Mpx: read with every 2nd pixel
    assert h * w > MAX_MASK_PIXELS
    labels = np.zeros((h, w), np.uint8)
    labels[1000:3000, 2000:4000] = 2
    labels[4000:5000, 100:900] = 5
    tifffile.imwrite(tmp_path / "big.tif", labels, tile=(512, 512), compression="zlib")
    got = read_mask(tmp_path / "big.tif")
    np.testing.assert_array_equal(got, labels[::2, ::2])
    np.save(tmp_path / "big.npy", labels)
    np.testing.assert_array_equal(read_mask(tmp_path / "big.npy"), labels[::2, ::2])


def test_tiff_masks_read_alike_at_any_size_and_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small and large TIFFs read the same values (a MINISWHITE mask meant the complement
    above 16 Mpx), an uncompressed one is memory-mapped, a PNG beyond the bound is reduced too,
    and a compressed TIFF stored as one huge strip is refused, not decoded whole."""
    from wsi_ssl import mask_images

    small = np.zeros((64, 96), np.uint8)
    small[10:30, 20:50] = 1
    tifffile.imwrite(tmp_path / "small.tif", small + 1, photometric="miniswhite")
    big = np.repeat(np.repeat(small, 80, axis=0), 80, axis=1)  # 5,120 x 7,680 px
    tifffile.imwrite(tmp_path / "big.tif", big + 1, photometric="miniswhite", tile=(512, 512))
    a, b = read_mask(tmp_path / "small.tif"), read_mask(tmp_path / "big.tif")
    assert set(np.unique(a)) == set(np.unique(b)) == {253, 254}  # as Pillow and viewers show it
    np.testing.assert_array_equal(b[::40, ::40], a)
    tifffile.imwrite(tmp_path / "plain.tif", big)  # uncompressed, one strip: memory-mapped
    np.testing.assert_array_equal(read_mask(tmp_path / "plain.tif"), big[::2, ::2])
    Image.fromarray(big * 255).save(tmp_path / "big.png")
    assert read_mask(tmp_path / "big.png").shape == (2560, 3840)
    tifffile.imwrite(tmp_path / "strip.tif", big, compression="zlib", rowsperstrip=big.shape[0])
    monkeypatch.setattr(mask_images, "MAX_CHUNK_BYTES", 1 << 20)  # the bound, made small
    with pytest.raises(AnnotationError, match="save it as a tiled TIFF"):
        read_mask(tmp_path / "strip.tif")


def test_a_png_mask_too_large_to_read_names_the_way_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.fromarray(np.zeros((300, 400), np.uint8)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # PIL's own bound, lowered
    with pytest.raises(AnnotationError, match=r"too large to read whole.*tiled TIFF") as err:
        read_mask(tmp_path / "huge.png")
    assert "huge.png" in str(err.value)


def test_a_full_resolution_tiff_mask_restricts_tiling(cmu_small: Path, tmp_path: Path) -> None:
    """A mask at the slide's full 8x size, beyond PIL's decompression-bomb bound, is read (it
    failed every slide, and with --roi-include stopped the batch as an unexpected error)."""
    from wsi_ssl.slide import open_slide

    with open_slide(cmu_small) as slide:
        w, h = slide.dimensions
    scale = 8
    region = (slice(h // 4 * scale, h // 2 * scale), slice(w // 4 * scale, w // 2 * scale))

    def tiles():
        for y in range(0, h * scale, 1024):
            for x in range(0, w * scale, 1024):
                block = np.zeros((1024, 1024), np.uint8)
                ys = np.arange(y, y + 1024)[:, None]
                xs = np.arange(x, x + 1024)[None, :]
                inside = (ys >= region[0].start) & (ys < region[0].stop)
                block[inside & (xs >= region[1].start) & (xs < region[1].stop)] = 255
                yield block

    path = tmp_path / "full.tif"
    tifffile.imwrite(
        path,
        tiles(),
        shape=(h * scale, w * scale),
        dtype=np.uint8,
        tile=(1024, 1024),
        compression="zlib",
    )
    assert h * w * scale**2 > 2 * Image.MAX_IMAGE_PIXELS
    out = tmp_path / "arch"
    roi = ["--roi", str(path), "--roi-include", "mask", "--roi-min-fraction", "1"]
    code, _, err = run_cli(["tile", str(cmu_small), "--out", str(out), *roi, "--quiet"])
    assert code == 0, err
    from wsi_ssl.storage import Archive

    store = Archive(out).slide(cmu_small.stem)
    coords, size = store.coords, store.tiling["tile_size_level0"]
    assert len(coords) > 0
    assert (coords[:, 0] >= w // 4 - 1).all() and (coords[:, 0] + size <= w // 2 + 1).all()
    assert (coords[:, 1] >= h // 4 - 1).all() and (coords[:, 1] + size <= h // 2 + 1).all()
