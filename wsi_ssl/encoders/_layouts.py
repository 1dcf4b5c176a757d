"""Published weight layouts mapped onto the zoo's modules (a timm ViT as ``trunk``).

Each converter is ``fn(state, model) -> state``: the tensors of a published file renamed (and,
where the published model computes something once per forward, precomputed) so that the zoo
module loads them strictly and computes the published embedding:

- ``timm``: a timm ``VisionTransformer`` state dict (UNI, UNI2-h, Virchow, Virchow2,
  H-optimus, Prov-GigaPath): names gain the ``trunk.`` prefix.
- ``hf-vit``: Hugging Face ``transformers`` ``ViTModel`` (Phikon): separate query/key/value
  become timm's fused ``qkv``; ``layernorm_before/after`` become ``norm1/2``.
- ``hf-dinov2``: ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (Phikon-v2, Midnight, Hibou):
  as above plus layer scale ``lambda1`` -> ``gamma``, SwiGLU ``weights_in/out`` -> ``fc1/fc2``,
  register tokens; the class token's position embedding is folded into the class token when
  the timm model adds position embeddings to patches only (timm's ``no_embed_class``), and the
  position grid is resampled once as ``transformers`` does on every forward pass.
- ``conch``: CONCH v1.5's ``pytorch_model_vision.bin`` (``trunk.``, ``attn_pool_contrast.``,
  ``ln_contrast.``): its trunk keeps a 224-px position grid that the reference code resamples to
  the 448-px input on every forward pass; that resampling is done here once.

Both ``hf-*`` layouts also read ``model.state_dict()`` of a ``transformers`` 5.x model, whose
in-memory names differ from the published files' (``save_pretrained`` converts back, by the
table ``transformers.conversion_mapping`` keeps per class): ``layers.N.`` (ViT) for
``encoder.layer.N.``, ``attention.{q,k,v,o}_proj`` for ``attention.attention.{query,key,value}``
and ``attention.output.dense``, ViT's ``mlp.fc1/fc2`` for ``intermediate.dense`` /
``output.dense``, and SwiGLU's ``mlp.gate_proj`` + ``mlp.up_proj`` (the halves of
``weights_in``) and ``mlp.down_proj`` (``weights_out``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LAYOUTS", "conch", "hf_dinov2", "hf_vit", "timm"]

Tensors = dict[str, torch.Tensor]

# per-layer renames, Hugging Face name -> timm name (after 'encoder.layer.N.' -> 'blocks.N.')
_HF_VIT = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_DINOV2 = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.fc1",
    "mlp.weights_out": "mlp.fc2",
    "mlp.down_proj": "mlp.fc2",
}
# per-layer tensors concatenated into one timm tensor: name -> (timm name, position, parts)
_HF_FUSED = {
    "attention.attention.query": ("attn.qkv", 0, 3),
    "attention.attention.key": ("attn.qkv", 1, 3),
    "attention.attention.value": ("attn.qkv", 2, 3),
    "attention.q_proj": ("attn.qkv", 0, 3),
    "attention.k_proj": ("attn.qkv", 1, 3),
    "attention.v_proj": ("attn.qkv", 2, 3),
    "mlp.gate_proj": ("mlp.fc1", 0, 2),
    "mlp.up_proj": ("mlp.fc1", 1, 2),
}
_HF_EMBED = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
# present in the published files, unused by an encoder's forward pass
_HF_UNUSED = ("embeddings.mask_token", "pooler.")
_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias|lambda1)$")


def _trunk(model: nn.Module) -> nn.Module:
    trunk = getattr(model, "trunk", None)
    if not isinstance(trunk, nn.Module):
        raise TypeError(f"{type(model).__name__} has no 'trunk' module")
    return trunk


def _grid(trunk: nn.Module) -> tuple[int, int]:
    """The timm trunk's patch grid (rows, columns) at its input size."""
    rows, cols = trunk.patch_embed.grid_size  # type: ignore[union-attr,misc]
    return int(rows), int(cols)


def _prefixed(state: Tensors) -> Tensors:
    return {k if k.startswith("trunk.") else f"trunk.{k}": v for k, v in state.items()}


def timm(state: Tensors, model: nn.Module) -> Tensors:
    """A timm state dict: add the ``trunk.`` prefix."""
    return _prefixed(state)


def _hf_rename(state: Tensors, per_layer: dict[str, str]) -> Tensors:
    """Hugging Face names -> timm names; query/key/value fused into qkv (in that order), a
    SwiGLU's gate/up halves into fc1."""
    state = {
        k.split(".", 1)[1] if k.split(".", 1)[0] in ("vit", "dinov2") else k: v
        for k, v in state.items()
    }
    out: Tensors = {}
    fused: dict[tuple[int, str, str], dict[int, tuple[str, torch.Tensor]]] = {}
    for key, value in state.items():
        if key.startswith(_HF_UNUSED):
            continue
        if key in _HF_EMBED:
            out[_HF_EMBED[key]] = value
            continue
        m = _LAYER.match(key)
        if m is None:
            out[key] = value  # left as is: reported as unexpected by the strict load
            continue
        layer, name, kind = int(m.group(1)), m.group(2), m.group(3)
        if name in _HF_FUSED:
            target, position, _ = _HF_FUSED[name]
            fused.setdefault((layer, target, kind), {})[position] = (key, value)
        elif kind == "lambda1" and f"{name}.lambda1" in per_layer:
            out[f"blocks.{layer}.{per_layer[f'{name}.lambda1']}"] = value
        elif name in per_layer:
            out[f"blocks.{layer}.{per_layer[name]}.{kind}"] = value
        else:
            out[key] = value
    parts_of = {target: n for target, _, n in _HF_FUSED.values()}
    for (layer, target, kind), parts in fused.items():
        if set(parts) == set(range(parts_of[target])):
            out[f"blocks.{layer}.{target}.{kind}"] = torch.cat([parts[i][1] for i in sorted(parts)])
        else:  # incomplete: keep the originals so the strict load names them
            out.update(parts.values())
    return out


def _resample_grid(
    patch_pos: torch.Tensor, grid: tuple[int, int], *, antialias: bool
) -> torch.Tensor:
    """(1, N, D) square position grid -> (1, H*W, D), bicubic, as ``transformers`` does."""
    n, dim = patch_pos.shape[1], patch_pos.shape[2]
    side = math.isqrt(n)
    if (side, side) == grid:
        return patch_pos
    x = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=grid, mode="bicubic", align_corners=False, antialias=antialias)
    return x.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim).to(patch_pos.dtype)


def _fold_positions(state: Tensors, trunk: nn.Module, *, antialias: bool) -> Tensors:
    """DINOv2 adds position embeddings to [class, patches]; map that onto the timm trunk."""
    pos = state.get("pos_embed")
    if pos is None or pos.ndim != 3:
        return state
    grid = _grid(trunk)
    cls_pos, patch_pos = pos[:, :1], _resample_grid(pos[:, 1:], grid, antialias=antialias)
    if getattr(trunk, "no_embed_class", False) and "cls_token" in state:
        state["cls_token"] = state["cls_token"] + cls_pos
        state["pos_embed"] = patch_pos
    else:
        state["pos_embed"] = torch.cat([cls_pos, patch_pos], dim=1)
    return state


def hf_vit(state: Tensors, model: nn.Module) -> Tensors:
    """``transformers`` ``ViTModel`` -> the timm trunk."""
    return _prefixed(_hf_rename(state, _HF_VIT))


def hf_dinov2(state: Tensors, model: nn.Module) -> Tensors:
    """``transformers`` ``Dinov2Model`` / ``Dinov2WithRegistersModel`` -> the timm trunk."""
    registers = "embeddings.register_tokens" in state
    out = _hf_rename(state, _HF_DINOV2)
    # Dinov2WithRegisters resamples with antialiasing, Dinov2 without (transformers 4.4x-4.5x)
    return _prefixed(_fold_positions(out, _trunk(model), antialias=registers))


def conch(state: Tensors, model: nn.Module) -> Tensors:
    """CONCH v1.5 vision tower: resample the trunk's position grid as the reference does.

    The reference tower (TRIDENT ``conchv1_5.py``, a timm-0.9 ViT-L/16 built at 224 px)
    first resamples the file's grid to 14 x 14 (timm ``resample_abs_pos_embed``, bilinear, no
    antialias) when it differs, then on every 448-px forward pass resamples 14 x 14 -> 28 x 28
    bicubic with ``scale_factor = (28 + 0.1) / 14`` (the DINO recipe).
    """
    from timm.layers import resample_abs_pos_embed

    trunk = _trunk(model)
    key = "trunk.pos_embed"
    if key not in state:
        return state
    pos = state[key]
    if pos.shape[1] != 1 + 14 * 14:
        pos = resample_abs_pos_embed(
            pos, new_size=[14, 14], num_prefix_tokens=1, interpolation="bilinear", antialias=False
        )
    grid = _grid(trunk)
    dim = pos.shape[2]
    if grid != (14, 14):
        patches = pos[:, 1:].reshape(1, 14, 14, dim).permute(0, 3, 1, 2)
        scale = ((grid[0] + 0.1) / 14, (grid[1] + 0.1) / 14)
        patches = F.interpolate(patches, scale_factor=scale, mode="bicubic")
        patches = patches.permute(0, 2, 3, 1).reshape(1, -1, dim)
        pos = torch.cat([pos[:, :1], patches], dim=1)
    return {**state, key: pos}


LAYOUTS: dict[str, Callable[[Tensors, nn.Module], Tensors]] = {
    "timm": timm,
    "hf-vit": hf_vit,
    "hf-dinov2": hf_dinov2,
    "conch": conch,
}
