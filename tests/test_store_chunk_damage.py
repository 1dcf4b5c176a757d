"""A chunk file of a store's coords, tissue fraction, thumbnail or QC scores overwritten with
bytes its codec cannot decode is one damaged store: ``check`` names it with its re-tile and
checks the others; ``embed`` and ``export`` do the other slides and name it (exit 1). Such a
chunk used to stop every one of them with a bare "RuntimeError: Zstd decompression error"."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli
from wsi_ssl.errors import StoreCorruptError
from wsi_ssl.storage import open_store
from wsi_ssl.storage.embeddings import embedding_status

GARBAGE = b"not a zstd frame"


def _damaged_copy(small_archive: Path, tmp_path: Path, array: str) -> tuple[Path, str, str]:
    """A copy of the archive whose second slide has garbage in the first chunk file of
    ``array``; returns the root, the intact slide's id and the damaged one's."""
    root = shutil.copytree(small_archive, tmp_path / "root")
    good, bad = open_store(root).slide_ids
    chunks = root / "slides" / f"{bad}.zarr" / array / "c"
    min(p for p in chunks.rglob("*") if p.is_file()).write_bytes(GARBAGE)
    return root, good, bad


@pytest.mark.parametrize("array", ["coords", "tissue_fraction", "qc/focus", "thumbnail"])
def test_check_names_the_store_with_the_undecodable_chunk_and_its_re_tile_mends_it(
    small_archive: Path, tmp_path: Path, array: str
) -> None:
    root, good, bad = _damaged_copy(small_archive, tmp_path, array)
    store = root / "slides" / f"{bad}.zarr"
    code, out, err = run_cli(["check", str(root)])
    assert code == 1 and err == "", err
    [problem] = [line for line in out.splitlines() if line.startswith("problem: ")]
    assert problem.startswith(f"problem: {store}: a chunk file of {array} does not decode: ")
    fix = out.split("fix: ", 1)[1].splitlines()[0]
    assert fix.startswith("wsi-ssl tile ") and fix.endswith(" --no-resume"), out
    # the intact store and its embeddings were checked: only the damaged one's were not
    assert out.strip().splitlines()[-1] == (
        "checked 2 store(s), 1 embeddings array(s), 1 index(es): 1 problem(s)"
    )
    code, out, err = run_cli(["check", str(root), "--repair"])
    assert code == 1 and "fix: marked for re-tiling" in out, out + err
    catalog = open_store(root).catalog
    assert catalog.get(bad).status == "failed"  # type: ignore[union-attr]
    assert catalog.get(good).status == "complete"  # type: ignore[union-attr]
    code, _, err = run_cli(fix.split()[1:])
    assert code == 0, err
    assert run_cli(["check", str(root)])[0] == 0


@pytest.mark.parametrize("array", ["coords", "qc/focus", "tissue_fraction"])
def test_reading_an_undecodable_array_is_a_store_corrupt_error_naming_store_and_array(
    small_archive: Path, tmp_path: Path, array: str
) -> None:
    root, _, bad = _damaged_copy(small_archive, tmp_path, array)
    store = open_store(root).slide(bad)
    read = {
        "coords": lambda: store.coords,
        "qc/focus": store.qc,
        "tissue_fraction": lambda: store.tissue_fraction,
    }[array]
    with pytest.raises(StoreCorruptError) as caught:
        read()
    assert caught.value.path == store.path
    assert caught.value.detail.startswith(f"a chunk file of {array} does not decode: ")
    assert store.problem() == caught.value.detail


def test_embed_and_export_do_the_other_slide_and_name_the_one_with_undecodable_coords(
    small_archive: Path, tmp_path: Path
) -> None:
    root, good, bad = _damaged_copy(small_archive, tmp_path, "coords")
    argv = ["embed", str(root), "--encoder", "random-cnn", "--no-resume", "--json", "--quiet"]
    code, out, err = run_cli(argv)
    assert code == 1 and err.count("wsi-ssl: error: ") == 1, err
    assert f"{bad}.zarr: slide store is damaged (a chunk file of coords" in err
    slides = {s["slide"]: s for s in json.loads(out)["slides"]}
    assert slides[good]["status"] == "complete" and slides[good]["n_tiles"] > 0
    assert slides[bad]["status"] == "failed"
    assert slides[bad]["error_type"] == "StoreCorruptError"
    [eid] = {e.name for e in (root / "slides" / f"{good}.zarr" / "embeddings").iterdir()} - {
        "zarr.json"
    }
    assert embedding_status(open_store(root).slide(good), eid) == "complete"

    out_dir = tmp_path / "h5"
    code, out, err = run_cli(["export", str(root), "--out", str(out_dir), "--json", "--quiet"])
    assert code == 1 and f"{bad}.zarr: slide store is damaged" in err, err
    report = json.loads(out)
    assert (report["exported"], report["failed"]) == (1, 1)
    [done] = [s for s in report["slides"] if s["status"] == "complete"]
    assert done["slide_id"] == good and Path(done["file"]).is_file()
    assert [e["slide"] for e in report["errors"]] == [bad]


def test_index_builds_from_the_other_slide_when_one_has_undecodable_coords(
    small_archive: Path, tmp_path: Path
) -> None:
    root, good, bad = _damaged_copy(small_archive, tmp_path, "coords")
    shutil.rmtree(root / "index")
    code, out, err = run_cli(["index", str(root), "--encoder", "random-cnn", "--json", "--quiet"])
    assert "unexpected" not in err and err.count("wsi-ssl: error: ") == 1, err
    assert f"{bad}.zarr: slide store is damaged (a chunk file of coords" in err
    assert code == 1, err
    report = json.loads(out)
    [damaged] = report["damaged"]
    assert damaged.startswith(f"{root / 'slides' / bad}.zarr: slide store is damaged")
    from wsi_ssl.search import SearchIndex

    assert [e.slide_id for e in SearchIndex.open(root).slides] == [good]
