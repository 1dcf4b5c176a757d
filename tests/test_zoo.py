"""The foundation-model zoo, verified without the real weights.

For every preset a random-weight checkpoint is written in the layout the model card publishes,
built from the reference architecture (timm with the card's keyword arguments, the
``transformers`` model classes for Hugging Face layouts, a hand-written reference of CONCH
v1.5's tower); it is loaded through the preset and the embedding of real H&E tiles must equal
the reference model's output within rtol = atol = 1e-4 (float32 on the CPU). Every tensor is
randomised (not the near-identity layer-scale init) so that each one changes the output.
Giant models run at reduced depth with the same code; one full-size load is marked ``slow``.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from wsi_ssl.encoders import create_encoder, encoder_entry, list_encoders
from wsi_ssl.encoders.registry import encoder_from_entry
from wsi_ssl.encoders.zoo import PRESETS
from wsi_ssl.errors import (
    CheckpointError,
    EncoderNotFoundError,
    MagnificationMismatchError,
    PickleCheckpointError,
    PresetWeightsNotFoundError,
    TruncatedWeightsError,
    WeightsMismatchError,
)

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

TOL = {"rtol": 1e-4, "atol": 1e-4}
TISSUE = ("tissue-level0-4302-10273-4814-10785.png", "tissue-level2-1784-6289-5880-10386.png")
SWIGLU = {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}
# The reference constructions, transcribed from the model cards / TRIDENT (not from the zoo).
TIMM_REFERENCE: dict[str, tuple[str, dict[str, Any], int]] = {
    # name: (timm arch, kwargs as the card passes them, first patch token of the mean | 0 = CLS)
    "uni": ("vit_large_patch16_224", {"init_values": 1e-5, "dynamic_img_size": True}, 0),
    "uni2-h": (
        "vit_giant_patch14_224",
        {
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "no_embed_class": True,
            "reg_tokens": 8,
            "dynamic_img_size": True,
            **SWIGLU,
        },
        0,
    ),
    "virchow": ("vit_huge_patch14_224", {"init_values": 1e-5, "mlp_ratio": 5.3375, **SWIGLU}, 1),
    "virchow2": (
        "vit_huge_patch14_224",
        {"init_values": 1e-5, "mlp_ratio": 5.3375, "reg_tokens": 4, **SWIGLU},
        5,
    ),
    "h-optimus-0": ("vit_giant_patch14_reg4_dinov2", {"init_values": 1e-5}, 0),
    "h-optimus-1": ("vit_giant_patch14_reg4_dinov2", {"init_values": 1e-5}, 0),
    "prov-gigapath": (
        "vit_giant_patch14_dinov2",
        {
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "init_values": 1e-5,
            "mlp_ratio": 5.33334,
        },
        0,
    ),
}
HF_REFERENCE: dict[str, tuple[str, dict[str, Any], str]] = {
    # name: (transformers class, config, output)
    "phikon": (
        "ViTModel",
        {
            "hidden_size": 768,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "patch_size": 16,
            "image_size": 224,
            "layer_norm_eps": 1e-12,
            "qkv_bias": True,
        },
        "cls",
    ),
    "phikon-v2": (
        "Dinov2Model",
        {
            "hidden_size": 1024,
            "num_attention_heads": 16,
            "patch_size": 16,
            "image_size": 224,
            "layerscale_value": 1e-5,
            "use_swiglu_ffn": False,
        },
        "cls",
    ),
    "hibou-b": (
        "Dinov2WithRegistersModel",
        {
            "hidden_size": 768,
            "num_attention_heads": 12,
            "patch_size": 14,
            "image_size": 224,
            "num_register_tokens": 4,
            "layerscale_value": 1e-5,
        },
        "pooler",
    ),
    "hibou-l": (
        "Dinov2WithRegistersModel",  # a 518-px position grid: resampled to 16 x 16 on load
        {
            "hidden_size": 1024,
            "num_attention_heads": 16,
            "patch_size": 14,
            "image_size": 518,
            "num_register_tokens": 4,
            "layerscale_value": 1e-5,
        },
        "pooler",
    ),
    "midnight": (
        "Dinov2Model",  # DINOv2's 518-px position grid: resampled to 16 x 16 on load
        {
            "hidden_size": 1536,
            "num_attention_heads": 24,
            "patch_size": 14,
            "image_size": 518,
            "layerscale_value": 1e-5,
            "use_swiglu_ffn": True,
        },
        "cls+mean",
    ),
}
DEPTH = 2  # reduced depth for the tests (the same code as full depth) ...
GIANT_DEPTH = 1  # ... and for the 1,536-wide ViT-g/H models (seconds per block on 2 CPU cores)


@pytest.fixture(scope="module")
def tiles(patches_dir: Path) -> dict[int, np.ndarray]:
    """Real H&E tiles (uint8 NHWC), centre crops of 224 and 448 px."""
    out: dict[int, np.ndarray] = {}
    for size in (224, 448):
        crops = []
        for name in TISSUE:
            img = np.asarray(Image.open(patches_dir / name).convert("RGB"))
            top, left = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
            crops.append(img[top : top + size, left : left + size])
        out[size] = np.stack(crops)
    return out


def _reference_input(images: np.ndarray, mean: Any, std: Any) -> torch.Tensor:
    """The cards' torchvision pipeline: ToTensor + Normalize (no resize: tiles are input size)."""
    from torchvision.transforms import functional as TF

    return torch.stack(
        [TF.normalize(TF.to_tensor(Image.fromarray(i)), list(mean), list(std)) for i in images]
    )


def _scramble(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (LayerNorm weights around 1) so each one matters; a model built
    on the meta device (no init to throw away) is materialised here."""
    assert not list(model.buffers())
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.05
            is_norm_weight = name.endswith("weight") and p.ndim == 1 and "norm" in name
            p.copy_(1 + noise if is_norm_weight else noise)
    return model.eval()


def _depth(name: str) -> int:
    arch = encoder_entry(name).config.arch
    return GIANT_DEPTH if "vit_giant" in arch or "vit_huge" in arch else DEPTH


def _reduced(name: str, **extra: Any) -> tuple[Any, Any]:
    entry = encoder_entry(name)
    kwargs = {**dict(entry.config.arch_kwargs), "depth": _depth(name), **extra}
    return entry, dataclasses.replace(entry.config, arch_kwargs=tuple(kwargs.items()))


def _load(name: str, path: Path, **extra: Any) -> Any:
    entry, config = _reduced(name, **extra)
    return encoder_from_entry(entry, config, weights=path, seed=0)


def _timm_checkpoint(name: str, folder: Path) -> tuple[Path, torch.nn.Module]:
    arch, kwargs, _ = TIMM_REFERENCE[name]
    with torch.device("meta"):
        ref = timm.create_model(
            arch,
            pretrained=False,
            num_classes=0,
            img_size=224,
            global_pool="",
            **{**kwargs, "depth": _depth(name)},
        )
    _scramble(ref, len(name))
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    file = encoder_entry(name).config.weights_files[-1]  # .safetensors where published
    path = folder / file
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path, ref


@pytest.mark.parametrize("name", sorted(TIMM_REFERENCE))
def test_timm_layout_presets_match_the_reference(
    name: str, tiles: dict[int, np.ndarray], tmp_path: Path
) -> None:
    path, ref = _timm_checkpoint(name, tmp_path)
    enc = _load(name, path)
    cfg = enc.config
    with torch.no_grad():
        tokens = ref(_reference_input(tiles[224], cfg.mean, cfg.std))
    first = TIMM_REFERENCE[name][2]
    want = tokens[:, 0] if first == 0 else torch.cat([tokens[:, 0], tokens[:, first:].mean(1)], 1)
    got = enc(torch.from_numpy(tiles[224]))
    assert got.shape == (len(tiles[224]), cfg.embed_dim) == want.shape
    torch.testing.assert_close(got, want, **TOL)


def _hf_checkpoint(name: str, folder: Path) -> tuple[Path, torch.nn.Module]:
    cls_name, config, _ = HF_REFERENCE[name]
    model_cls = getattr(transformers, cls_name)
    config_cls = getattr(transformers, cls_name.replace("Model", "Config"))
    with torch.device("meta"):
        ref = model_cls(config_cls(num_hidden_layers=_depth(name), **config))
    _scramble(ref, len(name))
    path = folder / encoder_entry(name).config.weights_files[0]
    # save_pretrained writes the layout the published files have, whatever the installed
    # transformers calls the parameters in memory (5.25 renamed attention's to q_proj ...)
    ref.save_pretrained(folder / "published")
    state = load_file(str(folder / "published" / "model.safetensors"))
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path, ref


@pytest.mark.parametrize("name", sorted(HF_REFERENCE))
def test_transformers_layout_presets_match_the_reference(
    name: str, tiles: dict[int, np.ndarray], tmp_path: Path
) -> None:
    path, ref = _hf_checkpoint(name, tmp_path)
    enc = _load(name, path)
    cfg = enc.config
    with torch.no_grad():
        out = ref(pixel_values=_reference_input(tiles[224], cfg.mean, cfg.std))
    hidden, output = out.last_hidden_state, HF_REFERENCE[name][2]
    if output == "pooler":
        want = out.pooler_output
    elif output == "cls":
        want = hidden[:, 0]
    else:
        want = torch.cat([hidden[:, 0], hidden[:, 1:].mean(1)], dim=1)
    got = enc(torch.from_numpy(tiles[224]))
    assert got.shape == (len(tiles[224]), cfg.embed_dim) == want.shape
    torch.testing.assert_close(got, want, **TOL)


def _conch_reference(trunk: torch.nn.Module, pool: dict[str, torch.Tensor], x: torch.Tensor):
    """CONCH v1.5's tower as its reference code computes it (DINO position interpolation,
    einsum attention pooling with 8 heads, LayerNorm)."""
    tokens = trunk.patch_embed.proj(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([trunk.cls_token.expand(len(x), -1, -1), tokens], dim=1)
    pos, n = trunk.pos_embed, trunk.pos_embed.shape[1] - 1
    side, new = int(math.sqrt(n)), x.shape[-1] // 16
    grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    scale = ((new + 0.1) / side, (new + 0.1) / side)
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic")
    pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)], dim=1)
    tokens = trunk.norm(trunk.blocks(tokens + pos))
    ln = F.layer_norm
    k_in = ln(tokens, (1024,), pool["ln_k.weight"], pool["ln_k.bias"])
    q = ln(pool["query"], (768,), pool["ln_q.weight"], pool["ln_q.bias"]) @ pool["to_q.weight"].T
    k, v = (k_in @ pool["to_kv.weight"].T).chunk(2, dim=-1)
    heads = lambda t: t.reshape(t.shape[0], -1, 8, 96).transpose(1, 2)  # noqa: E731
    qh = heads(q.expand(len(x), -1, -1)) * 96**-0.5
    sim = torch.einsum("bhid,bhjd->bhij", qh, heads(k))
    attn = (sim - sim.amax(-1, keepdim=True)).softmax(-1)
    out = torch.einsum("bhij,bhjd->bhid", attn, heads(v)).transpose(1, 2).reshape(len(x), 1, 768)
    out = (out @ pool["to_out.weight"].T)[:, 0]
    return ln(out, (768,), pool["ln.weight"], pool["ln.bias"])


def test_conch_v15_tower_matches_the_reference(tiles: dict[int, np.ndarray], tmp_path: Path):
    with torch.device("meta"):
        trunk = timm.create_model(
            "vit_large_patch16_224", pretrained=False, num_classes=0, init_values=1.0, depth=DEPTH
        )
    _scramble(trunk, 15)
    g = torch.Generator().manual_seed(16)
    pool = {
        "query": torch.randn(1, 768, generator=g),
        "ln_q.weight": 1 + 0.05 * torch.randn(768, generator=g),
        "ln_q.bias": 0.05 * torch.randn(768, generator=g),
        "ln_k.weight": 1 + 0.05 * torch.randn(1024, generator=g),
        "ln_k.bias": 0.05 * torch.randn(1024, generator=g),
        "to_q.weight": 0.05 * torch.randn(768, 768, generator=g),
        "to_kv.weight": 0.05 * torch.randn(1536, 1024, generator=g),
        "to_out.weight": 0.05 * torch.randn(768, 768, generator=g),
        "ln.weight": 1 + 0.05 * torch.randn(768, generator=g),
        "ln.bias": 0.05 * torch.randn(768, generator=g),
    }
    state = {f"trunk.{k}": v for k, v in trunk.state_dict().items()}
    state |= {f"attn_pool_contrast.{k}": v for k, v in pool.items() if not k.startswith("ln.")}
    state |= {"ln_contrast.weight": pool["ln.weight"], "ln_contrast.bias": pool["ln.bias"]}
    path = tmp_path / "pytorch_model_vision.bin"
    torch.save(state, path)
    enc = _load("conch-v1.5", path)
    x = tiles[448]
    with torch.no_grad():
        want = _conch_reference(trunk, pool, _reference_input(x, enc.config.mean, enc.config.std))
    got = enc(torch.from_numpy(x))
    assert got.shape == (len(x), 768) and enc.input_size == 448
    torch.testing.assert_close(got, want, **TOL)


def test_every_zoo_preset_is_verified() -> None:
    """Each registered preset with a model card has a reference test above."""
    zoo = {p.name for p in PRESETS}
    assert zoo == set(TIMM_REFERENCE) | set(HF_REFERENCE) | {"conch-v1.5"}
    assert zoo <= set(list_encoders())
    for p in PRESETS:
        cfg = encoder_entry(p.name).config
        assert cfg.model_card.startswith("https://huggingface.co/") and cfg.licence
        assert cfg.weights_files and cfg.mpp and cfg.embed_dim == p.embed_dim


# -- bad input -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uni_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path, _ = _timm_checkpoint("uni", tmp_path_factory.mktemp("uni"))
    return path


def test_wrong_keys_and_shapes_are_listed(uni_file: Path, tmp_path: Path) -> None:
    state = torch.load(uni_file, weights_only=True)
    state.pop("norm.weight")
    state["bogus.weight"] = torch.zeros(1)
    state["pos_embed"] = torch.zeros(1, 10, 1024)
    bad = tmp_path / "pytorch_model.bin"
    torch.save(state, bad)
    with pytest.raises(WeightsMismatchError) as info:
        _load("uni", bad)
    msg = str(info.value)
    assert str(bad) in msg and "'uni'" in msg
    assert "missing trunk.norm.weight" in msg and "unexpected trunk.bogus.weight" in msg
    assert "trunk.pos_embed (1, 10, 1024) vs (1, 197, 1024)" in msg
    assert isinstance(info.value, CheckpointError)
    with pytest.raises(WeightsMismatchError, match="virchow"):  # another model's file
        _load("virchow", uni_file)


def test_truncated_safetensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(1000), "b": torch.ones(10)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(TruncatedWeightsError, match=r"truncated safetensors file .*download"):
        create_encoder("hibou-b", weights=path)
    path.write_bytes(data[:5])
    with pytest.raises(TruncatedWeightsError):
        create_encoder("hibou-b", weights=path)


@pytest.fixture(scope="module")
def pickled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    model = encoder_from_entry(*_reduced("uni", depth=1), weights="random", seed=0).model
    path = tmp_path_factory.mktemp("pickled") / "uni-full-model.pt"
    torch.save(model.trunk, path)  # a whole pickled module, as some repositories publish
    return path, model


def _conversion_command(path: Path) -> str:
    with pytest.raises(PickleCheckpointError, match="refused") as info:
        _load("uni", path, depth=1)
    return str(info.value).split("convert it once with: ", 1)[1]


def test_pickle_only_checkpoint_is_refused_with_the_conversion_command(
    pickled: tuple[Path, torch.nn.Module],
) -> None:
    command = _conversion_command(pickled[0])
    assert "\n" not in command and command.startswith("python -c ")
    assert f"torch.load('{pickled[0]}', weights_only=False" in command


@pytest.mark.slow
def test_the_printed_conversion_command_works(pickled: tuple[Path, torch.nn.Module]) -> None:
    path, model = pickled
    subprocess.run(_conversion_command(path), shell=True, check=True, executable="/bin/bash")
    enc = _load("uni", path.with_suffix(".safetensors"), depth=1)
    x = torch.zeros(1, 224, 224, 3, dtype=torch.uint8)
    torch.testing.assert_close(enc(x), model.eval()(enc.preprocess(x)))


def test_missing_weights_name_the_card_and_the_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WSI_SSL_WEIGHTS", str(tmp_path))
    with pytest.raises(PresetWeightsNotFoundError) as info:
        create_encoder("uni2-h")
    msg = str(info.value)
    assert "https://huggingface.co/MahmoodLab/UNI2-h" in msg and "pytorch_model.bin" in msg
    assert str(tmp_path / "uni2-h" / "pytorch_model.bin") in msg and "never downloads" in msg
    assert isinstance(info.value, FileNotFoundError)
    # a folder holding the card's files is accepted as weights=...
    folder = tmp_path / "download"
    folder.mkdir()
    with pytest.raises(PresetWeightsNotFoundError, match=str(folder / "model.safetensors")):
        create_encoder("midnight", weights=folder)


def test_weights_found_in_the_weights_dir(
    uni_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "uni").mkdir()
    (tmp_path / "uni" / "pytorch_model.bin").symlink_to(uni_file)
    monkeypatch.setenv("WSI_SSL_WEIGHTS", str(tmp_path))
    entry, config = _reduced("uni")
    enc = encoder_from_entry(entry, config, weights=None, seed=0)
    assert enc.config.source == "file" and enc.config.weights_path == str(uni_file.resolve())


def test_unknown_preset_lists_the_zoo() -> None:
    with pytest.raises(EncoderNotFoundError, match=r"'virchow3'.*uni2-h.*virchow2"):
        create_encoder("virchow3")


def test_magnification_is_checked_against_the_trained_scale() -> None:
    enc = create_encoder("random-cnn")  # no trained scale recorded: never refused
    enc.check_scale(0.25, 224)
    uni = encoder_from_entry(*_reduced("uni", depth=1), weights="random", seed=0)
    uni.check_scale(0.5, 224)
    uni.check_scale(0.53, 224)  # within 10%
    uni.check_scale(0.25, 448)  # resized 448 -> 224: 0.5 µm/px at the input
    uni.check_scale(None, 224)  # a store without a recorded scale
    with pytest.raises(MagnificationMismatchError, match=r"0\.25 µm/px.*trained at 0\.5") as info:
        uni.check_scale(0.25, 224, "slides/a.zarr")
    assert "slides/a.zarr" in str(info.value) and "check_mpp=False" in str(info.value)
    assert isinstance(info.value, ValueError)
    assert "re-tile with tile_size=224 and mpp=0.5," in str(info.value)
    entry, config = _reduced("uni", depth=1)
    config = dataclasses.replace(config, resize="bilinear")
    uni_resized = encoder_from_entry(entry, config, weights="random", seed=0)
    for tile_size, advice in (
        (64, "tile_size=224 and mpp=0.5,"),
        (448, "tile_size=448 and mpp=0.25,"),
    ):
        with pytest.raises(MagnificationMismatchError) as info:  # 64 px: no upsampled advice
            uni_resized.check_scale(1.0, tile_size)
        assert f"re-tile with {advice}" in str(info.value)


# -- the zoo in the embedding job and the CLI --------------------------------------------------


@pytest.fixture(scope="module")
def root_at_025(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic slide tiled at 0.25 µm/px (the zoo's models were trained at 0.5)."""
    from wsi_ssl.config import TilingConfig
    from wsi_ssl.synthetic import write_synthetic_slide
    from wsi_ssl.tiling.batch import tile_slide

    base = tmp_path_factory.mktemp("at025")
    slide = write_synthetic_slide(base / "s.tiff", (900, 700), mpp=0.25, seed=3)
    tiling = TilingConfig(mpp=0.25, tile_size=224, codec="zstd", tissue_threshold=0.0)
    tile_slide(slide, base / "root", tiling)
    return base / "root"


def test_embed_refuses_a_store_at_another_scale(root_at_025: Path) -> None:
    from wsi_ssl.embedding import embed
    from wsi_ssl.storage import open_store

    enc = encoder_from_entry(*_reduced("hibou-b", depth=1), weights="random", seed=0)
    summary = embed(root_at_025, enc, device="cpu", workers=0)
    [failed] = summary.failed
    assert failed.error_type == "MagnificationMismatchError"
    assert "0.25 µm/px" in failed.error and "trained at 0.5" in failed.error
    store = open_store(root_at_025).slide(failed.slide)
    assert not (store.path / "embeddings" / enc.encoder_id).exists()  # nothing half-written
    summary = embed(root_at_025, enc, device="cpu", workers=0, check_mpp=False)
    assert not summary.failed and summary.tiles_done > 0


def test_cli_lists_the_zoo_and_reports_a_scale_mismatch_in_one_line(root_at_025: Path) -> None:
    import json

    from tests.conftest import run_cli

    code, out, _ = run_cli(["encoders", "--json"])
    table = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and table["virchow2"]["dim"] == 2560 and table["uni"]["mpp"] == [0.5]
    assert table["conch-v1.5"]["tile_size"] == 448
    assert table["uni2-h"]["weights_path"].endswith("uni2-h/pytorch_model.bin")
    assert "CC-BY-NC-ND-4.0" in table["uni"]["licence"]
    code, out, _ = run_cli(["encoders", "hibou"])
    assert code == 0 and "hibou-b" in out and "hibou-l" in out and "uni" not in out
    argv = ["embed", str(root_at_025), "--encoder", "hibou-b", "--weights", "random"]
    code, _, err = run_cli([*argv, "--device", "cpu", "--workers", "0", "--quiet", "--no-resume"])
    lines = [x for x in err.splitlines() if x.startswith("wsi-ssl: error:")]
    assert code == 1 and len(lines) == 1 and "trained at 0.5 µm/px" in lines[0]
    assert "check_mpp=False" not in lines[0] and "--no-mpp-check" in lines[0]
    code, _, err = run_cli(["embed", str(root_at_025), "--encoder", "no-such-model"])
    assert code == 2 and "hibou-b" in err and "virchow2" in err and err.count("\n") == 1


def test_compiled_encoder_gives_the_same_vectors() -> None:
    enc = create_encoder("random-cnn")
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), np.uint8))
    want = enc(x)
    torch.testing.assert_close(enc.compile(backend="eager")(x), want)  # dynamo, CPU-cheap


@pytest.mark.gpu
def test_cnn_runs_channels_last_on_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    enc = create_encoder("random-cnn")
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 224, 224, 3), np.uint8))
    want = enc(x)
    enc.to("cuda")
    conv = next(m for m in enc.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(enc(x.cuda()).cpu(), want, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_a_giant_preset_loads_at_full_size(tiles: dict[int, np.ndarray], tmp_path: Path) -> None:
    """UNI2-h (ViT-H/14, 681 M parameters) at its published depth: the same checks once."""
    arch, kwargs, _ = TIMM_REFERENCE["uni2-h"]
    with torch.device("meta"):
        ref = timm.create_model(arch, pretrained=False, num_classes=0, img_size=224, **kwargs)
    _scramble(ref, 24)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    x = tiles[224][:1]
    with torch.no_grad():
        tokens = ref.forward_features(
            _reference_input(x, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        )
    want = tokens[:, 0]
    del ref
    enc = create_encoder("uni2-h", weights=path)
    assert sum(p.numel() for p in enc.model.parameters()) > 680e6
    torch.testing.assert_close(enc(torch.from_numpy(x)), want, **TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["uni", "uni2-h", "virchow2", "h-optimus-0", "conch-v1.5"])
def test_presets_in_their_cuda_precision_match_fp32(
    name: str, tiles: dict[int, np.ndarray], tmp_path: Path
) -> None:
    """On CUDA each preset runs under autocast in its published precision (bf16 / fp16): the
    vectors stay within cosine 0.99 of the CPU float32 ones (reduced depth, random weights)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cpu = encoder_from_entry(*_reduced(name), weights="random", seed=0)
    x = torch.from_numpy(tiles[cpu.input_size])
    want = cpu(x)
    gpu = encoder_from_entry(*_reduced(name), weights="random", seed=0).to("cuda")
    assert gpu.compute["precision"] == gpu.config.precision != "fp32"
    got = gpu(x.cuda()).cpu()
    assert F.cosine_similarity(got, want).min() > 0.99


def test_a_missing_weights_file_is_worded_for_the_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A --weights path that does not exist is named as wrong (it said to put the weights there
    "or pass --weights PATH", which was passed); a preset without its file advises --weights
    (it said weights=PATH to the CLI)."""
    from tests.conftest import run_cli

    monkeypatch.setenv("WSI_SSL_WEIGHTS", str(tmp_path / "weights"))
    missing = tmp_path / "nosuch.pth"
    argv = ["embed", str(tmp_path), "--encoder", "resnet18", "--weights", str(missing)]
    code, _, err = run_cli(argv)
    assert code == 2
    assert err.strip() == (
        f"wsi-ssl: error: {missing}: no such weights file (given for encoder 'resnet18') "
        "(command line: --weights)"
    )
    code, _, err = run_cli(["embed", str(tmp_path), "--encoder", "uni"])
    assert code == 2 and "or pass --weights PATH; wsi-ssl never downloads weights" in err, err
