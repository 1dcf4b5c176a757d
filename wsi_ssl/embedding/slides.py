"""The slides of an embedding job before any compute: per-slide checks, resume, provenance.

:class:`EmbedTarget` is what the vectors will be (encoder, stored dtype, stain normalisation).
It decides, per slide, whether embeddings of the same ``encoder_id`` are already complete *by
content* (every chunk there and decodable, same tiles, dtype and stain: then the slide is
skipped), whether another job is writing them ("busy", unless ``EmbedConfig.wait``), and
whether the tiles suit the encoder (input size, scale); it also writes the attrs recorded with
the vectors.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_ssl.embedding.config import EmbedConfig
from wsi_ssl.encoders import Encoder
from wsi_ssl.errors import WsiSslError
from wsi_ssl.outcome import SlideOutcome
from wsi_ssl.storage import Archive, SlideStore
from wsi_ssl.storage.embeddings import (
    EmbeddingWriter,
    coords_sha256,
    embeddings_busy,
    embeddings_problem,
    open_embeddings_array,
)

__all__ = ["EmbedSlide", "EmbedTarget", "stain_normalizer"]


@dataclass
class EmbedSlide:
    """A slide to embed and its progress (``outcome`` is set once it is done)."""

    store: SlideStore
    n: int
    coords: np.ndarray
    attrs: dict[str, Any]
    writer: EmbeddingWriter | None = None
    received: int = 0
    started: float = 0.0
    outcome: SlideOutcome | None = None

    @property
    def done(self) -> bool:
        return self.outcome is not None

    @property
    def slide_id(self) -> str:
        return self.store.slide_id


def stain_normalizer(config: EmbedConfig) -> tuple[Any, dict[str, Any] | None]:
    """The stain normaliser of ``config`` and its provenance (both None when off)."""
    if config.stain_normalize is None or config.stain_reference is None:
        return None, None
    from wsi_ssl.stain import StainNormalizer

    normalizer = StainNormalizer(config.stain_normalize, config.stain_reference)
    digest = hashlib.sha256(Path(config.stain_reference).read_bytes()).hexdigest()
    provenance = {
        "method": config.stain_normalize,
        "reference": Path(config.stain_reference).name,
        "reference_sha256": digest,
    }
    return normalizer, provenance


@dataclass(frozen=True)
class EmbedTarget:
    """The vectors an embedding job writes: its encoder, settings and stain provenance."""

    encoder: Encoder
    config: EmbedConfig
    stain: dict[str, Any] | None = None

    @property
    def encoder_id(self) -> str:
        return self.encoder.encoder_id

    def prepare(self, archive: Archive, slide_id: str) -> EmbedSlide | SlideOutcome:
        """The slide to embed, or its outcome when it is skipped, busy or cannot be embedded."""
        started = time.perf_counter()
        try:
            store = archive.slide(slide_id)
            n = store.n_tiles
            coords = store.coords
            tile_size = int(store.tiles.shape[1])
            chash = coords_sha256(coords)
            if self.config.resume and self.is_current(store, n, chash):
                return SlideOutcome(slide_id, "skipped", n)
            busy = embeddings_busy(store.path, self.encoder_id) if not self.config.wait else None
            if busy is not None:
                return SlideOutcome.failure(slide_id, busy, time.perf_counter() - started)
            self.encoder.check_input_size(tile_size, int(store.tiles.shape[2]), str(store.path))
            if self.config.check_mpp:
                self.encoder.check_scale(store.tiling.get("mpp"), tile_size, str(store.path))
        except (WsiSslError, OSError, KeyError, ValueError) as err:
            return SlideOutcome.failure(slide_id, err, time.perf_counter() - started)
        return EmbedSlide(store, n, coords, self.attrs(store, n, chash, tile_size))

    def attrs(self, store: SlideStore, n: int, chash: str, tile_size: int) -> dict[str, Any]:
        """What is recorded with a slide's vectors (and checked on resume)."""
        from wsi_ssl import __version__

        tiling = store.tiling
        attrs: dict[str, Any] = {
            "encoder_id": self.encoder_id,
            "encoder": self.encoder.config.to_dict(),
            "weights_sha256": self.encoder.config.weights_sha256,
            "slide_id": store.slide_id,
            "n_tiles": n,
            "dim": self.encoder.embed_dim,
            "dtype": self.config.dtype,
            "coords_sha256": chash,
            "tile_size": tile_size,
            "tiling": {k: tiling.get(k) for k in ("mpp", "tile_size", "tile_size_level0")},
            "wsi_ssl_version": __version__,
            "embed": {"batch_size": self.config.batch_size},
            "compute": self.encoder.compute,
        }
        if self.stain is not None:
            attrs["stain"] = self.stain
        if hasattr(self.encoder, "checkpoint_sha256"):
            attrs["checkpoint_sha256"] = self.encoder.checkpoint_sha256
        return attrs

    def is_current(self, store: SlideStore, n: int, chash: str) -> bool:
        """Complete by content (every chunk there and decodable), for these tiles, encoder,
        dtype and stain normalisation."""
        if embeddings_problem(store, self.encoder_id) is not None:
            return False
        array = open_embeddings_array(store.path, self.encoder_id)
        a = array.attrs
        return (
            array.shape == (n, self.encoder.embed_dim)
            and a.get("encoder_id") == self.encoder_id
            and a.get("coords_sha256") == chash
            and a.get("dtype") == self.config.dtype
            and a.get("stain") == self.stain
        )
