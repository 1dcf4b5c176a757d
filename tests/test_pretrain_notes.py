"""``wsi-ssl pretrain`` notes on tiny real runs: what is known before training (crops larger
than the tiles, an arch that ``--init`` overrides, a warm-up or a heads-only phase as long as
the run) is said at the start and recorded in ``summary.json``; the summary's paths are
absolute; a recipe without a teacher or a centre records none of theirs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from wsi_ssl.ssl import PretrainConfig, pretrain
from wsi_ssl.storage.atomic import FAULT_ENV

FAST = ["--batch-size", "8", "--device", "cpu", "--num-workers", "0", "--num-threads", "1"]
FAST += ["--local-crop-size", "16", "--out-dim", "64", "--quiet", "--preset", "cpu-small"]
SMALL = ["--global-crop-size", "32"]  # of the 64 px tiles: no upsampling


@pytest.fixture(scope="module")
def root(synthetic_root_64: Path) -> Path:
    return synthetic_root_64


@pytest.fixture(scope="module")
def vit_run(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step DINO ViT run, the init of the runs below."""
    out = tmp_path_factory.mktemp("init") / "vit"
    argv = ["pretrain", str(root), "--out", str(out), *FAST, *SMALL]
    code, _, err = run_cli([*argv, "--arch", "vit_nano_patch8", "--steps", "2"])
    assert code == 0, err
    return out


def _notes(text: str) -> list[str]:
    return [line.removeprefix("note        ") for line in text.splitlines() if "note " in line]


def _backbone(run: Path) -> dict[str, torch.Tensor]:
    data = torch.load(run / "encoder.pt", weights_only=True, map_location="cpu")
    state: dict[str, torch.Tensor] = data["teacher_backbone"]
    return state


def test_notes_known_before_training_are_said_at_the_start_and_recorded(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The crop and arch notes were printed after the last step (hours later on a real run;
    never, when the run failed), and the arch note was missing from ``summary.json``."""
    cnn = tmp_path / "cnn"
    argv = ["pretrain", str(root), *FAST, "--global-crop-size", "96", "--steps", "2"]
    assert run_cli([*argv, "--out", str(cnn)])[0] == 0
    argv += ["--init", str(cnn), "--arch", "vit_nano_patch8", "--checkpoint-every", "1"]
    crop = "tiles of 64 px are smaller than the 96 px global crops: every crop is upsampled"
    arch = f"--arch vit_nano_patch8 not used: --init {cnn} continues its own resnet18_tiny"
    # the run fails at its first checkpoint (a full disk): the notes were already said
    monkeypatch.setenv(FAULT_ENV, "enospc_before_rename:step_00000001")
    code, out, err = run_cli([*argv, "--out", str(tmp_path / "full")])
    assert code == 2 and "No space left" in err
    said = _notes(out)
    assert said[0] == arch and said[1].startswith(crop), out
    monkeypatch.delenv(FAULT_ENV)
    # stopped early, then resumed: the summary keeps the first command's notes
    run = tmp_path / "run"
    code, out, err = run_cli([*argv, "--out", str(run), "--until-step", "1"])
    assert code == 0, err
    assert out.index("note ") < out.index("step 1/2")  # said before the run's report
    code, out, err = run_cli(["pretrain", str(root), "--out", str(run), "--resume", "--json"])
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 2 and summary["notes"][0] == arch
    assert summary["notes"][1].startswith(crop) and json.loads(out)["notes"] == summary["notes"]
    assert _notes(err)[1].startswith(crop)  # under --json on stderr: stdout stays JSON
    # the library calls on_start before the first step; what it returns is recorded
    seen: list[bool] = []

    def on_start(config: PretrainConfig, notes: list[str]) -> list[str]:
        seen.append((tmp_path / "lib" / "metrics.jsonl").exists())
        return ["mine", *notes]

    config = PretrainConfig.preset("cpu-small", batch_size=8, steps=1, device="cpu")
    config = config.replace(num_workers=0, global_crop_size=96, local_crop_size=16, out_dim=64)
    lib = pretrain(root, config, out=tmp_path / "lib", on_start=on_start, until_step=1)
    assert seen == [False] and lib.notes[0] == "mine" and lib.notes[1].startswith(crop)


def test_a_warm_up_or_heads_only_phase_as_long_as_the_run_is_noted(
    root: Path, vit_run: Path, tmp_path: Path
) -> None:
    """``steps()`` cut each warm-up to the run without a word: a 6-step ``--init`` run with
    ``--teacher-warmup-epochs 1`` (10 steps) gave the init's encoder back unchanged, and a
    learning-rate warm-up longer than the run left the rate climbing to the last step."""
    init = ["--init", str(vit_run), "--freeze-blocks", "2", "--teacher-warmup-epochs", "1"]
    argv = ["pretrain", str(root), *FAST, *SMALL, *init, "--steps", "6", "--log-every", "1"]
    code, out, err = run_cli([*argv, "--out", str(tmp_path / "short")])
    assert code == 0, err
    arch, frozen, warm_up = _notes(out)  # the preset's arch: the init's is used
    assert arch.startswith("arch resnet18_tiny of --preset cpu-small not used")
    assert frozen.startswith("teacher_warmup_epochs 1 (10 steps) covers the whole run of 6 steps")
    assert f"encoder.pt keeps the weights of init {vit_run}" in frozen
    assert warm_up.startswith(
        "the learning-rate warm-up (warmup_epochs 2, 20 steps) covers the whole run of 6 steps"
    )
    summary = json.loads((tmp_path / "short" / "summary.json").read_text())
    assert summary["notes"] == [arch, frozen, warm_up]
    before, after = _backbone(vit_run), _backbone(tmp_path / "short")
    assert all(torch.equal(before[k], after[k]) for k in before)  # what the note says
    lines = (tmp_path / "short" / "metrics.jsonl").read_text().splitlines()
    rates = [json.loads(line)["lr"] for line in lines]
    assert len(rates) == 6 and rates == sorted(set(rates))  # climbing to the last step
    # warm-ups shorter than the run (and the init's arch asked): nothing to say; it trains
    toml = tmp_path / "c.toml"
    toml.write_text('arch = "vit_nano_patch8"\nwarmup_epochs = 0.5\nteacher_warmup_epochs = 0.5\n')
    argv = ["pretrain", str(root), *FAST, *SMALL, *init[:4], "--steps", "6", "--config", str(toml)]
    code, out, err = run_cli([*argv, "--out", str(tmp_path / "long")])
    assert code == 0, err
    assert "note" not in out
    assert json.loads((tmp_path / "long" / "summary.json").read_text())["notes"] == []
    trained = _backbone(tmp_path / "long")
    assert not all(torch.equal(before[k], trained[k]) for k in before)


def test_the_summary_records_absolute_paths_for_an_out_typed_relative(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--out ../runs/rel`` was recorded as typed: wrong when summary.json or the --json
    report is read from another folder."""
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    argv = ["pretrain", str(root), "--out", "../runs/rel", *FAST, *SMALL, "--steps", "1"]
    code, out, err = run_cli([*argv, "--json"])
    assert code == 0, err
    run = tmp_path / "runs" / "rel"
    summary = json.loads((run / "summary.json").read_text())
    assert json.loads(out) == summary and summary["out_dir"] == str(run)
    assert summary["checkpoint"] == str(run / "checkpoints" / "step_00000001.pt")
    assert summary["encoder_path"] == str(run / "encoder.pt")
    assert summary["metrics_path"] == str(run / "metrics.jsonl")
    assert summary["loss_plot"] == str(run / "loss.png")


def test_recipes_without_a_teacher_or_a_centre_record_none_of_theirs(
    root: Path, vit_run: Path, tmp_path: Path
) -> None:
    """MAE's metrics rows carried the (unused) teacher momentum and temperature, and a recipe
    without a centre (MAE, DINOv2) recorded the sha256 of nothing as the centre's digest."""
    config = PretrainConfig.preset(
        "cpu-small", arch="vit_nano_patch8", global_crop_size=32, local_crop_size=16
    )
    config = config.replace(batch_size=8, steps=2, log_every=1, device="cpu", num_workers=0)
    config = config.replace(out_dim=64, progress=False)
    mae = pretrain(root, config.replace(method="mae"), out=tmp_path / "mae")
    assert mae.digests["center"] is None and len(mae.history) == 2
    assert not {"momentum", "teacher_temp"} & {k for row in mae.history for k in row}
    assert {"lr", "weight_decay", "mae_loss"} <= set(mae.history[0])
    v2 = pretrain(root, config.replace(method="dinov2"), out=tmp_path / "v2")
    assert json.loads((tmp_path / "v2" / "summary.json").read_text())["digests"]["center"] is None
    assert {"momentum", "teacher_temp"} <= set(v2.history[0])
    dino = json.loads((vit_run / "summary.json").read_text())
    assert len(dino["digests"]["center"]) == 64  # DINO's centre
    assert "momentum" in json.loads((vit_run / "metrics.jsonl").read_text().splitlines()[0])
