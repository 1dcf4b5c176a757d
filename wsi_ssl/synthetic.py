"""Synthetic pyramidal H&E-like slides for tests and benchmarks.

The slide is an analytic field: a few irregular tissue blobs (pink eosin stroma with
purple nuclei) on a near-white glass background, optionally crossed by a green pen stroke.
Apart from a slight per-tile noise, every pixel is a function of its level-0 position and
the seed, so level 0 is rendered tile by tile (bounded memory at any size) and each lower
level renders the same field at its own scale, with detail finer than its pixels averaged
out, so all levels agree.
:func:`tissue_mask_truth` evaluates the same blobs, giving tissue detectors a ground truth.

Both openslide (generic-tiff) and tiffslide open the files: level 0 is the first IFD and the
lower levels follow in the main IFD chain as reduced-resolution pages (openslide ignores
SubIFDs), with resolution tags in centimetres.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from wsi_ssl.errors import ConfigError

__all__ = ["tissue_mask_truth", "write_synthetic_slide"]

COMPRESSIONS = ("jpeg", "zlib")

_MAX_EXTENT = 8192  # blob sizes scale with min(w, h) up to this, so huge slides hold small tissue
_CELL = 12.0  # level-0 pixels per nucleus cell (at most one nucleus per cell)
_NUCLEUS_RADIUS = (2.5, 4.5)
_POINT_SAMPLED_MAX_DOWNSAMPLE = 2  # coarser levels draw nuclei as their average colour
_LESION_SCALE = 0.8  # lesion radius / its blob's radius
_LESION_DENSITY = 1.35  # nucleus density inside a lesion (elsewhere 0..1): crowded nuclei

_GLASS = np.array([241.0, 240.0, 242.0], dtype=np.float32)
_EOSIN_LIGHT = np.array([244.0, 188.0, 214.0], dtype=np.float32)
_EOSIN_DARK = np.array([206.0, 104.0, 160.0], dtype=np.float32)
_LUMEN = np.array([246.0, 232.0, 240.0], dtype=np.float32)
_HEMATOXYLIN_DARK = np.array([62.0, 34.0, 112.0], dtype=np.float32)
_HEMATOXYLIN_LIGHT = np.array([118.0, 78.0, 168.0], dtype=np.float32)
_PEN_GREEN = np.array([0.30, 0.70, 0.38], dtype=np.float32)  # multiplicative, like ink


@dataclass(frozen=True)
class _Waves:
    """A smooth random field: a sum of plane waves, evaluated separably on a pixel grid."""

    kx: np.ndarray
    ky: np.ndarray
    phase: np.ndarray
    wavelength: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, n: int, wavelengths: tuple[float, float]) -> _Waves:
        wavelength = np.exp(rng.uniform(np.log(wavelengths[0]), np.log(wavelengths[1]), n))
        angle = rng.uniform(0.0, np.pi, n)
        k = 2.0 * np.pi / wavelength
        return cls(k * np.cos(angle), k * np.sin(angle), rng.uniform(0, 2 * np.pi, n), wavelength)

    def __call__(self, xs: np.ndarray, ys: np.ndarray, downsample: float) -> np.ndarray:
        """The field in [0, 1] at the grid `ys` x `xs` (level-0 coordinates).

        Waves shorter than four pixels at this `downsample` fade out (gone at two), as
        averaging the level-0 image over a pixel would do.
        """
        weight = np.clip(self.wavelength / (2.0 * downsample) - 1.0, 0.0, 1.0)
        a = np.outer(xs, self.kx) + self.phase
        b = np.outer(ys, self.ky)
        total = (np.cos(b) * weight) @ np.sin(a).T + (np.sin(b) * weight) @ np.cos(a).T
        spread = math.sqrt(len(self.wavelength) / 2.0)
        return np.clip(0.5 + total / (3.0 * spread), 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class _Blob:
    """An ellipse whose radius is modulated by a few angular harmonics."""

    cx: float
    cy: float
    a: float
    b: float
    cos_t: float
    sin_t: float
    harmonics: np.ndarray  # complex coefficient per order 2, 3, ...

    @property
    def reach(self) -> float:
        return max(self.a, self.b) * (1.0 + float(np.abs(self.harmonics).sum()))

    def intersects(self, x0: float, y0: float, x1: float, y1: float) -> bool:
        r = self.reach
        return self.cx + r > x0 and self.cx - r < x1 and self.cy + r > y0 and self.cy - r < y1

    def contains(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        dx = xs[None, :] - self.cx
        dy = ys[:, None] - self.cy
        u = (dx * self.cos_t + dy * self.sin_t) / self.a
        v = (dy * self.cos_t - dx * self.sin_t) / self.b
        rho = np.hypot(u, v)
        unit = (u + 1j * v) / np.maximum(rho, 1e-9)
        radius = np.ones_like(rho)
        power = unit
        for coef in self.harmonics:
            power = power * unit
            radius += (coef * power).real
        return rho < radius


@dataclass(frozen=True)
class _Pen:
    """A thick sinuous marker stroke: |y - (yc + amp sin(2 pi x / period + phase))| < half."""

    x0: float
    x1: float
    yc: float
    amp: float
    period: float
    phase: float
    half: float

    def intersects(self, x0: float, y0: float, x1: float, y1: float) -> bool:
        reach = self.amp + self.half
        return self.x1 > x0 and self.x0 < x1 and self.yc + reach > y0 and self.yc - reach < y1

    def contains(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        centre = self.yc + self.amp * np.sin(2 * np.pi * xs / self.period + self.phase)
        inside_x = (xs >= self.x0) & (xs < self.x1)
        return (np.abs(ys[:, None] - centre[None, :]) < self.half) & inside_x[None, :]


@dataclass(frozen=True)
class _Layout:
    blobs: tuple[_Blob, ...]
    pen: _Pen
    fibres: _Waves
    tone: _Waves
    density: _Waves
    lumen: _Waves
    seed: int
    lesion: _Blob | None = None  # a patch of crowded nuclei inside the first blob


def _layout(size: tuple[int, int], seed: int, lesion: bool = False) -> _Layout:
    """Everything random about a slide, drawn in a fixed order from `seed`."""
    w, h = size
    rng = np.random.default_rng(seed)
    extent = min(w, h, _MAX_EXTENT)
    blobs = []
    for _ in range(int(rng.integers(3, 6))):
        a = extent * rng.uniform(0.08, 0.15)
        theta = rng.uniform(0.0, np.pi)
        orders = np.arange(2, 7)
        harmonics = (0.12 / orders) * rng.uniform(0.3, 1.0, orders.size)
        harmonics = harmonics * np.exp(1j * rng.uniform(0, 2 * np.pi, orders.size))
        blobs.append(
            _Blob(
                cx=w * rng.uniform(0.25, 0.75),
                cy=h * rng.uniform(0.35, 0.75),
                a=a,
                b=a * rng.uniform(0.6, 1.0),
                cos_t=math.cos(theta),
                sin_t=math.sin(theta),
                harmonics=harmonics,
            )
        )
    pen = _Pen(
        x0=w * 0.15,
        x1=w * 0.65,
        yc=h * 0.08,
        amp=h * 0.02,
        period=w * rng.uniform(0.2, 0.3),
        phase=rng.uniform(0, 2 * np.pi),
        half=max(2.0, 0.012 * min(w, h)),
    )
    return _Layout(
        blobs=tuple(blobs),
        pen=pen,
        fibres=_Waves.draw(rng, 12, (18.0, 120.0)),
        tone=_Waves.draw(rng, 6, (300.0, 1500.0)),
        density=_Waves.draw(rng, 8, (120.0, 600.0)),
        lumen=_Waves.draw(rng, 8, (60.0, 260.0)),
        seed=seed,
        lesion=_lesion_in(blobs[0]) if lesion else None,
    )


def _lesion_in(blob: _Blob) -> _Blob:
    """A smaller ellipse at the centre of `blob` (no random draw: other pixels are unchanged)."""
    return _Blob(
        cx=blob.cx,
        cy=blob.cy,
        a=blob.a * _LESION_SCALE,
        b=blob.b * _LESION_SCALE,
        cos_t=blob.cos_t,
        sin_t=blob.sin_t,
        harmonics=blob.harmonics * 0.5,
    )


def _density(layout: _Layout, xs: np.ndarray, ys: np.ndarray, downsample: float) -> np.ndarray:
    """Nucleus density in [0, 1] on the grid `ys` x `xs`, raised inside the lesion."""
    density = layout.density(xs, ys, downsample)
    lesion = layout.lesion
    if lesion is not None and lesion.intersects(xs[0], ys[0], xs[-1], ys[-1]):
        density = np.maximum(density, _LESION_DENSITY * lesion.contains(xs, ys))
    return density


def _tissue(layout: _Layout, xs: np.ndarray, ys: np.ndarray, box: tuple[float, ...]) -> np.ndarray:
    """Boolean blob mask on the grid `ys` x `xs`, testing only blobs that reach `box`."""
    mask = np.zeros((ys.size, xs.size), dtype=bool)
    for blob in layout.blobs:
        if blob.intersects(*box):
            mask |= blob.contains(xs, ys)
    return mask


def _hash01(ix: np.ndarray, iy: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """Uniform [0, 1) value per integer cell (ix, iy): a vectorised splitmix64 finaliser."""
    key = np.uint64((seed * 0x100000001B3 + salt * 0x9E3779B1) % 2**64)
    h = ix.astype(np.int64).view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    h ^= iy.astype(np.int64).view(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
    h ^= key
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        h ^= h >> np.uint64(shift)
        h *= np.uint64(mult)
    h ^= h >> np.uint64(31)
    return (h >> np.uint64(11)).astype(np.float64) / float(2**53)


def _nucleus_probability(density: np.ndarray) -> np.ndarray:
    return 0.1 + 0.65 * density


def _nuclei(layout: _Layout, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Point-sampled nuclei: (covered bool mask, per-pixel shade in [0, 1]).

    At most one nucleus per `_CELL`-sized cell with radius below half a cell, so a pixel can
    only be covered from the 2 x 2 cells nearest to it.
    """
    first_x = int(np.floor((xs[0] - _CELL / 2) / _CELL))
    first_y = int(np.floor((ys[0] - _CELL / 2) / _CELL))
    cells_x = np.arange(first_x, int(np.floor((xs[-1] + _CELL / 2) / _CELL)) + 1)
    cells_y = np.arange(first_y, int(np.floor((ys[-1] + _CELL / 2) / _CELL)) + 1)
    gx, gy = np.meshgrid(cells_x, cells_y)
    seed = layout.seed
    centre_x = (gx + _hash01(gx, gy, seed, 1)) * _CELL
    centre_y = (gy + _hash01(gx, gy, seed, 2)) * _CELL
    radius = _NUCLEUS_RADIUS[0] + (_NUCLEUS_RADIUS[1] - _NUCLEUS_RADIUS[0]) * _hash01(
        gx, gy, seed, 3
    )
    density = _density(layout, (cells_x + 0.5) * _CELL, (cells_y + 0.5) * _CELL, _CELL)
    present = _hash01(gx, gy, seed, 4) < _nucleus_probability(density)
    radius2 = np.where(present, radius**2, -1.0)
    shade = _hash01(gx, gy, seed, 5)

    covered = np.zeros((ys.size, xs.size), dtype=bool)
    tone = np.zeros((ys.size, xs.size), dtype=np.float64)
    base_x = np.floor((xs - _CELL / 2) / _CELL).astype(np.int64) - first_x
    base_y = np.floor((ys - _CELL / 2) / _CELL).astype(np.int64) - first_y
    for oy in (0, 1):
        for ox in (0, 1):
            iy = (base_y + oy)[:, None]
            ix = (base_x + ox)[None, :]
            d2 = (xs[None, :] - centre_x[iy, ix]) ** 2 + (ys[:, None] - centre_y[iy, ix]) ** 2
            hit = d2 < radius2[iy, ix]
            covered |= hit
            tone = np.where(hit, shade[iy, ix], tone)
    return covered, tone


def _smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _render(
    layout: _Layout,
    origin: tuple[float, float],
    shape: tuple[int, int],
    downsample: float,
    *,
    tissue: bool,
    pen_mark: bool,
    rng: np.random.Generator,
) -> np.ndarray:
    """RGB uint8 (h, w, 3) of the region whose pixel (0, 0) starts at level-0 `origin`."""
    h, w = shape
    xs = origin[0] + (np.arange(w) + 0.5) * downsample
    ys = origin[1] + (np.arange(h) + 0.5) * downsample
    box = (origin[0], origin[1], origin[0] + w * downsample, origin[1] + h * downsample)
    grain = rng.integers(-2, 3, size=(h, w, 1)).astype(np.float32)
    image = _GLASS + grain

    mask = _tissue(layout, xs, ys, box) if tissue else np.zeros((h, w), dtype=bool)
    if mask.any():
        shade = 0.55 * layout.fibres(xs, ys, downsample) + 0.45 * layout.tone(xs, ys, downsample)
        stroma = _EOSIN_LIGHT + (_EOSIN_DARK - _EOSIN_LIGHT) * shade[..., None]
        lumen = _smoothstep(layout.lumen(xs, ys, downsample), 0.8, 0.9)
        if layout.lesion is not None and layout.lesion.intersects(*box):
            lumen = np.where(layout.lesion.contains(xs, ys), 0.0, lumen)  # solid sheets of cells
        stroma += (_LUMEN - stroma) * lumen[..., None]
        if downsample <= _POINT_SAMPLED_MAX_DOWNSAMPLE:
            covered, tone = _nuclei(layout, xs, ys)
            coverage = (covered & (lumen < 0.5)).astype(np.float32)
        else:
            r0, r1 = _NUCLEUS_RADIUS
            mean_area = np.pi * (r0 * r0 + r0 * r1 + r1 * r1) / 3.0 / _CELL**2  # E[pi r^2]
            expected = _nucleus_probability(_density(layout, xs, ys, downsample)) * mean_area
            coverage = (expected * (1.0 - lumen)).astype(np.float32)
            tone = np.full((h, w), 0.5)
        tone = tone.astype(np.float32)[..., None]
        nucleus = _HEMATOXYLIN_DARK + (_HEMATOXYLIN_LIGHT - _HEMATOXYLIN_DARK) * tone
        stroma += (nucleus - stroma) * coverage[..., None]
        stroma += 2.0 * grain
        image = np.where(mask[..., None], stroma, image)
    if pen_mark and layout.pen.intersects(*box):
        ink = layout.pen.contains(xs, ys)
        image = np.where(ink[..., None], image * _PEN_GREEN, image)
    return np.clip(image, 0, 255).astype(np.uint8)


def _level_shapes(size: tuple[int, int], n_levels: int | None) -> list[tuple[int, int]]:
    """(w, h) per level, each half the previous (rounded up)."""
    w, h = size
    if n_levels is None:
        n_levels = 1
        while max(w, h) >> (n_levels - 1) >= 1024:
            n_levels += 1
    return [(max(1, -(-w // 2**k)), max(1, -(-h // 2**k))) for k in range(n_levels)]


def _tiles(
    layout: _Layout,
    level: int,
    shape: tuple[int, int],
    tile: int,
    *,
    tissue: bool,
    pen_mark: bool,
) -> Iterator[np.ndarray]:
    """Full-size tiles of one level in row-major order (edge tiles overhang the image)."""
    w, h = shape
    downsample = float(2**level)
    for ty in range(-(-h // tile)):
        for tx in range(-(-w // tile)):
            rng = np.random.default_rng([layout.seed, level, ty, tx])
            origin = (tx * tile * downsample, ty * tile * downsample)
            yield _render(
                layout,
                origin,
                (tile, tile),
                downsample,
                tissue=tissue,
                pen_mark=pen_mark,
                rng=rng,
            )


def write_synthetic_slide(
    path: str | Path,
    size: tuple[int, int] = (4096, 3072),
    *,
    mpp: float | None = 0.5,
    tile: int = 256,
    n_levels: int | None = None,
    seed: int = 0,
    tissue: bool = True,
    compression: str = "jpeg",
    pen_mark: bool = False,
    lesion: bool = False,
) -> Path:
    """Write a tiled pyramidal RGB TIFF of H&E-like tissue on glass.

    Args:
        path: output file.
        size: level-0 (width, height) in pixels.
        mpp: level-0 microns per pixel, written as TIFF resolution in centimetres; None
            writes no usable resolution (unit NONE).
        tile: tile edge in pixels, a multiple of 16.
        n_levels: pyramid levels; None halves until the longest side is below 1024.
        seed: seeds the tissue layout, texture and noise; same seed, same pixels.
        tissue: draw the tissue blobs (False gives blank glass).
        compression: "jpeg" (quality 90) or "zlib".
        pen_mark: draw a thick green marker stroke above the tissue.
        lesion: crowd the centre of the first tissue blob with nuclei (a "tumour" region,
            the positive class of the demo's MIL task).

    Returns:
        The path written.

    Raises:
        ConfigError: an argument is out of range.
    """
    w, h = size
    if w < 1 or h < 1:
        raise ConfigError(f"size must be positive, got {size}")
    if tile < 16 or tile % 16:
        raise ConfigError(f"tile must be a positive multiple of 16, got {tile}")
    if compression not in COMPRESSIONS:
        raise ConfigError(
            f"compression must be one of {', '.join(COMPRESSIONS)}; got {compression!r}"
        )
    if mpp is not None and not mpp > 0:
        raise ConfigError(f"mpp must be > 0 or None, got {mpp}")
    if n_levels is not None and n_levels < 1:
        raise ConfigError(f"n_levels must be >= 1, got {n_levels}")

    path = Path(path)
    layout = _layout((w, h), seed, lesion)
    options: dict[str, Any] = {
        "photometric": "rgb",
        "tile": (tile, tile),
        "compression": compression,
        "compressionargs": {"level": 90} if compression == "jpeg" else {"level": 6},
        "metadata": None,
        "maxworkers": 1,
    }
    if mpp is not None:
        options |= {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path, bigtiff=w * h * 3 > 2**31) as tif:
        for level, (lw, lh) in enumerate(_level_shapes((w, h), n_levels)):
            tif.write(
                _tiles(layout, level, (lw, lh), tile, tissue=tissue, pen_mark=pen_mark),
                shape=(lh, lw, 3),
                dtype=np.uint8,
                subfiletype=1 if level else 0,
                **options,
            )
    return path


def tissue_mask_truth(size: tuple[int, int], seed: int = 0, scale: float = 1.0) -> np.ndarray:
    """The ground-truth tissue mask of a synthetic slide, downsampled by `scale`.

    Args:
        size: the level-0 (width, height) the slide was written with.
        seed: the seed it was written with.
        scale: level-0 pixels per mask pixel; mask pixel (i, j) samples the level-0 point at
            the centre of its `scale` x `scale` block.

    Returns:
        bool array of shape (ceil(h / scale), ceil(w / scale)).
    """
    if not scale > 0:
        raise ConfigError(f"scale must be > 0, got {scale}")
    w, h = size
    xs = (np.arange(math.ceil(w / scale)) + 0.5) * scale
    ys = (np.arange(math.ceil(h / scale)) + 0.5) * scale
    return _tissue(_layout(size, seed), xs, ys, (0.0, 0.0, float(w), float(h)))
