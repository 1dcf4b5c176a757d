"""What a tiling batch checks before its first slide, so a bad argument or a damaged archive
is one error, not one per slide."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from wsi_ssl.config import TilingConfig
from wsi_ssl.errors import ConfigError
from wsi_ssl.listing import first_few
from wsi_ssl.tiling.slide_table import SlideTable

__all__ = ["check_batch", "check_output"]


def check_output(root: Path, config: object) -> None:
    """Refuse settings that are not a ``TilingConfig`` (a dict failed deep inside as an
    AttributeError) and an output folder that is a file (it failed at the lock file).

    Raises:
        ConfigError: either.
    """
    if not isinstance(config, TilingConfig):
        raise ConfigError(
            f"the tiling settings must be a TilingConfig, got {type(config).__name__} "
            "(a dict of settings: TilingConfig(**settings))"
        )
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root}: is a file; the archive root must be a folder (new or not)")


def check_batch(
    roots: Sequence[Path],
    config: TilingConfig,
    paths: Sequence[Path],
    rois: Mapping[str, str] | None,
    roi_files: SlideTable[str],
) -> None:
    """Refuse a batch that would fail every slide alike.

    ``roots`` is the archive root of each scale (the output folder itself for one scale).

    Raises:
        ConfigError: ROI classes chosen without an annotation file (for the batch, or with
            ``roi_include`` for one of its slides), or naming a class none of the batch's files
            holds.
        AnnotationError: the batch's annotation file (``roi``) cannot be read.
        CatalogCorruptError: an existing archive's catalog cannot be read (every slide's
            record would fail); ``wsi-ssl check ROOT --repair`` rebuilds it.
    """
    from wsi_ssl.storage import Catalog

    for scale_root in roots:
        if (scale_root / "catalog.sqlite").is_file():
            Catalog(scale_root / "catalog.sqlite").entries()
    if not (config.roi or rois) and config.roi_min_fraction != TilingConfig().roi_min_fraction:
        raise ConfigError(
            "roi_min_fraction is the share of a tile inside an annotation file's region: give "
            "the file (roi, or rois per slide), or leave roi_min_fraction out",
            parameters=("roi", "roi_min_fraction"),
        )
    if config.roi:  # one file for every slide: unreadable, it would fail each alike
        from wsi_ssl.annotations import read_annotations
        from wsi_ssl.errors import AnnotationError

        try:
            read_annotations(config.roi)
        except AnnotationError as err:
            err.parameters = ("roi",)
            raise
    if not (config.roi_include or config.roi_exclude):
        return
    if not (config.roi or rois):
        raise ConfigError(
            "roi_include / roi_exclude choose classes of an annotation file: give one (roi, or "
            "rois per slide)",
            parameters=("roi", "roi_include", "roi_exclude"),
        )
    from wsi_ssl.annotations import check_classes_named  # a misspelt class: before any slide

    files = [roi_files.get(p, config.roi) for p in paths]
    bare = [str(p) for p, f in zip(paths, files, strict=True) if not f]
    if config.roi_include and bare:  # tiled whole, though only some classes were asked for
        raise ConfigError(
            f"roi_include keeps the named classes of each slide's annotation file, but "
            f"{len(bare)} slide(s) have none (no row of the ROI table names them, or its roi "
            f"is empty): {first_few(bare)}; add their rows, or tile them in a batch of their own",
            parameters=("rois", "roi_include"),
        )
    check_classes_named([f for f in files if f], config.roi_include, config.roi_exclude)
