"""A learning check that can fail: DINO features of the CPU backbone, trained for a few hundred
steps on the tiles of a real H&E slide, against the same architecture at random init.

The labelled set: 64-pixel tiles (0.5 µm/px) cut from regions of CMU-1-Small-Region (skin)
read off its thumbnail: epidermis (dense nuclei, keratinocytes) and dermis (collagen, sparse
nuclei). Each tile gets a random H&E stain shift of the kind that separates slides from
different labs, so that colour alone does not give the class away: the features have to
capture tissue structure and ignore stain, which is what DINO with histology augmentations
should learn and a random network cannot do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import wsi_ssl
from wsi_ssl.ssl import PretrainConfig, evaluate, load_encoder, pretrain, random_encoder
from wsi_ssl.ssl.transforms import hed_jitter

# (column, row) of 200 x 200 level-0 cells, read off the slide's thumbnail
REGIONS = {
    "epidermis": [(6, 9), (6, 10), (5, 10), (4, 10), (4, 11), (3, 13), (3, 14), (8, 12), (8, 13), (5, 4), (6, 5)],
    "dermis": [(4, 6), (4, 7), (4, 8), (3, 9), (3, 10), (3, 11), (4, 12), (5, 12), (5, 13), (6, 13), (7, 11), (8, 10)],
}  # fmt: skip
CELL, TILE, STAIN_SHIFT = 200, 64, 0.15


@pytest.fixture(scope="module")
def cmu_root(cmu_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cmu64")
    wsi_ssl.tile_slide(cmu_small, root, wsi_ssl.TilingConfig(tile_size=64, tiles_per_chunk=32))
    return root


@pytest.fixture(scope="module")
def labelled(cmu_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder per class of stain-shifted real tiles (3 x 3 tiles per cell)."""
    from wsi_ssl.slide import open_slide

    out = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(0)
    with open_slide(cmu_small) as reader:
        for name, cells in REGIONS.items():
            (out / name).mkdir()
            for cx, cy in cells:
                region = reader.read_region((cx * CELL, cy * CELL), 0, (CELL, CELL))
                for i in range(3):
                    for j in range(3):
                        tile = region[
                            4 + j * TILE : 4 + (j + 1) * TILE, 4 + i * TILE : 4 + (i + 1) * TILE
                        ]
                        alpha = rng.uniform(1 - STAIN_SHIFT, 1 + STAIN_SHIFT, 3)
                        beta = rng.uniform(-STAIN_SHIFT, STAIN_SHIFT, 3)
                        shifted = hed_jitter(tile, alpha, beta).astype(np.float32)
                        shifted *= rng.uniform(0.8, 1.2)  # and brightness
                        Image.fromarray(np.clip(shifted, 0, 255).astype(np.uint8)).save(
                            out / name / f"{cx}_{cy}_{i}{j}.png"
                        )
    return out


def test_labelled_set_is_balanced_and_not_trivial(labelled: Path) -> None:
    counts = {d.name: len(list(d.glob("*.png"))) for d in labelled.iterdir()}
    assert counts == {"epidermis": 99, "dermis": 108}


@pytest.mark.slow
def test_dino_features_beat_random_initialisation(
    cmu_root: Path, labelled: Path, tmp_path: Path
) -> None:
    config = PretrainConfig.preset(
        "cpu-small", steps=250, device="cpu", num_workers=0, num_threads=1, progress=False
    )
    run = pretrain(cmu_root, config, out=tmp_path / "run")
    losses = [r["loss"] for r in run.history]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])  # the loss went down
    trained = evaluate(load_encoder(run.out_dir), labelled)
    baselines = [evaluate(random_encoder(config, seed=s), labelled) for s in range(3)]
    best_random = max(b.knn_accuracy for b in baselines)
    report = (
        f"trained k-NN {trained.knn_accuracy:.3f} linear {trained.linear_accuracy:.3f}; random "
        f"k-NN {[round(b.knn_accuracy, 3) for b in baselines]} linear "
        f"{[round(b.linear_accuracy, 3) for b in baselines]}; chance {trained.chance:.3f}"
    )
    print(report)
    assert trained.knn_accuracy >= best_random + 0.05, report
    assert trained.knn_accuracy >= trained.chance + 0.2, report
