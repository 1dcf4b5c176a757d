"""A changed byte in stored embeddings is damage that ``check`` finds, not a wrong vector read
back silently: each chunk carries zstd's checksum of its contents."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli
from wsi_ssl.errors import EmbeddingsCorruptError
from wsi_ssl.storage import open_store
from wsi_ssl.storage.embeddings import embedding_ids, read_embeddings


@pytest.mark.faults
def test_a_flipped_bit_in_an_embeddings_chunk_is_found(small_archive: Path, tmp_path: Path) -> None:
    root = shutil.copytree(small_archive, tmp_path / "root")
    slide_id = open_store(root).slide_ids[0]
    store = open_store(root).slide(slide_id)
    [eid] = embedding_ids(store)
    chunk = next(
        p for p in sorted((store.path / "embeddings" / eid / "c").rglob("*")) if p.is_file()
    )
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01  # bit rot: the file's size and name unchanged
    chunk.write_bytes(bytes(data))
    with pytest.raises(EmbeddingsCorruptError, match="are damaged"):
        read_embeddings(store, eid)
    code, out, _ = run_cli(["check", str(root)])
    assert code == 1 and f"{slide_id}.zarr/embeddings/{eid}" in out, out
    assert f"--slides {slide_id}" in out  # the embed that redoes it
