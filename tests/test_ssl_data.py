"""Tile stores as a Dataset: checks on what is given, worker safety, the step sampler."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import wsi_ssl
from wsi_ssl.errors import SchemaMismatchError, StoreIncompleteError, StoreNotFoundError
from wsi_ssl.ssl.config import PretrainConfig
from wsi_ssl.ssl.dataset import TileDataset
from wsi_ssl.ssl.sampler import StepBatchSampler, epoch_order
from wsi_ssl.ssl.stores import describe_sources, scan_stores
from wsi_ssl.ssl.transforms import HistoDINOTransform
from wsi_ssl.storage import open_store
from wsi_ssl.testing.tile_stores import write_tile_store


@pytest.fixture(scope="module")
def cmu_root(cmu_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CMU-1-Small-Region tiled at 64 px, 0.5 µm/px (about 600 real H&E tiles)."""
    root = tmp_path_factory.mktemp("cmu64")
    wsi_ssl.tile_slide(cmu_small, root, wsi_ssl.TilingConfig(tile_size=64, tiles_per_chunk=32))
    return root


def _noise_tiles(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, size, size, 3), dtype=np.uint8)


def test_scan_real_store_and_describe(cmu_root: Path) -> None:
    entries = scan_stores(cmu_root, tile_size=64, mpp=0.5)
    assert len(entries) == 1
    e = entries[0]
    store = open_store(cmu_root).slide(e.slide_id)
    assert e.n_tiles == store.n_tiles > 300 and e.tile_size == 64
    d = describe_sources(entries)
    assert d["n_tiles"] == e.n_tiles and d["slides"][0]["fingerprint"] == e.fingerprint
    # a slide store path works as well as its root
    assert scan_stores(store.path)[0].slide_id == e.slide_id
    # a store named twice (the root twice, the root and the store) is trained on once
    assert scan_stores([cmu_root, cmu_root]) == entries
    assert scan_stores([cmu_root, store.path, Path(str(cmu_root) + "/.")]) == entries


def test_empty_or_missing_root_is_store_not_found(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match="no such archive root"):
        scan_stores(tmp_path / "nowhere")
    (tmp_path / "empty" / "slides").mkdir(parents=True)
    with pytest.raises(StoreNotFoundError, match="complete slide store with tiles"):
        scan_stores(tmp_path / "empty")
    write_tile_store(tmp_path / "zero", "s0", np.zeros((0, 32, 32, 3), np.uint8))
    with pytest.raises(StoreNotFoundError, match="complete slide store with tiles"):
        scan_stores(tmp_path / "zero")


def test_incomplete_store_is_refused_unless_skipped(tmp_path: Path) -> None:
    write_tile_store(tmp_path, "done", _noise_tiles(8, 32))
    write_tile_store(tmp_path, "half", _noise_tiles(8, 32), complete=False)
    with pytest.raises(StoreIncompleteError, match=r"half\.zarr: store status is 'writing'"):
        scan_stores(tmp_path)
    assert [e.slide_id for e in scan_stores(tmp_path, skip_incomplete=True)] == ["done"]


def test_tile_size_and_scale_mismatches(tmp_path: Path) -> None:
    write_tile_store(tmp_path / "a", "s32", _noise_tiles(4, 32))
    with pytest.raises(
        SchemaMismatchError, match="tiles are 32 px but the config expects tile_size=64"
    ):
        scan_stores(tmp_path / "a", tile_size=64)
    with pytest.raises(SchemaMismatchError, match=r"0\.5 µm/px but the config expects mpp=1"):
        scan_stores(tmp_path / "a", mpp=1.0)
    write_tile_store(tmp_path / "a", "s48", _noise_tiles(4, 48))
    with pytest.raises(SchemaMismatchError, match="one tile_size"):
        scan_stores(tmp_path / "a")


def test_dataset_reads_tiles_and_is_worker_safe(cmu_root: Path) -> None:
    entries = scan_stores(cmu_root)
    ds = TileDataset(entries)
    store = open_store(cmu_root).slide(entries[0].slide_id)
    for i in (0, 7, len(ds) - 1):
        np.testing.assert_array_equal(ds[i].numpy(), store.tiles[i])
    with pytest.raises(IndexError):
        ds.read_tile(len(ds))
    ds.read_tile(0)  # opens handles; pickling must drop them
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._readers == {} and torch.equal(clone[5], ds[5])
    indices = list(range(0, 64, 3))
    in_process = torch.stack([ds[i] for i in indices])
    loader = DataLoader(ds, batch_size=len(indices), sampler=indices, num_workers=2)
    (from_workers,) = list(loader)
    assert torch.equal(from_workers, in_process)


def test_seeded_items_are_reproducible_and_leave_global_rng_alone(cmu_root: Path) -> None:
    ds = TileDataset(scan_stores(cmu_root), HistoDINOTransform(PretrainConfig.preset("cpu-small")))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b, c = ds[(3, 42)], ds[(3, 42)], ds[(3, 43)]
    assert torch.equal(torch.get_rng_state(), before)
    assert len(a) == 4 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def _sampler(sizes, **kw) -> StepBatchSampler:
    args = {
        "batch_size": 4,
        "steps_per_epoch": sum(sizes) // 4,
        "start_step": 0,
        "total_steps": 12,
        "seed": 7,
    }
    return StepBatchSampler(sizes, **{**args, **kw})


def test_step_sampler_resumes_and_splits_across_ranks() -> None:
    sizes = [10, 15]
    full = list(_sampler(sizes))
    assert len(full) == 12 and all(len(b) == 4 for b in full)
    # epochs: every tile once per epoch (6 steps x 4 = 24 of 25 tiles)
    epoch0 = [i for b in full[:6] for i, _ in b]
    assert len(set(epoch0)) == 24
    assert full[6:] != full[:6]  # a new order in epoch 1
    assert list(_sampler(sizes, start_step=5)) == full[5:]
    # two ranks of batch 2 read exactly the single-process batches of 4
    r0 = list(_sampler(sizes, batch_size=2, rank=0, world_size=2))
    r1 = list(_sampler(sizes, batch_size=2, rank=1, world_size=2))
    assert [a + b for a, b in zip(r0, r1, strict=True)] == full
    assert len({s for b in full for _, s in b}) == 48  # one augmentation seed per item


def test_balanced_sampling_gives_each_slide_an_equal_share() -> None:
    sizes = [1000, 50]
    uniform = epoch_order(sizes, seed=0, epoch=0, sampling="uniform")
    balanced = epoch_order(sizes, seed=0, epoch=0, sampling="balanced")
    assert sorted(uniform.tolist()) == list(range(1050))
    share = float((balanced >= 1000).float().mean())
    assert 0.45 < share < 0.55
    assert int(balanced.max()) < 1050 and int(balanced.min()) >= 0
