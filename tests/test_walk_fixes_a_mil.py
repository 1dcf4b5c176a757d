"""``wsi-ssl mil train`` flags a model has no use for: TransMIL's heads no longer constrain
the width of the other models, and a flag given to a model that ignores it is noted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli
from wsi_ssl.errors import ConfigError
from wsi_ssl.mil import MILConfig

ENC = "enc-x"
LABELS = {f"{i:016x}": "ab"[i % 2] for i in range(8)}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Eight small bags of two classes, and their labels CSV."""
    from wsi_ssl.testing.bags import write_bag_store

    base = tmp_path_factory.mktemp("walk-mil")
    rng = np.random.default_rng(0)
    for slide_id in LABELS:
        write_bag_store(base / "archive", slide_id, rng.normal(size=(6, 4)), encoder_id=ENC)
    labels = base / "labels.csv"
    labels.write_text("slide,label\n" + "".join(f"{s},{y}\n" for s, y in LABELS.items()))
    return base / "archive", labels


def _train(archive: tuple[Path, Path], out: Path, *flags: str) -> tuple[int, str, str]:
    root, labels = archive
    argv = ["mil", "train", str(root), "--labels", str(labels), "--encoder", ENC]
    argv += ["--out", str(out), "--folds", "2", "--device", "cpu", "--threads", "1", *flags]
    return run_cli(argv)


def test_only_transmil_needs_a_width_that_its_heads_divide(
    archive: tuple[Path, Path], tmp_path: Path
) -> None:
    """``--model abmil --hidden-dim 100`` was refused for TransMIL's 8 heads."""
    assert MILConfig(model="abmil", hidden_dim=100).hidden_dim == 100
    assert MILConfig(model="meanpool", hidden_dim=100, n_heads=7).n_heads == 7
    with pytest.raises(ConfigError, match="hidden_dim 100 must be a multiple of n_heads 8"):
        MILConfig(model="transmil", hidden_dim=100)
    code, _, err = _train(archive, tmp_path / "abmil", "--hidden-dim", "100", "--epochs", "2")
    assert code == 0, err
    assert "note" not in err  # every flag given is one ABMIL uses
    config = json.loads((tmp_path / "abmil" / "run.json").read_text())["config"]
    assert (config["model"], config["hidden_dim"], config["n_heads"]) == ("abmil", 100, 8)
    code, _, err = _train(archive, tmp_path / "t", "--model", "transmil", "--hidden-dim", "100")
    assert code == 2 and "must be a multiple of n_heads 8" in err
    assert not (tmp_path / "t").exists()


def test_flags_the_model_does_not_use_are_noted_not_refused(
    archive: tuple[Path, Path], tmp_path: Path
) -> None:
    """retrieval took ``--epochs``, ``--lr`` and ``--dropout`` (and abmil ``--k``) without a
    word; the run is the same, and one line on stderr names them."""
    flags = ["--model", "retrieval", "--k", "2", "--epochs", "3", "--lr", "0.1"]
    code, out, err = _train(archive, tmp_path / "knn", *flags, "--dropout", "0.1", "--json")
    assert code == 0, err
    assert err.splitlines()[0] == (
        "note: --model retrieval does not use --epochs, --lr, --dropout; ignored"
    )
    assert json.loads(out)["folds"]  # stdout stays the metrics JSON
    code, _, err = _train(archive, tmp_path / "abmil", "--k", "3", "--epochs", "2")
    assert code == 0, err
    assert err.splitlines() == ["note: --model abmil does not use --k; ignored"]
    config = json.loads((tmp_path / "abmil" / "run.json").read_text())["config"]
    assert config["k"] == 3 and config["epochs"] == 2  # recorded as given
    code, _, err = _train(archive, tmp_path / "plain", "--model", "retrieval", "--k", "2")
    assert code == 0 and "note" not in err, err
