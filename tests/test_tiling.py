"""Tiling end to end: real fixture slides and generated pyramidal TIFFs into real Zarr stores."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import run_cli

import wsi_ssl
from wsi_ssl.cli.main import main as cli_main
from wsi_ssl.config import TilingConfig
from wsi_ssl.errors import (
    ConfigError,
    CorruptSlideError,
    DiskFullError,
    MissingMppError,
    NoTissueError,
    SlideNotFoundError,
    StoreIncompleteError,
    UnsupportedSlideError,
)
from wsi_ssl.serve.pyramid import open_slide_file
from wsi_ssl.slide import open_slide
from wsi_ssl.storage import SlideStore, open_store
from wsi_ssl.synthetic import write_synthetic_slide
from wsi_ssl.testing.tiles import read_tiles
from wsi_ssl.tiling.batch import tile_slide, tile_slides
from wsi_ssl.tiling.extract import stored_positions
from wsi_ssl.tiling.grid import TileGrid

LOSSLESS = TilingConfig(codec="zstd")


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2000 x 1500 synthetic slide at 0.5 µm/px whose size is not a multiple of the tile."""
    return write_synthetic_slide(tmp_path_factory.mktemp("synth") / "s.tiff", (2000, 1500), seed=3)


@pytest.fixture(scope="module")
def cmu_root(tmp_path_factory: pytest.TempPathFactory, cmu_small: Path) -> Path:
    root = tmp_path_factory.mktemp("cmu")
    tile_slide(cmu_small, root, LOSSLESS)
    return root


def test_config_validates() -> None:
    with pytest.raises(ConfigError, match="codec must be one of jpeg, zstd"):
        TilingConfig(codec="png")
    with pytest.raises(ConfigError, match="overlap"):
        TilingConfig(overlap=256)
    # each field's type, named (tile_size=128.0 failed inside Zarr, mpp="0.5" as a TypeError)
    for wrong, message in (
        ({"tile_size": 128.0}, r"tile_size must be a whole number; got 128\.0 \(float\)"),
        ({"mpp": "0.5"}, r"mpp must be a number; got '0\.5' \(str\)"),
        ({"qc": 1}, r"qc must be True or False; got 1 \(int\)"),
        ({"jpeg_quality": True}, r"jpeg_quality must be a whole number; got True"),
    ):
        with pytest.raises(ConfigError, match=message):
            TilingConfig(**wrong)
    numpy = TilingConfig(tile_size=np.int64(128), mpp=np.float32(1), mpp_override=None)
    assert numpy.to_dict()["tile_size"] == 128 and type(numpy.tile_size) is int
    assert type(numpy.mpp) is float and TilingConfig(roi=Path("a.geojson")).roi == "a.geojson"
    assert TilingConfig(qc=np.bool_(False)).qc is False
    assert TilingConfig(roi="a.geojson", roi_include="Tumour").roi_include == ("Tumour",)


def test_cmu_store_contract(cmu_root: Path, cmu_small: Path) -> None:
    archive = open_store(cmu_root)
    [slide_id] = archive.slide_ids
    store = archive.slide(slide_id)
    attrs = store.attrs
    assert attrs["status"] == "complete"
    assert attrs["schema_version"] == 1
    src = attrs["source"]
    assert src["dimensions"] == [2220, 2967]
    assert src["mpp"] == pytest.approx(0.499, abs=1e-3)
    assert src["mpp_source"] == "vendor"
    assert src["path"] == str(cmu_small.resolve())
    tiling = attrs["tiling"]
    assert tiling["mpp"] == 0.5 and tiling["tile_size"] == 256 and tiling["level"] == 0
    # 0.499 vs 0.5 is within the snap tolerance: native pixels, no resampling
    assert tiling["resize"] is False and tiling["tile_size_level0"] == 256
    n = store.n_tiles
    assert 20 < n < 9 * 12  # tissue covers part of the 9 x 12 grid
    assert store.tiles.shape == (n, 256, 256, 3) and store.tiles.dtype == np.uint8
    assert store.tiles.shards == (64, 256, 256, 3) and store.tiles.chunks == (1, 256, 256, 3)
    coords = store.coords
    assert coords.shape == (n, 2) and coords.dtype == np.int64
    assert (coords % 256 == 0).all()
    order = np.lexsort((coords[:, 0], coords[:, 1]))
    assert (order == np.arange(n)).all(), "tiles are stored row-major"
    thumb, mask = store.thumbnail, store.tissue_mask
    assert thumb.shape[:2] == mask.shape and mask.dtype == bool and thumb.shape[2] == 3
    assert (store.tissue_fraction >= store.tiling["tissue_threshold"]).all()
    entry = archive.catalog.get(slide_id)
    assert entry is not None and entry.status == "complete" and entry.n_tiles == n


def test_tiles_equal_direct_reads(cmu_root: Path, cmu_small: Path) -> None:
    """Lossless tiles are exactly the pixels the reader returns for each tile's box."""
    store = open_store(cmu_root).slide(open_store(cmu_root).slide_ids[0])
    with open_slide(cmu_small) as reader:
        for i in (0, store.n_tiles // 2, store.n_tiles - 1):
            x, y = store.coords[i]
            expected = reader.read_region((int(x), int(y)), 0, (256, 256))
            np.testing.assert_array_equal(store.tiles[i], expected)


def test_numpy_and_dask_views_agree(cmu_root: Path) -> None:
    archive = open_store(cmu_root)
    slide_id = archive.slide_ids[0]
    lazy = archive.tiles_dask(slide_id)
    assert lazy.chunks[0][0] == min(64, lazy.shape[0])
    np.testing.assert_array_equal(lazy[3:70].compute(), archive.tiles(slide_id)[3:70])


def test_plot_tiles_draws_tiles(cmu_root: Path, tmp_path: Path) -> None:
    from PIL import Image

    archive = open_store(cmu_root)
    out = archive.plot_tiles(archive.slide_ids[0], tmp_path / "tiles.png")
    image = np.asarray(Image.open(out))
    thumb = archive.thumbnail(archive.slide_ids[0])
    zoom = image.shape[0] // thumb.shape[0]
    assert zoom >= 1 and image.shape[:2] == (thumb.shape[0] * zoom, thumb.shape[1] * zoom)
    outline = (image[..., 0] == 20) & (image[..., 1] == 60) & (image[..., 2] == 200)
    assert outline.sum() > 100


def test_edge_tiles_are_padded_white(tmp_path: Path, synth: Path) -> None:
    config = TilingConfig(codec="zstd", tissue_threshold=0.0)
    result = tile_slide(synth, tmp_path, config)
    store = open_store(tmp_path).slide(result.details["slide_id"])
    assert store.n_tiles == 8 * 6  # ceil(2000/256) x ceil(1500/256), nothing dropped
    coords = store.coords
    last = int(np.argmax(coords[:, 0] + coords[:, 1] * 10_000))
    assert tuple(coords[last]) == (1792, 1280)
    tile = store.tiles[last]
    assert (tile[:, 2000 - 1792 :] == 255).all() and (tile[1500 - 1280 :, :] == 255).all()


def test_resampled_scale(tmp_path: Path, synth: Path) -> None:
    """At 1.0 µm/px a 0.5 µm/px slide is read at a finer level and resampled once."""
    config = TilingConfig(mpp=1.0, tile_size=128, codec="zstd", tissue_threshold=0.0)
    with open_slide(synth) as reader:
        grid = TileGrid.for_slide(reader, reader.require_mpp(), config)
        assert reader.level_downsamples[grid.level] <= 2.0 * 1.02
    result = tile_slide(synth, tmp_path, config)
    store = open_store(tmp_path).slide(result.details["slide_id"])
    assert store.n_tiles == 8 * 6
    assert store.tiling["tile_size_level0"] == pytest.approx(256)
    with open_slide(synth) as reader:
        full = reader.read_region((0, 0), 0, (512, 512)).astype(np.float32)
    expected = full.reshape(128, 4, 128, 4, 3).mean(axis=(1, 3))
    # the tile covering (0, 0)..(512, 512) at level 0 is tiles[0:2, 0:2] of the 1 µm grid
    assert np.abs(store.tiles[0].astype(np.float32) - expected[:128, :128]).mean() < 6


def test_whole_factor_resampling_is_an_exact_box_average(tmp_path: Path) -> None:
    """Shrinking by exactly 2 averages each 2 x 2 block of the finer level."""
    slide = write_synthetic_slide(tmp_path / "one.tiff", (2000, 1500), seed=3, n_levels=1)
    with open_slide(slide) as reader:
        grid = TileGrid.for_slide(reader, reader.require_mpp(), TilingConfig(mpp=1.0))
        assert grid.resize and grid.level == 0
        tiles = read_tiles(reader, grid, grid.all_coords()[:3])
        full = reader.read_region((0, 0), 0, (1536, 512)).astype(np.float64)
    blocks = full.reshape(256, 2, 768, 2, 3).mean(axis=(1, 3))
    for i in range(3):
        expected = blocks[:, i * 256 : (i + 1) * 256]
        assert np.abs(tiles[i] - expected).max() <= 0.5 + 1e-9  # rounding only


def test_non_integer_downsamples_boxes(tmp_path: Path, slides_dir: Path) -> None:
    boxes = slides_dir / "boxes.tiff"
    with pytest.raises(MissingMppError, match=r"mpp_override=MPP, .*mpp_overrides=\{name: MPP\}"):
        tile_slide(boxes, tmp_path, TilingConfig())  # the Python names (it said mpp_csv=FILE)
    # boxes.tiff at 1 µm/px "per pixel"; ask for 4x coarser: its 4.016 level snaps
    config = TilingConfig(
        mpp=4.0, tile_size=16, mpp_override=1.0, tissue_threshold=0.0, codec="zstd"
    )
    result = tile_slide(boxes, tmp_path, config)
    store = open_store(tmp_path).slide(result.details["slide_id"])
    assert store.source["mpp_source"] == "override"
    assert store.tiling["level"] == 2
    assert store.tiling["level_downsample"] == pytest.approx(4.016, abs=1e-3)
    assert store.tiling["tile_size_level0"] == pytest.approx(16 * 4.016, abs=0.01)
    assert store.n_tiles == int(np.ceil(300 / (16 * 4.016))) * int(np.ceil(250 / (16 * 4.016)))


def test_slide_smaller_than_a_tile(tmp_path: Path, slides_dir: Path) -> None:
    result = tile_slide(
        slides_dir / "small.svs", tmp_path, TilingConfig(tissue_threshold=0.0, codec="zstd")
    )
    store = open_store(tmp_path).slide(result.details["slide_id"])
    assert store.n_tiles == 1
    tile = store.tiles[0]
    assert (tile[16:, :] == 255).all() and (tile[:, 16:] == 255).all()
    assert tile[:16, :16].std() > 0


def test_generated_slide_smaller_than_a_tile(tmp_path: Path) -> None:
    """A 200 x 150 px pyramid (one 256 px stored tile, part of it padding): one tile, the
    slide's pixels in its corner and white beyond, never the file's padding bytes."""
    slide = write_synthetic_slide(tmp_path / "tiny.tiff", (200, 150), seed=4, n_levels=1)
    config = TilingConfig(tissue_threshold=0.0)
    result = tile_slide(slide, tmp_path / "root", config)
    store = open_store(tmp_path / "root").slide(result.details["slide_id"])
    assert store.n_tiles == 1 and store.coords.tolist() == [[0, 0]]
    tile = store.tiles[0].astype(int)
    assert (tile[150:, :] >= 250).all() and (tile[:, 200:] >= 250).all()  # white (JPEG)
    with open_slide(slide) as reader:
        expected = reader.read_region((0, 0), 0, (200, 150)).astype(int)
    assert np.abs(tile[:150, :200] - expected).mean() < 3


def test_qptiff_falls_back_to_tiffslide(tmp_path: Path, slides_dir: Path) -> None:
    result = tile_slide(
        slides_dir / "small_vectra.qptiff", tmp_path, TilingConfig(tissue_threshold=0.0)
    )
    store = open_store(tmp_path).slide(result.details["slide_id"])
    assert store.source["reader"] == "tiffslide"
    assert store.n_tiles == 8 * 6


def test_no_tissue_and_no_mpp(tmp_path: Path) -> None:
    blank = write_synthetic_slide(tmp_path / "blank.tiff", (1024, 768), tissue=False)
    with pytest.raises(NoTissueError, match="tissue_threshold"):
        tile_slide(blank, tmp_path / "root", TilingConfig())
    entry = open_store(tmp_path / "root").catalog.entries()[0]
    assert entry.status == "failed" and "NoTissueError" in (entry.error or "")
    assert not list((tmp_path / "root" / "slides").glob("*.zarr"))
    nompp = write_synthetic_slide(tmp_path / "nompp.tiff", (1024, 768), mpp=None)
    with pytest.raises(MissingMppError):
        tile_slide(nompp, tmp_path / "root", TilingConfig())
    result = tile_slide(nompp, tmp_path / "root", TilingConfig(mpp_override=0.5))
    assert result.status == "complete" and result.n_tiles > 0


@pytest.mark.slow
def test_huge_slide_with_tiny_tissue(tmp_path: Path) -> None:
    """A 20k x 20k slide (1.2 GB of pixels) whose tissue is a small blob: only tissue is read."""
    path = write_synthetic_slide(tmp_path / "huge.tiff", (20_000, 20_000), seed=1)
    result = tile_slide(path, tmp_path / "root", TilingConfig())
    store = open_store(tmp_path / "root").slide(result.details["slide_id"])
    grid_cells = int(np.ceil(20_000 / 256)) ** 2
    assert 0 < store.n_tiles < grid_cells / 4
    assert store.thumbnail.shape[:2] == (1250, 1250)


def test_resume_skips_complete_and_redoes_changed(tmp_path: Path, synth: Path) -> None:
    first = tile_slide(synth, tmp_path, TilingConfig())
    again = tile_slide(synth, tmp_path, TilingConfig())
    assert (first.status, again.status) == ("complete", "skipped")
    assert again.n_tiles == first.n_tiles
    changed = tile_slide(synth, tmp_path, TilingConfig(tissue_threshold=0.6))
    assert changed.status == "complete" and changed.n_tiles < first.n_tiles
    # an interrupted store (status "writing") is redone, never taken as complete
    store = SlideStore.open(open_store(tmp_path).store_path(first.details["slide_id"]), mode="r+")  # type: ignore[arg-type]
    store.group.attrs["status"] = "writing"
    with pytest.raises(StoreIncompleteError):
        open_store(tmp_path).slide(first.details["slide_id"])
    redo = tile_slide(synth, tmp_path, TilingConfig(tissue_threshold=0.6))
    assert redo.status == "complete"


def test_batch_isolates_failures_and_cli_reports(
    tmp_path: Path, synth: Path, broken_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = [str(synth), str(broken_dir)]
    code = cli_main(["tile", *inputs, "--out", str(tmp_path), "--json"])
    captured = capsys.readouterr()
    assert code == 1
    summary = json.loads(captured.out)
    assert summary["complete"] == 1 and summary["failed"] == 3
    by_name = {Path(s["path"]).name: s for s in summary["slides"]}
    assert all(s["slide"] == s["path"] for s in summary["slides"])  # one scale: the path
    assert by_name["not-a-tiff.svs"]["error_type"] == UnsupportedSlideError.__name__
    assert by_name["unreadable.svs"]["error_type"] == CorruptSlideError.__name__
    assert by_name["unopenable.tiff"]["error_type"] == CorruptSlideError.__name__
    errors = [line for line in captured.err.splitlines() if line.startswith("wsi-ssl: error:")]
    assert len(errors) == 3 and all(str(broken_dir) in line for line in errors)
    statuses = {e.name: e.status for e in open_store(tmp_path).catalog.entries()}
    assert statuses == {
        "s.tiff": "complete",
        "not-a-tiff.svs": "failed",
        "unreadable.svs": "failed",
        "unopenable.tiff": "failed",
    }


def test_cli_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["info", str(tmp_path / "missing.svs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.svs" in err[0]


def test_cli_info(slides_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["info", str(slides_dir / "CMU-1-Small-Region.svs"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dimensions"] == [2220, 2967] and info["reader"] == "openslide"
    assert info["mpp_source"] == "vendor" and info["vendor"] == "aperio"
    assert info["pixels"] == "readable"


@pytest.mark.parametrize("name", ["unreadable.svs", "unopenable.tiff"])
def test_cli_info_reads_pixels_as_tiling_would(fixtures_dir: Path, name: str) -> None:
    """A slide whose metadata opens but whose pixels do not decode: info shows what it read,
    then fails as `tile` does (it said all was well and exited 0)."""
    path = fixtures_dir / "broken" / name
    code, out, err = run_cli(["info", str(path)])
    assert code == 2 and "pixels      unreadable" in out and "dimensions" in out
    assert err.count("\n") == 1 and f"{path}: pixel data cannot be read" in err, err


def test_every_fixture_slide_tiles_through_the_cli(tmp_path: Path, slides_dir: Path) -> None:
    names = ["CMU-1-Small-Region.svs", "test3-DAPI-2-387.ndpi", "openslide-python_boxes_0.dcm"]
    code = cli_main(
        [
            "tile",
            *(str(slides_dir / n) for n in names),
            "--out",
            str(tmp_path),
            "--tissue-threshold",
            "0",
            "--quiet",
        ]
    )
    assert code == 0
    assert len(open_store(tmp_path).slide_ids) == 3


def test_distributed_cluster_matches_threads(tmp_path: Path, synth: Path) -> None:
    from distributed import Client, LocalCluster

    local = tile_slide(synth, tmp_path / "threads", LOSSLESS)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        remote = tile_slide(synth, tmp_path / "cluster", LOSSLESS, scheduler=client)
    a = open_store(tmp_path / "threads").slide(local.details["slide_id"])
    b = open_store(tmp_path / "cluster").slide(remote.details["slide_id"])
    np.testing.assert_array_equal(a.tiles[:], b.tiles[:])
    np.testing.assert_array_equal(a.coords, b.coords)


@pytest.mark.slow
def test_cli_schedulers_config_and_mpp_csv(
    tmp_path: Path, synth: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Local processes, a cluster by address, a TOML config and a per-slide mpp CSV, all through
    the CLI: every route gives the same tiles."""
    from distributed import LocalCluster

    nompp = write_synthetic_slide(tmp_path / "nompp.tiff", (2000, 1500), seed=3, mpp=None)
    (tmp_path / "mpp.csv").write_text("slide,mpp\nnompp.tiff,0.5\n")
    (tmp_path / "tiling.toml").write_text('codec = "zstd"\ntissue_threshold = 0.3\n')
    common = ["--config", str(tmp_path / "tiling.toml"), "--mpp-csv", str(tmp_path / "mpp.csv")]
    assert cli_main(["tile", str(nompp), "--out", str(tmp_path / "threads"), *common]) == 0
    assert cli_main(["tile", str(synth), "--out", str(tmp_path / "procs"), *common,
                     "--scheduler", "processes", "--workers", "2"]) == 0  # fmt: skip
    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
    ) as cluster:
        address = cluster.scheduler_address
        assert cli_main(["tile", str(synth), "--out", str(tmp_path / "cluster"), *common,
                         "--scheduler", address]) == 0  # fmt: skip
    stores = [open_store(tmp_path / name) for name in ("threads", "procs", "cluster")]
    first = stores[0].slide(stores[0].slide_ids[0])
    assert first.source["mpp_source"] == "override" and first.tiling["codec"] == "zstd"
    assert first.tiling["tissue_threshold"] == 0.3
    for archive in stores[1:]:
        other = archive.slide(archive.slide_ids[0])
        np.testing.assert_array_equal(other.tiles[:], first.tiles[:])
    capsys.readouterr()
    # a bad CSV value: the CSV and its line are named (it named --mpp-override)
    (tmp_path / "bad.csv").write_text("slide,mpp\nnompp.tiff,-1\n")
    assert cli_main(["tile", str(nompp), "--out", str(tmp_path / "x"),
                     "--mpp-csv", str(tmp_path / "bad.csv")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "bad.csv: line 2: mpp '-1' of 'nompp.tiff' is not a number > 0" in err, err
    assert "--mpp-override" not in err
    assert cli_main(["tile", str(synth), "--out", str(tmp_path / "x"),
                     "--scheduler", "tcp://127.0.0.1:9"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach the Dask scheduler" in err[0]


@pytest.mark.slow
@pytest.mark.faults
def test_killed_job_resumes_to_identical_store(tmp_path: Path) -> None:
    """SIGKILL mid-slide, re-run: the store equals an uninterrupted run's, and was never complete."""
    path = write_synthetic_slide(tmp_path / "big.tiff", (8192, 6144), seed=5)
    args = ["--tissue-threshold", "0", "--tiles-per-chunk", "8", "--workers", "1", "--quiet"]
    reference = tile_slide(
        path, tmp_path / "ref", TilingConfig(tissue_threshold=0.0, tiles_per_chunk=8), workers=1
    )
    root = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "wsi_ssl.cli.main", "tile", str(path), "--out", str(root), *args]
    )
    store_json = (
        root / "slides" / f"{reference.details['slide_id']}.zarr.new" / "zarr.json"
    )  # beside
    shard_dir = store_json.parent / "tiles" / "c"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
        shard_dir.is_dir() and len(list(shard_dir.iterdir())) >= 5
    ):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads(store_json.read_text())["attributes"]["status"] == "writing"
    assert not (root / "slides" / f"{reference.details['slide_id']}.zarr").exists()
    assert open_store(root).slide_ids == []
    assert cli_main(["tile", str(path), "--out", str(root), *args]) == 0
    a = open_store(tmp_path / "ref").slide(reference.details["slide_id"])
    b = open_store(root).slide(reference.details["slide_id"])
    np.testing.assert_array_equal(a.tiles[:], b.tiles[:])
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_array_equal(a.tissue_mask, b.tissue_mask)


def test_read_tiles_matches_per_tile_reads(synth: Path) -> None:
    """Strip reads cut the same pixels as one read_region per tile (with overlap)."""
    config = TilingConfig(overlap=64, codec="zstd")
    with open_slide(synth) as reader:
        grid = TileGrid.for_slide(reader, reader.require_mpp(), config)
        coords = grid.all_coords()[:20]
        tiles = read_tiles(reader, grid, coords)
        for i, (x, y) in enumerate(coords):
            np.testing.assert_array_equal(
                tiles[i], reader.read_region((int(x), int(y)), 0, (256, 256))
            )


def test_aligned_tiles_are_decoded_from_the_file_and_match_read_region(synth: Path) -> None:
    """The synthetic file stores 256 px tiles at 0.5 µm/px: the default grid coincides with
    them except at the right and bottom edges, which are read and padded as before."""
    with open_slide(synth, backend="tiffslide") as reader:
        grid = TileGrid.for_slide(reader, reader.require_mpp(), LOSSLESS)
        coords = grid.all_coords()
        stored, positions = stored_positions(reader, grid, coords)
        assert stored is not None and stored.jpeg_passthrough
        direct = positions[:, 0] >= 0
        assert direct.sum() == 7 * 5  # 2000 x 1500 px: 7 x 5 whole stored tiles
        np.testing.assert_array_equal(positions[direct] * 256, coords[direct][:, ::-1])
        tiles = read_tiles(reader, grid, coords)
        for i, (x, y) in enumerate(coords):
            np.testing.assert_array_equal(
                tiles[i], reader.read_region((int(x), int(y)), 0, (256, 256))
            )
        grid = TileGrid.for_slide(reader, 0.5, TilingConfig(overlap=32))  # stride 224 px
        coords = grid.all_coords()
        lined_up = stored_positions(reader, grid, coords)[1][:, 0] >= 0
        on_stored = (coords % 256 == 0).all(axis=1) & (coords + 256 <= (2000, 1500)).all(axis=1)
        np.testing.assert_array_equal(lined_up, on_stored)  # only where 224 k hits 256 j
        assert 0 < lined_up.sum() < len(coords) / 10
        grid = TileGrid.for_slide(reader, 0.5, TilingConfig(mpp=0.6))  # resampled: none
        assert stored_positions(reader, grid, grid.all_coords())[1].max() == -1


def test_jpeg_store_keeps_the_scanners_jpeg_streams(synth: Path, tmp_path: Path) -> None:
    config = TilingConfig(codec="jpeg", tissue_threshold=0.0)
    result = tile_slide(synth, tmp_path, config)
    store = open_store(tmp_path).slide(result.details["slide_id"])
    with open_slide(synth, backend="tiffslide") as reader:
        stored = reader.stored_tiles(0)
        assert stored is not None
        shard = (
            tmp_path / "slides" / f"{result.details['slide_id']}.zarr" / "tiles" / "c/0/0/0/0"
        ).read_bytes()
        first, _ = stored.jpeg(0, 0)
        assert shard.startswith(first)  # tile (0, 0) stored byte for byte
        for i, (x, y) in enumerate(store.coords):
            expected = reader.read_region((int(x), int(y)), 0, (256, 256))
            if x + 256 <= 2000 and y + 256 <= 1500:  # the file's own JPEG: identical pixels
                np.testing.assert_array_equal(store.tiles[i], expected)
            else:  # edge tiles are re-encoded at the configured quality
                assert np.abs(store.tiles[i].astype(int) - expected).mean() < 3


def test_stored_jpeg_merges_the_shared_tables(cmu_small: Path) -> None:
    """Aperio tiles share one JPEGTables tag: the merged stream decodes on its own to the same
    pixels (CMU-1 is RGB-in-JPEG, so not passed through, but the merge is the same)."""
    import imagecodecs

    with open_slide(cmu_small, backend="tiffslide") as reader:
        stored = reader.stored_tiles(0)
        assert stored is not None and stored.page.jpegtables and not stored.jpeg_passthrough
        stream, _ = stored.jpeg(3, 4)
        assert stream.startswith(b"\xff\xd8") and stream.count(b"\xff\xd8") == 1
        alone = imagecodecs.jpeg8_decode(stream, colorspace="RGB", outcolorspace="RGB")
        np.testing.assert_array_equal(alone, stored.decode(3, 4))


def test_corrupt_stored_tile_is_a_corrupt_slide_error(tmp_path: Path) -> None:
    slide = write_synthetic_slide(tmp_path / "s.tiff", (1024, 768), compression="zlib", seed=1)
    with open_slide(slide, backend="tiffslide") as reader:
        stored = reader.stored_tiles(0)
        assert stored is not None
        offset, count = stored.page.dataoffsets[5], stored.page.databytecounts[5]
    data = bytearray(slide.read_bytes())
    data[offset : offset + count] = b"\x00" * count  # tile (1, 1): not a zlib stream any more
    slide.write_bytes(bytes(data))
    with (
        open_slide(slide, backend="tiffslide") as reader,
        pytest.raises(CorruptSlideError, match="stored tile row 1, column 1"),
    ):
        reader.stored_tiles(0).decode(1, 1)  # type: ignore[union-attr]
    summary = tile_slides(
        [slide], tmp_path / "out", TilingConfig(tissue_threshold=0.0), progress=False
    )
    assert summary.outcomes[0].error_type == "CorruptSlideError"
    assert not list((tmp_path / "out" / "slides").glob("*.zarr"))


def test_public_api_is_lazy() -> None:
    code = "import sys, wsi_ssl; assert 'torch' not in sys.modules and 'openslide' not in sys.modules; print(wsi_ssl.tile_slide.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "tile_slide"


def test_tile_slides_api(tmp_path: Path, synth: Path) -> None:
    summary = wsi_ssl.tile_slides([synth, tmp_path / "missing.svs"], tmp_path, progress=False)
    assert [r.status for r in summary.outcomes] == ["complete", "failed"]
    assert summary.outcomes[1].error_type == "SlideNotFoundError"
    assert (
        zarr.open_group(
            tmp_path / "slides" / f"{summary.outcomes[0].details['slide_id']}.zarr"
        ).attrs["status"]
        == "complete"
    )


@pytest.mark.faults
def test_full_disk_is_a_typed_error_and_leaves_nothing(tiny_disk: Path, tmp_path: Path) -> None:
    slide = write_synthetic_slide(tmp_path / "s.tiff", (4096, 3072), seed=2)
    with pytest.raises(DiskFullError, match="no space left"):
        tile_slide(slide, tiny_disk, TilingConfig(codec="zstd", tissue_threshold=0.0))
    assert not list((tiny_disk / "slides").glob("*.zarr"))
    summary = tile_slides(
        [slide], tiny_disk, TilingConfig(codec="zstd", tissue_threshold=0.0), progress=False
    )
    assert summary.outcomes[0].error_type == "DiskFullError"


def test_cli_parser_loads_no_heavy_library() -> None:
    code = (
        "import sys; from wsi_ssl.cli.main import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'faiss', 'lightly', 'openslide', 'fastapi', 'uvicorn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("command", [["tile", "s.tiff", "--out", "o"], ["mil", "train", "r",
                         "--labels", "l.csv", "--out", "o"], ["pretrain", "r", "--out", "o"]])  # fmt: skip
def test_bad_toml_config_is_one_line_naming_the_valid_keys(
    tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.toml"
    config.write_text("tile_sise = 256\n")
    assert cli_main([*command, "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown keys ['tile_sise']" in err[0] and "valid keys:" in err[0]
    config.write_text("not toml [")
    assert cli_main([*command, "--config", str(config)]) == 2
    assert "cannot read TOML config" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "line", "message"),
    [
        (["tile", "s.tiff", "--out", "o"], "tile_size = 224.7", "tile_size must be a whole number, got 224.7"),
        (["tile", "s.tiff", "--out", "o"], 'qc = "no"', "qc must be true or false, got 'no'"),
        (["mil", "train", "r", "--labels", "l.csv", "--out", "o"], "epochs = 2.5", "epochs must be a whole number, got 2.5"),
        (["pretrain", "r", "--out", "o"], 'steps = "10"', "steps must be a whole number, got '10'"),
        (["pretrain", "r", "--out", "o"], 'epochs = "2"', "epochs must be a number, got '2'"),
    ],
)  # fmt: skip
def test_a_toml_value_of_the_wrong_type_is_one_line(
    tmp_path: Path,
    command: list[str],
    line: str,
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A TOML value of another type than its field's is refused before any work, naming the
    key (``qc = "no"`` used to mean true, ``tile_size = 224.7`` failed every slide)."""
    config = tmp_path / "c.toml"
    config.write_text(f"{line}\n")
    assert cli_main([*command, "--config", str(config)]) == 2
    [err] = capsys.readouterr().err.strip().splitlines()
    assert err.startswith(f"wsi-ssl: error: {config}: {message}")


def test_toml_mpp_takes_a_list_of_scales(
    tmp_path: Path, synth: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``mpp = [0.5, 1.0]`` in the TOML config is ``--mpp 0.5,1.0``: one archive per scale;
    one number is one scale into --out; the flag wins; bad values are one typed line."""
    config = tmp_path / "c.toml"
    config.write_text('mpp = [0.5, 1.0]\ncodec = "zstd"\ntile_size = 512\n')
    root = tmp_path / "scales"
    argv = ["tile", str(synth), "--out", str(root), "--config", str(config), "--quiet"]
    assert cli_main([*argv, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["roots"] == [str(root / "mpp-0.5"), str(root / "mpp-1")]
    stores = {m: open_store(root / f"mpp-{m:g}") for m in (0.5, 1.0)}
    for mpp, archive in stores.items():
        store = archive.slide(archive.slide_ids[0])
        assert store.tiling["mpp"] == mpp and store.tiling["codec"] == "zstd"
    # one number (a float or an int), or a list of one: one scale, straight into --out
    for text in ("mpp = 1.0", "mpp = 1", "mpp = [1.0]"):
        config.write_text(f'{text}\ncodec = "zstd"\ntile_size = 512\n')
        one = tmp_path / text.replace(" ", "").replace("=", "-").strip("[]")
        assert cli_main(["tile", str(synth), "--out", str(one), "--config", str(config),
                         "--quiet"]) == 0  # fmt: skip
        archive = open_store(one)
        assert archive.slide(archive.slide_ids[0]).tiling["mpp"] == 1.0
    capsys.readouterr()
    # the flag wins over the TOML list
    config.write_text("mpp = [0.5, 1.0]\n")
    from wsi_ssl.cli.main import build_parser
    from wsi_ssl.cli.tile import tiling_config

    parsed = build_parser().parse_args([*argv, "--mpp", "2"])
    assert tiling_config(parsed)[0].mpp == 2.0 and tiling_config(parsed)[1] is None
    # the CLI's validation and messages, naming mpp
    for text, message in [
        ('mpp = "0.5,1.0"', "mpp must be a number or a list of numbers"),
        ("mpp = []", "mpp must be a number or a list of numbers"),
        ("mpp = [0.5, true]", "mpp must be a number or a list of numbers"),
        ("mpp = [0.5, -1.0]", "mpp must be > 0, got -1.0"),
        ("mpp = [0.5, 0.5]", "name one scale twice"),
    ]:
        config.write_text(text + "\n")
        assert cli_main(argv) == 2, text
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and "--mpp" in err[0], (text, err)
    config.write_text("mpp = [0.5, true]\n")
    with pytest.raises(ConfigError, match="mpp must be") as info:
        tiling_config(build_parser().parse_args(argv))
    assert info.value.parameters == ("mpp",) and str(config) in str(info.value)


def test_a_failing_chunk_waits_for_the_running_ones(tmp_path: Path) -> None:
    """When one task fails, extraction returns only after the tasks already running have
    finished, so removing the partial store afterwards removes everything."""
    import dask

    from wsi_ssl.tiling.extract import _compute_in_own_threads

    def slow_write(name: str) -> int:
        time.sleep(0.5)
        (tmp_path / name).write_text("late")
        return 1

    def fail() -> int:
        time.sleep(0.05)
        raise OSError(28, "No space left on device")

    tasks = [dask.delayed(slow_write, pure=False)("a"), dask.delayed(fail, pure=False)()]
    with pytest.raises(OSError, match="No space"):
        _compute_in_own_threads(tasks, workers=2)
    assert (tmp_path / "a").read_text() == "late"  # written before the error surfaced


def test_malformed_slides_fail_alone_whatever_breaks(tmp_path: Path) -> None:
    """Copies of a slide with header bytes changed at random break the TIFF parsers in many
    ways (TypeError, ZeroDivisionError, huge sizes...); each fails on its own with its path,
    `wsi-ssl info` says so in one line, and the good slide after them is tiled."""
    good = write_synthetic_slide(tmp_path / "z-good.tiff", (2048, 2048), seed=0)
    original = good.read_bytes()
    rng = np.random.default_rng(7)
    bad = []
    for i in range(30):
        data = bytearray(original)
        for at in rng.integers(8, 300, 4):
            data[at] = int(rng.integers(0, 256))
        path = tmp_path / f"bad-{i:02d}.tiff"
        path.write_bytes(bytes(data))
        bad.append(path)
    summary = tile_slides([*bad, good], tmp_path / "out", TilingConfig(), progress=False)
    results = {Path(r.slide).name: r for r in summary.outcomes}
    assert results["z-good.tiff"].status == "complete"
    failed = [r for r in summary.outcomes if r.status == "failed"]
    assert failed and all(str(Path(r.slide).name) in (r.error or "") for r in failed)
    for path in bad:
        code, _, err = run_cli(["info", str(path)])
        assert code in (0, 2)
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err


def test_resume_redoes_a_store_with_a_missing_shard(tmp_path: Path, synth: Path) -> None:
    config = TilingConfig(tiles_per_chunk=4)
    first = tile_slide(synth, tmp_path, config)
    shard = (
        tmp_path
        / "slides"
        / f"{first.details['slide_id']}.zarr"
        / "tiles"
        / "c"
        / "1"
        / "0"
        / "0"
        / "0"
    )
    shard.unlink()
    again = tile_slide(synth, tmp_path, config)
    assert again.status == "complete" and shard.is_file()
    assert tile_slide(synth, tmp_path, config).status == "skipped"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tile", "s.tiff", "--out", "o", "--workers", "-2"], "expected a whole number >= 1"),
        (["tile", "s.tiff", "--out", "o", "--workers", "1.5"], "expected a whole number >= 1"),
        (["serve", "root", "--port", "70000"], "expected a port 0..65535"),
        (["tile", "s.tiff", "--out", "o", "--lock-wait", "-1"], "seconds >= 0, got '-1'"),
        (["tile", "s.tiff", "--out", "o", "--lock-wait", "nan"], "seconds >= 0, got 'nan'"),
        (["embed", "root", "--encoder", "x", "--wait", "soon"], "seconds >= 0, got 'soon'"),
        (["mil", "predict", "run", "root", "--top-k", "0"], "expected a whole number >= 1"),
        (["search", "root", "--hits-per-tile", "-1"], "expected a whole number >= 1"),
    ],
)
def test_numeric_flags_are_checked_when_parsed(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli_main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_inputs_that_name_no_slide_or_no_folder_are_refused(
    tmp_path: Path, synth: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder without slides (a mistyped data folder), --roi-include without an annotation
    file, and --out naming a file are one line each, exit 2, before any slide is read."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no slides here")
    not_a_folder = tmp_path / "archive.txt"
    not_a_folder.write_text("")
    for argv, message in (
        ([str(empty), "--out", str(tmp_path / "a")], f"{empty}: no slide files in this folder"),
        ([str(synth), "--out", str(tmp_path / "b"), "--roi-include", "Tumor"], "give one (roi"),
        ([str(synth), "--out", str(not_a_folder)], f"{not_a_folder}: is a file; the archive"),
    ):
        assert cli_main(["tile", *argv, "--quiet"]) == 2
        [err] = capsys.readouterr().err.strip().splitlines()
        assert err.startswith("wsi-ssl: error: ") and message in err, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_python_misuse_of_tile_slide_is_named(tmp_path: Path, synth: Path) -> None:
    """Settings as a dict, an output that is a file, a folder of slides given as one slide:
    each a typed error saying what to do (an AttributeError, a LockFileError at the lock file
    and "no such slide file" before), nothing written."""
    not_a_folder = tmp_path / "archive.txt"
    not_a_folder.write_text("")
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(synth, folder / "a.tiff")
    with pytest.raises(ConfigError, match=r"must be a TilingConfig, got dict .*TilingConfig\(\*\*"):
        tile_slide(synth, tmp_path / "a", {"mpp": 1.0})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="must be a TilingConfig"):
        tile_slides([synth], tmp_path / "a", {"mpp": 1.0}, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=f"{not_a_folder}: is a file"):
        tile_slide(synth, not_a_folder)
    with pytest.raises(SlideNotFoundError, match=r"a folder without a DICOM series.*tile_slides"):
        tile_slide(folder, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_one_slide_under_two_names_is_tiled_once(
    tmp_path: Path, synth: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same file given twice, and a copy under another name, are one slide: tiled once,
    counted once, the catalog keeping the first name, on the first run and on a re-run."""
    folder = tmp_path / "slides"
    folder.mkdir()
    a, b = folder / "a.tiff", folder / "b.tiff"
    shutil.copy(synth, a)
    shutil.copy(synth, b)
    root = tmp_path / "root"
    argv = ["tile", str(folder), str(a), "--out", str(root), "--quiet", "--json"]
    for first in ("complete", "skipped"):
        assert cli_main(argv) == 0
        summary = json.loads(capsys.readouterr().out)
        assert [(s["slide"], s["status"]) for s in summary["slides"]] == [
            (str(a), first),
            (str(b), "skipped"),
        ]
        assert summary["slides"][1]["same_as"] == str(a) and summary["slides"][1]["n_tiles"] == 0
        archive = open_store(root)
        [slide_id] = archive.slide_ids
        assert summary["tiles"] == archive.slide(slide_id).n_tiles
        assert archive.catalog.get(slide_id).name == "a.tiff"  # type: ignore[union-attr]
    assert cli_main(argv[:-1]) == 0
    out = capsys.readouterr().out
    assert f"{b}: the same file as {a} (one slide, tiled once)" in out
    assert "0 tiled, 1 already complete, 1 the same file as another, 0 busy" in out
    # the copy alone, in a later job: the slide keeps its name (the catalog took the copy's,
    # so labels naming a.tiff stopped resolving); once a.tiff holds other content, it moved
    assert cli_main(["tile", str(b), "--out", str(root), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"{b}: the same file as {a.resolve()} (one slide, tiled once)" in out
    assert open_store(root).catalog.get(slide_id).name == "a.tiff"  # type: ignore[union-attr]
    a.write_bytes(b"another scan now")  # a.tiff holds something else: the slide is b.tiff
    assert cli_main(["tile", str(b), "--out", str(root), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "the same file as" not in out
    assert f"{b}: moved from {a.resolve()} (its store now names this file)" in out
    assert open_store(root).catalog.get(slide_id).name == "b.tiff"  # type: ignore[union-attr]
    # the store names the file too: the viewer draws from it (it kept reading a.tiff)
    store = open_store(root).slide(slide_id)
    assert store.source["path"] == str(b.resolve()) and store.status == "complete"
    reader, _ = open_slide_file(store)
    assert reader is not None and Path(reader.path).resolve() == b.resolve()
    reader.close()
    assert cli_main(["tile", str(b), "--out", str(root), "--quiet"]) == 0
    assert "moved from" not in capsys.readouterr().out


def test_a_slide_tiled_through_a_link_is_named_by_the_link(
    tmp_path: Path, synth: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``batch/slideA.svs -> scans/0042.tiff``: the user's name finds the slide (the store kept
    the target's alone: archive.slide('slideA') and labels naming slideA failed), in the
    catalog and, without it, from the store; the file read is still the target."""
    (tmp_path / "scans").mkdir()
    (tmp_path / "batch").mkdir()
    target = tmp_path / "scans" / "0042.tiff"
    shutil.copy(synth, target)
    (tmp_path / "batch" / "slideA.tiff").symlink_to(target)
    root = tmp_path / "root"
    assert cli_main(["tile", str(tmp_path / "batch"), "--out", str(root), "--quiet"]) == 0
    archive = open_store(root)
    [slide_id] = archive.slide_ids
    for name in ("slideA", "slideA.tiff", "0042", slide_id):
        assert archive.slide(name).slide_id == slide_id
    assert archive.catalog.get(slide_id).name == "slideA.tiff"  # type: ignore[union-attr]
    assert archive.slide(slide_id).source["path"] == str(target.resolve())
    shard = next(
        p for p in (archive.store_path(slide_id) / "tiles" / "c").rglob("*") if p.is_file()
    )
    shard.write_bytes(b"rot")  # check marks it for re-tiling: the catalog keeps the name
    assert cli_main(["check", str(root), "--repair"]) == 1
    assert open_store(root).catalog.get(slide_id).name == "slideA.tiff"  # type: ignore[union-attr]
    assert open_store(root).slide("slideA").slide_id == slide_id
    (root / "catalog.sqlite").unlink()  # lost: the store's own record names it
    assert open_store(root).slide("slideA").slide_id == slide_id
    capsys.readouterr()


def test_a_changed_file_is_a_new_slide_and_its_earlier_version_is_named(
    tmp_path: Path,
    synth: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Content gives the id: a file changed in place is tiled as a new slide beside the old
    store (kept, with anything made from it), and the report names the earlier version."""
    slide = tmp_path / "m.tiff"
    shutil.copy(synth, slide)
    root = tmp_path / "root"
    argv = ["tile", str(slide), "--out", str(root), "--quiet"]
    assert cli_main([*argv, "--json"]) == 0
    [old] = [s["slide_id"] for s in json.loads(capsys.readouterr().out)["slides"]]
    with slide.open("ab") as f:
        f.write(b"\0")
    assert cli_main([*argv, "--json"]) == 0
    [new] = json.loads(capsys.readouterr().out)["slides"]
    assert new["status"] == "complete" and new["earlier_versions"] == [old]
    assert sorted(open_store(root).slide_ids) == sorted([old, new["slide_id"]])
    assert cli_main([*argv, "--no-resume"]) == 0
    out = capsys.readouterr().out
    assert f"{slide}: the file changed since it was tiled as slide {old}; that store is kept" in out
    monkeypatch.chdir(tmp_path)  # however the path is spelled, it is the same file
    assert cli_main(["tile", "m.tiff", "--out", str(root), "--quiet", "--no-resume"]) == 0
    assert f"m.tiff: the file changed since it was tiled as slide {old}" in capsys.readouterr().out


def test_resampled_tiles_show_exactly_their_square(cmu_small: Path, tmp_path: Path) -> None:
    """At 1 µm/px a tile is 513.03 level-0 px shrunk to 256: it shows exactly that square, as a
    bilinear resample of the slide's own pixels over it (the strip was read 514 px tall and
    stretched whole: 0.5 output px off at the bottom, mean abs difference 3.2)."""
    from PIL import Image

    config = TilingConfig(mpp=1.0, tile_size=256, codec="zstd", tissue_threshold=0.0)
    result = tile_slide(cmu_small, tmp_path / "root", config)
    store = open_store(tmp_path / "root").slide(result.details["slide_id"])
    side = store.tiling["tile_size_level0"]
    assert abs(side - round(side)) > 0.01  # a fractional scale, the case at hand
    width, height = store.source["dimensions"]
    differences = []
    with open_slide(cmu_small) as reader:
        for tile, (x, y) in zip(store.tiles[:], store.coords, strict=True):
            if x + side + 4 > width or y + side + 4 > height:
                continue  # padded edge tiles
            region = reader.read_region((int(x), int(y)), 0, (int(side) + 2, int(side) + 2))
            exact = Image.fromarray(region).resize(
                (256, 256), Image.Resampling.BILINEAR, box=(0, 0, side, side)
            )
            differences.append(np.abs(tile.astype(float) - np.asarray(exact)).mean())
    assert len(differences) >= 10 and float(np.mean(differences)) < 1.0


@pytest.mark.parametrize("name", ["small_vectra.qptiff", "test3-DAPI-2-387.ndpi"])
def test_a_fluorescence_scan_is_named_as_one(slides_dir: Path, tmp_path: Path, name: str) -> None:
    """Real fluorescence scans (DAPI on black): no tissue, and the error says why (it advised
    lowering tissue_threshold, which tiled false-colour tiles padded white on black)."""
    with pytest.raises(NoTissueError, match="background is dark: it looks like a fluorescence"):
        tile_slide(slides_dir / name, tmp_path / "root", TilingConfig())
    blank = write_synthetic_slide(tmp_path / "glass.tiff", (1024, 768), seed=0, tissue=False)
    with pytest.raises(NoTissueError, match="no tile has at least 10% tissue") as info:
        tile_slide(blank, tmp_path / "root", TilingConfig())
    assert "background is dark" not in str(info.value)
