"""Library errors reach `wsi-ssl` users in each command's words: the advice names the flag
the command has (or its spec syntax), never the Python API's ``weights=PATH`` or
``mixed_scales``, and says nothing odd such as ``'(any)'``.

Every case runs the real CLI (cli/main.py, in-process) on real archives: a synthetic slide
tiled at 64 px, at one scale and at two (``--mpp 0.5,1``), with no weights files at all
(``$WSI_SSL_WEIGHTS`` points at an empty folder)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli


@pytest.fixture(scope="module")
def multi_scale(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder a two-scale tiling wrote: ``mpp-0.5`` and ``mpp-1``, no archive itself."""
    from wsi_ssl.synthetic import write_synthetic_slide

    base = tmp_path_factory.mktemp("multi-scale")
    slide = write_synthetic_slide(base / "s.tiff", (640, 512), seed=1)
    out = base / "tiled"
    argv = ["tile", str(slide), "--out", str(out), "--mpp", "0.5,1", "--tile-size", "64"]
    code, _, err = run_cli([*argv, "--tissue-threshold", "0", "--quiet"])
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["mpp-0.5", "mpp-1"]
    return out


@pytest.fixture
def no_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty weights folder: every preset's weights file is missing."""
    folder = tmp_path / "weights"
    folder.mkdir()
    monkeypatch.setenv("WSI_SSL_WEIGHTS", str(folder))
    return folder


def one_error(argv: list[str]) -> str:
    """The one line a refused command prints (exit code 2, nothing on stdout)."""
    code, out, err = run_cli(argv)
    assert code == 2 and out == "", (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsi-ssl: error: "), err
    return lines[0].removeprefix("wsi-ssl: error: ")


# -- a preset's missing weights file ------------------------------------------------------


def test_a_missing_weights_file_is_advised_as_each_commands_flag(
    synthetic_root_64: Path, no_weights: Path, tmp_path: Path
) -> None:
    """embed and pretrain --init have --weights (pretrain's stores into init_weights); the
    advice named the API's ``weights=PATH`` to pretrain."""
    preset = no_weights / "uni" / "pytorch_model.bin"
    said = one_error(["embed", str(synthetic_root_64), "--encoder", "uni"])
    assert said.startswith(f"{preset}: no weights file for encoder 'uni'; download ")
    assert said.endswith(
        f"put it at {preset}, or pass --weights PATH; wsi-ssl never downloads weights"
    )
    run = ["pretrain", str(synthetic_root_64), "--out", str(tmp_path / "run")]
    run += ["--global-crop-size", "64", "--local-crop-size", "32"]  # no note on the tile size
    said = one_error([*run, "--init", "uni"])
    assert said.endswith(
        f"put it at {preset}, or pass --weights PATH; wsi-ssl never downloads weights"
    )
    plain = no_weights / "vit_small_patch16_224.pth"  # a registered encoder with no model card
    said = one_error([*run, "--init", "vit_small_patch16_224"])
    assert said.startswith(f"{plain}: no weights file for encoder 'vit_small_patch16_224'; ")
    assert said.endswith(" or pass --weights PATH; wsi-ssl never downloads weights")
    assert "weights=" not in said and "(command line" not in said


def test_evaluate_advises_its_spec_syntax_for_a_missing_weights_file(
    no_weights: Path, patches_dir: Path, tmp_path: Path
) -> None:
    """evaluate has no --weights: a weights file is given in the spec (NAME,weights=FILE)."""
    from wsi_ssl.errors import PresetWeightsNotFoundError
    from wsi_ssl.evaluation import PatchTask, evaluate_encoders

    folder = tmp_path / "patches"
    for label, pattern in (("tissue", "tissue-*.png"), ("blank", "no-tissue*.png")):
        (folder / label).mkdir(parents=True)
        for p in patches_dir.glob(pattern):
            shutil.copy(p, folder / label / p.name)
    out = tmp_path / "out"
    for spec in ("uni", "uni,seed=1,label=big"):
        said = one_error(
            ["evaluate", "--patches", str(folder), "--encoder", spec, "--out", str(out)]
        )
        preset = no_weights / "uni" / "pytorch_model.bin"
        assert said.startswith(f"{preset}: no weights file for encoder 'uni'; download ")
        assert said.endswith(
            f"put it at {preset}, or give the encoder as 'uni,weights=PATH'; wsi-ssl never "
            "downloads weights"
        )
    assert not out.exists()
    with pytest.raises(PresetWeightsNotFoundError, match=r"give the encoder as 'uni,weights=PATH'"):
        evaluate_encoders(["uni"], [PatchTask(folder)])


# -- a multi-scale tiling's folder given as one archive ------------------------------------


def test_a_multi_scale_folder_is_refused_in_each_commands_words(
    multi_scale: Path, tmp_path: Path
) -> None:
    """Every command that opens one archive says to name one scale's folder, without the
    aside on pretraining (its ``mixed_scales`` is no flag of theirs); pretrain says to name
    each with --mixed-scales, the same when --mixed-scales was given (it added "(command
    line: --mixed-scales)" to an aside in the API's words)."""
    root = str(multi_scale)
    scales = f"({multi_scale / 'mpp-0.5'}, {multi_scale / 'mpp-1'})"
    refusal = (
        f"{root}: not an archive root but one per scale, written by a multi-scale tile {scales}"
    )
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\ns,a\nt,b\n")
    out = str(tmp_path / "out")
    for argv in (
        ["embed", root, "--encoder", "random-cnn"],
        ["export", root, "--out", out],
        ["index", root],
        ["search", root, "--slide", "s"],
        ["curate", root, "--out", f"{out}.json", "--n-tiles", "5"],
        ["mil", "train", root, "--labels", str(labels), "--out", out],
        ["evaluate", "--root", root, "--tile-labels", "x", "--encoder", "random-cnn"],
    ):
        assert one_error(argv) == f"{refusal}; name one of them", argv
    pretrain = f"{refusal}; name one of them (pretraining reads them all when each is named, "
    for flags in ([], ["--mixed-scales"]):
        said = one_error(["pretrain", root, "--out", out, *flags])
        assert said == f"{pretrain}with --mixed-scales)", flags


# -- no embeddings at all ---------------------------------------------------------------------


def test_export_of_an_archive_never_embedded_says_by_any_encoder(
    synthetic_root_64: Path, tmp_path: Path
) -> None:
    """It said "no complete embeddings '(any)' (available: none); run `wsi-ssl embed` with
    that encoder first", though no encoder was named. (An archive whose one store is damaged
    says so instead: test_walk_fixes_b1.)"""
    root = shutil.copytree(synthetic_root_64, tmp_path / "root")
    said = one_error(["export", str(root), "--out", str(tmp_path / "out")])
    assert said == f"{root}: no complete embeddings by any encoder; run `wsi-ssl embed` first"
