"""Matching a labels table to an archive: each row to one complete slide store with embeddings
of the run's encoder (:class:`MatchReport`).

The ``slide`` column may hold a slide id (``<root>/slides/<slide_id>.zarr``), the slide's file
name (``CMU-1.svs``), its stem (``CMU-1``), its path as recorded in ``catalog.sqlite`` or a
unique id prefix: names are resolved by :mod:`wsi_ssl.storage.resolve`, as everywhere.
"""

from __future__ import annotations

import shlex
import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_ssl.errors import (
    EmptyBagError,
    LabelsError,
    SchemaMismatchError,
)
from wsi_ssl.listing import first_few
from wsi_ssl.mil.labels import (
    LabelRow,
    LabelTable,
    check_classes,
    line_list,
    read_labels,
    sort_classes,
)

if TYPE_CHECKING:
    from wsi_ssl.storage import Archive

__all__ = [
    "LabelledSlide",
    "MatchReport",
    "check_one_scale",
    "check_one_stain",
    "match_labels",
    "slide_file_names",
    "training_tilings",
]

DECODE_THREADS = 4  # bags decoded at a time by skip_missing's check (zstd releases the GIL)


@dataclass(frozen=True)
class LabelledSlide:
    """A labelled slide with a complete store and embeddings of the run's encoder."""

    slide_id: str
    name: str
    label: str
    y: int
    patient: str
    line: int
    store_path: Path
    n_tiles: int
    fold: int | None = None


@dataclass
class MatchReport:
    """What matching a labels table to an archive found (see :func:`match_labels`)."""

    labels_path: str
    root: str
    encoder_id: str
    in_dim: int
    classes: list[str]
    slides: list[LabelledSlide]
    missing: list[LabelRow] = field(default_factory=list)
    no_embeddings: list[LabelRow] = field(default_factory=list)
    empty: list[LabelRow] = field(default_factory=list)
    unlabelled: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)
    damaged: dict[int, str] = field(default_factory=dict)  # labels line -> what is wrong
    checked: tuple[int, float] | None = None  # skip_missing: (bags decoded, seconds taken)

    @property
    def class_counts(self) -> dict[str, int]:
        counts = Counter(s.label for s in self.slides)
        return {c: counts.get(c, 0) for c in self.classes}

    @property
    def n_patients(self) -> int:
        return len({s.patient for s in self.slides})

    def lines(self) -> list[str]:
        """A readable report: what was matched and what was left out, and why."""
        counts = ", ".join(f"{c} {n}" for c, n in self.class_counts.items())
        out = [
            f"{len(self.slides)} labelled slides with embeddings {self.encoder_id} "
            f"(D={self.in_dim}; {counts}; {self.n_patients} patients)"
        ]
        for what, rows in (
            ("labelled slides with no complete store", self.missing),
            (f"labelled slides without usable embeddings {self.encoder_id}", self.no_embeddings),
            ("labelled slides with an empty bag (0 tiles)", self.empty),
        ):
            if rows:
                shown = first_few((f"{r.slide!r} ({self._why(r)})" for r in rows), 10)
                out.append(f"left out {len(rows)} {what}: {shown}")
        if self.damaged:
            out.append(
                f"re-embed the {len(self.damaged)} slide(s) with damaged embeddings: "
                f"`wsi-ssl check {shlex.quote(str(self.root))}` prints the embed command that redoes them"
            )
        if self.unlabelled:
            shown = first_few(
                (
                    f"{s} ({self.names[s]})" if self.names.get(s, s) != s else s
                    for s in self.unlabelled
                ),
                10,
            )
            out.append(f"{len(self.unlabelled)} stores have no label: {shown}")
        return out

    def _why(self, row: LabelRow) -> str:
        """The row's line, and what is wrong with its embeddings when they are damaged."""
        problem = self.damaged.get(row.line)
        return f"line {row.line}" if problem is None else f"line {row.line}: {problem}"

    def to_dict(self) -> dict[str, Any]:
        def rows(rs: list[LabelRow]) -> list[dict[str, Any]]:
            return [
                {"line": r.line, "slide": r.slide, "label": r.label}
                | ({"damaged": self.damaged[r.line]} if r.line in self.damaged else {})
                for r in rs
            ]

        return {
            "labels": self.labels_path,
            "root": self.root,
            "encoder_id": self.encoder_id,
            "in_dim": self.in_dim,
            "classes": self.classes,
            "class_counts": self.class_counts,
            "n_slides": len(self.slides),
            "n_patients": self.n_patients,
            "missing_store": rows(self.missing),
            "missing_embeddings": rows(self.no_embeddings),
            "empty_bags": rows(self.empty),
            "unlabelled_stores": self.unlabelled,
        }


def _resolve_encoder(root: Path, wanted: str | None, ids_by_slide: dict[str, list[str]]) -> str:
    """``wanted`` (an id or unique prefix) among the labelled slides' encoders; None: the one
    every labelled slide has, else the storage rule (the only one there)."""
    from wsi_ssl.storage.resolve import resolve_encoder

    if wanted is None and ids_by_slide:
        common = set.intersection(*(set(ids) for ids in ids_by_slide.values()))
        if len(common) == 1:
            return next(iter(common))
    return resolve_encoder({i for ids in ids_by_slide.values() for i in ids}, wanted, root)


def slide_file_names(archive: Archive, slide_ids: list[str]) -> dict[str, str]:
    """Slide id -> its file name (the id when neither the catalog nor the store has one)."""
    names = {sid: sid for sid in slide_ids}
    names.update({sid: name for sid, (_, name) in archive.source_files(slide_ids).items()})
    return names


def match_labels(
    root: str | Path,
    labels: LabelTable | str | Path | Mapping[str, str | int],
    encoder: str | None = None,
    *,
    skip_missing: bool = False,
    skip_flagged_tiles: bool = False,
) -> MatchReport:
    """Match labels to the complete slide stores under ``root`` and their embeddings.

    Args:
        root: an archive root.
        labels: a :class:`LabelTable`, a CSV path, or ``{slide: label}``.
        encoder: an ``encoder_id`` or a unique prefix of one (None: the one encoder every
            labelled slide has).
        skip_missing: leave out (and report) labelled slides with no store, no embeddings
            of the encoder, embeddings that fail to decode (each bag is read once, here) or
            an empty bag, instead of raising.
        skip_flagged_tiles: count only the tiles that pass QC (a slide whose every tile is
            flagged is an empty bag).

    Raises:
        LabelsError: a row names several stores, two rows name one store, labelled slides
            cannot be used (unless ``skip_missing``), or a single class is left.
        EmbeddingsNotFoundError: no labelled slide has embeddings of ``encoder``.
        EmptyBagError: a labelled slide has 0 tiles (unless ``skip_missing``).
    """
    from wsi_ssl.storage import open_store

    if isinstance(labels, Mapping):
        labels = LabelTable.from_mapping(labels)
    table = labels if isinstance(labels, LabelTable) else read_labels(labels)
    archive = open_store(root)
    complete = archive.slide_ids
    names = slide_file_names(archive, complete)

    matched, missing = _match_rows(table, archive, names, root, skip_missing)
    encoder_id, ids_by_slide = _encoders(archive, [sid for _, sid in matched], encoder)
    checked, started = sum(encoder_id in ids for ids in ids_by_slide.values()), time.perf_counter()
    damaged = _drop_damaged(archive, ids_by_slide, encoder_id) if skip_missing else {}
    decoded = (checked, time.perf_counter() - started) if skip_missing else None
    no_emb = [r for r, sid in matched if encoder_id not in ids_by_slide[sid]]
    if no_emb and not skip_missing:
        raise LabelsError(
            table.path,
            f"{len(no_emb)} labelled slide(s) have no embeddings {encoder_id!r} "
            f"({line_list([r.line for r in no_emb])}); run `wsi-ssl embed` with that encoder or "
            "pass skip_missing=True",
            [r.line for r in no_emb],
            parameters=("skip_missing",),
        )
    embedded = [(r, sid) for r, sid in matched if encoder_id in ids_by_slide[sid]]
    slides, empty, dims = _bags(
        table, archive, embedded, names, encoder_id, (skip_missing, skip_flagged_tiles)
    )
    kept = {s.slide_id for s in slides}
    used = [r for r, sid in matched if sid in kept]
    check_classes(table.path, used)
    if len(dims) > 1:
        raise SchemaMismatchError(
            f"{root}: embeddings {encoder_id!r} have different widths {sorted(dims)} across "
            "slides; re-embed them with that encoder and resume=False",
            parameters=("resume",),
        )
    labelled = {sid for _, sid in matched}
    return MatchReport(
        labels_path=table.path,
        root=str(root),
        encoder_id=encoder_id,
        in_dim=dims.pop(),
        classes=sort_classes(r.label for r in used),
        slides=_reindex(slides, sort_classes(r.label for r in used)),
        missing=missing,
        no_embeddings=no_emb,
        empty=empty,
        unlabelled=[sid for sid in complete if sid not in labelled],
        names=names,
        damaged={r.line: damaged[sid] for r, sid in matched if sid in damaged},
        checked=decoded,
    )


def _encoders(
    archive: Archive, slide_ids: list[str], encoder: str | None
) -> tuple[str, dict[str, list[str]]]:
    """The encoder id ``encoder`` names among the slides' embeddings, and each slide's ids."""
    from wsi_ssl.storage.embeddings import embedding_ids

    ids_by_slide = {sid: embedding_ids(archive.store_path(sid)) for sid in slide_ids}
    return _resolve_encoder(archive.root, encoder, ids_by_slide), ids_by_slide


def _drop_damaged(
    archive: Archive, ids_by_slide: dict[str, list[str]], encoder_id: str
) -> dict[str, str]:
    """Take ``encoder_id`` out of ``ids_by_slide`` for the slides whose embeddings are damaged:
    a chunk file lost, or a chunk failing its checksum (each bag is decoded once, chunk by
    chunk, so a run does not stop at its first epoch; :data:`DECODE_THREADS` bags at a time).
    Returns slide id -> what is wrong, in ``ids_by_slide``'s order."""
    from concurrent.futures import ThreadPoolExecutor

    from wsi_ssl.storage.embeddings import embeddings_problem

    todo = [sid for sid, ids in ids_by_slide.items() if encoder_id in ids]
    with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="bag-check") as pool:
        found = pool.map(lambda sid: embeddings_problem(archive.slide(sid), encoder_id), todo)
        damaged = {sid: p for sid, p in zip(todo, found, strict=True) if p is not None}
    for sid in damaged:
        ids_by_slide[sid] = [e for e in ids_by_slide[sid] if e != encoder_id]
    return damaged


def _match_rows(
    table: LabelTable,
    archive: Archive,
    names: dict[str, str],
    root: str | Path,
    skip_missing: bool,
) -> tuple[list[tuple[LabelRow, str]], list[LabelRow]]:
    """Each row's slide id (:mod:`wsi_ssl.storage.resolve`), and the rows naming no store.

    Raises:
        LabelsError: a row names several stores, two rows name one store, rows name no store
            (unless ``skip_missing``), or no row names a store.
    """
    from wsi_ssl.storage.resolve import slide_matches, slide_names

    complete = list(names)
    keys = slide_names(archive, complete)
    matched: list[tuple[LabelRow, str]] = []
    missing: list[LabelRow] = []
    ambiguous: list[tuple[LabelRow, list[str]]] = []
    for r in table.rows:
        ids = slide_matches(keys, complete, r.slide)
        if len(ids) == 1:
            matched.append((r, next(iter(ids))))
        elif len(ids) > 1:
            ambiguous.append((r, sorted(ids)))
        else:
            missing.append(r)
    if ambiguous:
        r, stores = ambiguous[0]
        raise LabelsError(
            table.path,
            f"{r.slide!r} on line {r.line} names {len(stores)} stores ({', '.join(stores)}); "
            "use the slide id instead",
            [a.line for a, _ in ambiguous],
        )
    by_store: dict[str, list[int]] = defaultdict(list)
    for r, sid in matched:
        by_store[sid].append(r.line)
    twice = {sid: ls for sid, ls in by_store.items() if len(ls) > 1}
    if twice:
        sid, ls = next(iter(twice.items()))
        raise LabelsError(
            table.path,
            f"{line_list(ls)} name the same slide {sid} ({names[sid]}); keep one row per slide",
            [ln for ls in twice.values() for ln in ls],
        )
    if missing and not skip_missing:
        shown = first_few(repr(r.slide) for r in missing)
        raise LabelsError(
            table.path,
            f"{len(missing)} labelled slide(s) have no complete store under {root} "
            f"({line_list([r.line for r in missing])}: {shown}); "
            "tile them, fix the names (slide id, file name or stem), or pass skip_missing=True",
            [r.line for r in missing],
            parameters=("skip_missing",),
        )
    if not matched:
        raise LabelsError(table.path, f"no labelled slide has a complete store under {root}")

    return matched, missing


def _bags(
    table: LabelTable,
    archive: Archive,
    embedded: list[tuple[LabelRow, str]],
    names: dict[str, str],
    encoder_id: str,
    skip: tuple[bool, bool],
) -> tuple[list[LabelledSlide], list[LabelRow], set[int]]:
    """The ``embedded`` slides (matched, with embeddings ``encoder_id``) with their bag sizes;
    the rows whose bag is empty; the embedding widths seen. ``skip``: (skip_missing,
    skip_flagged_tiles).

    Raises:
        EmptyBagError: a slide has 0 tiles, or 0 that pass QC (unless ``skip_missing``).
    """
    from numpy import isin as _isin

    from wsi_ssl.storage.embeddings import embedded_rows, open_embeddings_array

    skip_missing, skip_flagged = skip
    if skip_flagged:  # reading QC imports torch's bag module: only when asked
        from wsi_ssl.mil.data import kept_rows

    classes = table.classes
    slides: list[LabelledSlide] = []
    empty: list[LabelRow] = []
    dims: set[int] = set()
    for r, sid in embedded:
        path = archive.store_path(sid)
        array = open_embeddings_array(path, encoder_id)
        shape = array.shape
        rows = kept_rows(path) if skip_flagged and shape[0] else None
        present = embedded_rows(array.attrs, int(shape[0]))  # skip_flagged_tiles at embed
        if present is not None:
            rows = present if rows is None else present[_isin(present, rows)]
        n_tiles = int(shape[0]) if rows is None else len(rows)
        if n_tiles == 0:
            flagged = "; every tile is flagged by QC" if shape[0] else ""
            if not skip_missing:
                where = f"{names[sid]} (slide {sid}, labels line {r.line}{flagged})"
                raise EmptyBagError(where, encoder_id)
            empty.append(r)
            continue
        dims.add(int(shape[1]))
        patient = r.patient if r.patient is not None else sid
        slides.append(
            LabelledSlide(
                sid,
                names[sid],
                r.label,
                classes.index(r.label),
                patient,
                r.line,
                path,
                n_tiles,
                r.fold,
            )
        )
    return slides, empty, dims


def _reindex(slides: list[LabelledSlide], classes: list[str]) -> list[LabelledSlide]:
    """Class indices after left-out slides may have removed a class."""
    from dataclasses import replace

    return [replace(s, y=classes.index(s.label)) for s in slides]


def check_one_stain(report: MatchReport) -> None:
    """Refuse training slides embedded with different stain normalisations (their vectors
    are not comparable).

    Raises:
        SchemaMismatchError: naming how many slides each normalisation has.
    """
    from wsi_ssl.stain_settings import stain_key, stain_text
    from wsi_ssl.storage import SlideStore
    from wsi_ssl.storage.embeddings import read_embeddings

    groups: dict[Any, list[str]] = {}
    kinds: dict[Any, str] = {}
    for slide in report.slides:
        store = SlideStore.open(slide.store_path)
        stain = read_embeddings(store, report.encoder_id, lazy=True).attrs.get("stain")
        key = stain_key(stain)
        groups.setdefault(key, []).append(slide.name)
        kinds[key] = f"with {stain_text(stain)}" if stain else "without"
    if len(groups) > 1:
        said = "; ".join(
            f"{len(names)} {kinds[key]} (e.g. {names[0]})" for key, names in groups.items()
        )
        raise SchemaMismatchError(
            f"{report.labels_path}: the labelled slides were embedded with different stain "
            f"normalisations: {said}; embed them again alike (`wsi-ssl embed --no-resume`)"
        )


def _scale_groups(report: MatchReport) -> list[tuple[dict[str, Any], list[str]]]:
    """The matched slides grouped by scale (:func:`~wsi_ssl.storage.slide_store.same_scale`):
    each group's ``{mpp, tile_size}`` (its first slide's) and slide names."""
    from wsi_ssl.storage import SlideStore
    from wsi_ssl.storage.slide_store import same_scale

    groups: list[tuple[dict[str, Any], list[str]]] = []
    for slide in report.slides:
        tiling = SlideStore.open(slide.store_path).tiling
        key = {"mpp": float(tiling["mpp"]), "tile_size": int(tiling["tile_size"])}
        group = next((names for seen, names in groups if same_scale(seen, key)), None)
        if group is None:
            groups.append((key, [slide.name]))
        else:
            group.append(slide.name)
    return groups


def check_one_scale(report: MatchReport) -> None:
    """Refuse training slides tiled at different scales or tile sizes (a bag of 1 µm/px
    tiles and one of 0.5 µm/px are not alike to the model; the index refuses them too).

    Raises:
        SchemaMismatchError: naming how many slides each tiling has.
    """
    groups = _scale_groups(report)
    if len(groups) > 1:
        said = "; ".join(
            f"{len(names)} at {key['mpp']:g} µm/px, {key['tile_size']} px (e.g. {names[0]})"
            for key, names in groups
        )
        raise SchemaMismatchError(
            f"{report.labels_path}: the labelled slides were tiled at different scales: {said}; "
            "tile them alike (`wsi-ssl tile --mpp MPP --tile-size SIZE --no-resume "
            "--discard-embeddings`, then embed them again) or label one scale's slides"
        )


def training_tilings(report: MatchReport) -> list[dict[str, Any]]:
    """The distinct ``{mpp, tile_size}`` the matched slides were tiled at (one, once
    :func:`check_one_scale` passed)."""
    return sorted(
        (key for key, _ in _scale_groups(report)), key=lambda k: (k["mpp"], k["tile_size"])
    )
