"""Several magnifications in one run: ``wsi-ssl tile --mpp 0.5,1.0`` on a real slide writes one
archive per scale, from one open of the slide and one tissue mask, each store complete,
QC-scored and resumable on its own."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import wsi_ssl.tiling.source as source_module
from wsi_ssl.cli.main import main as cli_main
from wsi_ssl.config import TilingConfig
from wsi_ssl.errors import ConfigError
from wsi_ssl.storage import open_store
from wsi_ssl.tiling.batch import tile_slides
from wsi_ssl.tiling.qc import QC_METRICS, kept_tiles
from wsi_ssl.tiling.scales import scale_root, scale_roots

FLAGS = ["--tile-size", "128", "--codec", "zstd", "--quiet"]


@pytest.fixture(scope="module")
def two_scales(
    tmp_path_factory: pytest.TempPathFactory, cmu_small: Path
) -> tuple[Path, dict[str, Any], dict[str, int]]:
    """CMU-1-Small-Region tiled at 0.5 and 1.0 µm/px by the CLI, counting how often the slide
    was opened and its tissue detected (the real functions run)."""
    root = tmp_path_factory.mktemp("scales")
    calls = {"open": 0, "detect": 0}
    real_open, real_detect = source_module.open_for_tiling, source_module.detect_tissue

    def counted_open(*args: Any, **kwargs: Any) -> Any:
        calls["open"] += 1
        return real_open(*args, **kwargs)

    def counted_detect(*args: Any, **kwargs: Any) -> Any:
        calls["detect"] += 1
        return real_detect(*args, **kwargs)

    argv = ["tile", str(cmu_small), "--out", str(root), "--mpp", "0.5,1.0", *FLAGS, "--json"]
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(source_module, "open_for_tiling", counted_open)
        mp.setattr(source_module, "detect_tissue", counted_detect)
        assert cli_main(argv) == 0
    return root, json.loads(out.getvalue()), calls


def test_one_archive_per_scale_from_one_read(
    two_scales: tuple[Path, dict[str, Any], dict[str, int]],
) -> None:
    root, summary, calls = two_scales
    assert calls == {"open": 1, "detect": 1}
    assert summary["complete"] == 2 and summary["failed"] == 0
    assert summary["roots"] == [str(root / "mpp-0.5"), str(root / "mpp-1")]
    by_mpp = {s["mpp"]: s for s in summary["slides"]}
    assert set(by_mpp) == {0.5, 1.0}
    assert by_mpp[0.5]["slide_id"] == by_mpp[1.0]["slide_id"]
    assert by_mpp[0.5]["slide"] == f"{by_mpp[0.5]['path']} (mpp 0.5)"
    assert by_mpp[1.0]["root"] == str(root / "mpp-1")
    assert not (root / "slides").exists()  # nothing at the top level: one root per scale
    stores = {m: open_store(scale_root(root, m)).slide(by_mpp[m]["slide_id"]) for m in (0.5, 1.0)}
    fine, coarse = stores[0.5], stores[1.0]
    assert fine.tiling["mpp"] == 0.5 and coarse.tiling["mpp"] == 1.0
    assert by_mpp[0.5]["n_tiles"] == fine.n_tiles and by_mpp[1.0]["n_tiles"] == coarse.n_tiles
    # 2220 x 2967 px at 0.499 µm/px: 128 px tiles are 128 and 256 level-0 px
    assert fine.tiling["tile_size_level0"] == pytest.approx(128 * 0.5 / 0.499, rel=0.03)
    assert coarse.tiling["tile_size_level0"] == pytest.approx(256 * 0.5 / 0.499, rel=0.03)
    assert 2.5 < fine.n_tiles / coarse.n_tiles < 5.5  # a quarter of the area per tile
    np.testing.assert_array_equal(fine.thumbnail, coarse.thumbnail)
    np.testing.assert_array_equal(fine.tissue_mask, coarse.tissue_mask)
    # a coarse tile shows the level-0 pixels the fine tiles hold there, shrunk 2x (the fine
    # grid is level 0 itself, 0.499 within 2% of 0.5; the coarse one is 2.004x level 0)
    assert fine.tiling["level"] == 0 and not fine.tiling["resize"] and coarse.tiling["resize"]
    fine_cells = _cells(fine.coords, 128)
    diffs = []
    for i, (x, y) in enumerate(coarse.coords.tolist()):
        col, row = x // 128, y // 128
        block = [[fine_cells.get((col + dx, row + dy)) for dx in range(3)] for dy in range(3)]
        if any(k is None for line in block for k in line):
            continue
        mosaic = np.concatenate(
            [np.concatenate([fine.tiles[k] for k in line], axis=1) for line in block], axis=0
        )
        crop = mosaic[y - row * 128 :][:256, x - col * 128 :][:, :256].astype(np.float32)
        shrunk = crop.reshape(128, 2, 128, 2, 3).mean(axis=(1, 3))
        diffs.append(np.abs(shrunk - coarse.tiles[i]).mean())
    assert len(diffs) > 5 and np.median(diffs) < 12  # bilinear 2.004x vs a 2x box mean


def _cells(coords: np.ndarray, stride: int) -> dict[tuple[int, int], int]:
    """(col, row) grid cell of each tile -> its index."""
    cells = coords // stride
    return {(int(c), int(r)): i for i, (c, r) in enumerate(cells)}


def test_every_scale_has_its_qc_and_catalog(
    two_scales: tuple[Path, dict[str, Any], dict[str, int]],
) -> None:
    root, summary, _ = two_scales
    slide_id = summary["slides"][0]["slide_id"]
    for mpp in (0.5, 1.0):
        archive = open_store(scale_root(root, mpp))
        store = archive.slide(slide_id)
        assert archive.catalog.get(slide_id).status == "complete"
        for metric in QC_METRICS:
            scores = np.asarray(store.group["qc"][metric][:])
            assert scores.shape == (store.n_tiles,) and np.isfinite(scores).all()
        kept = kept_tiles(store)
        assert kept.shape == (store.n_tiles,) and 0 < kept.sum() <= store.n_tiles


def test_each_scale_resumes_on_its_own(
    two_scales: tuple[Path, dict[str, Any], dict[str, int]], cmu_small: Path, tmp_path: Path
) -> None:
    base, summary, _ = two_scales
    root = tmp_path / "copy"
    shutil.copytree(base, root)
    slide_id = summary["slides"][0]["slide_id"]
    coarse_store = open_store(scale_root(root, 1.0)).store_path(slide_id)
    before = open_store(scale_root(root, 0.5)).slide(slide_id).tiles[:]
    shutil.rmtree(coarse_store)
    config = TilingConfig(tile_size=128, codec="zstd")
    again = tile_slides([cmu_small], root, config, mpps=(0.5, 1.0), progress=False)
    assert [(o.details["mpp"], o.status) for o in again.outcomes] == [
        (0.5, "skipped"),
        (1.0, "complete"),
    ]
    np.testing.assert_array_equal(
        open_store(scale_root(root, 0.5)).slide(slide_id).tiles[:], before
    )
    assert (
        open_store(scale_root(root, 1.0)).slide(slide_id).n_tiles == summary["slides"][1]["n_tiles"]
    )
    lines = again.lines()
    assert lines[-1].startswith("1 tiled, 1 already complete, 0 busy")
    assert "; these slides hold " in lines[-1]  # this job's slides, not the archive's total
    assert str(scale_root(root, 1.0)) in lines[-1]


def test_scale_roots_and_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = TilingConfig()
    assert scale_roots(tmp_path, config, None) == [(tmp_path, config)]  # unchanged layout
    [(one, cfg)] = scale_roots(tmp_path, config, [0.25])
    assert one == tmp_path and cfg.mpp == 0.25
    assert [p.name for p, _ in scale_roots(tmp_path, config, [0.25, 0.5, 2])] == [
        "mpp-0.25",
        "mpp-0.5",
        "mpp-2",
    ]
    with pytest.raises(ConfigError, match="name one scale twice") as info:
        scale_roots(tmp_path, config, [0.5, 0.50])
    assert "--" not in str(info.value)
    with pytest.raises(ConfigError, match="mpp must be > 0"):
        scale_roots(tmp_path, config, [0.5, -1])
    with pytest.raises(SystemExit):
        cli_main(["tile", "x.svs", "--out", str(tmp_path), "--mpp", "0.5,big"])
    assert "expected numbers separated by commas" in capsys.readouterr().err


def test_scales_do_not_nest_into_archives_of_others(
    cmu_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Several scales into an archive of one (they were nested inside it), and one scale into
    a multi-scale tiling's mpp-1 archive at 0.5 µm/px (it was re-tiled there), are refused."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    for root in (single, multi / "mpp-0.5", multi / "mpp-1"):
        (root / "slides").mkdir(parents=True)
    with pytest.raises(ConfigError, match="an archive of one scale; several scales"):
        scale_roots(single, TilingConfig(), [0.5, 1.0])
    with pytest.raises(ConfigError, match=r"tile it at its own scale \(1 µm/px\), not 0.5"):
        scale_roots(multi / "mpp-1", TilingConfig(), None)
    [(root, config)] = scale_roots(multi / "mpp-1", TilingConfig(), [1.0])
    assert root == multi / "mpp-1" and config.mpp == 1.0
    assert scale_roots(multi / "mpp-0.5", TilingConfig(), None)[0][0] == multi / "mpp-0.5"
    code = cli_main(["tile", str(cmu_small), "--out", str(single), "--mpp", "0.5,1", "--quiet"])
    assert code == 2 and "an archive of one scale" in capsys.readouterr().err
    assert sorted(p.name for p in single.iterdir()) == ["slides"]  # nothing written


def test_a_scale_that_fails_leaves_the_others(cmu_small: Path, tmp_path: Path) -> None:
    """0.1 µm/px would enlarge the slide 5x: that scale fails with the API's words, 0.5 is
    tiled."""
    config = TilingConfig(tile_size=128, codec="zstd")
    summary = tile_slides([cmu_small], tmp_path, config, mpps=(0.1, 0.5), progress=False)
    statuses = [(o.details["mpp"], o.status) for o in summary.outcomes]
    assert statuses == [(0.1, "failed"), (0.5, "complete")]
    failed = summary.outcomes[0]
    assert failed.error_type == "ConfigError" and "allow_upsampling=True" in (failed.error or "")
    assert summary.exit_code == 1
    assert open_store(scale_root(tmp_path, 0.5)).slide_ids == [failed.details["slide_id"]]


def test_check_covers_every_scale_and_its_fix_keeps_the_scale(
    two_scales: tuple[Path, dict[str, Any], dict[str, int]], cmu_small: Path, tmp_path: Path
) -> None:
    """One scale into a multi-scale output is refused (it made a third archive beside the
    per-scale ones); ``check`` of a root that is both (an older layout) checks every ``mpp-*``
    archive too, and the re-tile it advises for a damaged store keeps that archive's scale."""
    from tests.conftest import run_cli

    root = shutil.copytree(two_scales[0], tmp_path / "root")
    argv = ["tile", str(cmu_small), "--out", str(root), *FLAGS, "--quiet"]
    code, _, err = run_cli([*argv, "--mpp", "0.5"])
    assert code == 2 and "holds the per-scale archives of a multi-scale tiling" in err, err
    assert "(mpp-0.5, mpp-1)" in err and not (root / "slides").exists()
    for name in ("slides", "catalog.sqlite"):  # the older layout: an archive at the top too
        src = root / "mpp-0.5" / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
    [shard] = list((root / "mpp-1" / "slides").glob("*.zarr/tiles/c/0/0/0/0"))
    shard.unlink()
    code, out, _ = run_cli(["check", str(root)])
    assert code == 1 and out.count("problem: ") == 1 and str(shard.parents[5]) in out, out
    [fix] = [x.split("fix: ", 1)[1] for x in out.splitlines() if "fix: " in x]
    assert f"--out {root / 'mpp-1'} --mpp 1.0 " in fix
    code, _, err = run_cli([*fix.removeprefix("wsi-ssl ").split(), "--quiet"])
    assert code == 0, err
    assert run_cli(["check", str(root)])[0] == 0
    [store_id] = open_store(root / "mpp-1").slide_ids
    assert open_store(root / "mpp-1").slide(store_id).tiling["mpp"] == 1.0
