"""``PretrainConfig``: every setting of a DINO pretraining run, frozen and validated.

The defaults are the DINO paper's ViT-S/16 recipe (Caron et al., 2021, "Emerging Properties
in Self-Supervised Vision Transformers", https://arxiv.org/abs/2104.14294, and the
``main_dino.py`` arguments of its full ViT-S/16 run), with augmentations adapted to H&E
histology: vertical flips and 90-degree rotations (tissue has no canonical orientation), an
HED stain jitter (Tellez et al., 2019, https://arxiv.org/abs/1902.06543), milder colour
jitter and blur. ``PretrainConfig.preset("cpu-small")`` is a small variant that trains in
minutes on a CPU.

Schedules are written in epochs, as in the paper, and converted to steps with the run's
steps per epoch (tiles per epoch // global batch); fractional epochs are allowed. With
``steps`` set, the run lasts that many optimiser steps and the epoch-based warm-ups keep
their length in steps, clipped to the run.

The valid values and the checks are :mod:`wsi_ssl.ssl.config_checks`'s. Importing this module
loads no torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from wsi_ssl.errors import ConfigError
from wsi_ssl.ssl.config_checks import (
    AUGMENTS,
    DEVICES,
    PRECISIONS,
    SAMPLINGS,
    STAIN_METHODS,
    check_config,
)
from wsi_ssl.ssl.methods import RECIPES

__all__ = [
    "AUGMENTS",
    "DEVICES",
    "METHODS",
    "PRECISIONS",
    "PRESETS",
    "RUNTIME_FIELDS",
    "SAMPLINGS",
    "STAIN_METHODS",
    "PretrainConfig",
]

METHODS = tuple(RECIPES.names())  # the built-in methods (more may be registered)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Settings that may differ when a run is resumed: they change how, not what, it computes.
RUNTIME_FIELDS = frozenset(
    {
        "device",
        "precision",
        "compile",
        "num_workers",
        "num_threads",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "progress",
    }
)


@dataclass(frozen=True)
class PretrainConfig:
    """How a DINO encoder is trained on tile stores.

    Attributes:
        method: the pretext recipe (:mod:`wsi_ssl.ssl.recipes`): ``"dino"`` (DINO v1),
            ``"dinov2"`` (DINO + iBOT masked-patch loss + KoLeo, Sinkhorn-Knopp centring; a
            ViT), ``"mae"`` (masked autoencoder, pixel reconstruction; a ViT).
        arch: backbone name in the registry (``wsi_ssl.ssl.backbones.backbone_names()``), or
            ``"encoder:<name>"`` for an architecture of the encoder registry (set by ``init``).
        out_dim: prototypes K of the DINO head's last layer.
        hidden_dim: width of the head's MLP.
        bottleneck_dim: width before the weight-normalised last layer.
        norm_last_layer: keep the last layer's weight norm fixed (more stable).
        head_batch_norm: BatchNorm in the head (DINO uses it only with CNNs).
        drop_path_rate: stochastic depth of the student backbone.
        global_crop_size: side of the 2 global crops in pixels.
        local_crop_size: side of the local crops.
        n_local_crops: local crops per tile.
        global_crop_scale: area range of the global crops, as a fraction of the tile.
        local_crop_scale: area range of the local crops.
        hflip_prob: horizontal flip probability.
        vflip_prob: vertical flip probability.
        rot90_prob: probability of a rotation by a multiple of 90 degrees.
        hed_jitter_prob: probability of the HED stain jitter.
        hed_sigma: HED jitter strength: per stain channel ``x * a + b``,
            ``a ~ U(1 - s, 1 + s)``, ``b ~ U(-s, s)`` (Tellez et al.: 0.05 "light", 0.2 "strong").
        color_jitter_prob: probability of the RGB colour jitter.
        brightness: colour jitter brightness.
        contrast: colour jitter contrast.
        saturation: colour jitter saturation.
        hue: colour jitter hue (kept small: hue carries the H&E stain identity).
        grayscale_prob: probability of converting a crop to grey.
        blur_probs: Gaussian blur probability of (global crop 1, global crop 2, local crops).
        blur_sigma: range of the blur's standard deviation in pixels.
        solarization_prob: solarization probability of the second global crop.
        augment: where crops are made: ``"loader"``, per tile in the DataLoader workers with
            lightly's transform (:mod:`wsi_ssl.ssl.transforms`); ``"batch"``, per batch on the
            training device (:mod:`wsi_ssl.ssl.batch_augment`), which keeps a GPU fed;
            ``"auto"``: ``"batch"`` on CUDA, ``"loader"`` on the CPU.
        mean: per-channel mean used to normalise inputs (recorded with the encoder).
        std: per-channel standard deviation used to normalise inputs.
        epochs: passes over the tiles; ignored when ``steps`` is set.
        steps: total optimiser steps, overriding ``epochs``.
        batch_size: tiles per step per process (the global batch is times the world size).
        base_lr: peak learning rate for a global batch of 256 (scaled linearly).
        min_lr: learning rate at the end of the cosine decay (at most the peak rate).
        warmup_epochs: linear learning-rate warm-up.
        weight_decay: weight decay at the start of the cosine schedule.
        weight_decay_end: weight decay at the end.
        momentum_teacher: EMA momentum of the teacher at the start.
        momentum_teacher_end: EMA momentum at the end of the cosine schedule (DINO: 1.0; a
            short run does better when the teacher keeps following the student).
        warmup_teacher_temp: teacher temperature at the start of its warm-up.
        teacher_temp: teacher temperature after the warm-up.
        warmup_teacher_temp_epochs: length of the teacher temperature's linear warm-up.
        student_temp: student temperature.
        center_momentum: EMA momentum of the teacher output centre.
        freeze_last_layer_epochs: the head's last layer gets no updates this long.
        clip_grad: per-parameter gradient norm clip as in DINO's code (0 disables).
        sampling: ``"uniform"`` over tiles, or ``"balanced"``: every slide equally likely,
            so a huge slide does not drown the others.
        tile_size: tile side the stores must have (None: whatever they have, all equal).
        mpp: microns per pixel the stores must have (None: whatever they have, all equal).
        skip_incomplete: train on the complete stores of a root that also has incomplete
            ones (default: refuse with ``StoreIncompleteError``).
        num_workers: DataLoader worker processes (None: min(8, cores - 1)).
        num_threads: torch CPU threads while training (None: torch's default). On a shared
            or oversubscribed CPU, 1 avoids threads spinning against each other.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        precision: ``"auto"`` (bf16 on a GPU that has it, else fp32), ``"fp32"``,
            ``"bf16"`` or ``"fp16"`` (CUDA only, with a gradient scaler).
        compile: ``torch.compile`` the backbones (None: on CUDA only).
        seed: seeds initialisation, sampling order and every augmentation.
        checkpoint_every: steps between checkpoints (one is always written at the end).
        keep_checkpoints: how many step checkpoints to keep.
        log_every: steps between rows of ``metrics.jsonl``.
        progress: show a progress bar.
        ibot_loss_weight: weight of the iBOT masked-patch loss (dinov2).
        koleo_loss_weight: weight of the KoLeo regulariser on the student's class tokens
            (dinov2).
        mask_probability: fraction of the global crops that get a block mask (dinov2).
        mask_ratio: (min, max) fraction of a masked crop's patches that are masked (dinov2).
        sinkhorn_iterations: Sinkhorn-Knopp iterations of the teacher centring (dinov2).
        mae_mask_ratio: fraction of the patches hidden from the MAE encoder.
        decoder_dim: width of the MAE decoder.
        decoder_depth: transformer blocks of the MAE decoder.
        decoder_heads: attention heads of the MAE decoder.
        mae_norm_pix: reconstruct per-patch normalised pixels (MAE's better variant).
        init: start student and teacher from these weights instead of a random init: an
            encoder registry name (``"uni"``), ``"timm/<arch>"`` (both with ``init_weights``)
            or a previous ``wsi-ssl pretrain`` run or checkpoint.
        init_weights: local weights file for ``init`` (registry names and timm archs).
        layer_decay: layer-wise learning-rate decay: block ``i`` of ``L`` trains at
            ``lr * layer_decay ** (L - i)`` (1.0: off).
        freeze_blocks: the patch embedding and the first N blocks (ResNet: the stem and the
            first N stages) are not trained.
        teacher_warmup_epochs: the backbone is held still and the teacher copies the student
            (momentum 0) this long, so that freshly initialised heads fit pretrained
            features before the backbone moves (continued pretraining).
        mixed_scales: accept stores at several magnifications (``tiling.mpp``) in one run;
            every scale is drawn equally often.
        min_tissue: skip tiles whose stored tissue fraction is below this.
        min_tile_std: skip low-information tiles: grey-level standard deviation (0-255) below
            this (blank glass, out-of-focus smears).
        curation: a curation file from :func:`wsi_ssl.ssl.curation.curate`: train only on
            the tiles it selects.
        skip_flagged_tiles: leave out the tiles the store's QC flagged (blur, pen, little
            tissue, dark; :func:`wsi_ssl.tiling.qc.kept_tiles` with the thresholds the slide
            was tiled with). A store tiled without QC keeps every tile.
        stain_normalize: normalise each tile's stains before augmentation: "macenko",
            "reinhard" or "vahadane" (:mod:`wsi_ssl.stain`; blank tiles pass unchanged);
            None: off. Needs ``stain_reference``.
        stain_reference: the reference image file the stains are mapped to.
    """

    arch: str = "vit_small_patch16"
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True
    head_batch_norm: bool = False
    drop_path_rate: float = 0.1
    global_crop_size: int = 224
    local_crop_size: int = 96
    n_local_crops: int = 6
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    hflip_prob: float = 0.5
    vflip_prob: float = 0.5
    rot90_prob: float = 0.5
    hed_jitter_prob: float = 0.8
    hed_sigma: float = 0.05
    color_jitter_prob: float = 0.8
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.1
    hue: float = 0.02
    grayscale_prob: float = 0.1
    blur_probs: tuple[float, float, float] = (1.0, 0.1, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 1.0)
    solarization_prob: float = 0.2
    augment: str = "auto"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    epochs: float = 100
    steps: int | None = None
    batch_size: int = 64
    base_lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996
    momentum_teacher_end: float = 1.0
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: float = 30
    student_temp: float = 0.1
    center_momentum: float = 0.9
    freeze_last_layer_epochs: float = 1
    clip_grad: float = 3.0
    sampling: str = "uniform"
    tile_size: int | None = None
    mpp: float | None = None
    skip_incomplete: bool = False
    num_workers: int | None = None
    num_threads: int | None = None
    device: str = "auto"
    precision: str = "auto"
    compile: bool | None = None
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    progress: bool = True
    method: str = "dino"
    ibot_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    sinkhorn_iterations: int = 3
    mae_mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    mae_norm_pix: bool = True
    init: str | None = None
    init_weights: str | None = None
    layer_decay: float = 1.0
    freeze_blocks: int = 0
    teacher_warmup_epochs: float = 0
    mixed_scales: bool = False
    min_tissue: float = 0.0
    min_tile_std: float = 0.0
    curation: str | None = None
    skip_flagged_tiles: bool = False
    stain_normalize: str | None = None
    stain_reference: str | None = None

    def __post_init__(self) -> None:
        # Tuples may arrive as lists (JSON, TOML): normalise before validating.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        check_config(self)

    # -- derived ---------------------------------------------------------------------------
    @property
    def n_local_views(self) -> int:
        """Local crops made per tile: ``n_local_crops``, or none for a method that reads none
        (MAE), whose data loading would otherwise make them for nothing."""
        from wsi_ssl.ssl.methods import RECIPES

        return self.n_local_crops if RECIPES.get(self.method).uses_local_crops else 0

    def lr_for(self, global_batch: int) -> float:
        """Peak learning rate: the linear scaling rule ``base_lr * global_batch / 256``."""
        return self.base_lr * global_batch / 256

    # -- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples as lists) that :meth:`from_dict` reads back."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PretrainConfig:
        """Build from a dict; unknown keys are an error that lists the valid ones."""
        _check_keys(data)
        return cls(**data)

    def replace(self, **changes: Any) -> PretrainConfig:
        """This config with ``changes`` (unknown keys: an error listing the valid ones)."""
        _check_keys(changes)
        return dataclasses.replace(self, **changes)

    def training_key(self) -> dict[str, Any]:
        """The settings that define what a run computes (resume compares these)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> PretrainConfig:
        """A named starting point, with ``overrides`` applied.

        ``"vit-s16"``: the defaults (ViT-S/16, 224/96 crops, 2 + 6 crops, batch 64 per GPU).
        ``"cpu-small"``: ``resnet18_tiny`` on 64/32-pixel crops (2 + 2) of tiles of 128 px or
        more at 0.5 µm/px, so that a global crop spans 32-64 µm and a nucleus (6-10 µm) is
        10-20 pixels wide; a 256-prototype head, batch 32, and a run of 300 steps (pass
        ``steps=None`` to count ``epochs`` instead; about 10 minutes on two CPU cores): a
        constant teacher momentum of 0.95 (with DINO's 0.996 -> 1 the teacher would hardly
        move from its random start), a sharp constant teacher temperature (0.04), constant
        weight decay and a learning rate that decays only to 3% of its peak; with MAE, a
        128-wide decoder of 2 blocks.
        ``benchmarks/pretrain_learning.py`` measures what it learns against random inits.
        """
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
        _check_keys(overrides)
        return cls(**{**PRESETS[name], **overrides})


def _check_keys(data: dict[str, Any]) -> None:
    """ConfigError listing the valid keys when ``data`` has a key PretrainConfig lacks."""
    names = {f.name for f in dataclasses.fields(PretrainConfig)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(
            f"unknown PretrainConfig keys {sorted(unknown)}; valid keys: {', '.join(sorted(names))}"
        )


PRESETS: dict[str, dict[str, Any]] = {
    "vit-s16": {},
    "cpu-small": {
        "arch": "resnet18_tiny",
        "out_dim": 256,
        "hidden_dim": 512,
        "bottleneck_dim": 128,
        "drop_path_rate": 0.0,
        "global_crop_size": 64,
        "local_crop_size": 32,
        "n_local_crops": 2,
        "global_crop_scale": (0.25, 1.0),
        "local_crop_scale": (0.05, 0.25),
        "batch_size": 32,
        "epochs": 20,
        "steps": 300,
        "base_lr": 0.01,
        "min_lr": 3e-4,
        "warmup_epochs": 2,
        "weight_decay_end": 0.04,
        "momentum_teacher": 0.95,
        "momentum_teacher_end": 0.95,
        "teacher_temp": 0.04,
        "warmup_teacher_temp_epochs": 0,
        "freeze_last_layer_epochs": 0.5,
        "checkpoint_every": 200,
        "decoder_dim": 128,  # MAE: a decoder in proportion to a small encoder (512 wide x 8
        "decoder_depth": 2,  # blocks made a step 16x slower, benchmarks/RESULTS.md; the MAE
        "decoder_heads": 4,  # paper trains well with light decoders)
    },
}
