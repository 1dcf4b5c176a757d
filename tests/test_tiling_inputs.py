"""What a tiling job is given and how it reads it: an mpp table row states a slide's scale
(over the file's own), ``--mpp-override`` only fills in a missing one, a DICOM series named by
another of its files is the same slide where it was, ``info`` names the reader tiling uses, and
the QC picture of a store tiled without QC says so. Real fixture slides, real readers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

from tests.test_dicom import copy_series
from wsi_ssl.errors import MissingMppError
from wsi_ssl.storage import Archive, SlideStore, open_store
from wsi_ssl.tiling.batch import tile_slide
from wsi_ssl.tiling.qc import qc_overlay
from wsi_ssl.tiling.source import open_for_tiling

SMALL = ["--mpp", "4", "--tile-size", "16", "--quiet"]  # CMU-1-Small-Region: ~400 tiles


def _only_store(root: Path) -> SlideStore:
    archive = open_store(root)
    (slide_id,) = archive.slide_ids
    return archive.slide(slide_id)


def test_mpp_table_row_states_the_scale_over_the_files_own(tmp_path: Path, cmu_small: Path) -> None:
    """The row is used and said (it was dropped silently: mpp 0.499, no note); a changed or
    removed row re-tiles, as any changed setting does."""
    table = tmp_path / "mpp.csv"
    table.write_text(f"slide,mpp\n{cmu_small.name},0.25\n")
    out = tmp_path / "out"
    tile = ["tile", str(cmu_small), "--out", str(out), *SMALL]
    code, stdout, err = run_cli([*tile, "--mpp-csv", str(table)])
    assert code == 0, err
    source = _only_store(out).source
    assert (source["mpp"], source["mpp_source"]) == (0.25, "table")
    assert "mpp 0.25 from the mpp table (the file says 0.499, vendor)" in stdout
    n_025 = _only_store(out).n_tiles

    code, stdout, _ = run_cli([*tile, "--mpp-csv", str(table), "--json"])
    summary = json.loads(stdout)
    assert code == 0 and summary["slides"][0]["status"] == "skipped"  # the same row: kept

    table.write_text(f"slide,mpp\n{cmu_small.name},0.3\n")
    code, stdout, _ = run_cli([*tile, "--mpp-csv", str(table)])
    assert code == 0 and "re-tiled: settings changed: slide mpp 0.25 (table) -> 0.3" in stdout
    assert _only_store(out).source["mpp"] == 0.3 and _only_store(out).n_tiles > n_025

    code, stdout, _ = run_cli(tile)  # no row: the file's own scale again
    assert code == 0 and "-> the file's own (no row in the mpp table now)" in stdout
    source = _only_store(out).source
    assert (source["mpp"], source["mpp_source"]) == (0.499, "vendor")


def test_checks_retile_of_a_table_scaled_store_states_the_row_again(
    tmp_path: Path, cmu_small: Path
) -> None:
    """A damaged store whose scale came from a table row: check's fix writes the row to a file
    of its own and re-tiles with it (it repeated it as --mpp-override, which does not replace
    a file's own scale: the store came back at 0.499); a re-run that found the store current,
    and a catalog rebuilt from the stores, keep knowing it; the user's own mpp.csv in the
    folder the fix runs in is left alone."""
    import subprocess

    table = tmp_path / "mpp.csv"
    table.write_text(f"slide,mpp\n{cmu_small.name},0.25\nother.svs,0.3\nthird.svs,0.4\n")
    out = tmp_path / "out"
    tile = ["tile", str(cmu_small), "--out", str(out), *SMALL, "--mpp-csv", str(table)]
    for _ in range(2):  # the second finds the store current (the file is not opened)
        assert run_cli(tile)[0] == 0
    store = _only_store(out)
    before = store.coords[:]
    shard = next(p for p in (store.path / "tiles" / "c").rglob("*") if p.is_file())
    shard.unlink()
    mine = table.read_text()
    for rebuilt in (False, True):
        if rebuilt:  # the catalog lost: rebuilt from the stores
            (out / "catalog.sqlite").unlink()
            shard.unlink()
            assert run_cli(["check", str(out), "--repair"])[0] in (0, 1)
        code, report, _ = run_cli(["check", str(out)])
        fix = next(line for line in report.splitlines() if "fix: " in line).split("fix: ", 1)[1]
        assert code == 1 and '--mpp-csv "$t"' in fix and "--mpp-override" not in fix, fix
        done = subprocess.run(["bash", "-c", fix], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        source = _only_store(out).source
        assert (source["mpp"], source["mpp_source"]) == (0.25, "table")
        assert (_only_store(out).coords[:] == before).all()
        assert run_cli(["check", str(out)])[0] == 0
        assert table.read_text() == mine
        assert fix.startswith("t=$(mktemp) && ") and fix.endswith('&& rm -f "$t"')  # removed


def test_mpp_override_fills_only_a_missing_scale_and_a_new_one_retiles(
    tmp_path: Path, slides_dir: Path, cmu_small: Path
) -> None:
    """boxes.tiff records no plausible scale, CMU-1-Small-Region its own: the override goes to
    boxes only, and the summary names CMU as keeping its own (it said nothing). A store tiled
    at an override is re-tiled at another override (it was kept at the old scale)."""
    boxes = slides_dir / "boxes.tiff"
    out = tmp_path / "out"
    tile = ["tile", str(boxes), str(cmu_small), "--out", str(out), *SMALL]
    code, stdout, err = run_cli([*tile, "--tissue-threshold", "0", "--mpp-override", "1", "--json"])
    assert code == 0, err
    summary = json.loads(stdout)
    (note,) = summary["notes"]
    assert "the mpp override 1 was not used for 1 slide(s)" in note
    assert str(cmu_small) in note and str(boxes) not in note
    archive = open_store(out)
    by_name = {archive.slide(i).source["name"]: archive.slide(i) for i in archive.slide_ids}
    assert by_name["boxes.tiff"].source["mpp_source"] == "override"
    assert by_name["boxes.tiff"].source["mpp"] == 1.0

    code, stdout, err = run_cli([*tile, "--tissue-threshold", "0", "--mpp-override", "2", "--json"])
    assert code == 0, err
    status = {Path(s["slide"]).name: s for s in json.loads(stdout)["slides"]}
    assert status["boxes.tiff"]["status"] == "complete"
    assert "slide mpp 1.0 (override) -> 2 (override)" in status["boxes.tiff"]["retiled_because"]
    assert status["CMU-1-Small-Region.svs"]["status"] == "skipped"
    archive = open_store(out)
    mpps = {
        archive.slide(i).source["name"]: archive.slide(i).source["mpp"] for i in archive.slide_ids
    }
    assert mpps == {"boxes.tiff": 2.0, "CMU-1-Small-Region.svs": 0.499}


def test_implausible_resolution_tags_are_named_in_the_cli_words(
    tmp_path: Path, slides_dir: Path
) -> None:
    """boxes.tiff's 72 dpi tags: the message says they give 352.78 µm/px (it said the slide
    had no resolution tags), and --json's error is in the command's words, as stderr's (it
    said mpp_override=MPP)."""
    boxes = slides_dir / "boxes.tiff"
    with pytest.raises(MissingMppError, match=r"TIFF resolution tags give 352.78 µm/px \(72 "):
        tile_slide(boxes, tmp_path / "api")
    code, stdout, err = run_cli(["tile", str(boxes), "--out", str(tmp_path / "cli"), "--json"])
    assert code == 1
    (slide,) = json.loads(stdout)["slides"]
    assert "set it with --mpp-override MPP" in slide["error"]
    assert "mpp_override=MPP" not in slide["error"]
    assert slide["error"] in err


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("rank", [None, "1"])
def test_an_interrupted_jobs_json_words_its_errors_as_the_cli_does(
    tmp_path: Path, slides_dir: Path, rank: str | None
) -> None:
    """Ctrl-C after a slide failed: the --json printed then words its error with the command's
    flags too (it said mpp_override=MPP). Under torchrun only rank 0 reports (every rank
    printed its own: two JSON documents on one stdout)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from wsi_ssl.synthetic import write_synthetic_slide

    slide = write_synthetic_slide(tmp_path / "s.tiff", (1024, 768), seed=1)
    env = {**os.environ, "WSI_SSL_FAULT": "pause_before_rename:/tiles/c/"}
    if rank is not None:
        env["RANK"] = rank
    argv = [sys.executable, "-m", "wsi_ssl.cli", "tile", str(slides_dir / "boxes.tiff")]
    argv += [str(slide), "--out", str(tmp_path / "out"), "--json", "--quiet"]
    job = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    stat = Path(f"/proc/{job.pid}/stat")
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline and job.poll() is None, "the job never paused"
        time.sleep(0.05)  # stopped before its first shard lands
    job.send_signal(signal.SIGINT)
    job.send_signal(signal.SIGCONT)
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode == 130
    if rank is not None:
        assert stdout == "" and stderr == "", (stdout, stderr)
        return
    report = json.loads(stdout)
    assert report["interrupted"] is True and report["not_done"] == [str(slide)]
    (failed,) = report["slides"]
    assert "set it with --mpp-override MPP" in failed["error"], failed


def test_another_file_of_a_dicom_series_is_the_same_slide_where_it_was(
    tmp_path: Path, slides_dir: Path
) -> None:
    """The series named by its other instance file is not a move (it said "moved from", and
    the store's path flipped each run); in one batch it is "another file of the same DICOM
    series" (it said "the same file"). A series that did move is still said to."""
    series = copy_series(slides_dir, tmp_path / "series")
    first, second = sorted(series.iterdir())
    out = tmp_path / "out"
    options = ["--out", str(out), "--tissue-threshold", "0", "--tile-size", "64", "--mpp", "1"]
    assert run_cli(["tile", str(first), *options])[0] == 0
    for given in (second, series, first, second):
        code, stdout, _ = run_cli(["tile", str(given), *options])
        assert code == 0 and "moved from" not in stdout, stdout
        store = _only_store(out)
        assert store.source["path"] == str(first.resolve())
        (entry,) = Archive(out).catalog.entries()
        assert (entry.path, entry.name) == (str(first.resolve()), first.name)

    code, stdout, _ = run_cli(["tile", str(series), str(second), *options])
    assert code == 0
    assert f"{second}: another file of the same DICOM series as {first} (one slide" in stdout

    moved = series.rename(tmp_path / "moved")
    code, stdout, _ = run_cli(["tile", str(moved / second.name), *options])
    assert code == 0 and f"moved from {first.resolve()}" in stdout
    assert _only_store(out).source["path"] == str((moved / second.name).resolve())


def test_a_copy_of_a_dicom_instance_is_not_another_file_of_its_series(
    tmp_path: Path, slides_dir: Path
) -> None:
    """A byte-identical copy of a ``.dcm`` file, given beside it, was "another file of the same
    DICOM series"; now it is "a copy of the same DICOM instance", while the series' other
    instance is still another file of it (and ``details`` say which)."""
    series = copy_series(slides_dir, tmp_path / "series")
    first, other = sorted(series.iterdir())
    copy = shutil.copy(first, series / "z-copy.dcm")
    argv = ["tile", str(first), str(other), str(copy), "--out", str(tmp_path / "out")]
    argv += ["--tissue-threshold", "0", "--tile-size", "64", "--mpp", "1"]
    code, stdout, err = run_cli(argv)
    assert code == 0, err
    assert f"{copy}: a copy of the same DICOM instance as {first} (one slide, tiled once)" in stdout
    assert f"{other}: another file of the same DICOM series as {first} (one slide" in stdout
    assert "2 the same file as another" in stdout
    code, stdout, _ = run_cli([*argv, "--json"])
    said = {Path(s["slide"]).name: s for s in json.loads(stdout)["slides"]}
    assert [said[p.name].get("same_series") for p in (first, other, copy)] == [None, True, False]
    assert [said[p.name].get("same_instance") for p in (first, other, copy)] == [None, False, True]


def test_info_names_the_reader_tiling_uses(slides_dir: Path) -> None:
    """openslide opens the SVS and the generic TIFF, tiling reads them with tiffslide: info
    said only "openslide" (and "vendor None" for the generic TIFF). What it says agrees with
    `open_for_tiling` for every fixture slide."""
    for path in sorted(slides_dir.iterdir()):
        code, stdout, err = run_cli(["info", str(path), "--json"])
        assert code == 0, err
        info = json.loads(stdout)
        with open_for_tiling(path, None) as reader:
            assert info["tiling_reader"] == reader.backend, path.name
    code, stdout, _ = run_cli(["info", str(slides_dir / "boxes.tiff")])
    lines = dict(line.split(maxsplit=1) for line in stdout.splitlines() if " " in line)
    assert lines["reader"].startswith("openslide (tiling reads it with tiffslide")
    assert lines["vendor"] == "none (generic-tiff)"
    assert "ignored: tiff-resolution 352.78 µm/px" in lines["mpp"]
    code, stdout, _ = run_cli(["info", str(slides_dir / "test3-DAPI-2-387.ndpi")])
    assert "reader      openslide\n" in stdout  # its extra levels: tiling keeps openslide


def test_qc_picture_of_a_store_tiled_without_qc_says_so(tmp_path: Path, cmu_small: Path) -> None:
    """Without scores every tile is drawn blue, as if it passed: the picture now says across
    its top that QC was not scored (it looked like a scored slide with nothing flagged)."""
    pictures = {}
    for qc in ("--qc", "--no-qc"):
        out = tmp_path / qc
        flags = [] if qc == "--qc" else [qc]
        assert run_cli(["tile", str(cmu_small), "--out", str(out), *SMALL, *flags])[0] == 0
        pictures[qc] = qc_overlay(_only_store(out))
    band = slice(0, 14), slice(0, 400)  # the caption's black band, white text on it
    unscored, scored = pictures["--no-qc"][band], pictures["--qc"][band]
    assert (unscored.max(axis=2) < 10).mean() > 0.7 and unscored.max() > 200
    assert (scored.max(axis=2) < 10).mean() < 0.1
