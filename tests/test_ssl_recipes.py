"""DINOv2 and MAE runs on real tiles (a few real steps: finite, falling loss; exact resume;
a loadable encoder), continued pretraining from registry weights or a previous run, and the
typed refusals of an architecture a method cannot use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import wsi_ssl
from tests.conftest import run_cli
from wsi_ssl.encoders import create_encoder
from wsi_ssl.errors import ArchitectureMismatchError, ConfigError, WeightsNotFoundError
from wsi_ssl.ssl import PretrainConfig, load_encoder, pretrain, random_encoder
from wsi_ssl.ssl.checkpoint import load_checkpoint
from wsi_ssl.ssl.optim import layer_of, param_groups
from wsi_ssl.ssl.runtime import DistContext
from wsi_ssl.ssl.trainer import Trainer


@pytest.fixture(scope="module")
def cmu_root(cmu_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cmu64")
    wsi_ssl.tile_slide(cmu_small, root, wsi_ssl.TilingConfig(tile_size=64, tiles_per_chunk=32))
    return root


def tiny(method: str, **changes) -> PretrainConfig:
    base = {
        "method": method,
        "arch": "vit_nano_patch8",
        "global_crop_size": 32,
        "local_crop_size": 16,
        "out_dim": 128,
        "hidden_dim": 64,
        "bottleneck_dim": 32,
        "decoder_dim": 64,
        "decoder_depth": 1,
        "decoder_heads": 4,
        "batch_size": 8,
        "steps": 8,
        "base_lr": 0.005,
        "device": "cpu",
        "num_workers": 0,
        "num_threads": 1,
        "progress": False,
        "log_every": 2,
        "checkpoint_every": 4,
    }
    return PretrainConfig.preset("cpu-small", **{**base, **changes})


@pytest.mark.parametrize("method", ["dinov2", "mae"])
def test_recipe_learns_resumes_exactly_and_gives_an_encoder(
    method: str, cmu_root: Path, tmp_path: Path
) -> None:
    whole = pretrain(cmu_root, tiny(method), out=tmp_path / "whole")
    losses = [r["loss"] for r in whole.history]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    parts = {"dinov2": {"dino_loss", "ibot_loss", "koleo"}, "mae": {"mae_loss"}}[method]
    assert parts <= set(whole.history[-1])
    first = pretrain(cmu_root, tiny(method), out=tmp_path / "split", until_step=4)
    assert first.step == 4
    resumed = pretrain(cmu_root, tiny(method), out=tmp_path / "split", resume=True)
    assert resumed.step == 8
    for key in ("teacher", "student", "center"):
        assert resumed.digests[key] == whole.digests[key], key
    assert [r["loss"] for r in resumed.history] == losses
    # each logged term is its mean over the same steps as the loss (it was the last step's),
    # so the terms add up to the logged loss, and a resumed run logs the same terms
    config = tiny(method)
    for row in whole.history:
        total = (
            row["dino_loss"]
            + config.ibot_loss_weight * row["ibot_loss"]
            + config.koleo_loss_weight * row["koleo"]
            if method == "dinov2"
            else row["mae_loss"]
        )
        assert total == pytest.approx(row["loss"], rel=1e-5, abs=1e-6)
    assert [[r[k] for k in sorted(parts)] for r in resumed.history] == [
        [r[k] for k in sorted(parts)] for r in whole.history
    ]
    data = load_checkpoint(resumed.checkpoint)
    assert data["meta"]["config"]["method"] == method
    encoder = load_encoder(resumed.out_dir)
    feats = encoder.embed(np.full((2, 64, 64, 3), 200, np.uint8))
    assert feats.shape == (2, 192) and np.isfinite(feats).all()


@pytest.mark.parametrize("method", ["dinov2", "mae"])
def test_a_masking_method_refuses_a_cnn(method: str, cmu_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ArchitectureMismatchError, match="ViT"):
        tiny(method, arch="resnet18_tiny")
    with pytest.raises(ArchitectureMismatchError, match="ViT"):
        pretrain(cmu_root, tiny(method, init="random-cnn", init_weights="random"), out=tmp_path)
    code, out, err = run_cli(
        [
            "pretrain",
            str(cmu_root),
            "--out",
            str(tmp_path / "cli"),
            "--method",
            method,
            "--arch",
            "resnet18_tiny",
            "--quiet",
        ]
    )
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "ViT" in err
    assert "or --method dino" in err and "method='dino'" not in err  # the CLI's words


@pytest.fixture(scope="module")
def vit_tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local state dict for timm's ViT-Ti/16 (seeded, as a lab's own weights would be)."""
    import timm

    torch.manual_seed(7)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    path = tmp_path_factory.mktemp("weights") / "vit_tiny.pth"
    torch.save(model.state_dict(), path)
    return path


def _trainer(root: Path, config: PretrainConfig, out: Path) -> Trainer:
    trainer = Trainer([root], config, out, resume=False, until_step=None, ctx=DistContext())
    trainer.build()
    return trainer


def test_init_starts_student_and_teacher_from_the_weights(
    cmu_root: Path, vit_tiny_weights: Path, tmp_path: Path
) -> None:
    config = tiny(
        "dinov2",
        init="timm/vit_tiny_patch16_224",
        init_weights=str(vit_tiny_weights),
        global_crop_size=64,
    )
    trainer = _trainer(cmu_root, config, tmp_path)
    assert trainer.config.arch == "encoder:timm/vit_tiny_patch16_224"
    saved = torch.load(vit_tiny_weights)
    for model in (trainer.student, trainer.teacher):
        state = model.backbone.state_dict()
        assert all(torch.equal(state[k], saved[k]) for k in saved)


def test_continued_pretraining_freezes_warms_up_and_decays(
    cmu_root: Path, vit_tiny_weights: Path, tmp_path: Path
) -> None:
    config = tiny(
        "dino",
        init="timm/vit_tiny_patch16_224",
        init_weights=str(vit_tiny_weights),
        global_crop_size=64,
        steps=4,
        freeze_blocks=2,
        layer_decay=0.5,
        teacher_warmup_epochs=1 / 77,  # 77 steps per epoch: the first step only
        batch_size=8,
    )
    run = pretrain(cmu_root, config, out=tmp_path / "run")
    assert run.finished
    saved = torch.load(vit_tiny_weights)
    encoder = load_encoder(run.out_dir, which="student")
    after = encoder.model.state_dict()
    early = ("patch_embed.", "cls_token", "pos_embed", "blocks.0.", "blocks.1.")
    frozen = [k for k in saved if k.startswith(early)]
    moved = [k for k in saved if k.startswith("blocks.11.") and k.endswith("weight")]
    assert frozen and all(torch.equal(after[k], saved[k]) for k in frozen)
    assert all((after[k] - saved[k]).abs().max() > 1e-5 for k in moved)
    teacher = load_encoder(run.out_dir).model.state_dict()
    # the teacher's EMA of an unchanged weight rounds to within an ulp of it
    assert all(torch.allclose(teacher[k], saved[k], rtol=0, atol=1e-6) for k in frozen)
    assert encoder.description["arch"] == "encoder:timm/vit_tiny_patch16_224"


def test_teacher_warmup_holds_the_backbone_still(
    cmu_root: Path, vit_tiny_weights: Path, tmp_path: Path
) -> None:
    config = tiny(
        "dino",
        init="timm/vit_tiny_patch16_224",
        init_weights=str(vit_tiny_weights),
        global_crop_size=64,
        steps=2,
        teacher_warmup_epochs=1,
        warmup_epochs=0,
    )
    trainer = _trainer(cmu_root, config, tmp_path)
    head_before = [p.detach().clone() for p in trainer.student.head.parameters()]
    views = [torch.randn(8, 3, 64, 64)] * 2 + [torch.randn(8, 3, 16, 16)] * 6
    trainer.train_step(views, 0, None)
    saved = torch.load(vit_tiny_weights)
    for model in (trainer.student, trainer.teacher):
        state = model.backbone.state_dict()
        assert all(torch.equal(state[k], saved[k]) for k in saved)
    head_after = list(trainer.student.head.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(head_before, head_after, strict=True))
    teacher_head = list(trainer.teacher.head.parameters())  # momentum 0: a copy
    assert all(torch.equal(a, b) for a, b in zip(head_after, teacher_head, strict=True))


@pytest.fixture(scope="module")
def pooled_preset(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A zoo preset built as the published ones are (a timm ViT in the pooling tower, class +
    mean token output), ViT-Ti sized, with seeded weights in its published (timm) layout."""
    from safetensors.torch import save_file

    from wsi_ssl.encoders import create_encoder, zoo

    name = "test-pooled-vit-ti"
    kwargs = {"init_values": 1e-5, "dynamic_img_size": True, "output": "cls+mean"}
    card = "https://example.org/test"
    zoo._register(zoo.Preset(name, "vit_tiny_patch16_224", kwargs, 384, card, ("m.st",), "-"))
    torch.manual_seed(11)
    model = create_encoder(name, weights="random").model
    for param in model.parameters():
        param.data.normal_(0, 0.02)
    path = tmp_path_factory.mktemp("preset") / "m.safetensors"
    save_file(
        {k.removeprefix("trunk."): v.contiguous() for k, v in model.state_dict().items()}, path
    )
    return name, path


@pytest.mark.parametrize("method", ["dino", "dinov2", "mae"])
def test_continued_pretraining_from_a_zoo_preset(
    cmu_root: Path, pooled_preset: tuple[str, Path], tmp_path: Path, method: str
) -> None:
    """A run continued from a zoo preset trains the ViT inside its pooling tower under every
    recipe, at any crop size, with frozen blocks and layer decay (presets were taken for
    CNNs: DINOv2 and MAE refused them, DINO failed at crops other than 224 px)."""
    from safetensors.torch import load_file

    name, weights = pooled_preset
    config = tiny(method, init=name, init_weights=str(weights), global_crop_size=64)
    config = config.replace(local_crop_size=32, steps=2, freeze_blocks=2, layer_decay=0.75)
    run = pretrain(cmu_root, config, out=tmp_path / "run")
    assert run.finished and np.isfinite([r["loss"] for r in run.history]).all()
    saved = load_file(weights)
    after = load_encoder(run.out_dir, which="student").model.trunk.state_dict()
    frozen = [
        k for k in saved if k.startswith(("patch_embed.", "cls_token", "pos_embed", "blocks.0."))
    ]
    moved = [k for k in saved if k.startswith("blocks.11.") and k.endswith("weight")]
    assert frozen and all(torch.equal(after[k], saved[k]) for k in frozen)
    assert moved and all((after[k] - saved[k]).abs().max() > 1e-6 for k in moved)
    encoder = load_encoder(run.out_dir)
    assert encoder.description["arch"] == f"encoder:{name}"
    # pooled as the preset publishes it: class token + mean patch token (it gave the class
    # token alone, 192 features, so a continued run did not compare like with like)
    assert encoder.description["output"] == "cls+mean" and encoder.embed_dim == 384
    reference = create_encoder(name, weights="random").model.eval()
    reference.trunk.load_state_dict(encoder.model.trunk.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert encoder.model(x).shape == (2, 384)
        torch.testing.assert_close(encoder.model(x), reference(x))
    baseline = random_encoder(PretrainConfig.from_dict(encoder.description["pretrain_config"]))
    assert baseline.embed(np.zeros((1, 64, 64, 3), np.uint8)).shape == (1, 384)
    if method == "dino":  # a run continued from it (its pooled encoder's ViT was refused)
        again = pretrain(
            cmu_root,
            config.replace(init=str(run.out_dir), init_weights=None, steps=1),  # its own weights
            out=tmp_path / "b",
        )
        assert load_encoder(again.out_dir).embed_dim == 384


def test_mae_does_not_check_the_local_crops_it_never_reads(cmu_root: Path) -> None:
    """MAE reads the two global crops alone: a local crop size over the global one (or off
    the patch grid) is no reason to refuse it; DINO, which reads them, still refuses it."""
    config = tiny("mae", global_crop_size=32, local_crop_size=96)
    assert config.local_crop_size == 96
    assert tiny("mae", local_crop_size=20).local_crop_size == 20  # not a multiple of 8
    with pytest.raises(ConfigError, match=r"local_crop_size \(96\) must not exceed"):
        tiny("dino", global_crop_size=32, local_crop_size=96)


def test_layer_ids_and_learning_rate_scales() -> None:
    assert layer_of("backbone.patch_embed.proj.weight", 12) == 0
    assert layer_of("encoder.mask_token", 12) == 0
    assert layer_of("encoder.backbone.blocks.0.attn.qkv.weight", 12) == 1
    assert layer_of("backbone.blocks.11.mlp.fc1.weight", 12) == 12
    assert layer_of("backbone.norm.weight", 12) == 13
    assert layer_of("head.last_layer.weight_v", 12) == 13
    assert layer_of("backbone.layer3.0.conv1.weight", 4) == 3
    assert layer_of("backbone.conv1.weight", 4) == 0
    from wsi_ssl.ssl.models import build_dino

    student, _ = build_dino(tiny("dino", arch="vit_nano_patch8"))
    groups = param_groups(student, student.backbone, layer_decay=0.5, freeze_blocks=0)
    scales = sorted({g["lr_scale"] for g in groups})
    assert scales == [0.5**k for k in range(5, -1, -1)]  # 4 blocks: layers 0..5
    assert groups[0]["apply_wd"] and not groups[-1]["apply_wd"]
    frozen = param_groups(student, student.backbone, freeze_blocks=4)  # every block
    kept = {id(p) for g in frozen for p in g["params"]}
    assert [n for n, p in student.named_parameters() if id(p) in kept and "backbone." in n] == [
        "backbone.norm.weight",
        "backbone.norm.bias",
    ]
    with pytest.raises(ConfigError, match=r"freeze_blocks=5 is over the backbone's 4 blocks"):
        param_groups(student, student.backbone, freeze_blocks=5)  # froze it all, heads trained


def test_init_from_a_previous_run_and_missing_weights(cmu_root: Path, tmp_path: Path) -> None:
    first = pretrain(cmu_root, tiny("dino", arch="resnet18_tiny", steps=2), out=tmp_path / "a")
    config = tiny("dino", arch="vit_nano_patch8", init=str(first.out_dir), steps=2)
    trainer = _trainer(cmu_root, config, tmp_path / "b")
    assert trainer.config.arch == "resnet18_tiny"  # the previous run's
    previous = load_encoder(first.out_dir).model.state_dict()
    state = trainer.student.backbone.state_dict()
    assert all(torch.equal(state[k], previous[k]) for k in previous)
    # on the command line an --arch that the init overrides is named (it was dropped silently)
    argv = ["pretrain", str(cmu_root), "--init", str(first.out_dir), "--arch", "vit_nano_patch8"]
    argv += ["--preset", "cpu-small", "--batch-size", "8", "--device", "cpu"]
    code, out, err = run_cli([*argv, "--out", str(tmp_path / "d"), "--steps", "1", "--quiet"])
    assert code == 0, err
    assert "note        --arch vit_nano_patch8 not used: --init" in out
    assert "continues its own resnet18_tiny" in out
    with pytest.raises(WeightsNotFoundError, match=r"none\.pth: no such weights file"):
        pretrain(
            cmu_root,
            tiny("dino", init="timm/vit_tiny_patch16_224", init_weights=str(tmp_path / "none.pth")),
            out=tmp_path / "c",
        )


def test_a_vit_init_decides_the_arch_before_the_masking_check(
    cmu_root: Path, tmp_path: Path
) -> None:
    """A ViT run as init with a CNN arch asked for (a ResNet preset): the init's architecture
    is adopted first, so MAE/DINOv2 run; crop sizes are checked against the init's patch."""
    first = pretrain(cmu_root, tiny("dino", steps=2), out=tmp_path / "vit")
    config = tiny("mae", arch="resnet18_tiny", init=str(first.out_dir), steps=2)
    run = pretrain(cmu_root, config, out=tmp_path / "mae")
    assert load_checkpoint(run.checkpoint)["meta"]["config"]["arch"] == "vit_nano_patch8"
    assert np.isfinite([r["loss"] for r in run.history]).all() and "mae_loss" in run.history[-1]
    with pytest.raises(ConfigError, match="multiple of vit_nano_patch8's patch size 8"):
        _trainer(cmu_root, tiny("dino", init=str(first.out_dir), local_crop_size=20), tmp_path)
    argv = ["pretrain", str(cmu_root), "--out", str(tmp_path / "cli"), "--preset", "cpu-small"]
    argv += ["--method", "dinov2", "--init", str(first.out_dir), "--arch", "resnet18_tiny"]
    argv += ["--global-crop-size", "32", "--local-crop-size", "16", "--batch-size", "8"]
    code, _, err = run_cli([*argv, "--steps", "1", "--device", "cpu", "--quiet"])
    assert code == 0, err
    assert load_encoder(tmp_path / "cli").description["arch"] == "vit_nano_patch8"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["dinov2", "mae"])
def test_recipe_bf16_compiled_on_cuda(method: str, cmu_root: Path, tmp_path: Path) -> None:
    """The same code on a GPU: batch augmentation, bf16 autocast, torch.compile; resumes."""
    config = tiny(
        method, device="cuda", precision="bf16", augment="batch", compile=True, batch_size=32
    )
    run = pretrain(cmu_root, config, out=tmp_path / "run", until_step=4)
    resumed = pretrain(cmu_root, config, out=tmp_path / "run", resume=True)
    assert resumed.finished and all(np.isfinite(r["loss"]) for r in resumed.history)
    assert resumed.history[-1]["loss"] < resumed.history[0]["loss"]
    assert run.step == 4


def test_a_vit_run_trained_at_another_crop_size_inits_a_larger_one(
    cmu_root: Path, tmp_path: Path
) -> None:
    """A ViT run at 32 px crops (a 4 x 4 patch grid) starts one at 64 px (8 x 8): its position
    embeddings are resampled as timm resamples them, every other weight is the run's."""
    from timm.layers import resample_abs_pos_embed

    first = pretrain(cmu_root, tiny("dino", steps=2), out=tmp_path / "small")
    previous = load_encoder(first.out_dir).model.state_dict()
    config = tiny("dino", init=str(first.out_dir), global_crop_size=64, steps=2)
    trainer = _trainer(cmu_root, config, tmp_path / "large")
    state = trainer.student.backbone.state_dict()
    assert previous["pos_embed"].shape == (1, 1 + 16, 192)
    assert state["pos_embed"].shape == (1, 1 + 64, 192)
    expected = resample_abs_pos_embed(previous["pos_embed"], [8, 8], num_prefix_tokens=1)
    assert torch.allclose(state["pos_embed"], expected)
    assert torch.equal(state["pos_embed"][:, 0], previous["pos_embed"][:, 0])  # the class's
    assert all(torch.equal(state[k], previous[k]) for k in previous if k != "pos_embed")
    run = pretrain(cmu_root, config, out=tmp_path / "trained")
    assert np.isfinite([r["loss"] for r in run.history]).all()


def test_init_adopts_the_inits_input_normalisation(cmu_root: Path, tmp_path: Path) -> None:
    """A preset trained on other statistics than ImageNet's (Hibou) is continued with its own
    mean and std (the run trained and embedded with ImageNet's: cosine 0.66-0.92 to the preset
    with its backbone untouched); a mean and std given explicitly are kept; a run as init
    passes its own on."""
    from wsi_ssl.encoders.zoo import HIBOU_MEAN, HIBOU_STD
    from wsi_ssl.ssl.init import apply_init

    crops = {"global_crop_size": 224, "local_crop_size": 98}
    adopted = apply_init(PretrainConfig(init="hibou-b", **crops))
    assert (adopted.mean, adopted.std) == (HIBOU_MEAN, HIBOU_STD)
    mine = apply_init(PretrainConfig(init="hibou-b", mean=(0.5, 0.5, 0.5), **crops))
    assert mine.mean == (0.5, 0.5, 0.5)
    assert apply_init(PretrainConfig(init="timm/vit_tiny_patch16_224")).mean == (
        0.485,
        0.456,
        0.406,
    )
    first = pretrain(cmu_root, tiny("dino", mean=(0.7, 0.6, 0.7), steps=2), out=tmp_path / "a")
    assert apply_init(tiny("dino", init=str(first.out_dir))).mean == (0.7, 0.6, 0.7)
    # a crop size that does not fit the preset's 14 px patches: the sizes that do
    code, _, err = run_cli(["pretrain", str(cmu_root), "--out", str(tmp_path / "c"),
                            "--init", "hibou-b", "--quiet"])  # fmt: skip
    assert code == 2 and "got 96: pass --local-crop-size 98 (or 84)" in err, err


def test_a_registry_name_is_the_registrys_even_beside_a_folder_of_that_name(
    cmu_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--init hibou-b`` in a folder holding ``hibou-b/`` (its weights, say) is the preset (it
    was read as a run folder and refused); a run as init refuses --weights (they were ignored
    and recorded as used)."""
    from wsi_ssl.ssl.init import apply_init, init_is_run

    monkeypatch.chdir(tmp_path)
    (tmp_path / "hibou-b").mkdir()
    assert not init_is_run("hibou-b") and init_is_run("./hibou-b")
    crops = {"global_crop_size": 224, "local_crop_size": 98}
    assert apply_init(PretrainConfig(init="hibou-b", **crops)).arch == "encoder:hibou-b"
    first = pretrain(cmu_root, tiny("dino", steps=2), out=tmp_path / "a")
    with pytest.raises(ConfigError, match="is a pretrain run, which carries its own weights"):
        apply_init(tiny("dino", init=str(first.out_dir), init_weights="other.pth"))
    argv = ["pretrain", str(cmu_root), "--out", str(tmp_path / "b"), "--init", str(first.out_dir)]
    code, _, err = run_cli([*argv, "--weights", "other.pth", "--steps", "1", "--quiet"])
    assert code == 2 and "carries its own weights" in err and "(command line: --weights)" in err
