"""Per-tile labels from labelled boxes: ``slide,x,y,w,h,label`` (level-0 pixels).

This is the file the web page's label loop writes as ``<root>/labels/regions.csv`` (the
accepted regions). A stored tile whose centre lies in a box (``x <= cx < x + w``,
``y <= cy < y + h``; the centre of its part on the slide, as a region query places it) takes
the box's label; a tile inside boxes of two different labels is left
unlabelled. Slides are named as everywhere (:mod:`wsi_ssl.storage.resolve`: id, file name,
stem or unique id prefix).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from wsi_ssl.errors import LabelsError, UnknownSlideError
from wsi_ssl.evaluation.tasks import LabelledTiles, RegionLabelTask, sample_tiles
from wsi_ssl.listing import first_few

if TYPE_CHECKING:
    from wsi_ssl.storage import SlideStore

__all__ = ["REGION_COLUMNS", "Region", "load_region_labels", "read_regions"]

REGION_COLUMNS = ("slide", "x", "y", "w", "h", "label")
Region = tuple[str, int, int, int, int, str]
"""A labelled box: slide name, level-0 x, y, width, height, label."""


def read_regions(path: str | Path) -> list[tuple[int, Region]]:
    """The boxes of a regions CSV with their line numbers (the header is line 1).

    Raises:
        LabelsError: the file cannot be read, lacks a column, or a row has an empty slide or
            label, a non-integer coordinate or a box without area (the lines say which).
    """
    path = Path(path)
    try:
        rows = list(csv.DictReader(path.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError) as err:
        raise LabelsError(path, f"cannot read regions CSV ({err})") from err
    header = {k.strip().lower() for k in (rows[0] if rows else {}) if k}
    if not rows or not set(REGION_COLUMNS) <= header:
        raise LabelsError(path, f"expected a header with columns {','.join(REGION_COLUMNS)}")
    out, bad = [], []
    for line, row in enumerate(rows, start=2):
        cells = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
        try:
            x, y, w, h = (int(cells[c]) for c in ("x", "y", "w", "h"))
        except ValueError:
            bad.append(line)
            continue
        if not cells["slide"] or not cells["label"] or w <= 0 or h <= 0:
            bad.append(line)
            continue
        out.append((line, (cells["slide"], x, y, w, h, cells["label"])))
    if bad:
        raise LabelsError(
            path,
            f"lines {first_few(bad, 10)}: a region needs a slide, a label, integer "
            "x, y and a positive integer w, h",
            bad,
        )
    return out


def load_region_labels(task: RegionLabelTask, max_per_class: int, seed: int) -> LabelledTiles:
    """The tiles of ``task.root``'s complete stores inside the boxes of ``task.regions``, at
    most ``max_per_class`` per class (drawn with ``seed``).

    Raises:
        LabelsError: a bad file, boxes naming slides that are not in the archive, no box
            holding a tile's centre, or fewer than two classes (or 2 tiles per class) left.
    """
    from wsi_ssl.storage import open_store
    from wsi_ssl.storage.resolve import resolve_slide

    regions = read_regions(task.regions)
    classes = sorted({r[5] for _, r in regions})
    archive = open_store(task.root)
    by_slide: dict[str, list[Region]] = {}
    unknown = []
    for line, region in regions:
        try:
            by_slide.setdefault(resolve_slide(archive, region[0]), []).append(region)
        except UnknownSlideError:
            unknown.append(line)
    if unknown:
        raise LabelsError(
            task.regions,
            f"lines {first_few(unknown, 10)} name slides that are not complete "
            f"stores under {task.root}",
            unknown,
        )
    per_slide: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for sid, boxes in sorted(by_slide.items()):
        y = _tile_classes(archive.slide(sid), boxes, classes)
        keep = np.flatnonzero(y >= 0)
        if len(keep):
            per_slide[sid] = (keep, y[keep])
    if not per_slide:
        raise LabelsError(
            task.regions, f"no box holds the centre of a stored tile under {task.root}"
        )
    return sample_tiles(per_slide, classes, max_per_class, seed, task.regions)


def _tile_classes(store: SlideStore, boxes: list[Region], classes: list[str]) -> np.ndarray:
    """Each stored tile's class index (-1: in no box, or in boxes of two labels)."""
    from wsi_ssl.search.queries import on_slide_centres

    size = float(store.tiling["tile_size_level0"])
    centres = np.stack(on_slide_centres(store.coords, size, store.source["dimensions"]), axis=1)
    y = np.full(len(centres), -1, dtype=np.int64)
    clash = np.zeros(len(centres), dtype=bool)
    for _, x0, y0, w, h, label in boxes:
        inside = (
            (x0 <= centres[:, 0])
            & (centres[:, 0] < x0 + w)
            & (y0 <= centres[:, 1])
            & (centres[:, 1] < y0 + h)
        )
        c = classes.index(label)
        clash |= inside & (y >= 0) & (y != c)
        y[inside] = c
    y[clash] = -1
    return y
