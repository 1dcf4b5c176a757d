"""`wsi-ssl demo` when no slide gets tiled: it says why, exits 1, and leaves no ``OUT/archive``
folder behind (it left one holding only the failures' catalog and lock files); an archive
folder that was there before the run is kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsi_ssl.cli.main import main
from wsi_ssl.config import TilingConfig
from wsi_ssl.demo import run_demo

NONE_TILED = "  no slide was tiled (the FAILED {} why); the later stages need at least one"


@pytest.mark.parametrize(
    "names",
    [
        ["not-a-tiff.svs"],
        ["unopenable.tiff"],
        ["unreadable.svs", "not-a-tiff.svs"],
    ],
)
def test_broken_slides_leave_no_archive_folder(
    names: list[str], broken_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    slides = [str(broken_dir / name) for name in names]
    assert main(["demo", *slides, "--out", str(out), "--quiet"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "== tile"
    assert [line.split(": ")[0] for line in lines[1:-1]] == [f"  FAILED {s}" for s in slides]
    said = "lines above say" if len(names) > 1 else "line says"
    assert lines[-1] == NONE_TILED.format(said)
    assert not (out / "archive").exists()


def test_a_slide_without_enough_tissue_leaves_no_archive_folder(
    slides_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """boxes.tiff, scaled, has no tile with 95% tissue: nothing tiled, through the Python API."""
    out = tmp_path / "demo"
    tiling = TilingConfig(mpp_override=1.0, tissue_threshold=0.95)
    result = run_demo(out, [slides_dir / "boxes.tiff"], tiling=tiling, progress=False)
    assert result.failed and result.tiled == 0 and result.pictures == []
    assert result.lines[0] == "== tile" and "no tile has at least 95% tissue" in result.lines[1]
    assert result.lines[2:] == [NONE_TILED.format("line says").lstrip()]
    assert result.root == out / "archive" and not result.root.exists()
    assert capsys.readouterr().out == ""


def test_an_archive_folder_there_before_the_run_is_kept(
    broken_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    (out / "archive").mkdir(parents=True)
    mine = out / "archive" / "notes.txt"
    mine.write_text("mine")
    assert main(["demo", str(broken_dir / "not-a-tiff.svs"), "--out", str(out), "--quiet"]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == NONE_TILED.format("line says")
    assert mine.read_text() == "mine"
    assert (out / "archive" / "catalog.sqlite").is_file()  # this run's, in a folder it found
