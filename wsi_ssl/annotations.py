"""Annotations and regions of interest: QuPath GeoJSON, ASAP XML and binary masks.

An annotation file becomes a set of named classes, each a shapely geometry in level-0 pixel
coordinates (polygons with holes, unions of overlapping annotations) or, for a mask image, a
raster. :func:`rasterize` draws every class on the tissue mask's grid, so the tiling stage
can restrict tiles to a region (:func:`roi_region`) and store per-tile class fractions
(:func:`class_fractions`) with the same summed-area arithmetic as the tissue fraction.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_ssl.annotation_fit import check_mask_shape, roi_notes
from wsi_ssl.config import TilingConfig
from wsi_ssl.errors import AnnotationError, ConfigError
from wsi_ssl.listing import first_few
from wsi_ssl.mask_images import MASK_SUFFIXES, area_fractions, read_mask
from wsi_ssl.tissue import tissue_fraction

__all__ = [
    "Annotations",
    "TileLabels",
    "class_fractions",
    "label_tiles",
    "rasterize",
    "read_annotations",
    "restrict_to_roi",
    "roi_region",
]

UNCLASSIFIED = "annotation"
"""Class of annotations without a classification (QuPath) or group (ASAP)."""
MASK_CLASS = "mask"
"""Class of the foreground of a binary mask image (a label mask's classes are its values)."""


@dataclass(frozen=True)
class Annotations:
    """Named classes of one annotation file.

    Attributes:
        path: the file they were read from.
        geometries: class name -> shapely geometry in level-0 pixels (vector files).
        mask: integer or boolean (h, w) mask image spanning the whole slide, else None: the nonzero
            pixels of a binary mask (boolean, 0 and 255, or lossy JPEG) are the class "mask";
            in a label mask (other integer values) each value is a class named by it ("1",
            "2", ...), so a slide whose label mask holds value 1 alone still has class "1".
        mask_values: the mask's nonzero values, ascending.
        binary: the mask is a binary one.
        left_out: QuPath objects of the file that are not annotations (detections, cells,
            tiles), left out of the classes.
    """

    path: Path
    geometries: dict[str, Any]
    mask: np.ndarray | None = None
    mask_values: tuple[int, ...] = ()
    binary: bool = False
    left_out: int = 0

    @property
    def classes(self) -> tuple[str, ...]:
        if self.mask is None:
            return tuple(self.geometries)
        if self.binary or not self.mask_values:
            return (MASK_CLASS,)
        return tuple(map(str, self.mask_values))


def read_annotations(path: str | Path) -> Annotations:
    """Read QuPath GeoJSON (``.geojson``/``.json``), ASAP XML (``.xml``) or a mask image.

    A mask image (PNG, TIFF, JPEG or a 2-D ``.npy``) is nonzero on the region and covers the
    whole slide at any scale. Of a QuPath export only annotations are read, not detections.

    Raises:
        AnnotationError: missing, unreadable or malformed file, or a file with no polygon.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(path, "no such annotation file; check the path")
    suffix, left_out = path.suffix.lower(), 0
    try:
        if suffix in (".geojson", ".json"):
            geometries, left_out = _read_geojson(path)
        elif suffix == ".xml":
            geometries = _read_asap(path)
        elif suffix in MASK_SUFFIXES:
            mask = read_mask(path)
            values = tuple(int(v) for v in np.unique(mask) if v != 0)
            binary = mask.dtype == bool or values == (255,)
            return Annotations(path, {}, mask, values, binary)
        else:
            raise AnnotationError(
                path,
                "unknown annotation format; use QuPath GeoJSON (.geojson), ASAP XML (.xml) or "
                f"a mask image ({', '.join(MASK_SUFFIXES)})",
            )
    except AnnotationError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError, ET.ParseError) as err:
        raise AnnotationError(path, f"cannot be read ({type(err).__name__}: {err})") from err
    if not geometries:
        others = f"; {left_out} QuPath detection(s) or cell(s) are not read" if left_out else ""
        raise AnnotationError(path, f"holds no polygon annotation (points, lines ignored{others})")
    return Annotations(path, geometries, left_out=left_out)


def _union_by_class(items: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Valid polygonal parts of each geometry, unioned per class (sorted by name)."""
    import shapely

    parts: dict[str, list[Any]] = {}
    for name, geometry in items:
        geometry = shapely.make_valid(geometry)
        polygons = [
            g for g in shapely.get_parts(geometry) if g.geom_type in ("Polygon", "MultiPolygon")
        ]
        if polygons and not all(p.is_empty for p in polygons):
            parts.setdefault(name, []).extend(polygons)
    return {name: shapely.union_all(parts[name]) for name in sorted(parts)}


def _read_geojson(path: Path) -> tuple[dict[str, Any], int]:
    """QuPath export: a FeatureCollection, a Feature, a list of Features or a bare geometry;
    its annotations by class, and how many other objects (detections, cells) it held."""
    from shapely.geometry import shape

    data = json.loads(path.read_text())
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features", [])
    elif isinstance(data, list):
        features = data
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, dict) and "coordinates" in data:
        features = [{"type": "Feature", "geometry": data, "properties": {}}]
    else:
        raise AnnotationError(path, "not GeoJSON: expected a FeatureCollection or Features")
    items, left_out = [], 0
    for feature in features:
        if not isinstance(feature, dict) or not feature.get("geometry"):
            continue
        properties = feature.get("properties") or {}
        if properties.get("objectType", "annotation") != "annotation":  # "detection", "cell"
            left_out += 1
            continue
        items.append((_qupath_class(properties), shape(feature["geometry"])))
    return _union_by_class(items), left_out


def _qupath_class(properties: dict[str, Any]) -> str:
    """QuPath's ``classification`` (``{"name": ...}``, a derived class's ``{"names": [...]}``
    joined as QuPath shows it, "Tumor: Positive", or a string); else unclassified."""
    classification = properties.get("classification")
    if isinstance(classification, dict) and classification.get("name"):
        return str(classification["name"])
    if isinstance(classification, dict) and classification.get("names"):
        return ": ".join(map(str, classification["names"]))
    if isinstance(classification, str) and classification:
        return classification
    return UNCLASSIFIED


def _read_asap(path: Path) -> dict[str, Any]:
    """ASAP XML: ``Annotation`` elements (Polygon, Spline, Rectangle) grouped by
    ``PartOfGroup``; dots and point sets are ignored."""
    from shapely.geometry import Polygon

    root = ET.parse(path).getroot()
    if root.tag != "ASAP_Annotations":
        raise AnnotationError(path, f"not ASAP XML: root element is <{root.tag}>")
    items = []
    for annotation in root.iter("Annotation"):
        if annotation.get("Type", "Polygon") not in ("Polygon", "Spline", "Rectangle"):
            continue
        points = sorted(
            annotation.iter("Coordinate"), key=lambda c: float(c.get("Order", "0") or 0)
        )
        xy = [(_coordinate(c.attrib["X"]), _coordinate(c.attrib["Y"])) for c in points]
        if len(xy) < 3:
            continue
        group = annotation.get("PartOfGroup") or "None"
        items.append((UNCLASSIFIED if group == "None" else group, Polygon(xy)))
    return _union_by_class(items)


def _coordinate(text: str) -> float:
    """An ASAP coordinate; some locales write a decimal comma (``768,5``)."""
    return float(text.replace(",", ".") if "." not in text else text)


def rasterize(
    annotations: Annotations,
    shape: tuple[int, int],
    level0_per_px: float,
    classes: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Each class drawn on an (h, w) grid of ``level0_per_px`` level-0 pixels per pixel.

    A pixel is in a polygon when its centre is (holes excluded); a mask image is resampled
    to the grid by nearest neighbour (it spans the whole slide whatever its size).

    Returns:
        class name -> bool (h, w), for ``classes`` (default: all).
    """
    names = annotations.classes if classes is None else tuple(classes)
    if annotations.mask is not None:
        return _mask_classes(_resample_mask(annotations.mask, shape), names)
    return {name: _draw(annotations.geometries[name], shape, level0_per_px) for name in names}


def _mask_classes(mask: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    if tuple(names) == (MASK_CLASS,):
        return {MASK_CLASS: mask != 0}
    return {name: mask == int(name) for name in names}


def _resample_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    rows, cols = (
        np.minimum(((np.arange(n) + 0.5) * m / n).astype(np.int64), m - 1)
        for n, m in zip(shape, mask.shape, strict=True)
    )
    return mask[np.ix_(rows, cols)]


def _draw(geometry: Any, shape: tuple[int, int], level0_per_px: float) -> np.ndarray:
    """Pixel-centre rasterisation of polygons with holes (even-odd within each polygon)."""
    import shapely
    from skimage.draw import polygon as fill

    out = np.zeros(shape, dtype=bool)
    for part in shapely.get_parts(geometry):
        if part.geom_type != "Polygon" or part.is_empty:
            continue
        inside = np.zeros(shape, dtype=bool)
        for k, ring in enumerate([part.exterior, *part.interiors]):
            xy = np.asarray(ring.coords) / level0_per_px - 0.5  # pixel j's centre is at j
            rr, cc = fill(xy[:, 1], xy[:, 0], shape=shape)
            inside[rr, cc] = k == 0
        out |= inside
    return out


def roi_region(
    rasters: dict[str, np.ndarray],
    include: Sequence[str],
    exclude: Sequence[str],
    path: str | Path,
) -> np.ndarray:
    """Where tiles may be cut: the ``include`` classes (default: every class not excluded;
    the whole slide when all are excluded) minus the ``exclude`` classes (one the file does
    not hold excludes nothing: most slides of a batch have no artefact annotated).

    Raises:
        AnnotationError: a class named in ``include`` is not in the file.
    """
    unknown = [c for c in dict.fromkeys(include) if c not in rasters]
    if unknown:
        raise AnnotationError(
            path,
            f"no annotation class {', '.join(map(repr, unknown))} (roi_include); "
            f"the file holds {', '.join(map(repr, rasters))}",
            parameters=("roi_include",),
        )
    shape = next(iter(rasters.values())).shape
    chosen = list(include) or [c for c in rasters if c not in exclude]
    region = np.zeros(shape, dtype=bool) if chosen else np.ones(shape, dtype=bool)
    for name in chosen:
        region |= rasters[name]
    for name in exclude:
        if name in rasters:
            region &= ~rasters[name]
    return region


def check_classes_named(
    paths: Iterable[str | Path], include: Sequence[str], exclude: Sequence[str]
) -> None:
    """Refuse, before a batch starts, a class in ``include``/``exclude`` that none of its
    annotation files holds (a misspelling); files that cannot be read are left to their
    slides' own errors.

    Raises:
        ConfigError: such a class, with the classes the files hold.
    """
    held: dict[str, None] = {}
    files = list(dict.fromkeys(str(p) for p in paths))
    for path in files:
        try:
            held.update(dict.fromkeys(read_annotations(path).classes))
        except AnnotationError:
            continue
    unknown = [c for c in dict.fromkeys([*include, *exclude]) if c not in held]
    if held and unknown:
        raise ConfigError(
            f"no annotation file of this batch ({first_few(files, 3)}) holds class "
            f"{', '.join(map(repr, unknown))} "
            f"(roi_include/roi_exclude); they hold {', '.join(map(repr, held))}",
            parameters=("roi_include", "roi_exclude"),
        )


def class_fractions(
    rasters: dict[str, np.ndarray],
    coords: np.ndarray,
    tile_size_level0: float,
    level0_per_px: float,
) -> np.ndarray:
    """float32 (N, C): the fraction of each tile's square covered by each class, in the
    order of ``rasters``."""
    columns = [
        tissue_fraction(raster, coords, tile_size_level0, level0_per_px)
        for raster in rasters.values()
    ]
    if not columns:
        return np.zeros((len(coords), 0), dtype=np.float32)
    return np.stack(columns, axis=1).astype(np.float32)


@dataclass(frozen=True)
class TileLabels:
    """What an annotation file says about each tile of a grid.

    Attributes:
        classes: class names, the columns of ``fractions``.
        fractions: float32 (N, C), each tile's area fraction covered by each class.
        in_roi: float32 (N,), each tile's area fraction inside the region of interest.
        notes: what the tiling's report should say of the file (:func:`roi_notes`).
    """

    classes: tuple[str, ...]
    fractions: np.ndarray
    in_roi: np.ndarray
    notes: tuple[str, ...] = ()


def label_tiles(
    path: str | Path,
    coords: np.ndarray,
    tile_size_level0: float,
    grid_shape: tuple[int, int],
    level0_per_px: float,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> TileLabels:
    """Read an annotation file and measure its classes and region on each tile: polygons on
    the raster, and exactly on the tiles an edge crosses (a raster pixel of 16 level-0 px
    counts whole: an edge tile read 0.83-0.94 inside, 0.06-0.17 outside); a mask image by
    the exact area of its own pixels (:func:`wsi_ssl.mask_images.area_fractions`). A region
    of the whole slide (every class excluded) has no edge at the slide's: a tile's part off
    the slide is not cut out of it, as it is not out of a tiling without a ROI.

    Args:
        path: QuPath GeoJSON, ASAP XML or a mask image.
        coords: int64 (N, 2) level-0 top-left corners of the tiles.
        tile_size_level0: tile edge in level-0 pixels.
        grid_shape: (h, w) of the raster the classes are drawn on (the tissue mask's).
        level0_per_px: level-0 pixels per raster pixel.
        include: classes that make the region (default: all not excluded).
        exclude: classes cut out of the region.

    Raises:
        AnnotationError: unreadable file, or unknown class names.
    """
    annotations = read_annotations(path)
    if annotations.mask is not None:
        return _label_tiles_on_mask(
            annotations, coords, tile_size_level0, grid_shape, level0_per_px, include, exclude
        )
    rasters = rasterize(annotations, grid_shape, level0_per_px)
    region = roi_region(rasters, include, exclude, annotations.path)
    fractions = class_fractions(rasters, coords, tile_size_level0, level0_per_px)
    geometries = annotations.geometries  # tiles across an edge measured exactly
    for c, name in enumerate(geometries):
        fractions[:, c] = _exact_across_edges(
            fractions[:, c], geometries[name], coords, tile_size_level0
        )
    chosen = list(include) or [c for c in geometries if c not in exclude]
    cut = _union(geometries, exclude)  # no class chosen: the whole slide, measured by the cut
    raster, exact = (region, _union(geometries, chosen) - cut) if chosen else (~region, cut)
    share = tissue_fraction(raster, coords, tile_size_level0, level0_per_px)
    share = _exact_across_edges(share, exact, coords, tile_size_level0)
    in_roi = share if chosen else 1 - share
    notes = roi_notes(annotations, grid_shape[1] * level0_per_px, grid_shape[0] * level0_per_px)
    return TileLabels(annotations.classes, fractions, in_roi, notes)


def _label_tiles_on_mask(
    annotations: Annotations,
    coords: np.ndarray,
    tile_size_level0: float,
    grid_shape: tuple[int, int],
    level0_per_px: float,
    include: Sequence[str],
    exclude: Sequence[str],
) -> TileLabels:
    """:func:`label_tiles` for a mask image: exact areas on the mask's own pixels."""
    assert annotations.mask is not None
    mask = annotations.mask
    check_mask_shape(annotations.path, mask.shape, grid_shape)
    rasters = _mask_classes(mask, annotations.classes)
    region = roi_region(rasters, include, exclude, annotations.path)
    per_px = (
        grid_shape[1] * level0_per_px / mask.shape[1],
        grid_shape[0] * level0_per_px / mask.shape[0],
    )
    columns = [area_fractions(r, coords, tile_size_level0, per_px) for r in rasters.values()]
    fractions = np.stack(columns, axis=1) if columns else np.zeros((len(coords), 0), np.float32)
    chosen = list(include) or [c for c in rasters if c not in exclude]  # none: whole slide
    share = area_fractions(region if chosen else ~region, coords, tile_size_level0, per_px)
    in_roi = share if chosen else 1 - share
    return TileLabels(classes=annotations.classes, fractions=fractions, in_roi=in_roi)


def _union(geometries: dict[str, Any], names: Sequence[str]) -> Any:
    """The union of the classes ``names`` the file holds (empty when it holds none)."""
    import shapely

    return shapely.union_all([geometries[c] for c in names if c in geometries])


def _exact_across_edges(
    on_raster: np.ndarray, geometry: Any, coords: np.ndarray, tile_size_level0: float
) -> np.ndarray:
    """Tile fractions measured on the raster, with those strictly between 0 and 1 (the tiles
    an edge crosses on the raster grid, where a raster pixel counts whole) replaced by the
    geometry's exact share of the tile's square."""
    import shapely

    out = np.array(on_raster, dtype=np.float32)
    edge = np.flatnonzero((out > 0) & (out < 1))
    if len(edge):
        x, y = coords[edge, 0].astype(float), coords[edge, 1].astype(float)
        boxes = shapely.box(x, y, x + tile_size_level0, y + tile_size_level0)
        shapely.prepare(geometry)
        area = shapely.area(shapely.intersection(boxes, geometry))
        out[edge] = np.clip(area / tile_size_level0**2, 0.0, 1.0)
    return out


def restrict_to_roi(
    config: TilingConfig,
    keep: np.ndarray,
    coords: np.ndarray,
    tile_size_level0: float,
    grid_shape: tuple[int, int],
    level0_per_px: float,
) -> tuple[np.ndarray, TileLabels | None]:
    """``keep`` narrowed to tiles inside ``config.roi`` (by ``roi_min_fraction``), and the
    labels of every grid tile; ``keep`` as it is and None without a ROI.

    Raises:
        AnnotationError: unreadable file, unknown classes, or tissue tiles but none inside
            the region.
    """
    if config.roi is None:
        return keep, None
    labels = label_tiles(
        config.roi,
        coords,
        tile_size_level0,
        grid_shape,
        level0_per_px,
        include=config.roi_include,
        exclude=config.roi_exclude,
    )
    inside = keep & (labels.in_roi > 0) & (labels.in_roi >= config.roi_min_fraction)
    if keep.any() and not inside.any():
        chosen = config.roi_include or [c for c in labels.classes if c not in config.roi_exclude]
        where = "" if labels.in_roi.any() else ", which covers no tile of the slide at all"
        raise AnnotationError(
            config.roi,
            f"no tissue tile has {config.roi_min_fraction:.0%} of its area in the region "
            f"(class(es) {', '.join(chosen) or 'all but ' + ', '.join(config.roi_exclude)}"
            f"{where}); check the file belongs to this slide and is in level-0 pixels, or "
            "lower roi_min_fraction",
            parameters=("roi", "roi_min_fraction"),
        )
    return inside, labels
