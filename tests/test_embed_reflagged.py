"""Tiles QC flags after they were embedded (``wsi-ssl tile`` re-run with a stricter threshold
re-flags them in place) and ``wsi-ssl embed --skip-flagged-tiles``: their rows end NaN and
named by ``not_embedded``, the other rows as they were, so export, search and MIL leave them
out; a re-run is then a no-op, and without the flag nothing changes. Real synthetic slides,
real stores, real QC scores, the CLI throughout."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import run_cli
from wsi_ssl.embedding import EmbedConfig, embed, runner
from wsi_ssl.storage import SlideStore, open_store
from wsi_ssl.storage.embeddings import embeddings_problem, read_embeddings
from wsi_ssl.synthetic import write_synthetic_slide
from wsi_ssl.tiling.qc import kept_tiles

ENCODER = "random-cnn"
TILE = ["--tile-size", "224", "--codec", "zstd", "--tissue-threshold", "0", "--quiet"]
TILE += ["--qc-min-focus", "0"]  # QC by tissue only
EMBED = ["--encoder", ENCODER, "--device", "cpu", "--workers", "0", "--batch-size", "4"]


def _cli(*argv: str) -> str:
    code, out, err = run_cli(list(argv))
    assert code == 0, err
    return out


def _embed(root: Path, *flags: str) -> dict:
    """``wsi-ssl embed --json``: slide id -> its entry in the summary, and the summary."""
    summary = json.loads(_cli("embed", str(root), *EMBED, "--json", *flags))
    return {"summary": summary, **{e["slide_id"]: e for e in summary["slides"]}}


def _slides(root: Path) -> dict[str, SlideStore]:
    """Source file name -> store."""
    archive = open_store(root)
    return {archive.slide(s).source["name"]: archive.slide(s) for s in archive.slide_ids}


def _flagged(store: SlideStore) -> np.ndarray:
    return np.flatnonzero(~kept_tiles(store))


@pytest.fixture
def slides(tmp_path: Path) -> tuple[Path, Path]:
    """Two synthetic slides (35 and 25 tiles at 224 px, tissue from 0 to 0.66)."""
    return (
        write_synthetic_slide(tmp_path / "a.tiff", (1400, 1100), seed=1),
        write_synthetic_slide(tmp_path / "b.tiff", (1100, 900), seed=2),
    )


def test_tiles_flagged_after_embedding_are_cleared_and_not_exported(slides, tmp_path) -> None:
    a_tiff, b_tiff = slides
    root = tmp_path / "root"
    _cli("tile", str(a_tiff), str(b_tiff), "--out", str(root), *TILE, "--qc-min-tissue", "0")
    a, b = _slides(root)["a.tiff"], _slides(root)["b.tiff"]
    assert not len(_flagged(a)) and not len(_flagged(b))
    eid = _embed(root)["summary"]["encoder_id"]
    before = {s.slide_id: read_embeddings(s, eid) for s in (a, b)}
    # thresholds re-applied in place to slide a only: no re-tile, the vectors stay valid
    out = _cli("tile", str(a_tiff), "--out", str(root), *TILE, "--qc-min-tissue", "0.05")
    assert "QC thresholds updated" in out
    a = _slides(root)["a.tiff"]  # its settings as they are now
    flagged = _flagged(a)
    assert 0 < len(flagged) < a.n_tiles and not len(_flagged(b))
    # without the flag nothing changes
    plain = _embed(root)
    assert plain[a.slide_id]["status"] == plain[b.slide_id]["status"] == "skipped"
    assert read_embeddings(a, eid).attrs == before[a.slide_id].attrs
    # with it, a's newly flagged rows are cleared; b is already complete
    done = _embed(root, "--skip-flagged-tiles")
    entry = done[a.slide_id]
    assert (entry["status"], entry["n_tiles"]) == ("complete", 0)
    assert entry["not_embedded"] == entry["rows_cleared"] == len(flagged)
    assert entry["rows_kept"] == a.n_tiles - len(flagged)
    assert done[b.slide_id]["status"] == "skipped"
    assert done["summary"]["rows_cleared"] == len(flagged)
    emb = read_embeddings(a, eid)
    assert emb.attrs["not_embedded"]["tiles"] == flagged.tolist()
    assert emb.attrs["not_embedded"]["qc_thresholds"]["qc_min_tissue"] == 0.05
    assert np.isnan(emb.features[flagged]).all()
    kept = np.setdiff1d(np.arange(a.n_tiles), flagged)
    np.testing.assert_array_equal(emb.features[kept], before[a.slide_id].features[kept])
    assert embeddings_problem(a, eid) is None
    np.testing.assert_array_equal(read_embeddings(b, eid).features, before[b.slide_id].features)
    # the export leaves the flagged tiles out
    _cli("export", str(root), "--out", str(tmp_path / "h5"), "--name-by", "slide_id", "--quiet")
    with h5py.File(tmp_path / "h5" / f"{a.slide_id}.h5") as f:
        np.testing.assert_array_equal(f["coords"][:], a.coords[kept])
        np.testing.assert_array_equal(f["features"][:], before[a.slide_id].features[kept])
    manifest = json.loads((tmp_path / "h5" / "export.json").read_text())
    [entry] = [e for e in manifest["slides"] if e["slide_id"] == a.slide_id]
    assert entry["not_embedded"] == len(flagged) and entry["n_tiles"] == len(kept)
    # a re-run is a no-op
    again = _embed(root, "--skip-flagged-tiles")
    assert again[a.slide_id]["status"] == again[b.slide_id]["status"] == "skipped"
    assert read_embeddings(a, eid).attrs == emb.attrs
    # and without the flag the cleared tiles are encoded again: a whole embed's vectors
    whole = _embed(root)
    assert whole[a.slide_id]["n_tiles"] == len(flagged)
    np.testing.assert_array_equal(read_embeddings(a, eid).features, before[a.slide_id].features)


def test_a_skipping_embed_clears_every_flagged_row_however_it_was_embedded(
    slides, tmp_path, monkeypatch
) -> None:
    """Rows written 3 at a time and chunks of 8 rows: the cleared rows fall across writes
    and chunks. Slide a was embedded with the flag (its flagged rows NaN already), slide b
    without it: either way the array ends as a fresh job with the flag writes it."""
    monkeypatch.setattr(runner, "WRITE_ROWS", 3)
    a_tiff, b_tiff = slides
    root = tmp_path / "root"
    _cli("tile", str(a_tiff), str(b_tiff), "--out", str(root), *TILE)  # qc_min_tissue 0.05
    a, b = _slides(root)["a.tiff"], _slides(root)["b.tiff"]
    first = {a.slide_id: _flagged(a), b.slide_id: _flagged(b)}
    assert all(len(f) for f in first.values())
    config = EmbedConfig(batch_size=4, device="cpu", workers=0, chunk_rows=8)
    skip = replace(config, skip_flagged_tiles=True)
    assert not embed(root, ENCODER, skip, slides=[a.slide_id]).failed
    eid = embed(root, ENCODER, config, slides=[b.slide_id]).encoder_id
    before = {s.slide_id: read_embeddings(s, eid).features for s in (a, b)}
    _cli("tile", str(a_tiff), str(b_tiff), "--out", str(root), *TILE, "--qc-min-tissue", "0.3")
    a, b = _slides(root)["a.tiff"], _slides(root)["b.tiff"]  # their settings as they are now
    summary = embed(root, ENCODER, skip)
    for store in (a, b):
        now = _flagged(store)
        since = np.setdiff1d(now, first[store.slide_id])
        assert len(since)
        [outcome] = [o for o in summary.outcomes if o.slide == store.slide_id]
        assert (outcome.status, outcome.n_tiles) == ("complete", 0)
        held = since if store is a else now  # b held vectors of every tile
        assert outcome.details["rows_cleared"] == len(held)
        emb = read_embeddings(store, eid)
        gone = now
        assert emb.attrs["not_embedded"]["tiles"] == gone.tolist()
        assert np.isnan(emb.features[gone]).all()
        rest = np.setdiff1d(np.arange(store.n_tiles), gone)
        np.testing.assert_array_equal(emb.features[rest], before[store.slide_id][rest])
        assert embeddings_problem(store, eid) is None
    assert f"cleared {summary.rows_cleared} rows" in "\n".join(summary.lines())
    assert [o.status for o in embed(root, ENCODER, skip).outcomes] == ["skipped", "skipped"]
