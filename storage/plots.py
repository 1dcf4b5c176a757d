"""Pictures of a slide store: the thumbnail with its kept tiles and tissue mask drawn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from wsi_ssl.storage.slide_store import SlideStore

MIN_SIDE = 800
"""Small thumbnails are enlarged (nearest neighbour) to at least this long side."""


def plot_tiles(store: SlideStore, out: str | Path) -> Path:
    """Save the thumbnail with the tissue mask tinted and every kept tile outlined, as PNG."""
    thumb = store.thumbnail.astype(np.float32)
    mask = store.tissue_mask
    tint = np.array([40.0, 170.0, 90.0])
    thumb[mask] = 0.75 * thumb[mask] + 0.25 * tint
    image = Image.fromarray(thumb.clip(0, 255).astype(np.uint8))
    zoom = max(1, MIN_SIDE // max(image.size))
    image = image.resize((image.width * zoom, image.height * zoom), Image.Resampling.NEAREST)
    scale = zoom * mask.shape[1] / store.source["dimensions"][0]
    side = store.tiling["tile_size_level0"] * scale
    draw = ImageDraw.Draw(image)
    for x, y in store.coords * scale:
        draw.rectangle([x, y, x + side, y + side], outline=(20, 60, 200), width=1)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out
