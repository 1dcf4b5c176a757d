"""`wsi-ssl evaluate` at its edges: refusals that come before any embedding, encoders named as
they were given, and near ties reported as ties.

Slide stores hold real tiles written through the storage API (:func:`write_bag_store`) with
nothing embedded under the encoders evaluated, so a refusal that came after embedding would
leave their vectors behind.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli
from wsi_ssl.encoders import create_encoder
from wsi_ssl.errors import ConfigError
from wsi_ssl.evaluation import EvaluationConfig, RetrievalTask, evaluate_encoders
from wsi_ssl.evaluation.report import EvaluationReport, Scores, TaskSummary, rank
from wsi_ssl.evaluation.statistics import pooled_mean
from wsi_ssl.testing.bags import write_bag_store


def tile_archive(folder: Path, n: int, tile_size: int) -> Path:
    """``n`` complete slide stores ``s<i>.svs`` of 4 random tiles each, nothing embedded."""
    root = folder / "archive"
    rng = np.random.default_rng(0)
    for i in range(n):
        tiles = rng.integers(0, 255, (4, tile_size, tile_size, 3), dtype=np.uint8)
        write_bag_store(
            root, f"{i:016x}", np.zeros((4, 8)), encoder_id="unused", name=f"s{i}.svs",
            tile_size=tile_size, tiles=tiles,
        )  # fmt: skip
    return root


def labels_csv(path: Path, n: int, patients: bool = False) -> Path:
    head = "slide,label,patient\n" if patients else "slide,label\n"
    rows = (f"s{i}.svs,{'ab'[i % 2]}" + (f",p{i // 2}" if patients else "") for i in range(n))
    path.write_text(head + "".join(f"{r}\n" for r in rows))
    return path


def embedded_anything(root: Path, encoder_id: str) -> bool:
    return any((root / "slides").glob(f"*.zarr/embeddings/{encoder_id}"))


# -- 1. an mmv_k the labels cannot support: refused before anything is embedded --------------


def test_an_mmv_k_too_large_for_the_labels_is_refused_before_any_embedding(
    tmp_path: Path,
) -> None:
    """5 labelled slides leave 4 to each query: the default mMV@5 would let them all vote.
    The refusal depends on the labels alone, so it comes first: nothing embedded, no MIL run
    of an earlier slide task, no output folder (it came after embedding every encoder)."""
    root = tile_archive(tmp_path, 5, 224)
    csv = labels_csv(tmp_path / "slides.csv", 5)
    out = tmp_path / "eval"
    argv = ["evaluate", "--encoder", "random-cnn", "--root", str(root), "--out", str(out)]
    code, stdout, err = run_cli([*argv, "--slide-labels", str(csv), "--retrieval-labels", str(csv)])
    assert code == 2 and stdout == "" and err.count("\n") == 1, err
    assert f"mmv_k=5 lets all 4 other labelled slides of {csv} vote" in err
    assert "(leave-one-slide-out)" in err and "choose mmv_k <= 3 (command line: --mmv-k)" in err
    assert not out.exists()
    eid = create_encoder("random-cnn").encoder_id
    assert (root / "slides").is_dir() and not embedded_anything(root, eid)


def test_with_patients_the_largest_patient_sets_the_limit_before_any_embedding(
    tmp_path: Path,
) -> None:
    """6 slides of 3 patients (2 each): leave-one-patient-out leaves 4 to a query, so mMV@4
    is refused and the advice, mMV@3, runs."""
    root = tile_archive(tmp_path, 6, 224)
    task = [RetrievalTask(root, labels_csv(tmp_path / "p.csv", 6, patients=True))]
    with pytest.raises(ConfigError, match=r"mmv_k=4 lets all 4 .*one-patient-out.* mmv_k <= 3"):
        evaluate_encoders(["random-cnn"], task, None, mmv_k=4, n_bootstrap=0)
    assert not embedded_anything(root, create_encoder("random-cnn").encoder_id)
    report = evaluate_encoders(["random-cnn"], task, None, mmv_k=3, n_bootstrap=0)
    assert {r.metric for r in report.rows} == {"mmv@3", "precision@10"}


def test_help_says_the_defaults_of_the_evaluation_settings() -> None:
    from wsi_ssl.cli.main import build_parser

    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {a.dest: a.help or "" for a in sub.choices["evaluate"]._actions}
    config = EvaluationConfig()
    for field in ("knn_k", "mil_epochs", "mmv_k", "precision_k"):
        assert f"(default {getattr(config, field)})" in helps[field], field


# -- 3. errors name the encoder as it was given ---------------------------------------------


def test_an_encoder_that_cannot_take_the_tiles_is_named_as_it_was_given(tmp_path: Path) -> None:
    """Two seeds of one architecture are labelled by encoder id; the refusal of one names
    the spec the user gave, then its label (it named only the id, or for a run only its
    architecture)."""
    root = tile_archive(tmp_path, 4, 256)
    csv = labels_csv(tmp_path / "slides.csv", 4)
    argv = ["evaluate", "--encoder", "random-cnn,seed=1", "--encoder", "random-cnn,resize=bilinear"]
    argv += ["--root", str(root), "--retrieval-labels", str(csv), "--mmv-k", "1"]
    code, stdout, err = run_cli([*argv, "--bootstrap", "0", "--out", str(tmp_path / "e")])
    label = create_encoder("random-cnn", seed=1).encoder_id
    assert code == 2 and stdout == "" and err.count("\n") == 1, err
    assert "encoder 'random-cnn,seed=1' can take none of the 4 slide(s)" in err
    assert f"tiles are 256 px but encoder 'random-cnn,seed=1' ({label}) takes 224 px" in err
    # a spec that is its own label is named once, as before
    with pytest.raises(ConfigError, match=r"encoder 'random-cnn' can take none"):
        evaluate_encoders(["random-cnn"], [RetrievalTask(root, csv)], None, mmv_k=1)


# -- 4. leads that print as 0.000 are ties ---------------------------------------------------


def _pooled(values: dict[str, float]) -> tuple[list, object]:
    """Rows and ranking of encoders whose pooled mean over one item is ``values``."""
    summary = TaskSummary("t", "retrieval", "t.csv", 1, ("a", "b"), 0, "split")
    outputs = {label: np.array([[v, 1.0]]) for label, v in values.items()}
    ids = {label: f"{label}-id" for label in values}
    scores = Scores(summary, "search", "precision@10", ids, np.zeros(1), pooled_mean, outputs)
    return rank(scores, [], 0.95)


def test_a_lead_that_prints_as_zero_is_a_tie_and_both_are_starred() -> None:
    """0.5641 and 0.5644 both print 0.564: the lead (+0.0003) printed as "+0.000 over" and
    only one got the star; now both rank first, and the sentence says they are tied."""
    rows, ranking = _pooled({"random-cnn": 0.5641, "mae": 0.5644, "flat": 0.5})
    assert {r.encoder: r.rank for r in rows} == {"random-cnn": 1, "mae": 1, "flat": 3}
    assert ranking.first == "mae" and ranking.value == pytest.approx(0.5644)  # the best
    assert ranking.runner_up == "random-cnn" and ranking.tied == ("random-cnn",)
    assert (
        ranking.sentence()
        == "t / search / precision@10: mae ranks first (0.564), tied with random-cnn"
    )
    report = EvaluationReport(
        tuple(rows),
        (ranking,),
        (TaskSummary("t", "retrieval", "t.csv", 1, ("a", "b"), 0, "split"),),
        (("random-cnn", "random-cnn-id"), ("mae", "mae-id"), ("flat", "flat-id")),
        EvaluationConfig(),
    )
    [line] = [x for x in report.table().splitlines() if x.startswith("t ")]
    assert line.split()[3:] == ["0.564*", "0.564*", "0.500"]


def test_values_that_print_apart_by_a_rounding_edge_are_tied_too() -> None:
    """0.5646 and 0.5644 print 0.565 and 0.564 but their difference prints +0.000: tied;
    0.5660 over 0.5644 (+0.002) is a lead, one star."""
    rows, ranking = _pooled({"a": 0.5644, "b": 0.5646})
    assert [r.rank for r in rows] == [1, 1] and ranking.first == "b" and ranking.tied == ("a",)
    rows, ranking = _pooled({"a": 0.5644, "b": 0.5660})
    assert [r.rank for r in rows] == [2, 1] and ranking.tied == ()
    assert ranking.sentence().endswith("b ranks first, +0.002 over a (no interval for this metric)")
