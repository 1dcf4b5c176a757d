"""``wsi-ssl pretrain`` edge cases on tiny real runs: an arch that ``--init`` overrides is noted
wherever it was asked for, the files a run reads are recorded absolute (a resume from another
folder finds them), ``--resume`` of a folder that is not there is refused, and a resumed run
keeps the pooling its checkpoint published."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_cli
from wsi_ssl.ssl import PretrainConfig, load_encoder, pretrain
from wsi_ssl.ssl.checkpoint import load_checkpoint, save_checkpoint

FAST = ["--batch-size", "8", "--device", "cpu", "--num-workers", "0", "--num-threads", "1"]
FAST += ["--global-crop-size", "32", "--local-crop-size", "16", "--out-dim", "64", "--quiet"]


@pytest.fixture(scope="module")
def root(synthetic_root_64: Path) -> Path:
    return synthetic_root_64


def _pretrain(root: Path, out: Path, *args: str) -> str:
    code, stdout, err = run_cli(["pretrain", str(root), "--out", str(out), *FAST, *args])
    assert code == 0, err
    return stdout


def test_an_arch_from_the_config_file_or_the_preset_that_init_overrides_is_noted(
    root: Path, tmp_path: Path
) -> None:
    """``--init`` decides the architecture; the one asked for by ``--config`` or ``--preset``
    was dropped without a word (only ``--arch`` was noted)."""
    cnn, vit = tmp_path / "cnn", tmp_path / "vit"
    _pretrain(root, cnn, "--preset", "cpu-small", "--steps", "1")
    _pretrain(root, vit, "--preset", "cpu-small", "--arch", "vit_nano_patch8", "--steps", "1")
    toml = tmp_path / "c.toml"
    toml.write_text('arch = "vit_nano_patch8"\nsteps = 1\n')
    out = _pretrain(
        root, tmp_path / "a", "--preset", "cpu-small", "--config", str(toml), "--init", str(cnn)
    )
    assert f"note        arch vit_nano_patch8 of --config {toml} not used: --init {cnn}" in out
    assert "continues its own resnet18_tiny" in out
    out = _pretrain(
        root, tmp_path / "b", "--preset", "cpu-small", "--init", str(vit), "--steps", "1"
    )
    assert "note        arch resnet18_tiny of --preset cpu-small not used: --init" in out
    assert "continues its own vit_nano_patch8" in out
    toml.write_text('arch = "resnet18_tiny"\nsteps = 1\n')  # the init's own: nothing to say
    out = _pretrain(root, tmp_path / "c", "--config", str(toml), "--init", str(cnn))
    assert "not used" not in out
    # the flag still wins over the file and the preset, and is named as before
    out = _pretrain(
        root,
        tmp_path / "d",
        "--preset",
        "cpu-small",
        "--config",
        str(toml),
        "--arch",
        "vit_nano_patch8",
        "--init",
        str(cnn),
    )
    assert "note        --arch vit_nano_patch8 not used: --init" in out


def test_weights_and_init_run_are_recorded_absolute_and_resume_from_another_folder(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--weights w.pth``, ``--stain-reference ref.png`` and ``--init RUN`` given relative are
    recorded absolute: a run killed before its first checkpoint (or after one) resumes from
    another working folder (it looked for w.pth and ref.png, or took RUN for a registry name,
    there)."""
    import timm
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    torch.save(timm.create_model("vit_tiny_patch16_224").state_dict(), tmp_path / "w.pth")
    stained = np.where(np.arange(64)[:, None, None] < 32, [225, 140, 185], [110, 60, 160])
    Image.fromarray(np.broadcast_to(stained, (64, 64, 3)).astype(np.uint8)).save("ref.png")
    out = tmp_path / "run"
    args = ["--preset", "cpu-small", "--steps", "2", "--checkpoint-every", "1"]
    init = ["--init", "timm/vit_tiny_patch16_224", "--weights", "w.pth"]
    init += ["--stain-normalize", "reinhard", "--stain-reference", "ref.png"]
    _pretrain(root, out, *args, *init, "--until-step", "1")
    recorded = json.loads((out / "config.json").read_text())["config"]
    assert recorded["init_weights"] == str(tmp_path / "w.pth")
    assert recorded["stain_reference"] == str(tmp_path / "ref.png")
    for checkpoint in (out / "checkpoints").glob("step_*.pt"):
        checkpoint.unlink()  # as if killed before its first one
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    resume = ["pretrain", str(root), "--out", str(out), "--resume", "--quiet"]
    code, _, err = run_cli(resume)
    assert code == 0, err
    assert (out / "checkpoints" / "step_00000002.pt").is_file()
    # a run recorded before (relative) still resumes in its folder with the flags re-typed
    monkeypatch.chdir(tmp_path)
    config = json.loads((out / "config.json").read_text())
    config["config"]["init_weights"] = "w.pth"
    (out / "config.json").write_text(json.dumps(config))
    for checkpoint in (out / "checkpoints").glob("step_*.pt"):
        checkpoint.unlink()
    (out / "summary.json").unlink()
    code, _, err = run_cli([*resume, *FAST, *args, *init])
    assert code == 0, err
    # --init RUN relative: resumed from elsewhere after a checkpoint
    _pretrain(root, tmp_path / "next", *args, "--init", "run", "--until-step", "1")
    recorded = json.loads((tmp_path / "next" / "config.json").read_text())["config"]
    assert recorded["init"] == str(out)
    monkeypatch.chdir(elsewhere)
    code, _, err = run_cli(["pretrain", str(root), "--out", str(tmp_path / "next"), "--resume"])
    assert code == 0, err
    assert (tmp_path / "next" / "checkpoints" / "step_00000002.pt").is_file()


def test_resume_of_a_folder_that_is_not_there_is_refused(root: Path, tmp_path: Path) -> None:
    """A mistyped ``--out`` with ``--resume`` started a new run there without a word."""
    out = tmp_path / "typo"
    code, stdout, err = run_cli(
        ["pretrain", str(root), "--out", str(out), *FAST, "--resume", "--steps", "1"]
    )
    assert code == 2 and not stdout
    assert err.strip().splitlines() == [
        f"wsi-ssl: error: {out}: no such run folder to resume; check the path, or drop "
        "--resume to start a new run there"
    ]
    assert not out.exists()


@pytest.fixture(scope="module")
def pooled_preset(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A ViT-Ti zoo preset pooled as Virchow and Midnight are (class + mean token), with
    seeded weights in its published (timm) layout."""
    from safetensors.torch import save_file

    from wsi_ssl.encoders import create_encoder, zoo

    name = "test-edges-pooled-vit-ti"
    kwargs = {"init_values": 1e-5, "dynamic_img_size": True, "output": "cls+mean"}
    zoo._register(
        zoo.Preset(name, "vit_tiny_patch16_224", kwargs, 384, "https://example.org", ("m",), "-")
    )
    torch.manual_seed(3)
    model = create_encoder(name, weights="random").model
    path = tmp_path_factory.mktemp("pooled") / "m.safetensors"
    save_file(
        {k.removeprefix("trunk."): v.contiguous() for k, v in model.state_dict().items()}, path
    )
    return name, path


def test_a_run_resumed_from_before_pooled_output_keeps_its_class_token(
    root: Path, tmp_path: Path, pooled_preset: tuple[str, Path]
) -> None:
    """A run continued from a class + mean preset whose checkpoint was written before the
    pooling was recorded published the class token alone (192 wide); resumed, its later
    checkpoints and encoder.pt kept that width (they switched to 384)."""
    name, weights = pooled_preset
    config = PretrainConfig.preset(
        "cpu-small",
        init=name,
        init_weights=str(weights),
        global_crop_size=32,
        local_crop_size=16,
        out_dim=64,
        batch_size=8,
        steps=2,
        checkpoint_every=1,
        device="cpu",
        num_workers=0,
        num_threads=1,
        progress=False,
    )
    out = tmp_path / "run"
    first = pretrain(root, config, out=out, until_step=1)
    assert load_encoder(out).embed_dim == 384  # a new run pools as its preset
    data = load_checkpoint(first.checkpoint)
    del data["meta"]["encoder"]["output"]  # as the code before the pooling wrote it
    data["meta"]["encoder"]["embed_dim"] = 192
    save_checkpoint(first.checkpoint, data)
    assert load_encoder(first.checkpoint).embed_dim == 192
    resumed = pretrain(root, config, out=out, resume=True)
    assert resumed.step == 2
    for path in (resumed.checkpoint, out / "encoder.pt", out):
        encoder = load_encoder(path)
        assert encoder.description["output"] == "cls" and encoder.embed_dim == 192, path
        assert encoder.embed(torch.zeros(1, 32, 32, 3, dtype=torch.uint8)).shape == (1, 192)
