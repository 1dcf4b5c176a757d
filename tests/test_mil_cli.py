"""``wsi-ssl mil train`` / ``mil predict`` end to end on real slide stores (synthetic slides,
tiled and embedded by the pipeline), the run files, and refusing what a run cannot use."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from wsi_ssl import mil
from wsi_ssl.config import TilingConfig
from wsi_ssl.embedding import embed
from wsi_ssl.encoders import create_encoder
from wsi_ssl.errors import EmptyBagError, EncoderMismatchError, LabelsError
from wsi_ssl.storage import open_store
from wsi_ssl.synthetic import write_synthetic_slide
from wsi_ssl.testing.bags import write_bag_store
from wsi_ssl.tiling.batch import tile_slides

SMALL = ["--hidden-dim", "32", "--attention-dim", "16", "--threads", "1", "--device", "cpu"]
LABELS = {"s1.tiff": "pen", "s2.tiff": "pen", "s3.tiff": "clean", "s4.tiff": "clean"}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Four synthetic slides (two with a pen stroke), tiled at 224 px and embedded with
    random-cnn; and the labels CSV naming them by file name."""
    base = tmp_path_factory.mktemp("milcli")
    paths = [
        write_synthetic_slide(base / f"s{i}.tiff", (1400, 1100), seed=i, pen_mark=i <= 2)
        for i in range(1, 5)
    ]
    root = base / "archive"
    config = TilingConfig(tile_size=224, codec="zstd", tiles_per_chunk=16, tissue_threshold=0.0)
    assert not tile_slides(paths, root, config, progress=False).failed
    summary = embed(root, "random-cnn", batch_size=32, device="cpu", workers=0)
    assert not summary.failed
    labels = base / "labels.csv"
    labels.write_text("slide,label\n" + "".join(f"{s},{y}\n" for s, y in LABELS.items()))
    return root, labels


@pytest.fixture(scope="module")
def run(archive: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root, labels = archive
    out = tmp_path_factory.mktemp("runs") / "abmil"
    code, stdout, err = run_cli(
        [
            *("mil", "train", str(root), "--labels", str(labels), "--encoder", "random-cnn"),
            *("--out", str(out), "--folds", "2", "--epochs", "3", *SMALL),
        ]
    )
    assert code == 0, err
    assert "overall (abmil, out-of-fold, 4 slides)" in stdout
    assert f"(run id {mil.load(out).run_id};" in stdout  # as predictions.csv names it
    return out


def test_train_writes_the_run(run: Path) -> None:
    for name in ("run.json", "metrics.json", "roc.png", "splits.csv", "predictions.csv"):
        assert (run / name).is_file(), name
    info = json.loads((run / "run.json").read_text())
    assert info["encoder_id"].startswith("random-cnn-")
    assert info["encoder"]["name"] == "random-cnn" and info["in_dim"] == 64
    assert info["classes"] == ["clean", "pen"] and info["n_folds"] == 2
    assert info["config"]["model"] == "abmil" and info["config"]["seed"] == 0
    assert info["seeds"] == {"split": 0, "folds": [0, 1]}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["positive_class"] == "pen"
    for block in (metrics["overall"], *(f["test"] for f in metrics["folds"])):
        assert {"auc", "balanced_accuracy", "f1", "confusion_matrix"} <= set(block)
    assert np.array(metrics["overall"]["confusion_matrix"]).sum() == 4
    assert set(metrics["folds_mean_std"]) >= {"auc", "balanced_accuracy", "f1"}
    ckpt = torch.load(run / "folds" / "fold_0" / "model.pt", weights_only=True)
    assert ckpt["encoder_id"] == info["encoder_id"] and ckpt["config"] == info["config"]
    assert ckpt["classes"] == ["clean", "pen"] and "state_dict" in ckpt
    with Image.open(run / "roc.png") as roc:
        assert roc.format == "PNG" and min(roc.size) > 300
    rows = list(csv.DictReader((run / "predictions.csv").open()))
    assert sorted(r["name"] for r in rows) == sorted(LABELS)
    for r in rows:
        assert float(r["prob_clean"]) + float(r["prob_pen"]) == pytest.approx(1.0, abs=1e-5)
    assert not list(run.parent.glob(".*.partial"))


def test_predict_writes_probabilities_heatmaps_galleries_and_geojson(
    run: Path, archive: tuple[Path, Path], tmp_path: Path
) -> None:
    root, _ = archive
    code, stdout, err = run_cli(
        ["mil", "predict", str(run), str(root), "--out", str(tmp_path), "--json"]
    )
    assert code == 0, err
    summary = json.loads(stdout)
    assert len(summary["slides"]) == 4 and summary["failed"] == 0 and summary["errors"] == []
    assert {s["status"] for s in summary["slides"]} == {"complete"}
    assert sorted(s["name"] for s in summary["slides"]) == sorted(LABELS)
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert sorted(r["name"] for r in rows) == sorted(LABELS)
    model = mil.load(run)
    archive_ = open_store(root)
    for r in rows:
        assert float(r["prob_clean"]) + float(r["prob_pen"]) == pytest.approx(1.0, abs=1e-5)
        store = archive_.slide(r["slide_id"])
        assert int(r["n_tiles"]) == store.n_tiles
        with Image.open(tmp_path / r["heatmap"]) as im:
            assert im.format == "PNG" and min(im.size) >= 300
        with Image.open(tmp_path / r["gallery"]) as im:
            assert im.size[0] == 4 * (224 + 4) + 4
        doc = json.loads((tmp_path / r["geojson"]).read_text())
        assert doc["type"] == "FeatureCollection" and len(doc["features"]) == store.n_tiles
        side = store.tiling["tile_size_level0"]
        width, height = store.source["dimensions"]
        attention = []
        for feature, (x, y) in zip(doc["features"], store.coords.tolist(), strict=True):
            ring = feature["geometry"]["coordinates"][0]
            assert ring[0] == ring[-1] == [x, y] and ring[2] == [x + side, y + side]
            assert 0 <= x < width and 0 <= y < height
            props = feature["properties"]
            assert props["objectType"] == "tile" and len(props["color"]) == 3
            attention.append(props["measurements"]["attention"])
        assert sum(attention) == pytest.approx(1.0, abs=1e-4)
        pred = model.predict_slide(store)  # the API gives what the files say
        np.testing.assert_allclose(attention, pred.attention, rtol=1e-5, atol=1e-9)
        assert doc["wsi_ssl"]["predicted"] == r["predicted"] == pred.label


def test_a_run_refuses_another_encoders_embeddings(
    run: Path, archive: tuple[Path, Path], tmp_path: Path
) -> None:
    root, _ = archive
    other = tmp_path / "other"
    shutil.copytree(root, other)
    for d in other.glob("slides/*.zarr/embeddings"):
        shutil.rmtree(d)
    enc = create_encoder("random-cnn", seed=1)
    embed(other, enc, batch_size=32, device="cpu", workers=0)
    code, out, err = run_cli(["mil", "predict", str(run), str(other)])
    assert code == 2 and out == "" and err.count("\n") == 1
    assert enc.encoder_id in err and "trained on" in err
    model = mil.load(run)
    store = open_store(other).slide(open_store(other).slide_ids[0])
    with pytest.raises(EncoderMismatchError, match="trained"):
        model.predict_slide(store)
    with pytest.raises(EncoderMismatchError, match=r"D=32 but run .* takes D=64"):
        model.predict(np.zeros((5, 32), np.float32))
    with pytest.raises(EncoderMismatchError, match=enc.encoder_id):
        model.predict(np.zeros((5, 64), np.float32), encoder_id=enc.encoder_id)
    with pytest.raises(EmptyBagError, match="0 tiles"):
        model.predict(np.zeros((0, 64), np.float32))


def test_predictions_into_one_folder_add_up_and_another_runs_are_refused(
    run: Path, archive: tuple[Path, Path], tmp_path: Path
) -> None:
    """Two calls into one folder (two slides, then the other two): the CSV holds the four,
    the second call's rows replacing none of the first's; the text report has a header.
    A folder holding another run's predictions (other classes) is refused before any work."""
    root, _ = archive
    out = tmp_path / "preds"
    argv = ["mil", "predict", str(run), str(root), "--out", str(out), "--no-explain", "--quiet"]
    code, first, err = run_cli([*argv, "--slides", "s1.tiff", "s3.tiff"])
    assert code == 0, err
    header, row = first.splitlines()[:2]
    assert header.split() == ["predicted", "probabilities", "tiles", "slide"]
    for name in ("probabilities", "slide"):  # each column's name stands over its column
        assert row[header.index(name)] != " " and row[header.index(name) - 1] == " ", first
    assert header.index("tiles") + len("tiles") == row.index(" tiles") + len(" tiles")
    assert first.splitlines()[-1].endswith("predictions.csv")  # no pictures claimed
    before = {r["name"]: r for r in csv.DictReader((out / "predictions.csv").open())}
    assert sorted(before) == ["s1.tiff", "s3.tiff"]
    code, _, err = run_cli([*argv, "--slides", "s2.tiff", "s4.tiff", "s1.tiff"])
    assert code == 0, err
    after = {r["name"]: r for r in csv.DictReader((out / "predictions.csv").open())}
    assert sorted(after) == sorted(LABELS)
    assert after["s3.tiff"] == before["s3.tiff"]  # kept as it was
    assert after["s1.tiff"]["prob_pen"] == before["s1.tiff"]["prob_pen"]  # same run, same bag
    # s3 loses its embeddings (as a re-tile with --discard-embeddings leaves it): predicting it
    # again fails, and its earlier row goes, as it no longer describes the slide
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    sid = after["s3.tiff"]["slide_id"]
    shutil.rmtree(open_store(copy).store_path(sid) / "embeddings")
    code, _, _ = run_cli([*argv[:3], str(copy), *argv[4:], "--slides", "s3.tiff"])
    assert code == 1
    rows = {r["name"]: r for r in csv.DictReader((out / "predictions.csv").open())}
    assert sorted(rows) == ["s1.tiff", "s2.tiff", "s4.tiff"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "predictions.csv").write_text("slide_id,name,n_tiles,predicted,prob_a,prob_b\n")
    code, stdout, err = run_cli(["mil", "predict", str(run), str(root), "--out", str(other)])
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert "holds predictions with other columns" in err and "--out" in err
    assert sorted(p.name for p in other.iterdir()) == ["predictions.csv"]
    # another run of the same classes (trained with another seed) into the same folder:
    # refused, as its rows and pictures would mix with this run's
    run_id = mil.load(run).run_id
    assert {r["run"] for r in rows.values()} == {run_id}
    second = tmp_path / "second-run"
    code, _, err = run_cli(
        [*("mil", "train", str(root), "--labels", str(archive[1]), "--out", str(second)),
         *("--folds", "2", "--epochs", "1", "--seed", "8", *SMALL)]
    )  # fmt: skip
    assert code == 0, err
    written = (out / "predictions.csv").read_bytes()
    code, stdout, err = run_cli(["mil", "predict", str(second), str(root), "--out", str(out)])
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert f"holds predictions of another run ({run_id};" in err and run_id.startswith("abmil@")
    assert (out / "predictions.csv").read_bytes() == written
    # the same run moved elsewhere is the same run: its folder takes its predictions again,
    # and a CSV written before rows named their run is taken as the run's own there
    moved = tmp_path / "moved-run"
    shutil.copytree(run, moved)
    code, _, err = run_cli([*argv[:2], str(moved), *argv[3:5], str(out), *argv[6:]])
    assert code == 0, err
    own = moved / "predictions"
    own.mkdir(exist_ok=True)
    header = "slide_id,name,n_tiles,predicted,prob_clean,prob_pen,heatmap,gallery,geojson"
    (own / "predictions.csv").write_text(f"{header}\nold-slide,old.tiff,3,pen,0.1,0.9,,,\n")
    code, _, err = run_cli(["mil", "predict", str(moved), str(root), "--slides", "s1.tiff"])
    assert code == 0, err
    kept = {r["slide_id"]: r for r in csv.DictReader((own / "predictions.csv").open())}
    moved_id = mil.load(moved).run_id
    assert moved_id == f"moved-run@{run_id.split('@')[1]}"  # the same run, found elsewhere
    assert kept["old-slide"]["run"] == moved_id and kept["old-slide"]["note"] == ""
    assert len(kept) == 2


def test_predict_reports_an_empty_bag_and_goes_on(
    run: Path, archive: tuple[Path, Path], tmp_path: Path
) -> None:
    root, _ = archive
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    model = mil.load(run)
    write_bag_store(
        copy, "0" * 16, np.zeros((0, 64)), encoder_id=model.encoder_id, name="blank.tiff"
    )
    code, out, err = run_cli(["mil", "predict", str(run), str(copy), "--no-explain", "--quiet"])
    assert code == 1
    assert err.count("\n") == 1 and "blank.tiff" in err and "0 tiles" in err
    assert "4 slide(s) predicted, 1 failed" in out
    # the failed slide's outcome line carries its error (the library builds the text)
    assert "failed" in out and "EmptyBagError" in out
    result = mil.predict(run, copy, tmp_path / "api", explain=False)
    [failed] = result.failed
    assert failed.slide == "0" * 16 and failed.details["name"] == "blank.tiff"
    assert isinstance(failed.exception, EmptyBagError) and result.exit_code == 1
    assert result.counts == {"complete": 4, "skipped": 0, "busy": 0, "failed": 1}
    assert [o.n_tiles > 0 for o in result.outcomes if o.status == "complete"] == [True] * 4


def test_an_existing_run_is_not_overwritten(run: Path, archive: tuple[Path, Path]) -> None:
    root, labels = archive
    argv = ["mil", "train", str(root), "--labels", str(labels), "--out", str(run), "--folds", "2"]
    code, _, err = run_cli(argv)
    # the library says overwrite=True; the CLI spells it --overwrite and names --out
    assert code == 2 and "pass --overwrite or another out (command line: --out)" in err, err


def test_overwrite_replaces_only_a_run_and_never_the_archive(
    archive: tuple[Path, Path], tmp_path: Path
) -> None:
    """``--overwrite`` with ``--out`` naming the archive itself, a folder above it, or a
    folder that is not a run is refused and deletes nothing (it wiped them all)."""
    root, labels = archive
    copy = shutil.copytree(root, tmp_path / "arch")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("important")
    before = sorted(p.name for p in copy.iterdir())
    argv = ["mil", "train", str(copy), "--labels", str(labels), "--folds", "2", "--overwrite"]
    for out, said in ((copy, "holds the archive"), (tmp_path, "holds the archive"),
                      (precious, "is not a MIL run (no run.json)")):  # fmt: skip
        code, _, err = run_cli([*argv, "--out", str(out), *SMALL])
        assert code == 2 and f"wsi-ssl: error: {out}: {said}" in err, err
    assert sorted(p.name for p in copy.iterdir()) == before
    assert (precious / "thesis.txt").read_text() == "important"


def test_predict_names_a_missing_run_folder_apart_from_a_folder_without_a_run(
    archive: tuple[Path, Path], tmp_path: Path
) -> None:
    root, _ = archive
    missing, empty = tmp_path / "nope", tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(["mil", "predict", str(missing), str(root)])
    assert code == 2 and f"{missing}: no such folder; give the folder a `wsi-ssl mil" in err
    code, _, err = run_cli(["mil", "predict", str(empty), str(root)])
    assert code == 2 and f"{empty}: no run.json; not a `wsi-ssl mil train` run" in err


def test_training_is_seeded_whatever_reads_the_bags(
    archive: tuple[Path, Path], tmp_path: Path
) -> None:
    """Same seed, same run: bags read in the main process or by a worker process, each
    epoch subsampling bags to 10 tiles."""
    root, labels = archive
    runs = []
    for name, workers in (("a", "0"), ("b", "1")):
        argv = ["mil", "train", str(root), "--labels", str(labels), "--out", str(tmp_path / name)]
        argv += ["--folds", "2", "--epochs", "2", "--seed", "7", "--max-tiles", "10"]
        code, _, err = run_cli([*argv, "--workers", workers, *SMALL])
        assert code == 0, err
        runs.append((tmp_path / name / "predictions.csv").read_text())
    assert runs[0] == runs[1]
    assert json.loads((tmp_path / "a" / "run.json").read_text())["config"]["seed"] == 7


@pytest.mark.parametrize("model", ["transmil", "meanpool", "retrieval"])
def test_other_models_train_and_predict(
    model: str, archive: tuple[Path, Path], tmp_path: Path
) -> None:
    root, labels = archive
    out = tmp_path / model
    code, stdout, err = run_cli(
        [
            *("mil", "train", str(root), "--labels", str(labels), "--out", str(out)),
            *("--model", model, "--folds", "2", "--epochs", "2", "--n-heads", "4", "--k", "1"),
            *SMALL,
        ]
    )
    assert code == 0, err
    assert f"overall ({model}" in stdout
    result = mil.predict(out, root, tmp_path / "pred")
    assert len(result.slides) == 4 and not result.failed
    for s in result.slides:
        assert sum(s.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        if model == "retrieval":
            assert s.heatmap is None and s.prediction.neighbours
        elif model == "meanpool":  # weighs no tile: no attention, no pictures, and says so
            assert s.prediction.attention is None and s.heatmap is None and s.gallery is None
        else:
            assert s.heatmap is not None and s.heatmap.is_file()
    if model in ("meanpool", "retrieval"):
        assert not (tmp_path / "pred" / "heatmaps").exists()
        note = f"no heatmaps or galleries: a {model} run weighs no tile above another"
        assert note in result.lines()


def test_demo_function(archive: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = archive
    result = mil.mil_for_demo(root, LABELS, tmp_path / "demo")
    assert result.heatmap is not None and result.heatmap.is_file()
    assert (result.run / "metrics.json").is_file()
    assert any(line.startswith("overall (abmil") for line in result.lines)
    assert result.pictures[0].name == "roc.png"
    # a labelled slide that failed to tile: the demo leaves it out and names it (it stopped,
    # advising skip_missing=True, which `wsi-ssl demo` has no flag for)
    failed = {**LABELS, "failed.svs": "clean"}
    with pytest.raises(LabelsError, match="skip_missing=True"):
        mil.mil_for_demo(root, failed, tmp_path / "strict")
    kept = mil.mil_for_demo(root, failed, tmp_path / "demo2", skip_missing=True)
    assert any("failed.svs" in line for line in kept.lines), kept.lines
    assert kept.metrics["overall"] == result.metrics["overall"]  # the same four slides


def test_predictions_of_training_slides_and_other_tilings_carry_a_note(
    run: Path, archive: tuple[Path, Path], tmp_path: Path
) -> None:
    """The run records its training slides and their tiling: predicting a training slide is
    marked in-sample, a slide tiled at another scale says so, in the CSV and the report."""
    root, _ = archive
    info = json.loads((run / "run.json").read_text())
    assert info["tilings"] == [{"mpp": 0.5, "tile_size": 224}]
    assert len(info["training_slides"]) == 4
    other = tmp_path / "other"
    slide = write_synthetic_slide(tmp_path / "s5.tiff", (1400, 1100), seed=5)
    config = TilingConfig(tile_size=224, mpp=1.0, codec="zstd", tissue_threshold=0.0)
    assert not tile_slides([slide], other, config, progress=False).failed
    assert not embed(other, "random-cnn", batch_size=32, device="cpu", workers=0).failed
    out = tmp_path / "preds"
    code, stdout, err = run_cli(["mil", "predict", str(run), str(other), "--out", str(out)])
    assert code == 0, err
    [line] = [x for x in stdout.splitlines() if "s5.tiff" in x]
    assert line.endswith("(tiled at 1 µm/px 224 px; the run was trained on 0.5 µm/px 224 px)")
    first = tmp_path / "first"
    result = mil.predict(run, root, first, slides=["s1.tiff", "s3.tiff"], explain=False)
    assert all(s.note == "in-sample: a training slide" for s in result.slides)
    assert result.lines()[-1] == (
        f"2 slide(s) predicted in-sample (the models were trained on them); the run's "
        f"out-of-fold predictions of its training slides are in {run}/predictions.csv"
    )
    rows = list(csv.DictReader((first / "predictions.csv").open()))
    assert [r["note"] for r in rows] == [s.note for s in result.slides]
    [s5] = list(csv.DictReader((out / "predictions.csv").open()))
    assert s5["note"].startswith("tiled at 1 µm/px")
    # one fold's model never saw its own test fold: those slides are not in-sample for it
    folds = json.loads((run / "run.json").read_text())["training_slides"]
    one = mil.predict(mil.load(run, fold=0), root, tmp_path / "fold0", explain=False)
    for s in one.slides:
        assert (s.note == "in-sample: a training slide") == (folds[s.slide_id] != 0), s.note
    # a later prediction without pictures removes the earlier ones of its slides
    pictures = mil.predict(run, root, tmp_path / "pics", slides=["s2.tiff"])
    [heatmap] = [s.heatmap for s in pictures.slides]
    assert heatmap is not None and heatmap.is_file()
    mil.predict(run, root, tmp_path / "pics", slides=["s2.tiff"], explain=False)
    assert not heatmap.exists()


def test_training_slides_embedded_with_different_stains_are_refused(
    archive: tuple[Path, Path], tmp_path: Path
) -> None:
    """One slide's vectors made from stain-normalised tiles, the others' not: training says
    which normalisation how many slides have, before any fold is fitted."""
    import zarr

    root, labels = archive
    copy = tmp_path / "archive"
    shutil.copytree(root, copy)
    arch = open_store(copy)
    sid = arch.slide_ids[0]
    [eid] = [p.name for p in (arch.store_path(sid) / "embeddings").iterdir() if p.is_dir()]
    array = zarr.open_array(arch.store_path(sid) / "embeddings" / eid, mode="r+")
    array.attrs["stain"] = {
        "method": "macenko",
        "reference": "ref.png",
        "reference_sha256": "0" * 64,
    }
    out = tmp_path / "run"
    argv = ["mil", "train", str(copy), "--labels", str(labels), "--out", str(out), "--folds", "2"]
    argv += SMALL
    code, stdout, err = run_cli(argv)
    assert code == 2 and stdout == "" and err.count("\n") == 1, err
    assert "embedded with different stain normalisations: 3 without (e.g. s1.tiff)" in err
    assert "1 with macenko to ref.png (e.g. s2.tiff)" in err and not out.exists()


def test_training_slides_tiled_at_different_scales_are_refused(
    archive: tuple[Path, Path], tmp_path: Path
) -> None:
    """One slide tiled at 1 µm/px among 0.5 µm/px ones: training mixed them without a word
    (the index refuses them); now it says how many slides each scale has, before any fold."""
    import zarr

    root, labels = archive
    copy = tmp_path / "archive"
    shutil.copytree(root, copy)
    arch = open_store(copy)
    group = zarr.open_group(arch.store_path(arch.slide_ids[0]), mode="r+")
    tiling = dict(group.attrs["tiling"])
    group.attrs["tiling"] = {**tiling, "mpp": 2 * float(tiling["mpp"])}
    out = tmp_path / "run"
    argv = ["mil", "train", str(copy), "--labels", str(labels), "--out", str(out), "--folds", "2"]
    code, stdout, err = run_cli([*argv, *SMALL])
    assert code == 2 and stdout == "" and err.count("\n") == 1, err
    mpp = float(tiling["mpp"])
    assert f"tiled at different scales: 3 at {mpp:g} µm/px" in err
    assert f"1 at {2 * mpp:g} µm/px" in err and not out.exists()


def test_counts_out_of_range_are_refused_in_the_flags_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--max-tiles -1 and --threads 0 are refused when parsed, in the flag's words (the
    config's "must be >= 1 or None" spoke Python)."""
    from wsi_ssl.cli.main import main

    base = ["mil", "train", str(tmp_path), "--labels", "x.csv", "--out", str(tmp_path / "r")]
    for flag, value, said in (("--max-tiles", "-1", ">= 0"), ("--threads", "0", ">= 1")):
        with pytest.raises(SystemExit) as info:
            main([*base, flag, value])
        err = capsys.readouterr().err
        assert info.value.code == 2 and f"expected a whole number {said}, got '{value}'" in err
        assert "None" not in err


def test_overwrite_says_what_it_replaced(
    run: Path, archive: tuple[Path, Path], tmp_path: Path
) -> None:
    """``--overwrite`` of a predicted run says so: the earlier run's date and how many
    predictions went with it (they were replaced silently)."""
    root, labels = archive
    out = shutil.copytree(run, tmp_path / "run")
    code, _, err = run_cli(["mil", "predict", str(out), str(root), "--no-explain", "--quiet"])
    assert code == 0, err
    created = json.loads((out / "run.json").read_text())["created"]
    argv = ["mil", "train", str(root), "--labels", str(labels), "--out", str(out)]
    code, printed, err = run_cli([*argv, "--folds", "2", "--epochs", "1", "--overwrite", *SMALL])
    assert code == 0, err
    assert (
        f"replaced the run at {out} (trained {created}) and the 4 slide prediction(s) "
        "`wsi-ssl mil predict` had written in it (predictions/)"
    ) in printed
    assert not (out / "predictions").exists()
