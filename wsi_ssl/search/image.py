"""Query images: read safely, rescale to the index's mpp, cut into the index's tiles."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from wsi_ssl.errors import ConfigError, ImageQueryError, ImageTooLargeError, NoTilesInRegionError

__all__ = ["MAX_IMAGE_PIXELS", "cut_tiles", "load_image", "rescale"]

MAX_IMAGE_PIXELS = 64_000_000
"""Largest query image (before and after rescaling), in pixels: 8000 x 8000. Beyond it the
file is refused before its pixels are decoded (a decompression bomb, or a whole slide that
should be tiled and queried by region instead)."""


def load_image(path: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """uint8 RGB (h, w, 3) pixels of an image file (transparency composited on white).

    Raises:
        ImageQueryError: the file is missing, not an image PIL can read, or truncated.
        ImageTooLargeError: it has more than ``max_pixels`` pixels (checked from the header,
            before decoding; PIL's own decompression-bomb check is also turned into this).
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageQueryError(f"{path}: no such image file; check the path")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageTooLargeError(
                        f"{path}: {w}x{h} = {w * h:,} pixels, more than the {max_pixels:,} a "
                        "query image may have; crop the region of interest, or tile the slide and "
                        "query it with slide= and box= (Index.search_region)",
                        parameters=("slide", "box"),
                    )
                im.load()
                return _to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageTooLargeError(
            f"{path}: refused as a decompression bomb ({err}); crop the region of interest"
        ) from err
    except UnidentifiedImageError as err:
        raise ImageQueryError(
            f"{path}: not an image file PIL can read (PNG, JPEG, TIFF, ...); pass an RGB image"
        ) from err
    except (OSError, SyntaxError, ValueError) as err:
        if isinstance(err, ImageQueryError):
            raise
        raise ImageQueryError(f"{path}: cannot decode the image ({err}); is it truncated?") from err


def _to_rgb(im: Any) -> np.ndarray:
    from PIL import Image

    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = arr.max() or 1.0
        im = Image.fromarray((arr / top * 255).astype(np.uint8))
    return np.asarray(im.convert("RGB"))


def rescale(
    image: np.ndarray, image_mpp: float, target_mpp: float, *, max_pixels: int = MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Resample ``image`` from ``image_mpp`` to ``target_mpp`` (antialiased; unchanged within 2%)."""
    from PIL import Image

    if not image_mpp > 0:
        raise ConfigError(f"image_mpp must be > 0, got {image_mpp}", parameters=("image_mpp",))
    factor = image_mpp / target_mpp
    if abs(factor - 1) <= 0.02:
        return image
    h, w = image.shape[:2]
    nw, nh = max(1, round(w * factor)), max(1, round(h * factor))
    if nw * nh > max_pixels:
        raise ImageTooLargeError(
            f"image {w}x{h} at {image_mpp} µm/px becomes {nw}x{nh} px at the index's "
            f"{target_mpp} µm/px, more than {max_pixels:,} pixels; crop it or check image_mpp",
            parameters=("image_mpp",),
        )
    return np.asarray(
        Image.fromarray(image).resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    )


def cut_tiles(
    image: np.ndarray,
    tile_size: int,
    stride: int,
    *,
    mpp: float,
    tissue_threshold: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The image's tiles on a grid like the slides' (edge tiles padded white).

    Tiles with at least ``tissue_threshold`` tissue (the detector the tiling uses) are kept;
    when none is, every tile that is not blank glass is, so a small crop of pale tissue is
    still searchable.

    Returns:
        ``(tiles uint8 (Q, T, T, 3), coords (Q, 2) x, y in pixels, padded image)``.

    Raises:
        NoTilesInRegionError: the image is blank.
    """
    from wsi_ssl.tissue import detect_tissue

    h, w = image.shape[:2]
    rows = 1 if h <= tile_size else 1 + math.ceil((h - tile_size) / stride)
    cols = 1 if w <= tile_size else 1 + math.ceil((w - tile_size) / stride)
    ph, pw = (rows - 1) * stride + tile_size, (cols - 1) * stride + tile_size
    padded = np.full((ph, pw, 3), 255, dtype=np.uint8)
    padded[:h, :w] = image
    ys, xs = np.meshgrid(np.arange(rows) * stride, np.arange(cols) * stride, indexing="ij")
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)
    tiles = np.stack([padded[y : y + tile_size, x : x + tile_size] for x, y in coords])
    try:
        mask = detect_tissue(padded, mpp)
    except ValueError:
        mask = np.zeros(padded.shape[:2], dtype=bool)
    frac = np.array([mask[y : y + tile_size, x : x + tile_size].mean() for x, y in coords])
    keep = frac >= max(tissue_threshold, 1e-9)
    if not keep.any():
        # not glass: some pixel clearly darker or more coloured than white
        keep = np.array([(t.min(axis=-1) < 200).mean() > 0.01 for t in tiles])
    if not keep.any() and h * w < tile_size**2 / 4:  # mostly padding: too small to tell
        raise NoTilesInRegionError(
            f"query image {w}x{h} px at {mpp:g} µm/px: a tile is {tile_size} px, so it would be "
            "mostly white padding; pass a larger picture (at least half a tile a side), or its "
            "own µm/px (image_mpp) when it was scanned at another scale"
        )
    if not keep.any():
        raise NoTilesInRegionError(
            f"query image {w}x{h}: no tissue in it (all tiles are blank); pass an image of tissue"
        )
    return tiles[keep], coords[keep], padded
