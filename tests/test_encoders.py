"""Encoder registry: every registered encoder runs, ids are stable, weights come from local files."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_ssl.encoders import (
    Encoder,
    EncoderConfig,
    create_encoder,
    encoder_entry,
    file_sha256,
    list_encoders,
    list_sources,
    register_encoder,
    state_dict_sha256,
)
from wsi_ssl.encoders._builtin import SmallCNN
from wsi_ssl.errors import (
    CheckpointError,
    ConfigError,
    EncoderMismatchError,
    EncoderNotFoundError,
    InputSizeMismatchError,
    MagnificationMismatchError,
    WeightsNotFoundError,
    WsiSslError,
)

ID = re.compile(r"^[A-Za-z0-9_.-]+-[0-9a-f]{12}$")


def _importable(module: str) -> str | None:
    """None when ``module`` imports the way the encoders import it, else why not."""
    from wsi_ssl.encoders._hub import _import

    try:
        _import(module)
    except ConfigError as err:
        return str(err)
    return None


def _tiles(n: int = 3, size: int = 224, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))


# A test-only encoder that needs a weights file (like resnet18, but no torchvision needed).
@register_encoder(
    "test-file-cnn", arch="builtin/small_cnn", input_size=64, embed_dim=64, source="file"
)
def _test_file_cnn(config: EncoderConfig) -> torch.nn.Module:
    return SmallCNN()


@pytest.mark.parametrize("name", list_encoders())
def test_every_registered_encoder_runs(name: str) -> None:
    """timm's one-test-per-model: build (random init, no download), run, check shape and id."""
    entry = encoder_entry(name)
    family = entry.config.arch.split("/")[0]
    if family in ("timm", "torchvision") and (why := _importable(family)):
        pytest.skip(why)
    if entry.config.model_card:
        pytest.skip("a foundation-model preset: verified against its reference in test_zoo.py")
    small = 64 if "vit" in entry.config.arch else None  # same code path, a fraction of the work
    enc = create_encoder(name, weights="random", input_size=small)
    assert isinstance(enc, Encoder)
    out = enc(_tiles(2, enc.input_size))
    assert out.shape == (2, entry.config.embed_dim) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert ID.match(enc.encoder_id) and enc.config.source == "random"


def test_encoder_id_is_stable_and_tracks_identity() -> None:
    a, b = create_encoder("random-cnn"), create_encoder("random-cnn")
    assert a.encoder_id == b.encoder_id and a.encoder_id.startswith("random-cnn-")
    assert ID.match(a.encoder_id)
    assert a.config.weights_sha256 == state_dict_sha256(a.model)
    others = {
        create_encoder("random-cnn", seed=1).encoder_id,
        create_encoder("random-cnn", resize="bilinear").encoder_id,
        create_encoder("random-cnn", precision="bf16").encoder_id,
        create_encoder("random-cnn", mean=(0.5, 0.5, 0.5)).encoder_id,
    }
    assert a.encoder_id not in others and len(others) == 4
    # provenance fields do not change the id; the config round-trips through JSON-able dicts
    cfg = a.config
    moved = EncoderConfig.from_dict({**cfg.to_dict(), "weights_path": "/elsewhere.pth"})
    assert moved.encoder_id == a.encoder_id and moved == cfg
    assert a.describe()["encoder_id"] == a.encoder_id


def test_outputs_are_bitwise_reproducible_on_cpu() -> None:
    x = _tiles(5)
    for name in ("random-cnn", "random-vit-tiny"):
        a = create_encoder(name)(x)
        b = create_encoder(name)(x)
        assert torch.equal(a, b), name


def test_weights_from_a_local_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = create_encoder("random-cnn", seed=3)
    weights = tmp_path / "cnn.pth"
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in ref.model.state_dict().items()}}, weights
    )
    enc = create_encoder("random-cnn", weights=weights)  # seed 0 init, then these weights
    assert enc.config.source == "file" and enc.config.weights_sha256 == file_sha256(weights)
    assert enc.config.weights_path == str(weights.resolve())
    x = _tiles(2)
    assert torch.equal(enc(x), ref(x))
    assert enc.encoder_id != ref.encoder_id  # file hash vs state-dict hash: another id

    # a named encoder that needs weights: clear error naming the default place ...
    monkeypatch.setenv("WSI_SSL_WEIGHTS", str(tmp_path / "weights"))
    with pytest.raises(WeightsNotFoundError, match=r"test-file-cnn\.pth.*weights=PATH"):
        create_encoder("test-file-cnn")
    with pytest.raises(WeightsNotFoundError, match=r"missing\.pth: no such weights file"):
        create_encoder("test-file-cnn", weights=tmp_path / "missing.pth")
    # ... and it is picked up from there
    (tmp_path / "weights").mkdir()
    torch.save(ref.model.state_dict(), tmp_path / "weights" / "test-file-cnn.pth")
    enc = create_encoder("test-file-cnn")
    assert enc.config.source == "file" and enc.encoder_id.startswith("test-file-cnn-")
    assert torch.equal(enc(_tiles(1, 64)), ref.model.eval()(enc.preprocess(_tiles(1, 64))))


def test_weights_for_another_architecture_are_refused(tmp_path: Path) -> None:
    vit = create_encoder("random-vit-tiny")
    path = tmp_path / "vit.pth"
    torch.save(vit.model.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"do not fit encoder 'random-cnn'.*missing"):
        create_encoder("random-cnn", weights=path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read a state dict"):
        create_encoder("random-cnn", weights=tmp_path / "junk.pth")


def test_unknown_names_and_bad_overrides() -> None:
    with pytest.raises(EncoderNotFoundError, match=r"random-cnn.*<timm>.*<wsi-ssl>") as info:
        create_encoder("no-such-encoder")
    assert isinstance(info.value, WsiSslError) and isinstance(info.value, LookupError)
    # evaluate's NAME,KEY=VALUE elsewhere: the name and its setting, apart (it was "not a
    # registered encoder", listing resnet18 among them)
    with pytest.raises(EncoderNotFoundError, match=r"name it 'random-cnn' and set weights=random"):
        create_encoder("random-cnn,weights=random")
    with pytest.raises(ConfigError, match="overridable: name, resize"):
        create_encoder("random-cnn", embed_dim=3)
    with pytest.raises(ConfigError, match="resize must be one of never, bilinear"):
        create_encoder("random-cnn", resize="nearest")
    assert {"timm", "torchvision", "wsi-ssl"} <= set(list_sources())


def test_input_size_is_never_silently_changed() -> None:
    enc = create_encoder("random-cnn")
    with pytest.raises(InputSizeMismatchError, match=r"tiles are 96 px.*takes 224 px"):
        enc(_tiles(2, 96))
    resized = create_encoder("random-cnn", resize="bilinear")
    assert resized(_tiles(2, 96)).shape == (2, 64)
    with pytest.raises(ConfigError, match="uint8 RGB"):
        enc(_tiles(1).float())
    array = _tiles(2).numpy()  # numpy: said so, and where numpy goes (it blamed the shape)
    with pytest.raises(ConfigError, match=r"got ndarray; Encoder\.embed_images takes numpy"):
        enc(array)  # type: ignore[arg-type]
    np.testing.assert_allclose(enc.embed_images(array), enc(_tiles(2)).numpy(), atol=1e-5)


def test_a_size_refusal_advises_the_trained_scale_when_resizing_would_miss_it() -> None:
    base = create_encoder("random-cnn")
    fields = {**base.config.to_dict(), "mean": base.config.mean, "std": base.config.std}
    enc = Encoder(base.model, EncoderConfig(**{**fields, "arch_kwargs": (), "mpp": (0.5,)}))
    with pytest.raises(InputSizeMismatchError) as info:
        enc.check_tiles(256, 256, 0.5, "s.zarr")
    said = str(info.value)
    assert "re-tile with tile_size=224 and mpp=0.5" in said and "at 0.571 µm/px" in said
    assert info.value.parameters == ("tile_size", "mpp", "resize", "check_mpp")
    for mpp in (None, 0.4375):  # scale unchecked, or resized tiles would be at the right one
        with pytest.raises(InputSizeMismatchError, match="or choose resize='bilinear'"):
            enc.check_tiles(256, 256, mpp)
    enc.check_tiles(224, 224, 0.5)
    resized = Encoder(
        base.model,
        EncoderConfig(**{**fields, "arch_kwargs": (), "mpp": (0.5,), "resize": "bilinear"}),
    )
    resized.check_tiles(256, 256, 0.4375)
    with pytest.raises(MagnificationMismatchError, match=r"at 0\.571 µm/px"):
        resized.check_tiles(256, 256, 0.5)


def test_output_dim_is_checked() -> None:
    enc = create_encoder("random-cnn")
    wrong = Encoder(
        enc.model,
        EncoderConfig(
            **{
                **enc.config.to_dict(),
                "embed_dim": 65,
                "mean": enc.config.mean,
                "std": enc.config.std,
                "arch_kwargs": (),
            }
        ),
    )
    with pytest.raises(EncoderMismatchError, match=r"returned shape \(1, 64\).*\(B, 65\)"):
        wrong(_tiles(1))


def test_embed_image_and_region(cmu_small: Path) -> None:
    enc = create_encoder("random-cnn")
    rng = np.random.default_rng(1)
    tile = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    v = enc.embed_image(tile)
    assert v.shape == (64,)
    assert np.array_equal(v, enc(torch.from_numpy(tile[None]))[0].numpy())
    rgba = np.dstack([tile, np.full((224, 224), 255, np.uint8)])
    assert np.array_equal(enc.embed_image(rgba), v)
    assert enc.embed_image(rng.integers(0, 256, (100, 60, 3), dtype=np.uint8)).shape == (64,)
    with pytest.raises(InputSizeMismatchError):
        enc.embed_image(tile[:100, :100], resize=False)

    from wsi_ssl.slide import open_slide

    with open_slide(cmu_small) as reader:
        region = np.asarray(reader.read_region((600, 700), 0, (224, 224)))[..., :3]
        got = enc.embed_region(reader, (600, 700, 224, 224))
    assert np.array_equal(got, enc.embed_image(region))
    big = enc.embed_region(cmu_small, (0, 0, 1000, 800))  # a path, a non-square box
    assert big.shape == (64,) and np.isfinite(big).all()


def _fake_ssl(monkeypatch: pytest.MonkeyPatch, backbone: torch.nn.Module) -> list[Path]:
    """Stand in for wsi_ssl.ssl.load_encoder(path) -> (teacher backbone, description)."""
    calls: list[Path] = []

    def load_encoder(
        path: Path, finished: bool = False
    ) -> tuple[torch.nn.Module, dict[str, object]]:
        calls.append(Path(path))
        desc = {
            "arch": "small_cnn",
            "embed_dim": 64,
            "input_size": 224,
            "mean": [0.7, 0.5, 0.7],
            "std": [0.2, 0.2, 0.2],
        }
        return backbone, desc

    module = types.ModuleType("wsi_ssl.ssl")
    module.load_encoder = load_encoder  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wsi_ssl.ssl", module)
    return calls


def test_wsi_ssl_checkpoint_source_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pretrain source maps load_encoder's description onto the frozen config."""
    backbone = create_encoder("random-cnn", seed=5).model
    calls = _fake_ssl(monkeypatch, backbone)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"stand-in")
    enc = create_encoder(ckpt)
    assert calls == [ckpt]
    assert enc.config.source == "wsi-ssl" and enc.config.arch == "wsi-ssl/small_cnn"
    assert enc.config.mean == (0.7, 0.5, 0.7) and enc.embed_dim == 64
    assert enc.config.weights_sha256 == state_dict_sha256(backbone)
    assert enc.encoder_id.startswith("wsi-ssl-small_cnn-")
    assert enc.checkpoint_sha256 == file_sha256(ckpt)  # type: ignore[attr-defined]
    assert create_encoder(f"wsi-ssl:{ckpt}").encoder_id == enc.encoder_id
    with pytest.raises(ConfigError, match="carries its own weights"):
        create_encoder(ckpt, weights=tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="no such wsi-ssl pretrain"):
        create_encoder(f"wsi-ssl:{tmp_path / 'missing'}")


@pytest.mark.parametrize("spec", ["timm/resnet18", "torchvision/resnet18"])
def test_hub_architectures_random_and_from_file(spec: str, tmp_path: Path) -> None:
    family = spec.split("/")[0]
    if why := _importable(family):
        # the library is broken here; the error must still be a clear, typed one
        with pytest.raises(ConfigError, match=f"cannot import {family}"):
            create_encoder(spec, weights="random")
        pytest.skip(why)
    rand = create_encoder(spec, weights="random")
    assert rand.encoder_id.startswith("random-resnet18-") and rand.embed_dim == 512
    path = tmp_path / "r18.pth"
    torch.save(rand.model.state_dict(), path)
    enc = create_encoder(spec, weights=path)
    x = _tiles(1)
    assert torch.equal(enc(x), rand(x))
    with pytest.raises(WeightsNotFoundError):
        create_encoder(spec, weights=tmp_path / "nope.pth")


def test_evaluates_encoder_spelling_on_the_command_line_names_the_flags(
    small_archive: Path,
) -> None:
    from tests.conftest import run_cli

    code, _, err = run_cli(["embed", str(small_archive), "--encoder", "random-cnn,weights=random"])
    assert code == 2 and "name it 'random-cnn' and set --weights random" in err, err


def test_the_weights_file_is_located_as_create_encoder_would_read_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``locate_weights`` finds, without building anything, the file ``create_encoder``
    reads, and refuses what it would refuse before its build (evaluate checks every encoder
    so before loading any); None for a seeded random init."""
    from wsi_ssl.encoders import locate_weights

    monkeypatch.setenv("WSI_SSL_WEIGHTS", str(tmp_path / "weights"))
    path = tmp_path / "cnn.pth"
    torch.save(create_encoder("random-cnn").model.state_dict(), path)
    assert locate_weights("random-cnn") is None
    assert locate_weights("random-cnn", weights=path) == path
    assert locate_weights("timm/resnet18", weights="random") is None
    assert locate_weights("torchvision/resnet18", weights=path) == path
    preset = tmp_path / "weights" / "uni" / "pytorch_model.bin"
    with pytest.raises(WeightsNotFoundError, match=r"put it at .*, or give it; wsi-ssl") as info:
        locate_weights("uni", how="give it")
    assert info.value.path == preset
    with pytest.raises(WeightsNotFoundError, match=r"resnet18\.pth: .* or pass weights=PATH;"):
        locate_weights("torchvision/resnet18")
    with pytest.raises(WeightsNotFoundError, match=r"nope\.pth: no such weights file"):
        locate_weights("resnet18", weights=tmp_path / "nope.pth")
    for unknown in ("no-such-encoder", "timm/no-such-arch", "torchvision/no-such-arch"):
        with pytest.raises(EncoderNotFoundError):
            locate_weights(unknown)
    (tmp_path / "run").mkdir()
    assert locate_weights(f"wsi-ssl:{tmp_path / 'run'}") == tmp_path / "run"
    with pytest.raises(ConfigError, match="carries its own weights"):
        locate_weights(tmp_path / "run", weights=path)
    with pytest.raises(CheckpointError, match="no such wsi-ssl pretrain"):
        locate_weights(f"wsi-ssl:{tmp_path / 'missing'}")
