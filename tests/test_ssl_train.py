"""The pretraining loop on real tiles: outputs, exact resume, refusals, CLI, demo."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import wsi_ssl
from wsi_ssl.cli import pretrain as cli
from wsi_ssl.errors import (
    CheckpointError,
    ConfigError,
    DeviceUnavailableError,
    SchemaMismatchError,
    StoreNotFoundError,
)
from wsi_ssl.ssl import PretrainConfig, load_encoder, pretrain
from wsi_ssl.ssl.checkpoint import checkpoint_paths, load_checkpoint
from wsi_ssl.ssl.demo import demo_pretrain
from wsi_ssl.storage import open_store


@pytest.fixture(scope="module")
def cmu_root(cmu_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CMU-1-Small-Region tiled at 64 px, 0.5 µm/px (about 600 real H&E tiles)."""
    root = tmp_path_factory.mktemp("cmu64")
    wsi_ssl.tile_slide(cmu_small, root, wsi_ssl.TilingConfig(tile_size=64, tiles_per_chunk=32))
    return root


def tiny(**changes) -> PretrainConfig:
    """A configuration that trains a step in a fraction of a second on one CPU thread."""
    base = {
        "arch": "resnet18_tiny",
        "global_crop_size": 32,
        "local_crop_size": 16,
        "out_dim": 128,
        "hidden_dim": 64,
        "bottleneck_dim": 32,
        "batch_size": 8,
        "steps": 6,
        "device": "cpu",
        "num_workers": 0,
        "num_threads": 1,
        "progress": False,
        "log_every": 2,
        "checkpoint_every": 3,
    }
    return PretrainConfig.preset("cpu-small", **{**base, **changes})


@pytest.fixture(scope="module")
def finished_run(cmu_root: Path, tmp_path_factory: pytest.TempPathFactory):
    return pretrain(cmu_root, tiny(), out=tmp_path_factory.mktemp("runs") / "run")


def test_a_run_writes_metrics_plot_checkpoints_and_encoder(finished_run) -> None:
    run = finished_run
    assert run.finished and run.step == run.total_steps == 6
    out = run.out_dir
    for name in ("config.json", "metrics.jsonl", "loss.png", "encoder.pt", "summary.json"):
        assert (out / name).is_file(), name
    assert [p.name for p in checkpoint_paths(out)] == ["step_00000003.pt", "step_00000006.pt"]
    assert [r["step"] for r in run.history] == [2, 4, 6]
    assert all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in run.history)
    assert set(run.history[0]) >= {"lr", "weight_decay", "momentum", "teacher_temp", "epoch"}
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 6 and summary["sources"]["n_slides"] == 1
    meta = load_checkpoint(run.checkpoint)["meta"]
    assert meta["config"] == run.config.to_dict()
    assert meta["wsi_ssl_version"] == wsi_ssl.__version__
    assert meta["sources"]["slides"][0]["slide_id"] in open_store(run.sources["roots"][0]).slide_ids


def test_load_encoder_gives_the_teacher_backbone(finished_run, cmu_root: Path) -> None:
    encoder = load_encoder(finished_run.out_dir)
    model, description = encoder  # a (model, description) tuple
    json.dumps(description)
    assert description["arch"] == "resnet18_tiny" and description["embed_dim"] == 128
    assert description["input_size"] == 32 and description["which"] == "teacher"
    assert description["mean"] == list(finished_run.config.mean) and description["finished"]
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert model(torch.randn(3, 3, 32, 32)).shape == (3, 128)
    store = open_store(cmu_root).slide(open_store(cmu_root).slide_ids[0])
    features = encoder.embed(store.tiles[:5])
    assert features.shape == (5, 128) and features.dtype == np.float32
    # encoder.pt holds the same teacher backbone
    small = load_encoder(finished_run.out_dir / "encoder.pt")
    for a, b in zip(model.state_dict().values(), small.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # as an embedding encoder it knows its scale: 64 px tiles at ~0.5 µm/px seen at 32 px
    from wsi_ssl.encoders import create_encoder
    from wsi_ssl.encoders._checkpoint import trained_mpp

    assert description["sources"]["tile_sizes"] == [64]
    mpp = description["sources"]["mpp"]  # the stores' effective µm/px (CMU-1: 0.499)
    assert abs(mpp - 0.5) < 0.01
    assert create_encoder(finished_run.out_dir).config.mpp == (round(mpp * 64 / 32, 4),)
    mixed = {"sources": {**description["sources"], "tile_sizes": [64, 128]}}
    assert trained_mpp(mixed, 32) == ()  # several tile sizes: no one scale to check
    student = load_encoder(finished_run.checkpoint, which="student")
    assert student.description["which"] == "student"
    with pytest.raises(CheckpointError, match="for arch 'resnet18_tiny', not 'resnet18'"):
        load_encoder(finished_run.out_dir, arch="resnet18")


def _final_state(run_dir: Path) -> dict:
    return load_checkpoint(checkpoint_paths(run_dir)[-1])


@pytest.mark.parametrize("augment", ["loader", "batch"])
def test_resume_continues_exactly(cmu_root: Path, tmp_path: Path, augment: str) -> None:
    config = tiny(augment=augment, drop_path_rate=0.1)  # drop path: the global RNG matters too
    whole = pretrain(cmu_root, config, out=tmp_path / "whole")
    part = pretrain(cmu_root, config, out=tmp_path / "part", until_step=3)
    assert part.step == 3 and not part.finished
    if augment == "loader":  # an unfinished run is no encoder, unless a checkpoint is named
        from wsi_ssl.encoders import create_encoder
        from wsi_ssl.errors import CheckpointError

        with pytest.raises(CheckpointError, match=r"unfinished pretrain run \(step 3 of 6"):
            create_encoder(str(tmp_path / "part"))
        named = create_encoder(str(checkpoint_paths(tmp_path / "part")[-1]))
        assert named.config.embed_dim > 0
    # a different runtime setting (loader workers) must not change the result
    resumed = pretrain(cmu_root, config.replace(num_workers=1), out=tmp_path / "part", resume=True)
    assert resumed.step == 6
    a, b = _final_state(tmp_path / "whole"), _final_state(tmp_path / "part")
    for key in ("student", "teacher"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    assert torch.equal(a["center"], b["center"])
    for sa, sb in zip(
        a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
    ):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(
            sa["exp_avg_sq"], sb["exp_avg_sq"]
        )
    assert [r["loss"] for r in whole.history] == [r["loss"] for r in resumed.history]
    assert whole.digests["teacher"] == resumed.digests["teacher"]
    # training seconds go on across the resume: the first resumed row counts the first part
    seconds = [r["seconds"] for r in resumed.history]
    before = [r["seconds"] for r in part.history]
    assert len(seconds) == len(whole.history) > len(before) > 0
    assert seconds[: len(before)] == before and seconds[len(before)] > before[-1]


def test_refuses_to_mix_runs(finished_run, cmu_root: Path) -> None:
    out = finished_run.out_dir
    with pytest.raises(ConfigError, match=r"already holds a run.*resume=True"):
        pretrain(cmu_root, tiny(), out=out)
    with pytest.raises(CheckpointError, match="for arch 'resnet18_tiny', not 'resnet18_slim'"):
        pretrain(cmu_root, tiny(arch="resnet18_slim"), out=out, resume=True)
    with pytest.raises(ConfigError, match=r"other training settings.*base_lr"):
        pretrain(cmu_root, tiny(base_lr=0.1), out=out, resume=True)
    again = pretrain(cmu_root, None, out=out, resume=True)  # finished: nothing to do
    assert again.step == 6 and again.config == finished_run.config


def test_resuming_a_finished_run_keeps_its_outputs(
    finished_run, cmu_root: Path, tmp_path: Path
) -> None:
    """A re-run with nothing left to train (the demo's second run) leaves the encoder, loss
    plot and summary (with the speed measured) as they were; one whose last call was killed
    before ``summary.json`` writes them."""
    out = tmp_path / "copy"
    shutil.copytree(finished_run.out_dir, out, copy_function=shutil.copy2)
    names = ("encoder.pt", "loss.png", "summary.json")
    before = {n: ((out / n).read_bytes(), (out / n).stat().st_mtime_ns) for n in names}
    again = pretrain(cmu_root, None, out=out, resume=True)
    assert {n: ((out / n).read_bytes(), (out / n).stat().st_mtime_ns) for n in names} == before
    assert again.images_per_s is None and again.final_loss == finished_run.final_loss
    assert again.encoder_path == out / "encoder.pt" and again.loss_plot == out / "loss.png"
    assert json.loads((out / "summary.json").read_text())["images_per_s"] > 0
    (out / "summary.json").unlink()  # killed between the last checkpoint and the summary
    (out / "encoder.pt").unlink()
    pretrain(cmu_root, None, out=out, resume=True)
    assert json.loads((out / "summary.json").read_text())["step"] == 6
    assert load_encoder(out / "encoder.pt").description["step"] == 6


def test_truncated_checkpoint_is_a_checkpoint_error(
    finished_run, cmu_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(finished_run.out_dir, out)
    last = checkpoint_paths(out)[-1]
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        pretrain(cmu_root, tiny(), out=out, resume=True)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_encoder(out)


def test_bad_inputs(cmu_root: Path, tmp_path: Path) -> None:
    with pytest.raises(
        SchemaMismatchError, match="tiles are 64 px but the config expects tile_size=256"
    ):
        pretrain(cmu_root, tiny(tile_size=256), out=tmp_path / "a")
    with pytest.raises(StoreNotFoundError):
        pretrain(tmp_path / "nothing", tiny(), out=tmp_path / "b")
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        pretrain(cmu_root, tiny(batch_size=5000), out=tmp_path / "c")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError, match="device 'cuda' requested"):
            pretrain(cmu_root, tiny(device="cuda"), out=tmp_path / "d")
    assert not (tmp_path / "a").exists()  # refused before writing anything


def _cli(*argv: str) -> int:
    return cli.main([str(a) for a in argv])


def test_cli_trains_resumes_and_reports_errors_in_one_line(
    cmu_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = [
        "--preset", "cpu-small", "--arch", "resnet18_tiny", "--global-crop-size", "32",
        "--local-crop-size", "16", "--out-dim", "64", "--batch-size", "8", "--steps", "4",
        "--device", "cpu", "--num-workers", "0", "--log-every", "1", "--quiet",
    ]  # fmt: skip
    out = tmp_path / "run"
    assert _cli(cmu_root, "--out", out, *common, "--until-step", "2") == 0
    printed = capsys.readouterr().out
    assert "step 2/4" in printed and f"metrics     {out / 'metrics.jsonl'}" in printed
    early = ["--out", tmp_path / "early", *common, "--until-step", "1", "--log-every", "3"]
    assert _cli(cmu_root, *early) == 0  # no row yet: no metrics file to point at
    assert "step 1/4" in (printed := capsys.readouterr().out) and "metrics " not in printed
    assert _cli(cmu_root, "--out", out, "--resume", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 4 and summary["finished"] and summary["config"]["out_dim"] == 64
    assert not any("global crops" in n for n in summary["notes"])  # 32 px crops of 64 px tiles
    # crops larger than the tiles: the run says every crop was upsampled
    big = [*common[:5], "96", *common[6:]]  # --global-crop-size 96
    assert _cli(cmu_root, "--out", tmp_path / "big", *big, "--steps", "1") == 0
    said = capsys.readouterr().out
    assert "note        tiles of 64 px are smaller than the 96 px global crops" in said, said
    assert _cli(cmu_root, "--out", out, *common) == 2
    err = capsys.readouterr().err
    assert err.startswith("wsi-ssl: error: ") and err.count("\n") == 1 and "--resume" in err
    assert _cli(tmp_path / "nowhere", "--out", tmp_path / "x", *common) == 2
    assert "no such archive root" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert _cli(cmu_root, "--out", tmp_path / "y", *common[:-5], "--device", "cuda") == 2
        assert "CUDA" in capsys.readouterr().err


def test_demo_returns_a_run_with_its_loss_plot(cmu_root: Path, tmp_path: Path) -> None:
    run = demo_pretrain(cmu_root, tmp_path / "demo", steps=3, batch_size=8)
    assert run.finished and run.loss_plot is not None and run.loss_plot.is_file()
    assert run.images_per_s and run.images_per_s > 0


def test_bf16_autocast_and_balanced_sampling_run_on_the_cpu(cmu_root: Path, tmp_path: Path) -> None:
    # in a fresh process: after some earlier embedding tests in the same process, CPU bf16
    # kernels have been seen to give a NaN loss here (not understood yet; see the notes)
    code = (
        f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "from test_ssl_train import tiny; "
        "from wsi_ssl.ssl import pretrain; "
        f"run = pretrain({str(cmu_root)!r}, tiny(precision='bf16', sampling='balanced', steps=2), "
        f"out={str(tmp_path / 'bf16')!r}); print(json.dumps([run.finished, run.final_loss]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    finished, loss = json.loads(out.stdout.strip().splitlines()[-1])
    assert finished and np.isfinite(loss)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["precision"] == "bf16"


def test_loss_plot_of_one_logged_step_shows_the_point(tmp_path: Path) -> None:
    """A run that logged one step draws a marker (a one-point line draws nothing)."""
    from PIL import Image

    from wsi_ssl.ssl.metrics import plot_loss

    png = plot_loss([{"step": 6, "loss": 1.5, "lr": 0.001}], tmp_path / "loss.png", title="mae")
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    blue = np.abs(pixels - np.array([31, 119, 180])).sum(axis=2) < 30  # matplotlib's tab:blue
    assert blue[:, pixels.shape[1] // 5 :].sum() > 20  # right of the blue axis label


def test_resume_on_other_tiles_names_what_changed() -> None:
    """Resuming on other tiles lists the slides added, gone and tiled otherwise, each once
    (a slide tiled otherwise was listed as both added and gone or changed)."""
    from wsi_ssl.ssl.resume import check_same_run

    def sources(slides: dict[str, int]) -> dict[str, Any]:
        rows = [{"slide_id": s, "n_tiles": n} for s, n in slides.items()]
        return {"slides": rows, "n_tiles": sum(slides.values())}

    meta = {"sources": sources({"a": 10, "b": 20, "c": 5}), "global_batch": 8}
    check_same_run(meta, sources({"c": 5, "a": 10, "b": 20}), 8, Path("run"))
    with pytest.raises(CheckpointError) as info:
        check_same_run(meta, sources({"a": 10, "b": 24, "d": 3}), 8, Path("run"))
    message = str(info.value)
    assert "3 slides / 35 tiles, but the stores now hold 3 / 37" in message
    assert "(added: d; gone: c; with other tiles: b)" in message
