"""The search → label loop: accept or reject hits, keep the accepted regions, ask for more.

Verdicts live under the archive root, each file written atomically on every change:

* ``labels/regions.csv``: the accepted regions, ``slide,x,y,w,h,label`` (slide id, level-0
  box), readable by ``wsi-ssl mil`` and ``wsi-ssl evaluate``;
* ``labels/rejected.csv``: the rejected ones, same columns;
* ``labels/geojson/<slide_id>.geojson``: each slide's accepted regions as QuPath annotations
  (a FeatureCollection of rectangles, ``classification.name`` = the label).

The files feed the rest of the pipeline: ``labels/regions.csv`` is evaluation's region task
(``wsi-ssl evaluate --region-labels``, :mod:`wsi_ssl.evaluation.regions`); for MIL,
:func:`write_slide_labels` writes a ``slide,label`` CSV (a slide takes the label of its
accepted regions; slides whose regions disagree are left out). The GeoJSON files are QuPath
annotations: :func:`wsi_ssl.annotations.read_annotations` reads them (tiling ``roi``).

Routes (declared in :mod:`wsi_ssl.serve.app`): ``GET /api/labels``; ``POST /api/labels``
``{slide, box, label, verdict, index}`` with verdict ``accept``, ``reject`` or ``clear``;
``POST /api/labels/more`` ``{label, k, index}``: the tiles of ``index`` (default: the
server's) nearest any accepted region of ``label``, outside every labelled box;
``GET /api/slides/{slide}/concept.png?label=L&index=I``: the concept map of ``label`` over a
slide, each tile scored 1-NN style (its best cosine similarity to the accepted tiles minus its
best to the rejected ones), drawn at the thumbnail's size as a translucent heatmap on one
scale for the whole archive (transparent at the median score of a sample of the indexed
tiles, full at their 99th percentile), so a slide without the concept stays clear. A labelled
box is clipped to its slide; one that misses the slide is refused. A region the index cannot
use (its slide removed from it or re-tiled since) is skipped and counted (``query.skipped``,
header ``X-Skipped-Regions``).

Several servers may share an archive: a change is made under ``.locks/labels.lock`` on the
files as they are then (read again, changed, written atomically); reads take a file again
once another process replaced it. A label is 1 to 64 characters, no control character, ``/``
or ``\\`` (``Tumor: Positive``, ``Tumör`` are fine); it is never part of a file name. A new
label may not start with ``=``, ``+``, ``-`` or ``@`` (a spreadsheet formula;
:class:`FormulaLabelError`, a 422); one the files already hold (``+ve``) stays usable. A CSV
saved by a spreadsheet (BOM, CRLF, ``898.0``) is read; a row that still cannot be read is a
:class:`~wsi_ssl.errors.LabelsError` naming the file and line, the file left as it is.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import threading
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import AfterValidator

from wsi_ssl.errors import (
    ConfigError,
    EmbeddingsNotFoundError,
    NoTilesInRegionError,
    RegionOutsideSlideError,
    StoreIncompleteError,
    StoreNotFoundError,
    TilingMismatchError,
    UnknownSlideError,
    WsiSslError,
)
from wsi_ssl.search.queries import clip_box, on_slide_centres
from wsi_ssl.serve.labelfiles import (
    COLUMNS,
    Record,
    Stamp,
    csv_text,
    geojson,
    read_csv,
    stamp,
    write,
)
from wsi_ssl.serve.service import SlideService

if TYPE_CHECKING:
    from wsi_ssl.search.index import SearchIndex
    from wsi_ssl.search.results import Query

__all__ = [
    "SLIDE_LABELS",
    "FormulaLabelError",
    "Label",
    "LabelBook",
    "check_label",
    "concept_map",
    "more_like",
    "slide_labels_from_regions",
    "write_slide_labels",
]

MAX_LABEL = 64
MAX_REGIONS = 10_000
SCALE_SAMPLE = 20_000
"""Indexed tiles (from at most ``SCALE_SLIDES`` slides) a concept map's scale is measured on."""
SCALE_SLIDES = 64
MAX_MORE_FETCH = 4096
"""The most neighbours "more like these" fetches to find ``k`` outside the labelled boxes."""
SLIDE_LABELS = "labels/slides.csv"
"""The archive's slide labels (``slide,label``): the server's label filter reads it."""
LOCK = ".locks/labels.lock"
"""The lock file every change of the label files is made under (see the module docstring)."""
UNUSABLE: tuple[type[WsiSslError], ...] = (UnknownSlideError, EmbeddingsNotFoundError)
UNUSABLE += (TilingMismatchError, StoreNotFoundError, StoreIncompleteError)
UNUSABLE += (NoTilesInRegionError, RegionOutsideSlideError)
"""Why a labelled region cannot be used by an index: skipped (see the module docstring)."""


def check_label(value: str) -> str:
    """``value`` without surrounding blanks, or ValueError saying what a label may hold."""
    label = value.strip()
    bad = any(c in "/\\" or unicodedata.category(c)[0] == "C" for c in label)
    if not label or len(label) > MAX_LABEL or bad or "\u2028" in label or "\u2029" in label:
        raise ValueError(
            f"a label is 1 to {MAX_LABEL} characters without control characters, / or \\ "
            "(such as tumour, Tumor: Positive or Tumör)"
        )
    return label


class FormulaLabelError(ConfigError):
    """A new label starting like a spreadsheet formula (``=``, ``+``, ``-``, ``@``): refused
    (a 422), as ``labels/regions.csv`` is opened in spreadsheets. A label the files already
    hold (written before, or by hand: ``+ve``) is kept usable."""

    def __init__(self) -> None:
        super().__init__(
            "label: a label may not start with =, +, - or @ (a spreadsheet formula), unless "
            "the label files already hold it"
        )


Label = Annotated[str, AfterValidator(check_label)]


class LabelBook:
    """The accepted and rejected regions of one archive, shared with every other process
    serving it (see the module docstring). Reads the files at once: a row that cannot be read
    is a :class:`~wsi_ssl.errors.LabelsError` here, not on the first verdict."""

    FILES = ("regions.csv", "rejected.csv")

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.dir = self.root / "labels"
        self._lock = threading.Lock()
        self._read: dict[str, tuple[Stamp, list[Record]]] = {}
        self.scales: dict[tuple[str, str], tuple[tuple[Any, ...], tuple[float, float]]] = {}
        """Per (label, index), its concept-map scale and what it was measured for."""
        self.snapshot()

    def _records(self, name: str, fresh: bool = False) -> list[Record]:
        """The records of ``labels/<name>``, read again when another process replaced it."""
        kept = self._read.get(name)
        if fresh or kept is None or kept[0] != stamp(self.dir / name):
            records, read = read_csv(self.dir / name)
            kept = self._read[name] = (read, records)
        return list(kept[1])

    def snapshot(self) -> tuple[list[Record], list[Record]]:
        """(accepted, rejected) as the files hold them now."""
        with self._lock:
            return self._records(self.FILES[0]), self._records(self.FILES[1])

    @property
    def accepted(self) -> list[Record]:
        return self.snapshot()[0]

    @property
    def rejected(self) -> list[Record]:
        return self.snapshot()[1]

    def to_dict(self) -> dict[str, Any]:
        def rows(records: list[Record]) -> list[dict[str, Any]]:
            return [dict(zip(COLUMNS, r, strict=True)) for r in records]

        accepted, rejected = self.snapshot()
        return {
            "accepted": rows(accepted),
            "rejected": rows(rejected),
            "files": {"csv": "labels/regions.csv", "geojson": "labels/geojson/"},
        }

    def set(
        self,
        record: Record,
        verdict: Literal["accept", "reject", "clear"],
        name: str,
        dimensions: tuple[int, int],
    ) -> None:
        """Record ``verdict`` on the region of ``record`` (a box clipped to its slide of
        ``dimensions``): any earlier verdict on that region is replaced, one kept from before
        boxes were clipped included. Made under the archive's label lock on the files as
        they are then, so verdicts of other servers are kept.

        Raises:
            FormulaLabelError: an accept or reject naming a label that starts like a
                spreadsheet formula and that neither file holds yet.
        """
        from wsi_ssl.storage.locks import hold_lock

        key = record[:5]

        def other(r: Record) -> bool:
            return r[0] != key[0] or clip_box(r[1:5], dimensions) != key[1:]

        with self._lock, hold_lock(self.root / LOCK, self.dir, wait=30.0):
            held = self._records(self.FILES[0], fresh=True), self._records(self.FILES[1], True)
            new = all(r[5] != record[5] for r in held[0] + held[1])
            if verdict != "clear" and record[5][0] in "=+-@" and new:
                raise FormulaLabelError
            accepted, rejected = ([r for r in records if other(r)] for records in held)
            if verdict != "clear":
                if len(accepted) + len(rejected) >= MAX_REGIONS:
                    raise ConfigError(f"at most {MAX_REGIONS} labelled regions per archive")
                (accepted if verdict == "accept" else rejected).append(record)
            for file, records in zip(self.FILES, (accepted, rejected), strict=True):
                write(self.dir / file, csv_text(records))
                self._read[file] = (stamp(self.dir / file), records)
            mine = [r for r in accepted if r[0] == record[0]]
            text = json.dumps(geojson(mine, name), indent=1) + "\n"
            write(self.dir / "geojson" / f"{record[0]}.geojson", text)


def slide_labels_from_regions(root: str | Path) -> dict[str, str]:
    """Slide id -> the label of its accepted regions (slides whose regions disagree left out)."""
    seen: dict[str, set[str]] = {}
    for slide, *_, label in LabelBook(Path(root)).accepted:
        seen.setdefault(slide, set()).add(label)
    return {slide: next(iter(v)) for slide, v in seen.items() if len(v) == 1}


def write_slide_labels(root: str | Path, out: str | Path | None = None) -> Path:
    """Write :func:`slide_labels_from_regions` as a ``slide,label`` CSV (default
    ``ROOT/labels/slides.csv``), readable by ``wsi_ssl.mil.labels.read_labels``."""
    path = Path(out) if out is not None else Path(root) / SLIDE_LABELS
    labels = slide_labels_from_regions(root)
    if not labels:
        raise ConfigError(f"{root}: no accepted region to label a slide with; accept hits first")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("slide", "label"))
    writer.writerows(sorted(labels.items()))
    write(path, buf.getvalue())
    return path


def more_like(
    service: SlideService, book: LabelBook, label: str, k: int, index: str | None = None
) -> dict[str, Any]:
    """Tiles of index ``index`` nearest any accepted region of ``label``, none inside a
    labelled box (regions the index cannot use skipped)."""
    searched = service.index_for(index)
    accepted, rejected = book.snapshot()  # one view for the query and the boxes left out
    queries, skipped = _queries(searched, [r for r in accepted if r[5] == label])
    if not queries:
        raise ConfigError(_no_region(label, skipped, searched.name))
    first = queries[0]  # the tile vectors of every accepted region, as one query
    query = dataclasses.replace(
        first,
        vectors=np.concatenate([q.vectors for q in queries]),
        tile_coords=np.concatenate([q.tile_coords for q in queries]),
        tile_numbers=None,
        slide_number=None,
    )
    labelled: dict[str, list[Record]] = {}
    for record in accepted + rejected:
        labelled.setdefault(record[0], []).append(record)
    fetch = min(k + 4 * sum(map(len, labelled.values())), MAX_MORE_FETCH)
    while True:  # fetch more until k lie outside the labelled boxes (or the index runs out)
        out = service.run(searched, query, k=fetch, mode="tiles")
        keep = [h for h in out["hits"] if not _in_any(searched, h, labelled)][:k]
        if len(keep) == k or len(out["hits"]) < fetch or fetch >= MAX_MORE_FETCH:
            break
        fetch = min(2 * fetch, MAX_MORE_FETCH)
    out["query"]["regions"] = len(queries)
    out["query"]["skipped"] = skipped
    out["k"] = k  # what was asked for; hits_per_tile says how many neighbours were fetched
    for rank, hit in enumerate(keep, 1):
        hit["rank"] = rank
    out["hits"] = keep
    return out


def _no_region(label: str, skipped: int, index: str) -> str:
    """Why there is nothing to search with for ``label``."""
    if not skipped:
        return f"no accepted region has label {label!r}; accept a hit first"
    return (
        f"none of the {skipped} accepted region(s) labelled {label!r} can be used with index "
        f"{index}: their slides left the index or were re-tiled since; accept a hit first"
    )


def _in_any(index: SearchIndex, hit: dict[str, Any], by_slide: dict[str, list[Record]]) -> bool:
    """Whether ``hit`` lies in a labelled box of its slide (``by_slide``: records by slide)."""
    records = by_slide.get(hit["slide_id"], [])
    if not records:
        return False
    w, h = index.resolve_slide(hit["slide_id"])["dimensions"]
    return any(_inside(hit, r, (int(w), int(h))) for r in records)


def _queries(index: SearchIndex, records: list[Record]) -> tuple[list[Query], int]:
    """The region queries of ``records`` in ``index`` and how many regions were skipped (no
    stored tile's centre in the box, the slide not in the index, re-tiled since)."""
    out = []
    for slide, x, y, w, h, _ in records:
        try:
            out.append(index.query_region(slide, (x, y, w, h)))
        except UNUSABLE:
            continue
    return out, len(records) - len(out)


def _vectors(index: SearchIndex, records: list[Record]) -> tuple[np.ndarray, int]:
    """The stored tile vectors of ``records``' regions, (N, D), and how many were skipped."""
    queries, skipped = _queries(index, records)
    return np.concatenate([q.vectors for q in queries] or [np.zeros((0, 1))]), skipped


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def concept_map(
    service: SlideService, book: LabelBook, slide: str, label: str, index: str | None = None
) -> tuple[bytes, int]:
    """PNG (RGBA, thumbnail size) of ``label``'s concept over ``slide`` by the tiles of index
    ``index`` (see the module doc), and how many labelled regions were skipped."""
    from PIL import Image, ImageDraw

    from wsi_ssl.serve.pyramid import encode

    searched = service.index_for(index)
    accepted_all, rejected_all = book.snapshot()  # one view for the vectors and the scale's key
    regions = (
        tuple(r for r in accepted_all if r[5] == label),
        tuple(r for r in rejected_all if r[5] == label),
    )
    accepted, skipped = _vectors(searched, list(regions[0]))
    if not len(accepted):
        raise ConfigError(_no_region(label, skipped, searched.name))
    rejected, skipped_rejected = _vectors(searched, list(regions[1]))
    store = service.store(slide, index)
    embeddings = service.archive.embeddings(store.slide_id, searched.encoder_id)
    embeddings = embeddings.embedded_only()  # tiles left out by QC at embed: not drawn
    score = _scores(np.asarray(embeddings.features), accepted, rejected)
    lo, hi = _archive_scale(service, searched, book, label, regions, (accepted, rejected))
    strength = np.clip((score - lo) / (hi - lo), 0.0, 1.0)
    h, w = store.thumbnail.shape[:2]
    image = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    f = w / float(store.source["dimensions"][0])
    side = float(store.tiling["tile_size_level0"]) * f
    for (x, y), a in zip(embeddings.coords, strength, strict=True):
        box = [x * f, y * f, x * f + side - 1, y * f + side - 1]
        draw.rectangle(box, fill=(230, 40, 20, round(200 * float(a))))
    return encode(image, "png"), skipped + skipped_rejected


def _scores(features: np.ndarray, accepted: np.ndarray, rejected: np.ndarray) -> np.ndarray:
    """Each tile's best cosine similarity to ``accepted`` minus its best to ``rejected``."""
    feats = _unit(features)
    score = (feats @ _unit(accepted).T).max(axis=1)
    if len(rejected):
        score = score - (feats @ _unit(rejected).T).max(axis=1)
    return score


def _archive_scale(
    service: SlideService,
    index: SearchIndex,
    book: LabelBook,
    label: str,
    regions: tuple[tuple[Record, ...], tuple[Record, ...]],
    vectors: tuple[np.ndarray, np.ndarray],
) -> tuple[float, float]:
    """(median, 99th percentile) of the scores of a sample of the index's tiles (evenly
    spread over at most ``SCALE_SLIDES`` slides, ``SCALE_SAMPLE`` tiles) against the
    ``vectors`` (accepted, rejected) of the label's ``regions``, kept until those regions or
    the index change."""
    key = (index.name, index.n_vectors, *regions)
    accepted, rejected = vectors
    kept = book.scales.get((label, index.name))
    if kept is not None and kept[0] == key:
        return kept[1]
    slide_ids = list(dict.fromkeys(e.slide_id for e in index.entries if e.active))
    if len(slide_ids) > SCALE_SLIDES:
        slide_ids = [
            slide_ids[i] for i in np.linspace(0, len(slide_ids) - 1, SCALE_SLIDES).astype(int)
        ]
    per_slide = max(1, SCALE_SAMPLE // max(1, len(slide_ids)))
    sample = []
    for slide_id in slide_ids:
        try:  # a slide being re-tiled or re-embedded is left out of the sample
            emb = service.archive.embeddings(slide_id, index.encoder_id, lazy=True)
            emb = emb.embedded_only()
            if len(emb.features):
                rows = np.unique(np.linspace(0, len(emb.features) - 1, per_slide).astype(int))
                sample.append(np.asarray(emb.features[rows], dtype=np.float32))
        except (WsiSslError, OSError, KeyError, ValueError, RuntimeError):  # RuntimeError:
            continue  # a chunk failing its checksum, read lazily
    if sample:
        scores = _scores(np.concatenate(sample), accepted, rejected)
        lo, hi = (float(v) for v in np.percentile(scores, [50, 99]))
    else:  # nothing to measure on: the raw score, 0 (no likeness) to 1
        lo, hi = 0.0, 1.0
    book.scales[label, index.name] = (key, (lo, max(hi, lo + 1e-6)))
    return book.scales[label, index.name][1]


def _inside(hit: dict[str, Any], record: Record, dimensions: tuple[int, int]) -> bool:
    """Whether the centre of the hit tile's part on the slide lies in ``record``'s box (as a
    region query picks its tiles)."""
    slide, x, y, w, h, _ = record
    tx, ty, size, _ = hit["tile_box"]
    (cx,), (cy,) = on_slide_centres(np.array([[tx, ty]]), size, dimensions)
    return bool(hit["slide_id"] == slide and x <= cx < x + w and y <= cy < y + h)
