"""The optimiser's parameter groups: weight decay, layer-wise learning-rate decay, frozen blocks.

Layers are counted in the backbone: for a ViT the patch embedding (with the class, register
and position tokens and a recipe's mask token) is layer 0 and block ``i`` is layer ``i + 1``;
for a ResNet the stem is 0 and stage ``k`` is ``k``; everything after the last block (final
norm, heads, decoders) is layer ``L + 1`` and trains at the full rate. With ``layer_decay``
``d`` a layer trains at ``lr * d ** (L + 1 - layer)`` (BEiT, Bao et al., 2022; used when
fine-tuning a pretrained ViT). ``freeze_blocks`` ``N`` turns gradients off for layers ``0..N``.
Biases and norm weights (1-d parameters) get no weight decay, as in DINO.
:func:`clip_gradients` clips per parameter, as DINO's code does.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from wsi_ssl.errors import ConfigError

__all__ = ["backbone_layers", "clip_gradients", "layer_of", "param_groups"]

_BACKBONE = re.compile(r"(?:^|\.)backbone\.(.+)$")
_VIT_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_RESNET_STAGE = re.compile(r"^layer(\d+)\.")
_EMBEDDING = ("patch_embed.", "cls_token", "pos_embed", "reg_token", "mask_token")


def backbone_layers(backbone: nn.Module) -> int:
    """``L``: ViT blocks, ResNet stages (0 for other backbones: no layer structure)."""
    blocks = getattr(backbone, "blocks", None)
    if isinstance(blocks, nn.Sequential | nn.ModuleList):
        return len(blocks)
    return sum(1 for name, _ in backbone.named_children() if _RESNET_STAGE.match(name + "."))


def layer_of(name: str, n_layers: int) -> int:
    """The layer of a student parameter name (see the module docstring)."""
    if name.endswith("mask_token") and "backbone." not in name and "decoder." not in name:
        return 0
    match = _BACKBONE.search(name)
    if match is None or n_layers == 0:
        return n_layers + 1
    inner = match.group(1)
    if inner.startswith(_EMBEDDING) or inner.startswith(("conv1.", "bn1.", "stem.")):
        return 0
    for pattern in (_VIT_BLOCK, _RESNET_STAGE):
        found = pattern.match(inner)
        if found:
            return int(found.group(1)) + (1 if pattern is _VIT_BLOCK else 0)
    return n_layers + 1


def param_groups(
    student: nn.Module, backbone: nn.Module, *, layer_decay: float = 1.0, freeze_blocks: int = 0
) -> list[dict[str, Any]]:
    """AdamW groups ``{"params", "lr_scale", "apply_wd"}``, decayed weights first; the
    parameters of frozen layers get ``requires_grad=False`` and are left out.

    Raises:
        ConfigError: ``freeze_blocks`` over the backbone's blocks (or stages), which froze the
            whole backbone: a run that trained its heads alone.
    """
    n_layers = backbone_layers(backbone)
    if freeze_blocks > n_layers:
        raise ConfigError(
            f"freeze_blocks={freeze_blocks} is over the backbone's {n_layers} blocks (or "
            f"stages): it would freeze the whole backbone; use at most {n_layers}",
            parameters=("freeze_blocks",),
        )
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, param in student.named_parameters():
        layer = layer_of(name, n_layers)
        in_backbone = _BACKBONE.search(name) is not None
        if in_backbone and freeze_blocks > 0 and layer <= freeze_blocks:
            param.requires_grad_(False)
        if not param.requires_grad:
            continue
        scale = layer_decay ** (n_layers + 1 - layer)
        groups.setdefault((param.ndim > 1, scale), []).append(param)
    ordered = sorted(groups, key=lambda key: (not key[0], -key[1]))
    return [
        {"params": groups[key], "lr_scale": key[1], "apply_wd": key[0]}
        | ({} if key[0] else {"weight_decay": 0.0})
        for key in ordered
    ]


def clip_gradients(parameters: Iterator[nn.Parameter], clip: float) -> None:
    """Scale each parameter's gradient to norm at most ``clip`` (DINO's ``clip_gradients``)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    for grad, norm in zip(grads, norms, strict=True):
        grad.mul_(torch.clamp(clip / (norm + 1e-6), max=1.0))
