"""Embedding without the tiles QC flagged (``EmbedConfig.skip_flagged_tiles``, ``wsi-ssl embed
--skip-flagged-tiles``) and every reader of the vectors honouring the rows left out, on real
stores tiled from synthetic slides, with planted QC scores: the tiles ``FLAGGED[sid]`` have a
pen score of 0.9 (the stores were tiled with ``qc_max_pen=0.1``), every other score passes."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr

from tests.conftest import run_cli
from wsi_ssl.config import TilingConfig
from wsi_ssl.embedding import EmbedConfig, embed, export, runner
from wsi_ssl.embedding.runner import EmbedRunner
from wsi_ssl.embedding.slides import EmbedSlide, EmbedTarget
from wsi_ssl.encoders import Encoder, create_encoder
from wsi_ssl.errors import EmptyBagError, TilesNotEmbeddedError
from wsi_ssl.evaluation.features import tile_features
from wsi_ssl.evaluation.tasks import LabelledTiles
from wsi_ssl.mil.data import BagDataset, BagRef, read_bag
from wsi_ssl.search import SearchIndex
from wsi_ssl.search.ids import decode_ids
from wsi_ssl.storage import SlideStore, open_store
from wsi_ssl.storage.embeddings import (
    EmbeddingWriter,
    embedded_rows,
    embeddings_problem,
    read_embeddings,
)
from wsi_ssl.storage.shards import SHARD_CHECKSUMS, shard_path
from wsi_ssl.storage.slide_store import CONTENTS_SHA256, rewrite_attrs
from wsi_ssl.storage.tile_reader import TileReader
from wsi_ssl.synthetic import write_synthetic_slide
from wsi_ssl.tiling.batch import tile_slide
from wsi_ssl.tiling.qc import kept_tiles

TILING = TilingConfig(tile_size=224, codec="zstd", tiles_per_chunk=16, tissue_threshold=0.0)
FAST = EmbedConfig(batch_size=4, device="cpu", workers=0, chunk_rows=8)
SKIP = replace(FAST, skip_flagged_tiles=True)
ENCODER = "random-cnn"
# tiles 17-19 span a batch and a chunk boundary; 0 and the last one are the slide's edges
PLANTED = ([0, 1, 5, 17, 18, 19, 34], [3, 4, 11])


def _plant(store: SlideStore, flagged: list[int]) -> SlideStore:
    """QC scores that flag exactly ``flagged`` (pen ink) and pass every other tile, recorded
    as the store's contents (reads check them); the store opened again."""
    n = store.n_tiles
    pen = np.zeros(n, np.float32)
    pen[flagged] = 0.9
    scores = {"pen": pen, "focus": np.full(n, 1e6), "tissue": np.ones(n), "dark": np.zeros(n)}
    for metric, values in scores.items():
        zarr.open_array(store.path / "qc" / metric, mode="r+")[:] = values
    planted = SlideStore.open(store.path).contents_sha256([f"qc/{m}" for m in scores])
    rewrite_attrs(store.path, {CONTENTS_SHA256: {**store.recorded_contents, **planted}})
    return SlideStore.open(store.path)


def _stores(root: Path) -> list[SlideStore]:
    archive = open_store(root)
    return [archive.slide(s) for s in archive.slide_ids]


@pytest.fixture(scope="module")
def tiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """Two stores (35 and 25 tiles) with planted flags, not embedded; slide id -> flagged."""
    base = tmp_path_factory.mktemp("embedqc")
    for seed, size in ((1, (1400, 1100)), (2, (1100, 900))):
        path = write_synthetic_slide(base / f"s{seed}.tiff", size, seed=seed)
        tile_slide(path, base / "root", TILING)
    stores = _stores(base / "root")
    stores.sort(key=lambda s: -s.n_tiles)
    flagged = {}
    for store, planted in zip(stores, PLANTED, strict=True):
        store = _plant(store, planted)
        flagged[store.slide_id] = np.asarray(planted)
        assert np.array_equal(np.flatnonzero(~kept_tiles(store)), planted)
    return base / "root", flagged


@pytest.fixture(scope="module")
def full(tiled, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stores embedded whole (every tile), the reference."""
    root = tmp_path_factory.mktemp("full") / "root"
    shutil.copytree(tiled[0], root)
    assert not embed(root, ENCODER, FAST).failed
    return root


@pytest.fixture(scope="module")
def skipped(tiled, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stores embedded with ``skip_flagged_tiles`` (shared by the readers' tests)."""
    root = tmp_path_factory.mktemp("skipped") / "root"
    shutil.copytree(tiled[0], root)
    assert not embed(root, ENCODER, SKIP).failed
    return root


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """Tile numbers read from each store's tiles by the embedding loader (workers=0)."""
    seen: dict[str, list[int]] = {}
    real = TileReader.read

    def spy(self: TileReader, rows):  # type: ignore[no-untyped-def]
        sid = Path(str(self.array.store.root)).parent.name.removesuffix(".zarr")
        seen.setdefault(sid, []).extend(int(r) for r in rows)
        return real(self, rows)

    monkeypatch.setattr(TileReader, "read", spy)
    return seen


def _vectors(root: Path) -> dict[str, np.ndarray]:
    enc = create_encoder(ENCODER).encoder_id
    return {s.slide_id: np.asarray(read_embeddings(s, enc).features) for s in _stores(root)}


def test_flagged_tiles_are_neither_read_nor_encoded(tiled, full, reads, tmp_path) -> None:
    src, flagged = tiled
    root = tmp_path / "root"
    shutil.copytree(src, root)
    enc = create_encoder(ENCODER)
    calls = []
    enc.model.register_forward_hook(lambda _m, args, _out: calls.append(len(args[0])))
    summary = embed(root, enc, SKIP)
    n_flagged = sum(len(f) for f in flagged.values())
    stores = {s.slide_id: s for s in _stores(root)}
    for sid, store in stores.items():
        kept = np.setdiff1d(np.arange(store.n_tiles), flagged[sid])
        assert sorted(reads[sid]) == kept.tolist()  # flagged tiles never read
    assert sum(calls) == sum(s.n_tiles for s in stores.values()) - n_flagged  # nor encoded
    by_slide = {o.slide: o for o in summary.outcomes}
    for sid, store in stores.items():
        o = by_slide[sid]
        assert (o.status, o.n_tiles) == ("complete", store.n_tiles - len(flagged[sid]))
        assert o.details == {
            "not_embedded": len(flagged[sid]),
            "name": Path(store.source["path"]).name,
        }
    assert summary.tiles_not_embedded == n_flagged
    assert summary.to_dict()["tiles_not_embedded"] == n_flagged
    assert f"skipped {n_flagged} tiles flagged by QC" in "\n".join(summary.lines())
    want = _vectors(full)
    for sid, store in stores.items():
        emb = read_embeddings(store, enc.encoder_id)
        assert emb.features.shape == (store.n_tiles, enc.embed_dim)  # one row per tile still
        record = emb.attrs["not_embedded"]
        assert record["tiles"] == flagged[sid].tolist()
        assert record["reason"] == "qc_flagged" and record["qc_thresholds"]["qc_max_pen"] == 0.1
        assert np.isnan(emb.features[flagged[sid]]).all()
        assert np.array_equal(~emb.embedded, np.isin(np.arange(store.n_tiles), flagged[sid]))
        only = emb.embedded_only()
        assert np.isfinite(only.features).all()
        np.testing.assert_array_equal(only.tile_ids, np.flatnonzero(emb.embedded))
        np.testing.assert_array_equal(only.coords, store.coords[only.tile_ids])
        np.testing.assert_allclose(only.features, want[sid][only.tile_ids], rtol=1e-3, atol=1e-3)
        assert embeddings_problem(store, enc.encoder_id) is None  # complete by content


def test_resume_keeps_rows_and_encodes_only_what_is_missing(
    tiled, full, reads, tmp_path, monkeypatch
) -> None:
    """Rows are written 3 at a time here (``WRITE_ROWS``; 8,192 by default), so the blocks a
    completion copies from the earlier array are split across writes and chunks."""
    monkeypatch.setattr(runner, "WRITE_ROWS", 3)
    src, flagged = tiled
    root = tmp_path / "root"
    shutil.copytree(src, root)
    enc = create_encoder(ENCODER)
    first = embed(root, enc, SKIP)
    assert not first.failed
    a, b = sorted(_stores(root), key=lambda s: -s.n_tiles)
    # a job killed while re-writing b: its partial array is redone, still without the flags
    w = EmbeddingWriter(b.path, enc.encoder_id, n_rows=b.n_tiles, dim=enc.embed_dim, chunk_rows=4)
    w.write(0, np.zeros((8, enc.embed_dim), np.float32))
    w._locks.close()  # the writing process died: the kernel dropped its locks
    shutil.rmtree(b.path / "embeddings" / enc.encoder_id)
    reads.clear()
    again = embed(root, enc, SKIP)
    assert {o.slide: o.status for o in again.outcomes} == {
        a.slide_id: "skipped",
        b.slide_id: "complete",
    }
    assert a.slide_id not in reads
    assert sorted(reads[b.slide_id]) == np.setdiff1d(np.arange(25), flagged[b.slide_id]).tolist()
    assert read_embeddings(b, enc.encoder_id).attrs["not_embedded"]["tiles"] == [3, 4, 11]
    # without the flag: the rows there are kept, only the flagged tiles are read and encoded
    reads.clear()
    completed = embed(root, enc, FAST)
    assert [o.status for o in completed.outcomes] == ["complete", "complete"]
    for store in (a, b):
        assert sorted(reads[store.slide_id]) == flagged[store.slide_id].tolist()
    assert completed.rows_kept == 35 + 25 - 10 and completed.tiles_done == 10
    assert "kept 50 rows embedded before" in "\n".join(completed.lines())
    want = _vectors(full)
    for sid, got in _vectors(root).items():
        np.testing.assert_array_equal(got, want[sid])  # the same array as a whole embed
    assert "not_embedded" not in read_embeddings(a, enc.encoder_id).attrs
    # with the flag over a whole array: the flagged rows are cleared, nothing read
    reads.clear()
    cleared = embed(root, enc, SKIP)
    assert [o.status for o in cleared.outcomes] == ["complete", "complete"] and not reads
    assert cleared.rows_cleared == 10
    assert read_embeddings(b, enc.encoder_id).attrs["not_embedded"]["tiles"] == [3, 4, 11]
    assert [o.status for o in embed(root, enc, SKIP).outcomes] == ["skipped", "skipped"]
    # resume=False starts afresh: the flagged rows are dropped again
    fresh = embed(root, enc, SKIP, resume=False, slides=[b.slide_id])
    assert [o.n_tiles for o in fresh.outcomes] == [22]
    assert read_embeddings(b, enc.encoder_id).n_not_embedded == 3


def test_a_slide_whose_every_tile_is_flagged(tiled, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(runner, "WRITE_ROWS", 7)  # its 25 NaN rows in 4 writes
    root = tmp_path / "root"
    shutil.copytree(tiled[0], root)
    small = min(_stores(root), key=lambda s: s.n_tiles)
    small = _plant(small, list(range(small.n_tiles)))
    summary = embed(root, ENCODER, SKIP, slides=[small.slide_id])
    [o] = summary.outcomes
    assert (o.status, o.n_tiles, o.details["not_embedded"]) == ("complete", 0, 25)
    emb = read_embeddings(small, summary.encoder_id)
    assert np.isnan(emb.features).all() and len(emb.embedded_only()) == 0
    assert embeddings_problem(small, summary.encoder_id) is None
    with pytest.raises(EmptyBagError):
        read_bag(small, summary.encoder_id)


def test_search_never_indexes_nor_returns_a_flagged_tile(tiled, skipped, full) -> None:
    _, flagged = tiled
    index = SearchIndex.build(skipped, ENCODER, name="qc")
    assert index.n_vectors == 35 + 25 - 10
    numbers = {e.number: e.slide_id for e in index.slides}
    queries = np.concatenate(list(_vectors(full).values())).astype(np.float32)
    _, ids = index.search_vectors(queries, k=index.n_vectors)
    slides, tiles = decode_ids(ids[ids >= 0])
    assert len(tiles) == len(queries) * index.n_vectors  # every vector found, none else
    for number, sid in numbers.items():
        got = np.unique(tiles[slides == number])
        assert not np.isin(got, flagged[sid]).any()
        assert len(got) + len(flagged[sid]) == index.entries[number].n_tiles
    # a region query over a whole slide takes only the tiles that hold vectors
    big = max(index.slides, key=lambda e: e.n_tiles)
    w, h = big.dimensions
    query = index.query_region(big.slide_id, (0, 0, w, h))
    assert query.tile_numbers is not None
    assert not np.isin(query.tile_numbers, flagged[big.slide_id]).any()
    assert np.isfinite(query.vectors).all()
    # every tile lies on the slide in part: a whole-slide box takes all that hold vectors
    every = np.arange(len(open_store(skipped).slide(big.slide_id).coords))
    np.testing.assert_array_equal(query.tile_numbers, np.setdiff1d(every, flagged[big.slide_id]))


def test_mil_bags_and_exports_leave_out_the_tiles_without_vectors(tiled, skipped, tmp_path) -> None:
    _, flagged = tiled
    eid = create_encoder(ENCODER).encoder_id
    for store in _stores(skipped):
        kept = np.setdiff1d(np.arange(store.n_tiles), flagged[store.slide_id])
        bag = read_bag(store, eid)
        np.testing.assert_array_equal(bag.tiles, kept)
        np.testing.assert_array_equal(bag.coords, store.coords[kept])
        assert np.isfinite(bag.features).all()
        # BagDataset: the first read checks, the second reads the array through the rows kept
        data = BagDataset([BagRef(store.slide_id, store.path, 0)], eid)
        first, second = data[0][0], data[0][0]
        assert torch.equal(first, second) and len(first) == len(kept)
        assert torch.isfinite(first).all()
        array = zarr.open_array(store.path / "embeddings" / eid, mode="r")
        np.testing.assert_array_equal(embedded_rows(array.attrs, store.n_tiles), kept)
    result = export(skipped, tmp_path / "h5", format="clam-h5", name_by="slide_id")
    assert not result.failed
    manifest = json.loads((tmp_path / "h5" / "export.json").read_text())
    for entry in manifest["slides"]:
        sid = entry["slide_id"]
        store = open_store(skipped).slide(sid)
        kept = np.setdiff1d(np.arange(store.n_tiles), flagged[sid])
        assert entry["not_embedded"] == len(flagged[sid]) and entry["n_tiles"] == len(kept)
        with h5py.File(tmp_path / "h5" / f"{sid}.h5") as f:
            np.testing.assert_array_equal(f["coords"][:], store.coords[kept])
            assert f["features"].shape == (len(kept), 64)
            assert np.isfinite(f["features"][:]).all()
    assert not export(skipped, tmp_path / "pt", format="pt", name_by="slide_id").failed
    for pt in (tmp_path / "pt").glob("*.pt"):
        assert torch.isfinite(torch.load(pt)).all()


def test_evaluation_features_never_take_a_row_without_a_vector(tiled, skipped, tmp_path) -> None:
    _, flagged = tiled
    eid = create_encoder(ENCODER).encoder_id
    archive = open_store(skipped)
    rows = {sid: np.arange(archive.slide(sid).n_tiles) for sid in archive.slide_ids}
    y = np.concatenate([np.arange(len(r)) % 2 for r in rows.values()])
    groups = np.concatenate([np.full(len(r), i) for i, r in enumerate(rows.values())])
    labelled = LabelledTiles(rows, y, groups, ("a", "b"))
    with pytest.raises(TilesNotEmbeddedError, match="skip_flagged_tiles=False") as err:
        tile_features(skipped, eid, labelled)
    assert err.value.tiles in [f.tolist() for f in flagged.values()]
    kept = {sid: np.setdiff1d(r, flagged[sid]) for sid, r in rows.items()}
    n_kept = sum(len(r) for r in kept.values())
    only_kept = LabelledTiles(kept, y[:n_kept], groups[:n_kept], ("a", "b"))
    assert np.isfinite(tile_features(skipped, eid, only_kept)).all()


def test_cli_flag_end_to_end(tiled, tmp_path) -> None:
    root = tmp_path / "root"
    shutil.copytree(tiled[0], root)
    argv = ["embed", str(root), "--encoder", ENCODER, "--device", "cpu", "--workers", "0"]
    code, out, err = run_cli([*argv, "--batch-size", "8", "--skip-flagged-tiles", "--quiet"])
    assert code == 0, err
    assert "skipped 10 tiles flagged by QC (not read, not encoded" in out
    assert "2 embedded" in out and "50 tiles" in out
    code, out, _ = run_cli([*argv, "--json", "--skip-flagged-tiles"])
    summary = json.loads(out)
    assert code == 0 and summary["skipped"] == 2 and summary["config"]["skip_flagged_tiles"]


def test_rows_are_not_kept_from_an_array_another_job_replaced_meanwhile(tiled, tmp_path) -> None:
    root = tmp_path / "root"
    shutil.copytree(tiled[0], root)
    enc = create_encoder(ENCODER)
    assert not embed(root, enc, SKIP).failed
    store = min(_stores(root), key=lambda s: s.n_tiles)
    target = EmbedTarget(enc, FAST)
    slide = target.prepare(open_store(root), store.slide_id)
    assert isinstance(slide, EmbedSlide) and slide.base is not None
    assert slide.encode.tolist() == [3, 4, 11]  # only the flagged tiles, the rest kept
    embed(root, enc, SKIP, resume=False, slides=[store.slide_id])  # another job, meanwhile
    EmbedRunner(target, None, progress=False).run([slide])
    assert slide.outcome is not None and slide.outcome.status == "busy"
    assert embeddings_problem(store, enc.encoder_id) is None  # the other job's array stands
    assert read_embeddings(store, enc.encoder_id).n_not_embedded == 3


def test_jpeg_streams_of_flagged_tiles_are_not_read_for_device_decoding(tmp_path) -> None:
    path = write_synthetic_slide(tmp_path / "j.tiff", (1100, 900), seed=3)
    tile_slide(path, tmp_path / "root", replace(TILING, codec="jpeg"))
    [store] = _stores(tmp_path / "root")
    flagged = [0, 7, 8, 24]
    store = _plant(store, flagged)
    streams: list[int] = []
    real = TileReader.read_encoded

    def spy(self: TileReader, rows):  # type: ignore[no-untyped-def]
        streams.extend(int(r) for r in rows)
        return real(self, rows)

    vectors = {}
    for decode in ("device", "cpu"):
        root = tmp_path / decode
        shutil.copytree(tmp_path / "root", root)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(TileReader, "read_encoded", spy)
            assert not embed(root, ENCODER, SKIP, decode=decode).failed
        vectors[decode] = _vectors(root)[store.slide_id]
    assert streams == np.setdiff1d(np.arange(store.n_tiles), flagged).tolist()  # device only
    np.testing.assert_array_equal(vectors["device"], vectors["cpu"])  # NaN rows alike
    assert np.isnan(vectors["cpu"][flagged]).all()


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One JPEG store (35 tiles) with tiles 0, 1 and 5 flagged, not embedded."""
    base = tmp_path_factory.mktemp("embedqc_jpeg")
    path = write_synthetic_slide(base / "s1.tiff", (1400, 1100), seed=1)
    tile_slide(path, base / "root", replace(TILING, codec="jpeg"))
    (store,) = _stores(base / "root")
    _plant(store, [0, 1, 5])
    return base / "root"


def test_a_batch_out_of_memory_counts_tiles_when_jpeg_is_decoded_on_the_device(
    jpeg_root: Path,
) -> None:
    from tests.test_embed_batch_size import RoomFor

    config = create_encoder(ENCODER).config
    tight = Encoder(RoomFor(2, config.embed_dim), config)
    for decode in ("cpu", "device"):
        (failed,) = embed(jpeg_root, tight, replace(SKIP, decode=decode)).failed
        assert failed.error_type == "DeviceOutOfMemoryError"
        assert "on a batch of 4 tiles (batch_size=4)" in failed.error, (decode, failed.error)


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_an_unreadable_kept_tile_is_named_by_its_number_when_flagged_tiles_are_skipped(
    jpeg_root: Path, tmp_path: Path, decode: str
) -> None:
    """Tiles 0, 1 and 5 are flagged, so the first batch is tiles 2, 3, 4 and 6: a broken
    stream in tile 6 fails the slide naming tile 6, not a flagged or a neighbouring tile."""
    root = tmp_path / "root"
    shutil.copytree(jpeg_root, root)
    (store,) = _stores(root)
    stream = TileReader(store.tiles).read_encoded(np.array([6]))[0]
    shard = shard_path(store.tiles, 0)  # tiles 0-15
    data = shard.read_bytes()
    assert data.count(stream) == 1
    shard.write_bytes(data.replace(stream, b"\x00" * len(stream)))
    # as in a store tiled before shard checksums (else the shard's CRC32C fails first, for
    # all of its tiles): the tile's own decode fails
    del zarr.open_array(store.path / "tiles", mode="r+").attrs[SHARD_CHECKSUMS]
    (failed,) = embed(root, ENCODER, replace(SKIP, decode=decode)).failed
    assert failed.error_type == "TileReadError"
    assert f"{store.path / 'tiles'}: tiles 6..6 cannot be read" in failed.error, failed.error
    assert failed.error.endswith(f"(`wsi-ssl check {root} --verify-tiles` prints that command)")
