"""MIL bags without the tiles QC flagged (``MILConfig.skip_flagged_tiles``, ``wsi-ssl mil train
--skip-flagged-tiles``), on stores with planted QC scores: tiles 0-3 of every slide have a pen
score of 0.9 and the stores were tiled with ``qc_max_pen=0.5``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from wsi_ssl import mil
from wsi_ssl.errors import EmptyBagError
from wsi_ssl.mil.data import BagCache, BagDataset, BagRef, kept_rows, read_bag
from wsi_ssl.storage import open_store
from wsi_ssl.testing.bags import write_bag_store

ENC = "enc-qc"
N, FLAGGED, DIM = 12, 4, 8
SMALL = ["--hidden-dim", "16", "--attention-dim", "8", "--threads", "1", "--device", "cpu"]


def _pen(n: int, flagged: int) -> dict[str, np.ndarray]:
    pen = np.zeros(n, np.float32)
    pen[:flagged] = 0.9
    return {"pen": pen}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """Six slides (three per class; the class is in the kept tiles' first dimension), and a
    seventh whose every tile is flagged; the labels CSV names the six."""
    base = tmp_path_factory.mktemp("milqc")
    root, rng, features = base / "archive", np.random.default_rng(0), {}
    for i in range(6):
        x = rng.normal(size=(N, DIM)).astype(np.float32)
        x[FLAGGED:, 0] += 3.0 if i % 2 else -3.0
        sid = f"{i:016x}"
        write_bag_store(
            root,
            sid,
            x,
            encoder_id=ENC,
            name=f"s{i}.svs",
            dtype="float32",
            qc=_pen(N, FLAGGED),
            qc_thresholds={"qc_max_pen": 0.5},
        )
        features[sid] = x
    write_bag_store(
        root,
        "f" * 16,
        np.ones((3, DIM)),
        encoder_id=ENC,
        name="all-pen.svs",
        qc=_pen(3, 3),
        qc_thresholds={"qc_max_pen": 0.5},
    )
    labels = base / "labels.csv"
    labels.write_text("slide,label\n" + "".join(f"s{i}.svs,{'ab'[i % 2]}\n" for i in range(6)))
    return root, labels, features


def test_bags_leave_out_flagged_tiles(archive) -> None:
    root, _, features = archive
    sid = f"{1:016x}"
    store = open_store(root).slide(sid)
    np.testing.assert_array_equal(kept_rows(store), np.arange(FLAGGED, N))
    whole = read_bag(store, ENC)
    kept = read_bag(store, ENC, skip_flagged=True)
    assert len(whole) == N and len(kept) == N - FLAGGED
    np.testing.assert_array_equal(kept.features, features[sid][FLAGGED:])
    np.testing.assert_array_equal(kept.coords, store.coords[FLAGGED:])
    refs = [BagRef(sid, store.path, 1)]
    for cache in (None, BagCache(1 << 20)):
        data = BagDataset(refs, ENC, skip_flagged=True, cache=cache)
        first, again = data[0][0].numpy(), data[0][0].numpy()  # the second read: no re-check
        np.testing.assert_array_equal(first, features[sid][FLAGGED:])
        np.testing.assert_array_equal(again, first)
    assert len(BagDataset(refs, ENC)[0][0]) == N
    with pytest.raises(EmptyBagError, match="0 tiles"):
        read_bag(open_store(root).slide("f" * 16), ENC, skip_flagged=True)


def test_train_and_predict_without_flagged_tiles(archive, tmp_path: Path) -> None:
    root, labels, _ = archive
    run = tmp_path / "run"
    argv = ["mil", "train", str(root), "--labels", str(labels), "--out", str(run)]
    argv += ["--folds", "2", "--epochs", "2", "--val-fraction", "0", "--skip-flagged-tiles"]
    code, _, err = run_cli([*argv, *SMALL])
    assert code == 0, err
    assert json.loads((run / "run.json").read_text())["config"]["skip_flagged_tiles"] is True
    result = mil.predict(run, root, tmp_path / "pred", explain=False)
    assert result.counts["complete"] == 6 and result.exit_code == 1
    [failed] = result.failed  # every tile of all-pen.svs is flagged: nothing to classify
    assert failed.details["name"] == "all-pen.svs" and failed.error_type == "EmptyBagError"
    for s in result.slides:
        assert s.n_tiles == N - FLAGGED and s.prediction is not None  # the bag, not the store
        attention = s.prediction.attention
        assert attention is not None and attention.shape == (N,)
        assert np.all(attention[:FLAGGED] == 0) and np.all(attention[FLAGGED:] > 0)
        assert attention.sum() == pytest.approx(1.0, abs=1e-5)


def test_the_flag_defaults_to_every_tile(archive, tmp_path: Path) -> None:
    root, labels, _ = archive
    config = mil.MILConfig(folds=2, epochs=1, val_fraction=0.0, hidden_dim=16, attention_dim=8)
    assert config.skip_flagged_tiles is False
    run = tmp_path / "run"
    mil.train(root, labels, ENC, run, config)
    [pred] = mil.predict(run, root, tmp_path / "p", slides=["s1.svs"], explain=False).slides
    assert pred.prediction is not None and np.all(pred.prediction.attention > 0)


def test_a_slide_with_every_tile_flagged_is_an_empty_bag(archive, tmp_path: Path) -> None:
    root, labels, _ = archive
    table = tmp_path / "labels.csv"
    table.write_text(labels.read_text() + "all-pen.svs,a\n")
    report = mil.match_labels(root, table, ENC)  # every tile counts without the option
    assert {s.name: s.n_tiles for s in report.slides}["all-pen.svs"] == 3
    with pytest.raises(EmptyBagError, match="every tile is flagged by QC"):
        mil.match_labels(root, table, ENC, skip_flagged_tiles=True)
    report = mil.match_labels(root, table, ENC, skip_missing=True, skip_flagged_tiles=True)
    assert [r.slide for r in report.empty] == ["all-pen.svs"]
    assert {s.n_tiles for s in report.slides} == {N - FLAGGED}


def test_predicting_embeddings_with_rows_left_out_uses_the_rows_that_hold_vectors(
    archive, tmp_path: Path
) -> None:
    """Embeddings from ``embed --skip-flagged-tiles`` hold NaN rows for the tiles QC left out:
    predicting the Embeddings object uses the other rows; a plain array with them is refused."""
    import dataclasses

    from wsi_ssl.errors import SchemaMismatchError
    from wsi_ssl.storage.embeddings import read_embeddings

    root, labels, _ = archive
    config = mil.MILConfig(folds=2, epochs=1, val_fraction=0.0, hidden_dim=16, attention_dim=8)
    mil.train(root, labels, ENC, tmp_path / "run", config)
    run = mil.load(tmp_path / "run")
    store = open_store(root).slide(f"{1:016x}")
    emb = read_embeddings(store, ENC)
    features = np.array(emb.features, dtype=np.float32)
    features[:FLAGGED] = np.nan  # what a store holds for tiles it did not embed
    attrs = {**emb.attrs, "not_embedded": {"tiles": list(range(FLAGGED)), "reason": "qc_flagged"}}
    skipped = dataclasses.replace(emb, features=features, attrs=attrs)

    got = run.predict(skipped)
    want = run.predict(features[FLAGGED:])
    assert np.all(np.isfinite(got.probabilities)) and got.label == want.label
    np.testing.assert_allclose(got.probabilities, want.probabilities, rtol=1e-6)
    assert got.attention is not None and got.attention.shape == (N - FLAGGED,)
    assert got.attention.sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_array_equal(got.coords, store.coords[FLAGGED:])
    with pytest.raises(SchemaMismatchError, match=f"{FLAGGED} of {N} rows are not finite"):
        run.predict(features)
    with pytest.raises(SchemaMismatchError, match="predict_slide"):
        mil.attention_heatmap(store, got.attention, tmp_path / "heat.png")
    # not finite, or not (N,), is refused alike (NaN drew blank tiles, (N, 1) was accepted)
    full = run.predict_slide(store).attention
    for wrong in (np.full(len(full), np.nan), full[:, None]):
        with pytest.raises(SchemaMismatchError, match=r"attention must be \(N,\) finite weights"):
            mil.attention_heatmap(store, wrong, tmp_path / "heat.png")
    # a bag given as a list of rows is predicted as the array (it was an AttributeError)
    rows = features[FLAGGED:].tolist()
    np.testing.assert_allclose(run.predict(rows).probabilities, want.probabilities, rtol=1e-5)
