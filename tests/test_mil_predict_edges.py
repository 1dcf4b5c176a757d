"""``mil predict`` at its edges: Ctrl-C (a real SIGINT to a real process) keeps every finished
slide and every earlier prediction whole, and the pictures of a bag without QC-flagged tiles
show the bag's tiles only. Stores with planted QC scores and tile pixels: tiles 0-3 of every
slide have a pen score of 0.9 and the stores were tiled with ``qc_max_pen=0.5``."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_ssl import mil
from wsi_ssl.storage import open_store
from wsi_ssl.storage.atomic import host_name
from wsi_ssl.testing.bags import write_bag_store

ENC = "enc-predict"
N, FLAGGED, DIM, SIDE = 12, 4, 8, 32
KINDS = {
    "heatmap": ("heatmaps", "png"),
    "gallery": ("tiles", "png"),
    "geojson": ("geojson", "geojson"),
}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Six slides with tile pixels (three per class; the class is in the kept tiles' first
    dimension), and a run trained on them without the flagged tiles."""
    base = tmp_path_factory.mktemp("milpredict")
    root, rng = base / "archive", np.random.default_rng(0)
    pen = np.zeros(N, np.float32)
    pen[:FLAGGED] = 0.9
    for i in range(6):
        x = rng.normal(size=(N, DIM)).astype(np.float32)
        x[FLAGGED:, 0] += 3.0 if i % 2 else -3.0
        write_bag_store(
            root,
            f"{i:016x}",
            x,
            encoder_id=ENC,
            name=f"s{i}.svs",
            dtype="float32",
            tiles=rng.integers(0, 255, size=(N, SIDE, SIDE, 3), dtype=np.uint8),
            tile_size=SIDE,
            qc={"pen": pen},
            qc_thresholds={"qc_max_pen": 0.5},
        )
    labels = base / "labels.csv"
    labels.write_text("slide,label\n" + "".join(f"s{i}.svs,{'ab'[i % 2]}\n" for i in range(6)))
    config = mil.MILConfig(
        folds=2,
        epochs=1,
        val_fraction=0.0,
        hidden_dim=16,
        attention_dim=8,
        threads=1,
        skip_flagged_tiles=True,
    )
    mil.train(root, labels, ENC, base / "run", config)
    return root, base / "run"


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "predictions.csv", newline="", encoding="utf-8") as f:
        return {row["slide_id"]: row for row in csv.DictReader(f)}


def _files(out: Path, sid: str) -> list[Path]:
    return [out / folder / f"{sid}.{suffix}" for folder, suffix in KINDS.values()]


def _check_consistent(out: Path) -> dict[str, dict[str, str]]:
    """Every file the CSV names exists, every slide in it has its three, no temp file is left."""
    rows = _rows(out)
    for sid, row in rows.items():
        for kind in KINDS:
            assert row[kind] and (out / row[kind]).is_file(), (sid, kind, row[kind])
    left = [p.name for p in out.rglob("*") if ".tmp-" in p.name]
    assert not left, left
    return rows


def _interrupt_when(argv: list[str], ready: Callable[[], bool]) -> tuple[int, str, str]:
    """``wsi-ssl ARGV`` in a real process, sent Ctrl-C (SIGINT) as soon as ``ready()``."""
    code = "import sys; from wsi_ssl.cli.main import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not ready():
            assert proc.poll() is None, "the command ended before the point of the interrupt"
            assert time.monotonic() < deadline, "the point of the interrupt never came"
            time.sleep(0.002)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, out, err


def test_an_interrupted_first_prediction_keeps_the_slides_it_finished(archive, tmp_path) -> None:
    """Ctrl-C once the first slide's heatmap is in place: its row is in predictions.csv (there
    was none: the CSV came only at the end) and names whole files; the re-run does the rest."""
    root, run = archive
    first = open_store(root).slide_ids[0]
    out = tmp_path / "pred"
    argv = ["mil", "predict", str(run), str(root), "--out", str(out), "--json"]
    code, stdout, err = _interrupt_when(argv, (out / "heatmaps" / f"{first}.png").exists)
    assert code == 130, err
    assert "interrupted" in err.strip().splitlines()[-1]
    rows = _check_consistent(out)
    assert first in rows
    report = json.loads(stdout)  # reports what was done, as the CSV has it
    assert report["interrupted"] is True and {s["slide"] for s in report["slides"]} == set(rows)
    assert len(rows) + len(report["not_done"]) == 6
    result = mil.predict(run, root, out)
    assert result.counts["complete"] == 6
    assert len(_check_consistent(out)) == 6


def test_an_interrupted_prediction_over_earlier_ones_leaves_them_whole(archive, tmp_path) -> None:
    """Into a folder of complete predictions, Ctrl-C as the first slide's new heatmap lands
    (the old code removed its pictures first, then drew them): every slide keeps its three
    files, and every row of predictions.csv names files that exist."""
    root, run = archive
    out = tmp_path / "pred"
    assert mil.predict(run, root, out).counts["complete"] == 6
    before = _rows(out)
    first = open_store(root).slide_ids[0]
    heatmap = out / "heatmaps" / f"{first}.png"
    inode = heatmap.stat().st_ino

    def replaced() -> bool:
        try:
            return heatmap.stat().st_ino != inode
        except FileNotFoundError:
            return True

    argv = ["mil", "predict", str(run), str(root), "--out", str(out), "--quiet"]
    code, _, err = _interrupt_when(argv, replaced)
    assert code == 130, err
    rows = _check_consistent(out)
    assert set(rows) == set(before)  # the slides not done keep their earlier rows
    for sid in before:
        assert all(p.is_file() for p in _files(out, sid)), sid


def test_a_killed_prediction_leaves_no_temp_files_after_the_next(archive, tmp_path) -> None:
    """A temp picture of a process that died (SIGKILL) is swept by the next call."""
    root, run = archive
    out = tmp_path / "pred"
    (out / "heatmaps").mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / "heatmaps" / f".x.png.tmp-{dead.pid}-{host_name()}-0123abcd.png"
    stale.write_bytes(b"half a png")
    mil.predict(run, root, out, slides=["s0.svs"])
    assert not stale.exists()


def test_the_pictures_of_a_bag_without_flagged_tiles_show_its_tiles_only(archive, tmp_path) -> None:
    """The GeoJSON has a feature per tile of the bag (none for the flagged tiles, which were
    ranked among the least attended with attention 0), percentiles and ``a x N`` over the
    bag; the gallery and ``top_tiles`` hold the bag's tiles only."""
    root, run = archive
    result = mil.predict(run, root, tmp_path / "pred", top_k=16)
    assert result.counts["complete"] == 6
    bag = N - FLAGGED
    for s in result.slides:
        pred = s.prediction
        assert pred is not None and pred.attention is not None and s.geojson is not None
        features = json.loads(s.geojson.read_text())["features"]
        assert [f["properties"]["name"] for f in features] == [
            f"tile {i}" for i in range(FLAGGED, N)
        ]
        m = [f["properties"]["measurements"] for f in features]
        a = np.array([x["attention"] for x in m])
        np.testing.assert_allclose(a, pred.attention[FLAGGED:], rtol=1e-6)
        uniform = np.array([x["attention_x_uniform"] for x in m])
        np.testing.assert_allclose(uniform, a * bag, atol=1e-6)
        assert uniform.mean() == pytest.approx(1.0, abs=1e-4)
        ranks = sorted(x["attention_percentile"] for x in m)
        np.testing.assert_allclose(ranks, np.arange(bag) / (bag - 1), atol=1e-6)
        np.testing.assert_array_equal(pred.bag_tiles, np.arange(FLAGGED, N))
        # 8 tiles of the bag in rows of 4 (the flagged 4 made a third row)
        assert s.gallery is not None
        assert Image.open(s.gallery).size == (4 * (224 + 4) + 4, 2 * (224 + 20 + 4) + 4)
        top = pred.top_tiles(16)
        assert len(top) == bag and set(top.tolist()) == set(range(FLAGGED, N))


def test_a_bag_of_every_tile_keeps_every_feature(archive, tmp_path) -> None:
    """Without ``tiles`` (a bag of every tile) the GeoJSON has every tile, as before; rows
    out of the store are refused."""
    from wsi_ssl.errors import SchemaMismatchError

    root, run = archive
    store = open_store(root).slide(open_store(root).slide_ids[0])
    attention = mil.load(run).predict_slide(store).attention
    assert attention is not None
    path = mil.attention_geojson(store, attention, tmp_path / "all.geojson")
    assert len(json.loads(path.read_text())["features"]) == N
    with pytest.raises(SchemaMismatchError, match="store rows in the bag"):
        mil.attention_geojson(store, attention, tmp_path / "x.geojson", tiles=np.array([N]))


def test_the_heatmap_colours_the_bags_tiles_only(archive) -> None:
    """The heatmap coloured the QC-excluded tiles as least attended; they stay the thumbnail
    now, and the scale counts the bag (its most attended tile takes the top colour)."""
    from wsi_ssl.mil.explain import attention_overlay

    root, run = archive
    store = open_store(root).slide(open_store(root).slide_ids[0])
    pred = mil.load(run).predict_slide(store)
    assert pred.attention is not None and pred.bag_tiles is not None
    plain = attention_overlay(store, pred.attention * 0 + 1, alpha=(0.0, 0.0))  # no colour
    bag = attention_overlay(store, pred.attention, tiles=pred.bag_tiles)
    every = attention_overlay(store, pred.attention)
    h, w = plain.shape[:2]
    width, height = store.source["dimensions"]
    side = float(store.tiling["tile_size_level0"])
    for row, (x, y) in enumerate(store.coords):
        x0, y0 = int(x * w / width) + 1, int(y * h / height) + 1
        x1, y1 = int((x + side) * w / width) - 1, int((y + side) * h / height) - 1
        cell = (slice(y0, y1), slice(x0, x1))
        if row in set(pred.bag_tiles.tolist()):
            assert not np.array_equal(bag[cell], plain[cell]), row
        else:
            np.testing.assert_array_equal(bag[cell], plain[cell])  # uncoloured
            assert not np.array_equal(every[cell], plain[cell]), row  # as it was drawn
