"""The archive side of an index: which slides' embeddings go in, and the typed id map.

* :class:`SlideEntry`: one slide of an index's id map (``slides.json``), typed;
  :func:`find_entry` (a slide by id, prefix or name) and :func:`tombstone_ids`.
* :class:`ArchiveSource`: the embeddings of some slides as a
  :class:`~wsi_ssl.search.vectors.VectorSource` (ids ``slide_number << 32 | tile``).
* :func:`collect`: the complete, embedded slides of an archive at one scale ->
  :class:`Collected` (source, id-map entries, coords, tiling, encoder config).
* :func:`resolve_encoder_id`: an encoder id present in the archive, a unique prefix of one, or
  the only one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from wsi_ssl.errors import (
    EmbeddingsCorruptError,
    EmbeddingsNotFoundError,
    SchemaMismatchError,
    StoreCorruptError,
    UnknownSlideError,
    WsiSslError,
)
from wsi_ssl.listing import first_few
from wsi_ssl.search.archive_advice import only_damaged_advice, scale_error, stain_error
from wsi_ssl.search.ids import encode_ids
from wsi_ssl.search.vectors import normalise
from wsi_ssl.stain_settings import stain_key
from wsi_ssl.storage.slide_store import same_scale

if TYPE_CHECKING:
    from wsi_ssl.storage import Archive, SlideStore
    from wsi_ssl.storage.embeddings import Embeddings

__all__ = [
    "AddSummary",
    "ArchiveSource",
    "Collected",
    "SlideEntry",
    "SourceSlide",
    "catalog_names",
    "collect",
    "find_entry",
    "resolve_encoder_id",
    "same_grid",
    "tiling_key",
    "tombstone_ids",
]

BATCH = 65536


@dataclass
class SlideEntry:
    """One slide of an index's id map (a row of ``slides.json``).

    ``status`` is "active", "removed", "excluded" (removed by ``SearchIndex.remove``, which
    ``add`` respects unless the slide is named) or "unreadable" (its embeddings could not be
    read: each ``add`` reads them again); ``in_index`` is False once the slide's vectors are
    gone from the FAISS index (an HNSW tombstone keeps them until compaction). ``n_tiles``
    counts the slide's tiles (its coords), ``n_vectors`` those indexed when fewer (the tiles an
    embedding job with ``skip_flagged_tiles`` left out have no vector; None: every tile). Dict-style
    reads (``entry["slide_id"]``) work too, for callers written against the JSON rows.
    """

    number: int
    slide_id: str
    name: str
    path: str
    n_tiles: int
    offset: int
    dimensions: list[int]
    mpp: float
    tile_size_level0: float
    stride_level0: float
    grid_shape: list[int] | None = None
    coords_sha256: str | None = None
    embedded: str | None = None
    status: str = "active"
    in_index: bool = True
    n_vectors: int | None = None

    @property
    def active(self) -> bool:
        return self.status == "active"

    @property
    def vectors(self) -> int:
        """Vectors of the slide in the index (ids ``number << 32 | tile``, tiles not all)."""
        return self.n_tiles if self.n_vectors is None else self.n_vectors

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SlideEntry:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


@dataclass
class AddSummary:
    """What ``SearchIndex.add`` did: slides added, re-added (re-embedded), removed (their
    store or embeddings gone), left unchanged, left out (removed on request before), and the
    errors of those left out because their store or embeddings could not be read."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    excluded: list[str] = field(default_factory=list)  # removed on request: left out
    vectors: int = 0
    notes: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)  # left out: store or embeddings unreadable


def find_entry(active: Sequence[SlideEntry], slide: str, where: str) -> SlideEntry:
    """The active entry ``slide`` names: its id, a unique id prefix (4+ characters), or its
    file name or stem.

    Raises:
        UnknownSlideError: no (or more than one) entry matches.
    """
    matches = [e for e in active if e.slide_id == slide]
    if not matches and len(slide) >= 4:
        matches = [e for e in active if e.slide_id.startswith(slide)]
    if not matches:
        matches = [  # the name tiled by (a link's) or the file's own
            e
            for e in active
            if slide in (e.name, Path(e.name).stem, Path(e.path).name, Path(e.path).stem)
        ]
    if len(matches) == 1:
        return matches[0]
    names = sorted(e.name for e in active)
    hint = f"the {where} holds {first_few(names) or 'no slide'}"
    raise UnknownSlideError(slide, where, hint, matches=[e.slide_id for e in matches])


def tombstone_ids(entries: Sequence[SlideEntry]) -> np.ndarray:
    """The ids of removed slides whose vectors are still in the index (HNSW tombstones)."""
    ranges = [
        encode_ids(e.number, np.arange(e.n_tiles)) for e in entries if not e.active and e.in_index
    ]
    return np.concatenate(ranges) if ranges else np.empty(0, np.int64)


@dataclass(frozen=True)
class SourceSlide:
    """A slide whose vectors an :class:`ArchiveSource` yields: its number, store, and how
    many (its tiles that hold vectors)."""

    number: int
    store: SlideStore
    n_vectors: int


class ArchiveSource:
    """The embeddings of some slides of an archive as a ``VectorSource`` (unit vectors).

    A slide whose embeddings turn out damaged when read yields nothing, in this pass and every
    later one; its error is kept in :attr:`unreadable` (by slide number), so one damaged slide
    never stops an index build.
    """

    def __init__(self, slides: list[SourceSlide], encoder_id: str, dim: int) -> None:
        self.slides = slides
        self.encoder_id = encoder_id
        self.dim = dim
        self.n = sum(s.n_vectors for s in slides)
        self.unreadable: dict[int, WsiSslError] = {}

    @classmethod
    def of_entries(
        cls, archive: Archive, entries: Sequence[SlideEntry], encoder_id: str, dim: int
    ) -> ArchiveSource:
        """The source of an index's id-map entries."""
        slides = [SourceSlide(e.number, archive.slide(e.slide_id), e.vectors) for e in entries]
        return cls(slides, encoder_id, dim)

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        from wsi_ssl.storage.embeddings import read_embeddings

        for slide in self.slides:
            if slide.number in self.unreadable:
                continue
            try:
                emb = read_embeddings(slide.store, self.encoder_id).embedded_only()
            except (EmbeddingsCorruptError, StoreCorruptError) as err:
                self.unreadable[slide.number] = err
                continue
            feats, tiles = np.asarray(emb.features), emb.tile_ids
            if feats.shape != (slide.n_vectors, self.dim):
                raise SchemaMismatchError(
                    f"{slide.store.path}: embeddings {self.encoder_id!r} hold {feats.shape} "
                    f"vectors, expected ({slide.n_vectors}, {self.dim}); embed the slide again "
                    "(resume=False)"
                )
            for start in range(0, len(feats), BATCH):
                stop = min(len(feats), start + BATCH)
                yield encode_ids(slide.number, tiles[start:stop]), normalise(feats[start:stop])


@dataclass
class Collected:
    """What :func:`collect` found: the vectors to index and the id map that describes them."""

    source: ArchiveSource
    entries: list[SlideEntry]
    coords: np.ndarray
    tiling: dict[str, Any] | None
    encoder: dict[str, Any]
    stain: dict[str, Any] | None = None
    """The stain normalisation every collected slide was embedded with (None: none)."""
    damaged: list[WsiSslError] = field(default_factory=list)
    """Slides left out: stores whose metadata cannot be read, then (:meth:`mark_unreadable`)
    slides whose embeddings could not be read."""

    @property
    def dim(self) -> int:
        return self.source.dim

    @property
    def active(self) -> list[SlideEntry]:
        """The entries whose vectors are in the index."""
        return [e for e in self.entries if e.active]

    def mark_unreadable(self) -> None:
        """After the source was read: the slides whose embeddings could not be read are
        "unreadable" entries (no vector of theirs went in; numbers and coords offsets stay) and
        their errors join :attr:`damaged`."""
        for entry in self.entries:
            err = self.source.unreadable.get(entry.number)
            if err is not None and entry.active:
                entry.status, entry.in_index = "unreadable", False
                self.damaged.append(err)


def resolve_encoder_id(archive: Archive, wanted: str | None) -> str:
    """An exact encoder id present in the archive, the one that starts with ``wanted``, or
    (``wanted`` None) the archive's only one (:func:`wsi_ssl.storage.resolve.resolve_encoder`).

    Raises:
        EmbeddingsNotFoundError: none, or several, match (the message lists those there); when
            the archive's only slide stores are damaged, it says so and how to redo them.
        ConfigError: ``wanted`` is None and the archive holds several encoders' embeddings.
    """
    from wsi_ssl.storage.resolve import archive_encoder_ids, resolve_encoder

    ids = archive_encoder_ids(archive)
    why = "" if ids else only_damaged_advice(archive)  # not "embed": it cannot open them
    return resolve_encoder(ids, wanted, archive.root, why=why)


def catalog_names(archive: Archive) -> dict[str, tuple[str, str]]:
    """slide id -> (file name, path) from the catalog (empty when it cannot be read)."""
    try:
        return {e.slide_id: (e.name, e.path) for e in archive.catalog.entries()}
    except Exception:  # a missing or locked catalog only costs the names
        return {}


def tiling_key(tiling: dict[str, Any]) -> dict[str, Any]:
    """The tiling settings an index records and compares (scale, tile size, overlap)."""
    return {
        "mpp": float(tiling["mpp"]),
        "tile_size": int(tiling["tile_size"]),
        "overlap": int(tiling.get("overlap", 0)),
        "tissue_threshold": float(tiling.get("tissue_threshold", 0.0)),
    }


def same_grid(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two :func:`tiling_key` records an index can hold together: the same scale
    (:func:`~wsi_ssl.storage.slide_store.same_scale`) and the same overlap (tile stride)."""
    return same_scale(a, b) and a["overlap"] == b["overlap"]


@dataclass
class UnchangedSlides:
    """``collect``'s ``skip`` for an index update: leaves out the slides indexed with these
    very embeddings (same coords hash, same ``created``), counting them in ``summary``;
    re-embedded ones go to ``summary.updated``; ``seen`` gathers every slide with complete
    embeddings; the ``excluded`` slides (removed on request) are left out and counted. A
    re-embedded slide is read first: when its new embeddings cannot be read it is left out
    (keeping its indexed vectors) and its error kept in ``unreadable``; so is a slide that was
    unreadable at the last update (``failed``) and still is (each update gave it one more
    id-map entry and its coords again)."""

    indexed: dict[str, SlideEntry]
    summary: AddSummary
    encoder_id: str
    excluded: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    seen: set[str] = field(default_factory=set)
    unreadable: list[WsiSslError] = field(default_factory=list)

    def __call__(self, store: SlideStore, attrs: dict[str, Any]) -> bool:
        slide_id = store.slide_id
        self.seen.add(slide_id)
        if slide_id in self.excluded:
            self.summary.excluded.append(slide_id)
            return True
        old = self.indexed.get(slide_id)
        made = (attrs.get("coords_sha256"), attrs.get("created"))
        if old is not None and (old.coords_sha256, old.embedded) == made:
            self.summary.unchanged += 1
            return True
        if old is None and slide_id in self.failed:  # still unreadable: no second entry
            return not self._readable(store)
        if old is None or not self._readable(store):  # new: add; unreadable: keep as indexed
            return old is not None
        self.summary.updated.append(slide_id)
        return False

    def _readable(self, store: SlideStore) -> bool:
        from wsi_ssl.storage.embeddings import read_embeddings

        try:
            read_embeddings(store, self.encoder_id)
        except (EmbeddingsCorruptError, StoreCorruptError) as err:
            self.unreadable.append(err)
            return False
        return True


def _complete_embeddings(
    store: SlideStore, encoder_id: str, named: bool, unreadable: list[WsiSslError]
) -> Embeddings | None:
    """The complete embeddings ``encoder_id`` of a store, lazily (no vectors read), or None:
    there are none (an error when the slide was ``named``), or chunk files are missing (the
    error kept in ``unreadable``)."""
    from wsi_ssl.storage.embeddings import embedding_ids, embedding_status, read_embeddings

    if embedding_status(store, encoder_id) != "complete":
        if named:
            raise EmbeddingsNotFoundError(store.path, encoder_id, embedding_ids(store))
        return None
    try:
        return read_embeddings(store, encoder_id, lazy=True)
    except (EmbeddingsCorruptError, StoreCorruptError) as err:
        unreadable.append(err)
        return None


def _entry(
    number: int, store: SlideStore, emb: Embeddings, names: dict[str, tuple[str, str]], offset: int
) -> SlideEntry:
    tiling, source = store.tiling, store.source
    name, path = names.get(store.slide_id, (store.source_name, source.get("path", "")))
    return SlideEntry(
        number=number,
        slide_id=store.slide_id,
        name=name or store.slide_id,
        path=str(path),
        n_tiles=len(emb),
        offset=offset,
        dimensions=[int(v) for v in source["dimensions"]],
        mpp=float(source["mpp"]),
        tile_size_level0=float(tiling["tile_size_level0"]),
        stride_level0=float(tiling.get("stride_level0", tiling["tile_size_level0"])),
        grid_shape=[int(v) for v in tiling["grid_shape"]] if tiling.get("grid_shape") else None,
        coords_sha256=emb.attrs.get("coords_sha256"),
        embedded=emb.attrs.get("created"),
        n_vectors=len(emb) - emb.n_not_embedded if emb.n_not_embedded else None,
    )


def indexed_stain(
    record: dict[str, Any], archive: Archive, entries: Sequence[SlideEntry], encoder_id: str
) -> dict[str, Any] | Literal["unknown"] | None:
    """The stain normalisation of an index's slides: its record's, or for an index from before
    the record kept it, the first indexed slide's whose embeddings are still the indexed ones
    (same coords hash and ``created``; "unknown": none is)."""
    from wsi_ssl.storage.embeddings import read_embeddings

    if "stain" in record:
        return record["stain"]  # type: ignore[no-any-return]
    for entry in entries:
        try:
            attrs = read_embeddings(archive.slide(entry.slide_id), encoder_id, lazy=True).attrs
        except WsiSslError:
            continue
        if attrs.get("coords_sha256") == entry.coords_sha256 and (
            attrs.get("created") == entry.embedded
        ):
            return attrs.get("stain")  # type: ignore[return-value]
    return "unknown"


def collect(
    archive: Archive,
    encoder_id: str,
    slides: Sequence[str] | None,
    *,
    start_number: int = 0,
    start_offset: int = 0,
    tiling: dict[str, Any] | None = None,
    stain: dict[str, Any] | Literal["unknown"] | None = "unknown",
    skip: Callable[[SlideStore, dict[str, Any]], bool] | None = None,
) -> Collected:
    """The slides embedded by ``encoder_id`` (all complete ones, or ``slides``), numbered from
    ``start_number``; ``skip(store, embedding_attrs)`` leaves a slide out. Every slide must
    have been embedded with the stain normalisation ``stain`` ("unknown": the first slide's).
    Stores whose metadata cannot be read, and embeddings missing chunk files, are left out
    and listed in ``damaged``.

    Raises:
        UnknownSlideError: a named slide (id, file name or stem) has no complete store.
        EmbeddingsNotFoundError: a named slide has no complete embeddings by the encoder.
        SchemaMismatchError: slides at another scale than ``tiling`` (or the first slide's),
            embedded with another stain normalisation, or embeddings of another dimension.
    """
    from wsi_ssl.storage.resolve import resolve_slides

    ids = archive.slide_ids if slides is None else resolve_slides(archive, slides)
    names = catalog_names(archive)
    items: list[SourceSlide] = []
    entries: list[SlideEntry] = []
    coords: list[np.ndarray] = []
    dim, encoder = 0, {}
    number, offset = start_number, start_offset
    mismatched, other_stain = [], []
    fixed = not isinstance(stain, str)  # else the first slide's is the index's
    first, first_id = (None if isinstance(stain, str) else stain), "the index"
    unreadable: list[WsiSslError] = []  # complete embeddings with chunk files missing
    for sid in ids:
        store = archive.slide(sid)
        emb = _complete_embeddings(store, encoder_id, slides is not None, unreadable)
        if emb is None:
            continue
        if skip is not None and skip(store, emb.attrs):
            continue
        key = tiling_key(store.tiling)
        if tiling is None:
            tiling = key
        elif not same_grid(tiling, key):
            mismatched.append(f"{sid} ({key['mpp']} µm/px, {key['tile_size']} px)")
            continue
        if not fixed:
            first, fixed, first_id = emb.attrs.get("stain"), True, sid
        elif stain_key(emb.attrs.get("stain")) != stain_key(first):
            other_stain.append(sid)
            continue
        d = int(emb.features.shape[1])
        if dim and d != dim:
            raise SchemaMismatchError(
                f"{store.path}: embeddings {encoder_id!r} have dimension {d}, others {dim}"
            )
        dim, encoder = d, emb.encoder
        items.append(SourceSlide(number, store, len(emb) - emb.n_not_embedded))
        entries.append(_entry(number, store, emb, names, offset))
        coords.append(np.asarray(emb.coords, dtype=np.int64).reshape(-1, 2))
        number += 1
        offset += len(emb)
    if mismatched:
        raise SchemaMismatchError(
            scale_error(archive, tiling, mismatched), parameters=("slides", "name")
        )
    if other_stain:
        raise SchemaMismatchError(
            stain_error(archive, first, first_id, other_stain, len(items)),
            parameters=("slides", "name"),
        )
    all_coords = np.concatenate(coords) if coords else np.empty((0, 2), dtype=np.int64)
    source = ArchiveSource(items, encoder_id, dim)
    damaged = [*(archive.damaged if slides is None else []), *unreadable]
    return Collected(source, entries, all_coords, tiling, encoder, first, damaged)
