"""`wsi-ssl demo`, the README's main job: every stage runs, writes its picture, and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_ssl.cli.main import main
from wsi_ssl.demo import DEMO_SLIDES, demo_slides
from wsi_ssl.storage import open_store

STAGES = ["== tile", "== pretrain", "== embed", "== search", "== MIL"]


def _picture(path: Path) -> np.ndarray:
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 5  # drawn, not blank
    return image


@pytest.mark.slow
def test_demo_slides_are_labelled_by_their_lesion(tmp_path: Path) -> None:
    labels = demo_slides(tmp_path)
    assert len(labels) == DEMO_SLIDES
    assert sorted(set(labels.values())) == ["normal", "tumour"]
    assert sum(v == "tumour" for v in labels.values()) == DEMO_SLIDES // 2
    mtimes = {p: p.stat().st_mtime_ns for p in labels}
    assert demo_slides(tmp_path) == labels  # written once
    assert {p: p.stat().st_mtime_ns for p in labels} == mtimes


@pytest.mark.slow
def test_demo_runs_every_stage_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--out", "demo", "--steps", "4", "--quiet"]) == 0
    out = tmp_path / "demo"
    printed = capsys.readouterr().out
    pictures = [line for line in printed.splitlines() if line.startswith("picture: ")]
    assert pictures and all(p.startswith("picture: demo/") for p in pictures), pictures
    positions = [printed.index(stage) for stage in STAGES]
    assert positions == sorted(positions)

    archive = open_store(out / "archive")
    assert len(archive.slide_ids) == DEMO_SLIDES
    [encoder_id] = archive.embedding_ids(archive.slide_ids[0])
    emb = archive.embeddings(archive.slide_ids[0], encoder_id)
    assert emb.features.shape[0] == len(archive.coords(archive.slide_ids[0]))

    for picture in ("pretrain/loss.png", "gallery.png", "mil/run/roc.png"):
        _picture(out / picture)
    heatmaps = sorted((out / "mil/run/predictions/heatmaps").glob("*.png"))
    assert len(heatmaps) == DEMO_SLIDES
    metrics = json.loads((out / "mil/run/metrics.json").read_text())
    assert 0.0 <= metrics["overall"]["auc"] <= 1.0
    # the scores are out-of-fold; the predictions of the training slides are marked in-sample
    assert f"overall (abmil, out-of-fold, {DEMO_SLIDES} slides): AUC" in printed
    in_sample = [x for x in printed.splitlines() if x.endswith("(in-sample: a training slide)")]
    assert len(in_sample) == DEMO_SLIDES

    # a second run resumes: nothing is tiled, trained or embedded again
    trained = (out / "mil/run/run.json").read_bytes()
    assert main(["demo", "--out", str(out), "--steps", "4", "--quiet"]) == 0
    again = capsys.readouterr().out
    assert f"0 embedded, {DEMO_SLIDES} already complete" in again
    assert "4/4 steps" in again and "resumed" in again
    assert f"MIL run {out / 'mil/run'} is up to date" in again
    assert (out / "mil/run/run.json").read_bytes() == trained  # not trained again
    assert archive.embedding_ids(archive.slide_ids[0]) == [encoder_id]


@pytest.mark.slow
def test_demo_on_a_real_slide_without_labels_skips_mil(
    cmu_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    assert main(["demo", str(cmu_small), "--out", str(out), "--steps", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "CMU-1-Small-Region.svs" in printed and "complete" in printed
    assert "skipped: give labels (a CSV" in printed
    _picture(out / "gallery.png")
    _picture(out / "CMU-1-Small-Region_tiles.png")


def test_demo_on_a_missing_slide_says_so_and_stops(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nosuch.svs"
    assert main(["demo", str(missing), "--out", str(tmp_path / "demo"), "--quiet"]) == 1
    printed = capsys.readouterr().out
    assert f"FAILED {missing}: {missing}: no such slide file" in printed
    assert "no slide was tiled" in printed and "== pretrain" not in printed
    assert "archive:" not in printed  # none was made


def test_demo_with_no_slide_tiled_shows_no_archive(
    slides_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A slide without a scale is not tiled: the demo printed "archive: OUT/archive" (a
    folder with no slide in it) under the FAILED line; it says why and stops, exit 1."""
    boxes = slides_dir / "boxes.tiff"
    assert main(["demo", str(boxes), "--out", str(tmp_path / "d"), "--quiet"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "== tile" and lines[1].startswith(f"  FAILED {boxes}: {boxes}: no ")
    assert lines[1].endswith("; set it with --mpp-override MPP")
    assert lines[2:] == [
        "  no slide was tiled (the FAILED line says why); the later stages need at least one"
    ]


def test_demo_inputs_are_checked_before_any_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Labels without slides (the demo's own come labelled), and no pretraining steps, are
    refused before anything is written."""
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\na.svs,x\n")
    out = tmp_path / "demo"
    assert main(["demo", "--labels", str(labels), "--out", str(out), "--quiet"]) == 2
    assert "labels are for your own slides" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--steps", "0", "--out", str(out)])
    assert exit_.value.code == 2 and "expected a whole number >= 1" in capsys.readouterr().err
    assert not out.exists()


def test_demo_words_a_failed_slide_with_its_own_flags(
    slides_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A slide without a scale: the demo's FAILED line advises its own --mpp-override (it said
    mpp_override=MPP, and the demo had no such flag); the flag is taken."""
    boxes = slides_dir / "boxes.tiff"
    assert main(["demo", str(boxes), "--out", str(tmp_path / "demo"), "--quiet"]) == 1
    printed = capsys.readouterr().out
    assert "set it with --mpp-override MPP" in printed and "mpp_override=" not in printed
    argv = ["demo", str(boxes), "--out", str(tmp_path / "d2"), "--quiet", "--steps", "1"]
    main([*argv, "--mpp-override", "1.0", "--tissue-threshold", "0.95"])
    printed = capsys.readouterr().out
    assert "set it with --mpp-override" not in printed  # scaled: it got past the scale
    assert "no tile has at least 95% tissue" in printed  # the threshold taken too
    assert "lower tissue_threshold (tissue pieces" in printed  # and named by its flag:
    assert "(command line: --tissue-threshold)" in printed
