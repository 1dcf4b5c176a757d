"""The pathology foundation-model zoo: one registered preset per published tile encoder.

Each preset records what reproduces the published embedding: the timm architecture and its
exact constructor arguments (classes as dotted names), input size, mean/std, the scale it was
trained at (µm/px at the model input, checked against the store at embed time), the output
convention, the embedding dimension, the licence, and the published file(s) it reads in the
layout the model card publishes (``wsi_ssl.encoders._layouts``). Weights are never downloaded:
put the file at ``<weights_dir>/<name>/<file>`` or pass ``weights=PATH``.

Sources (public model cards and reference code, read 2026-12):
  [UNI]   huggingface.co/MahmoodLab/UNI; TRIDENT patch_encoder_models/load.py (UNIInferenceEncoder)
  [UNI2]  huggingface.co/MahmoodLab/UNI2-h; TRIDENT load.py (UNIv2InferenceEncoder)
  [V1]    huggingface.co/paige-ai/Virchow; TRIDENT load.py (VirchowInferenceEncoder)
  [V2]    huggingface.co/paige-ai/Virchow2; TRIDENT load.py (Virchow2InferenceEncoder)
  [HO]    huggingface.co/bioptimus/H-optimus-0, H-optimus-1; TRIDENT load.py (HOptimus0/1)
  [GP]    huggingface.co/prov-gigapath/prov-gigapath; TRIDENT load.py (GigaPathInferenceEncoder)
  [PH]    huggingface.co/owkin/phikon, owkin/phikon-v2; TRIDENT load.py (Phikon, Phikonv2)
  [HB]    huggingface.co/histai/hibou-b, histai/hibou-L; TRIDENT constants.py (HIBOU_MEAN/STD)
  [MN]    huggingface.co/kaiko-ai/midnight; TRIDENT load.py (Midnight12kInferenceEncoder)
  [C15]   huggingface.co/MahmoodLab/conchv1_5; TRIDENT model_zoo/conchv1_5/conchv1_5.py
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from wsi_ssl.encoders._layouts import LAYOUTS
from wsi_ssl.encoders._towers import build_zoo
from wsi_ssl.encoders.config import IMAGENET_MEAN, IMAGENET_STD, EncoderConfig
from wsi_ssl.encoders.registry import register_encoder

__all__ = ["PRESETS", "Preset"]

SWIGLU = {"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"}
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)  # [HO] card: transforms.Normalize
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
HIBOU_MEAN = (0.7068, 0.5755, 0.722)  # [HB]
HIBOU_STD = (0.195, 0.2316, 0.1816)
KAIKO_MEAN = (0.5, 0.5, 0.5)  # [MN] card: Normalize(mean=0.5, std=0.5)
KAIKO_STD = (0.5, 0.5, 0.5)
MULTI_SCALE = (0.25, 0.5, 1.0, 2.0)  # trained on 40x, 20x, 10x and 5x tiles


@dataclass(frozen=True)
class Preset:
    """The published facts of one tile encoder."""

    name: str
    arch: str  # timm architecture name
    kwargs: dict[str, Any]  # timm constructor arguments (+ output / tower / layer_norm_eps)
    embed_dim: int
    card: str
    files: tuple[str, ...]
    licence: str
    layout: str = "timm"
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    mpp: tuple[float, ...] = (0.5,)
    precision: str = "bf16"
    note: str = ""


PRESETS: tuple[Preset, ...] = (
    # [UNI] ViT-L/16, layer scale 1e-5, class token; 20x (0.5 µm/px) 224-px tiles
    Preset(
        "uni",
        "vit_large_patch16_224",
        {"init_values": 1e-5, "dynamic_img_size": True},
        1024,
        "https://huggingface.co/MahmoodLab/UNI",
        ("pytorch_model.bin",),
        "CC-BY-NC-ND-4.0",
        note="UNI (Chen et al. 2024) ViT-L/16",
    ),
    # [UNI2] ViT-H/14 (timm vit_giant_patch14_224 resized): 24 blocks, 1536 wide, 24 heads,
    # SwiGLU (mlp_ratio 2.66667*2), 8 register tokens, no class position embedding
    Preset(
        "uni2-h",
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
        1536,
        "https://huggingface.co/MahmoodLab/UNI2-h",
        ("pytorch_model.bin",),
        "CC-BY-NC-ND-4.0",
        note="UNI2-h ViT-H/14, 8 registers",
    ),
    # [V1] ViT-H/14, SwiGLU (mlp_ratio 5.3375), SiLU; embedding = [class, mean(patches)]
    Preset(
        "virchow",
        "vit_huge_patch14_224",
        {"init_values": 1e-5, "mlp_ratio": 5.3375, "dynamic_img_size": True, **SWIGLU}
        | {"output": "cls+mean"},
        2560,
        "https://huggingface.co/paige-ai/Virchow",
        ("pytorch_model.bin", "model.safetensors"),
        "Apache-2.0",
        precision="fp16",
        note="Virchow ViT-H/14, class token + mean patch token",
    ),
    # [V2] as Virchow plus 4 register tokens (left out of the patch mean: tokens[:, 5:])
    Preset(
        "virchow2",
        "vit_huge_patch14_224",
        {"init_values": 1e-5, "mlp_ratio": 5.3375, "reg_tokens": 4, "dynamic_img_size": True}
        | SWIGLU
        | {"output": "cls+mean"},
        2560,
        "https://huggingface.co/paige-ai/Virchow2",
        ("pytorch_model.bin", "model.safetensors"),
        "CC-BY-NC-ND-4.0",
        mpp=MULTI_SCALE,
        precision="fp16",
        note="Virchow2 ViT-H/14, 4 registers, class token + mean patch token",
    ),
    # [HO] ViT-g/14 DINOv2 with 4 registers, layer scale 1e-5, class token; 0.5 µm/px
    Preset(
        "h-optimus-0",
        "vit_giant_patch14_reg4_dinov2",
        {"init_values": 1e-5, "dynamic_img_size": False},
        1536,
        "https://huggingface.co/bioptimus/H-optimus-0",
        ("pytorch_model.bin", "model.safetensors"),
        "Apache-2.0",
        mean=HOPTIMUS_MEAN,
        std=HOPTIMUS_STD,
        precision="fp16",
        note="H-optimus-0 ViT-g/14, 4 registers",
    ),
    Preset(
        "h-optimus-1",
        "vit_giant_patch14_reg4_dinov2",
        {"init_values": 1e-5, "dynamic_img_size": False},
        1536,
        "https://huggingface.co/bioptimus/H-optimus-1",
        ("pytorch_model.bin", "model.safetensors"),
        "H-optimus-1 non-commercial (see card)",
        mean=HOPTIMUS_MEAN,
        std=HOPTIMUS_STD,
        precision="fp16",
        note="H-optimus-1 ViT-g/14, 4 registers",
    ),
    # [GP] tile encoder: vit_giant_patch14_dinov2 at patch 16 (SwiGLU from that architecture),
    # 40 blocks, class token; card transform Resize(256, bicubic) + CenterCrop(224) of 20x tiles
    Preset(
        "prov-gigapath",
        "vit_giant_patch14_dinov2",
        {
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "init_values": 1e-5,
            "mlp_ratio": 5.33334,
            "dynamic_img_size": True,
            **SWIGLU,
        },
        1536,
        "https://huggingface.co/prov-gigapath/prov-gigapath",
        ("pytorch_model.bin",),
        "Apache-2.0",
        precision="fp16",
        note="Prov-GigaPath tile encoder ViT-g/16 (card: 224-px centre crop of 256-px tiles)",
    ),
    # [PH] iBOT ViT-B/16 in transformers ViTModel layout (LayerNorm eps 1e-12); class token
    Preset(
        "phikon",
        "vit_base_patch16_224",
        {"layer_norm_eps": 1e-12},
        768,
        "https://huggingface.co/owkin/phikon",
        ("pytorch_model.bin", "model.safetensors"),
        "Owkin non-commercial (see card)",
        layout="hf-vit",
        precision="fp32",
        note="Phikon ViT-B/16 (transformers ViTModel layout)",
    ),
    # [PH] DINOv2 ViT-L/16 in transformers Dinov2Model layout; class token
    Preset(
        "phikon-v2",
        "vit_large_patch16_224",
        {"init_values": 1e-5},
        1024,
        "https://huggingface.co/owkin/phikon-v2",
        ("model.safetensors",),
        "Owkin non-commercial (see card)",
        layout="hf-dinov2",
        precision="fp32",
        note="Phikon-v2 ViT-L/16 (transformers Dinov2Model layout)",
    ),
    # [HB] DINOv2 ViT-B/14 and ViT-L/14 with 4 registers (transformers layout); pooler = class
    Preset(
        "hibou-b",
        "vit_base_patch14_reg4_dinov2",
        {"init_values": 1e-5},
        768,
        "https://huggingface.co/histai/hibou-b",
        ("model.safetensors",),
        "Apache-2.0",
        layout="hf-dinov2",
        mean=HIBOU_MEAN,
        std=HIBOU_STD,
        precision="fp32",
        note="Hibou-B ViT-B/14, 4 registers (transformers Dinov2 layout)",
    ),
    Preset(
        "hibou-l",
        "vit_large_patch14_reg4_dinov2",
        {"init_values": 1e-5},
        1024,
        "https://huggingface.co/histai/hibou-L",
        ("model.safetensors",),
        "Apache-2.0",
        layout="hf-dinov2",
        mean=HIBOU_MEAN,
        std=HIBOU_STD,
        precision="fp32",
        note="Hibou-L ViT-L/14, 4 registers (transformers Dinov2 layout)",
    ),
    # [MN] DINOv2 ViT-g/14 (SwiGLU) in transformers Dinov2Model layout; [class, mean(patches)]
    Preset(
        "midnight",
        "vit_giant_patch14_dinov2",
        {"init_values": 1e-5, **SWIGLU, "output": "cls+mean"},
        3072,
        "https://huggingface.co/kaiko-ai/midnight",
        ("model.safetensors",),
        "MIT",
        layout="hf-dinov2",
        mean=KAIKO_MEAN,
        std=KAIKO_STD,
        mpp=MULTI_SCALE,
        precision="fp16",
        note="kaiko Midnight ViT-g/14, class token + mean patch token",
    ),
    # [C15] ViT-L/16 (layer scale init 1.0) at 448 px, attention pool -> LayerNorm, 768-d;
    # 512-px 20x tiles resized to 448 (0.5 * 512 / 448 µm/px at the model input)
    Preset(
        "conch-v1.5",
        "vit_large_patch16_224",
        {"init_values": 1.0, "tower": "conch"},
        768,
        "https://huggingface.co/MahmoodLab/conchv1_5",
        ("pytorch_model_vision.bin",),
        "CC-BY-NC-ND-4.0",
        layout="conch",
        input_size=448,
        mpp=(round(0.5 * 512 / 448, 4),),
        precision="fp16",
        note="CONCH v1.5 vision tower ViT-L/16 at 448 px, attention-pooled",
    ),
)


def _register(p: Preset) -> None:
    def build(config: EncoderConfig) -> nn.Module:
        return build_zoo(config)

    files = " or ".join(p.files)
    register_encoder(
        p.name,
        arch=f"timm/{p.arch}",
        input_size=p.input_size,
        embed_dim=p.embed_dim,
        mean=p.mean,
        std=p.std,
        precision=p.precision,
        arch_kwargs=p.kwargs,
        description=f"{p.note} {p.embed_dim}-d; weights: {files} from {p.card}",
        mpp=p.mpp,
        licence=p.licence,
        model_card=p.card,
        weights_files=p.files,
        convert=LAYOUTS[p.layout],
    )(build)


for _preset in PRESETS:
    _register(_preset)
