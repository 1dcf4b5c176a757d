"""Stain normalisation (Macenko, Reinhard, Vahadane) in torch, so it runs on the GPU.

Images are float tensors ``(3, H, W)`` or ``(N, 3, H, W)`` with values in 0..255 (or uint8);
:func:`normalize_array` takes and returns uint8 ``(H, W, 3)`` numpy arrays.

- **Macenko** (Macenko et al., ISBI 2009): optical density ``OD = -log((I + 1) / 240)``, pixels
  with any channel below ``beta`` dropped, the plane of the two largest eigenvectors of the OD
  covariance, stain vectors at the ``alpha`` / ``100 - alpha`` percentile angles, concentrations by
  least squares, scaled so their 99th percentile matches the reference's.
- **Reinhard** (Reinhard et al., 2001), in CIE Lab (as ``skimage.color.rgb2lab``): each channel's
  mean and standard deviation matched to the reference's.
- **Vahadane** (Vahadane et al., TMI 2016): sparse non-negative factorisation of the tissue OD,
  ``OD ~ C W`` with ``C, W >= 0``, unit-norm stain rows and an L1 penalty ``lam`` on ``C``
  (dictionary learning as SPAMS ``trainDL``, which the paper uses, and scikit-learn: exact sparse
  codes alternating with block coordinate descent on each stain row, started from the Macenko
  stains, on a fixed-seed sample of the stained pixels), then the same 99th-percentile scaling.

A blank or white image (fewer than ``min_tissue_pixels`` stained pixels) raises
:class:`~wsi_ssl.errors.StainNormalizationError` when it is the reference, or when
``on_blank="raise"``; with the default ``on_blank="keep"`` such a tile is passed through unchanged
(a batch of tiles at the tissue edge goes on), and :attr:`StainNormalizer.kept_blank` counts them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch

from wsi_ssl.errors import ConfigError, StainNormalizationError
from wsi_ssl.stain_settings import METHODS

__all__ = ["METHODS", "StainNormalizer", "lab_to_rgb", "normalize_array", "rgb_to_lab"]

IO = 240.0  # background intensity of the optical-density transform
BETA = 0.15  # OD below this in any channel: transparent, not stain
ALPHA = 1.0  # percentile of the extreme angles (Macenko)
MAX_C_PERCENTILE = 99.0
VAHADANE_LAMBDA = 0.1
VAHADANE_ITERATIONS = 100
VAHADANE_TOLERANCE = 1e-5  # largest change of a stain vector's component that ends the fit
VAHADANE_FIT_PIXELS = 4_000  # stained pixels the dictionary is learned on (2 stains x 3 channels)
VAHADANE_CODE_LAMBDA = 0.01  # lighter L1 when coding whole images (keeps the reconstruction)
MAX_FIT_PIXELS = 20_000  # stained pixels sampled (fixed seed) to estimate the stains
MIN_REFERENCE_HUE = 3.0
"""Degrees: a reference whose stained pixels' median OD direction is closer to grey has no
colour to match (H&E tiles: 15-25; a greyscale copy: 0) and would turn every tile grey."""

_XYZ_FROM_RGB = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_WHITE_D65 = torch.tensor([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB ``(..., 3)`` in 0..1 to CIE Lab (D65, as ``skimage.color.rgb2lab``)."""
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = lin @ _XYZ_FROM_RGB.to(rgb).T / _WHITE_D65.to(rgb)
    f = torch.where(xyz > 0.008856, xyz.clamp(min=1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    lum = 116 * f[..., 1] - 16
    return torch.stack([lum, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIE Lab ``(..., 3)`` back to sRGB in 0..1 (clipped), the inverse of :func:`rgb_to_lab`."""
    fy = (lab[..., 0] + 16) / 116
    fz = (fy - lab[..., 2] / 200).clamp(min=0)  # negative Z clipped, as skimage does
    f = torch.stack([fy + lab[..., 1] / 500, fy, fz], -1)
    xyz = torch.where(f > 0.2068966, f**3, (f - 16 / 116) / 7.787) * _WHITE_D65.to(lab)
    lin = (xyz @ torch.linalg.inv(_XYZ_FROM_RGB.to(lab)).T).clamp(min=0)
    rgb = torch.where(lin > 0.0031308, 1.055 * lin ** (1 / 2.4) - 0.055, 12.92 * lin)
    return rgb.clamp(0, 1)


def optical_density(pixels: torch.Tensor) -> torch.Tensor:
    """``-log((I + 1) / 240)`` of ``(P, 3)`` pixels in 0..255."""
    return -torch.log((pixels + 1) / IO)


def _pixels(image: torch.Tensor) -> torch.Tensor:
    """``(3, H, W)`` to float ``(H*W, 3)``."""
    return image.reshape(3, -1).T.to(torch.float64)


def _tissue_od(image: torch.Tensor, min_pixels: int, what: str) -> torch.Tensor:
    od = optical_density(_pixels(image))
    tissue = _sample(od[(od >= BETA).all(dim=1)], MAX_FIT_PIXELS)
    if tissue.shape[0] < min_pixels:
        raise StainNormalizationError(
            what,
            f"only {tissue.shape[0]} stained pixels (optical density >= {BETA} in every channel), "
            f"fewer than min_tissue_pixels={min_pixels}: a blank or white image has no stains to "
            "estimate; use a tile with tissue",
        )
    return tissue


def _sample(od: torch.Tensor, count: int) -> torch.Tensor:
    """At most ``count`` rows of ``od``, drawn with a fixed seed (all of them when fewer)."""
    if od.shape[0] <= count:
        return od
    pick = torch.randperm(od.shape[0], generator=torch.Generator().manual_seed(0))[:count]
    return od[pick.to(od.device)]


def _check_colour(tissue_od: torch.Tensor, what: str) -> None:
    unit = tissue_od / tissue_od.norm(dim=1, keepdim=True).clamp(min=1e-12)
    cosine = (unit.sum(dim=1) / 3**0.5).clamp(max=1.0)
    hue = float(torch.rad2deg(torch.arccos(cosine)).median())
    if hue < MIN_REFERENCE_HUE:
        raise StainNormalizationError(
            what,
            f"has no colour (its stained pixels are {hue:.1f} degrees from grey, fewer than "
            f"{MIN_REFERENCE_HUE:g}): a greyscale reference would make every tile grey; use an "
            "H&E tile in colour",
        )


def macenko_stains(tissue_od: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """The ``(2, 3)`` unit stain vectors (haematoxylin first) of stained-pixel OD ``(P, 3)``."""
    _, vectors = torch.linalg.eigh(torch.cov(tissue_od.T))
    plane = vectors[:, 1:3]  # the two largest eigenvalues
    plane = plane * torch.where(plane.sum(0) < 0, -1.0, 1.0).to(plane)  # point into positive OD
    projected = tissue_od @ plane
    phi = torch.atan2(projected[:, 1], projected[:, 0])
    lo, hi = torch.quantile(phi, torch.tensor([alpha, 100 - alpha]).to(phi) / 100)
    v_lo = plane @ torch.stack([torch.cos(lo), torch.sin(lo)])
    v_hi = plane @ torch.stack([torch.cos(hi), torch.sin(hi)])
    stains = torch.stack([v_lo, v_hi]) if v_lo[0] > v_hi[0] else torch.stack([v_hi, v_lo])
    return stains / stains.norm(dim=1, keepdim=True)


def vahadane_stains(
    tissue_od: torch.Tensor,
    lam: float = VAHADANE_LAMBDA,
    iterations: int = VAHADANE_ITERATIONS,
    max_pixels: int = VAHADANE_FIT_PIXELS,
) -> torch.Tensor:
    """The ``(2, 3)`` unit stain rows (haematoxylin first: more red OD) minimising
    ``0.5 ||OD - C W||^2 + lam |C|_1`` over ``C, W >= 0``, ``|W_k| <= 1``, learned on at most
    ``max_pixels`` of the stained-pixel OD ``(P, 3)`` (fixed seed): exact sparse codes ``C``
    alternating with an exact minimisation over each stain row in turn (Mairal et al. 2010)."""
    od = _sample(tissue_od, max_pixels)
    stains = macenko_stains(od).clamp(min=0)
    stains = stains / stains.norm(dim=1, keepdim=True).clamp(min=1e-12)
    for _ in range(iterations):
        conc = sparse_concentrations(od, stains, lam)
        gram, cross = conc.T @ conc, conc.T @ od
        previous, stains = stains, stains.clone()
        for k in range(stains.shape[0]):
            if gram[k, k] > 1e-12:  # a stain no pixel uses stays where it is
                row = stains[k] + (cross[k] - gram[k] @ stains) / gram[k, k]
                row = row.clamp(min=0)
                stains[k] = row / row.norm().clamp(min=1.0)
        if (stains - previous).abs().max() < VAHADANE_TOLERANCE:
            break
    stains = stains / stains.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return stains.flip(0) if stains[0, 0] < stains[1, 0] else stains


def sparse_concentrations(od: torch.Tensor, stains: torch.Tensor, lam: float) -> torch.Tensor:
    """The exact non-negative ``C`` minimising ``0.5 ||OD - C W||^2 + lam |C|_1`` for two stains
    (per pixel: both stains active, or the better of each alone)."""
    gram = stains @ stains.T
    target = od @ stains.T - lam
    both = target @ torch.linalg.pinv(gram)
    only = (target / torch.diagonal(gram)).clamp(min=0)
    # one stain alone at c = max(0, target / g) costs 0.5 |od|^2 - 0.5 c^2 g: keep the larger c^2 g
    gain = only**2 * torch.diagonal(gram)
    first = gain[:, :1] >= gain[:, 1:]
    single = only * torch.cat([first, ~first], 1)
    return torch.where((both >= 0).all(1, keepdim=True), both, single)


class StainNormalizer:
    """Maps images to the stain appearance of ``reference`` (an image file, array or tensor)."""

    def __init__(
        self,
        method: str,
        reference: str | Path | np.ndarray | torch.Tensor,
        *,
        on_blank: Literal["keep", "raise"] = "keep",
        min_tissue_pixels: int = 64,
    ) -> None:
        if method not in METHODS:
            raise ConfigError(
                f"method={method!r} is not a stain normalisation; use one of {METHODS}"
            )
        if on_blank not in ("keep", "raise"):
            raise ConfigError(f"on_blank={on_blank!r}: use 'keep' or 'raise'")
        self.method = method
        self.on_blank = on_blank
        self.min_tissue_pixels = min_tissue_pixels
        self.kept_blank = 0
        name = str(reference) if isinstance(reference, (str, Path)) else "reference image"
        self.reference_name = name
        try:
            image = _as_tensor(
                _load(reference) if isinstance(reference, (str, Path)) else reference
            )
            self._fit_reference(image, name)
        except StainNormalizationError as err:  # the reference the caller chose is at fault
            err.parameters = ("stain_reference",)
            raise

    def _fit_reference(self, image: torch.Tensor, name: str) -> None:
        tissue = _tissue_od(image, self.min_tissue_pixels, name)
        _check_colour(tissue, name)
        if self.method == "reinhard":
            self.lab_mean, self.lab_std = _lab_stats(image)
            return
        self.stains = self._stains(tissue)
        conc = self._concentrations(optical_density(_pixels(image)), self.stains)
        self.max_conc = torch.quantile(conc, MAX_C_PERCENTILE / 100, dim=0)

    def _check_tissue(self, image: torch.Tensor, name: str) -> None:
        _tissue_od(image, self.min_tissue_pixels, name)

    def _stains(self, tissue_od: torch.Tensor) -> torch.Tensor:
        return macenko_stains(tissue_od) if self.method == "macenko" else vahadane_stains(tissue_od)

    def _concentrations(self, od: torch.Tensor, stains: torch.Tensor) -> torch.Tensor:
        if self.method == "macenko":
            return torch.linalg.lstsq(stains.T, od.T).solution.T
        return sparse_concentrations(od, stains, VAHADANE_CODE_LAMBDA)

    def stain_matrix(self, image: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The ``(2, 3)`` stain vectors of one image by this normaliser's method."""
        tissue = _tissue_od(_as_tensor(image), self.min_tissue_pixels, "image")
        return self._stains(tissue)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """One ``(3, H, W)`` image (0..255) to the reference's stains; same dtype and device."""
        work = image.to(torch.float64)
        try:
            if self.method == "reinhard":
                self._check_tissue(work, "image")
                out = self._reinhard(work)
            else:
                out = self._deconvolve(work)
        except StainNormalizationError:
            if self.on_blank == "raise":
                raise
            self.kept_blank += 1
            return image
        if image.dtype == torch.uint8:
            return out.round().clamp(0, 255).to(torch.uint8)
        return out.to(image.dtype)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``(3, H, W)`` or ``(N, 3, H, W)`` images, each normalised on its own."""
        if images.ndim == 3:
            return self.normalize(images)
        return torch.stack([self.normalize(image) for image in images])

    def _reinhard(self, image: torch.Tensor) -> torch.Tensor:
        lab = rgb_to_lab(image.permute(1, 2, 0) / 255)
        mean, std = _lab_stats(image)
        ref_mean, ref_std = self.lab_mean.to(lab), self.lab_std.to(lab)
        matched = (lab - mean) / std.clamp(min=1e-6) * ref_std + ref_mean
        return lab_to_rgb(matched).permute(2, 0, 1) * 255

    def _deconvolve(self, image: torch.Tensor) -> torch.Tensor:
        od = optical_density(_pixels(image))
        stains = self._stains(_tissue_od(image, self.min_tissue_pixels, "image"))
        conc = self._concentrations(od, stains)
        max_conc = torch.quantile(conc, MAX_C_PERCENTILE / 100, dim=0)
        conc = conc * (self.max_conc.to(conc) / max_conc.clamp(min=1e-6))
        pixels = IO * torch.exp(-conc @ self.stains.to(conc))
        return pixels.clamp(0, 255).T.reshape(image.shape)


def _lab_stats(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lab = rgb_to_lab(image.to(torch.float64).permute(1, 2, 0) / 255).reshape(-1, 3)
    return lab.mean(0), lab.std(0, correction=0)


def _load(path: str | Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as error:
        raise StainNormalizationError(
            str(path), f"cannot read the reference image ({error}); pass an RGB image file"
        ) from error


def _as_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``(H, W, 3)`` / ``(H, W, 4)`` arrays or ``(3, H, W)`` tensors to a ``(3, H, W)`` tensor."""
    if isinstance(image, np.ndarray):
        return torch.from_numpy(np.array(image[..., :3])).permute(2, 0, 1)
    return image


def normalize_array(
    image: np.ndarray, method: str, reference: str | Path | np.ndarray, **options: object
) -> np.ndarray:
    """A uint8 ``(H, W, 3)`` array normalised to ``reference`` (see :class:`StainNormalizer`)."""
    normalizer = StainNormalizer(method, reference, on_blank="raise", **options)  # type: ignore[arg-type]
    out = normalizer.normalize(_as_tensor(image).to(torch.float64))
    return out.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
