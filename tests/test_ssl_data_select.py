"""Pretraining data that fits histology: several magnifications in one run (balanced per
scale), mixed tile sizes when crops make them uniform, skipping flat tiles, and curated
sampling from the archive's own embeddings (k-means, near duplicates, coverage plot)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import wsi_ssl
from wsi_ssl.errors import ConfigError, SchemaMismatchError
from wsi_ssl.ssl import PretrainConfig, pretrain
from wsi_ssl.ssl.curation import curate, near_duplicates
from wsi_ssl.ssl.dataset import TileDataset
from wsi_ssl.ssl.sampler import epoch_order
from wsi_ssl.ssl.selection import select_tiles
from wsi_ssl.ssl.stores import scale_groups, scan_stores
from wsi_ssl.testing.tile_stores import write_tile_store


def _textured(n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(40, 220, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def scales_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scales")
    write_tile_store(root, "x20", _textured(48, 64, 0), mpp=0.5)
    write_tile_store(root, "x10", _textured(16, 64, 1), mpp=1.0)
    tiles = _textured(16, 96, 2)
    tiles[:6] = 235  # blank glass
    write_tile_store(root / "big", "x10b", tiles, mpp=1.0)
    return root


def test_several_magnifications_need_mixed_scales(scales_root: Path) -> None:
    with pytest.raises(SchemaMismatchError, match="mixed_scales"):
        scan_stores(scales_root)
    entries = scan_stores(scales_root, mixed_scales=True)
    assert sorted(e.mpp for e in entries) == [0.5, 1.0]
    assert scale_groups(entries) == [0, 1]  # numbered in first-seen order


def test_each_scale_is_drawn_equally_often(scales_root: Path) -> None:
    entries = scan_stores(scales_root, mixed_scales=True)
    sizes = [e.n_tiles for e in entries]  # 16 and 48 tiles
    groups = scale_groups(entries)
    order = epoch_order(sizes, seed=0, epoch=0, groups=groups).numpy()
    offsets = np.cumsum([0, *sizes])
    slide = np.searchsorted(offsets, order, side="right") - 1
    share = np.bincount(slide, minlength=2) / len(order)
    assert len(order) == 64 and abs(share[0] - 0.5) < 0.15, share
    many = np.concatenate(
        [epoch_order(sizes, seed=0, epoch=e, groups=groups).numpy() for e in range(40)]
    )
    share = np.bincount(np.searchsorted(offsets, many, side="right") - 1, minlength=2) / len(many)
    np.testing.assert_allclose(share, [0.5, 0.5], atol=0.03)


def test_mixed_tile_sizes_train_only_with_per_tile_crops(scales_root: Path, tmp_path: Path) -> None:
    roots = [scales_root, scales_root / "big"]
    with pytest.raises(SchemaMismatchError, match="tile_size"):
        scan_stores(roots, mixed_scales=True)
    config = PretrainConfig.preset(
        "cpu-small",
        steps=2,
        batch_size=8,
        device="cpu",
        num_workers=0,
        num_threads=1,
        progress=False,
        mixed_scales=True,
        out_dim=64,
        hidden_dim=32,
        bottleneck_dim=16,
        global_crop_size=32,
        local_crop_size=16,
    )
    run = pretrain(roots, config.replace(augment="loader"), out=tmp_path / "loader")
    assert run.finished and set(run.sources["scales"]) == {"0.5", "1"}
    with pytest.raises(SchemaMismatchError, match="tile_size"):
        pretrain(roots, config.replace(augment="batch"), out=tmp_path / "batch")


def test_flat_tiles_are_skipped(scales_root: Path) -> None:
    entries = scan_stores(scales_root / "big")
    keep = select_tiles(entries, min_tile_std=8.0)
    assert keep is not None and keep[0].tolist() == list(range(6, 16))
    dataset = TileDataset(entries, keep=keep)
    assert len(dataset) == 10 and dataset.locate(0) == (0, 6)
    assert dataset.read_tile(0).std() > 8
    assert select_tiles(entries) is None


def test_near_duplicates_are_found() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 8)).astype(np.float32)
    x[5] = x[2] + 1e-3
    x[9] = x[2]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert np.flatnonzero(near_duplicates(x, 0.98)).tolist() == [5, 9]


@pytest.fixture(scope="module")
def embedded_root(cmu_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from wsi_ssl.embedding.config import EmbedConfig

    root = tmp_path_factory.mktemp("cmu_embedded")
    wsi_ssl.tile_slide(cmu_small, root, wsi_ssl.TilingConfig(tile_size=64, tiles_per_chunk=32))
    from wsi_ssl.encoders import create_encoder

    encoder = create_encoder("random-cnn", input_size=64)
    summary = wsi_ssl.embed(root, encoder, EmbedConfig(batch_size=64, device="cpu", workers=0))
    assert not summary.failed, summary.failed
    return root


def test_curation_samples_clusters_evenly_and_trains(embedded_root: Path, tmp_path: Path) -> None:
    # random-init CNN features are close to each other: only exact-ish repeats are duplicates
    result = curate(
        embedded_root, tmp_path / "curated.json", n_tiles=60, n_clusters=6, dedup_threshold=0.9999
    )
    assert result.n_selected == 60 and result.n_unique <= result.n_tiles
    assert result.plot.read_bytes()[:4] == b"\x89PNG"
    per_cluster = result.selected_per_cluster
    full = [q for q, size in zip(per_cluster, result.cluster_sizes, strict=True) if q < size]
    assert len(set(full)) <= 1 or max(full) - min(full) <= 1  # clusters not exhausted: equal
    data = json.loads(result.path.read_text())
    assert sum(len(v) for v in data["slides"].values()) == 60
    config = PretrainConfig.preset(
        "cpu-small",
        steps=2,
        batch_size=8,
        device="cpu",
        num_workers=0,
        num_threads=1,
        progress=False,
        curation=str(result.path),
    )
    run = pretrain(embedded_root, config, out=tmp_path / "run")
    assert run.finished and run.sources["n_selected"] == 60


def test_curate_cli_writes_a_selection_that_pretrain_trains_on(
    embedded_root: Path, tmp_path: Path
) -> None:
    from tests.conftest import run_cli

    out = tmp_path / "sel" / "curated.json"
    argv = ["curate", str(embedded_root), "--out", str(out), "--n-tiles", "40"]
    code, stdout, _ = run_cli([*argv, "--n-clusters", "4", "--dedup-threshold", "0.9999"])
    assert code == 0, stdout
    assert "selected 40 of " in stdout and str(out) in stdout
    data = json.loads(out.read_text())
    assert data["format"] == "wsi_ssl.curation" and data["n_selected"] == 40
    assert sum(len(v) for v in data["slides"].values()) == 40
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    # the same selection as the Python API with the same settings
    api = curate(
        embedded_root, tmp_path / "api.json", n_tiles=40, n_clusters=4, dedup_threshold=0.9999
    )
    assert json.loads(api.path.read_text())["slides"] == data["slides"]
    code, stdout, _ = run_cli(
        [*argv[:3], str(tmp_path / "j.json"), "--n-tiles", "8", "--no-dedup", "--json"]
    )
    assert code == 0 and json.loads(stdout)["n_selected"] == 8
    code, stdout, _ = run_cli(
        ["pretrain", str(embedded_root), "--out", str(tmp_path / "run"), "--preset", "cpu-small",
         "--steps", "1", "--batch-size", "8", "--device", "cpu", "--num-workers", "0", "--quiet",
         "--json", "--curation", str(out)]
    )  # fmt: skip
    assert code == 0 and json.loads(stdout)["step"] == 1


def test_curating_more_than_the_unique_tiles_says_why(embedded_root: Path, tmp_path: Path) -> None:
    """A loose duplicate threshold leaves few unique tiles: the selection says why it is short
    and that its clusters are rough, in a note, not in FAISS's warning on stderr."""
    out = tmp_path / "few.json"
    argv = ["curate", str(embedded_root), "--out", str(out), "--n-tiles", "500"]
    done = subprocess.run(
        [sys.executable, "-m", "wsi_ssl.cli.main", *argv, "--dedup-threshold", "0.5"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    data = json.loads(out.read_text())
    assert data["n_unique"] < 500 and data["n_selected"] == data["n_unique"]
    short, rough, fewer = data["notes"]
    assert fewer == f"16 clusters were asked for; {data['n_unique']} unique tiles make " + str(
        data["n_clusters"]
    )
    assert short.startswith(f"500 tiles were asked for, but only {data['n_unique']} of the ")
    assert "near duplicates (cosine similarity >= 0.5)" in short
    assert rough.startswith(f"k-means clustered {data['n_unique']} tiles into ")
    assert f"note: {short}" in done.stdout and f"note: {rough}" in done.stdout
    plenty = curate(
        embedded_root, tmp_path / "ok.json", n_tiles=20, n_clusters=2, dedup_threshold=None
    )
    assert plenty.n_selected == 20 and plenty.notes == []
    many = curate(embedded_root, tmp_path / "k.json", n_tiles=20, n_clusters=10**5)
    assert many.n_clusters == many.n_unique < 10**5
    assert many.notes[-1] == (
        f"100000 clusters were asked for; {many.n_unique} unique tiles make {many.n_clusters}"
    )
    with pytest.raises(ConfigError, match=r"name it \*\.json"):
        curate(embedded_root, tmp_path / "c.txt", n_tiles=20)
    assert not (tmp_path / "c.png").exists()


def test_curate_cli_bad_input_is_one_line(embedded_root: Path, tmp_path: Path) -> None:
    from tests.conftest import run_cli

    code, _, err = run_cli(
        ["curate", str(embedded_root), "--out", str(tmp_path / "a.json"), "--n-tiles", "0"]
    )
    assert code == 2 and err.count("\n") == 1
    assert "n_tiles and n_clusters must be >= 1" in err and "--n-tiles" in err
    code, _, err = run_cli(
        ["curate", str(tmp_path), "--out", str(tmp_path / "b.json"), "--n-tiles", "5"]
    )
    assert code == 2 and err.startswith("wsi-ssl: error: ") and err.count("\n") == 1
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "b.json").exists()


def test_coverage_counts_order_clusters_largest_first(embedded_root: Path, tmp_path: Path) -> None:
    """What the coverage plot draws: clusters largest first, each with its tiles, unique
    tiles and selected tiles, adding up to the curation's own counts."""
    from wsi_ssl.ssl.curation import coverage_counts

    labels = np.array([2, 2, 2, 0, 1, 1, 2, 0])
    counts = coverage_counts(labels, np.array([0, 1, 3, 4, 6]), np.array([0, 3, 4]), 3)
    assert counts["cluster"].tolist() == [2, 0, 1] and counts["all"].tolist() == [4, 2, 2]
    assert counts["unique"].tolist() == [3, 1, 1] and counts["selected"].tolist() == [1, 1, 1]
    result = curate(embedded_root, tmp_path / "c.json", n_tiles=30, n_clusters=6)
    sizes = sorted(result.cluster_sizes, reverse=True)
    assert sum(sizes) == result.n_tiles and sum(result.selected_per_cluster) == 30
    picture = np.asarray(Image.open(result.plot).convert("RGB")).astype(int)
    orange = np.all(np.abs(picture - [255, 127, 14]) < 30, axis=-1)  # tab:orange: the selection
    assert picture.shape == (450, 1100, 3) and orange.sum() > 200
