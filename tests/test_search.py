"""Search index and queries on real fixture slides: CMU-1-Small-Region, a byte-different copy
of it (same pixels, another slide id: its "twin"), and two synthetic slides, all tiled at
224 px (lossless) and embedded with the random-init CNN."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import zlib
from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import run_cli, search_archive
from PIL import Image

from wsi_ssl.cli.main import main as cli_main
from wsi_ssl.embedding import EmbedConfig, embed
from wsi_ssl.encoders import create_encoder
from wsi_ssl.errors import (
    ConfigError,
    CorruptIndexError,
    DiskFullError,
    EncoderMismatchError,
    ImageQueryError,
    ImageTooLargeError,
    IndexBusyError,
    IndexNotFoundError,
    NoTilesInRegionError,
    RegionOutsideSlideError,
    UnknownSlideError,
    WsiSslError,
)
from wsi_ssl.search import (
    MAX_SLIDE_NUMBER,
    MAX_TILE_NUMBER,
    SearchIndex,
    decode_ids,
    demo_region_gallery,
    encode_ids,
    evaluate,
)
from wsi_ssl.search.image import load_image
from wsi_ssl.storage import open_store
from wsi_ssl.storage.index_files import MANIFEST, index_lock, read_index

ENCODER = "random-cnn"


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, cmu_small: Path) -> dict[str, object]:
    return search_archive(tmp_path_factory.mktemp("search"), cmu_small, ("s1", "s2"))


def _coords(root: Path, slide_id: str) -> np.ndarray:
    return open_store(root).slide(slide_id).coords


def _dimensions(root: Path, slide_id: str) -> tuple[int, int]:
    width, height = open_store(root).slide(slide_id).source["dimensions"]
    return int(width), int(height)


def _by_score(hits: list[tuple]) -> list[tuple]:
    """Hits best first, ties in a fixed order (the score is each tuple's last item)."""
    return sorted(hits, key=lambda hit: (-hit[-1], str(hit[:-1])))


def _cli(*argv: str) -> int:
    """The ``wsi-ssl`` entry point itself (cli/main.py)."""
    return cli_main(list(argv))


# -- ids -------------------------------------------------------------------------------------


def test_id_encoding_round_trips_at_the_limits() -> None:
    slides = np.array([0, 1, 7, MAX_SLIDE_NUMBER, MAX_SLIDE_NUMBER])
    tiles = np.array([0, MAX_TILE_NUMBER, 12345, 0, MAX_TILE_NUMBER])
    ids = encode_ids(slides, tiles)
    assert ids.dtype == np.int64 and (ids >= 0).all()
    assert ids[-1] == np.iinfo(np.int64).max  # the largest id is the largest int64
    s, t = decode_ids(ids)
    assert (s == slides).all() and (t == tiles).all()
    assert [v.tolist() for v in decode_ids(np.array([-1]))] == [[-1], [-1]]
    # and through a FAISS index and back
    idx = faiss.IndexIDMap(faiss.IndexFlatIP(4))
    vecs = np.eye(4, dtype=np.float32)
    idx.add_with_ids(
        vecs, encode_ids(MAX_SLIDE_NUMBER, np.arange(MAX_TILE_NUMBER - 3, MAX_TILE_NUMBER + 1))
    )
    _, found = idx.search(vecs, 1)
    s, t = decode_ids(found[:, 0])
    assert (s == MAX_SLIDE_NUMBER).all() and t.tolist() == list(
        range(MAX_TILE_NUMBER - 3, MAX_TILE_NUMBER + 1)
    )
    for bad_slide, bad_tile in (
        (MAX_SLIDE_NUMBER + 1, 0),
        (-1, 0),
        (0, MAX_TILE_NUMBER + 1),
        (0, -1),
    ):
        with pytest.raises(ConfigError):
            encode_ids(bad_slide, bad_tile)


# -- queries ---------------------------------------------------------------------------------


def test_a_box_at_the_slide_edge_takes_the_tiles_mostly_off_the_slide(archive: dict) -> None:
    """A bottom-row tile of CMU-1-Small-Region has 55 of its 224 px on the slide: its centre is
    off the slide, so a box along the edge once found no tile; the centre of its part on the
    slide counts."""
    index: SearchIndex = archive["index"]
    sid = archive["ids"]["cmu"]
    coords = _coords(archive["root"], sid)
    _, height = open_store(archive["root"]).slide(sid).source["dimensions"]
    edge = coords[coords[:, 1] + 224 > height]
    assert len(edge) and (edge[:, 1] + 112 >= height).all()  # centres off the slide
    x = int(edge[0, 0])
    query = index.query_region(sid, (x, height - 40, 224, 40))
    assert query.tile_coords.tolist() == [[x, int(edge[0, 1])]]


def test_region_query_returns_its_own_tiles_first(archive: dict) -> None:
    index: SearchIndex = archive["index"]
    sid = archive["ids"]["s1"]
    coords = _coords(archive["root"], sid)
    x0, y0 = coords[0]
    box = (int(x0), int(y0), 3 * 224, 2 * 224)
    query = index.query_region(sid, box)
    result = index.search(query, k=5)
    top = result.hits[0]
    assert top.slide_id == sid
    assert set(query.tile_numbers.tolist()) <= set(top.tiles)
    assert top.score == pytest.approx(query.n_tiles, abs=1e-3)  # every query tile matched itself
    assert top.coverage == 1.0
    # the query holds the stored vectors of its tiles, as unit vectors
    stored = open_store(archive["root"]).embeddings(sid, index.encoder_id).features
    want = np.asarray(stored, np.float32)[query.tile_numbers]
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(query.vectors, want, rtol=1e-5, atol=1e-6)
    for q in (query, index.query_tile(sid, (int(x0), int(y0))), index.query_slide(sid)):
        np.testing.assert_allclose(np.linalg.norm(q.vectors, axis=1), 1.0, rtol=1e-5)
    # regions never overlap on a slide
    for a in result.hits:
        for b in result.hits:
            if a is not b and a.slide_id == b.slide_id:
                ax, ay, aw, ah = a.box
                bx, by, bw, bh = b.box
                assert ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay
    assert [h.score for h in result.hits] == sorted((h.score for h in result.hits), reverse=True)
    # excluding the query slide leaves it out
    others = index.search(query, k=5, exclude_self=True)
    assert others.hits and all(h.slide_id != sid for h in others.hits)


def test_a_tiles_own_corner_queries_that_tile(cmu_small: Path, tmp_path: Path) -> None:
    """``query_tile(slide, coords[i])`` is tile i. At 1 µm/px CMU's 224 px tiles are 448.9
    level-0 px, so a rounded corner also lies in the tile before, whose centre is nearer:
    the neighbour was taken for most tiles."""
    from wsi_ssl.config import TilingConfig
    from wsi_ssl.tiling.batch import tile_slide

    root = tmp_path / "root"
    tiling = TilingConfig(tile_size=224, mpp=1.0, codec="zstd", tiles_per_chunk=16)
    cmu = tile_slide(cmu_small, root, tiling).details["slide_id"]
    assert not embed(root, "random-cnn", EmbedConfig(batch_size=32, workers=0)).failed
    index = SearchIndex.build(root, "random-cnn", kind="flat")
    size = index.query_tile(cmu, (1100, 1500)).tile_size
    assert size != round(size)  # a fractional tile size, as the case needs
    coords = _coords(root, cmu)
    got = [tuple(index.query_tile(cmu, (int(x), int(y))).tile_coords[0]) for x, y in coords]
    assert got == [tuple(c) for c in coords]


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_tile_query_finds_the_twin(archive: dict, kind: str) -> None:
    index = (
        archive["index"]
        if kind == "flat"
        else SearchIndex.build(archive["root"], ENCODER, name="twin-hnsw", kind="hnsw")
    )
    cmu, twin = archive["ids"]["cmu"], archive["ids"]["twin"]
    coords = _coords(archive["root"], cmu)
    width, height = _dimensions(archive["root"], cmu)
    for row in (0, len(coords) // 2, len(coords) - 1):
        x, y = (int(v) for v in coords[row])
        # a point inside the tile and on the slide (an edge tile may overhang the slide)
        point = (min(x + 100, width - 1), min(y + 100, height - 1))
        result = index.search_tile(cmu, point, k=3, exclude_self=True)
        best = result.hits[0]
        assert (best.slide_id, best.x, best.y, best.tile) == (twin, x, y, row)
        assert best.score == pytest.approx(1.0, abs=1e-4)
    # and a region of the CMU slide finds the same region on the twin
    box = (int(coords[0, 0]), int(coords[0, 1]), 448, 448)
    region = index.search_region(cmu, box, k=1, exclude_self=True).hits[0]
    assert region.slide_id == twin and region.box[:2] == box[:2]


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_add_then_query_equals_full_rebuild(archive: dict, kind: str) -> None:
    root, ids = archive["root"], archive["ids"]
    partial = SearchIndex.build(
        root, ENCODER, name=f"partial-{kind}", kind=kind, slides=[ids["cmu"], ids["s1"]]
    )
    assert partial.n_vectors < archive["index"].n_vectors
    summary = partial.add()
    assert sorted(summary.added) == sorted([ids["twin"], ids["s2"]]) and not summary.updated
    assert partial.add().notes  # nothing new the second time
    full = SearchIndex.build(root, ENCODER, name=f"full-{kind}", kind=kind)
    reopened = SearchIndex.open(root, f"partial-{kind}")
    assert reopened.n_vectors == full.n_vectors == archive["index"].n_vectors

    def answers(index: SearchIndex) -> list:
        out = []
        for sid in (ids["cmu"], ids["s2"]):
            coords = _coords(root, sid)
            x, y = (int(v) for v in coords[len(coords) // 3])
            # hits of equal score (a slide and its twin) may come in either order
            tiles = index.search_tile(sid, (x, y), k=8)
            out.append(_by_score([(h.slide_id, h.tile, round(h.score, 5)) for h in tiles.hits]))
            region = index.search_region(sid, (x, y, 448, 448), k=4, exclude_self=True)
            out.append(_by_score([(h.slide_id, h.box, round(h.score, 4)) for h in region.hits]))
        return out

    assert answers(reopened) == answers(full)


def test_remove_slides(archive: dict, tmp_path: Path) -> None:
    root, ids = archive["root"], archive["ids"]
    for kind in ("flat", "hnsw"):
        index = SearchIndex.build(root, ENCODER, name=f"rm-{kind}", kind=kind)
        before = index.n_vectors
        n_twin = index.resolve_slide(ids["twin"])["n_tiles"]
        assert index.remove(ids["twin"]) == n_twin
        index = SearchIndex.open(root, f"rm-{kind}")
        assert index.n_vectors == before - n_twin
        coords = _coords(root, ids["cmu"])
        hits = index.search_tile(ids["cmu"], tuple(int(v) for v in coords[0]), k=20).hits
        assert hits and all(h.slide_id != ids["twin"] for h in hits)
        with pytest.raises(UnknownSlideError):
            index.remove(ids["twin"])
        # a plain add leaves it out (it brought it back); named, it comes back as a new number
        if kind == "flat":
            code, out, err = run_cli(["index", str(root), "--name", "rm-flat", "--add"])
            assert code == 0, err
            assert "left out 1 slide(s) taken out with --remove (name them with --slides" in out
        assert index.add().excluded == [ids["twin"]] and index.n_vectors == before - n_twin
        assert index.add([ids["twin"]]).added == [ids["twin"]]
        assert index.add().excluded == []  # indexed again: nothing left out
        if kind == "flat":  # its embeddings gone, then back: the old removal does not count
            emb = root / "slides" / f"{ids['twin']}.zarr" / "embeddings"
            emb.rename(emb.with_name("aside"))
            assert index.add().removed == [ids["twin"]]
            emb.with_name("aside").rename(emb)
            assert index.add().added == [ids["twin"]]
        assert SearchIndex.open(root, f"rm-{kind}").n_vectors == before
        # a small slide: under HNSW a tombstone, filtered at query time
        index.remove(ids["s2"])
        index = SearchIndex.open(root, f"rm-{kind}")
        if kind == "hnsw":
            assert index.record["tombstones"] > 0 and index.index.ntotal > index.n_vectors
        else:
            assert index.record["tombstones"] == 0 and index.index.ntotal == index.n_vectors
        s2_coords = _coords(root, ids["s2"])
        hits = index.search_tile(ids["s2"], tuple(int(v) for v in s2_coords[0]), k=50).hits
        assert hits and all(h.slide_id != ids["s2"] for h in hits)


def test_image_query_finds_its_source_region(
    archive: dict, cmu_small: Path, tmp_path: Path
) -> None:
    from wsi_ssl.slide import open_slide

    index: SearchIndex = archive["index"]
    cmu = archive["ids"]["cmu"]
    coords = _coords(archive["root"], cmu)
    x, y = (int(v) for v in coords[len(coords) // 2])
    with open_slide(cmu_small) as reader:
        crop = np.asarray(reader.read_region((x, y), 0, (448, 448)))[..., :3]
        mpp = reader.mpp
    path = tmp_path / "crop.png"
    Image.fromarray(crop).save(path)
    result = index.search_image(path, image_mpp=mpp, k=3)
    assert result.query.n_tiles == 4
    top = result.hits[0]
    assert top.slide_id in (cmu, archive["ids"]["twin"]) and top.box[:2] == (x, y)
    assert top.score == pytest.approx(4.0, abs=1e-3)
    # the encoder named explicitly must be the index's
    with pytest.raises(EncoderMismatchError, match="not the index's"):
        index.query_image(path, encoder=create_encoder(ENCODER, seed=1))
    assert index.query_image(path, encoder=ENCODER).n_tiles == 4
    # the same region scanned at half the resolution: --image-mpp brings it back to scale
    half = tmp_path / "half.png"
    Image.fromarray(crop).resize((224, 224), Image.Resampling.BOX).save(half)
    rescaled = index.search_image(half, image_mpp=2 * mpp, k=3)
    assert rescaled.query.n_tiles == 4
    assert rescaled.hits[0].slide_id in (cmu, archive["ids"]["twin"])
    assert rescaled.hits[0].box[:2] == (x, y)
    assert index.query_image(half, image_mpp=mpp).n_tiles == 1  # taken at face value: 1 tile


def test_slide_retrieval_and_evaluation(archive: dict) -> None:
    index: SearchIndex = archive["index"]
    ids = archive["ids"]
    ranked = index.search_slides(ids["cmu"], k=3, exclude_self=True)
    assert ranked.hits[0].slide_id == ids["twin"] and ranked.hits[0].score == pytest.approx(
        1.0, abs=1e-4
    )
    store = open_store(index.root).slide(ids["cmu"])
    w, h = store.source["dimensions"]  # the query box is the slide: its size in µm
    assert ranked.query.box == (0, 0, w, h)
    assert ranked.query.size_um == pytest.approx((w * store.source["mpp"], h * store.source["mpp"]))
    labels = {
        ids["cmu"]: "skin",
        ids["twin"]: "skin",
        ids["s1"]: "synthetic",
        ids["s2"]: "synthetic",
    }
    mv = evaluate.majority_vote(index, labels, k=1)
    assert mv["n_slides"] == 4 and mv["mmv"] == 1.0 and mv["accuracy"] == 1.0
    prec = evaluate.precision_at_k(index, labels, k=5, tiles_per_slide=8)
    assert prec["queries"] == 32 and 0.5 <= prec["precision"] <= 1.0
    assert evaluate.recall_at_k(index, n_queries=32)["recall"] == 1.0
    with pytest.raises(ConfigError, match="at least 2 labelled"):
        evaluate.majority_vote(index, {ids["cmu"]: "skin"})


@pytest.mark.slow
def test_approximate_index_reaches_the_promised_recall() -> None:
    """Calibrated on indexed vectors, checked on fresh draws from the same clustered mixture."""
    from wsi_ssl.search.build import build_faiss, search_params
    from wsi_ssl.search.calibration import tie_aware_recall
    from wsi_ssl.search.config import IndexConfig, plan_index
    from wsi_ssl.search.vectors import ArraySource
    from wsi_ssl.testing.vectors import ClusteredVectors

    gen = ClusteredVectors(dim=64, n_clusters=64, intrinsic_dim=12, seed=3)
    n = 12000
    x, queries = gen.rows(0, n), gen.rows(0, 300, stream=2)
    exact = faiss.IndexFlatIP(64)
    exact.add(x)
    gt_sims, gt_ids = exact.search(queries, 21)
    for kind in ("hnsw", "ivfpq"):
        config = IndexConfig(kind=kind, calibration_queries=200)
        plan = plan_index(n, 64, config)
        index, params, calibration = build_faiss(ArraySource(np.arange(n), x), plan, config)
        _, found = index.search(queries, 10, params=search_params(params, 10))
        recall = tie_aware_recall(found, gt_sims, gt_ids, 10)
        assert calibration["promised_recall"] <= recall, (kind, calibration, recall)
        if kind == "hnsw":
            assert calibration["met"] and recall >= 0.95


def test_auto_picks_the_kind_by_archive_size() -> None:
    from wsi_ssl.search.config import IndexConfig, plan_index

    config = IndexConfig()
    sizes = {
        1_000: "flat",
        config.flat_max: "flat",
        config.flat_max + 1: "hnsw",
        config.hnsw_max: "hnsw",
        config.hnsw_max + 1: "ivfpq",
        10_000_000: "ivfpq",
    }
    for n, kind in sizes.items():
        plan = plan_index(n, 384, config)
        assert plan["kind"] == kind, (n, plan)
        if kind == "ivfpq":  # more lists for more vectors, enough training rows per list
            assert plan["nlist"] >= 1024 and plan["train_size"] >= 39 * plan["nlist"]
    small, large = (plan_index(n, 384, IndexConfig(kind="ivfpq")) for n in (200_000, 10**7))
    assert small["nlist"] < large["nlist"]


# -- bad input -------------------------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` with almost no pixel data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_bad_queries_are_typed_errors(archive: dict, tmp_path: Path) -> None:
    index: SearchIndex = archive["index"]
    cmu = archive["ids"]["cmu"]
    with pytest.raises(RegionOutsideSlideError, match="outside the slide"):
        index.query_region(cmu, (50_000, 50_000, 500, 500))
    with pytest.raises(RegionOutsideSlideError, match="no area"):
        index.query_region(cmu, (10, 10, 0, 5))
    with pytest.raises(RegionOutsideSlideError):
        index.query_tile(cmu, (-5, 10))
    coords = _coords(archive["root"], cmu)
    x0, y0 = (int(v) for v in coords[0])
    for k in ("3", 2.5, True, 0):  # a TypeError for "3" before
        with pytest.raises(ConfigError, match=f"k must be a whole number >= 1, got {k!r}"):
            index.search_region(cmu, (x0, y0, 448, 448), k=k)  # type: ignore[arg-type]
    assert len(index.search_region(cmu, (x0, y0, 448, 448), k=np.int64(2)).hits) == 2
    stored = {(int(x), int(y)) for x, y in coords}
    empty = next(
        (x, y)
        for y in range(0, 2967 - 224, 224)
        for x in range(0, 2220 - 224, 224)
        if (x, y) not in stored
    )
    with pytest.raises(NoTilesInRegionError, match="no stored tissue tile"):
        index.query_region(cmu, (*empty, 224, 224))
    for unknown in ("deadbeefdeadbeef", "no-such-slide.svs"):
        with pytest.raises(UnknownSlideError):
            index.query_tile(unknown, (10, 10))
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    with pytest.raises(ImageQueryError, match="not an image"):
        index.query_image(not_image)
    with pytest.raises(ImageQueryError, match="no such image"):
        index.query_image(tmp_path / "missing.png")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(100_000, 100_000))  # 10^10 pixels, a few bytes on disk
    with pytest.raises(ImageTooLargeError):
        load_image(bomb)
    big = tmp_path / "big.png"
    big.write_bytes(_png_header(9000, 9000))
    with pytest.raises(ImageTooLargeError, match="more than"):
        load_image(big)
    truncated = tmp_path / "trunc.png"
    buf = tmp_path / "ok.png"
    Image.fromarray(np.full((300, 300, 3), 128, np.uint8)).save(buf)
    truncated.write_bytes(buf.read_bytes()[:-200])
    with pytest.raises(ImageQueryError):
        load_image(truncated)
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((300, 300, 3), 255, np.uint8)).save(blank)
    with pytest.raises(NoTilesInRegionError, match="blank"):
        index.query_image(blank)
    speck = tmp_path / "speck.png"  # tissue, but 5 x 5 px: it said "no tissue in it"
    Image.fromarray(np.full((5, 5, 3), (160, 60, 140), np.uint8)).save(speck)
    with pytest.raises(NoTilesInRegionError, match=r"5x5 px at .* mostly white padding"):
        index.query_image(speck)
    with pytest.raises(EncoderMismatchError, match="made by encoder"):
        index.search_vectors(np.ones((1, index.dim)), encoder_id="another-0123456789ab")
    with pytest.raises(EncoderMismatchError, match="dimension"):
        index.search_vectors(np.ones((1, index.dim + 1)))
    # every message is one line (the CLI prints it as such)
    for err in (RegionOutsideSlideError("a"), UnknownSlideError("x", "index y")):
        assert "\n" not in str(err) and isinstance(err, WsiSslError)


def test_index_built_with_another_encoder_is_refused(archive: dict, tmp_path: Path) -> None:
    from wsi_ssl.errors import EmbeddingsNotFoundError

    root = tmp_path / "root"
    shutil.copytree(archive["root"], root)
    other = create_encoder(ENCODER, seed=7)
    sid = archive["ids"]["s1"]
    embed(root, other, EmbedConfig(batch_size=32, device="cpu", workers=0), slides=[sid])
    index = SearchIndex.build(root, other.encoder_id, kind="flat")
    assert index.encoder_id == other.encoder_id and len(index.slides) == 1
    # a slide embedded only by the other encoder cannot be a query of the first index
    first = SearchIndex.open(root, archive["encoder_id"])
    assert first.encoder_id != other.encoder_id
    with pytest.raises(EncoderMismatchError):
        first.search_vectors(np.ones((1, first.dim)), encoder_id=other.encoder_id)
    with pytest.raises(EmbeddingsNotFoundError):
        index.query_tile(archive["ids"]["cmu"], (1000, 1000))


def test_corrupt_and_truncated_index_files(
    archive: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    shutil.copytree(archive["root"], root)
    name = archive["encoder_id"]
    # loading never unpickles
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    index = SearchIndex.open(root, name, verify=True)
    gen = index.files.path
    faiss_file = gen / "index.faiss"
    data = faiss_file.read_bytes()

    faiss_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptIndexError, match="truncated"):
        SearchIndex.open(root, name)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    faiss_file.write_bytes(bytes(flipped))
    with pytest.raises(CorruptIndexError, match="sha256"):
        SearchIndex.open(root, name)
    faiss_file.write_bytes(data)
    SearchIndex.open(root, name)  # intact again
    (gen / "slides.json").write_text("[{")
    with pytest.raises(CorruptIndexError):
        SearchIndex.open(root, name, verify=False)
    (gen / "config.json").write_text("{}")
    with pytest.raises(CorruptIndexError, match="manifest"):
        SearchIndex.open(root, name)
    (root / "index" / name / MANIFEST).unlink()
    with pytest.raises(IndexNotFoundError):
        SearchIndex.open(root, name)
    with pytest.raises(IndexNotFoundError):
        SearchIndex.open(root, "nope")


def test_writes_are_atomic_and_locked(
    archive: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl
    import os

    root = tmp_path / "root"
    shutil.copytree(archive["root"], root)
    name = archive["encoder_id"]
    before = SearchIndex.open(root, name)
    gen = before.files.path.name

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(faiss, "write_index", crash)
    with pytest.raises(DiskFullError, match="no space left on device; free space"):
        before.remove(archive["ids"]["s2"])
    monkeypatch.undo()
    after = SearchIndex.open(root, name)  # the old generation, whole
    assert after.files.path.name == gen and after.n_vectors == before.n_vectors
    assert not [p for p in (root / "index" / name).iterdir() if p.name.startswith(".tmp-")]
    # another writer holds the lock
    fd = os.open(root / "index" / name / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(IndexBusyError):
            after.remove(archive["ids"]["s2"])
        code, _, err = run_cli(["index", str(root), "--name", name, "--add", "--quiet"])
        assert code == 1 and "is being written by another process" in err  # busy: exit 1
    finally:
        os.close(fd)
    with index_lock(root, name), index_lock(root, name):  # re-entrant in one process
        pass
    # memory-mapped: searchable, and add/remove reload it fully first (FAISS cannot write a map)
    mapped = SearchIndex.open(root, name, mmap=True)
    assert mapped.mmapped
    coords = _coords(root, archive["ids"]["cmu"])
    assert mapped.search_tile(archive["ids"]["cmu"], tuple(int(v) for v in coords[0]), k=1).hits
    assert mapped.remove(archive["ids"]["s2"]) > 0 and not mapped.mmapped
    index, files = read_index(root, name, mmap=True)
    assert index.ntotal == mapped.n_vectors and files.path.name != gen


# -- CLI, gallery, demo ----------------------------------------------------------------------


def test_cli_index_and_search(
    archive: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    shutil.copytree(archive["root"], root)
    shutil.rmtree(root / "index")
    ids = archive["ids"]
    assert _cli("index", str(root), "--encoder", ENCODER, "--name", "cli", "--quiet") == 0
    assert "flat" in capsys.readouterr().out
    assert _cli("search", str(root), "--list") == 0
    assert ids["cmu"] in capsys.readouterr().out
    coords = _coords(root, ids["cmu"])
    x, y = (int(v) for v in coords[0])
    png = tmp_path / "g.png"
    argv = ["search", str(root), "--slide", "CMU-1-Small-Region.svs", "--box", f"{x},{y},448,448"]
    assert _cli(*argv, "-k", "3", "--exclude-self", "--json", "--gallery", str(png)) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "regions" and out["hits"][0]["slide_id"] == ids["twin"]
    assert out["hits"][0]["box"][:2] == [x, y]
    with Image.open(png) as im:  # the query and 3 hits: one row of 4 panels (280 x 310 px)
        assert im.size == (4 * 280, 310)
    xy = ["search", str(root), "--slide", ids["cmu"], "--xy", f"{x + 5},{y + 5}"]
    assert _cli(*xy, "-k", "12", "--gallery", str(png)) == 0  # every hit: 13 panels, 3 rows
    assert "gallery:" in capsys.readouterr().out
    with Image.open(png) as im:
        assert im.size == (5 * 280, 3 * 310)
    assert _cli("search", str(root), "--slide", ids["cmu"][:6], "--xy", f"{x + 5},{y + 5}") == 0
    assert "twin" in capsys.readouterr().out.lower()
    assert _cli("search", str(root), "--slide", ids["cmu"], "--slides", "--exclude-self") == 0
    assert capsys.readouterr().out.splitlines()[2].split()[-1] == f"({ids['twin']})"
    assert _cli("index", str(root), "--name", "cli", "--remove", ids["s2"], "--json") == 0
    removed = json.loads(capsys.readouterr().out)["removed"]
    assert list(removed) == [ids["s2"]] and removed[ids["s2"]] > 0
    assert _cli("index", str(root), "--name", "cli", "--add", "--quiet") == 0
    assert "left out 1 slide(s) taken out with --remove" in capsys.readouterr().out
    assert _cli("index", str(root), "--name", "cli", "--add", "--slides", ids["s2"]) == 0
    assert "added 1 slide" in capsys.readouterr().out
    # --add keeps the index's encoder and kind: flags asking for others are refused (ignored)
    assert _cli("index", str(root), "--name", "cli", "--add", "--kind", "hnsw") == 2
    assert "keeps its own (flat)" in capsys.readouterr().err
    assert _cli("index", str(root), "--name", "cli", "--add", "--kind", "flat", "--quiet") == 0
    embed = ["embed", str(root), "--encoder", ENCODER, "--resize", "bilinear", "--quiet"]
    assert _cli(*embed, "--workers", "0") == 0
    first = archive["encoder_id"]
    other = next(e for e in open_store(root).embedding_ids(ids["cmu"]) if e != first)
    assert _cli("index", str(root), "--encoder", other, "--name", "cli", "--add") == 2
    assert f"holds {first}'s vectors, not {other}'s" in capsys.readouterr().err
    assert _cli("search", str(root), "--slide", ids["cmu"], "--box", "90000,0,10,10") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wsi-ssl: error:") and "90000" in err[0]
    with pytest.raises(SystemExit):  # argparse: malformed box
        _cli("search", str(root), "--slide", ids["cmu"], "--box", "1,2,3")


def test_cli_search_notes_hits_on_a_retiled_slide_and_a_sampled_box(
    archive: dict,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Hits on a slide re-tiled after indexing name tiles its store no longer holds: the CLI
    says so (the web page did, the CLI said nothing); a box holding more tiles than a query
    takes says it was sampled (the header said "(1024 tiles)" of 1,165)."""
    from wsi_ssl.search import queries

    root = tmp_path / "root"
    shutil.copytree(archive["root"], root)
    cmu, twin = archive["ids"]["cmu"], archive["ids"]["twin"]
    name = archive["index"].name  # the module's archive gains indexes test by test
    index = SearchIndex.open(root, name)
    twin_file = index.resolve_slide(twin).path
    retile = ["--tile-size", "256", "--no-resume", "--discard-embeddings", "--quiet"]
    assert _cli("tile", str(twin_file), "--out", str(root), *retile) == 0
    capsys.readouterr()
    x, y = (int(v) for v in _coords(root, cmu)[0])
    argv = ["search", str(root), "--index", name, "--slide", cmu, "--box", f"{x},{y},448,448"]
    argv += ["-k", "3"]
    assert _cli(*argv, "--exclude-self") == 0
    out, err = capsys.readouterr()
    assert twin_file.split("/")[-1] in out
    assert "note: " in err and "was re-tiled after indexing" in err
    assert _cli(*argv, "--exclude-self", "--json") == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert len(notes) == 1 and "re-tiled after indexing" in notes[0]
    assert _cli("search", str(root), "--index", name, "--slide", cmu, "--slides") == 0
    assert "note:" not in capsys.readouterr().err  # slide hits have no tile boxes to be stale
    monkeypatch.setattr(queries, "MAX_QUERY_TILES", 2)  # a query's bound, made small
    query = SearchIndex.open(root, name).query_region(cmu, (x, y, 448, 448))
    assert query.n_tiles == 2 and query.tiles_in_box is not None and query.tiles_in_box > 2
    assert query.to_dict()["tiles_in_box"] == query.tiles_in_box
    assert _cli(*argv) == 0
    assert (
        f"(2 tiles, an even sample of the {query.tiles_in_box} it holds)" in capsys.readouterr().out
    )


def test_search_flags_that_would_be_ignored_are_refused(
    archive: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Image-query flags with a slide query, a query with --list, and a multi-scale tiling
    output (one archive per scale) are one line each, exit 2."""
    root, cmu = archive["root"], archive["ids"]["cmu"]
    for argv, message in (
        (["--slide", cmu, "--image-mpp", "0.5"], "--image-mpp go with --image"),
        (["--slide", cmu, "--encoder", "x", "--weights", "w.pt"], "--encoder, --weights go with"),
        (["--list", "--slides"], "--list shows the index and takes no query (--slides)"),
        (["--list", "--image-mpp", "1"], "takes no query (--image-mpp)"),
    ):
        assert _cli("search", str(root), *argv) == 2
        [err] = capsys.readouterr().err.strip().splitlines()
        assert message in err, err
    multi = tmp_path / "multi"
    shutil.copytree(root, multi / "mpp-0.5")
    assert _cli("search", str(multi), "--list") == 2
    err = capsys.readouterr().err
    assert f"{multi}: not an archive root but one per scale" in err and "mpp-0.5" in err


def test_demo_region_gallery(archive: dict, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(archive["root"], root)
    shutil.rmtree(root / "index")
    result, png, lines = demo_region_gallery(root, tmp_path / "demo" / "gallery.png", k=4)
    assert png.is_file() and png.stat().st_size > 10_000
    assert result.hits and result.mode == "regions" and any("gallery" in line for line in lines)


def test_region_windows_match_brute_force() -> None:
    from wsi_ssl.search.regions import best_windows

    rng = np.random.default_rng(0)
    n = 60
    q_rows = rng.integers(0, 5, n)
    cells = rng.integers(0, 12, (n, 2))
    sims = rng.random(n)
    wins = best_windows(q_rows, cells, sims, (3, 2), 6, grid_shape=(12, 12))

    def score(r0: int, c0: int) -> float:
        inside = (
            (cells[:, 0] >= r0)
            & (cells[:, 0] < r0 + 3)
            & (cells[:, 1] >= c0)
            & (cells[:, 1] < c0 + 2)
        )
        return sum(sims[inside & (q_rows == q)].max(initial=0.0) for q in range(5))

    best = max(score(r, c) for r in range(10) for c in range(11))
    assert wins[0].score == pytest.approx(best)
    assert wins[0].score == pytest.approx(score(wins[0].row, wins[0].col))
    for a in wins:
        for b in wins:
            if a is not b:
                assert abs(a.row - b.row) >= 3 or abs(a.col - b.col) >= 2
    assert [w.score for w in wins] == sorted((w.score for w in wins), reverse=True)


def test_exclusion_selector_merges_consecutive_slides_and_keeps_the_rest() -> None:
    """Leaving out most of an archive costs a few id ranges; membership stays exact."""
    from wsi_ssl.search.ids import encode_ids, exclusion_selector, slide_runs

    assert slide_runs([9, 0, 1, 2, 5, 6, 1]) == [(0, 2), (5, 6), (9, 9)]
    excluded = [n for n in range(1000) if n not in (3, 500, 998)]
    assert len(slide_runs(excluded)) == 4
    tombstones = encode_ids(np.full(2, 3), np.array([7, 8]))
    selector, keep = exclusion_selector(tombstones, excluded)
    assert len(keep) < 12  # 4 ranges + the tombstones, their unions and the negation
    for slide in (0, 2, 3, 4, 499, 500, 501, 997, 998, 999):
        ids = encode_ids(np.full(10, slide), np.arange(10))
        member = [bool(selector.is_member(int(i))) for i in ids]
        wanted = [slide in (3, 500, 998) and not (slide == 3 and t in (7, 8)) for t in range(10)]
        assert member == wanted, slide


def test_search_among_several_indexes_names_the_flag_to_choose(
    small_archive: Path, tmp_path: Path
) -> None:
    root = shutil.copytree(small_archive, tmp_path / "root")
    argv = ["index", str(root), "--encoder", "random-cnn", "--name", "second", "--quiet"]
    assert run_cli(argv)[0] == 0
    slide_id = open_store(root).slide_ids[0]
    query = ["search", str(root), "--slide", slide_id, "--box", "0,0,224,224", "--json"]
    code, _, err = run_cli(query)
    assert (
        code == 2 and "several indexes" in err and err.rstrip().endswith("(command line: --index)")
    ), err
    code, out, err = run_cli([*query, "--index", "second"])
    assert code == 0 and json.loads(out)["hits"], err


def test_index_with_an_encoder_that_is_no_embeddings_id_lists_the_ids(
    small_archive: Path,
) -> None:
    code, _, err = run_cli(["index", str(small_archive), "--encoder", "runs/cpu", "--quiet"])
    assert code != 0 and err.count("\n") == 1
    assert "no complete embeddings 'runs/cpu' (available: random-cnn" in err
    assert "name one of those ids (or a unique prefix of one), or run" in err


def test_a_click_near_the_edge_picks_the_tile_centred_there_on_the_slide(tmp_path: Path) -> None:
    """Overlapping tiles at the slide's right edge (900 px wide; tiles at x 672 and 784, the
    second with 116 of its 224 px on the slide): a click at x 830 is in both; the one whose
    part on the slide is centred nearest the click is the query (by full-tile centres the
    other), as region queries and label boxes place edge tiles."""
    from wsi_ssl.config import TilingConfig
    from wsi_ssl.embedding import embed
    from wsi_ssl.synthetic import write_synthetic_slide
    from wsi_ssl.tiling.batch import tile_slide

    slide = write_synthetic_slide(tmp_path / "s.tiff", (900, 800), seed=3)
    config = TilingConfig(tile_size=224, overlap=112, tissue_threshold=0.0, codec="zstd")
    sid = tile_slide(slide, tmp_path / "root", config).details["slide_id"]
    assert not embed(tmp_path / "root", "random-cnn", device="cpu", workers=0).failed
    index = SearchIndex.build(tmp_path / "root", "random-cnn", kind="flat")
    xs = set(_coords(tmp_path / "root", sid)[:, 0].tolist())
    assert {672, 784} <= xs and max(xs) == 784
    query = index.search_tile(sid, (830, 300), k=1).query
    assert query.box[0] == 784  # on-slide centres 842 (784..900) and 784 (672..896)


def test_slides_at_two_scales_are_indexed_apart_as_advised(tmp_path: Path) -> None:
    """``index`` refuses slides tiled at two scales and advises indexing them apart with a
    name each (``--slides`` alone wrote both builds to one index, the second replacing the
    first); following the advice gives two indexes."""
    from tests.conftest import run_cli
    from wsi_ssl.config import TilingConfig
    from wsi_ssl.embedding import embed
    from wsi_ssl.synthetic import write_synthetic_slide
    from wsi_ssl.tiling.batch import tile_slide

    root = tmp_path / "root"
    ids = []
    for seed, mpp in ((1, 0.5), (2, 1.0)):
        slide = write_synthetic_slide(tmp_path / f"s{seed}.tiff", (900, 700), seed=seed)
        config = TilingConfig(mpp=mpp, tile_size=224, tissue_threshold=0.0, codec="zstd")
        ids.append(tile_slide(slide, root, config).details["slide_id"])
    assert not embed(root, "random-cnn", device="cpu", workers=0).failed
    code, _, err = run_cli(["index", str(root), "--quiet"])
    assert code == 2 and "slides tiled at another scale than the index's" in err
    assert "index them apart (slides= and a name= of its own" in err
    assert err.rstrip().endswith("(command line: --slides, --name)"), err
    for sid, name in zip(ids, ("fine", "coarse"), strict=True):
        assert run_cli(["index", str(root), "--slides", sid, "--name", name, "--quiet"])[0] == 0
    assert [SearchIndex.open(root, n).slides[0].slide_id for n in ("fine", "coarse")] == ids


def test_a_region_picture_has_no_seams_between_adjacent_tiles(small_archive: Path) -> None:
    """Tiles drawn at a fractional scale each span their rounded start to the next one's:
    a box covered by adjacent tiles has no row or column of background between them."""
    from wsi_ssl.search.gallery import BACKGROUND, region_mosaic

    store = open_store(small_archive).slide(open_store(small_archive).slide_ids[0])
    side = int(store.tiling["tile_size_level0"])
    columns, rows = (-(-int(v) // side) for v in store.source["dimensions"])
    box = (0, 0, columns * side, rows * side)
    assert len(store.coords) == columns * rows  # every tile kept: the box is covered
    for panel in (333, 517):
        picture = np.asarray(region_mosaic(store, box, panel_px=panel))
        assert max(picture.shape[:2]) == panel
        blank = (picture == np.array(BACKGROUND, dtype=np.uint8)).all(axis=2)
        assert not blank.all(axis=0).any() and not blank.all(axis=1).any()


@pytest.mark.parametrize("hits_per_tile", [None, 4])
def test_showing_the_query_slide_changes_no_other_slides_score(
    archive: dict, hits_per_tile: int | None
) -> None:
    """The query slide's own tiles never use up the other slides' neighbours: with it shown,
    the other slides rank and score as with it hidden, for slide and region queries (also
    with a budget smaller than the slide's own tiles)."""
    index: SearchIndex = archive["index"]
    cmu = archive["ids"]["cmu"]
    shown = index.search(index.query_slide(cmu), k=4, hits_per_tile=hits_per_tile)
    hidden = index.search(
        index.query_slide(cmu), k=3, exclude_self=True, hits_per_tile=hits_per_tile
    )
    assert shown.hits[0].slide_id == cmu
    assert [(h.slide_id, round(h.score, 5)) for h in shown.hits[1:]] == [
        (h.slide_id, round(h.score, 5)) for h in hidden.hits
    ]
    box = (600, 900, 700, 500)
    shown = index.search_region(cmu, box, k=30, hits_per_tile=hits_per_tile)
    hidden = index.search_region(cmu, box, k=30, exclude_self=True, hits_per_tile=hits_per_tile)
    others = [(h.slide_id, h.box, round(h.score, 5)) for h in shown.hits if h.slide_id != cmu]
    assert others and others == [
        (h.slide_id, h.box, round(h.score, 5)) for h in hidden.hits[: len(others)]
    ]


def test_a_query_slide_whose_file_changed_says_it_is_the_indexed_version(
    tmp_path: Path,
) -> None:
    """``search --slide NAME`` after the file was replaced: the query is still the indexed
    (earlier) version, and a note says so and how to search the new content."""
    from conftest import run_cli

    from wsi_ssl.config import TilingConfig
    from wsi_ssl.embedding import EmbedConfig, embed
    from wsi_ssl.synthetic import write_synthetic_slide
    from wsi_ssl.tiling.batch import tile_slide

    slide = write_synthetic_slide(tmp_path / "s.tiff", (900, 700), seed=5)
    root = tmp_path / "root"
    tile_slide(slide, root, TilingConfig(tile_size=224, codec="zstd", tissue_threshold=0.0))
    embed(root, "random-cnn", EmbedConfig(batch_size=32, device="cpu", workers=0))
    SearchIndex.build(root, "random-cnn", kind="flat")
    code, out, err = run_cli(["search", str(root), "--slide", "s.tiff", "--box", "0,0,448,448"])
    assert code == 0 and "note:" not in err, err
    write_synthetic_slide(slide, (900, 700), seed=6)  # the same file, other content
    code, out, err = run_cli(["search", str(root), "--slide", "s.tiff", "--box", "0,0,448,448"])
    assert code == 0 and out.strip(), err
    assert err.startswith(f"note: {slide.resolve()} has changed since slide ") and (
        "the query is the indexed earlier version" in err
    ), err


def test_one_scale_test_for_search_and_mil() -> None:
    """Scale is µm/px within 0.1% and the tile size (search, MIL train and MIL predict); an
    index also needs the same overlap."""
    from wsi_ssl.search.archive import same_grid, tiling_key
    from wsi_ssl.storage.slide_store import same_scale

    a = {"mpp": 0.5, "tile_size": 224, "overlap": 0}
    assert same_scale(a, {**a, "mpp": 0.5004}) and same_scale(a, {**a, "overlap": 32})
    assert not same_scale(a, {**a, "mpp": 0.501}) and not same_scale(a, {**a, "tile_size": 256})
    assert same_grid(tiling_key(a), tiling_key({**a, "mpp": 0.5004}))
    assert not same_grid(tiling_key(a), tiling_key({**a, "overlap": 32}))


def test_an_hnsw_search_finds_all_of_the_query_slides_own_near_tiles(tmp_path: Path) -> None:
    """A small query slide among many tiles of the same kind: HNSW's one-slide filtered pass
    ran out of its beam before finding them; the own slide is now searched exactly."""
    from wsi_ssl.testing.bags import write_bag_store

    rng = np.random.default_rng(0)
    big, small = rng.normal(size=(6000, 32)), rng.normal(size=(40, 32))
    root = tmp_path / "root"
    write_bag_store(root, "a" * 16, big.astype(np.float32), encoder_id="enc", dtype="float32")
    write_bag_store(root, "b" * 16, small.astype(np.float32), encoder_id="enc", dtype="float32")
    index = SearchIndex.build(root, "enc", kind="hnsw")
    own = index.number_of("b" * 16)
    query = index.query_region("b" * 16, (0, 0, 448, 448))
    sims, ids = index.neighbours(query, "regions", 64, [])
    unit = small / np.linalg.norm(small, axis=1, keepdims=True)
    for q, row_sims, row_ids in zip(query.vectors, sims, ids, strict=True):
        mine = decode_ids(row_ids[row_ids >= 0])[0] == own
        got = sorted(decode_ids(row_ids[row_ids >= 0])[1][mine].tolist())
        assert got == list(range(40))  # every tile of its own slide, as an exact search finds
        np.testing.assert_allclose(
            np.sort(row_sims[row_ids >= 0][mine])[::-1], np.sort(unit @ q)[::-1], atol=1e-5
        )


@pytest.mark.parametrize("kind", ["hnsw", "hnsw-beam", "ivfpq"])
def test_an_approximate_search_leaving_out_the_nearest_slides_still_returns_k_hits(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leaving out the query's own slide (whose tiles are all nearer than any other) or every
    slide but one: the search visited a fixed number of vectors, the selector dropped the
    excluded ones among them, and HNSW returned 2 of 20 hits. Now k hits at the index's
    recall: HNSW searches the few vectors let through exactly ("hnsw-beam": as if they were
    more than EXACT_FLOATS holds, through its widened beam), IVF probes more lists."""
    from wsi_ssl.search import filtered
    from wsi_ssl.testing.bags import write_bag_store

    if kind == "hnsw-beam":
        monkeypatch.setattr(filtered, "EXACT_FLOATS", 0)
        kind = "hnsw"

    rng = np.random.default_rng(1)
    centre = rng.normal(size=32)
    own = centre + 0.05 * rng.normal(size=(4000, 32))  # the query's slide: its nearest tiles
    others = [centre + s * rng.normal(size=(60, 32)) for s in (0.6, 0.8, 1.0, 1.2)]
    root = tmp_path / "root"
    for i, vectors in enumerate([own, *others]):
        features = vectors.astype(np.float32)
        write_bag_store(root, f"{i:x}" * 16, features, encoder_id="enc", dtype="float32")
    index = SearchIndex.build(root, "enc", kind=kind)
    assert index.kind == kind
    query = centre[None].astype(np.float32)
    mine = index.number_of("0" * 16)
    unit = [v / np.linalg.norm(v, axis=1, keepdims=True) for v in others]
    q = centre / np.linalg.norm(centre)
    exact = np.sort(np.concatenate([u @ q for u in unit]))[::-1][:20]
    _, ids = index.search_vectors(query, 20, exclude_slides=[mine])
    assert (ids >= 0).sum() == 20 and mine not in decode_ids(ids[0])[0]
    found = _recall(index, ids[0], others, q, exact)
    assert found >= index.promised_recall - 0.05, found
    only = index.number_of("4" * 16)  # every slide but one left out
    rest = [n for n in range(5) if n != only]
    _, ids = index.search_vectors(query, 20, exclude_slides=rest)
    assert set(decode_ids(ids[0])[0].tolist()) == {only}
    last = np.sort(unit[3] @ q)[::-1][:20]
    assert _recall(index, ids[0], others, q, last) >= index.promised_recall - 0.05


def _recall(
    index: SearchIndex, ids: np.ndarray, slides: list[np.ndarray], q: np.ndarray, exact: np.ndarray
) -> float:
    """Share of the exact top hits (similarities ``exact``) among the hits ``ids``."""
    numbers, rows = decode_ids(ids)
    sims = []
    for n, r in zip(numbers.tolist(), rows.tolist(), strict=True):
        v = slides[[index.number_of(f"{i:x}" * 16) for i in range(1, 5)].index(n)][r]
        sims.append(float(v @ q / np.linalg.norm(v)))
    return float(np.isin(np.round(exact, 5), np.round(sims, 5)).mean())


def test_an_unknown_build_setting_is_named(archive: dict) -> None:
    """``SearchIndex.build(..., kindd="flat")`` names the setting and the valid ones (it was
    a bare TypeError from dataclasses.replace)."""
    with pytest.raises(ConfigError, match=r"unknown index setting\(s\) kindd; IndexConfig has "):
        SearchIndex.build(archive["root"], ENCODER, kindd="flat")
