"""Re-tiling swaps, never deletes; one writer per slide store (issue 10, cases 2 and 3).

Real `wsi-ssl tile` processes, killed (SIGKILL) or paused (SIGSTOP) at the swap points through
the storage fault hook (``WSI_SSL_FAULT``, storage/atomic.py), on small synthetic slides.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import run_cli

from wsi_ssl.config import TilingConfig
from wsi_ssl.errors import EmbeddingsWouldBeDiscardedError, StoreLockedError
from wsi_ssl.storage import open_store
from wsi_ssl.storage.atomic import host_name
from wsi_ssl.storage.embeddings import EmbeddingWriter, embedding_ids
from wsi_ssl.storage.locks import slide_lock
from wsi_ssl.storage.shards import SHARD_CHECKSUMS
from wsi_ssl.storage.slide_store import aside_path, is_complete_store, staging_path
from wsi_ssl.synthetic import write_synthetic_slide
from wsi_ssl.tiling.batch import tile_slide, tile_slides

CONFIG = TilingConfig(tissue_threshold=0.0, tiles_per_chunk=4)
FLAGS = ["--tissue-threshold", "0", "--tiles-per-chunk", "4", "--quiet"]


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1024 x 768 synthetic slide: 12 tiles of 256 px in 3 shards."""
    return write_synthetic_slide(tmp_path_factory.mktemp("swap") / "s.tiff", (1024, 768), seed=8)


def _embed(root: Path, slide_id: str, encoder_id: str = "enc-a") -> np.ndarray:
    """Complete embeddings written through the storage writer (random vectors, one per tile)."""
    store = open_store(root).slide(slide_id)
    rows = np.random.default_rng(0).normal(size=(store.n_tiles, 8)).astype(np.float32)
    writer = EmbeddingWriter(store.path, encoder_id, n_rows=len(rows), dim=8, dtype="float32")
    writer.write(0, rows)
    writer.commit()
    return rows


@pytest.fixture
def embedded(tmp_path: Path, slide: Path) -> tuple[Path, str, np.ndarray, np.ndarray]:
    """An archive whose one store is complete and has embeddings: (root, id, tiles, vectors)."""
    root = tmp_path / "archive"
    slide_id = tile_slide(slide, root, CONFIG).details["slide_id"]
    assert slide_id is not None
    vectors = _embed(root, slide_id)
    return root, slide_id, open_store(root).slide(slide_id).tiles[:], vectors


def _assert_intact(root: Path, slide_id: str, tiles: np.ndarray, vectors: np.ndarray) -> None:
    """The store is complete, with the same tiles and the same complete embeddings."""
    archive = open_store(root)
    assert archive.slide_ids == [slide_id]
    np.testing.assert_array_equal(archive.slide(slide_id).tiles[:], tiles)
    np.testing.assert_array_equal(archive.embeddings(slide_id, "enc-a").features, vectors)
    entry = archive.catalog.get(slide_id)
    assert entry is not None and entry.status == "complete"


def _tile(root: Path, slide: Path, *extra: str, fault: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "WSI_SSL_FAULT": fault} if fault else None
    argv = [sys.executable, "-m", "wsi_ssl.cli.main", "tile", str(slide), "--out", str(root)]
    return subprocess.Popen(
        [*argv, *FLAGS, *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_retile_with_the_same_tiles_keeps_the_embeddings(
    embedded: tuple[Path, str, np.ndarray, np.ndarray], slide: Path
) -> None:
    root, slide_id, tiles, vectors = embedded
    code, out, _ = run_cli(["tile", str(slide), "--out", str(root), *FLAGS, "--no-resume"])
    assert code == 0 and "embeddings kept (same tiles): enc-a" in out
    _assert_intact(root, slide_id, tiles, vectors)
    # a changed setting that does not change the tiles (thumbnail scale) keeps them too
    config = TilingConfig(tissue_threshold=0.0, tiles_per_chunk=4, thumbnail_mpp=16.0)
    again = tile_slide(slide, root, config)
    assert again.status == "complete" and again.details["kept_embeddings"] == ["enc-a"]
    _assert_intact(root, slide_id, tiles, vectors)
    assert not staging_path(open_store(root).store_path(slide_id)).exists()


def test_a_retile_restores_a_lost_shard_and_keeps_the_embeddings(
    embedded: tuple[Path, str, np.ndarray, np.ndarray], slide: Path
) -> None:
    """A store that lost a shard file: ``check`` asks for a re-tile, which puts the same tiles
    back and keeps the embeddings (computed before the loss)."""
    root, slide_id, tiles, vectors = embedded
    shard = open_store(root).store_path(slide_id) / "tiles" / "c" / "1" / "0" / "0" / "0"
    shard.unlink()
    code, report, _ = run_cli(["check", str(root), "--quick"])
    assert code == 1 and "--no-resume" in report, report
    code, out, err = run_cli(["tile", str(slide), "--out", str(root), *FLAGS, "--no-resume"])
    assert code == 0 and "embeddings kept (same tiles): enc-a" in out, err
    _assert_intact(root, slide_id, tiles, vectors)
    assert run_cli(["check", str(root)])[0] == 0


def test_embedding_a_store_with_a_shard_cut_short_says_so(
    embedded: tuple[Path, str, np.ndarray, np.ndarray],
) -> None:
    """A shard cut in half (a copy interrupted) is named as cut short by ``embed``, as ``check``
    names it; it was called "bytes changed since tiling"."""
    root, slide_id, _, _ = embedded
    shard = open_store(root).store_path(slide_id) / "tiles" / "c" / "1" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    embed = ["embed", str(root), "--encoder", "random-cnn", "--resize", "bilinear", "--quiet"]
    code, _, err = run_cli(embed)
    assert code == 1 and "the shard is cut short (no intact index)" in err, err
    code, report, _ = run_cli(["check", str(root)])
    assert code == 1 and "shard 1: cut short" in report, report


def test_a_retile_repairs_a_damaged_shard_and_keeps_the_embeddings(
    embedded: tuple[Path, str, np.ndarray, np.ndarray], slide: Path
) -> None:
    """A shard whose bytes changed after tiling (bit rot, a bad copy): ``check --verify-tiles``
    finds it by the CRC32C recorded at tiling (a plain check reads no shard), and the re-tile
    it asks for
    writes the recorded bytes again and keeps the embeddings. A store tiled before checksums
    were recorded re-tiles as before: identical tiles keep the embeddings (and get checksums),
    and as damage cannot be told from changed tiles, that re-tile needs
    ``--discard-embeddings``."""
    root, slide_id, tiles, vectors = embedded
    store_path = open_store(root).store_path(slide_id)
    shard = store_path / "tiles" / "c" / "1" / "0" / "0" / "0"
    original = shard.read_bytes()
    shard.write_bytes(original[:100] + bytes([original[100] ^ 0xFF]) + original[101:])
    code, report, _ = run_cli(["check", str(root), "--verify-tiles"])
    assert code == 1 and "tile shard files damaged (shard 1: bytes changed" in report, report
    assert "--no-resume" in report
    assert run_cli(["check", str(root)])[0] == 0  # without --verify-tiles: no shard is read
    # the damaged tiles still decode (to wrong pixels): embedding refuses them
    embed = ["embed", str(root), "--encoder", "random-cnn", "--resize", "bilinear", "--quiet"]
    code, out, err = run_cli(embed)
    assert code == 1 and "the shard's bytes changed since tiling" in err, err
    assert f"`wsi-ssl check {root} --verify-tiles` prints that command" in err  # as above
    assert open_store(root).embedding_ids(slide_id) == ["enc-a"]
    code, out, err = run_cli(["tile", str(slide), "--out", str(root), *FLAGS, "--no-resume"])
    assert code == 0 and "embeddings kept (same tiles): enc-a" in out, err
    assert shard.read_bytes() == original
    _assert_intact(root, slide_id, tiles, vectors)
    assert run_cli(["check", str(root), "--verify-tiles"])[0] == 0
    del zarr.open_array(store_path / "tiles", mode="r+").attrs[SHARD_CHECKSUMS]
    assert open_store(root).slide(slide_id).shard_checksums is None  # as tiled before them
    code, out, err = run_cli(["tile", str(slide), "--out", str(root), *FLAGS, "--no-resume"])
    assert code == 0 and "embeddings kept (same tiles): enc-a" in out, err
    assert open_store(root).slide(slide_id).shard_checksums is not None  # recorded again
    del zarr.open_array(store_path / "tiles", mode="r+").attrs[SHARD_CHECKSUMS]
    shard.write_bytes(b"\0" * len(original))
    code, _, err = run_cli(["tile", str(slide), "--out", str(root), *FLAGS, "--no-resume"])
    assert code == 1 and "the new tiles differ from the stored ones" in err


def test_retile_that_changes_tiles_needs_discard_embeddings(
    embedded: tuple[Path, str, np.ndarray, np.ndarray], slide: Path
) -> None:
    root, slide_id, tiles, vectors = embedded
    argv = ["tile", str(slide), "--out", str(root), *FLAGS, "--tissue-threshold", "0.2"]
    code, out, err = run_cli(argv)
    assert code == 1 and err.count("\n") == 1
    assert "would discard the embeddings enc-a" in err and "--discard-embeddings" in err
    assert "other tile coordinates: 12 -> " in err
    _assert_intact(root, slide_id, tiles, vectors)  # nothing changed, catalog included
    # the summary counts the kept store's tiles (it said "these slides hold 0 tiles")
    assert f"a complete store of it is in place ({len(tiles)} tiles)" in out, out
    assert f"these slides hold {len(tiles)} tiles in {root}" in out, out
    with pytest.raises(EmbeddingsWouldBeDiscardedError, match="codec 'jpeg' -> 'zstd'"):
        tile_slide(slide, root, TilingConfig(tissue_threshold=0.0, tiles_per_chunk=4, codec="zstd"))
    _assert_intact(root, slide_id, tiles, vectors)
    code, out, _ = run_cli([*argv, "--discard-embeddings"])
    assert code == 0 and "embeddings discarded: enc-a" in out
    archive = open_store(root)
    assert archive.slide_ids == [slide_id] and archive.embedding_ids(slide_id) == []
    assert archive.slide(slide_id).n_tiles < len(tiles)
    assert archive.catalog.get(slide_id).tiling["tissue_threshold"] == 0.2  # type: ignore[union-attr]


@pytest.mark.faults
@pytest.mark.parametrize("point", ["#aside", "#swap-in", "#remove-old"])
def test_sigkill_at_each_swap_point_keeps_a_complete_store(
    embedded: tuple[Path, str, np.ndarray, np.ndarray], slide: Path, point: str
) -> None:
    """Killed before each step of the swap: the old complete store (or, past the first
    rename, the new complete one) is on disk with its embeddings; a plain re-run finishes."""
    root, slide_id, tiles, vectors = embedded
    store_path = open_store(root).store_path(slide_id)
    proc = _tile(root, slide, "--no-resume", fault=f"kill_before_rename:{point}")
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    new, old = staging_path(store_path), aside_path(store_path)
    assert is_complete_store(new) or is_complete_store(store_path)
    complete = [p for p in (store_path, old, new) if is_complete_store(p)]
    assert complete and all(embedding_ids(p) == ["enc-a"] for p in complete)
    if point == "#aside":  # nothing renamed yet: readers see the old store as it was
        _assert_intact(root, slide_id, tiles, vectors)
    code, out, _ = run_cli(["tile", str(slide), "--out", str(root), *FLAGS])
    assert code == 0 and ("already complete" in out or "embeddings kept" in out)
    _assert_intact(root, slide_id, tiles, vectors)
    assert not new.exists() and not old.exists()


@pytest.mark.faults
def test_an_index_update_keeps_a_slide_caught_between_the_renames_of_a_swap(
    embedded: tuple[Path, str, np.ndarray, np.ndarray], slide: Path
) -> None:
    """A re-tile killed between its renames (the old store aside, the new one not yet in
    place), and a re-embed's vectors set aside: ``index --add`` took the slide as gone and
    dropped its vectors for good. Now it keeps them and says why; once the swap is finished
    the slide is indexed as before."""
    from wsi_ssl.search import SearchIndex

    root, slide_id, _, _ = embedded
    before = SearchIndex.build(root, "enc-a", kind="flat").n_vectors
    proc = _tile(root, slide, "--no-resume", fault="kill_before_rename:#swap-in")
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert not open_store(root).store_path(slide_id).exists()  # between the renames
    code, report, _ = run_cli(["check", str(root), "--quick"])  # finish the swap, not --add
    assert code == 1 and "--repair" in report and "--add" not in report, report
    assert "--no-resume" not in report  # not a re-tile: the swap only lacks its last rename
    code, out, _ = run_cli(["embed", str(root), "--encoder", "random-cnn", "--resize", "bilinear"])
    assert code == 0 and f"left out 1 store(s) that are not complete ({slide_id}:" in out
    summary = SearchIndex.open(root).add()
    assert summary.removed == [] and any(
        "being re-tiled or re-embedded" in n for n in summary.notes
    )
    assert SearchIndex.open(root).n_vectors == before
    code, out, _ = run_cli(["tile", str(slide), "--out", str(root), *FLAGS])  # finishes the swap
    assert code == 0, out
    vectors = open_store(root).store_path(slide_id) / "embeddings"
    (vectors / "enc-a").rename(vectors / ".replaced-enc-a")  # a re-embed killed mid-swap
    assert SearchIndex.open(root).add().removed == []
    assert SearchIndex.open(root).n_vectors == before
    (vectors / ".replaced-enc-a").rename(vectors / "enc-a")
    assert SearchIndex.open(root).add().removed == []
    assert [e.slide_id for e in SearchIndex.open(root).slides] == [slide_id]
    # a re-embed still writing with no vectors set aside (they were discarded): nothing to keep
    (vectors / "enc-a").rename(vectors / ".writing-enc-a")
    zarr.open_array(vectors / ".writing-enc-a", mode="r+").attrs["status"] = "writing"
    assert SearchIndex.open(root).add().removed == [slide_id]


@pytest.mark.faults
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_while_writing_beside_leaves_nothing_but_the_old_store(
    embedded: tuple[Path, str, np.ndarray, np.ndarray], slide: Path, sig: signal.Signals
) -> None:
    """Ctrl-C (or a scheduler's SIGTERM) as the new store's second shard lands: the half-written
    store beside the old one is removed and the lock released, so check finds nothing to
    repair; SIGTERM stops as cleanly, with its report, and exits 143."""
    root, slide_id, tiles, vectors = embedded
    proc = _tile(
        root, slide, "--no-resume", "--json", fault="pause_before_rename:.zarr.new/tiles/c/1/"
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with open(f"/proc/{proc.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                break
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, err
    assert json.loads(out)["interrupted"] is True
    last = err.strip().splitlines()[-1]  # a --no-resume run: its re-run must say so again
    assert last.startswith("wsi-ssl: interrupted") and "re-run it with --no-resume" in last
    store_path = open_store(root).store_path(slide_id)
    assert not staging_path(store_path).exists()
    _assert_intact(root, slide_id, tiles, vectors)
    code, out, _ = run_cli(["check", str(root)])
    assert code == 0 and " 0 problem(s)" in out, out


@pytest.mark.faults
def test_sigkill_while_writing_beside_leaves_the_old_store(
    embedded: tuple[Path, str, np.ndarray, np.ndarray], slide: Path
) -> None:
    """Killed as the new store's second shard lands: the old store is untouched and readable
    at once (no recovery needed); a plain re-run finds it current and removes the debris."""
    root, slide_id, tiles, vectors = embedded
    proc = _tile(root, slide, "--no-resume", fault="kill_before_rename:.zarr.new/tiles/c/1/")
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    store_path = open_store(root).store_path(slide_id)
    assert staging_path(store_path).is_dir() and not is_complete_store(staging_path(store_path))
    _assert_intact(root, slide_id, tiles, vectors)
    code, out, _ = run_cli(["tile", str(slide), "--out", str(root), *FLAGS])
    assert code == 0 and "0 tiled, 1 already complete" in out
    assert not staging_path(store_path).exists()
    _assert_intact(root, slide_id, tiles, vectors)


@pytest.mark.faults
def test_full_disk_at_the_swap_leaves_the_old_store(
    embedded: tuple[Path, str, np.ndarray, np.ndarray], slide: Path
) -> None:
    root, slide_id, tiles, vectors = embedded
    proc = _tile(root, slide, "--no-resume", fault="enospc_before_rename:#swap-in")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "no space left on device" in err and err.count("\n") == 1
    _assert_intact(root, slide_id, tiles, vectors)
    store_path = open_store(root).store_path(slide_id)
    assert not staging_path(store_path).exists() and not aside_path(store_path).exists()


@pytest.mark.faults
def test_full_disk_while_writing_beside_keeps_the_old_store(
    tiny_disk: Path, tmp_path: Path
) -> None:
    """A real 1 MiB tmpfs: the first store fits, a second one beside it does not."""
    slide = write_synthetic_slide(tmp_path / "s.tiff", (2560, 1920), seed=9)
    config = TilingConfig(tissue_threshold=0.0)
    first = tile_slide(slide, tiny_disk, config)
    assert first.details["slide_id"] is not None
    vectors = _embed(tiny_disk, first.details["slide_id"])
    tiles = open_store(tiny_disk).slide(first.details["slide_id"]).tiles[:]
    summary = tile_slides([slide], tiny_disk, config, resume=False, progress=False)
    assert summary.outcomes[0].error_type == "DiskFullError"
    _assert_intact(tiny_disk, first.details["slide_id"], tiles, vectors)


@pytest.mark.faults
def test_two_tile_jobs_on_one_slide_never_write_together(tmp_path: Path, slide: Path) -> None:
    """Job A pauses (SIGSTOP) holding the slide lock; job B skips the slide as busy, naming A's
    pid and host, and exits 1 (the slide is not done) without touching the store or blaming
    the slide; A, continued, completes it."""
    root = tmp_path / "archive"
    a = _tile(root, slide, fault="pause_before_rename:#aside")
    slide_id = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # A stops itself once its new store is complete
        with open(f"/proc/{a.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                break
        time.sleep(0.05)
    try:
        code, out, err = run_cli(["tile", str(slide), "--out", str(root), *FLAGS])
        assert code == 1
        [line] = err.splitlines()
        assert line.startswith("wsi-ssl: error: ") and f"pid {a.pid} on {host_name()}" in line
        assert line.endswith("and re-run (command line: --lock-wait)"), line  # tile's flag
        assert f"being written by pid {a.pid} on {host_name()}" in out
        assert (
            "0 tiled, 0 already complete, 1 busy (another job is writing or re-tiled them; run again), 0 failed"
            in out
        )
        assert "QuPath" not in out and "malformed" not in out
        slide_id = (
            tile_slides([slide], root, CONFIG, progress=False).outcomes[0].details["slide_id"]
        )
        assert slide_id is not None and open_store(root).slide_ids == []
    finally:
        a.send_signal(signal.SIGCONT)
    a.communicate(timeout=120)
    assert a.returncode == 0
    archive = open_store(root)
    assert archive.slide_ids == [slide_id] and archive.catalog.get(slide_id).status == "complete"  # type: ignore[union-attr]


def test_second_writer_waits_for_the_lock_or_gets_a_typed_error(
    tmp_path: Path, slide: Path
) -> None:
    root = tmp_path / "archive"
    first = tile_slide(slide, root, CONFIG)
    assert first.details["slide_id"] is not None
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from wsi_ssl.storage.locks import slide_lock\n"
            "with slide_lock(sys.argv[1], sys.argv[2]):\n"
            "    print('held', flush=True); time.sleep(float(sys.argv[3]))",
            str(root),
            first.details["slide_id"],
            "3",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with pytest.raises(StoreLockedError, match=f"pid {holder.pid} on {host_name()}"):
        tile_slide(slide, root, CONFIG, resume=False)
    waited = tile_slide(slide, root, CONFIG, lock_wait=60)  # waits, then finds it complete
    assert waited.status == "skipped"
    holder.wait()
    with slide_lock(root, first.details["slide_id"]):  # released by both
        pass
    assert (
        json.loads(json.dumps(tile_slides([slide], root, CONFIG, progress=False).to_dict()))[
            "skipped"
        ]
        == 1
    )


@pytest.mark.faults
@pytest.mark.parametrize("point", ["#aside", "#swap-in"])
def test_check_leaves_a_store_being_retiled_alone(
    embedded: tuple[Path, str, np.ndarray, np.ndarray], slide: Path, point: str
) -> None:
    """``check --repair`` while the advised re-tile of a damaged store runs (its new store
    complete, or between its two renames, when no store is in place): the store is the
    tiler's (it holds the slide lock), so check neither reports it nor marks it for
    re-tiling, and says it was not checked; once the re-tile ends, check is clean."""
    root, slide_id, tiles, vectors = embedded
    store = open_store(root).store_path(slide_id)
    (store / "tiles" / "c" / "1" / "0" / "0" / "0").unlink()  # what the re-tile will fix
    tiler = _tile(root, slide, "--no-resume", fault=f"pause_before_rename:{point}")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # paused with its new store complete, lock held
        with open(f"/proc/{tiler.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                break
        time.sleep(0.05)
    try:
        code, out, _ = run_cli(["check", str(root), "--repair", "--json"])
        report = json.loads(out)
        assert code == 0 and report["busy"] == [str(store)], out
        assert not [f for f in report["findings"] if slide_id in f["path"]], out
        assert open_store(root).catalog.get(slide_id).status == "complete"  # type: ignore[union-attr]
        code, out, _ = run_cli(["check", str(root)])
        assert "1 store(s) being written by a tiling job now were not checked" in out
    finally:
        tiler.send_signal(signal.SIGCONT)
    tiler.communicate(timeout=120)
    assert tiler.returncode == 0
    _assert_intact(root, slide_id, tiles, vectors)
    assert run_cli(["check", str(root)])[0] == 0


def test_a_read_only_archive_skips_its_current_slides_and_refuses_the_rest(
    tiny_disk: Path, tmp_path: Path
) -> None:
    """An archive on a read-only mount (a published copy): a re-run skips the slides it holds
    (nothing to write, so no lock to take), a new slide fails with one line naming the lock
    file it cannot create (every slide failed with a bare OSError), and check still checks."""
    slide = write_synthetic_slide(tmp_path / "s.tiff", (1200, 900), seed=9)
    other = write_synthetic_slide(tmp_path / "t.tiff", (1200, 900), seed=10)
    argv = ["tile", str(slide), "--out", str(tiny_disk), *FLAGS]
    assert run_cli(argv)[0] == 0
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    code, out, err = run_cli([*argv, "--json"])
    assert code == 0 and json.loads(out)["skipped"] == 1, (out, err)
    code, out, err = run_cli(["tile", str(other), *argv[2:], "--json"])
    [failed] = json.loads(out)["slides"]
    assert code == 1 and failed["error_type"] == "LockFileError", out
    assert "cannot take the writer's lock (Read-only file system)" in failed["error"]
    # check reads it as it is (no writer can be at work there), without a lock
    code, out, err = run_cli(["check", str(tiny_disk)])
    assert code == 0 and "checked 1 store(s)" in out and " 0 problem(s)" in out, (out, err)
