"""Index edge cases: a slide caught mid-swap is named, not left out silently, by a fresh build
(CLI and Python) as by an update; a tile hit's whole-pixel size on a slide whose tiles are a
fractional number of level-0 pixels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.conftest import copy_two_slides, embedded_tiles, run_cli
from wsi_ssl.errors import EmbeddingsNotFoundError
from wsi_ssl.search import SearchIndex
from wsi_ssl.storage import open_store
from wsi_ssl.storage.embeddings import embedding_ids
from wsi_ssl.storage.locks import embeddings_lock
from wsi_ssl.storage.slide_store import aside_path, staging_path


def _swap(root: Path, slide_id: str, how: str) -> None:
    """Leave ``slide_id`` as a job killed between the renames of its swap leaves it: a re-embed
    with the old vectors set aside ("re-embed"), a re-tile with the old store set aside
    ("re-tile: old aside") or with the new store complete beside ("re-tile: new beside")."""
    store = open_store(root).store_path(slide_id)
    if how == "re-embed":
        vectors = store / "embeddings"
        [eid] = embedding_ids(store)
        (vectors / eid).rename(vectors / f".replaced-{eid}")
    elif how == "re-tile: old aside":
        store.rename(aside_path(store))
    else:
        store.rename(staging_path(store))


def _build(root: Path) -> tuple[int, dict, str]:
    code, out, err = run_cli(["index", str(root), "--encoder", "random-cnn", "--json", "--quiet"])
    return code, json.loads(out) if out else {}, err


SWAPS = ["re-embed", "re-tile: old aside", "re-tile: new beside"]


@pytest.mark.parametrize("how", SWAPS)
def test_a_fresh_build_names_a_slide_caught_mid_swap(
    small_archive: Path, tmp_path: Path, how: str
) -> None:
    """The build left the slide out and said nothing (``index --add`` keeps and notes one it
    had indexed); now it names it, with what brings it in, and the repair and an update do."""
    root, good, swapped = copy_two_slides(small_archive, tmp_path)
    name = open_store(root).catalog.get(swapped).name  # type: ignore[union-attr]
    full = embedded_tiles(root, good) + embedded_tiles(root, swapped)
    _swap(root, swapped, how)
    code, report, err = _build(root)
    assert code == 0 and "error" not in err, err
    [note] = report["notes"]
    assert f"left out ({name})" in note and f"wsi-ssl check {root} --repair" in note
    assert f"`wsi-ssl index {root} --name {report['index']['name']} --add` adds them" in note
    assert report["index"]["n_slides"] == 1 and report["index"]["n_vectors"] == embedded_tiles(
        root, good
    )
    assert "damaged" not in report
    code, out, _ = run_cli(["index", str(root), "--encoder", "random-cnn", "--quiet"])
    assert code == 0 and out.startswith(
        f"1 slide(s) being re-tiled or re-embedded now, or left so by a killed job, left out ({name})"
    )
    index = SearchIndex.build(root, "random-cnn")  # the Python build says it too
    assert index.notes == [note] and [e.slide_id for e in index.slides] == [good]
    assert SearchIndex.open(root).notes == []
    code, _, err = run_cli(["check", str(root), "--repair"])
    assert code == 0, err
    summary = SearchIndex.open(root).add()
    assert summary.added == [swapped] and summary.notes == []
    assert SearchIndex.open(root).n_vectors == full


def test_an_update_names_a_slide_not_indexed_yet_caught_mid_swap(
    small_archive: Path, tmp_path: Path
) -> None:
    """``index --add`` kept and noted an indexed slide mid-swap, but left one it had not
    indexed yet out without a word (and, once it named it, still called the index up to
    date)."""
    root, good, swapped = copy_two_slides(small_archive, tmp_path)
    name = open_store(root).catalog.get(swapped).name  # type: ignore[union-attr]
    SearchIndex.build(root, "random-cnn", slides=[good])
    _swap(root, swapped, "re-embed")
    code, out, err = run_cli(["index", str(root), "--add", "--json", "--quiet"])
    assert code == 0, err
    report = json.loads(out)
    assert report["added"] == [] and report["removed"] == []
    [note] = report["notes"]  # not "the index is up to date": a slide was left out
    assert f"left out ({name})" in note and "--add` adds them" in note
    _swap(root, good, "re-embed")  # now the indexed one too: kept, and said apart
    kept, left_out = SearchIndex.open(root).add().notes
    assert "kept as indexed" in kept and left_out == note
    assert [e.slide_id for e in SearchIndex.open(root).slides] == [good]


def _command(note: str) -> list[str]:
    """The arguments of the ``wsi-ssl`` command a note says to run last, as printed."""
    command = note.split("`")[-2].split()
    assert command[0] == "wsi-ssl"
    return command[1:]


def test_the_command_a_mid_swap_note_prints_works_with_several_indexes(
    small_archive: Path, tmp_path: Path
) -> None:
    """The notes said ``wsi-ssl index ROOT --add``, which with several indexes in the archive
    exits 2 ("several indexes ...; pass --name"): they name the index, and what they print
    adds the slide left out and updates the one kept."""
    root, good, swapped = copy_two_slides(small_archive, tmp_path)  # indexed: one index already
    assert run_cli(["index", str(root), "--name", "both", "--quiet"])[0] == 0
    _swap(root, swapped, "re-embed")
    code, out, err = run_cli(["index", str(root), "--name", "one", "--quiet"])
    assert code == 0, err
    left_out = out.splitlines()[0]
    assert f"`wsi-ssl index {root} --name one --add` adds them" in left_out
    code, out, err = run_cli(["index", str(root), "--name", "both", "--add", "--json", "--quiet"])
    assert code == 0, err
    [kept] = json.loads(out)["notes"]
    assert "kept as indexed" in kept and f"`wsi-ssl index {root} --name both --add` brings" in kept
    assert run_cli(["check", str(root), "--repair"])[0] == 0
    code, out, err = run_cli([*_command(left_out), "--json", "--quiet"])
    assert code == 0, err
    assert json.loads(out)["added"] == [swapped]
    assert SearchIndex.open(root, "one").n_vectors == embedded_tiles(root, good) + embedded_tiles(
        root, swapped
    )
    code, out, err = run_cli([*_command(kept), "--json", "--quiet"])
    assert code == 0 and json.loads(out)["notes"] == [
        "no new or re-embedded slides; the index is up to date"
    ], err


def test_a_build_with_every_slide_mid_swap_names_them_not_embed(
    small_archive: Path, tmp_path: Path
) -> None:
    """Every slide mid-swap: the build said "no complete embeddings ... run `wsi-ssl embed`",
    sending the user to embed again what is embedded; it names the slides and the repair."""
    root, good, swapped = copy_two_slides(small_archive, tmp_path)
    shutil.rmtree(root / "index")
    store = open_store(root)
    names = sorted(store.catalog.get(s).name for s in (good, swapped))  # type: ignore[union-attr]
    eid = embedding_ids(store.store_path(good))[0]
    _swap(root, good, "re-embed")
    _swap(root, swapped, "re-tile: old aside")
    for encoder in (["--encoder", "random-cnn"], []):
        code, out, err = run_cli(["index", str(root), *encoder, "--quiet"])
        assert code == 2 and out == "" and "wsi-ssl embed" not in err
        assert err.startswith(
            f"wsi-ssl: error: {root}: no complete embeddings {eid!r} (available: none); 2 slide(s)"
            " being re-tiled or re-embedded now"
        )
        assert f"left out ({', '.join(names)})" in err
        assert f"`wsi-ssl check {root} --repair`" in err
    with pytest.raises(EmbeddingsNotFoundError, match="being re-tiled or re-embedded"):
        SearchIndex.build(root)
    with pytest.raises(EmbeddingsNotFoundError, match="run `wsi-ssl embed`"):
        SearchIndex.build(root, "another-encoder")  # nothing of it mid-swap: as before
    assert run_cli(["check", str(root), "--repair"])[0] == 0
    assert SearchIndex.build(root).n_vectors == embedded_tiles(root, good) + embedded_tiles(
        root, swapped
    )


def test_a_slide_with_nothing_of_the_encoder_to_swap_in_is_not_named(
    small_archive: Path, tmp_path: Path
) -> None:
    """A re-embed still writing with no vectors set aside, and a first tiling being written,
    hold nothing an index could take: neither is named mid-swap. The slide is named as being
    embedded while its writer holds the lock, and as not embedded once that writer is gone."""
    root, good, swapped = copy_two_slides(small_archive, tmp_path)
    vectors = open_store(root).store_path(swapped) / "embeddings"
    [eid] = embedding_ids(vectors.parent)
    (vectors / eid).rename(vectors / f".writing-{eid}")
    zarr.open_array(vectors / f".writing-{eid}", mode="r+").attrs["status"] = "writing"
    staging_path(open_store(root).store_path("0" * 16)).mkdir()  # a first tiling writing
    name = open_store(root).catalog.get(swapped).name  # type: ignore[union-attr]
    with embeddings_lock(root, swapped, eid):  # its writer at work
        index = SearchIndex.build(root, "random-cnn")
    [note] = index.notes  # not the mid-swap note ("being re-tiled or re-embedded now, ...")
    assert note.startswith(f"1 tiled slide(s) being embedded by {eid} now, left out ({name})")
    assert [e.slide_id for e in index.slides] == [good]
    [note] = SearchIndex.build(root, "random-cnn").notes  # its writer killed
    assert note.startswith(f"1 tiled slide(s) not embedded by {eid}, left out ({name})")


def test_a_tile_hit_is_the_whole_pixel_box_of_a_fractional_level0_tile(
    cmu_small: Path, tmp_path: Path
) -> None:
    """CMU-1-Small-Region (0.499 µm/px) tiled at 1 µm/px: 224 px tiles are 448.9 level-0 px.
    ``TileHit.size`` is that edge rounded to whole pixels on purpose (boxes are whole level-0
    pixels: the page posts a hit's box back to /api/labels, which takes integers), within
    half a pixel of the tile's extent; the page's boxes of neighbouring tiles abut."""
    from tests.serve_helpers import post_json, running
    from wsi_ssl.config import TilingConfig
    from wsi_ssl.embedding import EmbedConfig, embed
    from wsi_ssl.serve import create_app
    from wsi_ssl.tiling.batch import tile_slide

    root = tmp_path / "root"
    tiling = TilingConfig(mpp=1.0, tile_size=224, codec="zstd", tissue_threshold=0.0)
    slide_id = str(tile_slide(cmu_small, root, tiling).details["slide_id"])
    store = open_store(root).slide(slide_id)
    exact = float(store.tiling["tile_size_level0"])
    assert exact == pytest.approx(448.898, abs=1e-3)
    assert not embed(root, "random-cnn", EmbedConfig(batch_size=16, device="cpu", workers=0)).failed
    index = SearchIndex.build(root, "random-cnn", kind="flat")
    coords = np.asarray(store.coords)
    x, y = (int(v) for v in coords[6])
    hits = index.search_tile(slide_id, (x + 5, y + 5), k=5).hits
    assert (hits[0].x, hits[0].y) == (x, y) and all(h.size == 449 for h in hits)
    assert all(abs(h.size - exact) <= 0.5 for h in hits)
    row = coords[coords[:, 1] == y][:, 0]  # the tiles of its row abut: no gap, no overlap
    assert set(np.diff(row)) == {449}
    with running(create_app(SearchIndex.open(root))) as base:
        status, answer = post_json(
            base, "/api/search", {"slide": slide_id, "box": [x, y, 449, 449], "mode": "tiles"}
        )
        assert status == 200
        best = answer["hits"][0]
        assert best["tile_box"] == [x, y, 449, 449] and best["size"] == 449
        assert best["box"] == [x - 449, y - 449, 3 * 449, 3 * 449]
        status, _ = post_json(base, "/api/labels", {"slide": slide_id, "box": best["tile_box"]})
        assert status == 200  # a box of 448.9 would be refused (422): not whole pixels
