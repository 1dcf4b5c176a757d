"""``wsi-ssl tile`` options for regions of interest, annotation labels and tile QC."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from wsi_ssl.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """ROI and QC flags; their dest names are ``TilingConfig`` fields."""
    g = p.add_argument_group("regions of interest and tile QC")
    g.add_argument(
        "--roi",
        metavar="FILE",
        help="annotations restricting the tiles: QuPath GeoJSON or ASAP XML (level-0 pixels), "
        "or a PNG/NPY/TIFF/JPEG mask of the whole slide at any scale (a label mask: a class per value); "
        "their classes are stored per tile as labels/annotations",
    )
    g.add_argument("--roi-csv", type=Path, help="CSV with columns slide,roi (per-slide files)")
    g.add_argument(
        "--roi-include", action="append", metavar="CLASS", help="class to tile (repeatable)"
    )
    g.add_argument(
        "--roi-exclude",
        action="append",
        metavar="CLASS",
        help="class cut out of the region (repeatable); the region is the included classes "
        "(default: all others of the file), or the whole slide when the file holds no other",
    )
    g.add_argument(
        "--roi-min-fraction", type=float, help="tile area inside the ROI to keep it (default 0.5)"
    )
    g.add_argument(
        "--no-qc", dest="qc", action="store_false", default=None, help="do not score tiles"
    )
    g.add_argument("--qc-min-focus", type=float, help="flag tiles less sharp (default 200)")
    g.add_argument("--qc-max-pen", type=float, help="flag tiles with more ink (default 0.1)")
    g.add_argument("--qc-min-tissue", type=float, help="flag tiles with less tissue (default 0.05)")
    g.add_argument("--qc-max-dark", type=float, help="flag darker tiles, folds (default 0.5)")


def read_roi_csv(path: Path) -> dict[str, str]:
    """slide (file name or path) -> annotation file; relative files are from the CSV's folder."""
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the ROI CSV ({err})") from err
    if rows and not {"slide", "roi"} <= set(rows[0]):
        raise ConfigError(f"{path}: the ROI CSV needs columns 'slide' and 'roi'")
    return {r["slide"]: str(path.parent / r["roi"]) for r in rows if r.get("roi")}
