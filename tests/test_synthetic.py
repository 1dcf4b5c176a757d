"""The synthetic slide writer: both backends open its files at the right scale and content."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import tiffslide

from wsi_ssl.errors import ConfigError
from wsi_ssl.synthetic import tissue_mask_truth, write_synthetic_slide

SIZE = (2000, 1500)
SEED = 7


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_slide(tmp_path_factory.mktemp("synthetic") / "s.tiff", SIZE, seed=SEED)


def _levels(path: Path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tif:
        return [page.asarray() for page in tif.pages]


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    blocks = image[:h, :w].reshape(h // factor, factor, w // factor, factor, -1)
    return blocks.astype(np.float64).mean(axis=(1, 3))


def test_openslide_reads_pyramid_and_mpp(synthetic: Path) -> None:
    with openslide.OpenSlide(synthetic) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert slide.level_dimensions == ((2000, 1500), (1000, 750))
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.5)


def test_tiffslide_reads_pyramid_and_mpp(synthetic: Path) -> None:
    with tiffslide.TiffSlide(synthetic) as slide:
        assert slide.level_dimensions == ((2000, 1500), (1000, 750))
        assert slide.properties["tiffslide.mpp-x"] == pytest.approx(0.5)
        assert slide.properties["tiffslide.mpp-y"] == pytest.approx(0.5)


def test_backends_decode_identical_pixels(synthetic: Path) -> None:
    with openslide.OpenSlide(synthetic) as os_slide, tiffslide.TiffSlide(synthetic) as ts_slide:
        for level, (w, h) in enumerate(os_slide.level_dimensions):
            a = np.asarray(os_slide.read_region((0, 0), level, (w, h)))
            b = ts_slide.read_region((0, 0), level, (w, h), as_array=True)
            assert (a[..., 3] == 255).all()
            np.testing.assert_array_equal(a[..., :3], b)


def test_auto_levels_halve_until_below_1024(tmp_path: Path) -> None:
    path = write_synthetic_slide(tmp_path / "s.tiff", (4100, 900), tissue=False)
    with tiffslide.TiffSlide(path) as slide:
        assert slide.level_dimensions == ((4100, 900), (2050, 450), (1025, 225), (513, 113))


def test_explicit_levels_and_tile(tmp_path: Path) -> None:
    path = write_synthetic_slide(tmp_path / "s.tiff", (600, 500), n_levels=3, tile=128)
    with openslide.OpenSlide(path) as slide:
        assert slide.level_dimensions == ((600, 500), (300, 250), (150, 125))
        assert slide.properties["openslide.level[0].tile-width"] == "128"


def test_no_mpp_writes_no_usable_resolution(tmp_path: Path) -> None:
    path = write_synthetic_slide(tmp_path / "s.tiff", (512, 512), mpp=None)
    with openslide.OpenSlide(path) as slide:
        assert "openslide.mpp-x" not in slide.properties
        assert slide.properties["tiff.ResolutionUnit"] == "none"
    with tiffslide.TiffSlide(path) as slide:
        assert slide.properties["tiffslide.mpp-x"] is None


def test_other_mpp_is_reported(tmp_path: Path) -> None:
    path = write_synthetic_slide(tmp_path / "s.tiff", (512, 512), mpp=0.25)
    with openslide.OpenSlide(path) as slide:
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)


def test_tissue_where_truth_says_and_glass_elsewhere(synthetic: Path) -> None:
    level0 = _levels(synthetic)[0]
    truth = tissue_mask_truth(SIZE, SEED)
    assert truth.shape == (1500, 2000)
    assert 0.03 < truth.mean() < 0.6
    means = _block_mean(level0, 20)
    fraction = _block_mean(truth[..., None], 20)[..., 0]
    # Blocks wholly inside the blobs are pink/purple: darker, green well below red.
    tissue = means[fraction == 1]
    assert len(tissue) > 100
    assert np.median(tissue.mean(axis=1)) < 215
    assert np.median(tissue[:, 0] - tissue[:, 1]) > 25
    # Blocks wholly outside are near-white grey glass with slight noise.
    glass = means[fraction == 0]
    assert np.all(glass.mean(axis=1) > 235)
    assert np.all(np.ptp(glass, axis=1) < 5)
    assert 0.3 < level0[~truth].std() < 4


def test_tissue_has_nuclei_at_level0(synthetic: Path) -> None:
    level0 = _levels(synthetic)[0]
    truth = tissue_mask_truth(SIZE, SEED, scale=1)
    dark = level0.astype(np.int32).sum(axis=2) < 420  # purple nuclei; stroma is lighter
    assert 0.02 < dark[truth].mean() < 0.4
    assert dark[~truth].mean() == 0


def test_levels_agree_visually(synthetic: Path) -> None:
    level0, level1 = _levels(synthetic)
    coarse0 = _block_mean(level0, 32)
    coarse1 = _block_mean(level1, 16)
    assert np.abs(coarse0 - coarse1).mean() < 6


def test_truth_scales_consistently() -> None:
    """Mask pixels sample block centres: scale 3 and scale 9 agree where centres coincide."""
    fine = tissue_mask_truth(SIZE, SEED, scale=3)
    coarse = tissue_mask_truth(SIZE, SEED, scale=9)
    assert fine.shape == (500, 667)
    assert coarse.shape == (167, 223)
    np.testing.assert_array_equal(fine[1::3, 1::3], coarse[:167, :222])
    assert abs(fine.mean() - coarse.mean()) < 0.01


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = write_synthetic_slide(tmp_path / "a.tiff", (700, 600), seed=3)
    b = write_synthetic_slide(tmp_path / "b.tiff", (700, 600), seed=3)
    c = write_synthetic_slide(tmp_path / "c.tiff", (700, 600), seed=4)
    for x, y in zip(_levels(a), _levels(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(_levels(a)[0], _levels(c)[0])
    assert not np.array_equal(tissue_mask_truth((700, 600), 3), tissue_mask_truth((700, 600), 4))


def test_blank_slide_is_all_glass(tmp_path: Path) -> None:
    path = write_synthetic_slide(tmp_path / "s.tiff", (600, 400), tissue=False)
    level0 = _levels(path)[0]
    assert level0.min() > 225


def test_zlib_is_lossless_and_same_field_as_jpeg(tmp_path: Path) -> None:
    lossless = write_synthetic_slide(tmp_path / "z.tiff", (800, 600), compression="zlib", seed=2)
    lossy = write_synthetic_slide(tmp_path / "j.tiff", (800, 600), seed=2)
    with tifffile.TiffFile(lossless) as tif:
        assert tif.pages.first.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
    diff = np.abs(_levels(lossless)[0].astype(np.int32) - _levels(lossy)[0])
    assert diff.mean() < 3


def test_pen_mark_is_green_and_outside_tissue(tmp_path: Path) -> None:
    size = (1600, 1200)
    plain = _levels(write_synthetic_slide(tmp_path / "a.tiff", size, seed=1))[0].astype(np.int32)
    pen = _levels(write_synthetic_slide(tmp_path / "b.tiff", size, seed=1, pen_mark=True))[0]
    inked = np.abs(pen.astype(np.int32) - plain).sum(axis=2) > 250
    assert inked.mean() > 0.005
    r, g, b = pen[inked].astype(np.int32).T
    assert np.all(g > r) and np.all(g > b)
    assert np.median(g - r) > 50 and np.median(g - b) > 50
    assert not (inked & tissue_mask_truth(size, 1)).any()


def test_lesion_crowds_nuclei_in_one_place_and_changes_nothing_else(tmp_path: Path) -> None:
    size = (2000, 1500)
    plain = _levels(write_synthetic_slide(tmp_path / "a.tiff", size, seed=3, compression="zlib"))
    lesion = _levels(
        write_synthetic_slide(tmp_path / "b.tiff", size, seed=3, compression="zlib", lesion=True)
    )
    changed = np.abs(lesion[0].astype(np.int32) - plain[0]).sum(axis=2) > 0
    truth = tissue_mask_truth(size, 3, scale=1)
    assert changed.sum() > 0.02 * truth.sum() and not (changed & ~truth).any()  # in the tissue
    ys, xs = np.nonzero(changed)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    assert changed[box].mean() > 0.1  # one compact region of nuclei, not scattered pixels
    dark = [level[box].astype(np.int32).sum(axis=2) < 420 for level in (plain[0], lesion[0])]
    assert dark[1][truth[box]].mean() > 1.5 * dark[0][truth[box]].mean()  # crowded nuclei
    coarse = np.abs(lesion[-1].astype(np.int32) - plain[-1]).sum(axis=2) > 30
    assert coarse.any()  # the lower levels show it too


@pytest.mark.slow
def test_large_slide_has_small_tissue(tmp_path: Path) -> None:
    """Blob sizes are capped, so a large slide is mostly glass (cheap to render)."""
    path = write_synthetic_slide(tmp_path / "s.tiff", (12000, 9000))
    with tiffslide.TiffSlide(path) as slide:
        assert slide.level_dimensions[0] == (12000, 9000)
        assert slide.level_dimensions[-1] == (750, 563)
        thumbnail = slide.read_region((0, 0), slide.level_count - 1, (750, 563), as_array=True)
    truth = tissue_mask_truth((12000, 9000), 0, scale=16)
    assert thumbnail[truth].mean() < thumbnail[~truth].mean() - 20
    assert 0.005 < truth.mean() < 0.2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": (0, 10)}, "size"),
        ({"tile": 100}, "tile"),
        ({"compression": "lzw"}, "jpeg, zlib"),
        ({"mpp": 0.0}, "mpp"),
        ({"n_levels": 0}, "n_levels"),
    ],
)
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        write_synthetic_slide(tmp_path / "s.tiff", **kwargs)  # type: ignore[arg-type]
