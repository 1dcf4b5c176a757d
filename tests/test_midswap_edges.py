"""A slide caught mid-swap (a re-tile killed between its renames, a re-embed's vectors set
aside) is named by ``export`` and ``search`` as ``embed`` and ``index`` name it: export left it
out without a word (rc 0, nowhere in its output or ``export.json``, or a failure for a
re-embed), and search said "no such slide store; run `wsi-ssl tile` first"."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import copy_two_slides, run_cli
from wsi_ssl.errors import StoreNotFoundError
from wsi_ssl.storage import open_store
from wsi_ssl.storage.embeddings import embedding_ids
from wsi_ssl.storage.slide_store import aside_path, staging_path

# small_archive's tiling settings (tests/conftest.py)
TILING = ["--tile-size", "224", "--codec", "zstd", "--tiles-per-chunk", "4"]
TILING += ["--tissue-threshold", "0", "--quiet"]


@pytest.fixture(scope="module")
def killed(
    small_archive: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str, str, str]:
    """A copy of the two-slide archive whose second slide's re-tile was killed (SIGKILL, a
    real ``wsi-ssl tile`` process) between the renames of its swap: (root, the other slide's
    id, the swapped slide's id, its file name)."""
    root, good, swapped = copy_two_slides(small_archive, tmp_path_factory.mktemp("killed"))
    entry = open_store(root).catalog.get(swapped)
    assert entry is not None
    code = "import sys; from wsi_ssl.cli.main import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", code, "tile", entry.path, "--out", str(root), *TILING]
    env = {**os.environ, "WSI_SSL_FAULT": "kill_before_rename:#swap-in"}
    done = subprocess.run([*argv, "--no-resume"], env=env, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    store = open_store(root).store_path(swapped)
    assert not store.exists() and aside_path(store).is_dir()  # between the renames
    return root, good, swapped, entry.name


def test_export_names_a_slide_whose_re_tile_was_killed_mid_swap(
    killed: tuple[Path, str, str, str], tmp_path: Path
) -> None:
    root, good, swapped, name = killed
    out = tmp_path / "feat"
    code, text, err = run_cli(["export", str(root), "--format", "clam-h5", "--out", str(out)])
    assert code == 0 and "error" not in err, err  # a note, as embed and index say it
    assert "1 slide(s) exported" in text and "0 failed" in text
    note = text.splitlines()[-1]
    assert f"left out ({name})" in note and f"`wsi-ssl check {root} --repair`" in note, text
    assert note.endswith("export again to add them")
    manifest = json.loads((out / "export.json").read_text())
    assert [row["slide"] for row in manifest["slides"]] == [good]
    [row] = manifest["left_out"]
    assert (row["slide"], row["name"]) == (swapped, name) and "mid-swap" in row["why"]
    assert sorted(p.name for p in out.glob("*.h5")) == [
        f"{Path(manifest['slides'][0]['source_path']).stem}.h5"
    ]
    code, text, _ = run_cli(["export", str(root), "--out", str(tmp_path / "again"), "--json"])
    report = json.loads(text)
    assert code == 0 and report["exported"] == 1 and report["failed"] == 0
    assert [r["slide"] for r in report["left_out"]] == [swapped] and len(report["notes"]) == 1


def test_search_on_a_slide_caught_mid_swap_says_so_and_how_to_end_it(
    killed: tuple[Path, str, str, str], tmp_path: Path
) -> None:
    root, _, swapped, name = killed
    code, _, err = run_cli(["search", str(root), "--slide", name, "--box", "0,0,600,600"])
    assert code == 2 and err.count("wsi-ssl: error: ") == 1, err
    assert (
        f"{root / 'slides' / swapped}.zarr: no such slide store; the slide is caught mid-swap"
        in err
    )
    assert f"`wsi-ssl check {root} --repair`" in err and "run `wsi-ssl tile` first" not in err
    # named to export (or to any command resolving names): the same (it said "no such slide")
    argv = ["export", str(root), "--out", str(tmp_path / "f"), "--slides", name, "--quiet"]
    code, _, err = run_cli(argv)
    assert code == 2 and "the slide is caught mid-swap" in err, err
    assert "no such slide in archive" not in err


def test_export_leaves_out_a_slide_whose_re_embed_was_killed_mid_swap(
    small_archive: Path, tmp_path: Path
) -> None:
    """The store in place, its vectors set aside by a re-embed killed before the new ones were
    renamed in: export failed the slide ("no embeddings", rc 1) though nothing is lost."""
    root, good, swapped = copy_two_slides(small_archive, tmp_path)
    name = open_store(root).catalog.get(swapped).name  # type: ignore[union-attr]
    vectors = open_store(root).store_path(swapped) / "embeddings"
    [eid] = embedding_ids(vectors.parent)
    (vectors / eid).rename(vectors / f".replaced-{eid}")
    for slides in ([], ["--slides", good, name]):
        out = tmp_path / f"feat{len(slides)}"
        code, text, err = run_cli(["export", str(root), "--out", str(out), *slides])
        assert code == 0 and "error" not in err, err
        assert "1 slide(s) exported" in text and f"left out ({name})" in text, text
        assert [r["slide"] for r in json.loads((out / "export.json").read_text())["left_out"]] == [
            swapped
        ]
    (vectors / f".replaced-{eid}").rename(vectors / eid)  # the swap undone: exported again
    code, text, _ = run_cli(["export", str(root), "--out", str(tmp_path / "feat0")])
    assert code == 0 and "2 slide(s) exported" in text and "left out" not in text
    assert json.loads((tmp_path / "feat0" / "export.json").read_text())["left_out"] == []


@pytest.mark.parametrize("how", ["old aside", "new beside"])
def test_opening_a_store_caught_mid_swap_says_so(
    small_archive: Path, tmp_path: Path, how: str
) -> None:
    """Only a store not in place with its old one set aside, or its new one complete beside
    it, is mid-swap; a missing store, or a first tiling's unfinished one, is not."""
    root, _, swapped = copy_two_slides(small_archive, tmp_path)
    archive = open_store(root)
    store = archive.store_path(swapped)
    store.rename(aside_path(store) if how == "old aside" else staging_path(store))
    with pytest.raises(StoreNotFoundError, match="caught mid-swap") as err:
        archive.slide(swapped)
    assert f"`wsi-ssl check {root} --repair`" in str(err.value)
    if how == "new beside":  # an unfinished new store alone: a first tiling, not a swap
        meta = staging_path(store) / "zarr.json"
        meta.write_text(meta.read_text().replace('"complete"', '"writing"'))
    else:
        shutil.rmtree(aside_path(store))
    with pytest.raises(StoreNotFoundError, match="run `wsi-ssl tile` first"):
        archive.slide(swapped)


def test_export_names_a_store_left_unfinished(small_archive: Path, tmp_path: Path) -> None:
    """A store whose tiling is running or was killed (status "writing"): export names it as
    embed does (it was left out without a word)."""
    from wsi_ssl.storage.slide_store import SlideStore

    root, _, unfinished = copy_two_slides(small_archive, tmp_path)
    SlideStore.open(open_store(root).store_path(unfinished), mode="r+").group.attrs["status"] = (
        "writing"
    )
    code, text, err = run_cli(["export", str(root), "--out", str(tmp_path / "feat"), "--json"])
    report = json.loads(text)
    assert code == 0 and report["exported"] == 1, err
    assert report["notes"] == [
        f"left out 1 store(s) that are not complete ({unfinished}: being tiled or re-tiled "
        "now, or by a killed job; `wsi-ssl check` says what to do)"
    ]


def test_names_looked_up_while_a_first_tiling_is_unfinished(
    small_archive: Path, tmp_path: Path
) -> None:
    """A new slide's first tiling killed before its store went in place (no catalog row yet):
    a name of no slide says so, and the new slide's name (read from its new store) says it is
    caught before its last rename and how that ends (both ended in a RecursionError)."""
    from wsi_ssl.synthetic import write_synthetic_slide

    root, _, _ = copy_two_slides(small_archive, tmp_path)
    new = write_synthetic_slide(tmp_path / "new.tiff", (600, 500), seed=9)
    code = "import sys; from wsi_ssl.cli.main import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", code, "tile", str(new), "--out", str(root), *TILING]
    env = {**os.environ, "WSI_SSL_FAULT": "kill_before_rename:#swap-in"}
    assert subprocess.run(argv, env=env, capture_output=True).returncode == -signal.SIGKILL
    assert open_store(root).swapping()  # its store is not in place
    out = ["--out", str(tmp_path / "f"), "--quiet"]
    code_, _, err = run_cli(["export", str(root), "--slides", "typo", *out])
    assert code_ == 2 and "'typo': no such slide in archive" in err, err
    code_, _, err = run_cli(["export", str(root), "--slides", "new.tiff", *out])
    assert code_ == 2 and "no such slide store; the slide is caught mid-swap" in err, err


def test_repair_that_finishes_a_killed_retile_records_its_settings(
    small_archive: Path, tmp_path: Path
) -> None:
    """`check --repair` swaps in a killed re-tile's complete new store: the catalog takes its
    settings (it kept the old row, and check's later re-tile fix reverted the slide to them)."""
    root, _, swapped = copy_two_slides(small_archive, tmp_path)
    entry = open_store(root).catalog.get(swapped)
    assert entry is not None and entry.tiling["tile_size"] == 224
    other = [a if a != "224" else "256" for a in TILING]  # another tile size
    code = "import sys; from wsi_ssl.cli.main import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", code, "tile", entry.path, "--out", str(root), *other]
    env = {**os.environ, "WSI_SSL_FAULT": "kill_before_rename:#swap-in"}
    done = subprocess.run([*argv, "--discard-embeddings"], env=env, capture_output=True)
    assert done.returncode == -signal.SIGKILL
    assert run_cli(["check", str(root), "--repair"])[0] in (0, 1)
    store = open_store(root).slide(swapped)
    assert store.tiling["tile_size"] == 256  # rolled forward
    after = open_store(root).catalog.get(swapped)
    assert after is not None and after.tiling["tile_size"] == 256
    assert after.n_tiles == store.n_tiles
    next(p for p in (store.path / "tiles" / "c").rglob("*") if p.is_file()).unlink()
    code_, report, _ = run_cli(["check", str(root)])
    fix = next(line for line in report.splitlines() if "fix: " in line)
    assert code_ == 1 and "--tile-size" not in fix, report  # 256, the default (it said 224)


def test_commands_in_notes_and_errors_name_the_root_quoted_for_the_shell() -> None:
    """A root with a space and a quote: the commands that notes and errors print split into
    the words meant when pasted (the root split at the space, or the quote broke the line)."""
    import re
    import shlex

    from wsi_ssl.storage.swaps import mid_swap_note

    root = Path("/data/it's a root")
    store = root / "slides" / "0123456789abcdef.zarr"
    texts = [
        mid_swap_note(["s1.tiff"], root, kept=False, then="export again to add them"),
        str(StoreNotFoundError(store, "slide store", mid_swap=True)),
    ]
    for text in texts:
        (command,) = re.findall(r"`(wsi-ssl check [^`]*)`", text)
        assert shlex.split(command) == ["wsi-ssl", "check", str(root), "--repair"], text
