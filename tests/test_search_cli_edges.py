"""Search and index edges a new user met: a picture query once the weights file moved (the
index's resize setting taken from its record), tiled slides an index leaves out because they
are not embedded yet (named, with the commands that bring them in), a box over tiles QC left
out at embedding (told apart from glass) and ``--list`` counting the vectors indexed, and a
gallery written in the format its name says. Real archives, stores and processes throughout."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import copy_two_slides, run_cli
from wsi_ssl.config import TilingConfig
from wsi_ssl.encoders import create_encoder
from wsi_ssl.errors import ConfigError, EncoderMismatchError, NoTilesInRegionError
from wsi_ssl.search import SearchIndex
from wsi_ssl.storage import open_store
from wsi_ssl.storage.embeddings import embedding_ids, read_embeddings
from wsi_ssl.synthetic import write_synthetic_slide
from wsi_ssl.tiling.batch import tile_slide

# small_archive's tiling (tests/conftest.py): a slide tiled so is on the index's grid
TILING = replace(TilingConfig(tile_size=224, codec="zstd", tiles_per_chunk=4), tissue_threshold=0.0)


def _json(argv: list[str]) -> dict:
    code, out, err = run_cli([*argv, "--json"])
    assert code == 0, err
    return json.loads(out)


# -- a picture query once the weights file moved ---------------------------------------------


def test_a_picture_query_names_the_encoder_with_its_weights_moved(tmp_path: Path) -> None:
    """Embedded with a weights file and ``--resize bilinear``: once the file moved, the advice
    was Python's (``pass encoder= (and weights=)``) and following it failed, the encoder
    named without the recorded resize being another one. Now the named encoder takes the
    index's recorded settings (the same file gives the index's id) and a mismatch says in what
    it differs; the CLI words the advice with its flags."""
    root = tmp_path / "root"
    slide = write_synthetic_slide(tmp_path / "s.tiff", (900, 700), seed=3)
    sid = tile_slide(slide, root, TILING).details["slide_id"]
    weights = tmp_path / "w.pth"
    torch.save(create_encoder("random-cnn", seed=3).model.state_dict(), weights)
    embed = ["embed", str(root), "--encoder", "random-cnn", "--weights", str(weights)]
    assert run_cli([*embed, "--resize", "bilinear", "--quiet"])[0] == 0
    assert run_cli(["index", str(root), "--quiet"])[0] == 0
    tiles = np.asarray(open_store(root).tiles(sid)[:])
    picture = tmp_path / "q.png"  # the slide's most stained tile
    Image.fromarray(tiles[int(np.argmin(tiles.mean(axis=(1, 2, 3))))]).save(picture)
    moved = tmp_path / "moved" / "w.pth"
    moved.parent.mkdir()
    weights.rename(moved)

    index = SearchIndex.open(root)
    with pytest.raises(EncoderMismatchError, match=r"pass encoder='random-cnn' and weights=FILE"):
        index.query_image(picture)
    code, _, err = run_cli(["search", str(root), "--image", str(picture), "-k", "1"])
    assert code == 2 and "pass --encoder random-cnn and --weights FILE" in err
    assert "encoder=" not in err and str(weights) in err  # where it was recorded

    query = index.query_image(picture, encoder="random-cnn", weights=moved)
    [hit] = index.search(query, k=1).hits
    assert hit.slide_id == sid and hit.score == pytest.approx(1.0, abs=1e-3)
    search = ["search", str(root), "--image", str(picture), "-k", "1"]
    found = _json([*search, "--encoder", "random-cnn", "--weights", str(moved)])
    assert found["hits"][0]["slide_id"] == sid

    other = tmp_path / "other.pth"
    torch.save(create_encoder("random-cnn", seed=4).model.state_dict(), other)
    code, _, err = run_cli([*search, "--encoder", "random-cnn", "--weights", str(other)])
    assert code == 2 and "it differs in the weights (sha256" in err and "resize" not in err
    unresized = create_encoder("random-cnn", weights=moved)  # an encoder made as it comes
    with pytest.raises(EncoderMismatchError, match=r"differs in resize 'never', the index's 'b"):
        index.query_image(picture, encoder=unresized)


# -- tiled slides not embedded by the index's encoder ----------------------------------------


def test_an_index_names_the_tiled_slides_not_embedded_by_its_encoder(
    small_archive: Path, tmp_path: Path
) -> None:
    """A slide tiled since the embedding: ``index --add`` called the index up to date and a
    rebuild left it out without a word. Now both name it, with the commands that embed and add
    it, and a slide mid-swap is named by its own note only."""
    root, first, second = copy_two_slides(small_archive, tmp_path)
    slide = write_synthetic_slide(tmp_path / "new.tiff", (700, 600), seed=5)
    new = tile_slide(slide, root, TILING).details["slide_id"]
    name = SearchIndex.open(root).name
    second_name = open_store(root).catalog.get(second).name  # type: ignore[union-attr]

    added = _json(["index", str(root), "--add", "--quiet"])
    [note] = added["notes"]  # no longer "the index is up to date"
    assert added["added"] == [] and note.startswith("1 tiled slide(s) not embedded by ")
    assert "left out (new.tiff)" in note
    embed = f"`wsi-ssl embed {root} --encoder random-cnn` embeds them"
    assert embed in note and f"`wsi-ssl index {root} --name {name} --add` adds them" in note
    assert _json(["index", str(root), "--quiet"])["notes"] == [note]  # a rebuild says it too
    assert SearchIndex.build(root, "random-cnn").notes == [note]

    store = open_store(root).store_path(second)  # a re-embed killed between its renames
    [eid] = embedding_ids(store)
    (store / "embeddings" / eid).rename(store / "embeddings" / f".replaced-{eid}")
    swapped, unembedded = _json(["index", str(root), "--quiet"])["notes"]
    assert f"left out ({second_name})" in swapped and unembedded == note  # not named twice

    (store / "embeddings" / f".replaced-{eid}").rename(store / "embeddings" / eid)
    code, _, err = run_cli([*embed.split("`")[1].split()[1:], "--quiet"])  # as printed
    assert code == 0, err
    after = _json(["index", str(root), "--add", "--quiet"])
    assert sorted(after["added"]) == sorted([second, new]) and after["notes"] == []
    assert {e.slide_id for e in SearchIndex.open(root).slides} == {first, second, new}


# -- a box over tiles QC left out; --list ------------------------------------------------------


@pytest.fixture(scope="module")
def qc_skipped(tmp_path_factory: pytest.TempPathFactory, cmu_small: Path) -> Path:
    """CMU-1-Small-Region tiled, re-flagged in place with a focus threshold that flags about
    half its tiles, embedded with ``--skip-flagged-tiles`` and indexed."""
    root = tmp_path_factory.mktemp("qc") / "root"
    tile = ["tile", str(cmu_small), "--out", str(root), "--quiet"]
    assert run_cli(tile)[0] == 0
    assert run_cli([*tile, "--qc-min-focus", "7431"])[0] == 0
    embed = ["embed", str(root), "--encoder", "random-cnn", "--resize", "bilinear"]
    assert run_cli([*embed, "--skip-flagged-tiles", "--quiet"])[0] == 0
    assert run_cli(["index", str(root), "--quiet"])[0] == 0
    return root


def test_a_box_over_tiles_qc_left_out_says_so(qc_skipped: Path) -> None:
    """The message sent the user to draw the box over tissue, as over glass."""
    index = SearchIndex.open(qc_skipped)
    [entry] = index.slides
    emb = read_embeddings(open_store(qc_skipped).slide(entry.slide_id), index.encoder_id)
    left_out = np.flatnonzero(~emb.embedded)
    size = round(entry.tile_size_level0)
    x, y = (int(v) for v in emb.coords[left_out[0]])
    with pytest.raises(NoTilesInRegionError, match=r"QC flagged its 1 stored tile\(s\)"):
        index.query_region(entry.slide_id, (x, y, size, size))
    assert (emb.coords[left_out[1]] == (x + size, y)).all()  # two side by side: both counted
    with pytest.raises(NoTilesInRegionError, match=r"its 2 stored tile\(s\)"):
        index.query_region(entry.slide_id, (x, y, 2 * size, size))
    box = f"{x},{y},{size},{size}"
    code, _, err = run_cli(["search", str(qc_skipped), "--slide", entry.slide_id, "--box", box])
    assert code == 2 and "left them out" in err and "draw the box over tissue" not in err


def test_list_counts_the_vectors_indexed_beside_the_tiles(qc_skipped: Path) -> None:
    """``--list`` showed the slide's 55 tiles under a header of 28 vectors."""
    index = SearchIndex.open(qc_skipped)
    [entry] = index.slides
    assert entry.vectors < entry.n_tiles
    code, out, err = run_cli(["search", str(qc_skipped), "--list"])
    assert code == 0, err
    assert f"{index.n_vectors} vectors from 1 slides" in out
    row = out.splitlines()[-1]
    assert f"{entry.vectors} vectors of its {entry.n_tiles} tiles" in row
    assert entry.vectors == index.n_vectors


# -- the gallery's format ------------------------------------------------------------------------


def test_a_gallery_is_written_in_the_format_its_name_says(
    small_archive: Path, tmp_path: Path
) -> None:
    """``--gallery out.jpg`` wrote PNG data under that name, and ``.txt`` too."""
    archive = open_store(small_archive)
    sid = archive.slide_ids[0]
    x, y = (int(v) for v in archive.slide(sid).coords[0])
    search = ["search", str(small_archive), "--slide", sid, "--xy", f"{x},{y}", "-k", "2"]
    for name, kind in (("g.jpg", "JPEG"), ("g.JPEG", "JPEG"), ("g.png", "PNG")):
        code, _, err = run_cli([*search, "--gallery", str(tmp_path / name)])
        assert code == 0, err
        with Image.open(tmp_path / name) as picture:
            assert picture.format == kind
    code, out, err = run_cli([*search, "--gallery", str(tmp_path / "g.txt")])
    assert code == 2 and not out and not (tmp_path / "g.txt").exists()
    assert err.count("\n") == 1 and "PNG or JPEG" in err and "g.png or g.jpg" in err
    index = SearchIndex.open(small_archive)
    result = index.search_tile(sid, (x, y), k=2)
    with pytest.raises(ConfigError, match="it has no suffix"):
        index.gallery(result, tmp_path / "gallery")
    assert not (tmp_path / "gallery").exists()
    with Image.open(index.gallery(result, tmp_path / "api.jpeg")) as picture:
        assert picture.format == "JPEG"
