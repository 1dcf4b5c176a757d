"""The storage layer: tile codecs, direct shard writes, catalog and fingerprints."""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import zarr

from wsi_ssl.errors import StoreLockedError
from wsi_ssl.storage import Catalog, fingerprint_file, open_store, slide_id_from_fingerprint
from wsi_ssl.storage.atomic import (
    FAULT_ENV,
    atomic_write_json,
    atomic_write_text,
    atomic_write_with,
    host_name,
    parse_temp_name,
    sweep_temp_files,
    temp_name,
)
from wsi_ssl.storage.codecs import tile_codecs
from wsi_ssl.storage.locks import (
    LOCKS_DIR,
    embeddings_lock,
    embeddings_lock_path,
    is_locked,
    read_holder,
    remove_stale_lock,
    slide_lock,
    slide_lock_path,
    stale_lock_files,
)
from wsi_ssl.storage.shards import shard_checksum, write_shard


@pytest.mark.parametrize("codec", ["jpeg", "zstd"])
def test_direct_shard_files_equal_zarrs_own(tmp_path: Path, codec: str) -> None:
    """write_shard lays out byte-identical shard files to Zarr's, and Zarr reads them back;
    it returns each file's CRC32C (also where it falls back to Zarr's own write)."""
    rng = np.random.default_rng(0)
    tiles = rng.integers(90, 200, size=(150, 64, 64, 3), dtype=np.uint8)
    arrays = [
        zarr.create_array(
            tmp_path / f"{name}.zarr",
            shape=tiles.shape,
            dtype="uint8",
            chunks=(1, 64, 64, 3),
            shards=(64, 64, 64, 3),
            **tile_codecs(codec, 90),
        )
        for name in ("zarr", "direct")
    ]
    fallback = zarr.create_array(  # two tiles an inner chunk: not the layout written here
        tmp_path / "fallback.zarr",
        shape=tiles.shape,
        dtype="uint8",
        chunks=(2, 64, 64, 3),
        shards=(64, 64, 64, 3),
        **tile_codecs("zstd", 90),
    )
    checksums = {}
    for shard in range(3):
        part = tiles[shard * 64 : (shard + 1) * 64]
        arrays[0][shard * 64 : shard * 64 + len(part)] = part
        checksums["direct", shard] = write_shard(arrays[1], shard, part)
        checksums["fallback", shard] = write_shard(fallback, shard, part)
    for shard in range(3):
        key = f"c/{shard}/0/0/0"
        assert filecmp.cmp(
            tmp_path / "zarr.zarr" / key, tmp_path / "direct.zarr" / key, shallow=False
        )
        for name in ("direct", "fallback"):
            data = (tmp_path / f"{name}.zarr" / key).read_bytes()
            assert checksums[name, shard] == google_crc32c.value(data)
            assert shard_checksum(tmp_path / f"{name}.zarr" / key) == checksums[name, shard]
    back = zarr.open_array(tmp_path / "direct.zarr")[:]
    if codec == "zstd":
        np.testing.assert_array_equal(back, tiles)
    else:
        assert (
            np.abs(back.astype(int) - tiles).mean() < 30
        )  # lossy; uniform noise is its worst case


def test_jpeg_codec_keeps_smooth_tiles_close(tmp_path: Path) -> None:
    y, x = np.mgrid[0:256, 0:256]
    tile = np.stack([128 + 60 * np.sin(x / 20), 100 + 50 * np.cos(y / 15), 180 + 0 * x], -1)
    tile = tile.astype(np.uint8)[None]
    arr = zarr.create_array(
        tmp_path / "t.zarr",
        shape=tile.shape,
        dtype="uint8",
        chunks=(1, 256, 256, 3),
        shards=(1, 256, 256, 3),
        **tile_codecs("jpeg", 90),
    )
    arr[:] = tile
    again = zarr.open_array(tmp_path / "t.zarr")[:]
    assert np.abs(again.astype(int) - tile).max() <= 8
    meta = (tmp_path / "t.zarr" / "zarr.json").read_text()
    assert '"wsi_ssl.jpeg"' in meta and '"quality": 90' in meta


def test_fingerprint_is_content_based(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.svs", tmp_path / "renamed.svs", tmp_path / "c.svs"
    data = np.random.default_rng(1).bytes(3 << 20)
    a.write_bytes(data)
    b.write_bytes(data)
    c.write_bytes(data[:-1] + b"x")
    assert fingerprint_file(a) == fingerprint_file(b) != fingerprint_file(c)
    assert len(slide_id_from_fingerprint(fingerprint_file(a))) == 16


def test_fingerprint_samples_large_files(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(64 << 20)
    before = fingerprint_file(big)
    with open(big, "r+b") as f:
        f.seek(0)
        f.write(b"header changed")
    assert fingerprint_file(big) != before


def test_catalog_round_trip(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "catalog.sqlite")
    catalog.upsert(
        slide_id="s1",
        path="/x/a.svs",
        fingerprint="f",
        status="complete",
        n_tiles=5,
        tiling={"mpp": 0.5},
    )
    catalog.upsert(slide_id="s2", path="/x/b.svs", fingerprint="g", status="failed", error="bad")
    again = Catalog(tmp_path / "catalog.sqlite")
    assert [e.slide_id for e in again.entries("complete")] == ["s1"]
    entry = again.get("s2")
    assert entry is not None and entry.error == "bad" and entry.name == "b.svs"
    assert again.get("s1").tiling == {"mpp": 0.5}  # type: ignore[union-attr]


# -- atomic writes and writer locks (issue #10) ------------------------------------------------

_HOLD = """
import sys
from wsi_ssl.storage.locks import slide_lock
with slide_lock(sys.argv[1], "s1"):
    print("held", flush=True)
    sys.stdin.read()
"""


def _holder(root: Path) -> subprocess.Popen[str]:
    """A real second process holding the lock of slide "s1" until its stdin closes."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_atomic_writes_round_trip_and_leave_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    atomic_write_json(target, {"x": [1, 2]})
    assert json.loads(target.read_text()) == {"x": [1, 2]}
    atomic_write_text(tmp_path / "b.txt", "hello")
    atomic_write_with(tmp_path / "c.npy", lambda p: np.save(p, np.arange(3), allow_pickle=False))
    assert np.load(tmp_path / "c.npy", allow_pickle=False).tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.txt", "c.npy"]
    with pytest.raises(ValueError):
        atomic_write_json(target, {"x": float("nan")})
    assert json.loads(target.read_text()) == {"x": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.txt", "c.npy"]
    name = temp_name("a.json")
    assert parse_temp_name(name) == (os.getpid(), host_name())


@pytest.mark.faults  # a kill, or a full disk
@pytest.mark.parametrize("action", ["kill", "enospc"])
def test_a_write_cut_at_the_rename_keeps_the_old_file(tmp_path: Path, action: str) -> None:
    target = tmp_path / "m.json"
    atomic_write_json(target, {"v": "old"})
    code = "import sys; from wsi_ssl.storage.atomic import atomic_write_json as w; w(sys.argv[1], {'v': 'new'})"
    env = {**os.environ, FAULT_ENV: f"{action}_before_rename:m.json"}
    done = subprocess.run([sys.executable, "-c", code, str(target)], env=env, capture_output=True)
    assert json.loads(target.read_text()) == {"v": "old"}
    leftovers = [p for p in tmp_path.iterdir() if p.name != "m.json"]
    if action == "kill":
        assert done.returncode == -signal.SIGKILL
        assert len(leftovers) == 1 and parse_temp_name(leftovers[0].name) is not None
        live = tmp_path / temp_name("m.json")  # this (live) process's temp file stays
        live.write_text("mine")
        assert sweep_temp_files(tmp_path) == leftovers
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.json", live.name])
    else:
        assert done.returncode == 1 and b"No space left on device" in done.stderr
        assert leftovers == []  # the temp file was removed on the error


def test_a_second_process_is_told_who_holds_the_lock(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    try:
        with pytest.raises(StoreLockedError) as info, slide_lock(tmp_path, "s1"):
            pass
        assert f"s1.zarr is being written by pid {proc.pid} on {host_name()}" in str(info.value)
        assert is_locked(slide_lock_path(tmp_path, "s1"))
        assert stale_lock_files(tmp_path) == []
        assert not remove_stale_lock(slide_lock_path(tmp_path, "s1"))  # held: kept
        with slide_lock(tmp_path, "s2"):  # another slide is another lock
            pass
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
    with slide_lock(tmp_path, "s1", wait=60):  # waits until the holder lets go
        assert read_holder(slide_lock_path(tmp_path, "s1")) == read_holder(
            slide_lock_path(tmp_path, "s1")
        )
        holder = read_holder(slide_lock_path(tmp_path, "s1"))
        assert holder is not None and holder.pid == os.getpid()
    assert proc.wait() == 0
    assert read_holder(slide_lock_path(tmp_path, "s1")) is None  # emptied on release


@pytest.mark.faults
def test_a_killed_holder_leaves_a_stale_lock_that_is_taken_over(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    proc.kill()
    proc.wait()
    path = slide_lock_path(tmp_path, "s1")
    holder = read_holder(path)
    assert holder is not None and holder.pid == proc.pid and holder.dead
    assert stale_lock_files(tmp_path) == [path]
    with slide_lock(tmp_path, "s1"):  # no wait needed: the kernel dropped the dead one's lock
        assert read_holder(path) is not None and read_holder(path).pid == os.getpid()  # type: ignore[union-attr]
    assert stale_lock_files(tmp_path) == []
    assert remove_stale_lock(path) and not path.exists()


def test_locks_are_reentrant_per_thread_only(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            with embeddings_lock(tmp_path, "s1", "enc"):
                pass
        except StoreLockedError as err:
            errors.append(err)

    with embeddings_lock(tmp_path, "s1", "enc"), embeddings_lock(tmp_path, "s1", "enc"):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert len(errors) == 1 and "embeddings/enc is being written by pid" in str(errors[0])
    assert embeddings_lock_path(tmp_path, "s1", "enc").is_relative_to(tmp_path / LOCKS_DIR)


_WRITE_INDEX = """
import sys
import faiss, numpy as np
from wsi_ssl.storage.index_files import write_index
index = faiss.IndexFlatL2(4)
index.add(np.full((int(sys.argv[2]), 4), 1.0, dtype=np.float32))
write_index(sys.argv[1], "idx", index, config={}, slides=[], coords=np.zeros((index.ntotal, 2)))
"""


def _write_index(root: Path, n: int, fault: str = "") -> int:
    env = {**os.environ, FAULT_ENV: fault}
    done = subprocess.run([sys.executable, "-c", _WRITE_INDEX, str(root), str(n)], env=env)
    return done.returncode


@pytest.mark.faults
def test_index_generations_are_pruned_relative_to_the_manifest(tmp_path: Path) -> None:
    from wsi_ssl.storage.index_files import read_index

    path = tmp_path / "index" / "idx"
    assert _write_index(tmp_path, 1) == 0 and _write_index(tmp_path, 2) == 0
    assert sorted(p.name for p in path.glob("g-*")) == ["g-000001", "g-000002"]
    # killed after the generation was renamed, before the manifest: an orphan g-000003 and a
    # temp manifest of a dead process
    assert _write_index(tmp_path, 3, "kill_before_rename:MANIFEST.json") == -signal.SIGKILL
    assert read_index(tmp_path, "idx")[0].ntotal == 2  # still the previous complete index
    assert [p.name for p in path.glob(".MANIFEST.json.tmp-*")]
    assert _write_index(tmp_path, 4) == 0
    # the new one and the one the manifest named before it; the orphan and g-000001 are gone
    assert sorted(p.name for p in path.glob("g-*")) == ["g-000002", "g-000004"]
    assert not [p for p in path.iterdir() if ".tmp-" in p.name]
    assert read_index(tmp_path, "idx")[0].ntotal == 4


def _store_to_complete(tmp_path: Path):
    from wsi_ssl.storage import SlideStore
    from wsi_ssl.testing.tile_stores import write_tile_store

    tiles = np.random.default_rng(0).integers(0, 255, (40, 32, 32, 3), dtype=np.uint8)
    path = write_tile_store(tmp_path, "s", tiles, complete=False, tiles_per_shard=16)
    return path, SlideStore.open(path, mode="r+", require_complete=False)


def _status(path: Path) -> str:
    return str(json.loads((path / "zarr.json").read_text())["attributes"].get("status"))


def test_a_store_is_synced_before_it_says_complete(tmp_path: Path, monkeypatch) -> None:
    """On Linux: one syncfs of the store's filesystem, before the status flips."""
    from wsi_ssl.storage import atomic

    real = atomic._syncfs
    if real is None:
        pytest.skip("no syncfs here (the per-file fallback is tested below)")
    calls: list[tuple[str, str]] = []
    path, store = _store_to_complete(tmp_path)

    def recording_syncfs(fd: int) -> int:
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), _status(path)))
        return real(fd)

    monkeypatch.setattr(atomic, "_syncfs", recording_syncfs)
    store.mark_complete()
    assert calls == [(str(path), "writing")]
    assert _status(path) == "complete"


def test_without_syncfs_every_file_is_fsynced_first(tmp_path: Path, monkeypatch) -> None:
    """The fallback fsyncs every file of the store, then the flipped status itself."""
    from wsi_ssl.storage import SlideStore, atomic

    monkeypatch.setattr(atomic, "_syncfs", None)
    path, store = _store_to_complete(tmp_path)
    synced: list[tuple[str, str]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        real_fsync(fd)
        target = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((target, _status(path) if target.endswith("s.zarr/zarr.json") else ""))

    monkeypatch.setattr(os, "fsync", recording_fsync)
    store.mark_complete()
    files = {str(p) for p in path.rglob("*") if p.is_file()}
    assert len(files) > 5 and files <= {target for target, _ in synced}
    assert len([p for p in files if "/tiles/c/" in p]) == 3  # 40 tiles, 16 per shard
    assert synced[-1] == (str(path / "zarr.json"), "complete")
    before_flip = [s for t, s in synced[:-1] if t == str(path / "zarr.json")]
    assert before_flip and all(s != "complete" for s in before_flip)
    assert SlideStore.open(path).status == "complete"


def test_the_archive_api_takes_a_slide_by_id_or_by_name(small_archive: Path) -> None:
    """Python users name slides as the CLI does: id, file name, stem or unique id prefix;
    a name of no slide lists the archive's, a missing id is a missing store, and a slide
    file given where a store is wanted says how to get its store."""
    from wsi_ssl.errors import StoreNotFoundError, UnknownSlideError
    from wsi_ssl.mil.run import MILRun

    archive = open_store(small_archive)
    sid = archive.slide_ids[0]
    path = Path(archive.slide(sid).source["path"])
    for name in (sid, path.name, path.stem, str(path), sid[:6]):
        assert archive.slide(name).slide_id == sid
        assert np.array_equal(archive.coords(name), archive.coords(sid))
        assert archive.embedding_ids(name) == archive.embedding_ids(sid)
    assert np.array_equal(archive.embeddings(path.name).features, archive.embeddings(sid).features)
    with pytest.raises(UnknownSlideError, match=r"the archive's slides: .*s1\.tiff"):
        archive.tiles("nope.svs")
    with pytest.raises(StoreNotFoundError, match="run `wsi-ssl tile` first"):
        archive.slide("0123456789abcdef")
    with pytest.raises(StoreNotFoundError, match=r"open_store\(ARCHIVE\)\.slide\(NAME\)"):
        MILRun.__new__(MILRun).predict_slide(path.name)


_HOLD_AND_FORK = """
import multiprocessing, sys, time
from wsi_ssl.storage.locks import slide_lock
with slide_lock(sys.argv[1], "s1"):
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    child.start()
    print(child.pid, flush=True)
    time.sleep(60)
"""


@pytest.mark.faults
def test_a_killed_holders_forked_children_do_not_keep_its_lock(tmp_path: Path) -> None:
    """A holder that forked (DataLoader workers) and is SIGKILLed: its lock is free at once,
    though the child lives on (the child shared the lock's open file and kept it)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_AND_FORK, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    try:
        assert is_locked(slide_lock_path(tmp_path, "s1"))
        proc.kill()
        proc.wait()
        assert Path(f"/proc/{child}").exists()  # the child still runs
        assert not is_locked(slide_lock_path(tmp_path, "s1"))
        with slide_lock(tmp_path, "s1"):  # taken over at once, no wait
            holder = read_holder(slide_lock_path(tmp_path, "s1"))
            assert holder is not None and holder.pid == os.getpid()
    finally:
        os.kill(child, signal.SIGKILL)


def _fill(folder: Path) -> None:
    """Write into ``folder`` until its disk is full."""
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


@pytest.mark.faults
def test_a_lock_on_a_full_or_read_only_disk_is_a_typed_error(tiny_disk: Path) -> None:
    """The writer's lock is the first thing a job writes: a full disk or a read-only archive
    is a LockFileError naming the lock file and what to do (it was a bare OSError)."""
    from wsi_ssl.errors import LockFileError

    with slide_lock(tiny_disk, "s0"):  # the lock folder exists before the disk fills
        pass
    _fill(tiny_disk)
    full = r"s1\.lock: cannot take the writer's lock \(No space"
    with pytest.raises(LockFileError, match=full), slide_lock(tiny_disk, "s1"):
        pass
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    read_only = r"s2\.lock: cannot take .*\(Read-only file system\)"
    with pytest.raises(LockFileError, match=read_only), slide_lock(tiny_disk, "s2"):
        pass


@pytest.mark.faults
def test_an_index_written_to_a_full_disk_is_a_typed_error_and_leaves_nothing(
    tiny_disk: Path,
) -> None:
    """FAISS reports a full disk as a RuntimeError: it becomes a DiskFullError naming the
    index, and the half-written generation is removed."""
    import faiss

    from wsi_ssl.errors import DiskFullError
    from wsi_ssl.storage.index_files import index_path, write_index

    index = faiss.IndexFlatIP(64)
    index.add(np.random.default_rng(0).normal(size=(8000, 64)).astype(np.float32))  # 2 MB
    coords = np.zeros((8000, 2), dtype=np.int64)
    with pytest.raises(DiskFullError, match="no space left on device"):
        write_index(tiny_disk, "full", index, config={}, slides=[], coords=coords)
    assert [p.name for p in index_path(tiny_disk, "full").iterdir()] in ([], [".lock"])


def test_a_reader_holding_a_lock_is_not_blamed_on_a_dead_writer(tmp_path: Path) -> None:
    """A lock file still naming a killed writer, held now by a reader (check leaves the name
    for its stale-lock finding): a writer is refused without naming the dead pid."""
    path = slide_lock_path(tmp_path, "s1")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"pid": 999_999_999, "host": host_name(), "since": ""}))
    reader = slide_lock(tmp_path, "s1", shared=True, clear_stale=False)
    with reader, pytest.raises(StoreLockedError) as info, slide_lock(tmp_path, "s1"):
        pass
    assert "999999999" not in str(info.value) and "another process" in str(info.value)
    assert read_holder(path) is not None  # the dead writer's name is left for check


def test_a_slide_whose_stem_looks_like_an_id_is_found_by_it(tmp_path: Path) -> None:
    """A file named like a slide id (16 hex digits, as some exports name slides) is found by
    its stem, not taken for a missing store's id."""
    from wsi_ssl.config import TilingConfig
    from wsi_ssl.synthetic import write_synthetic_slide
    from wsi_ssl.tiling.batch import tile_slide

    slide = write_synthetic_slide(tmp_path / "0123456789abcdef.tiff", (600, 500), seed=1)
    outcome = tile_slide(
        slide, tmp_path / "root", TilingConfig(tile_size=224, tissue_threshold=0.0)
    )
    sid = outcome.details["slide_id"]
    assert sid != "0123456789abcdef"
    assert open_store(tmp_path / "root").slide("0123456789abcdef").slide_id == sid
