"""The label files of :mod:`wsi_ssl.serve.labels` (``labels/regions.csv``, ``rejected.csv``
and the per-slide GeoJSON): read as a person or a spreadsheet saves them, written atomically."""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any

from wsi_ssl.errors import LabelsError
from wsi_ssl.storage.atomic import atomic_write_text

__all__ = ["COLUMNS", "Record", "Stamp", "csv_text", "geojson", "read_csv", "stamp", "write"]

COLUMNS = ("slide", "x", "y", "w", "h", "label")
Record = tuple[str, int, int, int, int, str]
Stamp = tuple[int, int, int] | None


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def stamp(path: Path) -> Stamp:
    """What tells a replaced file from the one read before (None: no file)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _whole(value: str | None, column: str) -> int:
    """A whole number as a person or a spreadsheet writes it ("898", "898.0")."""
    try:
        number = float((value or "").strip())
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"column {column} holds {(value or '')[:20]!r}, not a whole number")
    return int(number)


def read_csv(path: Path) -> tuple[list[Record], Stamp]:
    """The records of ``path`` (none when there is no file) and the stamp of what was read.

    Raises:
        LabelsError: the file cannot be read, lacks a column, or a row lacks a value or
            holds a number that is not whole (the message names the line).
    """
    try:
        f = path.open(encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        return [], None
    except OSError as err:
        raise LabelsError(path, f"cannot be read ({err.strerror})") from err
    with f:
        st = os.fstat(f.fileno())
        read = (st.st_ino, st.st_mtime_ns, st.st_size)
        try:
            first = f.readline()
            f.seek(0)  # a spreadsheet's semicolon-separated save, or commas
            reader = csv.DictReader(f, delimiter=";" if "," not in first else ",")
            header = [(h or "").strip().lower() for h in reader.fieldnames or []]
            if missing := [c for c in COLUMNS if c not in header]:
                need = f"the column(s) {', '.join(missing)}; the header is {','.join(COLUMNS)}"
                raise LabelsError(path, f"line 1 lacks {need}", [1])
            reader.fieldnames = header
            rows = ((reader.line_num, r) for r in reader)
            return [
                _record(path, n, r) for n, r in rows if "".join(map(str, r.values())).strip()
            ], read
        except UnicodeDecodeError as err:
            raise LabelsError(path, "is not UTF-8 text; save it as CSV UTF-8") from err


def _record(path: Path, line: int, row: dict[str, Any]) -> Record:
    """One row as a record, or LabelsError naming its line and what to do."""
    try:
        slide, label = (str(row.get(c) or "").strip() for c in ("slide", "label"))
        if not slide or not label:
            raise ValueError("the slide or the label is empty")
        x, y, w, h = (_whole(row.get(c), c) for c in "xywh")
    except ValueError as err:
        raise LabelsError(
            path,
            f"line {line} cannot be read: {err}; correct or delete that row (the file is left "
            "as it is until then)",
            [line],
        ) from None
    return slide, x, y, w, h, label


def csv_text(records: list[Record]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(records)
    return buf.getvalue()


def geojson(records: list[Record], name: str) -> dict[str, Any]:
    """QuPath-importable annotations of ``records`` (level-0 rectangles)."""
    features = []
    for _, x, y, w, h, label in records:
        ring = [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "annotation",
                    "name": name,
                    "classification": {"name": label, "color": [230, 120, 20]},
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}
