"""A search that succeeded is not failed by its optional note: with the archive's catalog
damaged, ``wsi-ssl search --slide ... --box ...`` printed its results and then exited 2 on
the read behind the "file changed since tiling" note. Real archive, real CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import copy_two_slides, run_cli
from wsi_ssl.errors import CatalogCorruptError
from wsi_ssl.storage import open_store


@pytest.mark.parametrize("as_json", [True, False])
def test_a_damaged_catalog_leaves_a_region_search_its_results_and_exit_0(
    small_archive: Path, tmp_path: Path, as_json: bool
) -> None:
    root, first, _ = copy_two_slides(small_archive, tmp_path)
    catalog = root / "catalog.sqlite"
    assert catalog.stat().st_size > 6000
    os.truncate(catalog, 6000)
    with pytest.raises(CatalogCorruptError):  # the damage is real: the catalog cannot be read
        open_store(root).catalog.get(first)
    argv = ["search", str(root), "--slide", first, "--box", "224,224,448,448", "-k", "5"]
    code, out, err = run_cli([*argv, "--json"] if as_json else argv)
    assert code == 0, err
    if as_json:
        result = json.loads(out)
        assert result["query"]["slide_id"] == first and len(result["hits"]) == 5
        assert result["hits"][0]["slide_id"] == first and result["hits"][0]["box"] == [
            224,
            224,
            448,
            448,
        ]
    else:
        assert first in out
    notes = [line for line in err.splitlines() if line]
    assert len(notes) == 1 and notes[0].startswith("note: "), err
    assert "catalog is damaged" in notes[0] and f"`wsi-ssl check {root} --repair`" in notes[0]
    assert "error" not in err
