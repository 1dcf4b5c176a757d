"""The note an index build or update gives of the tiled slides it leaves out, not embedded by
its encoder: a slide an embedding job writes now is named as being embedded (it was named with
the advice to embed it, or not at all once its array was begun), one a killed job left
unfinished is named with the command that embeds it (it was not named), and a weights file
gone since the embedding is said to be gone (the command printed it and failed). Real
archives, locks, writers and processes."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch

from tests.conftest import copy_two_slides, run_cli
from wsi_ssl.config import TilingConfig
from wsi_ssl.encoders import create_encoder
from wsi_ssl.search import SearchIndex
from wsi_ssl.search.unembedded import unembedded_note
from wsi_ssl.storage import open_store
from wsi_ssl.storage.embeddings import EmbeddingWriter, embedding_ids
from wsi_ssl.synthetic import write_synthetic_slide
from wsi_ssl.tiling.batch import tile_slide

# small_archive's tiling (tests/conftest.py): a slide tiled so is on the index's grid
TILING = replace(TilingConfig(tile_size=224, codec="zstd", tiles_per_chunk=4), tissue_threshold=0.0)

_HOLD_LOCK = """
import sys
from wsi_ssl.storage.locks import embeddings_lock
with embeddings_lock(sys.argv[1], sys.argv[2], sys.argv[3]):
    print("held", flush=True)
    sys.stdin.read()
"""

_KILLED_WRITER = """
import os, signal, sys
from wsi_ssl.storage.embeddings import EmbeddingWriter
writer = EmbeddingWriter(sys.argv[1], sys.argv[2], n_rows=int(sys.argv[3]), dim=8)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _json(argv: list[str]) -> dict:
    code, out, err = run_cli([*argv, "--json"])
    assert code == 0, err
    return json.loads(out)


def _tile(root: Path, folder: Path, name: str, seed: int) -> str:
    slide = write_synthetic_slide(folder / name, (700, 600), seed=seed)
    return str(tile_slide(slide, root, TILING).details["slide_id"])


def test_an_index_names_the_slides_being_embedded_now(small_archive: Path, tmp_path: Path) -> None:
    """Three slides tiled since the embedding: one whose embeddings lock another process holds
    (no array yet), one an embedding writer is at (its unfinished array), one whose writer was
    killed (its unfinished array, no lock). The first was sent to ``embed`` (which would say
    busy), the others named nowhere; now the two being embedded are named as such, with what
    adds them once that job ends, and the killed one with the command that embeds it."""
    root, first, second = copy_two_slides(small_archive, tmp_path)
    ids = {n: _tile(root, tmp_path, n, s) for s, n in enumerate(("locked.tiff", "writing.tiff"))}
    killed = _tile(root, tmp_path, "killed.tiff", 7)
    index = SearchIndex.open(root)
    eid, name, archive = index.encoder_id, index.name, open_store(root)
    run = subprocess.run(  # a real writer, killed with its array begun
        [sys.executable, "-c", _KILLED_WRITER, str(archive.store_path(killed)), eid, "4"],
        check=False,
    )
    unfinished = archive.store_path(killed) / "embeddings" / f".writing-{eid}"
    assert run.returncode == -9 and unfinished.is_dir()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(root), ids["locked.tiff"], eid],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    writing = archive.store_path(ids["writing.tiff"])
    n_rows = archive.slide(ids["writing.tiff"]).n_tiles
    writer = EmbeddingWriter(writing, eid, n_rows=n_rows, dim=8)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        added = _json(["index", str(root), "--add", "--quiet"])
        busy, unembedded = added["notes"]
        shown = ", ".join(sorted(ids, key=ids.__getitem__))  # in slide id order
        add = f"`wsi-ssl index {root} --name {name} --add` adds them"
        assert busy == (
            f"2 tiled slide(s) being embedded by {eid} now, left out ({shown}): when that "
            f"job ends, {add}"
        )
        assert unembedded.startswith(f"1 tiled slide(s) not embedded by {eid}, left out (k")
        embed = f"`wsi-ssl embed {root} --encoder random-cnn` embeds them"
        assert f"(killed.tiff): {embed}, then {add}" in unembedded
        assert added["added"] == []
        assert _json(["index", str(root), "--quiet"])["notes"] == [busy, unembedded]  # rebuild
    finally:
        writer.abort()
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=60)
    code, _, err = run_cli([*embed.split("`")[1].split()[1:], "--quiet"])  # as printed
    assert code == 0, err
    assert all(embedding_ids(archive.store_path(s)) == [eid] for s in [*ids.values(), killed])
    after = _json(["index", str(root), "--add", "--quiet"])
    assert sorted(after["added"]) == sorted([*ids.values(), killed]) and after["notes"] == []
    indexed = {e.slide_id for e in SearchIndex.open(root).slides}
    assert indexed == {first, second, killed, *ids.values()}


def test_the_embed_command_of_a_weights_file_gone_says_so(tmp_path: Path) -> None:
    """Embedded with ``--weights FILE``, the file since moved: the note printed the command
    with the recorded path, which fails. Now it puts FILE in its place and says the recorded
    one is gone; the command with the moved file embeds the slide."""
    root = tmp_path / "root"
    tile_slide(write_synthetic_slide(tmp_path / "s.tiff", (900, 700), seed=3), root, TILING)
    weights = tmp_path / "w.pth"
    torch.save(create_encoder("random-cnn", seed=3).model.state_dict(), weights)
    assert (
        run_cli(["embed", str(root), "--encoder", "random-cnn", "--weights", str(weights)])[0] == 0
    )
    assert run_cli(["index", str(root), "--quiet"])[0] == 0
    new = _tile(root, tmp_path, "new.tiff", 5)
    embed = f"`wsi-ssl embed {root} --encoder random-cnn --weights {weights}` embeds them"
    [note] = _json(["index", str(root), "--add", "--quiet"])["notes"]
    assert embed in note and "gone" not in note  # the file is where it was recorded

    moved = tmp_path / "moved.pth"
    weights.rename(moved)
    [note] = _json(["index", str(root), "--add", "--quiet"])["notes"]
    command = f"wsi-ssl embed {root} --encoder random-cnn --weights FILE"
    gone = f"(FILE: the weights file they were embedded with; {weights}, where it was recorded"
    gone += ", is gone)"
    assert f"`{command}` {gone} embeds them" in note
    assert _json(["index", str(root), "--quiet"])["notes"] == [note]  # a rebuild says it too

    argv = command.replace("FILE", str(moved)).split()[1:]
    code, _, err = run_cli([*argv, "--quiet"])
    assert code == 0, err
    after = _json(["index", str(root), "--add", "--quiet"])
    assert after["added"] == [new] and after["notes"] == []


def test_a_pretrain_checkpoint_gone_is_said_to_be(tmp_path: Path) -> None:
    """The encoder a ``wsi-ssl pretrain`` checkpoint makes is named by that file: gone, the
    command names CHECKPOINT in its place and says where it was recorded."""
    root = tmp_path / "root"
    tile_slide(write_synthetic_slide(tmp_path / "s.tiff", (700, 600), seed=2), root, TILING)
    gone = tmp_path / "run" / "checkpoint.pt"
    encoder = {"name": "vit-small", "source": "wsi-ssl", "weights_path": str(gone)}
    [note] = unembedded_note(open_store(root), "idx", "vit-small-0123", [], (), encoder)
    command = f"`wsi-ssl embed {root} --encoder CHECKPOINT`"
    assert f"{command} (CHECKPOINT: the checkpoint they were embedded with; {gone}" in note
    gone.parent.mkdir()
    gone.write_bytes(b"")  # there again: named as recorded
    [note] = unembedded_note(open_store(root), "idx", "vit-small-0123", [], (), encoder)
    assert f"`wsi-ssl embed {root} --encoder {gone}` embeds them" in note
