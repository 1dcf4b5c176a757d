"""One damaged slide never stops an index build or update: the others go in, the damaged one
is listed with its remedy (exit 1), and an indexed slide whose store breaks keeps its vectors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import copy_two_slides, embedded_tiles, run_cli
from wsi_ssl.errors import EmbeddingsCorruptError
from wsi_ssl.search import SearchIndex, evaluate
from wsi_ssl.search.ids import decode_ids
from wsi_ssl.storage import open_store
from wsi_ssl.storage.embeddings import embedding_ids, read_embeddings


def _damage_embeddings(root: Path, slide_id: str, how: str = "undecodable") -> None:
    """One chunk file of the slide's embeddings overwritten with bytes no codec decodes, or
    deleted ("missing")."""
    store = open_store(root).slide(slide_id)
    [eid] = embedding_ids(store)
    chunk = next(
        p for p in sorted((store.path / "embeddings" / eid / "c").rglob("*")) if p.is_file()
    )
    if how == "missing":
        chunk.unlink()
    else:
        chunk.write_bytes(b"xx")


@pytest.mark.parametrize(("kind", "how"), [("flat", "undecodable"), ("hnsw", "missing")])
def test_a_build_indexes_the_readable_slides_and_lists_the_damaged_one(
    small_archive: Path, tmp_path: Path, kind: str, how: str
) -> None:
    root, good, bad = copy_two_slides(small_archive, tmp_path)
    _damage_embeddings(root, bad, how)
    argv = ["index", str(root), "--encoder", "random-cnn", "--kind", kind, "--json", "--quiet"]
    code, out, err = run_cli(argv)
    assert code == 1 and err.count("wsi-ssl: error: ") == 1 and "are damaged" in err, err
    report = json.loads(out)
    [damaged] = report["damaged"]
    assert damaged.startswith(f"{root / 'slides' / bad}.zarr: embeddings") and "re-embed" in damaged
    index = SearchIndex.open(root)
    assert [e.slide_id for e in index.slides] == [good]
    assert index.n_vectors == embedded_tiles(root, good) == report["index"]["n_vectors"]
    query = read_embeddings(open_store(root).slide(good), index.encoder_id).features[:3]
    _, ids = index.search_vectors(query, k=index.n_vectors)
    numbers = decode_ids(ids[ids >= 0])[0]
    assert set(numbers.tolist()) == {index.number_of(good)}

    code, out, err = run_cli(["embed", str(root), "--encoder", "random-cnn", "--quiet"])
    assert code == 0, err
    code, out, err = run_cli(["index", str(root), "--encoder", "random-cnn", "--add", "--json"])
    assert code == 0, err
    assert json.loads(out)["added"] == [bad] and "damaged" not in json.loads(out)
    index = SearchIndex.open(root)
    assert sorted(e.slide_id for e in index.slides) == sorted([good, bad])
    assert index.n_vectors == embedded_tiles(root, good) + embedded_tiles(root, bad)


def test_the_python_build_returns_the_damaged_slides_and_refuses_when_all_are(
    small_archive: Path, tmp_path: Path
) -> None:
    root, good, bad = copy_two_slides(small_archive, tmp_path)
    _damage_embeddings(root, bad)
    index = SearchIndex.build(root, "random-cnn", kind="flat")
    [err] = index.damaged
    assert isinstance(err, EmbeddingsCorruptError) and err.path.name == f"{bad}.zarr"
    assert [e.slide_id for e in index.slides] == [good]
    _damage_embeddings(root, good)
    with pytest.raises(EmbeddingsCorruptError):
        SearchIndex.build(root, "random-cnn", kind="flat")


def test_an_update_adds_the_readable_slides_and_keeps_an_indexed_one_whose_store_broke(
    small_archive: Path, tmp_path: Path
) -> None:
    root, good, bad = copy_two_slides(small_archive, tmp_path)
    SearchIndex.build(root, "random-cnn", kind="flat", slides=[good])
    before, coords = SearchIndex.open(root).n_vectors, SearchIndex.open(root).coords.copy()
    _damage_embeddings(root, bad)
    summary = SearchIndex.open(root).add()
    assert summary.added == [] and summary.removed == []
    assert len(summary.damaged) == 1 and f"{bad}.zarr" in summary.damaged[0]
    index = SearchIndex.open(root)
    [kept, left_out] = index.entries  # the unreadable slide's entry holds no vector
    assert kept.active and (left_out.slide_id, left_out.status) == (bad, "unreadable")
    assert not left_out.in_index and index.n_vectors == before
    grown = len(index.coords)
    again = SearchIndex.open(root).add()  # still unreadable: named again, no second entry
    assert len(again.damaged) == 1 and f"{bad}.zarr" in again.damaged[0]
    index = SearchIndex.open(root)
    assert len(index.entries) == 2 and len(index.coords) == grown  # it grew on each add
    _damage_embeddings(root, good, "missing")  # an indexed slide: kept, and the check says so
    with pytest.raises(EmbeddingsCorruptError, match="chunk files missing"):
        evaluate.recall_at_k(index, n_queries=4)
    code, out, err = run_cli(["index", str(root), "--encoder", "random-cnn", "--add", "--json"])
    assert code == 1 and json.loads(out)["removed"] == [], err
    meta = root / "slides" / f"{good}.zarr" / "zarr.json"
    meta.write_text(meta.read_text().replace('"schema_version": 1', '"schema_version": 999'))
    code, out, err = run_cli(["index", str(root), "--encoder", "random-cnn", "--add", "--json"])
    assert code == 1 and json.loads(out)["removed"] == [], err
    assert any(f"{good}.zarr: schema_version 999" in d for d in json.loads(out)["damaged"])
    (root / "slides" / f"{good}.zarr" / "zarr.json").write_text("{bad")
    code, out, err = run_cli(["index", str(root), "--encoder", "random-cnn", "--add", "--json"])
    assert code == 1, err
    report = json.loads(out)
    assert report["removed"] == [] and len(report["damaged"]) == 2
    assert any(f"{good}.zarr: slide store is damaged" in d for d in report["damaged"])
    index = SearchIndex.open(root)
    assert [e.slide_id for e in index.slides] == [good] and index.n_vectors == before
    assert np.array_equal(index.coords[: len(coords)], coords)  # the indexed slide as it was


def test_an_ivfpq_build_with_too_few_readable_vectors_says_so(tmp_path: Path) -> None:
    """Sized for every slide, an IVF-PQ index whose slides are mostly damaged cannot train:
    one clear error naming what is readable, not FAISS's own."""
    from wsi_ssl.errors import ConfigError
    from wsi_ssl.testing.bags import write_bag_store

    rng = np.random.default_rng(0)
    root = tmp_path / "root"
    for i, n in enumerate((50, 1500, 1500)):
        features = rng.normal(size=(n, 16)).astype(np.float32)
        write_bag_store(root, f"{i:016x}", features, encoder_id="enc", dtype="float32")
    for i in (1, 2):
        _damage_embeddings(root, f"{i:016x}")
    with pytest.raises(ConfigError, match=r"the readable slides hold 50 .*re-embed them"):
        SearchIndex.build(root, "enc", kind="ivfpq")


@pytest.mark.parametrize("n", [1, 2])
def test_a_build_whose_only_slide_stores_are_damaged_sends_to_check_not_embed(
    tmp_path: Path, n: int
) -> None:
    """No store can be opened, so none has embeddings: "run `wsi-ssl embed` first" could not
    help (embed cannot open them either); the message says they are damaged and that check
    prints the tile command redoing them (the root quoted for the shell), as export does."""
    import shlex

    from wsi_ssl.errors import EmbeddingsNotFoundError
    from wsi_ssl.testing.bags import write_bag_store

    root = tmp_path / "my archive"
    stores = [
        write_bag_store(root, f"{i:016x}", np.ones((3, 4)), encoder_id="enc", name=f"s{i}.svs")
        for i in range(n)
    ]
    for store in stores:
        (store / "zarr.json").write_text("{bad")
    some = "its one slide store is" if n == 1 else "its 2 slide stores are"
    check = f"`wsi-ssl check {shlex.quote(str(root))}` prints the tile command that redoes "
    why = f"{some} damaged ({', '.join(map(str, stores))}); {check}" + ("it" if n == 1 else "each")
    code, out, err = run_cli(["index", str(root), "--encoder", "enc", "--quiet"])
    assert code == 2 and not out, err
    none = f"{root}: no complete embeddings 'enc' (available: none)"
    assert err.strip() == f"wsi-ssl: error: {none}; {why}"
    with pytest.raises(EmbeddingsNotFoundError) as caught:  # no encoder named: the same advice
        SearchIndex.build(root)
    assert str(caught.value) == f"{root}: no complete embeddings by any encoder; {why}"
    assert not (root / "index").exists()


def test_a_build_with_a_readable_store_but_no_embeddings_still_sends_to_embed(
    tmp_path: Path,
) -> None:
    """A damaged store beside a complete one without those embeddings: embed is the remedy."""
    from wsi_ssl.errors import EmbeddingsNotFoundError
    from wsi_ssl.testing.bags import write_bag_store

    root = tmp_path / "root"
    write_bag_store(root, f"{0:016x}", np.ones((3, 4)), encoder_id="enc")
    bad = write_bag_store(root, f"{1:016x}", np.ones((3, 4)), encoder_id="enc")
    (bad / "zarr.json").write_text("{bad")
    with pytest.raises(EmbeddingsNotFoundError, match="run `wsi-ssl embed` with that encoder"):
        SearchIndex.build(root, "other")
