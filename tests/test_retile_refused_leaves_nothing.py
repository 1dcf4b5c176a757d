"""A slide refused by an embed job because it was re-tiled since the job planned it leaves
nothing in its new store: no ``embeddings/`` group, no encoder folder (real processes: the job
paused at the first slide's commit by the WSI_SSL_FAULT hook while the last slide is re-tiled).
A writer whose ``check`` refuses makes nothing and removes nothing that was there."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.test_embed_retile_race import TILING, _embed_while, tile_two_slides
from wsi_ssl.errors import StoreRetiledError
from wsi_ssl.storage import open_store
from wsi_ssl.storage.embeddings import EmbeddingWriter


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """Two synthetic slides tiled at 64 px, never embedded: the archive and each slide's file
    by slide id."""
    return tile_two_slides(tmp_path_factory.mktemp("retile_refused"))


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.faults
def test_a_slide_refused_as_retiled_leaves_no_embeddings_folder_in_its_new_store(
    archive: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    root = Path(shutil.copytree(archive[0], tmp_path / "root"))
    first, last = open_store(root).slide_ids
    retile = dataclasses.replace(TILING, jpeg_quality=50)  # same tiles, other bytes
    code, out, err = _embed_while(root, archive[1][last], retile, ["--workers", "1"])
    assert code == 1 and "StoreRetiledError" in out, out + err
    store = open_store(root).slide(last)
    assert store.tiling["jpeg_quality"] == 50  # the new store, refused
    assert not (store.path / "embeddings").exists(), _tree(store.path / "embeddings")
    assert (root / "slides" / f"{first}.zarr" / "embeddings").is_dir()  # the other one: done


def test_a_writer_whose_check_refuses_makes_nothing_and_lets_its_locks_go(
    archive: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    root = Path(shutil.copytree(archive[0], tmp_path / "root"))
    path = open_store(root).slide(open_store(root).slide_ids[0]).path
    before = _tree(path)

    def refuse() -> None:
        raise StoreRetiledError(path)

    with pytest.raises(StoreRetiledError):
        EmbeddingWriter(path, "enc", n_rows=3, dim=4, check=refuse)
    assert _tree(path) == before  # no embeddings group, no partial array
    stale = path / "embeddings" / ".writing-enc"  # a killed job's: not this writer's to remove
    writer = EmbeddingWriter(path, "enc", n_rows=3, dim=4)  # the locks were let go
    writer.write(0, np.ones((3, 4)))
    writer.commit()
    stale.mkdir()
    (stale / "zarr.json").write_text("{}")
    kept = _tree(path)
    with pytest.raises(StoreRetiledError):
        EmbeddingWriter(path, "enc", n_rows=3, dim=4, check=refuse)
    assert _tree(path) == kept
