"""Tile workers that outlive a job or die in one: a long-lived worker reads a slide file replaced
at the same path as the new file (its cached reader follows the file, not the path), and a
worker process killed mid-slide (the OOM killer) fails that slide with a typed error naming it,
its store and what to do, while the batch's other slides complete."""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli
from wsi_ssl.config import TilingConfig
from wsi_ssl.slide import open_slide
from wsi_ssl.storage import open_store
from wsi_ssl.storage.atomic import FAULT_ENV
from wsi_ssl.storage.fingerprint import fingerprint_file, slide_id_from_fingerprint
from wsi_ssl.synthetic import write_synthetic_slide
from wsi_ssl.tiling import extract
from wsi_ssl.tiling.batch import tile_slide, tile_slides
from wsi_ssl.tiling.extract import cached_reader, chunk_tiles
from wsi_ssl.tiling.grid import TileGrid

CONFIG = TilingConfig(tile_size=128, tiles_per_chunk=8, codec="zstd", tissue_threshold=0.0)


def _replace(path: Path, by: Path) -> None:
    """``by``'s bytes moved in at ``path`` (``cp by t && mv t path``)."""
    shutil.copyfile(by, path.with_name("incoming.tmp"))
    os.replace(path.with_name("incoming.tmp"), path)


def _two_slides(folder: Path) -> tuple[Path, Path, Path]:
    """Slides A and B of one geometry but other pixels, and the path that holds A."""
    a = write_synthetic_slide(folder / "a.tiff", (768, 640), seed=1)
    b = write_synthetic_slide(folder / "b.tiff", (768, 640), seed=2)
    path = folder / "slide.tiff"
    shutil.copyfile(a, path)
    return a, b, path


def test_a_thread_s_cached_reader_reads_a_file_replaced_at_its_path(tmp_path: Path) -> None:
    _, b, path = _two_slides(tmp_path)
    with open_slide(b) as fresh:
        grid = TileGrid.for_slide(fresh, fresh.require_mpp(), CONFIG)
        coords, backend = grid.all_coords(), fresh.backend
        want = np.stack(chunk_tiles(fresh, grid, coords))

    def tiles() -> np.ndarray:  # what the worker thread's cached reader reads now
        return np.stack(chunk_tiles(cached_reader(str(path), backend), grid, coords))

    with ThreadPoolExecutor(1) as worker:  # one long-lived worker thread, as on a cluster
        before = worker.submit(tiles).result()
        _replace(path, b)
        after = worker.submit(tiles).result()
    assert not np.array_equal(before, want)  # A's pixels first
    np.testing.assert_array_equal(after, want)


def test_a_dicom_slide_s_identity_is_its_series_instances(slides_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "series"
    folder.mkdir()
    for name in ("openslide-python_boxes_0.dcm", "openslide-python_boxes_1.dcm"):
        shutil.copyfile(slides_dir / name, folder / name)
    instance = folder / "openslide-python_boxes_1.dcm"
    before = extract.slide_identity(folder)
    assert [Path(f[0]).name for f in before] == sorted(p.name for p in folder.iterdir())
    assert extract.slide_identity(folder / "openslide-python_boxes_0.dcm") == before  # one series
    assert extract.slide_identity(folder) == before
    _replace(instance, instance)  # one instance moved in anew: another file at its path
    assert extract.slide_identity(folder) != before
    assert extract.slide_identity(
        folder / "openslide-python_boxes_0.dcm"
    ) == extract.slide_identity(folder)


def test_a_long_lived_cluster_tiles_a_replaced_file_from_its_new_pixels(tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    _, b, path = _two_slides(tmp_path)
    root = tmp_path / "root"
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        first = tile_slides([path], root, CONFIG, scheduler=client, progress=False)
        _replace(path, b)
        second = tile_slides([path], root, CONFIG, scheduler=client, progress=False)
    assert [o.status for o in (*first.outcomes, *second.outcomes)] == ["complete", "complete"]
    clean = tile_slide(b, tmp_path / "clean", CONFIG)  # B tiled by a fresh threads job
    id_a, id_b = first.outcomes[0].details["slide_id"], second.outcomes[0].details["slide_id"]
    assert id_a != id_b and id_b == clean.details["slide_id"]
    want = open_store(tmp_path / "clean").slide(id_b).tiles[:]
    np.testing.assert_array_equal(open_store(root).slide(id_b).tiles[:], want)
    assert not np.array_equal(open_store(root).slide(id_a).tiles[:], want)
    assert run_cli(["check", str(root), "--verify-tiles"])[0] == 0


@pytest.mark.faults
def test_a_killed_worker_process_fails_its_slide_by_name_and_the_others_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slides = [write_synthetic_slide(tmp_path / f"s{i}.tiff", (1024, 768), seed=i) for i in range(3)]
    root = (tmp_path / "root").resolve()
    victim = slides[1]
    sid = slide_id_from_fingerprint(fingerprint_file(victim))
    monkeypatch.setenv(FAULT_ENV, f"kill_before_rename:{root}/slides/{sid}.zarr.new/tiles/c/5/")
    argv = ["tile", *map(str, slides), "--out", str(root), "--tile-size", "128"]
    argv += ["--tiles-per-chunk", "4", "--tissue-threshold", "0", "--quiet"]
    code, out, err = run_cli([*argv, "--scheduler", "processes", "--workers", "2"])
    assert code == 1, (out, err)
    lines = [line for line in out.splitlines() if "worker process died" in line]
    assert len(lines) == 1 and lines[0].split(": ", 1)[1] in err, (out, err)  # and the summary
    assert (
        "2 tiled, 0 already complete, 0 busy (another job is writing or re-tiled them; run again), 1 failed"
        in out
    )
    assert str(victim) in lines[0] and f"{root}/slides/{sid}.zarr " in lines[0]
    assert "most often for lack of memory" in lines[0]
    assert "with fewer workers or with --scheduler threads" in lines[0]
    assert "--workers" in lines[0]
    archive = open_store(root)
    others = {slide_id_from_fingerprint(fingerprint_file(s)) for s in (slides[0], slides[2])}
    assert set(archive.slide_ids) == others  # the others complete, nothing of the victim left
    assert not list((root / "slides").glob(f"{sid}*"))
    assert run_cli(["check", str(root), "--verify-tiles"])[0] == 0
    monkeypatch.delenv(FAULT_ENV)
    code, out, err = run_cli(argv)  # the re-run the message advises tiles it
    assert code == 0, (out, err)
    assert set(open_store(root).slide_ids) == {*others, sid}
