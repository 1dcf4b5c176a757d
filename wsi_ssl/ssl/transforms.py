"""Per-tile DINO multi-crop augmentation for H&E tiles: lightly's transform plus an HED jitter.

:class:`HistoDINOTransform` builds lightly's ``DINOTransform`` (Caron et al., 2021,
https://arxiv.org/abs/2104.14294): 2 global crops and N local crops, random resized crop,
colour jitter, grey, Gaussian blur, solarization, normalisation; and configures it for
histology, where orientation carries no meaning: horizontal and vertical flips and 90-degree
rotations, each with probability 0.5, which together draw uniformly from the 8 symmetries of
the square. What lightly lacks is added into every view before the RGB colour jitter:
:class:`RandomHEDJitter`, the stain augmentation of Tellez et al. (2018, "Whole-slide mitosis
detection in H&E breast histology using PHH3 as a reference to train distilled
stain-invariant convolutional networks", https://arxiv.org/abs/1808.05896; evaluated in
Tellez et al., 2019, https://arxiv.org/abs/1902.06543).

The transform takes a PIL image (or an ``(H, W, 3)`` uint8 array) and returns a list of
``2 + n_local_crops`` float tensors. It draws from numpy's and torch's global generators, as
lightly's and torchvision's transforms do; :class:`~wsi_ssl.ssl.dataset.TileDataset` seeds them
per tile so that a run is reproducible whatever the number of loader workers.
"""

from __future__ import annotations

import numpy as np
from lightly.transforms import DINOTransform
from lightly.transforms.torchvision_v2_compatibility import torchvision_transforms as T
from PIL import Image

from wsi_ssl.ssl.config import PretrainConfig

__all__ = [
    "HED_FROM_RGB",
    "RGB_FROM_HED",
    "HistoDINOTransform",
    "RandomHEDJitter",
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


class HistoDINOTransform:
    """lightly's DINO multi-crop transform set up for H&E, plus :class:`RandomHEDJitter`.

    Args:
        config: the crop sizes, scales and augmentation strengths are read from it.

    Calling it on a tile returns ``[global_1, global_2, local_1, ..., local_n]`` tensors of
    shapes ``(3, G, G)`` and ``(3, L, L)``, normalised with ``config.mean`` and ``config.std``.
    """

    def __init__(self, config: PretrainConfig) -> None:
        self.config = config
        self.dino = DINOTransform(
            global_crop_size=config.global_crop_size,
            global_crop_scale=config.global_crop_scale,
            local_crop_size=config.local_crop_size,
            local_crop_scale=config.local_crop_scale,
            n_local_views=config.n_local_crops,
            hf_prob=config.hflip_prob,
            vf_prob=config.vflip_prob,
            rr_prob=config.rot90_prob,
            rr_degrees=None,  # None: rotations by exactly 90 degrees
            cj_prob=config.color_jitter_prob,
            cj_strength=1.0,
            cj_bright=config.brightness,
            cj_contrast=config.contrast,
            cj_sat=config.saturation,
            cj_hue=config.hue,
            random_gray_scale=config.grayscale_prob,
            gaussian_blur=config.blur_probs,
            sigmas=config.blur_sigma,
            solarization_prob=config.solarization_prob,
            normalize={"mean": list(config.mean), "std": list(config.std)},
        )
        hed = RandomHEDJitter(config.hed_sigma, config.hed_jitter_prob)
        for view in {id(v): v for v in self.dino.transforms}.values():
            _insert_before_color_jitter(view.transform, hed)

    @property
    def n_views(self) -> int:
        return len(self.dino.transforms)

    def __call__(self, image: Image.Image | np.ndarray) -> list:
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image, dtype=np.uint8))
        return self.dino(image)


def _insert_before_color_jitter(compose: T.Compose, transform: object) -> None:
    """Put ``transform`` just before the colour jitter of one of lightly's view pipelines."""
    for i, step in enumerate(compose.transforms):
        inner = getattr(step, "transforms", [])
        if any(type(t).__name__ == "ColorJitter" for t in inner):
            compose.transforms.insert(i, transform)
            return
    raise RuntimeError(
        "lightly's DINO view transform has no ColorJitter step; this lightly version is not "
        "supported (wsi-ssl needs lightly>=1.5)"
    )
