"""PretrainConfig: the DINO recipe as defaults, validation, (de)serialisation, presets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from wsi_ssl.errors import ConfigError
from wsi_ssl.ssl.backbones import backbone_names, get_spec
from wsi_ssl.ssl.config import RUNTIME_FIELDS, PretrainConfig


def test_defaults_are_the_dino_vit_s16_recipe() -> None:
    c = PretrainConfig()
    assert c.arch == "vit_small_patch16"
    assert (c.global_crop_size, c.local_crop_size, c.n_local_crops) == (224, 96, 6)
    assert (c.global_crop_scale, c.local_crop_scale) == ((0.4, 1.0), (0.05, 0.4))
    assert (c.out_dim, c.hidden_dim, c.bottleneck_dim) == (65536, 2048, 256)
    assert (c.base_lr, c.min_lr, c.warmup_epochs, c.epochs) == (5e-4, 1e-6, 10, 100)
    assert (c.weight_decay, c.weight_decay_end) == (0.04, 0.4)
    assert (c.momentum_teacher, c.clip_grad, c.freeze_last_layer_epochs) == (0.996, 3.0, 1)
    assert (c.warmup_teacher_temp, c.teacher_temp, c.warmup_teacher_temp_epochs) == (0.04, 0.07, 30)
    assert (c.student_temp, c.center_momentum, c.drop_path_rate) == (0.1, 0.9, 0.1)
    # histology: every symmetry of the square, stain jitter
    assert c.vflip_prob == c.hflip_prob == c.rot90_prob == 0.5
    assert c.hed_jitter_prob > 0 and c.hed_sigma > 0
    assert c.lr_for(1024) == pytest.approx(5e-4 * 4)


def test_round_trip_through_json() -> None:
    c = PretrainConfig.preset("cpu-small", steps=10, mpp=0.5, tile_size=64)
    again = PretrainConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c
    assert isinstance(again.global_crop_scale, tuple)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"arch": "vit_huge"}, "valid: .*resnet18.*vit_small_patch16"),
        ({"global_crop_size": 100}, "multiple of vit_small_patch16's patch size 16"),
        ({"local_crop_size": 240}, "must not exceed global_crop_size"),
        ({"global_crop_scale": (0.5, 1.2)}, "global_crop_scale"),
        ({"vflip_prob": 1.5}, "vflip_prob must be in"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"epochs": -1}, "epochs must be > 0"),
        ({"sampling": "weighted"}, "sampling must be one of uniform, balanced"),
        ({"device": "tpu"}, "device must be one of auto, cpu, cuda"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"augment": "gpu"}, "augment must be one of auto, loader, batch"),
        ({"device": "cpu", "precision": "fp16"}, "fp16' needs CUDA"),
        ({"momentum_teacher": 1.0}, "momentum_teacher"),
        ({"std": (0.2, 0.0, 0.2)}, "std must be three positive"),
        ({"mean": (0.5, 0.5)}, "mean must be 3 numbers"),
    ],
)
def test_invalid_values_are_config_errors(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PretrainConfig(**changes)


def test_unknown_keys_and_presets_list_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="unknown PretrainConfig keys \\['lr'\\]; valid keys"):
        PretrainConfig.from_dict({"lr": 0.1})
    with pytest.raises(ConfigError, match="valid: vit-s16, cpu-small"):
        PretrainConfig.preset("huge")
    # a misspelt override of a preset or a replace: the same error (a bare TypeError before)
    with pytest.raises(ConfigError, match="unknown PretrainConfig keys \\['stepz'\\]; valid keys"):
        PretrainConfig.preset("cpu-small", stepz=3)
    with pytest.raises(ConfigError, match="unknown PretrainConfig keys \\['stepz'\\]"):
        PretrainConfig().replace(stepz=3)


def test_training_key_leaves_out_runtime_fields() -> None:
    a = PretrainConfig()
    b = a.replace(device="cpu", num_workers=3, progress=False, log_every=1)
    assert a.training_key() == b.training_key()
    assert a.training_key() != a.replace(base_lr=1e-3).training_key()
    assert set(a.to_dict()) >= RUNTIME_FIELDS


def test_cpu_preset_uses_a_small_registered_backbone() -> None:
    c = PretrainConfig.preset("cpu-small")
    spec = get_spec(c.arch)
    assert spec.embed_dim <= 256 and c.global_crop_size <= 64
    # an MAE decoder no wider than the small encoders it sits behind (512 x 8 blocks was 16x
    # the step time: benchmarks/RESULTS.md)
    assert c.decoder_dim <= 192 and c.decoder_depth <= 2 and c.decoder_dim % c.decoder_heads == 0
    assert set(backbone_names()) >= {"vit_small_patch16", "resnet18", c.arch}


def test_config_and_cli_registration_do_not_import_torch() -> None:
    code = (
        "import argparse, sys; import wsi_ssl.ssl.config; from wsi_ssl.cli import pretrain;"
        "p = argparse.ArgumentParser(); pretrain.register(p.add_subparsers());"
        "wsi_ssl.ssl.config.PretrainConfig(); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_methods_and_backbones_are_registries() -> None:
    from wsi_ssl.registry import Registry
    from wsi_ssl.ssl.backbones import BACKBONES, register_backbone
    from wsi_ssl.ssl.methods import RECIPES
    from wsi_ssl.ssl.recipes import make_recipe

    assert isinstance(RECIPES, Registry) and isinstance(BACKBONES, Registry)
    assert RECIPES.names() == ["dino", "dinov2", "mae"]
    for method in RECIPES.names():
        arch = "resnet18_tiny" if method == "dino" else "vit_nano_patch8"
        recipe = make_recipe(PretrainConfig(method=method, arch=arch, out_dim=64))
        assert recipe.name == method and type(recipe) is RECIPES.get(method)
    with pytest.raises(ConfigError, match="arch 'nope': not registered; valid: resnet18"):
        get_spec("nope")
    with pytest.raises(ConfigError, match="already registered"):
        register_backbone(get_spec("resnet18"))(lambda **kw: None)
