"""`wsi-ssl evaluate` says "loading encoder X" on stderr as it begins to read an encoder's
weights file (a foundation model's takes minutes, and it said nothing until the first
embedding), while a run refused for its specs, weights files or labels still prints its
one error line alone: those are all checked before any encoder is loaded.

The real CLI (in-process) on real labelled images and a synthetic archive; the weights
file is a real state dict of the random-init CNN (``random-cnn,weights=FILE``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli


@pytest.fixture(scope="module")
def patches(patches_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real tiles in two class folders: tissue and blank."""
    folder = tmp_path_factory.mktemp("words-evaluate") / "patches"
    for label, pattern in (("tissue", "tissue-*.png"), ("blank", "no-tissue*.png")):
        (folder / label).mkdir(parents=True)
        for p in patches_dir.glob(pattern):
            shutil.copy(p, folder / label / p.name)
    return folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights file: the random-init CNN's state dict (seed 3)."""
    import torch

    from wsi_ssl.encoders import create_encoder

    path = tmp_path_factory.mktemp("words-weights") / "cnn.pt"
    torch.save(create_encoder("random-cnn", seed=3).model.state_dict(), path)
    return path


@pytest.fixture
def weights_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "weights"
    folder.mkdir()
    monkeypatch.setenv("WSI_SSL_WEIGHTS", str(folder))
    return folder


def evaluate(*argv: str) -> tuple[int, str, list[str]]:
    code, out, err = run_cli(["evaluate", *argv, "--quiet", "--bootstrap", "0", "--folds", "2"])
    return code, out, err.splitlines()


def test_loading_an_encoder_from_a_file_is_said_as_it_begins(
    patches: Path, weights: Path, tmp_path: Path
) -> None:
    spec = f"random-cnn,weights={weights}"
    code, out, err = evaluate("--patches", str(patches), "--encoder", spec, "--out", str(tmp_path))
    assert code == 0, err
    assert err[:2] == [
        "evaluating 1 encoder(s) on 1 task(s): patch:patches (patch)",
        f"loading encoder {spec}",  # the file is in the spec: not named twice
    ]
    assert err[2].startswith("encoder random-cnn ready (random-cnn-")
    assert "task patch:patches (patch): 11 items, 2 classes, 2 folds" in out


def test_the_line_comes_before_the_load_ends(
    patches: Path, weights: Path, weights_dir: Path, tmp_path: Path
) -> None:
    """A weights file that does not fit the encoder is found so while it loads: its error
    comes after the line saying it began (a preset's file is named, not being in the spec)."""
    preset = weights_dir / "uni" / "pytorch_model.bin"
    preset.parent.mkdir()
    shutil.copy(weights, preset)
    for spec, line in (
        (f"resnet18,weights={weights}", f"loading encoder resnet18,weights={weights}"),
        ("uni", f"loading encoder uni ({preset})"),
    ):
        code, out, err = evaluate("--patches", str(patches), "--encoder", spec)
        assert code == 2 and out == "", err
        assert err[:2] == ["evaluating 1 encoder(s) on 1 task(s): patch:patches (patch)", line]
        assert len(err) == 3 and err[2].startswith("wsi-ssl: error: ")
        assert "weights do not fit encoder" in err[2]


def test_a_refusal_before_any_load_is_one_line(
    patches: Path, weights: Path, weights_dir: Path, synthetic_root_64: Path, tmp_path: Path
) -> None:
    """A bad spec, a missing weights file (of the second encoder: none is loaded before all
    are found) and bad labels of each kind are refused with one line, though the first
    encoder reads a weights file (which would have said so)."""
    one = tmp_path / "one-class"
    shutil.copytree(patches / "blank", one / "blank")
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("name,class\na,b\n")
    root = str(synthetic_root_64)
    spec = ["--encoder", f"random-cnn,weights={weights}"]
    cases = {
        "is not weights=FILE": ["--patches", str(patches), "--encoder", f"{spec[1]},colour=red"],
        "no weights file for encoder 'uni'": ["--patches", str(patches), *spec, "--encoder", "uni"],
        "only one class ('blank')": ["--patches", str(one), *spec],
        "expected a header with columns path,label": ["--patches", str(bad_csv), *spec],
        "no complete slide store holds labels/nope": [
            *("--root", root, "--tile-labels", "nope", *spec)
        ],
        "expected a header with columns slide,x,y,w,h,label": [
            *("--root", root, "--region-labels", str(bad_csv), *spec)
        ],
        f"{bad_csv}: ": ["--root", root, "--slide-labels", str(bad_csv), *spec],
        f"{bad_csv}:": ["--root", root, "--retrieval-labels", str(bad_csv), *spec],
    }
    for said, argv in cases.items():
        code, out, err = evaluate(*argv, "--out", str(tmp_path / "out"))
        assert code == 2 and out == "", (argv, err)
        assert len(err) == 1 and err[0].startswith("wsi-ssl: error: ") and said in err[0], err
    assert not (tmp_path / "out").exists()
