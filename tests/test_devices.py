"""Embedding sharded across devices: two real processes on the CPU, the same job in each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_ssl.config import TilingConfig
from wsi_ssl.embedding import embed
from wsi_ssl.embedding.devices import embed_on_devices, parse_devices, shard_slides
from wsi_ssl.errors import ConfigError, DeviceUnavailableError
from wsi_ssl.storage import open_store
from wsi_ssl.synthetic import write_synthetic_slide
from wsi_ssl.tiling.batch import tile_slide

TILING = TilingConfig(tile_size=224, codec="zstd", tiles_per_chunk=16, tissue_threshold=0.0)


def test_shards_balance_tiles_and_devices_are_checked() -> None:
    shards = shard_slides({"a": 100, "b": 60, "c": 50, "d": 10}, 2)
    assert shards == [["a", "d"], ["b", "c"]]  # 110 and 110 tiles
    assert shard_slides({"a": 1}, 3) == [["a"], [], []]
    assert parse_devices("cpu, cpu") == ["cpu", "cpu"]
    with pytest.raises(ConfigError, match="at least one"):
        parse_devices(" , ")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError, match=r"cuda:0.*not available"):
            parse_devices("cuda:0,cuda:1")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("devices")
    for seed, size in ((1, (900, 700)), (2, (700, 700)), (3, (700, 500))):
        slide = write_synthetic_slide(base / f"s{seed}.tiff", size, seed=seed)
        tile_slide(slide, base / "root", TILING)
    return base / "root"


@pytest.mark.slow
def test_two_processes_embed_what_one_does(root: Path, tmp_path: Path) -> None:
    summary = embed_on_devices(root, "random-cnn", "cpu,cpu", workers=0)
    archive = open_store(root)
    assert [r.slide for r in summary.outcomes] == archive.slide_ids
    assert not summary.failed and summary.compute["devices"] == ["cpu", "cpu"]
    assert summary.tiles_done == sum(archive.slide(s).n_tiles for s in archive.slide_ids)
    eid = summary.encoder_id
    two = {s: np.asarray(archive.embeddings(s, eid).features) for s in archive.slide_ids}
    again = embed_on_devices(root, "random-cnn", ["cpu", "cpu"], workers=0)  # resume
    assert {r.status for r in again.outcomes} == {"skipped"}
    one = embed(root, "random-cnn", resume=False, workers=0, device="cpu")  # one device
    assert one.encoder_id == eid and not one.failed
    for s in archive.slide_ids:
        one_device = np.asarray(open_store(root).embeddings(s, eid).features)
        np.testing.assert_allclose(one_device, two[s], rtol=1e-3, atol=1e-3)


def test_cli_devices_are_checked_before_any_work(root: Path) -> None:
    from tests.conftest import run_cli

    if torch.cuda.is_available():
        pytest.skip("checks the message of a machine without CUDA")
    argv = ["embed", str(root), "--encoder", "random-cnn", "--devices", "cpu,cuda:1"]
    code, _, err = run_cli([*argv, "--quiet"])
    assert code == 2 and err.count("\n") == 1 and "cuda:1" in err and "not available" in err
