"""Damage that reads as something else is named where it is read, not only by ``wsi-ssl check``.

A lost chunk file of a store's small arrays (coords, tissue fraction, pictures, QC scores) reads
as zarr's fill value: every read through the store API checks the values against the sha256
recorded at completion, so ``embed`` refuses that slide instead of embedding it at (0, 0) over
its good vectors. A store whose root ``zarr.json`` is lost is damaged, not absent; a slide named
with ``--slides`` whose store is damaged is said to be damaged, not missing. Real tile + embed +
index (``small_archive``), real files deleted."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.conftest import run_cli
from tests.test_store_checksums import READERS as CHECKED_READS
from wsi_ssl.errors import StoreCorruptError
from wsi_ssl.search import SearchIndex
from wsi_ssl.storage import SlideStore, open_store
from wsi_ssl.storage.check import check_archive
from wsi_ssl.storage.resolve import resolve_slides

READERS = {name: read for name, read in CHECKED_READS.items() if not name.startswith("labels/")}
"""Arrays of a store whose values are not all zeros, and the public read that returns each."""
LOST = "changed since tiling (chunk files lost or altered)"
EMBED = ["embed", "--encoder", "random-cnn", "--device", "cpu", "--workers", "0", "--quiet"]


def _copy(small_archive: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A copy of the archive, the store of its slide ``s1.tiff`` and of ``s2.tiff``."""
    root = Path(shutil.copytree(small_archive, tmp_path / "root"))
    stores = {
        store.source_name: store.path
        for store in (open_store(root).slide(sid) for sid in open_store(root).slide_ids)
    }
    return root, stores["s1.tiff"], stores["s2.tiff"]


def _lose_chunks(store: Path, array: str) -> None:
    """Delete every chunk file of ``array`` (its metadata stays: it reads as fill values)."""
    chunks = [p for p in (store / array / "c").rglob("*") if p.is_file()]
    assert chunks, array
    for chunk in chunks:
        chunk.unlink()


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _check_advice(root: Path) -> str:
    return f"`wsi-ssl check {shlex.quote(str(root))}` prints the tile command that redoes it"


@pytest.mark.parametrize("array", list(READERS))
def test_a_lost_chunk_file_of_a_small_array_fails_its_read_naming_the_store_and_the_array(
    small_archive: Path, tmp_path: Path, array: str
) -> None:
    root, store_path, _ = _copy(small_archive, tmp_path)
    assert np.any(zarr.open_array(store_path / array, mode="r")[...]), array  # zeros: no tell
    _lose_chunks(store_path, array)
    store = SlideStore.open(store_path)
    with pytest.raises(StoreCorruptError) as caught:
        READERS[array](store)
    assert caught.value.path == store_path
    assert caught.value.detail == f"{array} {LOST}"
    assert str(caught.value).endswith(_check_advice(root))
    assert store.problem() == caught.value.detail  # check's own words, unchanged


def test_a_store_without_recorded_digests_reads_its_lost_chunks_as_before(
    small_archive: Path, tmp_path: Path
) -> None:
    """A store completed before ``contents_sha256`` was recorded has nothing to compare."""
    _, store_path, _ = _copy(small_archive, tmp_path)
    meta = json.loads((store_path / "zarr.json").read_text())
    del meta["attributes"]["contents_sha256"]
    (store_path / "zarr.json").write_text(json.dumps(meta))
    _lose_chunks(store_path, "coords")
    store = SlideStore.open(store_path)
    assert store.recorded_contents == {}
    assert not store.coords.any() and len(store.coords) == store.n_tiles


@pytest.mark.parametrize(
    ("array", "flags"),
    [("coords", []), ("qc/focus", ["--skip-flagged-tiles", "--no-resume"])],
    ids=["coords", "qc-focus"],
)
def test_embed_refuses_a_store_with_a_lost_chunk_and_keeps_its_embeddings(
    small_archive: Path, tmp_path: Path, array: str, flags: list[str]
) -> None:
    """Before, the slide was embedded again as "complete" from zero coordinates (or with every
    tile's focus score 0), over its good vectors; now it fails, named, and the others go on."""
    root, damaged, other = _copy(small_archive, tmp_path)
    before = _files(damaged / "embeddings")
    _lose_chunks(damaged, array)
    code, _, err = run_cli([EMBED[0], str(root), *EMBED[1:], *flags])
    line = f"{damaged}: slide store is damaged ({array} {LOST}); {_check_advice(root)}"
    assert code == 1, err
    assert err.strip().splitlines()[-1] == f"wsi-ssl: error: {line}"
    assert _files(damaged / "embeddings") == before  # byte for byte
    other_id = other.name.removesuffix(".zarr")
    encoders = open_store(small_archive).embedding_ids(other_id)
    assert open_store(root).embedding_ids(other_id) == encoders  # the same encoder, done


def test_a_store_without_its_zarr_json_is_damaged_not_absent(
    small_archive: Path, tmp_path: Path
) -> None:
    """It is listed among the damaged stores, with check's tile command, and ``index --add``
    keeps its vectors (it used to remove them as "embeddings gone")."""
    root, damaged, _ = _copy(small_archive, tmp_path)
    slide_id = damaged.name.removesuffix(".zarr")
    vectors = SearchIndex.open(root).n_vectors
    (damaged / "zarr.json").unlink()
    scan = open_store(root).scan()
    assert slide_id not in scan.complete + scan.incomplete
    (err,) = scan.damaged
    assert isinstance(err, StoreCorruptError) and err.path == damaged
    assert err.detail == "its zarr.json, the store's metadata, is missing"
    (finding,) = [f for f in check_archive(root).findings if f.path == str(damaged)]
    assert finding.problem == f"slide store is damaged ({err.detail})"
    assert finding.fix.startswith("wsi-ssl tile ") and "s1.tiff" in finding.fix
    code, _, stderr = run_cli(["index", str(root), "--add", "--quiet"])
    assert code == 1 and f"{damaged}: slide store is damaged" in stderr, stderr
    index = SearchIndex.open(root)
    assert index.n_vectors == vectors and index.number_of(slide_id) is not None


@pytest.mark.parametrize("how", ["id", "file name", "id prefix"])
def test_a_slide_named_whose_store_is_damaged_is_said_damaged_not_missing(
    small_archive: Path, tmp_path: Path, how: str
) -> None:
    root, damaged, _ = _copy(small_archive, tmp_path)
    slide_id = damaged.name.removesuffix(".zarr")
    name = {"id": slide_id, "file name": "s1.tiff", "id prefix": slide_id[:6]}[how]
    (damaged / "tiles" / "zarr.json").unlink()
    with pytest.raises(StoreCorruptError) as caught:
        resolve_slides(open_store(root), [name])
    assert caught.value.path == damaged
    out = tmp_path / "out"
    code, _, err = run_cli(
        ["export", str(root), "--format", "pt", "--out", str(out), "--slides", name]
    )
    assert code != 0 and "no such slide" not in err, err
    assert f"{damaged}: slide store is damaged (" in err and _check_advice(root) in err
    code, _, err = run_cli(
        ["export", str(root), "--format", "pt", "--out", str(out), "--slides", "nope"]
    )
    assert code != 0 and "'nope': no such slide in archive" in err, err
