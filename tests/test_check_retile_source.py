"""The re-tile ``wsi-ssl check`` asks for a damaged store names the file the slide was tiled
from: when that file now holds another slide, or is gone, the fix says so and what redoes the
store (the plain command tiled the other slide under another id, exit 0, and left the damaged
store damaged for good)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.conftest import run_cli
from wsi_ssl.storage import open_store
from wsi_ssl.synthetic import write_synthetic_slide

FLAGS = ["--tissue-threshold", "0", "--tiles-per-chunk", "4", "--quiet"]


def _damaged(tmp_path: Path) -> tuple[Path, Path, str]:
    """An archive whose one store lost its metadata; the slide file and its id."""
    slide = write_synthetic_slide(tmp_path / "slides" / "a.tiff", (1200, 900), seed=1)
    root = tmp_path / "root"
    code, out, err = run_cli(["tile", str(slide), "--out", str(root), *FLAGS, "--json"])
    assert code == 0, (out, err)
    slide_id = json.loads(out)["slides"][0]["slide_id"]
    meta = root / "slides" / f"{slide_id}.zarr" / "zarr.json"
    meta.write_text(meta.read_text()[:40])
    return root, slide, slide_id


def _fix(out: str) -> str:
    [fix] = [line for line in out.splitlines() if line.startswith("    fix: ")]
    return fix.removeprefix("    fix: ")


def test_the_fix_of_a_store_whose_file_now_holds_another_slide_says_so(tmp_path: Path) -> None:
    root, slide, slide_id = _damaged(tmp_path)
    code, out, _ = run_cli(["check", str(root)])
    plain = _fix(out)
    assert code == 1 and plain.startswith(f"wsi-ssl tile {slide} --out {root} "), out
    saved = tmp_path / "saved.tiff"
    shutil.copy(slide, saved)
    write_synthetic_slide(slide, (1000, 800), seed=2)  # another scan saved under its name
    code, out, _ = run_cli(["check", str(root)])
    fix = _fix(out)
    assert code == 1 and fix.startswith(f"the file at {slide} now holds another slide (id "), fix
    assert "not this one: restore the slide's file" in fix
    assert f"{plain} (with its new path if it is elsewhere)" in fix
    assert f"or give the slide up: rm -r {root / 'slides' / f'{slide_id}.zarr'}, then " in fix
    # --repair marks it, without promising that a re-run of its tiling job redoes it
    code, out, _ = run_cli(["check", str(root), "--repair"])
    fix = _fix(out)
    assert fix.startswith("marked for re-tiling: the file at "), fix
    # what the fix says works: the slide's own file, under any name, redoes its store
    argv = ["tile", str(saved), "--out", str(root), *FLAGS, "--no-resume", "--json"]
    code, out, err = run_cli(argv)
    assert code == 0 and json.loads(out)["slides"][0]["slide_id"] == slide_id, (out, err)
    assert open_store(root).slide_ids == [slide_id]
    assert run_cli(["check", str(root)])[0] == 0


def test_the_fix_of_a_store_whose_file_is_gone_says_so(tmp_path: Path) -> None:
    root, slide, slide_id = _damaged(tmp_path)
    slide.rename(tmp_path / "moved.tiff")
    code, out, _ = run_cli(["check", str(root)])
    fix = _fix(out)
    assert code == 1 and fix.startswith(f"its slide file {slide} is gone (moved or deleted): "), fix
    assert "restore the slide's file" in fix and "give the slide up: rm -r " in fix
    moved = tmp_path / "moved.tiff"
    argv = ["tile", str(moved), "--out", str(root), *FLAGS, "--no-resume", "--json"]
    code, out, err = run_cli(argv)  # the file where it is now redoes the store
    assert code == 0 and json.loads(out)["slides"][0]["slide_id"] == slide_id, (out, err)
    assert run_cli(["check", str(root)])[0] == 0


def test_a_relative_recorded_path_is_not_judged_gone(tmp_path: Path, monkeypatch) -> None:
    """Older catalogs kept the path as given (relative): from another folder it names no file,
    which is no reason to advise giving the slide up."""
    from dataclasses import asdict

    from wsi_ssl.storage import Catalog

    root, _, slide_id = _damaged(tmp_path)
    catalog = Catalog(root / "catalog.sqlite")
    entry = catalog.get(slide_id)
    assert entry is not None
    row = {k: v for k, v in asdict(entry).items() if k != "path"}
    catalog.upsert(path="slides/a.tiff", **row)  # as tiled from tmp_path
    monkeypatch.chdir(root)  # elsewhere: slides/a.tiff is not there
    code, out, _ = run_cli(["check", str(root)])
    assert code == 1 and _fix(out).startswith("wsi-ssl tile slides/a.tiff --out "), out
