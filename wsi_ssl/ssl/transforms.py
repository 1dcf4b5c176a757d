"""Per-tile DINO multi-crop augmentation for H&E tiles, composed from lightly's parts plus an
HED jitter.

:class:`HistoDINOTransform` is DINO's multi-crop (Caron et al., 2021,
https://arxiv.org/abs/2104.14294): 2 global crops and N local crops, each view (:func:`dino_view`)
a random resized crop, colour jitter, grey, Gaussian blur, solarization and normalisation, as
lightly's ``DINOTransform`` composes them, from the same lightly and torchvision steps; set up
for histology, where orientation carries no meaning: horizontal and vertical flips and 90-degree
rotations, each with probability 0.5, which together draw uniformly from the 8 symmetries of
the square. What lightly lacks is added into every view before the RGB colour jitter:
:class:`RandomHEDJitter`, the stain augmentation of Tellez et al. (2018, "Whole-slide mitosis
detection in H&E breast histology using PHH3 as a reference to train distilled
stain-invariant convolutional networks", https://arxiv.org/abs/1808.05896; evaluated in
Tellez et al., 2019, https://arxiv.org/abs/1902.06543).

The transform takes a PIL image (or an ``(H, W, 3)`` uint8 array) and returns a list of
``2 + n_local_views`` float tensors (no local crops for MAE). It draws from numpy's and torch's
global generators, as lightly's and torchvision's transforms do; :class:`~wsi_ssl.ssl.dataset.TileDataset` seeds them
per tile so that a run is reproducible whatever the number of loader workers.
"""

from __future__ import annotations

import numpy as np
from lightly.transforms.gaussian_blur import GaussianBlur
from lightly.transforms.multi_view_transform import MultiViewTransform
from lightly.transforms.rotation import random_rotation_transform
from lightly.transforms.solarize import RandomSolarization
from lightly.transforms.torchvision_v2_compatibility import torchvision_transforms as T
from PIL import Image

from wsi_ssl.ssl.config import PretrainConfig

__all__ = [
    "HED_FROM_RGB",
    "RGB_FROM_HED",
    "HistoDINOTransform",
    "RandomHEDJitter",
    "dino_view",
    "hed_jitter",
    "hed_to_rgb",
    "rgb_to_hed",
]

# Ruifrok & Johnston (2001) stain vectors for haematoxylin, eosin and DAB, as in
# scikit-image's ``rgb_from_hed`` (rows: the optical density of each stain in R, G, B).
RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64
)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
_LOG_ADJUST = np.log(1e-6)  # optical density is -log(rgb) scaled so that rgb = 1e-6 gives 1


def rgb_to_hed(rgb: np.ndarray) -> np.ndarray:
    """Colour deconvolution: ``(..., 3)`` RGB in [0, 1] to haematoxylin, eosin, DAB densities.

    Same convention as ``skimage.color.rgb2hed`` (densities clipped at 0).
    """
    rgb = np.maximum(rgb, 1e-6)
    stains = (np.log(rgb) / _LOG_ADJUST) @ HED_FROM_RGB
    return np.maximum(stains, 0)


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_hed`; RGB clipped to [0, 1] (``skimage.color.hed2rgb``)."""
    log_rgb = -(hed * -_LOG_ADJUST) @ RGB_FROM_HED
    return np.clip(np.exp(log_rgb), 0, 1)


def hed_jitter(rgb: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Scale and shift each stain: ``hed * alpha + beta``, for uint8 ``(H, W, 3)`` RGB.

    ``alpha`` and ``beta`` are 3-vectors (H, E, D). Returns uint8 RGB. As in Tellez et al.'s
    augmentation, the densities are optical densities (natural log, not the rescaled units of
    :func:`rgb_to_hed`), so ``beta = 0.05`` is a shift of 0.05 in OD; and they are not clipped
    at 0 between the two conversions, so ``alpha = 1, beta = 0`` gives the input back.
    """
    od = -np.log(np.maximum(rgb.astype(np.float32) / 255.0, 1e-6))  # optical density
    hed = od @ HED_FROM_RGB.astype(np.float32)
    hed = hed * np.asarray(alpha, np.float32) + np.asarray(beta, np.float32)
    out = np.clip(np.exp(-(hed @ RGB_FROM_HED.astype(np.float32))), 0, 1)
    return (out * 255.0 + 0.5).astype(np.uint8)


class RandomHEDJitter:
    """Random H&E stain jitter in HED colour space (Tellez et al., 2018).

    With probability ``prob``, every stain channel ``c`` of the deconvolved image becomes
    ``c * a + b`` with ``a ~ U(1 - sigma, 1 + sigma)`` and ``b ~ U(-sigma, sigma)``, then is
    recombined into RGB. ``sigma = 0.05`` is Tellez's "HED-light", 0.2 "HED-strong".

    Input and output: PIL RGB image (or uint8 ``(H, W, 3)`` array, returned as a PIL image).
    """

    def __init__(self, sigma: float = 0.05, prob: float = 0.8) -> None:
        self.sigma = float(sigma)
        self.prob = float(prob)

    def __call__(self, image: Image.Image | np.ndarray) -> Image.Image:
        rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
        if self.sigma == 0 or np.random.random_sample() >= self.prob:
            return image if isinstance(image, Image.Image) else Image.fromarray(rgb)
        alpha = np.random.uniform(1 - self.sigma, 1 + self.sigma, size=3)
        beta = np.random.uniform(-self.sigma, self.sigma, size=3)
        return Image.fromarray(hed_jitter(rgb, alpha, beta))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma}, prob={self.prob})"


def dino_view(
    config: PretrainConfig,
    *,
    crop_size: int,
    crop_scale: tuple[float, float],
    blur_prob: float,
    solarization_prob: float,
    color_jitter_strength: float = 1.0,
) -> T.Compose:
    """One view's pipeline: lightly's DINO view (``DINOViewTransform``'s steps, in its order)
    with :class:`RandomHEDJitter` before the colour jitter.

    Random resized crop (bicubic), horizontal and vertical flips, a rotation by 90 degrees,
    HED jitter, colour jitter (``color_jitter_prob``; brightness, contrast, saturation and hue
    times ``color_jitter_strength``), greyscale, Gaussian blur, solarization, to tensor,
    normalisation with ``config.mean`` / ``config.std``.
    """
    c, s = config, color_jitter_strength
    return T.Compose(
        [
            T.RandomResizedCrop(
                size=crop_size, scale=crop_scale, interpolation=T.InterpolationMode.BICUBIC
            ),
            T.RandomHorizontalFlip(p=c.hflip_prob),
            T.RandomVerticalFlip(p=c.vflip_prob),
            random_rotation_transform(rr_prob=c.rot90_prob, rr_degrees=None),
            RandomHEDJitter(c.hed_sigma, c.hed_jitter_prob),
            T.RandomApply(
                [
                    T.ColorJitter(
                        brightness=s * c.brightness,
                        contrast=s * c.contrast,
                        saturation=s * c.saturation,
                        hue=s * c.hue,
                    )
                ],
                p=c.color_jitter_prob,
            ),
            T.RandomGrayscale(p=c.grayscale_prob),
            GaussianBlur(sigmas=c.blur_sigma, prob=blur_prob),
            RandomSolarization(prob=solarization_prob),
            T.ToTensor(),
            T.Normalize(mean=list(c.mean), std=list(c.std)),
        ]
    )


SECOND_VIEW_JITTER_STRENGTH = 0.5
"""The colour jitter of the second global view runs at half strength, as in lightly's
``DINOTransform`` (which builds that view with ``DINOViewTransform``'s default
``cj_strength=0.5``); kept so that the per-tile augmentation is what it was."""


class HistoDINOTransform(MultiViewTransform):
    """DINO multi-crop for H&E, composed from lightly's and torchvision's parts.

    Args:
        config: the crop sizes, scales and augmentation strengths are read from it.

    As lightly's ``DINOTransform``: the first global view with blur ``blur_probs[0]`` and no
    solarization, the second with blur ``blur_probs[1]`` and ``solarization_prob`` (colour
    jitter at :data:`SECOND_VIEW_JITTER_STRENGTH`), ``n_local_crops`` local views with blur
    ``blur_probs[2]``; every view as :func:`dino_view`. Calling it on a tile (PIL image or
    uint8 array) returns ``[global_1, global_2, local_1, ..., local_n]`` tensors of shapes
    ``(3, G, G)`` and ``(3, L, L)``.
    """

    def __init__(self, config: PretrainConfig) -> None:
        c = config
        self.config = c
        blur = c.blur_probs
        global_0 = dino_view(
            c,
            crop_size=c.global_crop_size,
            crop_scale=c.global_crop_scale,
            blur_prob=blur[0],
            solarization_prob=0.0,
        )
        global_1 = dino_view(
            c,
            crop_size=c.global_crop_size,
            crop_scale=c.global_crop_scale,
            blur_prob=blur[1],
            solarization_prob=c.solarization_prob,
            color_jitter_strength=SECOND_VIEW_JITTER_STRENGTH,
        )
        local = dino_view(
            c,
            crop_size=c.local_crop_size,
            crop_scale=c.local_crop_scale,
            blur_prob=blur[2],
            solarization_prob=0.0,
        )
        super().__init__([global_0, global_1] + [local] * c.n_local_views)

    @property
    def n_views(self) -> int:
        return len(self.transforms)

    def __call__(self, image: Image.Image | np.ndarray) -> list:  # type: ignore[override]
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image, dtype=np.uint8))
        return super().__call__(image)
