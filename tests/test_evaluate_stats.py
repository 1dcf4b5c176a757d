"""`wsi_ssl.evaluation`: what makes a score honest, on stores with planted embeddings.

Slide stores are written through the storage API (:func:`write_bag_store`) with vectors
planted under the ids of registered test encoders, so the embed job finds them complete and
embeds nothing; folds, probes (scikit-learn), indexes (FAISS) and bootstraps run for real.

* tile probes never train and test on the same slide (leave-one-slide-out when there are
  fewer slides than folds);
* retrieval with a ``patient`` column leaves out every slide of the query's patient;
* tile intervals resample slides, not tiles;
* every encoder is checked against the archive's tile size and scale before any embeds, and
  the advice is one step that works.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import run_cli
from wsi_ssl.encoders import create_encoder, list_encoders, register_encoder
from wsi_ssl.errors import ConfigError
from wsi_ssl.evaluation import (
    EvaluationReport,
    RegionLabelTask,
    RetrievalTask,
    evaluate_encoders,
)
from wsi_ssl.evaluation.probes import assign_folds, linear_predictions
from wsi_ssl.evaluation.statistics import cluster_bootstrap_indices
from wsi_ssl.storage.embeddings import EmbeddingWriter, coords_sha256
from wsi_ssl.testing.bags import write_bag_store

DIM = 8
PLANTED = ("planted-a", "planted-b")
AT_20X = "planted-20x"  # like phikon: 224 px, trained at 0.5 µm/px, no resize


class Flat(nn.Module):
    """Every image -> the same vector (the planted vectors are what is scored)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(x), DIM) + 0 * x.mean()


for _name, _mpp in ((PLANTED[0], ()), (PLANTED[1], ()), (AT_20X, (0.5,))):
    if _name not in list_encoders():
        register_encoder(
            _name, arch="builtin/flat", input_size=224, embed_dim=DIM, source="random", mpp=_mpp
        )(lambda config: Flat())


def _grid(n: int, tile_size: int) -> np.ndarray:
    side = int(np.ceil(np.sqrt(n)))
    return np.array([[(i % side) * tile_size, (i // side) * tile_size] for i in range(n)])


def planted_store(
    root: Path,
    index: int,
    vectors: dict[str, np.ndarray],
    *,
    tile_size: int = 224,
    tiles: np.ndarray | None = None,
) -> str:
    """A complete slide store ``s<index>.svs`` holding each encoder's planted vectors (keys:
    registered encoder names); returns its slide id."""
    sid = f"{index:016x}"
    coords = _grid(len(next(iter(vectors.values()))), tile_size)
    ids = {name: create_encoder(name).encoder_id for name in vectors}
    (first, x), *rest = vectors.items()
    write_bag_store(
        root, sid, x, encoder_id=ids[first], coords=coords, name=f"s{index}.svs",
        tile_size=tile_size, tiles=tiles,
    )  # fmt: skip
    path = root / "slides" / f"{sid}.zarr"
    for name, x in rest:
        attrs = {
            "encoder_id": ids[name],
            "encoder": {},
            "slide_id": sid,
            "n_tiles": len(x),
            "dim": DIM,
            "dtype": "float16",
            "coords_sha256": coords_sha256(coords),
        }
        writer = EmbeddingWriter(
            path, ids[name], n_rows=len(x), dim=DIM, dtype="float16", attrs=attrs
        )
        writer.write(0, x)
        writer.commit()
    return sid


def at_angles(degrees: list[float], n: int, seed: int) -> list[np.ndarray]:
    """Per slide, ``n`` vectors tightly around the unit direction at that angle (cosine
    neighbours: a held-out slide's tiles all find the nearest other slide)."""
    rng = np.random.default_rng(seed)
    out = []
    for d in degrees:
        x = np.zeros((n, DIM), dtype=np.float32)
        x[:, 0], x[:, 1] = np.cos(np.radians(d)), np.sin(np.radians(d))
        out.append(x + rng.normal(scale=0.005, size=x.shape).astype(np.float32))
    return out


def whole_slide_regions(path: Path, labels: list[str]) -> Path:
    """A regions CSV labelling every tile of slide ``s<i>.svs`` with ``labels[i]``."""
    rows = "".join(f"s{i}.svs,0,0,100000,100000,{label}\n" for i, label in enumerate(labels))
    path.write_text("slide,x,y,w,h,label\n" + rows)
    return path


def spec(name: str) -> str:
    """``name`` labelled as itself in the report."""
    return f"{name},label={name}"


def rows_of(report: EvaluationReport, method: str, metric: str) -> dict[str, float]:
    return {r.encoder: r.value for r in report.rows if (r.method, r.metric) == (method, metric)}


# -- 1. tile folds never split a slide -------------------------------------------------------


def test_fold_assignment_keeps_each_slide_on_one_side() -> None:
    rng = np.random.default_rng(0)
    for n_slides, n_folds in ((10, 5), (4, 5), (3, 3), (7, 2)):
        groups = np.repeat(np.arange(n_slides), rng.integers(5, 30, n_slides))
        y = (groups + rng.integers(0, 2, len(groups))) % 2  # mixed classes on every slide
        folds, note = assign_folds(y, n_folds, seed=1, groups=groups)
        for g in range(n_slides):
            assert len(np.unique(folds[groups == g])) == 1, (n_slides, n_folds, g)
        assert sorted(np.unique(folds)) == list(range(min(n_slides, n_folds)))
        if n_slides < n_folds:
            assert note is not None and "leave-one-slide-out" in note
    with pytest.raises(ConfigError, match=r"lie on 1 slide; .* label tiles on at least 2 slides"):
        assign_folds(np.array([0, 1] * 10), 5, 0, groups=np.zeros(20, dtype=int))
    # two slides of one class each: a training fold holds one class; the probe predicts it
    y, groups = np.repeat([0, 1], 10), np.repeat([0, 1], 10)
    folds, _ = assign_folds(y, 5, 0, groups=groups)
    x = np.random.default_rng(0).normal(size=(20, 4))
    assert linear_predictions(x, y, folds, seed=0).tolist() == [1] * 10 + [0] * 10


def test_region_probe_with_fewer_slides_than_folds_is_leave_one_slide_out(tmp_path: Path) -> None:
    """4 slides labelled whole (2 per class) whose vectors say which slide, not which class:
    each slide's nearest other slide has the other class. Tile folds split by tile (5 folds)
    let k-NN find a test tile's own slide (balanced accuracy 1.0); leave-one-slide-out
    gives the truth, 0.0."""
    root = tmp_path / "archive"
    for i, x in enumerate(at_angles([0, 10, 60, 70], 40, seed=0)):  # a, b, a, b
        planted_store(root, i, {PLANTED[0]: x})
    regions = whole_slide_regions(tmp_path / "regions.csv", ["a", "b", "a", "b"])
    report = evaluate_encoders(
        [spec(PLANTED[0])], [RegionLabelTask(root, regions)], None, knn_k=5, n_bootstrap=0
    )
    [task] = report.tasks
    assert task.folds == 4 and task.n == 160
    assert "4 folds, leave-one-slide-out (4 slides, 5 folds asked)" in task.notes
    assert rows_of(report, "knn", "balanced_accuracy")[PLANTED[0]] == 0.0


def test_region_labels_on_one_slide_are_refused_before_embedding(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    planted_store(root, 0, {PLANTED[0]: at_angles([0], 20, seed=0)[0]})
    regions = tmp_path / "regions.csv"
    regions.write_text("slide,x,y,w,h,label\ns0.svs,0,0,448,10000,a\ns0.svs,448,0,10000,10000,b\n")
    with pytest.raises(ConfigError, match="label tiles on at least 2 slides"):
        evaluate_encoders([PLANTED[0]], [RegionLabelTask(root, regions)], None, n_bootstrap=0)


# -- 2. retrieval leaves the query's patient out ---------------------------------------------


def test_retrieval_with_a_patient_column_leaves_the_patients_other_slides_out(
    tmp_path: Path,
) -> None:
    """Four patients, each with two identical copies of a slide under two slide ids; each
    patient's nearest other patient has the other class. Leave-one-slide-out lets the copy
    answer (mMV@1 and precision@5 = 1.0 for any encoder); with the patient column every
    slide of the query's patient is left out (both 0.0)."""
    root = tmp_path / "archive"
    vectors = at_angles([0, 10, 60, 70], 16, seed=1)  # patients p0..p3: a, b, a, b
    for i in range(8):
        planted_store(root, i, {PLANTED[0]: vectors[i // 2]})
    lines = [f"s{i}.svs,{'ab'[(i // 2) % 2]},p{i // 2}" for i in range(8)]
    with_patients = tmp_path / "patients.csv"
    with_patients.write_text("slide,label,patient\n" + "\n".join(lines) + "\n")
    without = tmp_path / "slides.csv"
    without.write_text("slide,label\n" + "\n".join(ln.rsplit(",", 1)[0] for ln in lines) + "\n")
    tasks = [RetrievalTask(root, with_patients, "lopo"), RetrievalTask(root, without, "loso")]
    settings = {"mmv_k": 1, "precision_k": 5, "n_bootstrap": 50}
    report = evaluate_encoders([PLANTED[0]], tasks, None, **settings)
    values = {(r.task, r.metric): r.value for r in report.rows}
    assert values["loso", "mmv@1"] == values["loso", "precision@5"] == 1.0  # the copy answers
    assert values["lopo", "mmv@1"] == values["lopo", "precision@5"] == 0.0
    notes = {t.name: t.notes for t in report.tasks}
    assert any(n.startswith("leave-one-patient-out") for n in notes["lopo"])
    assert "leave-one-slide-out" in notes["loso"]
    # mMV@k may not let every slide outside the largest patient vote
    with pytest.raises(ConfigError, match=r"mmv_k=6 lets all 6 other .*patient-out.*mmv_k <= 5"):
        evaluate_encoders([PLANTED[0]], tasks[:1], None, **{**settings, "mmv_k": 6})


# -- 3. tile intervals resample slides ------------------------------------------------------


def test_cluster_bootstrap_draws_whole_slides_of_every_dominant_class() -> None:
    rng = np.random.default_rng(0)
    sizes = np.array([5, 9, 14, 3, 8, 11])
    groups = np.repeat(np.arange(6), sizes)
    y = np.where(rng.random(len(groups)) < 0.8, groups % 2, 1 - groups % 2)  # mostly slide % 2
    rows = cluster_bootstrap_indices(y, groups, 200, seed=3)
    assert len(rows) == 200
    again = cluster_bootstrap_indices(y, groups, 200, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(rows, again, strict=True))
    assert len({len(r) for r in rows}) > 1  # rows of whole slides vary in length
    for row in rows:
        counts = np.bincount(groups[row], minlength=6)
        assert (counts % sizes == 0).all()  # whole slides only
        drawn = np.flatnonzero(counts)
        assert {0, 1} <= set(drawn % 2)  # a slide of each (dominant) class in every resample
    assert cluster_bootstrap_indices(y, groups, 0, seed=0) == []


def test_tile_intervals_resample_slides_not_tiles(tmp_path: Path) -> None:
    """6 slides labelled whole, 40 tiles each; leave-one-slide-out k-NN takes each slide's
    class from its nearest other slide. Encoder a is right on all 6 slides, b on 4: the
    difference (0.333) rests on 2 slides. Resampling 240 tiles as if independent called it
    beyond the intervals; resampling slides does not (some resamples draw neither slide)."""
    root = tmp_path / "archive"
    labels = ["a", "a", "a", "b", "b", "b"]
    good = at_angles([0, 10, 20, 90, 100, 110], 40, seed=2)
    mixed = at_angles([0, 10, 200, 100, 110, 210], 40, seed=3)  # slides 2 and 5: each other
    for i in range(6):
        planted_store(root, i, {PLANTED[0]: good[i], PLANTED[1]: mixed[i]})
    regions = whole_slide_regions(tmp_path / "regions.csv", labels)
    report = evaluate_encoders(
        [spec(n) for n in PLANTED],
        [RegionLabelTask(root, regions)],
        None,
        knn_k=5,
        folds=6,
        linear=False,
    )
    values = rows_of(report, "knn", "balanced_accuracy")
    assert values == {PLANTED[0]: 1.0, PLANTED[1]: pytest.approx(2 / 3)}
    [ranking] = [r for r in report.rankings if r.metric == "balanced_accuracy"]
    assert ranking.first == PLANTED[0] and ranking.difference == pytest.approx(1 / 3)
    assert ranking.difference_low is not None and ranking.difference_low <= 0.0
    assert ranking.exceeds_intervals is False, ranking.sentence()


# -- 4. every encoder checked before any embeds; advice that works -------------------------


@pytest.fixture
def tiles_256(tmp_path: Path) -> tuple[Path, Path]:
    """4 slides of 256 px tiles at 0.5 µm/px (real pixels, nothing embedded) and their
    retrieval labels."""
    root = tmp_path / "archive"
    rng = np.random.default_rng(0)
    for i in range(4):
        tiles = rng.integers(0, 255, (9, 256, 256, 3), dtype=np.uint8)
        write_bag_store(
            root, f"{i:016x}", np.zeros((9, DIM)), encoder_id="unused", name=f"s{i}.svs",
            tile_size=256, tiles=tiles,
        )  # fmt: skip
    csv = tmp_path / "labels.csv"
    csv.write_text("slide,label\n" + "".join(f"s{i}.svs,{'ab'[i % 2]}\n" for i in range(4)))
    return root, csv


def test_an_encoder_that_cannot_take_the_tiles_is_refused_before_any_embeds(
    tiles_256: tuple[Path, Path],
) -> None:
    """random-cnn (resized) could embed the 256 px tiles, the 20x encoder cannot (resized to
    224 they reach it at 0.571 µm/px): refused before random-cnn embeds a slide (it used to
    embed them all first), and the advice satisfies both checks."""
    from wsi_ssl.storage import open_store
    from wsi_ssl.storage.embeddings import read_embeddings

    root, csv = tiles_256
    specs = ["random-cnn,resize=bilinear", AT_20X]
    with pytest.raises(ConfigError) as info:
        evaluate_encoders(specs, [RetrievalTask(root, csv)], None, mmv_k=1, n_bootstrap=0)
    message = str(info.value)
    assert re.search(rf"encoder '[\w-]*{AT_20X}' can take none of the 4 slide\(s\)", message)
    assert "checked before embedding any" in message
    assert not message.endswith("resize=bilinear")  # resizing alone would fail the scale check
    first = create_encoder("random-cnn", resize="bilinear").encoder_id
    archive = open_store(root)
    for sid in archive.slide_ids:
        with pytest.raises(Exception, match=first):
            read_embeddings(archive.slide(sid), first)
    # the advice: re-tile at the encoder's own size and scale (which both checks accept) ...
    size, mpp = re.search(r"re-tile with tile_size=(\d+) and mpp=([\d.]+)", message).groups()
    encoder = create_encoder(AT_20X)
    assert encoder.check_input_size(int(size), int(size)) is False
    encoder.check_scale(float(mpp), int(size))
    # ... or resize and skip the scale check, which evaluate spells as its own flag
    argv = ["evaluate", "--encoder", AT_20X, "--root", str(root), "--retrieval-labels", str(csv)]
    argv += ["--mmv-k", "1", "--bootstrap", "0", "--out", str(root.parent / "e")]
    code, out, err = run_cli(argv)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "NAME,resize=bilinear and pass --no-mpp-check" in err
    code, out, err = run_cli([*argv[:2], f"{AT_20X},resize=bilinear", *argv[3:], "--no-mpp-check"])
    assert code == 0 and "mmv@1" in out, err


def test_an_encoder_without_a_trained_scale_is_told_to_resize(
    tiles_256: tuple[Path, Path],
) -> None:
    """With no scale to respect, resizing alone is the one step, and it works."""
    root, csv = tiles_256
    task = [RetrievalTask(root, csv)]
    with pytest.raises(ConfigError, match=r"takes 224 px .*; give the encoder as NAME,resize="):
        evaluate_encoders(["random-cnn"], task, None, mmv_k=1, n_bootstrap=0)
    report = evaluate_encoders(["random-cnn,resize=bilinear"], task, None, mmv_k=1, n_bootstrap=0)
    assert {r.metric for r in report.rows} == {"mmv@1", "precision@10"}


# -- 5. too few slides: no interval, no claim; labelled slides left out are named ----------


def test_a_class_dominant_on_one_slide_is_resampled_with_the_other_slides() -> None:
    """Slides 0 and 1 are mostly class 0, slide 2 mostly class 1 (each holds both): a
    stratum of one slide would redraw itself in every resample, so nothing would vary;
    the slides are resampled together instead."""
    groups = np.repeat([0, 1, 2], 10)
    y = np.array(([0] * 7 + [1] * 3) * 2 + [1] * 7 + [0] * 3)
    rows = cluster_bootstrap_indices(y, groups, 100, seed=0)
    times = np.array([np.bincount(groups[r], minlength=3) // 10 for r in rows])
    assert (times.sum(axis=1) == 3).all()  # three whole slides per resample
    assert (times[:, 2] != 1).any()  # slide 2 is sometimes left out or drawn twice


def test_intervals_need_every_class_in_three_slides_patients_or_images() -> None:
    """The documented minimum, at its edge: 3 slides of each class get resamples, 2 get a
    reason and none; a patch task counts images, each its own cluster."""
    from wsi_ssl.evaluation.statistics import MIN_CLUSTERS_PER_CLASS, draw_resamples

    assert MIN_CLUSTERS_PER_CLASS == 3
    groups = np.repeat(np.arange(6), 4)
    y = np.repeat([0, 0, 0, 1, 1, 1], 4)
    rows, why = draw_resamples(y, groups, ["a", "b"], "slide", 50, seed=0)
    assert why is None and len(rows) == 50
    keep = groups != 5  # class b on 2 slides
    rows, why = draw_resamples(y[keep], groups[keep], ["a", "b"], "slide", 50, seed=0)
    assert len(rows) == 0 and why == "they need every class in at least 3 slides: 'b' is in 2"
    rows, why = draw_resamples(np.array([0, 0, 1, 1, 1]), None, ["x", "y"], "image", 50, 0)
    assert len(rows) == 0 and why is not None and "3 images: 'x' is in 2" in why
    assert draw_resamples(y[keep], groups[keep], ["a", "b"], "slide", 0, seed=0) == ([], None)


def test_with_too_few_slides_per_class_there_is_no_interval_and_no_claim(
    tmp_path: Path,
) -> None:
    """Two slides, each labelled with both classes (one mostly a, one mostly b), a separating
    encoder and a noise one: each slide was a stratum of its own, so every resample was the
    same, the intervals were points and the tool claimed the lead exceeded them. Now: no interval anywhere (table, JSON, chart) and a
    note saying why; the lead is reported without a verdict."""
    root = tmp_path / "archive"
    rng = np.random.default_rng(0)
    columns = np.arange(36) % 6  # 36 tiles on a 6 x 6 grid
    for i, a_columns in enumerate((4, 2)):  # slide 0: columns 0-3 are a; slide 1: 0-1
        y = (columns >= a_columns).astype(int)
        good = np.zeros((36, DIM), dtype=np.float32)
        good[np.arange(36), y] = 1.0
        noise = rng.normal(size=(36, DIM)).astype(np.float32)
        planted_store(root, i, {PLANTED[0]: good, PLANTED[1]: noise})
    regions = tmp_path / "regions.csv"
    regions.write_text(
        "slide,x,y,w,h,label\n"
        "s0.svs,0,0,896,1344,a\ns0.svs,896,0,448,1344,b\n"
        "s1.svs,0,0,448,1344,a\ns1.svs,448,0,896,1344,b\n"
    )
    out = tmp_path / "eval"
    argv = ["evaluate", "--encoder", spec(PLANTED[0]), "--encoder", spec(PLANTED[1])]
    argv += ["--root", str(root), "--region-labels", str(regions), "--out", str(out)]
    code, stdout, err = run_cli([*argv, "--bootstrap", "200", "--knn-k", "3"])
    assert code == 0, err
    data = json.loads((out / "evaluation.json").read_text())
    assert all(r["ci_low"] is None and r["ci_high"] is None for r in data["rows"])
    assert all(r["exceeds_intervals"] is None for r in data["rankings"])
    assert "exceeds the intervals" not in stdout
    note = "no bootstrap intervals (they need every class in at least 3 slides"
    assert f"{note}: 'a' is in 2, 'b' is in 2)" in stdout
    assert re.search(r"regions +knn +balanced_accuracy +1\.000 \[n/a\]\* ", stdout), stdout
    lead = rf"{PLANTED[0]} ranks first, \+0\.\d+ over {PLANTED[1]}; no interval, so no verdict"
    assert re.search(lead, stdout), stdout
    [task] = data["tasks"]
    assert task["no_intervals"].startswith("they need every class in at least 3 slides")
    assert any(n.startswith(note) for n in task["notes"])
    assert (out / "evaluation.png").is_file()


def test_labelled_slides_missing_from_the_archive_are_named_with_their_lines(
    tmp_path: Path,
) -> None:
    root = tmp_path / "archive"
    for i, x in enumerate(at_angles([0, 10, 60, 70], 8, seed=0)):
        planted_store(root, i, {PLANTED[0]: x})
    csv = tmp_path / "labels.csv"
    rows = ["s0.svs,a", "s1.svs,b", "ghost.svs,a", "s2.svs,a", "s3.svs,b", "gone.svs,b"]
    csv.write_text("slide,label\n" + "\n".join(rows) + "\n")
    report = evaluate_encoders(
        [PLANTED[0]], [RetrievalTask(root, csv)], None, mmv_k=1, n_bootstrap=0
    )
    [task] = report.tasks
    assert task.n == 4
    note = (
        f"left out 2 labelled slide(s) with no complete store under {root}: "
        "'ghost.svs' (line 4), 'gone.svs' (line 7)"
    )
    assert note in task.notes
    assert note in "\n".join(report.lines())


def test_labels_that_each_name_several_stores_say_so(tmp_path: Path) -> None:
    """Every row names a file name two stores share: the error says so (it said no row
    named a complete store, though each named two)."""
    from wsi_ssl.errors import LabelsError
    from wsi_ssl.evaluation.tasks import load_slide_labels

    root = tmp_path / "archive"
    x = at_angles([0, 10], 8, seed=0)
    for i, (folder, vectors) in enumerate(zip(("a", "b"), x, strict=True)):
        eid = create_encoder(PLANTED[0]).encoder_id
        write_bag_store(root, f"{i:016x}", vectors, encoder_id=eid, name=f"{folder}/dup.svs")
    csv = tmp_path / "labels.csv"
    csv.write_text("slide,label\ndup.svs,a\nghost.svs,b\n")
    with pytest.raises(
        LabelsError, match=r"1 of its 2 slide\(s\) name several stores each .*line 2"
    ):
        load_slide_labels(root, csv)
