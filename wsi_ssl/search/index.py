"""``SearchIndex``: build, open, extend and query the FAISS index of an archive's embeddings.

    >>> from wsi_ssl.search import SearchIndex
    >>> index = SearchIndex.build(root, "random-cnn")          # ROOT/index/<encoder_id>/
    >>> result = index.search_region(slide_id, (x, y, w, h), k=5, exclude_self=True)
    >>> print(result.table()); index.gallery(result, "gallery.png")

Ids are ``slide_number << 32 | tile_number`` (:mod:`wsi_ssl.search.ids`); slide numbers are
assigned here, in the order slides are added, and kept in the index's id map, so ``add`` is
append-only. Files live under ``ROOT/index/<name>/`` (:mod:`wsi_ssl.storage.index_files`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from wsi_ssl.errors import (
    ConfigError,
    EmbeddingsNotFoundError,
    EncoderMismatchError,
    NoTilesInRegionError,
    RegionOutsideSlideError,
    SchemaMismatchError,
    UnknownSlideError,
)
from wsi_ssl.search import build as _build
from wsi_ssl.search.config import IndexConfig, plan_index
from wsi_ssl.search.ids import decode_ids, encode_ids, slide_id_range
from wsi_ssl.search.regions import best_windows, slide_scores, tile_scores
from wsi_ssl.search.results import Query, RegionHit, SearchResult, SlideHit, TileHit
from wsi_ssl.storage.index_files import (
    IndexFiles,
    index_lock,
    list_indexes,
    read_faiss_index,
    read_index_files,
    validate_index_name,
    write_index,
)

if TYPE_CHECKING:
    from wsi_ssl.encoders import Encoder
    from wsi_ssl.storage import Archive, SlideStore

__all__ = ["MAX_QUERY_TILES", "AddSummary", "SearchIndex"]

MAX_QUERY_TILES = 1024
"""A region or image query with more tiles is searched with this many, evenly subsampled."""
MOSAIC_TILES = 64
"""Tiles representing a whole slide in slide-level queries (k-means medoids of its vectors)."""
DEFAULT_HITS_PER_TILE = 64
ADD_REBUILD_FACTOR = 4
"""``add`` suggests a rebuild once an IVF-PQ index holds this many times its training size."""

Mode = Literal["tiles", "regions", "slides"]
Progress = Callable[[str], None] | None


@dataclass
class AddSummary:
    """What ``SearchIndex.add`` did."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: int = 0
    vectors: int = 0
    notes: list[str] = field(default_factory=list)


# -- reading an archive -------------------------------------------------------------------------


def _emb_attrs(store: SlideStore, encoder_id: str) -> dict[str, Any] | None:
    """Attributes of the complete embeddings ``encoder_id`` of a store, or None."""
    from wsi_ssl.storage.embeddings import embedding_status

    if embedding_status(store, encoder_id) != "complete":
        return None
    import zarr

    array = zarr.open_array(store.path / "embeddings" / encoder_id, mode="r", zarr_format=3)
    return {**dict(array.attrs), "_shape": tuple(array.shape)}


def _resolve_encoder_id(archive: Archive, wanted: str) -> str:
    """An exact encoder id present in the archive, or the one that starts with ``wanted``."""
    from wsi_ssl.storage.embeddings import embedding_ids

    available: set[str] = set()
    for sid in archive.slide_ids:
        available.update(embedding_ids(archive.store_path(sid)))
    if wanted in available:
        return wanted
    matches = sorted(a for a in available if a.startswith(wanted))
    if len(matches) == 1:
        return matches[0]
    raise EmbeddingsNotFoundError(
        archive.root,
        wanted if not matches else f"{wanted} (ambiguous: {', '.join(matches)})",
        sorted(available),
    )


def _catalog_names(archive: Archive) -> dict[str, tuple[str, str]]:
    try:
        return {e.slide_id: (e.name, e.path) for e in archive.catalog.entries()}
    except Exception:  # a missing or locked catalog only costs the names
        return {}


def _tiling_key(tiling: dict[str, Any]) -> dict[str, Any]:
    return {
        "mpp": float(tiling["mpp"]),
        "tile_size": int(tiling["tile_size"]),
        "overlap": int(tiling.get("overlap", 0)),
        "tissue_threshold": float(tiling.get("tissue_threshold", 0.0)),
    }


def _same_scale(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (
        math.isclose(a["mpp"], b["mpp"], rel_tol=1e-6)
        and a["tile_size"] == b["tile_size"]
        and a["overlap"] == b["overlap"]
    )


def _slide_entry(
    number: int,
    store: SlideStore,
    attrs: dict[str, Any],
    names: dict[str, tuple[str, str]],
    offset: int,
) -> dict[str, Any]:
    tiling, source = store.tiling, store.source
    name, path = names.get(
        store.slide_id, (Path(str(source.get("path", ""))).name, source.get("path", ""))
    )
    return {
        "number": number,
        "slide_id": store.slide_id,
        "name": name or store.slide_id,
        "path": str(path),
        "status": "active",
        "in_index": True,
        "n_tiles": int(attrs["_shape"][0]),
        "offset": offset,
        "dimensions": [int(v) for v in source["dimensions"]],
        "mpp": float(source["mpp"]),
        "tile_size_level0": float(tiling["tile_size_level0"]),
        "stride_level0": float(tiling.get("stride_level0", tiling["tile_size_level0"])),
        "grid_shape": [int(v) for v in tiling["grid_shape"]] if tiling.get("grid_shape") else None,
        "coords_sha256": attrs.get("coords_sha256"),
        "embedded": attrs.get("created"),
    }


class _ArchiveSource:
    """Embeddings of some slides of an archive as a :class:`~wsi_ssl.search.build.VectorSource`."""

    def __init__(self, items: list[tuple[int, SlideStore, int]], encoder_id: str, dim: int) -> None:
        self.items = items
        self.encoder_id = encoder_id
        self.dim = dim
        self.n = sum(n for _, _, n in items)

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        from wsi_ssl.storage.embeddings import read_embeddings

        for number, store, n in self.items:
            emb = read_embeddings(store, self.encoder_id)
            feats = np.asarray(emb.features)
            if feats.shape != (n, self.dim):
                raise SchemaMismatchError(
                    f"{store.path}: embeddings {self.encoder_id!r} are {feats.shape}, expected "
                    f"({n}, {self.dim}); re-run `wsi-ssl embed` with --no-resume"
                )
            for start in range(0, n, 65536):
                stop = min(n, start + 65536)
                yield (
                    encode_ids(number, np.arange(start, stop)),
                    _build.normalise(feats[start:stop]),
                )


# -- the index ----------------------------------------------------------------------------------


class SearchIndex:
    """A FAISS index over an archive's tile embeddings, with its id map and build record.

    Open one with :meth:`open` or make one with :meth:`build`; query with
    :meth:`search_tile`, :meth:`search_region`, :meth:`search_image` and
    :meth:`search_slides` (or :meth:`search` on a :class:`Query`).
    """

    def __init__(self, files: IndexFiles, index: Any, *, mmapped: bool = False) -> None:
        self.files = files
        self.index = index
        self.mmapped = mmapped
        self._by_id: dict[str, int] = {}
        self._refresh()

    def _refresh(self) -> None:
        self._by_id = {
            s["slide_id"]: s["number"] for s in self.files.slides if s["status"] == "active"
        }
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
            IndexNotFoundError: no such index (the message lists those there).
            CorruptIndexError: a file is truncated, altered or unreadable.
        """
        from wsi_ssl.errors import IndexNotFoundError
        from wsi_ssl.storage.index_files import INDEX_DIR

        root = Path(root)
        if name is None:
            names = list_indexes(root)
            if not names:
                raise IndexNotFoundError(root / INDEX_DIR, names)
            if len(names) > 1:
                raise ConfigError(
                    f"{root}: several indexes ({', '.join(names)}); name one (--index NAME; "
                    "for `wsi-ssl index`, --name NAME)"
                )
            name = names[0]
        files = read_index_files(root, validate_index_name(name), verify=verify)
        mm = (files.index_file.stat().st_size >= _mmap_min()) if mmap == "auto" else bool(mmap)
        return cls(files, read_faiss_index(files, mmap=mm), mmapped=mm)

    @classmethod
    def build(
        cls,
        root: str | Path,
        encoder: str,
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
                (e.g. "random-cnn").
            name: index name (default: the encoder id).
            config: build settings; ``options`` (e.g. ``kind="hnsw"``) replace its fields.
            slides: only these slide ids (default: every complete slide embedded by it).
            progress: called with one-line progress messages.

        Raises:
            EmbeddingsNotFoundError: no slide has complete embeddings by ``encoder``.
            SchemaMismatchError: slides were tiled at different scales or tile sizes.
        """
        import dataclasses

        from wsi_ssl import __version__
        from wsi_ssl.storage import open_store

        config = dataclasses.replace(config or IndexConfig(), **options)
        archive = open_store(root)
        eid = _resolve_encoder_id(archive, encoder)
        name = validate_index_name(name or eid)
        items, entries, coords, tiling, dim, enc_cfg = cls._collect(
            archive, eid, slides, start_number=0, start_offset=0, tiling=None
        )
        if not items:
            raise EmbeddingsNotFoundError(archive.root, eid, [])
        plan = plan_index(sum(n for _, _, n in items), dim, config)
        _log(
            progress,
            f"building a {plan['kind']} index of {sum(n for _, _, n in items)} vectors ({dim}-d) from {len(items)} slides",
        )
        with index_lock(root, name):
            index, params, calibration = _build.build_faiss(
                _ArchiveSource(items, eid, dim), plan, config, progress=progress
            )
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            record = {
                "kind": plan["kind"],
                "encoder_id": eid,
                "encoder": enc_cfg,
                "metric": "cosine",
                "params": params,
                "calibration": calibration,
                "config": config.to_dict(),
                "tiling": tiling,
                "n_slides": len(entries),
                "built_n": int(index.ntotal),
                "tombstones": 0,
                "created": now,
                "updated": now,
                "wsi_ssl_version": __version__,
                "faiss_version": _faiss_version(),
            }
            write_index(root, name, index, config=record, slides=entries, coords=coords)
            files = read_index_files(root, name, verify=False)
        _log(progress, f"wrote {files.path}")
        return cls(files, index, mmapped=False)

    @staticmethod
    def _collect(
        archive: Archive,
        eid: str,
        slides: Sequence[str] | None,
        *,
        start_number: int,
        start_offset: int,
        tiling: dict[str, Any] | None,
        skip: Callable[[str, dict[str, Any]], bool] | None = None,
    ) -> tuple[
        list[tuple[int, SlideStore, int]],
        list[dict[str, Any]],
        np.ndarray,
        dict[str, Any] | None,
        int,
        dict[str, Any],
    ]:
        """Slides embedded by ``eid`` -> (source items, id-map entries, coords, tiling, dim, encoder)."""
        complete = archive.slide_ids
        ids = complete if slides is None else list(dict.fromkeys(slides))
        complete_set = set(complete)
        names = _catalog_names(archive)
        items: list[tuple[int, SlideStore, int]] = []
        entries: list[dict[str, Any]] = []
        coords: list[np.ndarray] = []
        dim, enc_cfg = 0, {}
        number, offset = start_number, start_offset
        mismatched = []
        for sid in ids:
            if slides is not None and sid not in complete_set:
                raise UnknownSlideError(sid, f"archive {archive.root} (complete slide stores)")
            store = archive.slide(sid)
            attrs = _emb_attrs(store, eid)
            if attrs is None:
                if slides is not None:
                    from wsi_ssl.storage.embeddings import embedding_ids

                    raise EmbeddingsNotFoundError(store.path, eid, embedding_ids(store))
                continue
            if skip is not None and skip(sid, attrs):
                continue
            key = _tiling_key(store.tiling)
            if tiling is None:
                tiling = key
            elif not _same_scale(tiling, key):
                mismatched.append(f"{sid} ({key['mpp']} µm/px, {key['tile_size']} px)")
                continue
            n, d = attrs["_shape"]
            if dim and d != dim:
                raise SchemaMismatchError(
                    f"{store.path}: embeddings {eid!r} have dimension {d}, others {dim}"
                )
            dim = int(d)
            enc_cfg = dict(attrs.get("encoder", {}))
            entry = _slide_entry(number, store, attrs, names, offset)
            items.append((number, store, int(n)))
            entries.append(entry)
            coords.append(np.asarray(store.coords, dtype=np.int64).reshape(-1, 2))
            number += 1
            offset += int(n)
        if mismatched:
            raise SchemaMismatchError(
                f"{archive.root}: slides tiled at another scale than the index's "
                f"{tiling['mpp'] if tiling else '?'} µm/px, {tiling['tile_size'] if tiling else '?'} px: "
                f"{', '.join(mismatched[:5])}{' ...' if len(mismatched) > 5 else ''}; tile every slide "
                "of one index with the same --mpp and --tile-size (or index them separately with --slides)"
            )
        all_coords = np.concatenate(coords) if coords else np.empty((0, 2), dtype=np.int64)
        return items, entries, all_coords, tiling, dim, enc_cfg

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
    def slides(self) -> list[dict[str, Any]]:
        """Id-map entries of the slides in the index (removed ones left out)."""
        return [s for s in self.files.slides if s["status"] == "active"]

    @property
    def n_vectors(self) -> int:
        """Searchable vectors (tombstoned HNSW vectors not counted)."""
        return int(self.index.ntotal) - int(self.record.get("tombstones", 0))

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (``wsi-ssl index --json``)."""
        r = self.record
        return {
            "name": self.name,
            "path": str(self.files.path.parent),
            "generation": self.files.path.name,
            "kind": self.kind,
            "encoder_id": self.encoder_id,
            "n_vectors": self.n_vectors,
            "n_slides": len(self.slides),
            "dim": self.dim,
            "tiling": self.tiling,
            "params": self.params,
            "calibration": self.calibration,
            "index_bytes": int(r["files"]["index.faiss"]["bytes"]),
            "bytes_per_vector": round(
                r["files"]["index.faiss"]["bytes"] / max(1, int(self.index.ntotal)), 1
            ),
            "created": r.get("created"),
            "updated": r.get("updated"),
            "tombstones": int(r.get("tombstones", 0)),
        }

    def lines(self) -> list[str]:
        d = self.describe()
        cal = d["calibration"]
        p = d["params"]
        search = ", ".join(f"{k}={p[k]}" for k in ("efSearch", "nprobe") if k in p)
        shape = ", ".join(
            f"{k}={p[k]}"
            for k in ("M", "efConstruction", "nlist", "pq_m", "pq_nbits", "opq", "train_size")
            if k in p
        )
        recall = (
            "exact"
            if d["kind"] == "flat"
            else f"recall@10 {cal.get('recall_at_k')} on {cal.get('queries')} calibration queries "
            f"(target {cal.get('target_recall')}{'' if cal.get('met', True) else ', NOT met'})"
        )
        return [
            f"index {d['name']}: {d['kind']}, {d['n_vectors']} vectors from {d['n_slides']} slides, "
            f"{d['dim']}-d, encoder {d['encoder_id']}",
            f"  {shape or 'no parameters'}{'; ' + search if search else ''}; {recall}",
            f"  {d['index_bytes'] / 2**20:.1f} MiB ({d['bytes_per_vector']} B/vector) at {d['path']}",
        ]

    # -- slides ----------------------------------------------------------------------------
    def _entry(self, number: int) -> dict[str, Any]:
        return self.files.slides[number]

    def resolve_slide(self, slide: str) -> dict[str, Any]:
        """The id-map entry of an indexed slide, by id, unique id prefix, or file name/stem.

        Raises:
            UnknownSlideError: no (or more than one) indexed slide matches.
        """
        number = self._by_id.get(slide)
        if number is not None:
            return self._entry(number)
        active = self.slides
        matches = [s for s in active if s["slide_id"].startswith(slide)] if len(slide) >= 4 else []
        if not matches:
            matches = [s for s in active if slide in (s["name"], Path(s["name"]).stem)]
        if len(matches) == 1:
            return matches[0]
        hint = (
            f"it matches {len(matches)} slides, give more of the id"
            if matches
            else f"the index {self.name} holds {len(active)} slides; list them with "
            "`wsi-ssl search ROOT --list`"
        )
        raise UnknownSlideError(slide, f"index {self.name}", hint)

    def _archive(self) -> Archive:
        from wsi_ssl.storage import open_store

        return open_store(self.root)

    def _query_store(self, slide: str) -> tuple[SlideStore, int | None]:
        """The archive store of a query slide (it need not be indexed) and its index number."""
        try:
            entry = self.resolve_slide(slide)
            sid: str | None = entry["slide_id"]
        except UnknownSlideError:
            sid = None
        archive = self._archive()
        if sid is None:
            ids = archive.slide_ids
            if slide in ids:
                sid = slide
            else:
                names = _catalog_names(archive)
                matches = [i for i in ids if len(slide) >= 4 and i.startswith(slide)]
                matches = matches or [
                    i for i, (n, _) in names.items() if slide in (n, Path(n).stem) and i in ids
                ]
                if len(matches) != 1:
                    raise UnknownSlideError(
                        slide,
                        f"index {self.name} or archive {self.root}",
                        "pass a slide id (or unique prefix, or file name) from "
                        "`wsi-ssl search ROOT --list`",
                    )
                sid = matches[0]
        return archive.slide(sid), self._by_id.get(sid)

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
        self._refresh()

    def _write(self, coords: np.ndarray | None = None) -> None:
        record = {
            k: v
            for k, v in self.record.items()
            if k not in ("files", "format", "format_version", "name", "n_vectors", "dim")
        }
        record["n_slides"] = len(self.slides)
        record["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_index(
            self.root,
            self.name,
            self.index,
            config=record,
            slides=self.files.slides,
            coords=self.files.coords if coords is None else coords,
        )
        self.files = read_index_files(self.root, self.name, verify=False)
        self._refresh()

    def add(self, slides: Sequence[str] | None = None, *, progress: Progress = None) -> AddSummary:
        """Append slides embedded since the index was built (and re-add re-embedded ones).

        New slides get the next slide numbers; nothing is rebuilt. A slide whose embeddings
        changed (new coords or a newer embedding run) is removed and added again.

        Raises:
            SchemaMismatchError: a new slide was tiled at another scale than the index.
            IndexBusyError: another process is writing the index.
        """
        summary = AddSummary()
        with self._writing():
            archive = self._archive()
            current = {s["slide_id"]: s for s in self.slides}
            changed: list[str] = []

            def skip(sid: str, attrs: dict[str, Any]) -> bool:
                old = current.get(sid)
                if old is None:
                    return False
                if old.get("coords_sha256") == attrs.get("coords_sha256") and old.get(
                    "embedded"
                ) == attrs.get("created"):
                    summary.unchanged += 1
                    return True
                changed.append(sid)
                return False

            items, entries, coords, _, dim, _ = self._collect(
                archive,
                self.encoder_id,
                slides,
                start_number=len(self.files.slides),
                start_offset=len(self.files.coords),
                tiling=self.tiling,
                skip=skip,
            )
            if not items:
                summary.notes.append("no new or re-embedded slides; the index is up to date")
                return summary
            if dim != self.dim:
                raise SchemaMismatchError(
                    f"new embeddings have dimension {dim}, the index {self.dim}"
                )
            for sid in changed:
                self._remove_entry(current[sid])
            source = _ArchiveSource(items, self.encoder_id, dim)
            for ids, vecs in source.batches():
                self.index.add_with_ids(vecs, ids)
            self.files.slides.extend(entries)
            summary.added = [e["slide_id"] for e in entries if e["slide_id"] not in set(changed)]
            summary.updated = changed
            summary.vectors = source.n
            self._maybe_compact(summary.notes)
            built = int(self.record.get("built_n", 0))
            if self.kind == "ivfpq" and self.index.ntotal > ADD_REBUILD_FACTOR * max(1, built):
                summary.notes.append(
                    f"the index now holds {self.index.ntotal} vectors, over {ADD_REBUILD_FACTOR}x the "
                    f"{built} it was trained for; rebuild it for the best recall and speed"
                )
            self._write(np.concatenate([self.files.coords, coords]))
            _log(progress, f"added {summary.vectors} vectors from {len(entries)} slides")
        return summary

    def _remove_entry(self, entry: dict[str, Any]) -> int:
        lo, hi = slide_id_range(entry["number"])
        entry["status"] = "removed"
        if self.kind == "hnsw":
            self.record["tombstones"] = int(self.record.get("tombstones", 0)) + entry["n_tiles"]
            return entry["n_tiles"]
        entry["in_index"] = False
        return _build.remove_range(self.index, self.params, lo, hi)

    def _maybe_compact(self, notes: list[str]) -> None:
        tomb = int(self.record.get("tombstones", 0))
        if self.kind == "hnsw" and tomb > _build.COMPACT_FRACTION * max(1, self.index.ntotal):
            self._compact()
            notes.append(f"rebuilt the HNSW graph without {tomb} removed vectors")

    def _compact(self) -> None:
        dead = {
            s["number"] for s in self.files.slides if s["status"] == "removed" and s["in_index"]
        }
        self.index = _build.compact(
            self.index, self.params, lambda ids: np.isin(decode_ids(ids)[0], list(dead))
        )
        for s in self.files.slides:
            if s["number"] in dead:
                s["in_index"] = False
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
            removed = self._remove_entry(entry)
            self._maybe_compact([])
            self._write()
        return removed

    def compact(self) -> None:
        """Rebuild an HNSW graph without its tombstoned vectors now (no-op for other kinds)."""
        if self.kind != "hnsw" or not int(self.record.get("tombstones", 0)):
            return
        with self._writing():
            self._compact()
            self._write()

    # -- searching -------------------------------------------------------------------------
    def _selector(self, exclude: Sequence[int]) -> tuple[Any, list[Any]]:
        """An IDSelector leaving out tombstones and the ``exclude`` slide numbers."""
        import faiss

        keep: list[Any] = []
        parts: list[faiss.IDSelector] = []
        if int(self.record.get("tombstones", 0)):
            if self._tomb_ids is None:
                ranges = [
                    encode_ids(s["number"], np.arange(s["n_tiles"]))
                    for s in self.files.slides
                    if s["status"] == "removed" and s["in_index"]
                ]
                self._tomb_ids = np.concatenate(ranges) if ranges else np.empty(0, np.int64)
            batch = faiss.IDSelectorBatch(self._tomb_ids)
            keep.append(batch)
            parts.append(batch)
        for number in sorted(set(exclude)):
            rng = faiss.IDSelectorRange(*slide_id_range(int(number)))
            keep.append(rng)
            parts.append(rng)
        if not parts:
            return None, keep
        union = parts[0]
        for p in parts[1:]:
            union = faiss.IDSelectorOr(union, p)
            keep.append(union)
        sel = faiss.IDSelectorNot(union)
        keep.append(sel)
        return sel, keep

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
                "one (`wsi-ssl index ROOT --encoder ...`)"
            )
        x = np.atleast_2d(np.asarray(vectors))
        if x.shape[1] != self.dim:
            raise EncoderMismatchError(
                f"query vectors have dimension {x.shape[1]}, the index {self.name!r} "
                f"({self.encoder_id}) {self.dim}"
            )
        x = _build.normalise(x)
        k = max(1, min(int(k), max(1, self.n_vectors)))
        sel, keep = self._selector(exclude_slides)
        params = _build.search_params(self.params, k, sel)
        dist, ids = self.index.search(x, k, params=params)
        del keep
        sims = _build.to_similarity(dist, self.params["faiss_metric"])
        sims[ids < 0] = -np.inf
        return sims, ids

    # -- building queries ------------------------------------------------------------------
    def _slide_vectors(self, store: SlideStore) -> tuple[np.ndarray, np.ndarray]:
        from wsi_ssl.storage.embeddings import read_embeddings

        emb = read_embeddings(store, self.encoder_id)
        return np.asarray(emb.features, dtype=np.float32), np.asarray(emb.coords)

    def _check_scale(self, store: SlideStore) -> None:
        key = _tiling_key(store.tiling)
        if not _same_scale(self.tiling, key):
            raise SchemaMismatchError(
                f"{store.path}: tiled at {key['mpp']} µm/px, {key['tile_size']} px, the index "
                f"{self.name!r} at {self.mpp} µm/px, {self.tiling['tile_size']} px; query with a "
                "slide tiled like the index"
            )

    def query_tile(self, slide: str, xy: tuple[int, int]) -> Query:
        """The stored tile of ``slide`` that contains level-0 point ``xy``.

        Raises:
            UnknownSlideError, RegionOutsideSlideError, NoTilesInRegionError.
        """
        store, number = self._query_store(slide)
        self._check_scale(store)
        x, y = (int(v) for v in xy)
        w, h = store.source["dimensions"]
        if not (0 <= x < w and 0 <= y < h):
            raise RegionOutsideSlideError(
                f"{store.slide_id}: point {x},{y} is outside the slide (0..{w - 1}, 0..{h - 1} level-0 px)"
            )
        feats, coords = self._slide_vectors(store)
        size = float(store.tiling["tile_size_level0"])
        inside = (
            (coords[:, 0] <= x)
            & (x < coords[:, 0] + size)
            & (coords[:, 1] <= y)
            & (y < coords[:, 1] + size)
        )
        rows = np.flatnonzero(inside)
        if not len(rows):
            raise NoTilesInRegionError(
                f"{store.slide_id}: no stored tissue tile contains point {x},{y}; pick a point on "
                "tissue (tiles cover "
                f"{len(coords)} positions)"
            )
        centres = coords[rows] + size / 2
        row = rows[int(np.argmin(((centres - [x, y]) ** 2).sum(axis=1)))]
        side_um = size * float(store.source["mpp"])
        tx, ty = (int(v) for v in coords[row])
        return Query(
            "tile",
            feats[[row]],
            store.slide_id,
            self._name_of(store),
            (tx, ty, round(size), round(size)),
            coords[[row]],
            np.array([row]),
            size,
            (side_um, side_um),
            slide_number=number,
        )

    def query_region(self, slide: str, box: tuple[int, int, int, int]) -> Query:
        """The stored tiles of ``slide`` whose centres lie in level-0 ``box`` = (x, y, w, h).

        A box partly off the slide is clipped to it.

        Raises:
            UnknownSlideError; RegionOutsideSlideError: the box is empty or off the slide;
            NoTilesInRegionError: it holds no tissue tile.
        """
        store, number = self._query_store(slide)
        self._check_scale(store)
        x, y, w, h = (int(v) for v in box)
        sw, sh = store.source["dimensions"]
        if w <= 0 or h <= 0:
            raise RegionOutsideSlideError(
                f"{store.slide_id}: box {x},{y},{w},{h} has no area; width and height must be > 0"
            )
        x0, y0, x1, y1 = max(0, x), max(0, y), min(sw, x + w), min(sh, y + h)
        if x1 <= x0 or y1 <= y0:
            raise RegionOutsideSlideError(
                f"{store.slide_id}: box {x},{y},{w},{h} lies outside the slide, which is {sw}x{sh} "
                "level-0 px; give X,Y,W,H in level-0 pixels"
            )
        feats, coords = self._slide_vectors(store)
        size = float(store.tiling["tile_size_level0"])
        cx, cy = coords[:, 0] + size / 2, coords[:, 1] + size / 2
        rows = np.flatnonzero((cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1))
        if not len(rows):
            raise NoTilesInRegionError(
                f"{store.slide_id}: box {x0},{y0},{x1 - x0},{y1 - y0} holds no stored tissue tile "
                f"(tiles are {round(size)} level-0 px; a tile counts when its centre is inside); "
                "draw the box over tissue or make it larger"
            )
        rows = _subsample(rows, MAX_QUERY_TILES)
        mpp = float(store.source["mpp"])
        return Query(
            "region",
            feats[rows],
            store.slide_id,
            self._name_of(store),
            (x0, y0, x1 - x0, y1 - y0),
            coords[rows],
            rows,
            size,
            ((x1 - x0) * mpp, (y1 - y0) * mpp),
            slide_number=number,
        )

    def query_slide(self, slide: str, *, max_tiles: int = MOSAIC_TILES, seed: int = 0) -> Query:
        """A whole slide, represented by a mosaic of up to ``max_tiles`` tiles: the tile nearest
        each k-means centroid of its vectors (cf. Yottixel's mosaic, Kalra et al. 2020)."""
        store, number = self._query_store(slide)
        self._check_scale(store)
        feats, coords = self._slide_vectors(store)
        if not len(feats):
            raise NoTilesInRegionError(f"{store.slide_id}: the slide has no stored tiles")
        rows = mosaic_rows(feats, max_tiles, seed)
        size = float(store.tiling["tile_size_level0"])
        mpp = float(store.source["mpp"])
        w, h = store.source["dimensions"]
        return Query(
            "slide",
            feats[rows],
            store.slide_id,
            self._name_of(store),
            (0, 0, int(w), int(h)),
            coords[rows],
            rows,
            size,
            (size * mpp, size * mpp),
            slide_number=number,
        )

    def query_image(
        self,
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
            EncoderMismatchError: ``encoder`` is not the index's, or it cannot be rebuilt.
        """
        from wsi_ssl.search.encoder import index_encoder
        from wsi_ssl.search.image import MAX_IMAGE_PIXELS, cut_tiles, load_image, rescale

        limit = max_pixels or MAX_IMAGE_PIXELS
        if isinstance(image, str | Path):
            pixels = load_image(image, max_pixels=limit)
        else:
            pixels = np.asarray(image)
            if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
                raise ConfigError(
                    f"query image must be uint8 (h, w, 3), got {pixels.dtype} {pixels.shape}"
                )
            pixels = pixels[..., :3]
        src_mpp = float(image_mpp) if image_mpp is not None else self.mpp
        pixels = rescale(pixels, src_mpp, self.mpp, max_pixels=limit)
        t = self.tiling
        stride = t["tile_size"] - t["overlap"]
        tiles, coords, _ = cut_tiles(
            pixels, t["tile_size"], stride, mpp=self.mpp, tissue_threshold=t["tissue_threshold"]
        )
        rows = _subsample(np.arange(len(tiles)), MAX_QUERY_TILES)
        tiles, coords = tiles[rows], coords[rows]
        enc = index_encoder(
            self.encoder_id, self.record.get("encoder", {}), encoder=encoder, weights=weights
        )
        vectors = enc.embed_images(tiles)
        h, w = pixels.shape[:2]
        return Query(
            "image",
            vectors.astype(np.float32),
            None,
            None,
            (0, 0, w, h),
            coords,
            None,
            float(t["tile_size"]),
            (w * self.mpp, h * self.mpp),
            image=pixels,
        )

    def _name_of(self, store: SlideStore) -> str:
        number = self._by_id.get(store.slide_id)
        if number is not None:
            return str(self._entry(number)["name"])
        names = _catalog_names(self._archive())
        return names.get(
            store.slide_id, (Path(str(store.source.get("path", store.slide_id))).name, "")
        )[0]

    # -- searching queries -----------------------------------------------------------------
    def search(
        self,
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
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        by_kind: dict[str, Mode] = {"tile": "tiles", "slide": "slides"}
        mode = mode or by_kind.get(query.kind, "regions")
        if mode not in ("tiles", "regions", "slides"):
            raise ConfigError(f"mode must be one of tiles, regions, slides; got {mode!r}")
        exclude = [query.slide_number] if exclude_self and query.slide_number is not None else []
        if mode == "tiles":
            per_tile = hits_per_tile or k
        else:
            per_tile = hits_per_tile or max(DEFAULT_HITS_PER_TILE, k)
        sims, ids = self.search_vectors(query.vectors, per_tile, exclude_slides=exclude)
        q_rows = np.repeat(np.arange(len(ids)), ids.shape[1])
        flat_ids, flat_sims = ids.ravel(), sims.ravel()
        ok = flat_ids >= 0
        slides, tiles = decode_ids(flat_ids[ok])
        q_rows, flat_sims = q_rows[ok], flat_sims[ok]
        active = np.array([s["status"] == "active" for s in self.files.slides], dtype=bool)
        alive = active[slides] if len(slides) else np.zeros(0, dtype=bool)
        slides, tiles, q_rows, flat_sims = (
            slides[alive],
            tiles[alive],
            q_rows[alive],
            flat_sims[alive],
        )
        hits: list[TileHit] | list[RegionHit] | list[SlideHit]
        if mode == "tiles":
            hits = self._tile_hits(slides, tiles, flat_sims, k)
        elif mode == "regions":
            hits = self._region_hits(query, slides, tiles, flat_sims, q_rows, k)
        else:
            hits = self._slide_hits(query, slides, tiles, flat_sims, q_rows, k)
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

    def _xy(self, slide: int, tile: int) -> tuple[int, int]:
        x, y = self.files.coords[self._entry(slide)["offset"] + tile]
        return int(x), int(y)

    def _tile_hits(
        self, slides: np.ndarray, tiles: np.ndarray, sims: np.ndarray, k: int
    ) -> list[TileHit]:
        s, t, best, _ = tile_scores(slides, tiles, sims)
        order = np.argsort(-best, kind="stable")[:k]
        out = []
        for rank, i in enumerate(order, 1):
            e = self._entry(int(s[i]))
            x, y = self._xy(int(s[i]), int(t[i]))
            out.append(
                TileHit(
                    rank,
                    e["slide_id"],
                    e["name"],
                    int(t[i]),
                    x,
                    y,
                    round(e["tile_size_level0"]),
                    float(best[i]),
                )
            )
        return out

    def _windows(
        self,
        entry: dict[str, Any],
        q_rows: np.ndarray,
        tiles: np.ndarray,
        sims: np.ndarray,
        size_um: tuple[float, float],
        k: int,
    ) -> list[tuple[tuple[int, int, int, int], Any]]:
        """Best windows of physical size ``size_um`` on one slide, with level-0 boxes."""
        stride = float(entry["stride_level0"])
        mpp = float(entry["mpp"])
        xy = self.files.coords[entry["offset"] + tiles]
        cells = np.stack([np.round(xy[:, 1] / stride), np.round(xy[:, 0] / stride)], axis=1).astype(
            np.int64
        )
        wr = max(1, round(size_um[1] / (stride * mpp)))
        wc = max(1, round(size_um[0] / (stride * mpp)))
        grid = tuple(entry["grid_shape"]) if entry.get("grid_shape") else None
        sw, sh = entry["dimensions"]
        out = []
        for win in best_windows(q_rows, cells, sims, (wr, wc), k, grid):
            x, y = round(win.col * stride), round(win.row * stride)
            w = min(round(size_um[0] / mpp), max(1, sw - x))
            h = min(round(size_um[1] / mpp), max(1, sh - y))
            out.append(((x, y, w, h), win))
        return out

    def _region_hits(
        self,
        query: Query,
        slides: np.ndarray,
        tiles: np.ndarray,
        sims: np.ndarray,
        q_rows: np.ndarray,
        k: int,
    ) -> list[RegionHit]:
        candidates = []
        for number in np.unique(slides):
            sel = slides == number
            entry = self._entry(int(number))
            t, s, q = tiles[sel], sims[sel], q_rows[sel]
            for box, win in self._windows(entry, q, t, s, query.size_um, k):
                candidates.append(
                    (win.score, int(number), box, t[win.members], s[win.members], q[win.members])
                )
        candidates.sort(key=lambda c: (-c[0], c[1], c[2][1], c[2][0]))
        n_q = max(1, query.n_tiles)
        out = []
        for rank, (score, number, box, m_tiles, _, m_rows) in enumerate(candidates[:k], 1):
            entry = self._entry(number)
            members = np.unique(m_tiles)
            out.append(
                RegionHit(
                    rank,
                    entry["slide_id"],
                    entry["name"],
                    box,
                    float(score),
                    len(members),
                    float(score) / n_q,
                    len(np.unique(m_rows)) / n_q,
                    [int(m) for m in members],
                )
            )
        return out

    def _slide_hits(
        self,
        query: Query,
        slides: np.ndarray,
        tiles: np.ndarray,
        sims: np.ndarray,
        q_rows: np.ndarray,
        k: int,
    ) -> list[SlideHit]:
        scores = slide_scores(q_rows, slides, sims, query.n_tiles)
        ranked = sorted(scores.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))[:k]
        out = []
        for rank, (number, (score, coverage, n_hits)) in enumerate(ranked, 1):
            entry = self._entry(number)
            sel = slides == number
            side = entry["tile_size_level0"] * entry["mpp"] * 4  # whole-slide queries: 4x4 tiles
            size = query.size_um if query.kind != "slide" else (side, side)
            wins = self._windows(entry, q_rows[sel], tiles[sel], sims[sel], size, 1)
            out.append(
                SlideHit(
                    rank,
                    entry["slide_id"],
                    entry["name"],
                    score,
                    coverage,
                    n_hits,
                    wins[0][0] if wins else None,
                )
            )
        return out

    # -- convenience -----------------------------------------------------------------------
    def search_tile(
        self, slide: str, xy: tuple[int, int], *, k: int = 10, exclude_self: bool = False
    ) -> SearchResult:
        """The ``k`` tiles most similar to the tile of ``slide`` containing level-0 ``xy``."""
        return self.search(self.query_tile(slide, xy), k=k, mode="tiles", exclude_self=exclude_self)

    def search_region(
        self,
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
        self,
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
        self,
        slide: str,
        box: tuple[int, int, int, int] | None = None,
        *,
        k: int = 10,
        exclude_self: bool = True,
    ) -> SearchResult:
        """Slides ranked by similarity to ``slide`` (its mosaic) or to a region of it."""
        query = self.query_slide(slide) if box is None else self.query_region(slide, box)
        return self.search(query, k=k, mode="slides", exclude_self=exclude_self)

    def gallery(self, result: SearchResult, out: str | Path, **kwargs: Any) -> Path:
        """Save the query beside its top hits as a PNG (:func:`wsi_ssl.search.gallery.render_gallery`)."""
        from wsi_ssl.search.gallery import render_gallery

        return render_gallery(self, result, out, **kwargs)

    def __repr__(self) -> str:
        return f"SearchIndex({self.name!r}, kind={self.kind!r}, vectors={self.n_vectors}, encoder={self.encoder_id!r})"


def mosaic_rows(feats: np.ndarray, max_tiles: int, seed: int = 0) -> np.ndarray:
    """Rows of the tiles nearest each of ``max_tiles`` k-means centroids (all rows if fewer)."""
    n = len(feats)
    if n <= max_tiles:
        return np.arange(n)
    import faiss

    x = _build.normalise(feats)
    km = faiss.Kmeans(
        x.shape[1], max_tiles, niter=10, seed=seed, verbose=False, min_points_per_centroid=1
    )
    km.train(x)
    assert km.centroids is not None  # set by train()
    flat = faiss.IndexFlatL2(x.shape[1])
    flat.add(x)
    _, nearest = flat.search(km.centroids, 1)
    return np.unique(nearest.ravel())


def _subsample(rows: np.ndarray, limit: int) -> np.ndarray:
    if len(rows) <= limit:
        return rows
    return rows[np.linspace(0, len(rows) - 1, limit).round().astype(np.int64)]


def _mmap_min() -> int:
    from wsi_ssl.storage.index_files import MMAP_MIN_BYTES

    return MMAP_MIN_BYTES


def _faiss_version() -> str:
    import faiss

    return str(getattr(faiss, "__version__", "unknown"))


def _log(progress: Progress, msg: str) -> None:
    if progress is not None:
        progress(msg)
