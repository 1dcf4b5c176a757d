"""Backbones by name: :data:`BACKBONES`, on the project's one registry mechanism
(:class:`wsi_ssl.registry.Registry`), filled with a decorator, timm-style.

Each entry pairs a builder (returns a ``torch.nn.Module`` mapping ``(B, 3, H, W)`` float
images to ``(B, D)`` features, any ``H = W`` multiple of the patch size) with a frozen
:class:`BackboneSpec` saying what it needs. Importing this module loads neither torch nor
timm, so :class:`~wsi_ssl.ssl.config.PretrainConfig` can validate an architecture name
cheaply; the builders import them when called.

Registered:
    ``vit_small_patch16``: ViT-S/16 (22 M parameters, D = 384), the DINO paper's default and
        ours on a GPU (Caron et al., 2021, https://arxiv.org/abs/2104.14294).
    ``vit_tiny_patch16``: ViT-Ti/16 (5.5 M, D = 192).
    ``vit_nano_patch8``: a 4-block ViT with 8-pixel patches (D = 192, 1.8 M): trains in
        minutes on a CPU with 64-pixel global crops.
    ``resnet18``: ResNet-18 (11 M, D = 512) (He et al., 2016, https://arxiv.org/abs/1512.03385).
    ``resnet18_slim``: ResNet-18 at half width (2.8 M, D = 256).
    ``resnet18_tiny``: ResNet-18 at quarter width (0.7 M, D = 128), the CPU backbone of the
        ``cpu-small`` preset: a few hundred steps on 48-pixel crops take a minute or two.

Besides these names, ``"encoder:<name>"`` is any architecture of the encoder registry
(:func:`wsi_ssl.encoders.create_encoder`: ``"encoder:uni"``, ``"encoder:timm/vit_base_patch16_224"``),
built at random init for continued pretraining (its weights are loaded by
:mod:`wsi_ssl.ssl.init`); its spec is read off a built model, so it imports torch. A zoo
preset's pooling tower (class + mean token, CONCH's attention pool) is left aside: the run
trains the timm ViT inside it (:func:`pretraining_module`), so every recipe (DINO, DINOv2's and
MAE's patch masking), layer decay and frozen blocks apply; the trained encoder pools its tokens as
the preset publishes them where that is the class token with the mean patch token
(``BackboneSpec.output``), else outputs the class token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from wsi_ssl.registry import Registry

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "backbone_names",
    "build_backbone",
    "get_spec",
    "pretraining_module",
    "register_backbone",
]


@dataclass(frozen=True)
class BackboneSpec:
    """What a registered backbone is and how to feed it.

    Attributes:
        name: registry name (recorded in checkpoints).
        family: ``"vit"`` or ``"resnet"``.
        embed_dim: feature dimension D of the backbone's output ``(B, D)`` (its heads' input;
            the trained encoder gives ``2 * D`` when ``output`` is ``"cls+mean"``).
        patch_size: input sides must be multiples of this (1 for CNNs).
        default_input_size: the global crop size it is usually trained and used at.
        batch_norm: whether it has BatchNorm layers (synchronised under multi-GPU DDP).
        description: one line for ``--help`` and error messages.
        output: how the trained encoder pools its tokens: ``"cls"`` (or a CNN's pooled
            features), or ``"cls+mean"`` for a zoo preset published that way (Virchow, Midnight):
            the class token and the mean patch token, ``2 * embed_dim`` features.
    """

    name: str
    family: str
    embed_dim: int
    patch_size: int
    default_input_size: int
    batch_norm: bool
    description: str
    output: str = "cls"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Builder = Callable[..., "nn.Module"]

BACKBONES: Registry[tuple[BackboneSpec, Builder]] = Registry("arch", parameter="arch")
"""``(spec, builder)`` by name (``PretrainConfig.arch``)."""


def register_backbone(spec: BackboneSpec) -> Callable[[Builder], Builder]:
    """Decorator that registers ``builder(drop_path_rate=..., input_size=...)`` under
    ``spec.name`` (a taken name is a ``ConfigError``)."""

    def decorate(builder: Builder) -> Builder:
        BACKBONES.add(spec.name, (spec, builder))
        return builder

    return decorate


def backbone_names() -> list[str]:
    """The registered backbone names, sorted."""
    return BACKBONES.names()


ENCODER_PREFIX = "encoder:"


def get_spec(name: str) -> BackboneSpec:
    """The spec of a registered backbone; ``ConfigError`` listing the valid names otherwise."""
    if name.startswith(ENCODER_PREFIX):
        return _encoder_spec(name)
    return BACKBONES.get(name)[0]


def build_backbone(
    name: str, *, drop_path_rate: float = 0.0, input_size: int | None = None
) -> nn.Module:
    """A freshly initialised backbone (random weights; nothing is downloaded)."""
    spec = get_spec(name)
    if name.startswith(ENCODER_PREFIX):
        return _build_from_encoder(name, drop_path_rate)
    builder = BACKBONES.get(name)[1]
    return builder(drop_path_rate=drop_path_rate, input_size=input_size or spec.default_input_size)


_ENCODER_SPECS: dict[str, BackboneSpec] = {}


def pretraining_module(model: nn.Module) -> nn.Module:
    """What continued pretraining trains of an encoder-registry model: the timm ViT inside a
    zoo preset's pooling tower (its ``trunk``), else the model itself."""
    from timm.models.vision_transformer import VisionTransformer

    trunk = getattr(model, "trunk", None)
    return trunk if isinstance(trunk, VisionTransformer) else model


def _build_from_encoder(name: str, drop_path_rate: float) -> nn.Module:
    """A random-init, trainable copy of an encoder registry architecture; ViTs take any crop
    size (timm's dynamic image size) and get ``drop_path_rate`` stochastic depth."""
    from lightly.models.utils import update_drop_path_rate
    from timm.layers import Format
    from timm.models.vision_transformer import VisionTransformer

    from wsi_ssl.encoders import create_encoder

    model: Any = pretraining_module(
        create_encoder(name.removeprefix(ENCODER_PREFIX), weights="random").model
    )
    model.train().requires_grad_(True)
    if isinstance(model, VisionTransformer):
        vit: Any = model  # timm types dynamic_img_size Final; it is a plain attribute
        vit.dynamic_img_size = True
        embed = vit.patch_embed
        embed.strict_img_size = False
        embed.flatten = False
        embed.output_fmt = Format.NHWC
        if drop_path_rate > 0:
            update_drop_path_rate(model, drop_path_rate)
    return model


def _encoder_spec(name: str) -> BackboneSpec:
    if name not in _ENCODER_SPECS:
        from timm.models.vision_transformer import VisionTransformer
        from torch import nn as torch_nn

        from wsi_ssl.encoders import create_encoder

        encoder = create_encoder(name.removeprefix(ENCODER_PREFIX), weights="random")
        model: Any = pretraining_module(encoder.model)
        vit = isinstance(model, VisionTransformer)
        pooled = getattr(encoder.model, "output", "cls") if vit else "cls"
        _ENCODER_SPECS[name] = BackboneSpec(
            name=name,
            family="vit" if vit else "cnn",
            embed_dim=int(model.num_features) if vit else encoder.embed_dim,
            patch_size=int(model.patch_embed.patch_size[0]) if vit else 1,
            default_input_size=encoder.input_size,
            batch_norm=any(
                isinstance(m, torch_nn.modules.batchnorm._BatchNorm) for m in model.modules()
            ),
            description=f"{encoder.config.arch} from the encoder registry",
            output=pooled,
        )
    return _ENCODER_SPECS[name]


def _vit(
    *,
    patch_size: int,
    embed_dim: int,
    depth: int,
    num_heads: int,
    drop_path_rate: float,
    input_size: int,
) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=input_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        num_classes=0,
        drop_path_rate=drop_path_rate,
        dynamic_img_size=True,  # local crops (96 px) go through the same model
    )


def _resnet(*, channels: tuple[int, ...], stem_width: int, drop_path_rate: float) -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet

    return ResNet(
        block=BasicBlock,  # type: ignore[arg-type]  # timm annotates an instance; it takes the class
        layers=(2, 2, 2, 2),
        channels=channels,
        stem_width=stem_width,
        num_classes=0,
        drop_path_rate=drop_path_rate,
    )


@register_backbone(
    BackboneSpec(
        "vit_small_patch16", "vit", 384, 16, 224, False, "ViT-S/16, the DINO default (GPU)"
    )
)
def vit_small_patch16(*, drop_path_rate: float, input_size: int) -> nn.Module:
    return _vit(
        patch_size=16,
        embed_dim=384,
        depth=12,
        num_heads=6,
        drop_path_rate=drop_path_rate,
        input_size=input_size,
    )


@register_backbone(BackboneSpec("vit_tiny_patch16", "vit", 192, 16, 224, False, "ViT-Ti/16"))
def vit_tiny_patch16(*, drop_path_rate: float, input_size: int) -> nn.Module:
    return _vit(
        patch_size=16,
        embed_dim=192,
        depth=12,
        num_heads=3,
        drop_path_rate=drop_path_rate,
        input_size=input_size,
    )


@register_backbone(
    BackboneSpec("vit_nano_patch8", "vit", 192, 8, 64, False, "4-block ViT, 8 px patches (CPU)")
)
def vit_nano_patch8(*, drop_path_rate: float, input_size: int) -> nn.Module:
    return _vit(
        patch_size=8,
        embed_dim=192,
        depth=4,
        num_heads=3,
        drop_path_rate=drop_path_rate,
        input_size=input_size,
    )


@register_backbone(BackboneSpec("resnet18", "resnet", 512, 1, 224, True, "ResNet-18"))
def resnet18(*, drop_path_rate: float, input_size: int) -> nn.Module:
    return _resnet(channels=(64, 128, 256, 512), stem_width=64, drop_path_rate=drop_path_rate)


@register_backbone(
    BackboneSpec("resnet18_slim", "resnet", 256, 1, 64, True, "ResNet-18 at half width")
)
def resnet18_slim(*, drop_path_rate: float, input_size: int) -> nn.Module:
    return _resnet(channels=(32, 64, 128, 256), stem_width=32, drop_path_rate=drop_path_rate)


@register_backbone(
    BackboneSpec("resnet18_tiny", "resnet", 128, 1, 48, True, "ResNet-18 at quarter width (CPU)")
)
def resnet18_tiny(*, drop_path_rate: float, input_size: int) -> nn.Module:
    return _resnet(channels=(16, 32, 64, 128), stem_width=16, drop_path_rate=drop_path_rate)
