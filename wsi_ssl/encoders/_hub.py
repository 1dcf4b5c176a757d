"""timm and torchvision architectures, random-init (``pretrained=False`` / ``weights=None``)
with weights from a local file. Both libraries are imported only when such an encoder is built.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from wsi_ssl.encoders.config import EncoderConfig
from wsi_ssl.encoders.encoder import Encoder
from wsi_ssl.encoders.registry import (
    finish_encoder,
    register_encoder,
    register_source,
    seeded,
    slug,
    weights_file,
)
from wsi_ssl.errors import ConfigError, EncoderNotFoundError

__all__ = ["build_timm", "build_torchvision"]


def _import(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as err:  # a broken install raises RuntimeError/OSError, not ImportError
        raise ConfigError(
            f"cannot import {module} ({type(err).__name__}: {err}); install a {module} build that "
            "matches your torch (pip install 'wsi-ssl[ml]')"
        ) from err


# -- timm ------------------------------------------------------------------------------------
def build_timm(config: EncoderConfig) -> nn.Module:
    """``timm.create_model(arch, pretrained=False, num_classes=0, img_size=input_size,
    **arch_kwargs)``: pooled features, no classifier (``img_size`` dropped for architectures
    that take any size)."""
    timm = _import("timm")
    arch = config.arch.removeprefix("timm/")
    kwargs = {"img_size": config.input_size, **dict(config.arch_kwargs)}
    try:
        return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    except TypeError:
        kwargs.pop("img_size", None)  # architectures without a fixed input size
        return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)


def _timm_arch(spec: str) -> str:
    arch = spec.removeprefix("timm/")
    if arch not in _import("timm").list_models():
        raise EncoderNotFoundError(spec, ["timm/<one of timm.list_models()>"])
    return arch


def _locate_timm(spec: str, *, weights: str | Path | None, how: str) -> Path | None:
    return weights_file(slug(_timm_arch(spec)), weights, how=how)


@register_source(
    "timm",
    matches=lambda s: s.startswith("timm/"),
    description="timm/<arch>: any timm architecture, weights from weights=PATH (or 'random')",
    locate=_locate_timm,
)
def _load_timm(
    spec: str, *, weights: str | Path | None, seed: int, overrides: dict[str, Any]
) -> Encoder:
    timm = _import("timm")
    arch = _timm_arch(spec)
    name = slug(overrides.get("name", arch))
    path = weights_file(name, weights)
    pcfg = timm.get_pretrained_cfg(arch)
    cfg = pcfg.to_dict() if pcfg is not None else {}
    size = int(overrides.get("input_size", (cfg.get("input_size") or (3, 224, 224))[-1]))
    config = EncoderConfig(
        name=name,
        arch=f"timm/{arch}",
        input_size=size,
        embed_dim=1,
        mean=tuple(cfg.get("mean") or (0.485, 0.456, 0.406)),  # type: ignore[arg-type]
        std=tuple(cfg.get("std") or (0.229, 0.224, 0.225)),  # type: ignore[arg-type]
    )
    with seeded(seed):
        model = build_timm(config)
    # a plain attribute of timm models; nn.Module types unknown attributes as Tensor | Module
    num_features = cast(int, model.num_features)
    config = dataclasses.replace(
        config,
        embed_dim=int(num_features),
        **{k: v for k, v in overrides.items() if k not in ("name", "input_size")},
    )
    return finish_encoder(model, config, weights=path, seed=seed)


# -- torchvision -------------------------------------------------------------------------------
def _drop_classifier(model: nn.Module) -> nn.Module:
    for attr in ("fc", "classifier", "heads", "head"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Identity())
            return model
        if isinstance(head, nn.Sequential):
            for i in reversed(range(len(head))):
                if isinstance(head[i], nn.Linear):
                    head[i] = nn.Identity()
                    return model
    raise ConfigError(f"{type(model).__name__}: no classifier head (fc/classifier/heads) to drop")


def build_torchvision(config: EncoderConfig) -> nn.Module:
    """``torchvision.models.get_model(arch, weights=None)`` with the last Linear removed."""
    models = _import("torchvision.models")
    arch = config.arch.removeprefix("torchvision/")
    return _drop_classifier(models.get_model(arch, weights=None, **dict(config.arch_kwargs)))


def _torchvision_arch(spec: str) -> str:
    models = _import("torchvision.models")
    arch = spec.removeprefix("torchvision/")
    if arch not in models.list_models(module=models):
        raise EncoderNotFoundError(spec, ["torchvision/<one of torchvision.models.list_models()>"])
    return arch


def _locate_torchvision(spec: str, *, weights: str | Path | None, how: str) -> Path | None:
    return weights_file(slug(_torchvision_arch(spec)), weights, how=how)


@register_source(
    "torchvision",
    matches=lambda s: s.startswith("torchvision/"),
    description="torchvision/<arch>: any torchvision classification model, weights from "
    "weights=PATH (or 'random')",
    locate=_locate_torchvision,
)
def _load_torchvision(
    spec: str, *, weights: str | Path | None, seed: int, overrides: dict[str, Any]
) -> Encoder:
    arch = _torchvision_arch(spec)
    name = slug(overrides.get("name", arch))
    path = weights_file(name, weights)
    size = int(overrides.get("input_size", 224))
    config = EncoderConfig(name=name, arch=f"torchvision/{arch}", input_size=size, embed_dim=1)
    with seeded(seed):
        model = build_torchvision(config)
    with torch.inference_mode():
        dim = int(model.eval()(torch.zeros(1, 3, size, size)).shape[1])
    config = dataclasses.replace(
        config, embed_dim=dim, **{k: v for k, v in overrides.items() if k != "name"}
    )
    return finish_encoder(model, config, weights=path, seed=seed)


# -- named encoders ------------------------------------------------------------------------------
@register_encoder(
    "resnet18",
    arch="torchvision/resnet18",
    input_size=224,
    embed_dim=512,
    description="torchvision ResNet-18, pooled 512-d (weights: local file)",
)
def resnet18(config: EncoderConfig) -> nn.Module:
    return build_torchvision(config)


@register_encoder(
    "resnet50",
    arch="torchvision/resnet50",
    input_size=224,
    embed_dim=2048,
    description="torchvision ResNet-50, pooled 2048-d (weights: local file)",
)
def resnet50(config: EncoderConfig) -> nn.Module:
    return build_torchvision(config)


@register_encoder(
    "vit_small_patch16_224",
    arch="timm/vit_small_patch16_224",
    input_size=224,
    embed_dim=384,
    precision="bf16",
    description="timm ViT-S/16, class token 384-d, bf16 on CUDA (weights: local file)",
)
def vit_small_patch16_224(config: EncoderConfig) -> nn.Module:
    return build_timm(config)


@register_encoder(
    "vit_base_patch16_224",
    arch="timm/vit_base_patch16_224",
    input_size=224,
    embed_dim=768,
    precision="bf16",
    description="timm ViT-B/16, class token 768-d, bf16 on CUDA (weights: local file)",
)
def vit_base_patch16_224(config: EncoderConfig) -> nn.Module:
    return build_timm(config)
