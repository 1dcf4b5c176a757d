"""``wsi-ssl pretrain`` in the words of its users: the warm-up note names a flag that exists
(``--warmup-epochs``), an unfinished run's ``encoder.pt`` is refused as the run is and its
report says how to resume, and a missing ``--init`` weights file is advised as
``init_weights=PATH`` from the API (``--weights PATH`` on the command line)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli
from wsi_ssl.encoders.weights import WEIGHTS_ENV
from wsi_ssl.errors import CheckpointError, WeightsNotFoundError
from wsi_ssl.ssl import PretrainConfig, load_encoder, pretrain

FAST = ["--batch-size", "8", "--device", "cpu", "--num-workers", "0", "--num-threads", "1"]
FAST += ["--local-crop-size", "16", "--out-dim", "64", "--quiet", "--preset", "cpu-small"]
FAST += ["--global-crop-size", "32"]


def _notes(text: str) -> list[str]:
    return [line.removeprefix("note        ") for line in text.splitlines() if "note " in line]


def test_the_warm_up_note_names_the_warmup_epochs_flag_which_sets_it(
    synthetic_root_64: Path, tmp_path: Path
) -> None:
    """The note said "lower warmup_epochs" to a command that had no such flag."""
    argv = ["pretrain", str(synthetic_root_64), *FAST, "--steps", "3"]
    code, out, err = run_cli([*argv, "--out", str(tmp_path / "long")])
    assert code == 0, err
    assert _notes(out) == [
        "the learning-rate warm-up (warmup_epochs 2, 20 steps) covers the whole run of 3 "
        "steps: the learning rate climbs from 0 throughout, never reaching its peak nor "
        "decaying; run more steps, or lower warmup_epochs (command line: --warmup-epochs)"
    ]
    code, out, err = run_cli([*argv, "--out", str(tmp_path / "short"), "--warmup-epochs", "0.1"])
    assert code == 0, err
    assert _notes(out) == []
    info = json.loads((tmp_path / "short" / "config.json").read_text())
    assert info["config"]["warmup_epochs"] == 0.1 and info["schedules"]["warmup_steps"] == 1


def test_an_unfinished_runs_encoder_is_refused_as_the_run_is(
    synthetic_root_64: Path, tmp_path: Path
) -> None:
    """``--until-step`` printed ``encoder RUN/encoder.pt``, which embedded without a word
    while ``--encoder RUN`` was refused as unfinished."""
    run = tmp_path / "unf"
    root = shutil.copytree(synthetic_root_64, tmp_path / "root")
    argv = ["pretrain", str(root), "--out", str(run), *FAST, "--steps", "10"]
    code, out, err = run_cli([*argv, "--until-step", "2"])
    assert code == 0, err
    step = run / "checkpoints" / "step_00000002.pt"
    assert out.splitlines()[-2:] == [
        f"checkpoint  {step}",
        f"stopped     at step 2 of 10; resume it with `wsi-ssl pretrain {root} --out {run} "
        "--resume`, or name the checkpoint to use it as it is",
    ]
    assert (run / "encoder.pt").is_file()  # kept: a repeated call and load_encoder read it
    said = {}
    for named in (run, run / "encoder.pt"):
        code, _, err = run_cli(["embed", str(root), "--encoder", str(named), "--device", "cpu"])
        assert code == 2
        said[named] = err.strip()
    assert said[run] == (
        f"wsi-ssl: error: {run}: an unfinished pretrain run (step 2 of 10: stopped, killed or "
        f"still running); resume it (wsi-ssl pretrain ... --out {run} --resume), or name a "
        f"checkpoint to use it as it is ({step})"
    )
    assert said[run / "encoder.pt"] == said[run].replace(
        f"{run}: an unfinished pretrain run",
        f"{run / 'encoder.pt'}: the encoder of an unfinished run",
    )
    assert not list(root.glob("slides/*.zarr/embeddings/*"))  # nothing embedded
    with pytest.raises(CheckpointError, match="the encoder of an unfinished run"):
        load_encoder(run / "encoder.pt", finished=True)
    assert load_encoder(run / "encoder.pt").description["step"] == 2  # the API reads it
    # the step checkpoint is used as it is; the finished run's encoder.pt embeds
    code, _, err = run_cli(["embed", str(root), "--encoder", str(step), "--device", "cpu"])
    assert code == 0, err
    code, out, err = run_cli(["pretrain", str(root), "--out", str(run), "--resume", "--quiet"])
    assert code == 0, err
    assert f"encoder     {run / 'encoder.pt'}" in out.splitlines() and "stopped" not in out
    code, _, err = run_cli(
        ["embed", str(root), "--encoder", str(run / "encoder.pt"), "--device", "cpu"]
    )
    assert code == 0, err


def test_a_missing_init_weights_file_is_advised_in_each_callers_words(
    synthetic_root_64: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the API the advice said ``weights=PATH``, a field PretrainConfig does not have."""
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "weights"))
    missing = tmp_path / "weights" / "resnet18.pth"
    config = PretrainConfig.preset("cpu-small", batch_size=8, steps=1, device="cpu")
    config = config.replace(num_workers=0, global_crop_size=32, local_crop_size=16, out_dim=64)
    with pytest.raises(WeightsNotFoundError) as info:
        pretrain(synthetic_root_64, config.replace(init="timm/resnet18"), out=tmp_path / "api")
    assert str(info.value) == (
        f"{missing}: no weights file for encoder 'resnet18'; put its state dict there "
        "(torch.save(model.state_dict(), PATH) on a machine that has the weights) or pass "
        "init_weights=PATH; wsi-ssl never downloads weights"
    )
    assert info.value.parameters == ("init_weights",)
    argv = ["pretrain", str(synthetic_root_64), *FAST, "--steps", "1", "--init", "timm/resnet18"]
    code, _, err = run_cli([*argv, "--out", str(tmp_path / "cli")])
    assert code == 2
    assert err.strip() == "wsi-ssl: error: " + str(info.value).replace(
        "init_weights=PATH", "--weights PATH"
    )
