"""``wsi-ssl pretrain`` and ``curate`` on tiny real runs speak in the command's flags: the resume
refusals, a diverged run's advice, the crop note and curate's choice of encoder named the Python
API's settings (``resume=True``, ``global_crop_size``, "the encoder id"). The notes a run's
stores and resume give: a slide given twice at one scale, ``--skip-flagged-tiles`` on stores
without QC scores, a resumed run that goes on in another precision."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import run_cli
from wsi_ssl.errors import ConfigError
from wsi_ssl.ssl import PretrainConfig, pretrain
from wsi_ssl.ssl.notes import precision_note, store_notes
from wsi_ssl.ssl.stores import scan_stores
from wsi_ssl.synthetic import write_synthetic_slide

FAST = ["--preset", "cpu-small", "--batch-size", "8", "--device", "cpu", "--num-workers", "0"]
FAST += ["--num-threads", "1", "--global-crop-size", "32", "--local-crop-size", "16", "--quiet"]


@pytest.fixture(scope="module")
def root(synthetic_root_64: Path) -> Path:
    return synthetic_root_64


def _tiled(source: Path, out: Path, **settings: object) -> Path:
    """``source`` tiled at 64 px into the archive root ``out`` (every tile kept)."""
    from wsi_ssl.config import TilingConfig
    from wsi_ssl.tiling.batch import tile_slide

    config = replace(TilingConfig(tile_size=64, tiles_per_chunk=32), tissue_threshold=0.0)
    tile_slide(source, out, replace(config, **settings))
    return out


def _pretrain(roots: list[Path], out: Path, *args: str) -> tuple[int, str, str]:
    return run_cli(["pretrain", *map(str, roots), "--out", str(out), *FAST, *args])


def _notes(text: str) -> list[str]:
    return [line.removeprefix("note        ") for line in text.splitlines() if "note " in line]


def test_resume_refusals_and_a_diverged_run_advise_the_commands_flags(
    root: Path, tmp_path: Path
) -> None:
    """The refusal to resume with other settings said ``resume=True with other training
    settings``, and a diverged run ``(resume=True)`` after advising a lower base_lr that a
    resume then refuses; the library keeps its own words."""
    run = tmp_path / "run"
    assert _pretrain([root], run, "--steps", "2")[0] == 0
    code, _, err = _pretrain([root], run, "--steps", "2")
    assert code == 2 and "pass --resume to continue it" in err and "resume=True" not in err
    resume = ["pretrain", str(root), "--out", str(run), "--resume", "--quiet"]
    code, _, err = run_cli([*resume, "--seed", "3", "--lr", "1"])
    assert code == 2 and "resuming with other training settings" in err, err
    assert "(base_lr: 0.01 -> 1.0, seed: 0 -> 3)" in err and "resume=True" not in err
    assert err.rstrip().endswith("(command line: --lr, --seed, --out)"), err
    config = PretrainConfig.preset("cpu-small", steps=2, batch_size=8, seed=3)
    with pytest.raises(ConfigError, match="other training settings") as caught:
        pretrain(
            root, config.replace(global_crop_size=32, local_crop_size=16), out=run, resume=True
        )
    assert "seed: 0 -> 3" in str(caught.value) and "--" not in str(caught.value)
    toml = tmp_path / "warm.toml"
    toml.write_text("warmup_epochs = 0\n")
    argv = ["--steps", "4", "--lr", "1e38", "--log-every", "1", "--config", str(toml)]
    code, _, err = _pretrain([root], tmp_path / "nan", *argv)
    assert code == 2 and "loss became nan" in err, err
    assert "resume from the last checkpoint with --precision fp32 (pass --resume)" in err
    assert "resume=True" not in err and "(command line: --out, --lr)" in err
    # fp16 on a CPU: the two precisions it can use, as flags
    for device in ("cpu", "auto"):
        code, _, err = _pretrain(
            [root], tmp_path / "fp16", "--precision", "fp16", "--device", device
        )
        assert code == 2 and "use --precision bf16 or --precision fp32" in err, err


def test_the_crop_note_names_the_flag(root: Path, tmp_path: Path) -> None:
    """Crops larger than the tiles: the note said ``set global_crop_size <= 64``."""
    code, out, err = _pretrain([root], tmp_path / "run", "--steps", "1", "--global-crop-size", "96")
    assert code == 0, err
    (crop,) = [n for n in _notes(out) if "upsampled" in n]
    assert crop.endswith(
        "re-tile at a tile size of 96 px or more, or set --global-crop-size 64 (or less)"
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert crop in summary["notes"]
    config = PretrainConfig.preset("cpu-small", steps=1, batch_size=8, device="cpu")
    config = config.replace(num_workers=0, global_crop_size=96, local_crop_size=16)
    lib = pretrain(root, config, out=tmp_path / "lib")
    assert any(n.endswith("or set global_crop_size=64 (or less)") for n in lib.notes)


def test_curate_names_its_encoder_flag(small_archive: Path, tmp_path: Path) -> None:
    """Two encoders' embeddings and no ``--encoder``: "pass the encoder id" named no flag
    (curate's destination was encoder_id, the error's parameter is encoder)."""
    archive = shutil.copytree(small_archive, tmp_path / "root")
    argv = ["embed", str(archive), "--encoder", "random-cnn", "--seed", "1", "--device", "cpu"]
    assert run_cli([*argv, "--quiet"])[0] == 0
    cur = ["curate", str(archive), "--out", str(tmp_path / "c.json"), "--n-tiles", "4"]
    code, _, err = run_cli(cur)
    assert code == 2 and "embeddings of 2 encoders" in err, err
    assert err.rstrip().endswith("to choose one (command line: --encoder)"), err
    code, _, err = run_cli([*cur, "--encoder", "random"])
    assert code == 2 and err.rstrip().endswith("(command line: --encoder)"), err
    ids = sorted(p.name for p in next((archive / "slides").glob("*.zarr")).glob("embeddings/*"))
    code, out, err = run_cli([*cur, "--encoder", ids[0]])
    assert code == 0 and ids[0] in out, err


def test_a_slide_given_twice_at_one_scale_is_noted(root: Path, tmp_path: Path) -> None:
    """An archive copied, or a slide tiled into a second root, both given: every tile was
    trained on twice without a word. The same slide at another scale (``--mixed-scales``)
    is not a copy."""
    (slide_id,) = [p.name.removesuffix(".zarr") for p in (root / "slides").glob("*.zarr")]
    copy = shutil.copytree(root, tmp_path / "copy")
    again = _tiled(root.parent / "s.tiff", tmp_path / "again")
    for other in (copy, again):
        code, out, err = _pretrain([root, other], tmp_path / f"run-{other.name}", "--steps", "1")
        assert code == 0, err
        (note,) = [n for n in _notes(out) if "more than one" in n]
        assert note.startswith(
            f"1 slide is in more than one of the stores given at one scale ({slide_id}; in "
        )
        assert str(root.resolve()) in note and str(other.resolve()) in note
        assert "counted twice" in note
        summary = json.loads((tmp_path / f"run-{other.name}" / "summary.json").read_text())
        assert note in summary["notes"]
    coarse = _tiled(root.parent / "s.tiff", tmp_path / "coarse", mpp=1.0)
    code, out, err = _pretrain(
        [root, coarse], tmp_path / "scales", "--steps", "1", "--mixed-scales"
    )
    assert code == 0, err
    assert not [n for n in _notes(out) if "more than one" in n]
    code, out, err = _pretrain([root], tmp_path / "once", "--steps", "1")
    assert code == 0 and not [n for n in _notes(out) if "more than one" in n], err


def test_skip_flagged_tiles_on_stores_without_qc_scores_is_noted(
    root: Path, tmp_path: Path
) -> None:
    """``--skip-flagged-tiles`` on a store tiled with ``--no-qc`` skipped nothing, silently."""
    bare = _tiled(root.parent / "s.tiff", tmp_path / "bare", qc=False)
    code, out, err = _pretrain([bare], tmp_path / "a", "--steps", "1", "--skip-flagged-tiles")
    assert code == 0, err
    (store,) = (bare / "slides").glob("*.zarr")
    (note,) = [n for n in _notes(out) if "QC scores" in n]
    assert note.startswith(f"the store has no QC scores (tiled without QC: {store.resolve()}): ")
    assert "skips none of its tiles" in note and note.endswith(
        "(command line: --skip-flagged-tiles)"
    )
    source = write_synthetic_slide(tmp_path / "u.tiff", (640, 512), seed=2)
    both = [_tiled(source, tmp_path / "scored"), bare]
    code, out, err = _pretrain(both, tmp_path / "b", "--steps", "1", "--skip-flagged-tiles")
    assert code == 0, err
    (note,) = [n for n in _notes(out) if "QC scores" in n]
    assert note.startswith(
        f"1 of the 2 stores has no QC scores (tiled without QC: {store.resolve()})"
    )
    code, out, err = _pretrain(both, tmp_path / "c", "--steps", "1")  # not asked: nothing said
    assert code == 0 and not [n for n in _notes(out) if "QC scores" in n], err
    code, out, err = _pretrain(both[:1], tmp_path / "d", "--steps", "1", "--skip-flagged-tiles")
    assert code == 0 and not [n for n in _notes(out) if "QC scores" in n], err


def test_the_qc_note_reads_no_scores(root: Path, tmp_path: Path) -> None:
    """Whether a store has QC scores was found by reading every score array of every store
    (per rank, before training); their metadata says it: a store whose score chunks no longer
    decode is still one with scores, and a store tiled without QC still one without."""
    scored = shutil.copytree(root, tmp_path / "scored")
    chunks = [f for f in (scored / "slides").glob("*.zarr/qc/*/c/**/*") if f.is_file()]
    assert chunks
    for chunk in chunks:  # bytes no codec decodes
        chunk.write_bytes(b"not a chunk")
    config = PretrainConfig(skip_flagged_tiles=True)
    assert store_notes(config, scan_stores([scored])) == []
    bare = _tiled(root.parent / "s.tiff", tmp_path / "bare", qc=False)
    notes = store_notes(config, scan_stores([scored, bare]))  # and the slide given twice
    (note,) = [n for n in notes if "QC scores" in n]
    assert note.startswith("1 of the 2 stores has no QC scores (tiled without QC: ")


def test_a_resume_in_another_precision_is_noted(root: Path, tmp_path: Path) -> None:
    """A run begun in bf16 resumed in fp32 (asked, or ``precision auto`` on a CPU, as a GPU
    run resumed on a CPU) went on without a word; resumed as it began, nothing is said."""
    run = tmp_path / "run"
    argv = ["--steps", "3", "--precision", "bf16", "--checkpoint-every", "1"]
    argv += ["--lr", "1e-5"]  # three steps that never diverge (a NaN at step 3 was seen once)
    assert _pretrain([root], run, *argv, "--until-step", "1")[0] == 0
    resume = ["pretrain", str(root), "--out", str(run), "--resume", "--quiet"]
    code, out, err = run_cli([*resume, "--precision", "auto", "--until-step", "2"])
    assert code == 0, err
    (note,) = [n for n in _notes(out) if "precision" in n]
    assert note == (
        "the checkpoint it resumes from (step 1) was saved by a run in bf16, this run goes on in "
        "fp32 (precision auto on cpu): the run mixes the two, not what a run in one precision "
        "computes; set --precision bf16 to go on in bf16"
    )
    code, out, err = run_cli(resume)  # from a step run in fp32, in fp32: the note is kept
    assert code == 0, err
    assert [n for n in _notes(out) if "precision" in n] == [note]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 3 and note in summary["notes"]
    # a checkpoint's precision is that of the run that saved it, not of the steps before it
    (again,) = precision_note(
        {"precision": "fp32", "step": 2}, "bf16", PretrainConfig(precision="bf16"), "cpu"
    )
    assert again.startswith(
        "the checkpoint it resumes from (step 2) was saved by a run in fp32, this run goes on "
        "in bf16: "
    )
    other = tmp_path / "other"
    assert _pretrain([root], other, *argv, "--until-step", "1")[0] == 0
    code, out, err = run_cli([*resume[:3], str(other), "--resume", "--quiet"])
    assert code == 0 and not [n for n in _notes(out) if "precision" in n], err
