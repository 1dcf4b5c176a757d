"""``SearchIndex``: build, open, extend, trim and search the FAISS index of an archive.

    >>> from wsi_ssl.search import SearchIndex
    >>> index = SearchIndex.build(root, "random-cnn")          # ROOT/index/<encoder_id>/
    >>> result = index.search_region(slide_id, (x, y, w, h), k=5, exclude_self=True)
    >>> print(result.table()); index.gallery(result, "gallery.png")

Ids are ``slide_number << 32 | tile_number`` (:mod:`wsi_ssl.search.ids`); slide numbers are
assigned here, in the order slides are added, and kept in the index's id map
(:class:`~wsi_ssl.search.archive.SlideEntry` rows), so ``add`` is append-only. Files live under
``ROOT/index/<name>/`` (:mod:`wsi_ssl.storage.index_files`). What differs between flat, HNSW and
IVF-PQ indexes is in :mod:`wsi_ssl.search.kinds`; the archive side in
:mod:`wsi_ssl.search.archive`, query building in :mod:`wsi_ssl.search.queries`, ranking in
:mod:`wsi_ssl.search.ranking`, the query methods in :mod:`wsi_ssl.search.searching`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from wsi_ssl.errors import (
    ConfigError,
    EmbeddingsNotFoundError,
    EncoderMismatchError,
    IndexNotFoundError,
    SchemaMismatchError,
    WsiSslError,
)
from wsi_ssl.search.archive import (
    AddSummary,
    SlideEntry,
    UnchangedSlides,
    collect,
    find_entry,
    indexed_stain,
    tombstone_ids,
)
from wsi_ssl.search.build import build_faiss, index_description, index_record, plan_build, utc_now
from wsi_ssl.search.config import IndexConfig
from wsi_ssl.search.filtered import filtered_search
from wsi_ssl.search.ids import decode_ids, slide_id_range
from wsi_ssl.search.kinds import COMPACT_FRACTION, IndexKind, Progress, index_kind, log
from wsi_ssl.search.midswap import build_encoder_id
from wsi_ssl.search.searching import MAX_QUERY_TILES, SearchMethods
from wsi_ssl.search.unembedded import build_notes, update_notes
from wsi_ssl.search.vectors import normalise, to_similarity
from wsi_ssl.storage.archive import damaged_slide_id
from wsi_ssl.storage.index_files import (
    INDEX_DIR,
    MMAP_MIN_BYTES,
    IndexFiles,
    index_lock,
    list_indexes,
    read_faiss_index,
    read_index_files,
    validate_index_name,
    write_index,
)

__all__ = ["MAX_QUERY_TILES", "AddSummary", "SearchIndex"]


class SearchIndex(SearchMethods):
    """A FAISS index over an archive's tile embeddings, with its id map and build record.

    Open one with :meth:`open` or make one with :meth:`build`; query with
    :meth:`search_tile`, :meth:`search_region`, :meth:`search_image` and
    :meth:`search_slides` (or :meth:`search` on a :class:`Query`): these come from
    :class:`~wsi_ssl.search.searching.SearchMethods`; this class holds the index itself
    (open, build, add, remove, compact, search vectors).
    """

    def __init__(self, files: IndexFiles, index: Any, *, mmapped: bool = False) -> None:
        self.files = files
        self.index = index
        self.mmapped = mmapped
        self.damaged: list[WsiSslError] = []
        """Slides :meth:`build` left out: store or embeddings unreadable (empty when opened)."""
        self.notes: list[str] = []  # what build said of slides left out undamaged (mid-swap)
        self._load_entries()

    def _load_entries(self) -> None:
        self.entries = [SlideEntry.from_dict(s) for s in self.files.slides]
        self._by_id = {e.slide_id: e.number for e in self.entries if e.active}
        self._tomb_ids: np.ndarray | None = None

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        root: str | Path,
        name: str | None = None,
        *,
        mmap: bool | Literal["auto"] = "auto",
        verify: bool | Literal["auto"] = "auto",
    ) -> SearchIndex:
        """Open index ``name`` under ``root`` (default: the only one there).

        Raises:
            StoreNotFoundError: ``root`` is no archive root.
            IndexNotFoundError: no such index (the message lists those there).
            MultiScaleRootError: ``root`` holds one archive root per scale (name one).
            ConfigError: several indexes and no ``name``.
            CorruptIndexError: a file is truncated, altered or unreadable.
        """
        from wsi_ssl.storage.archive import is_archive_root, open_store

        root = Path(root)
        if not is_archive_root(root):  # a file, a folder without an archive, one per scale
            open_store(root)  # raises what it is
        if name is None:
            names = list_indexes(root)
            if not names:
                raise IndexNotFoundError(root / INDEX_DIR, names)
            if len(names) > 1:
                raise ConfigError(
                    f"{root}: several indexes ({', '.join(names)}); pass name=",
                    parameters=("name",),
                )
            name = names[0]
        files = read_index_files(root, validate_index_name(name), verify=verify)
        mm = files.index_file.stat().st_size >= MMAP_MIN_BYTES if mmap == "auto" else bool(mmap)
        strategy = index_kind(str(files.config["kind"]))
        index = read_faiss_index(files, mmap=mm, inverted_lists=strategy.mmap_inverted_lists)
        return cls(files, index, mmapped=mm)

    @classmethod
    def build(
        cls,
        root: str | Path,
        encoder: str | None = None,
        *,
        name: str | None = None,
        config: IndexConfig | None = None,
        slides: Sequence[str] | None = None,
        progress: Progress = None,
        **options: Any,
    ) -> SearchIndex:
        """Build (or rebuild) an index of the archive's embeddings by ``encoder``.

        Args:
            root: archive root.
            encoder: an encoder id present in the archive, or a unique prefix of one
                (e.g. "random-cnn"); None: the archive's only encoder (the same rule as
                export and MIL training).
            name: index name (default: the encoder id).
            config: build settings; ``options`` (e.g. ``kind="hnsw"``) replace its fields.
            slides: only these slide ids (default: every complete slide embedded by it; one
                mid-swap, :mod:`wsi_ssl.search.midswap`, or not embedded by it,
                :mod:`wsi_ssl.search.unembedded`, is left out and named in :attr:`notes`).
            progress: called with one-line progress messages.

        Raises:
            EmbeddingsNotFoundError: no slide has complete embeddings by ``encoder``.
            ConfigError: ``encoder`` is None and the archive holds several encoders.
            SchemaMismatchError: slides were tiled at different scales or tile sizes.
            EmbeddingsCorruptError: every slide's embeddings are damaged (when only some are,
                the others are indexed and those listed in :attr:`damaged`).
        """
        from wsi_ssl.storage import open_store

        config = (config or IndexConfig()).replace(**options)
        archive = open_store(root)
        eid = build_encoder_id(archive, encoder)  # names the slides mid-swap when all are
        name = validate_index_name(name or eid)
        found = collect(archive, eid, slides)
        notes = build_notes(archive, name, eid, found, slides)  # left out: mid-swap, not embedded
        if not found.entries:  # none readable: say why when it is damage
            if found.damaged:
                raise found.damaged[0]
            raise EmbeddingsNotFoundError(archive.root, eid, [])
        plan = plan_build(found, config, progress)
        with index_lock(root, name):
            index, params, calibration = build_faiss(found.source, plan, config, progress=progress)
            found.mark_unreadable()
            if not found.active:
                raise found.damaged[-1]
            record = index_record(
                plan, eid, found, config, index, params, calibration, slides is not None
            )
            slides_json = [e.to_dict() for e in found.entries]
            write_index(root, name, index, config=record, slides=slides_json, coords=found.coords)
            files = read_index_files(root, name, verify=False)
        log(progress, f"wrote {files.path}")
        built = cls(files, index, mmapped=False)
        built.damaged, built.notes = found.damaged, notes
        return built

    # -- properties ------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return self.files.root

    @property
    def name(self) -> str:
        return self.files.name

    @property
    def record(self) -> dict[str, Any]:
        """``config.json``: build config, derived parameters, calibration, provenance."""
        return self.files.config

    @property
    def kind(self) -> str:
        return str(self.record["kind"])

    @property
    def strategy(self) -> IndexKind:
        """What this index's kind does (:mod:`wsi_ssl.search.kinds`)."""
        return index_kind(self.kind)

    @property
    def encoder_id(self) -> str:
        return str(self.record["encoder_id"])

    @property
    def dim(self) -> int:
        return int(self.record["dim"])

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.record["params"])

    @property
    def calibration(self) -> dict[str, Any]:
        return dict(self.record.get("calibration", {}))

    @property
    def promised_recall(self) -> float:
        """The recall@10 against exact search this index was calibrated to deliver."""
        cal = self.calibration
        return float(cal.get("promised_recall", cal.get("recall_at_k", 1.0)))

    @property
    def tiling(self) -> dict[str, Any]:
        return dict(self.record["tiling"])

    @property
    def mpp(self) -> float:
        return float(self.record["tiling"]["mpp"])

    @property
    def coords(self) -> np.ndarray:
        """Level-0 (x, y) of every tile in the id map; slide ``e`` owns rows
        ``e.offset : e.offset + e.n_tiles``."""
        return self.files.coords

    @property
    def slides(self) -> list[SlideEntry]:
        """Id-map entries of the slides in the index (removed ones left out)."""
        return [e for e in self.entries if e.active]

    @property
    def n_vectors(self) -> int:
        """Searchable vectors (tombstoned HNSW vectors not counted)."""
        return int(self.index.ntotal) - int(self.record.get("tombstones", 0))

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (``wsi-ssl index --json``)."""
        return index_description(self)

    # -- slides ----------------------------------------------------------------------------
    def number_of(self, slide_id: str) -> int | None:
        """The number of an indexed slide id (None: not in the index)."""
        return self._by_id.get(slide_id)

    def resolve_slide(self, slide: str) -> SlideEntry:
        """The id-map entry of an indexed slide, by id, unique id prefix, or file name/stem.

        Raises:
            UnknownSlideError: no (or more than one) indexed slide matches.
        """
        number = self._by_id.get(slide)
        if number is not None:
            return self.entries[number]
        return find_entry(self.slides, slide, f"index {self.name}")

    # -- maintenance -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the writer lock on the newest generation; on failure, restore the in-memory
        state from disk (the files are untouched: a failed write leaves the old generation)."""
        with index_lock(self.root, self.name):
            self._reload_for_write()
            try:
                yield
            except BaseException:
                with contextlib.suppress(Exception):
                    self._reload_for_write()
                raise

    def _reload_for_write(self) -> None:
        """Re-read the newest generation, fully in memory (a mmapped index is read-only)."""
        files = read_index_files(self.root, self.name, verify=False)
        self.files = files
        self.index = read_faiss_index(files, mmap=False)
        self.mmapped = False
        self._load_entries()

    def _write(self, coords: np.ndarray | None = None) -> None:
        record = {
            k: v
            for k, v in self.record.items()
            if k not in ("files", "format", "format_version", "name", "n_vectors", "dim")
        }
        record["n_slides"] = len(self.slides)
        record["updated"] = utc_now()
        write_index(
            self.root,
            self.name,
            self.index,
            config=record,
            slides=[e.to_dict() for e in self.entries],
            coords=self.files.coords if coords is None else coords,
        )
        self.files = read_index_files(self.root, self.name, verify=False)
        self._load_entries()

    def add(self, slides: Sequence[str] | None = None, *, progress: Progress = None) -> AddSummary:
        """Append slides embedded since the index was built (and re-add re-embedded ones).

        New slides get the next slide numbers; nothing is rebuilt. Slides taken out with
        :meth:`remove` stay out unless ``slides`` names them. A slide whose embeddings changed
        (new coords or a newer embedding run) is removed and added again; without ``slides``,
        a slide whose store or embeddings are gone (re-tiled with its embeddings discarded,
        removed; not mid-swap: kept, noted) is removed, so no hit points at tiles that no
        longer exist; a slide not indexed yet that is mid-swap or not embedded by the index's
        encoder is left out, noted. One whose store or embeddings cannot be read is left as it
        is and listed in ``summary.damaged``.

        Raises:
            SchemaMismatchError: a new slide was tiled at another scale than the index.
            IndexBusyError: another process is writing the index.
        """
        from wsi_ssl.storage import open_store

        summary = AddSummary()
        with self._writing():
            current = {s.slide_id: s for s in self.slides}
            newest = {e.slide_id: e.status for e in self.entries}  # in number order
            excluded = {sid for sid, status in newest.items() if status == "excluded"}
            failed = {sid for sid, status in newest.items() if status == "unreadable"}
            skip = UnchangedSlides(
                current, summary, self.encoder_id, excluded if slides is None else set(), failed
            )
            archive = open_store(self.root)
            found = collect(
                archive,
                self.encoder_id,
                slides,
                start_number=len(self.entries),
                start_offset=len(self.files.coords),
                tiling=self.tiling,
                stain=indexed_stain(self.record, archive, self.slides, self.encoder_id),
                skip=skip,
            )
            found.damaged = [  # a slide taken out with remove() stays out, damaged or not
                e for e in [*found.damaged, *skip.unreadable] if damaged_slide_id(e) not in excluded
            ]
            summary.damaged = [str(err) for err in found.damaged]
            unreadable = {damaged_slide_id(err) for err in found.damaged}  # kept as they are
            gone = [] if slides is not None else sorted(current.keys() - skip.seen - unreadable)
            known = None if slides is not None else {*skip.seen, *excluded}  # new mid-swap: named
            gone, summary.notes = update_notes(archive, self, gone, known)  # its first notes
            if found.entries and found.dim != self.dim:
                raise SchemaMismatchError(
                    f"new embeddings have dimension {found.dim}, the index {self.dim}"
                )
            if not found.entries and not gone:
                if not summary.notes:  # else a slide mid-swap was kept or left out
                    summary.notes.append("no new or re-embedded slides; the index is up to date")
                return summary
            for sid in [*gone, *summary.updated]:
                self._remove_entry(current[sid])
            summary.removed = gone
            for ids, vecs in found.source.batches():
                self.index.add_with_ids(vecs, ids)
            found.mark_unreadable()
            summary.damaged += [str(err) for err in found.damaged[len(summary.damaged) :]]
            self.entries.extend(found.entries)
            again = set(summary.updated)
            summary.added = [e.slide_id for e in found.active if e.slide_id not in again]
            summary.vectors = sum(e.vectors for e in found.active)
            self._maybe_compact(summary.notes)
            note = self.strategy.growth_note(
                int(self.index.ntotal), int(self.record.get("built_n", 0))
            )
            if note:
                summary.notes.append(note)
            if "stain" not in self.record and found.entries:  # an index from before: now known
                self.record["stain"] = found.stain
            self._write(np.concatenate([self.files.coords, found.coords]))
            log(progress, f"added {summary.vectors} vectors from {len(found.entries)} slides")
        return summary

    def _remove_entry(self, entry: SlideEntry, status: str = "removed") -> int:
        lo, hi = slide_id_range(entry.number)
        entry.status = status
        if self.strategy.tombstones:
            self.record["tombstones"] = int(self.record.get("tombstones", 0)) + entry.vectors
            return entry.vectors
        entry.in_index = False
        return self.strategy.remove_range(self.index, self.params, lo, hi)

    def _maybe_compact(self, notes: list[str]) -> None:
        tomb = int(self.record.get("tombstones", 0))
        if tomb > COMPACT_FRACTION * max(1, self.index.ntotal):
            self._compact()
            notes.append(f"rebuilt the HNSW graph without {tomb} removed vectors")

    def _compact(self) -> None:
        dead = {e.number for e in self.entries if not e.active and e.in_index}
        self.index = self.strategy.compact(
            self.index, self.params, lambda ids: np.isin(decode_ids(ids)[0], list(dead))
        )
        for e in self.entries:
            if e.number in dead:
                e.in_index = False
        self.record["tombstones"] = 0
        self._tomb_ids = None

    def remove(self, slide: str) -> int:
        """Remove a slide's vectors; returns how many. HNSW: a tombstone (filtered at query
        time) until tombstones pass 20% of the vectors, then the graph is rebuilt.

        Raises:
            UnknownSlideError: the slide is not in the index.
        """
        with self._writing():
            entry = self.resolve_slide(slide)
            removed = self._remove_entry(entry, "excluded")  # add leaves it out from now on
            self._maybe_compact([])
            self._write()
        return removed

    def compact(self) -> None:
        """Rebuild an HNSW graph without its tombstoned vectors now (no-op for other kinds)."""
        if not self.strategy.tombstones or not int(self.record.get("tombstones", 0)):
            return
        with self._writing():
            self._compact()
            self._write()

    # -- searching vectors -----------------------------------------------------------------
    def _search(
        self, x: np.ndarray, k: int, exclude: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's (distances, ids) for the normalised rows ``x``, leaving out tombstones and
        the ``exclude`` slide numbers."""
        tombs = int(self.record.get("tombstones", 0))
        if tombs and self._tomb_ids is None:
            self._tomb_ids = tombstone_ids(self.entries)
        out = set(exclude)
        allowed = self.n_vectors - sum(e.vectors for e in self.slides if e.number in out)
        left_out = (exclude, self._tomb_ids if tombs else None)
        return filtered_search(self.index, self.strategy, self.params, x, k, allowed, left_out)

    def search_vectors(
        self,
        vectors: np.ndarray,
        k: int = 10,
        *,
        exclude_slides: Sequence[int] = (),
        encoder_id: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (cosine similarities, ids) for each row of ``vectors`` (normalised here).

        Args:
            exclude_slides: slide numbers whose tiles are not returned.
            encoder_id: the encoder that made ``vectors``; refused unless it is the index's.

        Raises:
            EncoderMismatchError: ``encoder_id`` (or the vector length) is not the index's.
        """
        if encoder_id is not None and encoder_id != self.encoder_id:
            raise EncoderMismatchError(
                f"query vectors were made by encoder {encoder_id!r}, the index {self.name!r} by "
                f"{self.encoder_id!r}; query with the index's encoder or build an index for this "
                "one (SearchIndex.build(root, encoder))"
            )
        x = np.atleast_2d(np.asarray(vectors))
        if x.shape[1] != self.dim:
            raise EncoderMismatchError(
                f"query vectors have dimension {x.shape[1]}, the index {self.name!r} "
                f"({self.encoder_id}) {self.dim}"
            )
        x = normalise(x)
        k = max(1, min(int(k), max(1, self.n_vectors)))
        dist, ids = self._search(x, k, exclude_slides)
        sims = to_similarity(dist, self.params["faiss_metric"])
        sims[ids < 0] = -np.inf
        return sims, ids

    def __repr__(self) -> str:
        return f"SearchIndex({self.name!r}, kind={self.kind!r}, vectors={self.n_vectors}, encoder={self.encoder_id!r})"
