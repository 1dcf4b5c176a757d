"""Evaluation tasks and their labelled items, loaded once and shared by every encoder.

* :class:`PatchTask`: labelled images, a folder with one sub-folder per class or a CSV with
  ``path,label`` columns (paths relative to the CSV); k-NN and linear probes.
* :class:`TileLabelTask`: per-tile labels stored in the slide stores as ``labels/<name>``
  (an integer (N,) array of class indices, -1 for unlabelled tiles, or a float (N, C) array of
  class fractions, a tile taking the class of its largest fraction when it is at least 0.5;
  the class names in the array's ``classes`` attribute); k-NN and linear probes, folds grouped
  by slide.
* :class:`RegionLabelTask`: labelled boxes (``slide,x,y,w,h,label``, as the web page's label
  loop writes ``labels/regions.csv``): the tiles inside a box take its label; the same probes.
* :class:`SlideTask`: a slide labels CSV (``slide,label[,patient][,fold]``, as for
  ``wsi-ssl mil train``); cross-validated ABMIL.
* :class:`RetrievalTask`: the same kind of CSV; mMV@k and precision@k of the search index.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from wsi_ssl.errors import ConfigError, LabelsError
from wsi_ssl.listing import first_few

if TYPE_CHECKING:
    from wsi_ssl.mil.labels import LabelRow, LabelTable
    from wsi_ssl.storage import Archive

__all__ = [
    "IMAGE_SUFFIXES",
    "LabelledImages",
    "LabelledSlides",
    "LabelledTiles",
    "PatchTask",
    "RegionLabelTask",
    "RetrievalTask",
    "SlideTask",
    "Task",
    "TileLabelTask",
    "check_tile_labels",
    "image_items",
    "load_images",
    "load_slide_labels",
    "load_tile_labels",
    "sample_tiles",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})


@dataclass(frozen=True)
class PatchTask:
    """Patch classification from labelled images (a class-per-folder tree or a CSV)."""

    source: Path
    name: str = ""

    kind = "patch"


@dataclass(frozen=True)
class TileLabelTask:
    """Patch classification from ``labels/<labels>`` arrays in the stores under ``root``."""

    root: Path
    labels: str
    name: str = ""

    kind = "tiles"


@dataclass(frozen=True)
class RegionLabelTask:
    """Patch classification from labelled level-0 boxes, ``slide,x,y,w,h,label`` (the web
    page's ``labels/regions.csv``): a stored tile whose centre (of its part on the slide) lies in a box takes its label
    (:func:`wsi_ssl.evaluation.regions.load_region_labels`)."""

    root: Path
    regions: Path
    name: str = ""

    kind = "tiles"


@dataclass(frozen=True)
class _SlideLabelsTask:
    """A task over the slides a slide labels CSV names under ``root``."""

    root: Path
    labels: Path
    name: str = ""


class SlideTask(_SlideLabelsTask):
    """Slide classification (cross-validated ABMIL) from a slide labels CSV."""

    kind = "slide"


class RetrievalTask(_SlideLabelsTask):
    """Slide retrieval (mMV@k and precision@k, with intervals over slides) with the labels
    of a slide labels CSV."""

    kind = "retrieval"


Task = PatchTask | TileLabelTask | RegionLabelTask | SlideTask | RetrievalTask


def task_name(task: Task) -> str:
    """The task's name, or one made from its source (``<kind>:<file or folder stem>``)."""
    if task.name:
        return task.name
    if isinstance(task, PatchTask):
        return f"patch:{Path(task.source).stem}"
    if isinstance(task, TileLabelTask):
        return f"tiles:{task.labels}"
    if isinstance(task, RegionLabelTask):
        return f"regions:{Path(task.regions).stem}"
    return f"{task.kind}:{Path(task.labels).stem}"


def _check_classes(where: str | Path, labels: list[str], unit: str, minimum: int = 2) -> None:
    counts = Counter(labels)
    if len(counts) < 2:
        only = next(iter(counts), "none")
        raise LabelsError(
            where,
            f"only one class ({only!r}) among {len(labels)} labelled {unit}(s); comparing "
            "encoders on a classification task needs at least two classes",
        )
    small = {c: n for c, n in sorted(counts.items()) if n < minimum}
    if small:
        raise LabelsError(
            where,
            f"class(es) {small} have fewer than {minimum} {unit}s; scoring a class needs at "
            f"least {minimum} of it (one to query, one to find or to train on: label more "
            f"{unit}s or drop the class)",
        )


@dataclass(frozen=True)
class LabelledImages:
    """The images of a :class:`PatchTask`: uint8 RGB arrays of any sizes and their labels."""

    paths: tuple[str, ...]
    images: tuple[np.ndarray, ...] = field(repr=False)
    y: np.ndarray = field(repr=False)
    classes: tuple[str, ...]


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as err:
        raise ConfigError(f"{path}: not a readable image ({err})") from err


def _folder_items(folder: Path) -> list[tuple[Path, str]]:
    items = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        items += [
            (p, sub.name)
            for p in sorted(sub.iterdir())
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        ]
    return items


def _csv_items(path: Path) -> list[tuple[Path, str]]:
    try:
        rows = list(csv.DictReader(path.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError) as err:
        raise LabelsError(path, f"cannot read labels CSV ({err})") from err
    if not rows or not {"path", "label"} <= {k.strip().lower() for k in rows[0] if k}:
        raise LabelsError(path, "expected a header with columns path,label and rows below it")
    items = []
    for line, row in enumerate(rows, start=2):
        cells = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
        if not cells["path"] or not cells["label"]:
            raise LabelsError(path, f"empty path or label on line {line}", [line])
        image = Path(cells["path"])
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise LabelsError(path, f"line {line}: no such image {image}", [line])
        items.append((image, cells["label"]))
    return items


def image_items(source: str | Path) -> list[tuple[Path, str]]:
    """The images of a class-per-folder tree or a ``path,label`` CSV and their labels,
    checked (at least two classes, two images each) without reading an image.

    Raises:
        ConfigError: ``source`` does not exist, or a folder holds no images.
        LabelsError: a bad CSV, one class only, or a class with fewer than 2 images.
    """
    source = Path(source)
    if source.is_dir():
        items = _folder_items(source)
        if not items:
            raise ConfigError(
                f"{source}: no images in its sub-folders (one sub-folder of images per class, "
                f"{', '.join(sorted(IMAGE_SUFFIXES))})"
            )
    elif source.is_file():
        items = _csv_items(source)
    else:
        raise ConfigError(
            f"{source}: no such folder (one sub-folder of images per class) or CSV (path,label)"
        )
    _check_classes(source, [label for _, label in items], "image")
    return items


def load_images(source: str | Path) -> LabelledImages:
    """The labelled images of a class-per-folder tree or a ``path,label`` CSV.

    Raises:
        ConfigError: ``source`` does not exist, a folder holds no images, or an image cannot
            be read.
        LabelsError: a bad CSV, one class only, or a class with fewer than 2 images.
    """
    items = image_items(source)
    classes = tuple(sorted({label for _, label in items}))
    return LabelledImages(
        paths=tuple(str(p) for p, _ in items),
        images=tuple(_read_rgb(p) for p, _ in items),
        y=np.array([classes.index(label) for _, label in items], dtype=np.int64),
        classes=classes,
    )


@dataclass(frozen=True)
class LabelledTiles:
    """The labelled tiles of a :class:`TileLabelTask`: per slide, the rows kept."""

    rows: dict[str, np.ndarray] = field(repr=False)  # slide id -> tile rows, in slide order
    y: np.ndarray = field(repr=False)  # class of each kept tile, slides in ``rows`` order
    groups: np.ndarray = field(repr=False)  # slide of each kept tile
    classes: tuple[str, ...]

    def without(self, slides: set[str], where: str | Path) -> LabelledTiles:
        """The same tiles less those of ``slides`` (e.g. slides that failed to embed)."""
        gone = [i for i, sid in enumerate(self.rows) if sid in slides]
        keep = ~np.isin(self.groups, gone)
        _check_classes(where, [self.classes[c] for c in self.y[keep]], "tile")
        rows = {sid: r for sid, r in self.rows.items() if sid not in slides}
        return LabelledTiles(rows, self.y[keep], self.groups[keep], self.classes)


def _tile_classes(array: object, where: Path) -> tuple[np.ndarray, list[str]]:
    import zarr

    assert isinstance(array, zarr.Array)
    names = array.attrs.get("classes", [])
    classes = [str(c) for c in names] if isinstance(names, list) else []
    values = np.asarray(array[:])
    if values.ndim == 2:
        best = values.argmax(axis=1)
        return np.where(values.max(axis=1) >= 0.5, best, -1), classes
    if values.ndim == 1 and np.issubdtype(values.dtype, np.integer):
        return values.astype(np.int64), classes
    raise ConfigError(
        f"{where}: expected integer (N,) class indices or float (N, C) class fractions, got "
        f"{values.dtype} {values.shape}"
    )


def _tile_labels_of(archive: Archive, sid: str, name: str) -> object | None:
    """The ``labels/<name>`` array of the slide ``sid`` (None: it has none)."""
    import zarr

    node = archive.slide(sid).group.get("labels")
    return node[name] if isinstance(node, zarr.Group) and name in node else None


def _no_tile_labels(task: TileLabelTask) -> LabelsError:
    return LabelsError(
        task.root,
        f"no complete slide store holds labels/{task.labels}; tile with annotations first",
    )


def check_tile_labels(task: TileLabelTask) -> None:
    """Refuse, reading the stores until one has them, per-tile labels no store holds."""
    from wsi_ssl.storage import open_store

    archive = open_store(task.root)
    if not any(_tile_labels_of(archive, sid, task.labels) is not None for sid in archive.slide_ids):
        raise _no_tile_labels(task)


def load_tile_labels(task: TileLabelTask, max_per_class: int, seed: int) -> LabelledTiles:
    """Per-tile labels of every complete store that has ``labels/<name>``, at most
    ``max_per_class`` tiles per class (drawn with ``seed``)."""
    from wsi_ssl.storage import open_store

    archive = open_store(task.root)
    per_slide: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    classes: list[str] = []
    for sid in archive.slide_ids:
        array = _tile_labels_of(archive, sid, task.labels)
        if array is None:
            continue
        where = archive.store_path(sid) / "labels" / task.labels
        y, names = _tile_classes(array, where)
        if classes and names and names != classes:
            raise LabelsError(where, f"classes {names} differ from another slide's {classes}")
        classes = classes or names
        keep = np.flatnonzero(y >= 0)
        per_slide[sid] = (keep, y[keep])
    if not per_slide:
        raise _no_tile_labels(task)
    return sample_tiles(per_slide, classes, max_per_class, seed, task.root)


def sample_tiles(
    per_slide: dict[str, tuple[np.ndarray, np.ndarray]],
    classes: list[str],
    max_per_class: int,
    seed: int,
    where: str | Path,
) -> LabelledTiles:
    """At most ``max_per_class`` tiles per class (drawn with ``seed``) of ``per_slide``:
    slide id -> (labelled tile rows, their class indices); ``classes`` names the indices
    (empty: the indices themselves).

    Raises:
        LabelsError: one class only, or a class with fewer than 2 tiles.
    """
    labels = np.concatenate([y for _, y in per_slide.values()])
    slides = np.concatenate([np.full(len(r), i) for i, (r, _) in enumerate(per_slide.values())])
    rows = np.concatenate([r for r, _ in per_slide.values()])
    rng = np.random.default_rng(seed)
    picked = np.sort(
        np.concatenate(
            [
                rng.permutation(np.flatnonzero(labels == c))[:max_per_class]
                for c in np.unique(labels)
            ]
        )
    )
    names = classes or [str(c) for c in range(int(labels.max()) + 1)]
    _check_classes(where, [names[c] for c in labels[picked]], "tile")
    ids = list(per_slide)
    return LabelledTiles(
        rows={sid: rows[picked][slides[picked] == i] for i, sid in enumerate(ids)},
        y=labels[picked],
        groups=slides[picked],
        classes=tuple(names),
    )


@dataclass(frozen=True)
class LabelledSlides:
    """The labelled slides of a slide or retrieval task, resolved to slide ids."""

    table: LabelTable  # rows name slides by id; ``fold`` filled in when the CSV has it
    unmatched: tuple[LabelRow, ...]  # CSV rows whose slide matches no complete store
    ambiguous: tuple[LabelRow, ...] = ()  # CSV rows whose slide matches several stores

    @property
    def slide_ids(self) -> list[str]:
        return [r.slide for r in self.table.rows]

    def left_out(self, root: str | Path) -> list[str]:
        """Notes naming the rows left out (the first few, with their CSV lines), worded as
        ``wsi-ssl mil train --skip-missing`` words them."""
        out = []
        for what, rows in (
            (f"with no complete store under {root}", self.unmatched),
            ("naming several stores (name them by slide id)", self.ambiguous),
        ):
            if rows:
                shown = first_few(f"{r.slide!r} (line {r.line})" for r in rows)
                out.append(f"left out {len(rows)} labelled slide(s) {what}: {shown}")
        return out


def load_slide_labels(root: str | Path, labels: str | Path) -> LabelledSlides:
    """Read a slide labels CSV and resolve its names to the slide ids under ``root``.

    Raises:
        LabelsError: a bad CSV, no row matching a slide of the archive, or one class among
            the slides that match.
    """
    import dataclasses

    from wsi_ssl.mil.labels import LabelTable, read_labels
    from wsi_ssl.mil.matching import slide_file_names
    from wsi_ssl.storage import open_store
    from wsi_ssl.storage.resolve import slide_matches, slide_names

    table = read_labels(labels)
    archive = open_store(root)
    complete = archive.slide_ids
    names, keys = slide_file_names(archive, complete), slide_names(archive, complete)
    rows: list[LabelRow] = []
    unmatched: list[LabelRow] = []
    ambiguous: list[LabelRow] = []
    for r in table.rows:
        ids = slide_matches(keys, complete, r.slide)
        if len(ids) == 1:
            rows.append(dataclasses.replace(r, slide=next(iter(ids))))
        else:
            (ambiguous if ids else unmatched).append(r)
    if not rows and ambiguous:
        raise LabelsError(
            labels,
            f"{len(ambiguous)} of its {len(table.rows)} slide(s) name several stores each (e.g. "
            f"{ambiguous[0].slide!r}, line {ambiguous[0].line}) and none names exactly one; "
            "name those slides by id",
        )
    if not rows:
        have = first_few(sorted(names.values())) or "none"
        raise LabelsError(
            labels,
            f"none of its {len(table.rows)} slide(s) (e.g. {table.rows[0].slide!r}) is a "
            f"complete slide store under {root} (slides there: {have}); name slides by id, "
            "file name, stem or path",
        )
    _check_classes(labels, [r.label for r in rows], "slide")
    table = LabelTable(str(labels), rows, table.columns)
    return LabelledSlides(table, tuple(unmatched), tuple(ambiguous))
