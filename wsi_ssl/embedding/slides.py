"""The slides of an embedding job before any compute: per-slide checks, resume, provenance.

:class:`EmbedTarget` is what the vectors will be (encoder, stored dtype, stain normalisation).
It decides, per slide, whether embeddings of the same ``encoder_id`` are already complete *by
content* (every chunk there and decodable, same tiles, dtype and stain: then the slide is
skipped), whether another job is writing them ("busy", unless ``EmbedConfig.wait``), and
whether the tiles suit the encoder (input size, scale); it also writes the attrs recorded with
the vectors.

With ``EmbedConfig.skip_flagged_tiles`` a slide's tiles flagged by QC are left out of
``EmbedSlide.encode`` (neither read nor encoded; their rows are NaN, named by the array's
``not_embedded`` attribute). On resume, the rows of a complete array of the same encoder,
tiles, dtype and stain are kept (``EmbedSlide.base``) and only the tiles it lacks are encoded:
a slide embedded with ``skip_flagged_tiles`` and then without it is completed, not redone.
With the flag, an earlier array's vectors of tiles QC flags now (stricter thresholds since, or
an array made without the flag) are cleared: their rows end NaN, named by ``not_embedded``, so
the array holds what a fresh job with the flag would write.

A slide is planned (its tiles, their coordinates, those to encode) before its lock is taken;
``EmbedSlide.planned`` records which store it was planned from, and the runner checks it once
the writer holds the lock (:meth:`EmbedTarget.store_changed`): a store re-tiled, or re-flagged
by new QC thresholds, meanwhile makes the slide "busy"
(:class:`~wsi_ssl.errors.StoreRetiledError`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsi_ssl.embedding.config import EmbedConfig
from wsi_ssl.encoders import Encoder
from wsi_ssl.errors import (
    EmbeddingsWouldBeReplacedError,
    StainReferenceError,
    StoreLockedError,
    WsiSslError,
)
from wsi_ssl.outcome import SlideOutcome
from wsi_ssl.stain_settings import recorded_reference, stain_key, stain_provenance
from wsi_ssl.storage import Archive, SlideStore
from wsi_ssl.storage.embeddings import (
    EMBEDDINGS_GROUP,
    NOT_EMBEDDED,
    PARTIAL_PREFIX,
    EmbeddingWriter,
    clear_partial,
    coords_sha256,
    embedded_rows,
    embeddings_busy,
    embeddings_problem,
    open_embeddings_array,
)

__all__ = [
    "EmbedSlide",
    "EmbedTarget",
    "StoreIdentity",
    "encoder_stain",
    "stain_normalizer",
]


@dataclass
class EmbedSlide:
    """A slide to embed and its progress (``outcome`` is set once it is done).

    ``encode``: the sorted tile numbers to encode; every other row is copied from ``base``
    (a complete earlier array of the same vectors) or, without it, left NaN and named in
    ``attrs["not_embedded"]``; so are the rows ``clear`` names (tiles QC flags, which
    ``base`` holds vectors of), whatever ``base`` holds there. ``received`` counts the rows written.
    ``planned``: the store it was planned from (:class:`StoreIdentity`).
    """

    store: SlideStore
    n: int
    coords: np.ndarray
    attrs: dict[str, Any]
    planned: StoreIdentity
    encode: np.ndarray = dataclasses.field(default_factory=lambda: np.empty(0, np.int64))
    base: zarr.Array[Any] | None = None
    clear: np.ndarray = dataclasses.field(default_factory=lambda: np.empty(0, np.int64))
    writer: EmbeddingWriter | None = None
    received: int = 0
    started: float = 0.0
    outcome: SlideOutcome | None = None

    @property
    def done(self) -> bool:
        return self.outcome is not None

    @property
    def n_not_embedded(self) -> int:
        return len(self.attrs.get(NOT_EMBEDDED, {}).get("tiles", []))

    @property
    def details(self) -> dict[str, int]:
        """What the outcome records besides the tiles encoded: rows left out, rows kept,
        rows cleared."""
        kept = self.n - len(self.encode) - self.n_not_embedded
        out = {"not_embedded": self.n_not_embedded} if self.n_not_embedded else {}
        out |= {"rows_kept": kept} if kept else {}
        return out | ({"rows_cleared": len(self.clear)} if len(self.clear) else {})

    def rows(self, a: int, b: int) -> tuple[int, int]:
        """The rows a block of ``encode[a:b]`` covers: from its first tile (row 0 for the
        first block) to the next block's first tile (``n`` for the last), so the blocks of a
        slide tile its rows."""
        m = len(self.encode)
        start = 0 if a == 0 else int(self.encode[a])
        return start, self.n if b >= m else int(self.encode[b])

    @property
    def slide_id(self) -> str:
        return self.store.slide_id


@dataclass(frozen=True)
class StoreIdentity:
    """Which store a slide was planned from: its directory's (st_dev, st_ino), taken before
    anything was read from it (None: none was there), and the sha256 of what its tiles to
    encode depend on (:meth:`EmbedTarget.contents_key`)."""

    directory: tuple[int, int] | None
    contents: str


def _directory(path: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of what is at ``path`` (None: nothing)."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def stain_normalizer(config: EmbedConfig) -> tuple[Any, dict[str, Any] | None]:
    """The stain normaliser of ``config`` and its provenance (both None when off)."""
    if config.stain_normalize is None or config.stain_reference is None:
        return None, None
    from wsi_ssl.stain import StainNormalizer

    normalizer = StainNormalizer(config.stain_normalize, config.stain_reference)
    return normalizer, stain_provenance(config.stain_normalize, config.stain_reference)


def encoder_stain(config: EmbedConfig, encoder: Encoder, advice: str | None = None) -> EmbedConfig:
    """``config`` with the stain normalisation ``encoder`` was pretrained with when it names
    none (``stain_normalize="none"``: off whatever the encoder saw).

    Raises:
        StainReferenceError: the encoder's reference image is gone or changed since
            pretraining; the message ends with ``advice`` (None: ``wsi-ssl embed``'s flags).
    """
    if config.stain_normalize == "none":
        return dataclasses.replace(config, stain_normalize=None)
    trained = encoder.config.stain
    if config.stain_normalize is not None or not trained:
        return config
    try:
        path = recorded_reference(trained, f"{encoder.encoder_id} was pretrained on tiles")
    except StainReferenceError as err:
        flags = (
            f"pass --stain-normalize {trained['method']} --stain-reference with that image, or "
            "--stain-normalize none"
        )
        raise StainReferenceError(
            f"{err}; {advice or flags}", parameters=() if advice else err.parameters
        ) from None
    return dataclasses.replace(config, stain_normalize=trained["method"], stain_reference=str(path))


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
            # before any read (store_changed)
            directory = _directory(archive.store_path(archive.slide_id_of(slide_id)))
            store = archive.slide(slide_id)
            n = store.n_tiles
            coords = store.coords
            tile_size = int(store.tiles.shape[1])
            chash = coords_sha256(coords)
            planned = StoreIdentity(directory, self.contents_key(store, chash))
            base = self.reusable(store, n, chash) if self.config.resume else None
            if self.config.resume and base is None:
                self.refuse_other_stain(store)
            encode, keep, clear = self.plan(store, base)
            if base is not None and not encode.any() and not clear.any():
                _clear_dead_partial(store, self.encoder_id)
                return SlideOutcome(slide_id, "skipped", n)
            busy = embeddings_busy(store.path, self.encoder_id) if not self.config.wait else None
            if busy is not None:
                return SlideOutcome.failure(slide_id, busy, time.perf_counter() - started)
            mpp = store.tiling.get("mpp") if self.config.check_mpp else None
            self.encoder.check_tiles(tile_size, int(store.tiles.shape[2]), mpp, str(store.path))
        except (WsiSslError, OSError, KeyError, ValueError) as err:
            return SlideOutcome.failure(slide_id, err, time.perf_counter() - started)
        attrs = self.attrs(store, n, chash, tile_size)
        missing = np.flatnonzero(~(encode | keep))
        if len(missing):
            attrs[NOT_EMBEDDED] = {
                "tiles": missing.tolist(),
                "reason": "qc_flagged",
                "qc_thresholds": _qc_thresholds(store.tiling),
            }
        kept = base if keep.any() else None
        return EmbedSlide(
            store, n, coords, attrs, planned, np.flatnonzero(encode), kept, np.flatnonzero(clear)
        )

    def plan(
        self, store: SlideStore, array: zarr.Array[Any] | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """bool (N,) each, given the slide's earlier array (None: none): the tiles to encode,
        the rows of ``array`` to keep, and those to clear (with ``skip_flagged_tiles``: the
        vectors it holds of tiles QC flags)."""
        wanted, have = self.wanted(store), _has_vector(array, store.n_tiles)
        clear = have & ~wanted
        return wanted & ~have, have & ~clear, clear

    def wanted(self, store: SlideStore) -> np.ndarray:
        """bool (N,): the tiles this job must have vectors of (all, or those QC keeps)."""
        if not self.config.skip_flagged_tiles:
            return np.ones(store.n_tiles, dtype=bool)
        from wsi_ssl.tiling.qc import kept_tiles

        return np.asarray(kept_tiles(store), dtype=bool)

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

    def reusable(self, store: SlideStore, n: int, chash: str) -> zarr.Array[Any] | None:
        """The slide's array of these vectors, complete by content (every chunk there and
        decodable), for these tiles, encoder, dtype and stain normalisation; else None."""
        if embeddings_problem(store, self.encoder_id) is not None:
            return None
        array = open_embeddings_array(store.path, self.encoder_id)
        a = array.attrs
        same = (
            array.shape == (n, self.encoder.embed_dim)
            and a.get("encoder_id") == self.encoder_id
            and a.get("coords_sha256") == chash
            and a.get("dtype") == self.config.dtype
            and stain_key(a.get("stain")) == stain_key(self.stain)
        )
        return array if same else None

    def refuse_other_stain(self, store: SlideStore) -> None:
        """Raise when the slide holds complete vectors of this encoder made with another
        stain normalisation (a resumed job would replace them without a word).

        Raises:
            EmbeddingsWouldBeReplacedError: naming both normalisations.
        """
        if embeddings_problem(store, self.encoder_id) is not None:
            return
        had = open_embeddings_array(store.path, self.encoder_id).attrs.get("stain")
        if stain_key(had) != stain_key(self.stain):
            wanted = _stain_words(self.stain)
            if had and self.stain and _stain_words(had) == wanted:  # same words, other image
                now, then = stain_key(self.stain), stain_key(had)
                assert now is not None and then is not None
                wanted += f" (a reference of other content: sha256 {now[1][:12]}, they were "
                wanted += f"made with {then[1][:12]})"
            raise EmbeddingsWouldBeReplacedError(
                store.path, self.encoder_id, _stain_words(had), wanted
            )

    def is_current(self, slide: EmbedSlide) -> bool:
        """Another job completed the slide meanwhile: an array holds every row this one
        would and none it would clear (checked once the writer holds the lock)."""
        chash = str(slide.attrs["coords_sha256"])
        array = self.reusable(slide.store, slide.n, chash)
        if array is None:
            return False
        encode, _, clear = self.plan(slide.store, array)
        return not encode.any() and not clear.any()

    def store_changed(self, slide: EmbedSlide) -> bool:
        """Whether the slide's store is not the one it was planned from; final when called
        holding the slide's shared lock (the writer's).

        A re-tile swaps a new directory in at the store's path (the old one renamed aside, then
        removed) and a resumed `wsi-ssl tile` rewrites the QC thresholds in place, both under
        the slide's exclusive lock: neither happens while the shared lock is held, so every
        read from then on sees the store checked here. A read before the lock (the planning's,
        a loader worker's prefetch) read the directory at the path at that time; ``planned``
        took that directory's identity (device, inode) before the planning's first read, so a
        read from any other store implies a swap since, and another directory there now. The
        contents (:meth:`contents_key`) tell apart an in-place threshold update and a
        directory whose inode a later swap reused.
        """
        path = slide.store.path
        if _directory(path) != slide.planned.directory:
            return True
        store = SlideStore.open(path)
        return self.contents_key(store, coords_sha256(store.coords)) != slide.planned.contents

    def contents_key(self, store: SlideStore, chash: str) -> str:
        """sha256 of what the tiles this job encodes depend on: their count and coordinates
        (sha256 ``chash``), the tiling settings (the QC thresholds only with
        ``skip_flagged_tiles``), the values recorded at completion (the QC scores among them)
        and the tile shards' CRC32C."""
        skip = self.config.skip_flagged_tiles
        tiling = {k: v for k, v in store.tiling.items() if skip or not k.startswith("qc_")}
        key = {
            "n_tiles": store.n_tiles,
            "coords_sha256": chash,
            "tiling": tiling,
            "contents": store.recorded_contents,
            "shards": store.shard_checksums,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()

    def base_changed(self, slide: EmbedSlide) -> bool:
        """The earlier array whose rows the slide keeps was replaced or removed since the
        slide was prepared (checked once the writer holds the lock)."""
        if slide.base is None:
            return False
        now = self.reusable(slide.store, slide.n, str(slide.attrs["coords_sha256"]))
        return now is None or dict(now.attrs) != dict(slide.base.attrs)


def _has_vector(array: zarr.Array[Any] | None, n: int) -> np.ndarray:
    """bool (n,): rows of ``array`` (None: no array) that hold vectors."""
    if array is None:
        return np.zeros(n, dtype=bool)
    rows = embedded_rows(array.attrs, n)
    if rows is None:
        return np.ones(n, dtype=bool)
    have = np.zeros(n, dtype=bool)
    have[rows] = True
    return have


def _qc_thresholds(tiling: Mapping[str, Any]) -> dict[str, Any]:
    """The QC thresholds among tiling settings (``qc_max_pen``, ...)."""
    return {k: v for k, v in tiling.items() if k.startswith("qc_") and v is not None}


def _stain_words(provenance: Any) -> str:
    if not provenance:
        return "without stain normalisation"
    return f"from tiles stain-normalised ({provenance['method']}) to {provenance['reference']}"


def _clear_dead_partial(store: SlideStore, encoder_id: str) -> None:
    """Remove the ``.writing-`` array a killed job left beside complete vectors (a job that
    redoes the slide replaces it; one that skips it cleans up, so `check` comes clean); left
    alone while another process writes it."""
    if (store.path / EMBEDDINGS_GROUP / f"{PARTIAL_PREFIX}{encoder_id}").exists():
        with contextlib.suppress(StoreLockedError):
            clear_partial(store.path, encoder_id)
