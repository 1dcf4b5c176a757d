"""Weights files read by their content, not their name, and transformers 5.x state dicts.

A weights file's suffix is only a name: a safetensors file saved as ``pytorch_model.bin`` (the
name ``wsi-ssl encoders`` lists) or a ``torch.save`` file saved as ``.safetensors`` loads; an
HTML page (what a gated download without a login gives) or other text is refused as such, and
no message advises ``weights_only=False``. ``model.state_dict()`` of a ``transformers`` 5.x
model (other parameter names than the published files) loads into the ``hf-*`` presets and
gives the embedding the ``save_pretrained`` file gives.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from wsi_ssl import create_encoder
from wsi_ssl.encoders import encoder_entry
from wsi_ssl.encoders.registry import encoder_from_entry
from wsi_ssl.errors import CheckpointError, PickleCheckpointError, TruncatedWeightsError

X = torch.randint(
    0, 256, (2, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
)


@pytest.fixture(scope="module")
def cnn_state() -> dict[str, torch.Tensor]:
    """A random-cnn state dict other than the one ``create_encoder`` would initialise."""
    model = create_encoder("random-cnn", weights="random", seed=7).model
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _assert_loaded(path: Path, state: dict[str, torch.Tensor]) -> None:
    got = create_encoder("random-cnn", weights=path).model.state_dict()
    assert set(got) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0)


def test_safetensors_saved_as_bin_loads(cnn_state: dict[str, torch.Tensor], tmp_path: Path):
    path = tmp_path / "pytorch_model.bin"
    save_file(cnn_state, str(path))
    _assert_loaded(path, cnn_state)


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy-pickle"])
def test_torch_file_saved_as_safetensors_loads(
    cnn_state: dict[str, torch.Tensor], tmp_path: Path, zipped: bool
) -> None:
    path = tmp_path / "model.safetensors"
    torch.save(cnn_state, path, _use_new_zipfile_serialization=zipped)
    _assert_loaded(path, cnn_state)


TEXTS = {
    "html": (
        "<!DOCTYPE html>\n<html><head><title>Access denied</title></head></html>\n",
        "web page",
    ),
    "json": ('{"error":"Access to model owkin/phikon is restricted."}\n', "text file"),
    "lfs": ("version https://git-lfs.github.com/spec/v1\noid sha256:0f1e\nsize 345607557\n", "LFS"),
}


@pytest.mark.parametrize("kind", sorted(TEXTS))
def test_text_saved_as_weights_is_refused_as_text(tmp_path: Path, kind: str) -> None:
    text, what = TEXTS[kind]
    path = tmp_path / "pytorch_model.bin"
    path.write_text(text)
    with pytest.raises(CheckpointError) as info:
        create_encoder("random-cnn", weights=path)
    msg = str(info.value)
    assert not isinstance(info.value, PickleCheckpointError)
    assert msg.startswith(f"{path}: ") and what in msg and "not " in msg
    assert "weights_only" not in msg and "\n" not in msg
    if kind != "lfs":
        assert "model card" in msg and "log in" in msg


def test_unknown_binary_is_refused_without_unpickling_advice(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(
        CheckpointError, match=r"neither safetensors nor torch\.save output"
    ) as info:
        create_encoder("random-cnn", weights=path)
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)


def test_empty_file_is_refused_as_truncated(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    path.touch()
    with pytest.raises(TruncatedWeightsError, match=r"empty file \(0 bytes\); download or copy"):
        create_encoder("random-cnn", weights=path)


# -- transformers 5.x in-memory names ------------------------------------------------------------

transformers = pytest.importorskip("transformers")
WIDTH = {"embed_dim": 96, "num_heads": 2, "depth": 2}  # reduced; the code is the same
HF: dict[str, tuple[str, dict[str, Any], str]] = {
    # name: (transformers class, config at the reduced width, output)
    "phikon": (
        "ViTModel",
        {"intermediate_size": 384, "patch_size": 16, "layer_norm_eps": 1e-12, "qkv_bias": True},
        "cls",
    ),
    "hibou-b": (
        "Dinov2WithRegistersModel",
        {"patch_size": 14, "num_register_tokens": 4, "layerscale_value": 1e-5},
        "cls",
    ),
    "midnight": (  # SwiGLU: fc1 is gate_proj + up_proj in memory
        "Dinov2Model",
        {"patch_size": 14, "layerscale_value": 1e-5, "use_swiglu_ffn": True},
        "cls+mean",
    ),
}


def _reference(name: str) -> torch.nn.Module:
    cls_name, config, _ = HF[name]
    config_cls = getattr(transformers, cls_name.replace("Model", "Config"))
    cfg = config_cls(
        hidden_size=WIDTH["embed_dim"],
        num_attention_heads=WIDTH["num_heads"],
        num_hidden_layers=WIDTH["depth"],
        image_size=224,
        **config,
    )
    torch.manual_seed(len(name))
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():  # layer scale and biases away from their init, so each one matters
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    return model


def _encoder(name: str, path: Path) -> Any:
    entry = encoder_entry(name)
    kwargs = {**dict(entry.config.arch_kwargs), **WIDTH}
    dim = WIDTH["embed_dim"] * (2 if HF[name][2] == "cls+mean" else 1)
    config = dataclasses.replace(entry.config, arch_kwargs=tuple(kwargs.items()), embed_dim=dim)
    return encoder_from_entry(entry, config, weights=path, seed=0)


@pytest.mark.parametrize("name", sorted(HF))
def test_transformers_in_memory_state_dict_gives_the_published_embedding(
    name: str, tmp_path: Path
) -> None:
    ref = _reference(name)
    ref.save_pretrained(tmp_path / "published")
    published = tmp_path / "model.safetensors"
    save_file(load_file(str(tmp_path / "published" / "model.safetensors")), str(published))
    in_memory = tmp_path / "pytorch_model.bin"
    torch.save(ref.state_dict(), in_memory)  # what `torch.save(model.state_dict())` writes

    enc = _encoder(name, published)
    with torch.no_grad():
        hidden = ref(pixel_values=enc.preprocess(X)).last_hidden_state
    want = hidden[:, 0]
    if HF[name][2] == "cls+mean":
        want = torch.cat([hidden[:, 0], hidden[:, 1:].mean(1)], dim=1)
    got_published = enc(X)
    got_in_memory = _encoder(name, in_memory)(X)
    torch.testing.assert_close(got_published, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_in_memory, got_published, rtol=0, atol=0)


def test_in_memory_state_dict_missing_a_part_names_it(tmp_path: Path) -> None:
    state = _reference("phikon").state_dict()
    key = next(
        k for k in state if k.endswith(("0.attention.k_proj.weight", "0.attention.key.weight"))
    )
    del state[key]
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing trunk\.blocks\.0\.attn\.qkv\.weight"):
        _encoder("phikon", path)
