"""``wsi-ssl check`` names the slides an index lacks though they have sound embeddings by its
encoder: a full build left one out damaged, the slide was then fixed (re-tiled and re-embedded,
or re-embedded), and check said the archive was clean while searches never returned it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import copy_two_slides, run_cli
from wsi_ssl.search import SearchIndex
from wsi_ssl.storage import open_store
from wsi_ssl.storage.embeddings import embedding_ids

# small_archive's tiling settings (tests/conftest.py)
TILING = ["--tile-size", "224", "--codec", "zstd", "--tiles-per-chunk", "4"]
TILING += ["--tissue-threshold", "0", "--quiet"]


def _damage(root: Path, slide_id: str, what: str) -> None:
    """The slide's store metadata ("store") or one chunk of its embeddings overwritten."""
    store = open_store(root).store_path(slide_id)
    if what == "store":
        (store / "zarr.json").write_text("{bad")
        return
    [eid] = embedding_ids(store)
    chunk = next(p for p in sorted((store / "embeddings" / eid / "c").rglob("*")) if p.is_file())
    chunk.write_bytes(b"xx")


@pytest.mark.parametrize("what", ["store", "embeddings"])
def test_check_names_a_slide_left_out_damaged_once_it_is_fixed(
    small_archive: Path, tmp_path: Path, what: str
) -> None:
    root, good, bad = copy_two_slides(small_archive, tmp_path)
    entry = open_store(root).catalog.get(bad)
    assert entry is not None
    _damage(root, bad, what)
    code, out, _ = run_cli(["index", str(root), "--encoder", "random-cnn", "--quiet"])
    assert code == 1 and "left out 1 damaged slide(s)" in out, out
    name = SearchIndex.open(root).name
    assert [e.slide_id for e in SearchIndex.open(root).slides] == [good]
    if what == "store":  # marked for re-tiling, re-tiled
        assert run_cli(["check", str(root), "--repair"])[0] == 1  # marks it, to re-tile
        code, out, err = run_cli(["tile", entry.path, "--out", str(root), *TILING])
        assert code == 0, err
    code, out, err = run_cli(["embed", str(root), "--encoder", "random-cnn", "--quiet"])
    assert code == 0, err  # (a re-tile of the same tiles keeps the store's embeddings)
    assert embedding_ids(open_store(root).slide(bad)) == [SearchIndex.open(root).encoder_id]
    code, report, _ = run_cli(["check", str(root), "--quick"])
    assert code == 1, report
    problem = (
        f"problem: {root / 'index' / name}: 1 slide(s) with complete embeddings by its encoder "
        f"not in it ({entry.name}); searches never return them"
    )
    fix = f"wsi-ssl index {root} --name {name} --add"
    assert f"{problem}\n    fix: {fix}\n" in report, report
    assert report.count("problem: ") == 1
    assert run_cli([*fix.split()[1:], "--quiet"])[0] == 0
    assert sorted(e.slide_id for e in SearchIndex.open(root).slides) == sorted([good, bad])
    assert run_cli(["check", str(root), "--quick"])[0] == 0
    # a slide taken out on purpose stays out: not named
    assert run_cli(["index", str(root), "--name", name, "--remove", bad, "--quiet"])[0] == 0
    code, report, _ = run_cli(["check", str(root), "--quick"])
    assert code == 0 and "not in it" not in report, report


def test_an_index_built_from_chosen_slides_is_checked_and_rebuilt_as_chosen(
    small_archive: Path, tmp_path: Path
) -> None:
    """``index --slides``: check does not count the others as missing (it asked to --add them),
    and the fix for its damage rebuilds it from the slides it held (it rebuilt every slide)."""
    root, first, second = copy_two_slides(small_archive, tmp_path)
    argv = ["index", str(root), "--name", "sub", "--slides", first, "--kind", "flat", "--quiet"]
    assert run_cli(argv)[0] == 0
    code, out, _ = run_cli(["check", str(root)])
    assert code == 0 and " 0 problem(s)" in out, out
    faiss_file = SearchIndex.open(root, "sub").files.path / "index.faiss"
    faiss_file.write_bytes(faiss_file.read_bytes()[:100])
    code, out, _ = run_cli(["check", str(root)])
    fix = next(line for line in out.splitlines() if "fix: wsi-ssl index" in line)
    assert code == 1 and fix.endswith(f"--name sub --kind flat --slides {first}"), out
    assert run_cli([*fix.split("fix: wsi-ssl ", 1)[1].split(), "--quiet"])[0] == 0
    rebuilt = SearchIndex.open(root, "sub")
    assert [s["slide_id"] for s in rebuilt.slides] == [first] and second != first
    assert run_cli(["check", str(root)])[0] == 0
