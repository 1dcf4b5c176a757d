"""``wsi-ssl curate`` on an archive without embedded tiles names the command that embeds
them (it named the Python function ``wsi_ssl.embed`` to command-line users too)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli
from wsi_ssl.errors import ConfigError
from wsi_ssl.ssl.curation import curate
from wsi_ssl.testing.bags import write_bag_store


def test_no_embedded_tiles_names_wsi_ssl_embed(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    write_bag_store(root, f"{1:016x}", np.zeros((0, 4)), encoder_id="enc-x")
    said = (
        f"{root}: no embedded tiles to curate; embed the archive first (`wsi-ssl embed`, or "
        "wsi_ssl.embed in Python)"
    )
    code, _, err = run_cli(
        ["curate", str(root), "--out", str(tmp_path / "s.json"), "--n-tiles", "4"]
    )
    assert code == 2 and err.strip() == f"wsi-ssl: error: {said}"
    with pytest.raises(ConfigError) as info:
        curate(root, tmp_path / "s.json", n_tiles=4)
    assert str(info.value) == said and not (tmp_path / "s.json").exists()
