"""``wsi-ssl check``: a clean archive passes; each kind of damage or debris is named with its
fix; ``--repair`` removes the debris and a plain re-run redoes the rest."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli
from wsi_ssl.search import SearchIndex
from wsi_ssl.storage import open_store
from wsi_ssl.storage.atomic import host_name
from wsi_ssl.storage.locks import slide_lock, slide_lock_path

_HOLD_AND_DIE = """
import os, signal, sys
from wsi_ssl.storage.locks import slide_lock
with slide_lock(sys.argv[1], sys.argv[2]):
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def test_a_clean_archive_passes(small_archive: Path, tmp_path: Path) -> None:
    root = shutil.copytree(small_archive, tmp_path / "root")
    code, out, _ = run_cli(["check", str(root)])
    assert code == 0, out
    assert out.strip().splitlines()[-1] == (
        "checked 2 store(s), 2 embeddings array(s), 1 index(es): 0 problem(s)"
    )


@pytest.mark.faults
def test_damage_and_debris_are_named_and_repaired(small_archive: Path, tmp_path: Path) -> None:
    root = shutil.copytree(small_archive, tmp_path / "root")
    a, b = open_store(root).slide_ids
    eid = open_store(root).embedding_ids(a)[0]
    # damage: a truncated store, an embeddings array that lost a chunk
    meta = root / "slides" / f"{b}.zarr" / "zarr.json"
    meta.write_text(meta.read_text()[:40])
    (root / "slides" / f"{a}.zarr" / "embeddings" / eid / "c" / "1" / "0").unlink()
    # debris: a dead writer's temp file, a killed job's lock, an orphan index generation
    temp = root / f".catalog.tmp-{_dead_pid()}-{host_name()}-0123abcd"
    temp.write_text("{}")
    subprocess.run([sys.executable, "-c", _HOLD_AND_DIE, str(root), a])
    [index] = (root / "index").iterdir()
    [gen] = index.glob("g-*")
    orphan = index / "g-000099"
    shutil.copytree(gen, orphan)

    code, out, _ = run_cli(["check", str(root)])
    assert code == 1
    assert f"problem: {meta.parent}: slide store is damaged" in out
    assert f"fix: wsi-ssl tile {small_archive.parent}/s" in out  # names the source slide
    settings = "--tile-size 224 --tissue-threshold 0.0 --codec zstd --tiles-per-chunk 4"
    assert f".tiff --out {root} {settings} --no-resume" in out  # as it was tiled
    assert (
        "embeddings 1 of " in out
        and f"wsi-ssl embed {root} --encoder random-cnn --slides {a}" in out
    )
    assert f"problem: {temp}: temp file of a killed writer" in out
    assert f"problem: {slide_lock_path(root, a)}" not in out  # harmless: a note
    assert (
        f"note: 1 stale lock file(s) of killed jobs, harmless ({slide_lock_path(root, a)})" in out
    )
    assert f"problem: {orphan}: orphan generation of a killed writer" in out
    assert out.strip().splitlines()[-1].endswith(": 4 problem(s)")

    code, out, _ = run_cli(["check", str(root), "--repair"])
    assert code == 1  # the damaged store needs a re-tile, the embeddings a re-run
    assert "fix: marked for re-tiling (a re-run of its tiling job redoes it): wsi-ssl tile" in out
    assert "fix: removed (a re-run of its embedding job redoes it): wsi-ssl embed" in out
    [tile_fix] = [x.split(": ", 2)[2] for x in out.splitlines() if "wsi-ssl tile" in x]
    assert not temp.exists() and not orphan.exists() and gen.exists()
    assert not slide_lock_path(root, a).exists()
    assert f"repaired: {slide_lock_path(root, a)}: stale lock of a killed job" in out
    assert not (root / "slides" / f"{a}.zarr" / "embeddings" / eid).exists()
    assert open_store(root).catalog.get(b).status == "failed"  # type: ignore[union-attr]

    code, out, err = run_cli(
        ["embed", str(root), "--encoder", "random-cnn", "--device", "cpu", "--quiet"]
    )
    assert code == 1 and "1 embedded" in out and f"{b}.zarr: slide store is damaged" in err
    code, out, _ = run_cli(["check", str(root), "--quick"])
    assert code == 1 and out.count("problem: ") == 2 and f"{b}.zarr" in out
    assert "1 indexed slide(s) changed since indexing" in out  # a, re-embedded
    # the fix redoes the store as it was: the same settings, the same tiles as before
    code, _, err = run_cli([*tile_fix.removeprefix("wsi-ssl ").split(), "--quiet"])
    assert code == 0, err
    redone = open_store(root).slide(b)
    assert redone.tiling["tile_size"] == 224 and redone.tiling["codec"] == "zstd"
    original = open_store(small_archive).slide(b)
    assert np.array_equal(redone.coords, original.coords)
    assert np.array_equal(redone.tiles[:4], original.tiles[:4])


@pytest.mark.faults
def test_a_stale_lock_alone_is_a_note_and_the_next_writer_clears_it(
    small_archive: Path, tmp_path: Path
) -> None:
    """A killed job's lock file is harmless: ``check`` notes it and exits 0 (it exited 1 until
    ``--repair``); the next job that takes the same lock empties it."""
    root = shutil.copytree(small_archive, tmp_path / "root")
    a = open_store(root).slide_ids[0]
    subprocess.run([sys.executable, "-c", _HOLD_AND_DIE, str(root), a])
    code, out, _ = run_cli(["check", str(root), "--quick"])
    assert code == 0, out
    assert "note: 1 stale lock file(s) of killed jobs" in out and "0 problem(s)" in out
    code, out, _ = run_cli(["check", str(root), "--quick", "--json"])
    assert json.loads(out)["stale_locks"] == [str(slide_lock_path(root, a))]
    with slide_lock(root, a):
        pass
    assert slide_lock_path(root, a).read_bytes() == b""
    code, out, _ = run_cli(["check", str(root), "--quick", "--json"])
    assert json.loads(out)["stale_locks"] == []


@pytest.mark.faults
def test_a_store_marked_for_re_tiling_is_redone_by_a_plain_re_run(
    small_archive: Path, tmp_path: Path
) -> None:
    """A shard whose bytes rotted (its CRC no longer matches): ``check --repair`` marks the
    slide for re-tiling and the next plain ``tile`` run redoes it (it skipped it, as complete,
    and took the mark away)."""
    root = shutil.copytree(small_archive, tmp_path / "root")
    slide_id = open_store(root).slide_ids[0]
    source = open_store(root).catalog.get(slide_id).path  # type: ignore[union-attr]
    shard = open_store(root).slide(slide_id).shard_file(0)
    rotten = bytearray(shard.read_bytes())
    rotten[len(rotten) // 2] ^= 0xFF
    shard.write_bytes(bytes(rotten))
    code, out, _ = run_cli(["check", str(root), "--verify-tiles", "--repair"])
    assert code == 1 and "fix: marked for re-tiling" in out
    settings = ["--tile-size", "224", "--tissue-threshold", "0", "--codec", "zstd"]
    argv = ["tile", source, "--out", str(root), *settings, "--tiles-per-chunk", "4", "--json"]
    code, out, err = run_cli(argv)
    [outcome] = json.loads(out)["slides"]
    assert code == 0 and outcome["status"] == "complete", err
    assert outcome["retiled_because"].startswith("marked for re-tiling: ")
    assert open_store(root).catalog.get(slide_id).status == "complete"  # type: ignore[union-attr]
    code, out, _ = run_cli(["check", str(root), "--verify-tiles"])
    assert code == 0, out  # the same tiles again: embeddings and index kept
    original = open_store(small_archive).slide(slide_id)
    assert np.array_equal(open_store(root).slide(slide_id).tiles[:], original.tiles[:])


def test_an_index_older_than_its_slides_is_named_and_index_add_brings_it_up_to_date(
    small_archive: Path, tmp_path: Path
) -> None:
    """Embeddings removed (as a re-tile with --discard-embeddings leaves a slide) or redone
    after indexing: ``check`` says the index answers with old tiles; ``index --add`` drops
    the slide whose embeddings are gone and re-adds the re-embedded one."""
    root = shutil.copytree(small_archive, tmp_path / "root")
    a, b = open_store(root).slide_ids
    eid = open_store(root).embedding_ids(a)[0]
    shutil.rmtree(root / "slides" / f"{a}.zarr" / "embeddings" / eid)
    code, _, err = run_cli(
        ["embed", str(root), "--encoder", "random-cnn", "--slides", b, "--no-resume", "--quiet"]
    )
    assert code == 0, err
    code, out, _ = run_cli(["check", str(root)])
    assert code == 1 and "2 indexed slide(s) changed since indexing (re-tiled" in out, out
    assert f"fix: wsi-ssl index {root} --name {eid} --add" in out
    code, out, err = run_cli(["index", str(root), "--name", eid, "--add", "--json"])
    assert code == 0, err
    done = json.loads(out)
    assert done["removed"] == [a] and done["updated"] == [b] and done["added"] == []
    assert run_cli(["check", str(root)])[0] == 0
    index = SearchIndex.open(root, eid)
    assert [e.slide_id for e in index.slides] == [b]
    x, y = (int(v) for v in open_store(root).slide(b).coords[0])
    assert {h.slide_id for h in index.search_tile(b, (x, y), k=5).hits} == {b}


def test_a_damaged_index_gets_the_build_command_it_was_built_with(
    small_archive: Path, tmp_path: Path
) -> None:
    """A truncated index.faiss: the fix names the index's own encoder id and kind (it said
    ``--encoder ENCODER_ID``), and running it gives a searchable index that check passes."""
    root = shutil.copytree(small_archive, tmp_path / "root")
    code, _, err = run_cli(["index", str(root), "--name", "exact", "--kind", "flat", "--quiet"])
    assert code == 0, err
    index = SearchIndex.open(root, "exact")
    eid = index.encoder_id
    faiss_file = index.files.path / "index.faiss"
    faiss_file.write_bytes(faiss_file.read_bytes()[:100])
    code, out, _ = run_cli(["check", str(root)])
    assert code == 1
    fix = f"wsi-ssl index {root} --encoder {eid} --name exact --kind flat"
    assert f"fix: {fix}\n" in out, out
    code, _, err = run_cli([*fix.split()[1:], "--quiet"])
    assert code == 0, err
    assert run_cli(["check", str(root)])[0] == 0
    rebuilt = SearchIndex.open(root, "exact")
    assert rebuilt.kind == "flat" and rebuilt.n_vectors == index.n_vectors
    # a damaged manifest hides the current generation: its config.json still says how
    (rebuilt.files.path.parent / "MANIFEST.json").write_text("{not json")
    code, out, _ = run_cli(["check", str(root)])
    assert code == 1 and f"fix: {fix}\n" in out, out
    # its config lost too: the archive's one encoder (it said --encoder exact, which failed)
    for config in rebuilt.files.path.parent.glob("*/config.json"):
        config.unlink()
    code, out, _ = run_cli(["check", str(root)])
    assert code == 1 and f"fix: wsi-ssl index {root} --encoder {eid} --name exact\n" in out, out


@pytest.mark.faults
def test_a_first_index_build_killed_before_its_manifest_is_repaired(
    small_archive: Path, tmp_path: Path
) -> None:
    """A first build killed before its manifest leaves an index folder nothing complete is in:
    ``check`` names it with a rebuild that runs (it said ``--encoder ENCODER_ID``) and
    ``--repair`` removes it (it stayed, so the archive never checked clean)."""
    from wsi_ssl.storage.atomic import FAULT_ENV

    root = shutil.copytree(small_archive, tmp_path / "root")
    eid = SearchIndex.open(root).encoder_id
    shutil.rmtree(root / "index")
    code = "import sys; from wsi_ssl.cli.main import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, FAULT_ENV: "kill_before_rename:MANIFEST.json"}
    argv = [sys.executable, "-c", code, "index", str(root), "--quiet"]
    assert subprocess.run(argv, env=env).returncode == -signal.SIGKILL
    assert (root / "index" / eid).is_dir() and not (root / "index" / eid / "MANIFEST.json").exists()
    code_, out, _ = run_cli(["check", str(root)])
    assert code_ == 1 and f"problem: {root / 'index' / eid}: unfinished first build" in out
    fix = f"wsi-ssl index {root} --encoder {eid} --name {eid}"
    assert f"fix: {fix}\n" in out, out
    assert run_cli(["check", str(root), "--repair"])[0] == 0
    assert not (root / "index" / eid).exists()
    assert run_cli(["check", str(root)])[0] == 0
    assert run_cli([*fix.split()[1:], "--quiet"])[0] == 0
    assert SearchIndex.open(root).n_vectors == SearchIndex.open(small_archive).n_vectors


def test_a_slide_re_embedded_with_another_stain_normalisation_gets_the_embed_that_fixes_it(
    small_archive: Path, tmp_path: Path
) -> None:
    """``index --add`` refuses a slide embedded otherwise than the index's slides, so ``check``
    does not advise it alone: it names the normalisation and gives the embed to run first."""
    from PIL import Image

    root = shutil.copytree(small_archive, tmp_path / "root")
    a, b = open_store(root).slide_ids
    eid = open_store(root).embedding_ids(a)[0]
    reference = tmp_path / "ref.png"
    tiles = open_store(root).slide(a).tiles[:]
    Image.fromarray(tiles[tiles.reshape(len(tiles), -1).mean(1).argmin()]).save(reference)
    argv = ["embed", str(root), "--encoder", "random-cnn", "--slides", b, "--quiet"]
    stain = ["--stain-normalize", "reinhard", "--stain-reference", str(reference)]
    code, _, err = run_cli([*argv, *stain, "--no-resume"])
    assert code == 0, err
    code, out, _ = run_cli(["check", str(root)])
    [name] = [e.name for e in SearchIndex.open(root, eid).slides if e.slide_id == b]
    assert code == 1 and out.count("problem: ") == 1, out
    assert (
        f"1 indexed slide(s) re-embedded with another stain normalisation than the index's "
        f"(none: {name}); searches return their old tiles and index --add refuses them"
    ) in out
    fix = out.split("fix: ", 1)[1].splitlines()[0]
    assert fix == (
        f"wsi-ssl embed {root} --encoder random-cnn --slides {b} --stain-normalize none "
        f"--no-resume, then wsi-ssl index {root} --name {eid} --add"
    )
    embed_fix, add_fix = fix.removeprefix("wsi-ssl ").split(", then wsi-ssl ")
    assert run_cli([*embed_fix.split(), "--quiet"])[0] == 0
    code, _, err = run_cli([*add_fix.split(), "--quiet"])
    assert code == 0, err
    assert run_cli(["check", str(root)])[0] == 0


def test_the_fix_of_damaged_embeddings_repeats_their_stain_normalisation(
    small_archive: Path, tmp_path: Path
) -> None:
    """Embeddings made with Macenko to a reference, damaged (a chunk lost; then the array's
    metadata cut short): the fix embeds with the same normalisation, read from the array or,
    when its metadata is gone, from another slide's array of that encoder (it left the stain
    flags out, so following it silently changed the vectors)."""
    from PIL import Image

    root = shutil.copytree(small_archive, tmp_path / "root")
    a = open_store(root).slide_ids[0]
    reference = tmp_path / "ref.png"
    tiles = open_store(root).slide(a).tiles[:]
    Image.fromarray(tiles[tiles.reshape(len(tiles), -1).mean(1).argmin()]).save(reference)
    stain = ["--stain-normalize", "macenko", "--stain-reference", str(reference)]
    argv = ["embed", str(root), "--encoder", "random-cnn", "--quiet", "--dtype", "float32"]
    assert run_cli([*argv, *stain, "--no-resume"])[0] == 0
    eid = open_store(root).embedding_ids(a)[0]
    array = root / "slides" / f"{a}.zarr" / "embeddings" / eid
    want = json.loads((array / "zarr.json").read_text())["attributes"]["stain"]
    flags = f"--stain-normalize macenko --stain-reference {reference}"
    fix = f"wsi-ssl embed {root} --encoder random-cnn --dtype float32 --slides {a} {flags}"
    for damage in ("chunk", "metadata"):
        if damage == "chunk":
            next(p for p in (array / "c").rglob("*") if p.is_file()).unlink()
        else:
            (array / "zarr.json").write_text('{"zarr_format": 3, "attri')
        code, out, _ = run_cli(["check", str(root), "--repair"])
        assert (
            code == 1 and f"fix: removed (a re-run of its embedding job redoes it): {fix}\n" in out
        )
        code, _, err = run_cli([*fix.split()[1:], "--quiet"])
        assert code == 0, err
        assert json.loads((array / "zarr.json").read_text())["attributes"]["stain"] == want
    code, out, _ = run_cli(["check", str(root)])  # only the index (built without stain) is left
    assert out.count("problem: ") == 1 and f"problem: {root}/index/{eid}: 2 indexed" in out


def test_the_fix_of_damaged_embeddings_repeats_their_resize_and_precision(
    small_archive: Path, tmp_path: Path
) -> None:
    """Embeddings made with --resize bilinear: the fix says so (it left the flag out, and
    following it embedded under another encoder id, the damaged array never redone); a
    preset's own precision needs no flag, another does."""
    from wsi_ssl.encoders.registry import ENCODERS
    from wsi_ssl.storage.fix_commands import encoder_flags

    root = shutil.copytree(small_archive, tmp_path / "root")
    a = open_store(root).slide_ids[0]
    argv = ["embed", str(root), "--encoder", "random-cnn", "--quiet", "--resize", "bilinear"]
    assert run_cli(argv)[0] == 0
    eid = next(e for e in open_store(root).embedding_ids(a) if e != "random-cnn-2dd33a39f4f1")
    array = root / "slides" / f"{a}.zarr" / "embeddings" / eid
    _first_chunk(array).unlink()
    code, out, _ = run_cli(["check", str(root), "--repair"])
    fix = f"wsi-ssl embed {root} --encoder random-cnn --resize bilinear --slides {a}"
    assert code == 1 and f"{fix}\n" in out, out
    assert run_cli([*fix.split()[1:], "--quiet"])[0] == 0
    assert eid in open_store(root).embedding_ids(a)  # redone under its own id
    preset = next(n for n, e in ENCODERS.items() if e.config.precision != "fp32")
    own = ENCODERS.get(preset).config.precision
    record = {"encoder": {"name": preset, "source": "preset", "precision": own}}
    assert "--precision" not in encoder_flags(record, f"{preset}-0")
    other = "fp32"  # asked for on a preset of another precision: another id, said
    record["encoder"]["precision"] = other
    assert f"--precision {other}" in encoder_flags(record, f"{preset}-0")
    run = {"name": "wsi-ssl-vit_small", "source": "wsi-ssl", "weights_path": "/r/step_5.pt"}
    assert (
        encoder_flags({"encoder": {**run, "resize": "bilinear"}}, "x") == "--encoder /r/step_5.pt"
    )
    assert "--resize never" in encoder_flags({"encoder": {**run, "resize": "never"}}, "x")


def _cut(path: Path, keep: int = 10) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _first_chunk(array_dir: Path) -> Path:
    return min(p for p in (array_dir / "c").rglob("*") if p.is_file())


STORE_DAMAGE = {
    "coords chunk lost": (lambda z: _first_chunk(z / "coords").unlink(), "coords changed"),
    "QC chunk lost": (lambda z: _first_chunk(z / "qc" / "focus").unlink(), "qc/focus changed"),
    "thumbnail chunk lost": (lambda z: _first_chunk(z / "thumbnail").unlink(), "thumbnail"),
    "tiles metadata cut short": (lambda z: _cut(z / "tiles" / "zarr.json"), "damaged"),
    "store metadata cut short": (lambda z: _cut(z / "zarr.json"), "damaged"),
    "tile shard cut short": (lambda z: _cut(_first_chunk(z / "tiles"), 1000), "cut short"),
}


@pytest.mark.parametrize("damage", list(STORE_DAMAGE))
def test_damage_to_any_array_of_a_store_is_found_and_its_re_tile_keeps_the_embeddings(
    small_archive: Path, tmp_path: Path, damage: str
) -> None:
    """Each array of a store is checked (a lost coords chunk was blamed on the embeddings and
    its fix left coords of zeros; QC, thumbnail and cut-short shards passed), and the printed
    re-tile works on the damaged store (cut-short metadata made it fail with a bare JSON
    error, or drop the embeddings without a word), keeping the embeddings: the same tiles."""
    root = shutil.copytree(small_archive, tmp_path / "root")
    a = open_store(root).slide_ids[0]
    before = open_store(root).slide(a)
    coords, tiles = before.coords, before.tiles[:]
    vectors = np.asarray(open_store(root).embeddings(a).features)
    store = root / "slides" / f"{a}.zarr"
    do, said = STORE_DAMAGE[damage]
    do(store)
    code, out, _ = run_cli(["check", str(root)])
    assert code == 1 and out.count("problem: ") == 1, out
    assert f"problem: {store}: " in out and said in out.split(f"problem: {store}: ")[1], out
    fix = out.split("fix: ", 1)[1].splitlines()[0]
    assert fix.startswith("wsi-ssl tile ") and fix.endswith(" --no-resume")
    code, out, err = run_cli([*fix.split()[1:], "--json"])
    assert code == 0, err
    assert json.loads(out)["slides"][0]["kept_embeddings"] != []
    assert run_cli(["check", str(root)])[0] == 0
    after = open_store(root).slide(a)
    np.testing.assert_array_equal(after.coords, coords)
    np.testing.assert_array_equal(after.tiles[:], tiles)
    np.testing.assert_array_equal(np.asarray(open_store(root).embeddings(a).features), vectors)


def test_a_store_from_before_contents_digests_is_not_blamed_for_its_embeddings(
    small_archive: Path, tmp_path: Path
) -> None:
    """A store completed before ``contents_sha256`` was recorded, with a killed embedding job's
    cut-short metadata: the unfinished embeddings are named, not the store (its check walked
    the embeddings and advised a re-tile)."""
    root = shutil.copytree(small_archive, tmp_path / "root")
    a = open_store(root).slide_ids[0]
    meta = root / "slides" / f"{a}.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    del doc["attributes"]["contents_sha256"]
    meta.write_text(json.dumps(doc))
    partial = meta.parent / "embeddings" / ".writing-random-cnn-0123456789ab"
    partial.mkdir()
    (partial / "zarr.json").write_text('{"zarr_format": 3, "node_ty')
    assert open_store(root).slide(a).problem() is None
    code, out, _ = run_cli(["check", str(root)])
    assert code == 1 and out.count("problem: ") == 1
    assert f"problem: {partial}: unfinished embeddings (a job was killed)" in out


def test_one_resolver_for_slide_names_and_encoder_ids(small_archive: Path) -> None:
    import pytest

    from wsi_ssl.errors import ConfigError, EmbeddingsNotFoundError, UnknownSlideError
    from wsi_ssl.storage.resolve import (
        archive_encoder_ids,
        resolve_encoder,
        resolve_slide,
        resolve_slides,
    )

    archive = open_store(small_archive)
    by_name = {Path(e.path).stem: e.slide_id for e in archive.catalog.entries()}
    s1 = by_name["s1"]
    for name in (s1, s1[:6], "s1", "s1.tiff", str(small_archive.parent / "s1.tiff")):
        assert resolve_slide(archive, name) == s1, name
    assert resolve_slides(archive, ["s2", "s1", by_name["s2"]]) == [by_name["s2"], s1]
    with pytest.raises(UnknownSlideError, match="'nope': no such slide in archive"):
        resolve_slide(archive, "nope")
    [eid] = archive_encoder_ids(archive)
    assert resolve_encoder([eid], "random", "here") == resolve_encoder([eid], None, "here") == eid
    with pytest.raises(ConfigError, match=r"'random' is the start of 2 encoder ids"):
        resolve_encoder([eid, f"{eid}x"], "random", "here")
    with pytest.raises(EmbeddingsNotFoundError, match=r"no complete embeddings 'nope'"):
        resolve_encoder([eid], "nope", "here")
    with pytest.raises(UnknownSlideError, match=r"the archive's slides: s1\.tiff, s2\.tiff \("):
        resolve_slide(archive, "deadbeef")
    with pytest.raises(ConfigError, match="embeddings of 2 encoders"):
        resolve_encoder([eid, "other"], None, "here")
    # the archive's methods take a slide's path as a Path too (a TypeError before), and say
    # what names a slide when given something else
    path = small_archive.parent / "s1.tiff"
    assert archive.slide(path).slide_id == s1 and len(archive.coords(Path("s1.tiff"))) > 0
    for wrong in (3, None):
        with pytest.raises(ConfigError, match="id, file name, stem or path"):
            archive.tiles(wrong)  # type: ignore[arg-type]


def test_a_path_names_the_slide_tiled_from_that_file_only(
    small_archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A path names the slide tiled from it. Before, any path fell back to its file name: an
    untiled file of the same name (another slide) answered with the tiled one's tiles, and a
    path naming one of two same-named slides was refused as naming both."""
    from wsi_ssl.config import TilingConfig
    from wsi_ssl.errors import UnknownSlideError
    from wsi_ssl.storage.resolve import resolve_slide, slide_matches, slide_names
    from wsi_ssl.synthetic import write_synthetic_slide
    from wsi_ssl.tiling.batch import tile_slide

    root = shutil.copytree(small_archive, tmp_path / "root")
    archive = open_store(root)
    s1 = {Path(e.path).stem: e.slide_id for e in archive.catalog.entries()}["s1"]
    other = write_synthetic_slide(tmp_path / "other" / "s1.tiff", (700, 600), seed=9)
    with pytest.raises(UnknownSlideError, match="no such slide"):
        resolve_slide(archive, str(other))  # another file of that name, never tiled
    assert resolve_slide(archive, "/moved/elsewhere/s1.tiff") == s1  # no such file: by name
    monkeypatch.chdir(small_archive.parent)
    assert resolve_slide(archive, "./s1.tiff") == s1
    names = slide_names(archive)  # a catalog from before paths were resolved: "./s1.tiff"
    for key in [k for k, v in names.items() if "/" in k and v == {s1}]:
        names[key.replace(str(small_archive.parent), ".")] = names.pop(key)
    assert slide_matches(names, archive.slide_ids, str(small_archive.parent / "s1.tiff")) == {s1}
    config = TilingConfig(tile_size=224, codec="zstd", tiles_per_chunk=4, tissue_threshold=0.0)
    tile_slide(other, root, config)
    archive = open_store(root)
    monkeypatch.chdir(tmp_path)
    second = resolve_slide(archive, "other/s1.tiff")
    assert second != s1 and resolve_slide(archive, str(small_archive.parent / "s1.tiff")) == s1
    with pytest.raises(UnknownSlideError, match="names 2 slides"):
        resolve_slide(archive, "s1.tiff")


def test_one_name_or_path_given_where_a_list_is_asked_is_one_item(
    small_archive: Path, tmp_path: Path
) -> None:
    """``slides="s1.tiff"`` is one slide (a string is iterable: it was split into letters,
    and "." tiled the working folder's slides); one path to ``tile_slides`` likewise."""
    from wsi_ssl.embedding.mil_files import export
    from wsi_ssl.storage.resolve import resolve_slides
    from wsi_ssl.tiling.source import collect_slide_paths

    archive = open_store(small_archive)
    s1 = {Path(e.path).stem: e.slide_id for e in archive.catalog.entries()}["s1"]
    assert resolve_slides(archive, "s1.tiff") == [s1]
    slide = small_archive.parent / "s1.tiff"
    assert collect_slide_paths(str(slide)) == collect_slide_paths(slide) == [slide]
    result = export(small_archive, tmp_path / "h5", slides="s1")
    assert [o.slide for o in result.exported] == [s1]


def test_a_multi_scale_out_whose_scales_hold_no_store_yet_is_checked_per_scale(
    tmp_path: Path,
) -> None:
    """Both scales of ``--mpp 0.1,0.2`` are refused (they enlarge a 0.5 µm/px slide), so each
    ``mpp-*`` root holds a catalog and no store: ``check OUT`` checks both, it does not call
    ``OUT`` "no such archive root"."""
    from wsi_ssl.synthetic import write_synthetic_slide

    slide = write_synthetic_slide(tmp_path / "s.tiff", (600, 600), seed=1)
    out = tmp_path / "out"
    code, _, _ = run_cli(["tile", str(slide), "--out", str(out), "--mpp", "0.1,0.2", "--quiet"])
    assert code == 1 and not list(out.glob("mpp-*/slides/*"))
    code, report, _ = run_cli(["check", str(out)])
    assert code == 0, report
    for name in ("mpp-0.1", "mpp-0.2"):
        assert f"{out / name}: checked 0 store(s)" in report, report


def test_a_multi_scale_output_given_as_one_root_names_its_scales(tmp_path: Path) -> None:
    """``embed OUT`` (or any command that needs one archive root) on the output of ``tile
    --mpp 0.5,1.0``: one line naming the scale roots, not "no such archive root"."""
    from wsi_ssl.errors import MultiScaleRootError, StoreNotFoundError
    from wsi_ssl.synthetic import write_synthetic_slide

    slide = write_synthetic_slide(tmp_path / "s.tiff", (1024, 768), seed=2)
    out = tmp_path / "out"
    argv = ["tile", str(slide), "--out", str(out), "--mpp", "0.5,1.0", "--tissue-threshold", "0"]
    assert run_cli([*argv, "--quiet"])[0] == 0
    code, _, err = run_cli(["embed", str(out), "--encoder", "random-cnn", "--device", "cpu"])
    assert code == 2 and err.count("\n") == 1
    assert f"{out / 'mpp-0.5'}, {out / 'mpp-1'}); name one of them" in err, err
    with pytest.raises(MultiScaleRootError) as info:
        open_store(out)
    assert isinstance(info.value, StoreNotFoundError)  # what callers already catch
    assert len(open_store(out / "mpp-1").slide_ids) == 1


def test_the_fix_of_a_store_repeats_the_limits_it_was_tiled_with(tmp_path: Path) -> None:
    """A slide without a scale tiled with --mpp-override, enlarged with --allow-upsampling, a
    finer thumbnail: the re-tile ``check`` advises for its damaged store repeats them (without them it failed
    with MissingMppError), and redoes the same tiles."""
    from wsi_ssl.synthetic import write_synthetic_slide

    slide = write_synthetic_slide(tmp_path / "nompp.tiff", (600, 500), mpp=None, seed=5)
    root = tmp_path / "root"
    argv = ["tile", str(slide), "--out", str(root), "--mpp-override", "1.0", "--mpp", "0.4"]
    argv += ["--allow-upsampling", "--tile-size", "64", "--tissue-threshold", "0", "--quiet"]
    code, _, err = run_cli([*argv, "--thumbnail-mpp", "4"])
    assert code == 0, err
    [sid] = open_store(root).slide_ids
    assert open_store(root).slide(sid).tiling["thumbnail_mpp"] == 4.0
    before = open_store(root).slide(sid).coords
    shard = next((root / "slides" / f"{sid}.zarr" / "tiles" / "c").rglob("0"))
    next(p for p in shard.parent.rglob("*") if p.is_file()).unlink()
    code, out, _ = run_cli(["check", str(root)])
    [fix] = [x.split("fix: ", 1)[1] for x in out.splitlines() if "fix: " in x]
    assert code == 1 and "--mpp 0.4 " in fix and "--tile-size 64 " in fix, out
    assert "--mpp-override 1.0" in fix and "--allow-upsampling" in fix
    assert "--allow-upsampling True" not in fix
    assert "--thumbnail-mpp 4.0" in fix and "--config" not in fix  # a flag, not a TOML note
    code, _, err = run_cli([*fix.removeprefix("wsi-ssl ").split(), "--quiet"])
    assert code == 0, err
    assert run_cli(["check", str(root)])[0] == 0
    assert np.array_equal(open_store(root).slide(sid).coords, before)


def test_slides_that_failed_to_tile_are_noted_not_problems(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    """An archive whose broken slides failed: ``check`` passes (nothing in it is damaged) and
    says which slides are not in it, from the catalog (it said nothing of them)."""
    broken = sorted((fixtures_dir / "broken").iterdir())
    good = fixtures_dir / "slides" / "CMU-1-Small-Region.svs"
    root = tmp_path / "root"
    argv = ["tile", *map(str, broken), str(good), "--out", str(root), "--mpp", "2", "--quiet"]
    assert run_cli(argv)[0] == 1
    code, out, _ = run_cli(["check", str(root)])
    failed = [str(p) for p in broken]
    note = [x for x in out.splitlines() if x.startswith("note: ")]
    assert code == 0 and len(note) == 1, out
    assert note[0].startswith(f"note: {len(failed)} slide(s) failed to tile")
    assert all(p in note[0] for p in failed) and str(good) not in note[0]
    code, out, _ = run_cli(["check", str(root), "--json"])
    assert sorted(json.loads(out)["failed_slides"]) == sorted(failed)


def test_a_damaged_or_lost_catalog_is_rebuilt_from_the_stores(
    small_archive: Path, tmp_path: Path
) -> None:
    """A cut-short ``catalog.sqlite``: ``tile`` refuses the batch with one line naming it and
    the repair (it failed every slide alike), ``check`` reports it once (not once a
    store, with placeholder fixes), ``--repair`` sets it aside and rebuilds it from the stores;
    a deleted catalog likewise. The rebuilt rows are the tiled ones: a re-run skips the slides."""
    root = shutil.copytree(small_archive, tmp_path / "root")
    original = {e.slide_id: e for e in open_store(root).catalog.entries()}
    catalog = root / "catalog.sqlite"
    catalog.write_bytes(catalog.read_bytes()[:3000])
    slide = small_archive.parent / "s1.tiff"
    argv = ["tile", str(slide), "--out", str(root), "--tile-size", "224", "--codec", "zstd"]
    argv += ["--tiles-per-chunk", "4", "--tissue-threshold", "0", "--quiet"]
    second = small_archive.parent / "s2.tiff"  # a batch: refused once, before any slide
    code, out, err = run_cli([*argv[:2], str(second), *argv[2:]])
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (out, err)
    assert f"{catalog}: the archive's catalog is damaged (" in err
    assert f"`wsi-ssl check {root} --repair` rebuilds it" in err  # the real root, no placeholder
    # meanwhile slides are still named by their files (the stores record them)
    from wsi_ssl.storage.resolve import resolve_slide

    assert resolve_slide(open_store(root), "s1.tiff") in original
    code, out, _ = run_cli(["check", str(root), "--quick"])
    assert code == 1 and out.count("problem: ") == 1 and f"problem: {catalog}: damaged" in out
    for damage in ("cut short", "deleted"):
        code, out, _ = run_cli(["check", str(root), "--quick", "--repair"])
        assert code == 0 and out.count("repaired: ") == 1, (damage, out)
        rebuilt = {e.slide_id: e for e in open_store(root).catalog.entries()}
        assert rebuilt.keys() == original.keys()
        for sid, e in original.items():
            r = rebuilt[sid]
            assert (r.path, r.fingerprint, r.status, r.n_tiles) == (
                e.path,
                e.fingerprint,
                e.status,
                e.n_tiles,
            )
            assert {k: r.tiling[k] for k in ("mpp", "tile_size", "codec")} == {  # type: ignore[index]
                k: e.tiling[k]
                for k in ("mpp", "tile_size", "codec")  # type: ignore[index]
            }
        if damage == "cut short":
            catalog.unlink()  # the second round: a lost catalog
    [kept] = root.glob("catalog.sqlite.damaged-*")  # kept (a second name), not deleted
    assert kept.read_bytes()[:16] == b"SQLite format 3\x00" and kept.stat().st_size == 3000
    code, out, err = run_cli(["check", str(root), "--quick", "--repair"])  # nothing left
    assert code == 0 and "problem: " not in out and "repaired: " not in out, out
    code, out, err = run_cli(argv)
    assert code == 0 and "1 already complete" in out, out + err


def test_a_killed_writers_partial_beside_complete_vectors_is_cleared_by_the_next_embed(
    small_archive: Path, tmp_path: Path
) -> None:
    """A killed `embed --no-resume` leaves `.writing-<id>` beside the complete old vectors: the
    next plain embed skips the slide and removes it, so check comes clean (it kept exiting 1
    until --repair); the vectors are untouched."""
    root = shutil.copytree(small_archive, tmp_path / "root")
    a = open_store(root).slide_ids[0]
    [eid] = open_store(root).embedding_ids(a)
    group = root / "slides" / f"{a}.zarr" / "embeddings"
    before = open_store(root).embeddings(a, eid).features.copy()
    shutil.copytree(group / eid, group / f".writing-{eid}")  # what the killed job had written
    code, out, _ = run_cli(["check", str(root)])
    assert code == 1 and "unfinished embeddings (a job was killed)" in out
    code, out, _ = run_cli(["embed", str(root), "--encoder", "random-cnn", "--json"])
    assert code == 0 and all(s["status"] == "skipped" for s in json.loads(out)["slides"])
    assert not (group / f".writing-{eid}").exists()
    assert run_cli(["check", str(root)])[0] == 0
    np.testing.assert_array_equal(open_store(root).embeddings(a, eid).features, before)


def test_a_fix_for_an_archive_whose_path_has_a_space_runs_as_pasted(tmp_path: Path) -> None:
    """The fix names the root quoted for the shell (pasted, it split at the space)."""
    import subprocess

    from wsi_ssl.config import TilingConfig
    from wsi_ssl.synthetic import write_synthetic_slide
    from wsi_ssl.tiling.batch import tile_slide

    root = tmp_path / "the archive"
    tile_slide(write_synthetic_slide(tmp_path / "s.tiff", (768, 512), seed=1), root,
               TilingConfig(tile_size=128))  # fmt: skip
    store = open_store(root).store_path(open_store(root).slide_ids[0])
    next(p for p in (store / "tiles" / "c").rglob("*") if p.is_file()).unlink()
    code, out, _ = run_cli(["check", str(root)])
    fix = next(line for line in out.splitlines() if "fix: " in line).split("fix: ", 1)[1]
    assert code == 1 and f"--out '{root}'" in fix, fix
    assert subprocess.run(["bash", "-c", fix], capture_output=True).returncode == 0
    assert run_cli(["check", str(root)])[0] == 0
