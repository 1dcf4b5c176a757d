"""Tile QC: scores on real labelled tiles and synthetic blur, scores stored by tiling a real
slide, the pass mask consumers use, and the overlay pictures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image, ImageFilter
from scipy import ndimage as ndi

from wsi_ssl.cli.main import main
from wsi_ssl.config import TilingConfig
from wsi_ssl.errors import ConfigError
from wsi_ssl.storage import Archive, SlideStore
from wsi_ssl.storage.embeddings import embedding_ids, read_embeddings
from wsi_ssl.synthetic import write_synthetic_slide
from wsi_ssl.tiling.batch import tile_slide
from wsi_ssl.tiling.qc import (
    QC_METRICS,
    chunk_scores,
    kept_tiles,
    qc_overlay,
    qc_pass,
    save_overlays,
    tile_scores,
    tissue_overlay,
)

DEFAULTS = TilingConfig()
LIMITS = {
    "min_focus": DEFAULTS.qc_min_focus,
    "max_pen": DEFAULTS.qc_max_pen,
    "min_tissue": DEFAULTS.qc_min_tissue,
    "max_dark": DEFAULTS.qc_max_dark,
}
# histolab tiles at about 0.5 µm/px (level 0 of 20x scans), the scale tiles are cut at
CLEAN_TISSUE = [
    "tissue-level0-4302-10273-4814-10785.png",
    "tissue-level0-7352-11762-7864-12274.png",
    "high-nuclei-score-level0.png",
    "medium-nuclei-score-level0.png",
    "low-nuclei-score-level0.png",
    "very-low-nuclei-score-level0.png",
]
INK = [
    "no-tissue-red-pen.png",
    "no-tissue-green-pen.png",
    "medium-nuclei-score-green-pen-level1.png",
    "very-low-nuclei-score-red-pen-level1.png",
]
EMPTY = ["almost-white-1.png", "almost-white-2.png", "no-tissue.png", "no-tissue2.png"]


def _rgb(patches_dir: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(patches_dir / name).convert("RGB"))


def _scores(image: np.ndarray) -> dict[str, float]:
    return {k: float(v[0]) for k, v in tile_scores([image]).items()}


@pytest.mark.parametrize("name", CLEAN_TISSUE)
def test_clean_tissue_passes_and_blur_is_flagged(patches_dir: Path, name: str) -> None:
    image = _rgb(patches_dir, name)
    sharp = tile_scores([image])
    assert set(sharp) == set(QC_METRICS) and all(v.dtype == np.float32 for v in sharp.values())
    assert qc_pass(sharp, **LIMITS).all(), _scores(image)
    blurred = ndi.gaussian_filter(image, sigma=(2, 2, 0))  # a tile out of focus
    soft = _scores(blurred)
    assert soft["focus"] < DEFAULTS.qc_min_focus and soft["focus"] < sharp["focus"][0] / 5
    assert not qc_pass(tile_scores([blurred]), **LIMITS).any()
    # blur changes neither the colours' verdicts much nor the tissue
    assert abs(soft["tissue"] - float(sharp["tissue"][0])) < 0.1


@pytest.mark.parametrize("name", INK)
def test_ink_is_flagged(patches_dir: Path, name: str) -> None:
    scores = _scores(_rgb(patches_dir, name))
    assert scores["pen"] > DEFAULTS.qc_max_pen, scores
    # the ink is what flags them: without the pen limit, the tissue tiles would pass
    if "nuclei" in name:
        assert qc_pass(tile_scores([_rgb(patches_dir, name)]), **{**LIMITS, "max_pen": 1.0})


@pytest.mark.parametrize("name", EMPTY)
def test_glass_is_flagged(patches_dir: Path, name: str) -> None:
    scores = _scores(_rgb(patches_dir, name))
    assert scores["tissue"] < DEFAULTS.qc_min_tissue and scores["pen"] < 0.001, scores


def test_dark_fold_is_flagged(patches_dir: Path) -> None:
    """A fold lays tissue on tissue: transmittance multiplies (T**2 for two layers). On dense
    tissue a two-layer fold is mostly near-black and flagged; a single layer never is. The
    score is a darkness proxy: a fold of sparse tissue stays under the default limit."""
    for name in CLEAN_TISSUE:
        image = _rgb(patches_dir, name)
        folded = ((image / 255.0) ** 2 * 255).astype(np.uint8)
        flat, fold = _scores(image)["dark"], _scores(folded)["dark"]
        assert flat < 0.05 and (fold > 5 * flat or fold == flat == 0.0), name
    dense = _rgb(patches_dir, "high-nuclei-score-level0.png")
    folded = ((dense / 255.0) ** 2 * 255).astype(np.uint8)
    assert _scores(folded)["dark"] > DEFAULTS.qc_max_dark
    assert not qc_pass(tile_scores([folded]), **LIMITS).any()


def test_scores_of_uniform_tiles_by_hand() -> None:
    white = np.full((64, 64, 3), 255, np.uint8)
    black = np.zeros((64, 64, 3), np.uint8)
    green = np.full((64, 64, 3), (40, 160, 90), np.uint8)  # green marker
    pink = np.full((64, 64, 3), (220, 150, 190), np.uint8)
    s = tile_scores([white, black, green, pink])
    np.testing.assert_array_equal(s["focus"], 0.0)
    np.testing.assert_array_equal(s["dark"], [0, 1, 0, 0])
    np.testing.assert_array_equal(s["pen"], [0, 0, 1, 0])
    np.testing.assert_array_equal(s["tissue"], [0, 0, 0, 1])
    assert all(v.shape == (0,) for v in tile_scores([]).values())


def test_focus_equals_the_float64_laplacian_variance(patches_dir: Path) -> None:
    """The int16 / BLAS focus is the textbook figure (float64, every second pixel of green)
    within 1e-5 relative on real tiles, blank glass and blur included."""
    names = CLEAN_TISSUE + INK + EMPTY
    images = [_rgb(patches_dir, name) for name in names]
    images.append(np.asarray(Image.fromarray(images[0]).filter(ImageFilter.GaussianBlur(4))))
    got = tile_scores(images)["focus"]
    for image, value in zip(images, got, strict=True):
        green = image[::2, ::2, 1].astype(np.float64)
        lap = 4 * green[1:-1, 1:-1] - green[:-2, 1:-1] - green[2:, 1:-1]
        lap -= green[1:-1, :-2] + green[1:-1, 2:]
        assert value == pytest.approx(lap.var(), rel=1e-5, abs=1e-3)


@pytest.fixture(scope="module")
def cmu_store(cmu_small: Path, tmp_path_factory: pytest.TempPathFactory) -> SlideStore:
    root = tmp_path_factory.mktemp("qc")
    config = TilingConfig(codec="zstd", tile_size=224, tiles_per_chunk=16)
    tile_slide(cmu_small, root, config)
    (slide_id,) = Archive(root).slide_ids  # one slide tiled
    return Archive(root).slide(slide_id)


def test_tiling_stores_the_scores_of_the_written_tiles(cmu_store: SlideStore) -> None:
    """zstd is lossless: the stored scores are those of the stored pixels, row for row."""
    qc = cmu_store.qc()
    assert sorted(qc) == sorted(QC_METRICS)
    n = cmu_store.n_tiles
    assert all(v.shape == (n,) and v.dtype == np.float32 for v in qc.values())
    expected = tile_scores(list(cmu_store.tiles[:]))
    for metric in QC_METRICS:
        np.testing.assert_array_equal(qc[metric], expected[metric])
    # a clean H&E section: the only flagged tiles carry the teal tissue-marking dye at its
    # edge (> 10 % of their pixels, seen on the tiles), nothing else
    flagged = ~kept_tiles(cmu_store)
    assert flagged.mean() <= 0.05
    assert (qc["pen"][flagged] > DEFAULTS.qc_max_pen).all()


@pytest.mark.slow
def test_jpeg_stores_score_what_they_hold(tmp_path: Path) -> None:
    """Tiles copied from the slide as JPEG streams are scored from those very bytes (equal to
    re-scoring the stored tiles); re-encoded edge tiles were scored before encoding (JPEG
    removes some fine detail, so their focus reads a little higher than the stored pixels')."""
    slide = write_synthetic_slide(tmp_path / "s.tiff", (2000, 1500), seed=3)
    tile_slide(slide, tmp_path / "root", TilingConfig(tissue_threshold=0.0))
    (slide_id,) = Archive(tmp_path / "root").slide_ids
    store = Archive(tmp_path / "root").slide(slide_id)
    qc, again = store.qc(), tile_scores(list(store.tiles[:]))
    x, y = store.coords.T
    copied = (x + 256 <= 2000) & (y + 256 <= 1500)  # whole stored tiles of the file
    assert copied.sum() == 35
    for metric in QC_METRICS:
        np.testing.assert_array_equal(qc[metric][copied], again[metric][copied])
    edge = ~copied
    np.testing.assert_allclose(qc["focus"][edge], again["focus"][edge], rtol=0.35)
    np.testing.assert_allclose(qc["tissue"][edge], again["tissue"][edge], atol=0.02)


def test_kept_tiles_thresholds(cmu_store: SlideStore, tmp_path: Path) -> None:
    focus = cmu_store.qc()["focus"]
    median = float(np.median(focus))
    kept = kept_tiles(cmu_store, qc_min_focus=median)
    np.testing.assert_array_equal(kept, (focus >= median) & kept_tiles(cmu_store))
    assert 0 < kept.sum() < cmu_store.n_tiles
    assert not kept_tiles(cmu_store, qc_min_tissue=1.0).any()
    with pytest.raises(ConfigError, match=r"unknown QC threshold.*qc_min_focus"):
        kept_tiles(cmu_store, min_focus=1.0)
    # a slide's name where its store goes: said how to get one (an AttributeError before)
    for call in (kept_tiles, lambda s: save_overlays(s, tmp_path / "plots")):
        with pytest.raises(ConfigError, match=r"takes a slide store, open_store\(ROOT\)"):
            call("CMU-1-Small-Region.svs")  # type: ignore[arg-type]
    # a store tiled before QC keeps every tile
    copy = tmp_path / "old.zarr"
    shutil.copytree(cmu_store.path, copy)
    shutil.rmtree(copy / "qc")
    old = SlideStore.open(copy)
    assert old.qc() == {} and kept_tiles(old).all()


def test_overlay_pictures(cmu_store: SlideStore, tmp_path: Path) -> None:
    picture = qc_overlay(cmu_store)
    thumb = cmu_store.thumbnail
    zoom = picture.shape[1] // thumb.shape[1]
    assert picture.shape == (thumb.shape[0] * zoom, thumb.shape[1] * zoom, 3) and zoom >= 2
    # every tile passes: blue tint, no red; flag them all by focus: red everywhere they are
    x, y = (
        cmu_store.coords[0] / (cmu_store.source["dimensions"][0] / thumb.shape[1]) * zoom
    ).astype(int) + 2
    assert picture[y, x, 2] > picture[y, x, 0]
    flagged = qc_overlay(cmu_store, qc_min_focus=1e9)
    assert flagged[y, x, 0] > flagged[y, x, 2]
    tissue = tissue_overlay(cmu_store)
    assert tissue.shape == picture.shape
    red = (tissue == [255, 0, 0]).all(axis=-1)
    assert 0 < red.mean() < 0.02  # a little dropped tissue (the strand's tip), no more
    paths = save_overlays(cmu_store, tmp_path / "plots")
    for path in paths:
        assert path.is_file() and Image.open(path).size == (picture.shape[1], picture.shape[0])


def test_the_tissue_picture_of_a_roi_slide(cmu_small: Path, tmp_path: Path) -> None:
    """Tissue outside the ROI is greyed, not red like tissue dropped (it was not asked for),
    and the region is outlined; once the annotation file changes the picture shows no ROI."""
    import shapely
    from shapely.geometry import box

    from wsi_ssl.tissue.overlay import DROPPED, OUTSIDE_ROI, ROI_OUTLINE

    roi = tmp_path / "half.geojson"
    feature = {"type": "Feature", "geometry": shapely.geometry.mapping(box(0, 0, 1100, 3000))}
    roi.write_text(json.dumps(feature))
    result = tile_slide(cmu_small, tmp_path / "root", TilingConfig(tile_size=224, roi=str(roi)))
    store = Archive(tmp_path / "root").slide(result.details["slide_id"])
    picture = tissue_overlay(store)
    zoom = picture.shape[1] // store.thumbnail.shape[1]
    per_px = store.source["dimensions"][0] / store.thumbnail.shape[1] / zoom
    x_edge = int(1100 / per_px)

    def share(colour: tuple[int, int, int], columns: slice) -> float:
        return float((picture[:, columns] == colour).all(axis=-1).mean())

    right = slice(x_edge + 2 * zoom, None)
    assert share(OUTSIDE_ROI, right) > 0.05 and share(DROPPED, right) == 0.0
    assert share(OUTSIDE_ROI, slice(0, x_edge - 2 * zoom)) == 0.0
    band = picture[:, x_edge - 2 * zoom : x_edge + 2 * zoom]  # the region's edge: outlined
    assert (band == ROI_OUTLINE).all(axis=-1).any(axis=1).mean() > 0.95
    roi.write_text(json.dumps({**feature, "properties": {"name": "edited"}}))
    plain = tissue_overlay(store)
    assert not (plain == ROI_OUTLINE).all(axis=-1).any()
    assert (plain[:, right] == DROPPED).all(axis=-1).mean() > 0.05


@pytest.mark.parametrize("through", ["api", "cli"])
def test_qc_off_writes_no_scores(tmp_path: Path, through: str) -> None:
    slide = write_synthetic_slide(tmp_path / "s.tiff", (768, 512), seed=1)
    if through == "api":
        tile_slide(slide, tmp_path / "root", TilingConfig(qc=False, tissue_threshold=0.0))
    else:
        argv = ["tile", str(slide), "--out", str(tmp_path / "root"), "--no-qc", "--quiet"]
        assert main([*argv, "--tissue-threshold", "0"]) == 0
    (slide_id,) = Archive(tmp_path / "root").slide_ids
    store = Archive(tmp_path / "root").slide(slide_id)
    assert not (store.path / "qc").exists() and store.qc() == {}
    assert kept_tiles(store).all() and store.n_tiles == 6
    assert store.tiling["qc"] is False
    # thresholds of no QC change nothing: skipped, not re-tiled (it re-read the whole slide)
    stamp = (store.path / "zarr.json").stat().st_mtime_ns
    argv = ["tile", str(slide), "--out", str(tmp_path / "root"), "--no-qc", "--json"]
    code, out, _ = run_cli([*argv, "--tissue-threshold", "0", "--qc-min-focus", "5000"])
    [outcome] = json.loads(out)["slides"]
    assert code == 0 and outcome["status"] == "skipped" and "retiled_because" not in outcome
    assert (store.path / "zarr.json").stat().st_mtime_ns == stamp


def test_new_thresholds_reflag_the_stored_tiles_in_place(tmp_path: Path) -> None:
    """Tiling again with other QC thresholds keeps the tiles and their vectors and records the
    thresholds in the store (and the catalog); ``embed --skip-flagged-tiles`` then encodes
    only the tiles they newly keep."""
    slide = write_synthetic_slide(tmp_path / "s.tiff", (1400, 1100), seed=2)
    root = tmp_path / "root"
    tile = ["tile", str(slide), "--out", str(root), "--tile-size", "224", "--quiet", "--json"]
    embed = ["embed", str(root), "--encoder", "random-cnn", "--quiet", "--workers", "0"]
    assert run_cli(tile)[0] == 0
    archive = Archive(root)
    (slide_id,) = archive.slide_ids
    store = archive.slide(slide_id)
    focus = store.qc()["focus"]
    strict = float(np.median(focus))
    shard_stamps = sorted((f.name, f.stat().st_mtime_ns) for f in (store.path / "tiles").rglob("*"))
    code, out, err = run_cli([*tile, "--qc-min-focus", str(strict)])
    [outcome] = json.loads(out)["slides"]
    assert code == 0 and outcome["status"] == "skipped", err
    assert outcome["qc_thresholds_updated"] == f"qc_min_focus 200.0 -> {strict!r}"
    store = archive.slide(slide_id)
    assert store.tiling["qc_min_focus"] == strict
    assert archive.catalog.get(slide_id).tiling["qc_min_focus"] == strict
    strict_kept = qc_pass(store.qc(), **{**LIMITS, "min_focus": strict})
    np.testing.assert_array_equal(kept_tiles(store), strict_kept)
    assert 0 < strict_kept.sum() < store.n_tiles
    assert (
        sorted((f.name, f.stat().st_mtime_ns) for f in (store.path / "tiles").rglob("*"))
        == shard_stamps
    )

    assert run_cli([*embed, "--skip-flagged-tiles"])[0] == 0
    (encoder_id,) = embedding_ids(store)
    first = read_embeddings(store, encoder_id).features
    np.testing.assert_array_equal(np.isfinite(first).all(axis=1), strict_kept)

    code, out, _ = run_cli([*tile, "--qc-min-focus", "0"])  # looser: more tiles kept
    assert json.loads(out)["slides"][0]["status"] == "skipped" and code == 0
    loose_kept = kept_tiles(archive.slide(slide_id))
    assert loose_kept.sum() > strict_kept.sum()
    code, out, _ = run_cli([*embed, "--skip-flagged-tiles", "--json"])
    [embedded] = json.loads(out)["slides"]
    assert code == 0 and embedded["status"] == "complete", out
    second = read_embeddings(archive.slide(slide_id), encoder_id).features
    np.testing.assert_array_equal(np.isfinite(second).all(axis=1), loose_kept)
    np.testing.assert_array_equal(second[strict_kept], first[strict_kept])  # kept, not redone


def test_scores_of_a_chunk_of_copied_and_decoded_tiles(cmu_store: SlideStore) -> None:
    """A task's tiles, JPEG streams and arrays mixed, score as their decoded pixels do; the
    reused buffer carries nothing from one chunk into the next."""
    import imagecodecs

    tiles = list(cmu_store.tiles[:6])
    streams = [imagecodecs.jpeg8_encode(t, level=90) for t in tiles[:3]]
    pixels = [imagecodecs.jpeg8_decode(s) for s in streams] + tiles[3:]
    expected = tile_scores(pixels)
    size = tiles[0].shape[0]
    chunk_scores(list(cmu_store.tiles[6:14]), size)  # a larger chunk first
    got = chunk_scores([*streams, *tiles[3:]], size)
    for metric in QC_METRICS:
        np.testing.assert_array_equal(got[metric], expected[metric])
