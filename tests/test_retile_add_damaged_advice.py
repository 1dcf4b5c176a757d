"""`wsi-ssl index --add` / `--remove` on an archive whose only slide stores (those with the
embeddings) are damaged: the advice is the check that prints the tile command redoing them, as a
build's and an export's, not "embed" (it cannot open them either). Real tile + embed + index."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli
from wsi_ssl.search import SearchIndex
from wsi_ssl.storage import open_store


@pytest.mark.parametrize(
    "flags",
    [["--add"], ["--remove", "s1.tiff"], ["--add", "--name", "INDEX"]],
    ids=["add", "remove", "add-named"],
)
def test_an_update_of_an_archive_with_only_damaged_stores_sends_to_check(
    small_archive: Path, tmp_path: Path, flags: list[str]
) -> None:
    root = Path(shutil.copytree(small_archive, tmp_path / "my root"))
    name = SearchIndex.open(root).name
    stores = [root / "slides" / f"{sid}.zarr" for sid in open_store(root).slide_ids]
    for store in stores:
        (store / "zarr.json").write_text("{bad")
    argv = ["index", str(root), "--encoder", "random-cnn", "--quiet"]
    code, out, err = run_cli(argv + [name if f == "INDEX" else f for f in flags])
    check = f"`wsi-ssl check {shlex.quote(str(root))}` prints the tile command that redoes each"
    why = f"its 2 slide stores are damaged ({', '.join(map(str, stores))}); {check}"
    none = f"{root}: no complete embeddings 'random-cnn' (available: none)"
    assert (code, out) == (2, ""), err
    assert err.strip() == f"wsi-ssl: error: {none}; {why}"
    assert "wsi-ssl embed" not in err
    assert SearchIndex.open(root).n_vectors > 0  # the index is left as it was
