"""The query side of :class:`~wsi_ssl.search.index.SearchIndex`: building queries (tile,
region, slide, image), running them and ranking the hits, and the gallery.

:class:`SearchMethods` is mixed into ``SearchIndex``; it uses only the index's public
members (:class:`Searchable`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from wsi_ssl.errors import ConfigError, WsiSslError
from wsi_ssl.search import queries
from wsi_ssl.search.archive import SlideEntry
from wsi_ssl.search.ranking import MODES, Mode, rank
from wsi_ssl.search.results import Query, SearchResult

if TYPE_CHECKING:
    from wsi_ssl.encoders import Encoder

__all__ = ["DEFAULT_HITS_PER_TILE", "MAX_QUERY_TILES", "SearchMethods", "Searchable"]

MAX_QUERY_TILES = queries.MAX_QUERY_TILES
DEFAULT_HITS_PER_TILE = 64


class Searchable(Protocol):
    """What the query side needs of an index."""

    @property
    def root(self) -> Path: ...
    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def encoder_id(self) -> str: ...
    @property
    def n_vectors(self) -> int: ...
    @property
    def promised_recall(self) -> float: ...
    @property
    def coords(self) -> np.ndarray: ...
    @property
    def entries(self) -> list[SlideEntry]: ...
    @property
    def tiling(self) -> dict[str, Any]: ...
    @property
    def mpp(self) -> float: ...
    @property
    def record(self) -> dict[str, Any]: ...

    def resolve_slide(self, slide: str) -> SlideEntry: ...
    def number_of(self, slide_id: str) -> int | None: ...
    def query_tile(
        self, slide: str, xy: tuple[int, int], within: tuple[int, int, int, int] | None = None
    ) -> Query: ...
    def query_region(self, slide: str, box: tuple[int, int, int, int]) -> Query: ...
    def query_slide(self, slide: str, *, max_tiles: int = ..., seed: int = 0) -> Query: ...
    def query_image(
        self,
        image: str | Path | np.ndarray,
        *,
        image_mpp: float | None = None,
        encoder: Encoder | str | Path | None = None,
        weights: str | Path | None = None,
        max_pixels: int | None = None,
    ) -> Query: ...

    def search_vectors(
        self,
        vectors: np.ndarray,
        k: int = 10,
        *,
        exclude_slides: Sequence[int] = (),
        encoder_id: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]: ...
    def neighbours(
        self, query: Query, mode: Mode, per_tile: int, exclude: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def search(
        self,
        query: Query,
        *,
        k: int = 10,
        mode: Mode | None = None,
        exclude_self: bool = False,
        hits_per_tile: int | None = None,
    ) -> SearchResult: ...


class SearchMethods:
    """Queries and searches of a :class:`Searchable` index."""

    # -- queries ---------------------------------------------------------------------------
    def query_tile(
        self: Searchable,
        slide: str,
        xy: tuple[int, int],
        within: tuple[int, int, int, int] | None = None,
    ) -> Query:
        """The stored tile of ``slide`` that contains level-0 point ``xy`` (none there: the
        one centred nearest it in box ``within``, when given).

        Raises:
            UnknownSlideError, RegionOutsideSlideError, NoTilesInRegionError.
        """
        return queries.tile_query(self, slide, xy, within)

    def query_region(self: Searchable, slide: str, box: tuple[int, int, int, int]) -> Query:
        """The stored tiles of ``slide`` whose centres lie in level-0 ``box`` = (x, y, w, h).

        A box partly off the slide is clipped to it.

        Raises:
            UnknownSlideError; RegionOutsideSlideError: the box is empty or off the slide;
            NoTilesInRegionError: it holds no tissue tile.
        """
        return queries.region_query(self, slide, box)

    def query_slide(
        self: Searchable, slide: str, *, max_tiles: int = queries.MOSAIC_TILES, seed: int = 0
    ) -> Query:
        """A whole slide, represented by a mosaic of up to ``max_tiles`` tiles: the tile nearest
        each k-means centroid of its vectors (cf. Yottixel's mosaic, Kalra et al. 2020)."""
        return queries.slide_query(self, slide, max_tiles, seed)

    def query_image(
        self: Searchable,
        image: str | Path | np.ndarray,
        *,
        image_mpp: float | None = None,
        encoder: Encoder | str | Path | None = None,
        weights: str | Path | None = None,
        max_pixels: int | None = None,
    ) -> Query:
        """An image (file or uint8 RGB array) embedded with the index's encoder at its mpp.

        The image is rescaled from ``image_mpp`` (default: assume it is at the index's mpp)
        to the index's mpp, cut into the index's tiles (edges padded white, blank tiles
        dropped), and each tile embedded.

        Raises:
            ImageQueryError, ImageTooLargeError: unreadable or oversized image.
            NoTilesInRegionError: the image is blank.
            EncoderMismatchError: ``encoder`` is not the index's, or it cannot be recreated.
        """
        return queries.image_query(
            self,
            image,
            image_mpp=image_mpp,
            encoder=encoder,
            weights=weights,
            max_pixels=max_pixels,
        )

    # -- searching queries -----------------------------------------------------------------
    def search(
        self: Searchable,
        query: Query,
        *,
        k: int = 10,
        mode: Mode | None = None,
        exclude_self: bool = False,
        hits_per_tile: int | None = None,
    ) -> SearchResult:
        """Run a query. ``mode``: "tiles" (the nearest tiles, for one-tile queries), "regions"
        (hits merged into non-overlapping regions of the query's size) or "slides" (slides
        ranked by their hits); default by query kind: tile -> tiles, slide -> slides, else
        regions. See :mod:`wsi_ssl.search.regions` for the scoring."""
        started = time.perf_counter()
        if not isinstance(k, int | np.integer) or isinstance(k, bool) or k < 1:
            raise ConfigError(f"k must be a whole number >= 1, got {k!r}", parameters=("k",))
        k = int(k)
        if hits_per_tile is not None and hits_per_tile < 1:
            raise ConfigError(
                f"hits_per_tile must be >= 1, got {hits_per_tile}", parameters=("hits_per_tile",)
            )
        by_kind: dict[str, Mode] = {"tile": "tiles", "slide": "slides"}
        mode = mode or by_kind.get(query.kind, "regions")
        if mode not in MODES:
            raise ConfigError(
                f"mode must be one of {', '.join(MODES)}; got {mode!r}", parameters=("mode",)
            )
        exclude = [query.slide_number] if exclude_self and query.slide_number is not None else []
        default = k if mode == "tiles" else max(DEFAULT_HITS_PER_TILE, k)
        per_tile = hits_per_tile or default
        sims, ids = self.neighbours(query, mode, per_tile, exclude)
        hits = rank(query, mode, sims, ids, self.entries, self.coords, k)
        info = {
            "name": self.name,
            "kind": self.kind,
            "encoder_id": self.encoder_id,
            "n_vectors": self.n_vectors,
            "promised_recall": self.promised_recall,
        }
        return SearchResult(
            query, mode, k, exclude_self, info, hits, per_tile, time.perf_counter() - started
        )

    def neighbours(
        self: Searchable, query: Query, mode: Mode, per_tile: int, exclude: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The (Q, K) neighbours (similarities, ids, best first) of the query's tiles, leaving
        out the ``exclude`` slide numbers. For regions and slides the query's own slide, when
        searched, is searched apart, so its tiles never use up the other slides' ``per_tile``
        neighbours: hiding it (``exclude_self``) changes no other slide's score."""
        own = query.slide_number
        if mode == "tiles" or own is None or own in exclude:
            return self.search_vectors(query.vectors, per_tile, exclude_slides=exclude)
        sims, ids = self.search_vectors(query.vectors, per_tile, exclude_slides=[*exclude, own])
        own_sims, own_ids = _own_slide_neighbours(self, query, own, per_tile)
        sims, ids = np.hstack([sims, own_sims]), np.hstack([ids, own_ids])
        order = np.argsort(-sims, axis=1, kind="stable")
        return np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)

    # -- convenience -----------------------------------------------------------------------
    def search_tile(
        self: Searchable,
        slide: str,
        xy: tuple[int, int],
        *,
        k: int = 10,
        exclude_self: bool = False,
    ) -> SearchResult:
        """The ``k`` tiles most similar to the tile of ``slide`` containing level-0 ``xy``."""
        return self.search(self.query_tile(slide, xy), k=k, mode="tiles", exclude_self=exclude_self)

    def search_region(
        self: Searchable,
        slide: str,
        box: tuple[int, int, int, int],
        *,
        k: int = 10,
        exclude_self: bool = False,
        hits_per_tile: int | None = None,
    ) -> SearchResult:
        """The ``k`` best non-overlapping regions like level-0 ``box`` = (x, y, w, h) of ``slide``."""
        return self.search(
            self.query_region(slide, box),
            k=k,
            mode="regions",
            exclude_self=exclude_self,
            hits_per_tile=hits_per_tile,
        )

    def search_image(
        self: Searchable,
        image: str | Path | np.ndarray,
        *,
        image_mpp: float | None = None,
        k: int = 10,
        encoder: Encoder | str | Path | None = None,
        weights: str | Path | None = None,
    ) -> SearchResult:
        """The ``k`` best regions like an image (see :meth:`query_image`)."""
        return self.search(
            self.query_image(image, image_mpp=image_mpp, encoder=encoder, weights=weights),
            k=k,
            mode="regions",
        )

    def search_slides(
        self: Searchable,
        slide: str,
        box: tuple[int, int, int, int] | None = None,
        *,
        k: int = 10,
        exclude_self: bool = False,
    ) -> SearchResult:
        """Slides ranked by similarity to ``slide`` (its mosaic) or to a region of it
        (``exclude_self``: without ``slide`` itself, which otherwise ranks first)."""
        query = self.query_slide(slide) if box is None else self.query_region(slide, box)
        return self.search(query, k=k, mode="slides", exclude_self=exclude_self)

    def gallery(self: Searchable, result: SearchResult, out: str | Path, **kwargs: Any) -> Path:
        """Save the query beside its top hits as a PNG or JPEG, as ``out``'s suffix says
        (:func:`~wsi_ssl.search.gallery.render_gallery`)."""
        from wsi_ssl.search.gallery import render_gallery
        from wsi_ssl.storage import open_store

        return render_gallery(open_store(self.root), result, out, **kwargs)


def _own_slide_neighbours(
    index: Searchable, query: Query, own: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The query's own slide searched alone: through the index with a one-slide filter, or,
    for HNSW and IVF-PQ (whose filtered search can come back with fewer than ``k`` of its
    tiles when they are a small part of the index), exactly over the slide's stored vectors
    while they are the indexed ones (same coords hash and ``created`` as its entry)."""
    from wsi_ssl.search.ids import encode_ids
    from wsi_ssl.search.kinds import index_kind
    from wsi_ssl.search.vectors import ArraySource, exact_neighbours
    from wsi_ssl.storage import open_store
    from wsi_ssl.storage.embeddings import read_embeddings

    entry = index.entries[own]
    if not index_kind(index.kind).exact:
        with contextlib.suppress(WsiSslError):
            store = open_store(index.root).slide(entry.slide_id)
            emb = read_embeddings(store, index.encoder_id)
            made = (emb.attrs.get("coords_sha256"), emb.attrs.get("created"))
            if made == (entry.coords_sha256, entry.embedded):
                emb = emb.embedded_only()
                ids = encode_ids(own, emb.tile_ids)
                source = ArraySource(ids, np.asarray(emb.features, dtype=np.float32))
                cols = max(1, min(int(k), max(1, index.n_vectors)))
                sims, found = exact_neighbours(source, query.vectors, cols)
                sims = np.asarray(sims, dtype=np.float32)
                sims[found < 0] = -np.inf
                return sims, found
    others = [n for n in range(len(index.entries)) if n != own]
    return index.search_vectors(query.vectors, k, exclude_slides=others)
