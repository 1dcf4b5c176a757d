"""Slide labels: reading the CSV (``slide``, ``label``, optional ``patient`` and ``fold``).

Matching the rows to an archive's slide stores and embeddings is :mod:`wsi_ssl.mil.matching`
(its names are re-exported here). Every problem is reported with the CSV line numbers at fault
(the header is line 1).
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from wsi_ssl.errors import LabelsError
from wsi_ssl.lazy import lazy_exports
from wsi_ssl.listing import first_few

if TYPE_CHECKING:
    from wsi_ssl.mil.matching import (
        LabelledSlide,
        MatchReport,
        match_labels,
        slide_file_names,
    )

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "wsi_ssl.mil.matching": (
            "LabelledSlide",
            "MatchReport",
            "match_labels",
            "slide_file_names",
        )
    },
)

__all__ = [
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "LabelRow",
    "LabelTable",
    "LabelledSlide",
    "MatchReport",
    "check_classes",
    "line_list",
    "match_labels",
    "read_labels",
    "slide_file_names",
    "sort_classes",
]

REQUIRED_COLUMNS = ("slide", "label")
OPTIONAL_COLUMNS = ("patient", "fold")


def line_list(rows: Iterable[int], limit: int = 10) -> str:
    rows = sorted(set(rows))
    return f"line{'s' if len(rows) > 1 else ''} {first_few(rows, limit)}"


def sort_classes(labels: Iterable[str]) -> list[str]:
    """Distinct labels in order: numerically when all are numbers ("0" < "1" < "10")."""
    distinct = set(labels)
    try:
        return sorted(distinct, key=float)
    except ValueError:
        return sorted(distinct)


@dataclass(frozen=True)
class LabelRow:
    """One CSV row; ``line`` is its 1-based line number (the header is line 1)."""

    line: int
    slide: str
    label: str
    patient: str | None = None
    fold: int | None = None


@dataclass
class LabelTable:
    """A validated labels table (see :func:`read_labels`)."""

    path: str
    rows: list[LabelRow]
    columns: list[str] = field(default_factory=lambda: list(REQUIRED_COLUMNS))

    @property
    def classes(self) -> list[str]:
        return sort_classes(r.label for r in self.rows)

    @classmethod
    def from_mapping(cls, labels: Mapping[str, str | int], path: str = "<labels>") -> LabelTable:
        """A table from ``{slide: label}`` (line numbers count as if written as a CSV)."""
        rows = [LabelRow(i + 2, str(s), str(lab)) for i, (s, lab) in enumerate(labels.items())]
        table = cls(path, rows)
        check_classes(table.path, rows)
        return table


def check_classes(path: str, rows: list[LabelRow]) -> None:
    """At least two classes, and no two spelled alike but for case ("Tumour", "tumour").

    Raises:
        LabelsError: naming the lines at fault.
    """
    spellings: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        spellings[r.label.casefold()].add(r.label)
    alike = [sorted(names) for names in spellings.values() if len(names) > 1]
    if alike:
        said = " and ".join(
            f"{n!r} ({line_list(r.line for r in rows if r.label == n)})" for n in alike[0]
        )
        raise LabelsError(
            path,
            f"labels {said} differ only in case, so they would be separate classes; spell "
            "each class one way in the CSV",
            [r.line for r in rows if any(r.label in a for a in alike)],
        )
    classes = {r.label for r in rows}
    if len(classes) < 2:
        only = next(iter(classes)) if classes else "none"
        raise LabelsError(
            path,
            f"only one class ({only!r}) among {len(rows)} labelled slide(s); a classifier needs "
            "at least two classes",
            [r.line for r in rows],
        )


def read_labels(path: str | Path, *, for_training: bool = True) -> LabelTable:
    """Read and validate a labels CSV (comma- or tab-separated, UTF-8, header required).

    Columns: ``slide`` and ``label`` (required), ``patient`` (slides of one patient are never
    split across folds) and ``fold`` (integer fold of each slide, replacing the generated
    split). Other columns are ignored. ``for_training=False`` (a label filter, not a
    classifier) accepts a single class.

    Raises:
        LabelsError: unreadable file, missing columns, empty cells, duplicate slides, a
            non-integer fold, a patient in two folds, or a single class; the message names
            the lines at fault.
    """
    path = Path(path)
    reader, header, col = _read_header(path)
    rows = _read_rows(path, reader, col)
    _check_rows(path, rows, "fold" in col)
    table = LabelTable(str(path), rows, [h for h in header if h])
    if for_training:
        check_classes(table.path, rows)
    return table


def _read_header(path: Path) -> tuple[Iterator[list[str]], list[str], dict[str, int]]:
    """The CSV reader past the header, the header's lower-case names and each known
    column's position."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise LabelsError(path, f"cannot read labels CSV ({err})") from err
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise LabelsError(path, "empty file; expected a header with columns slide,label")
    delimiter = "\t" if "\t" in lines[0] and "," not in lines[0] else ","
    reader = csv.reader(lines, delimiter=delimiter)
    header = [h.strip().lower() for h in next(reader)]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise LabelsError(
            path,
            f"missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} in the header "
            f"(line 1 has: {', '.join(h for h in header if h) or 'nothing'}); required: "
            f"{', '.join(REQUIRED_COLUMNS)}, optional: {', '.join(OPTIONAL_COLUMNS)}",
            [1],
        )
    repeated = sorted(c for c, n in Counter(header).items() if n > 1 and c)
    if repeated:
        raise LabelsError(path, f"column(s) {', '.join(repeated)} appear twice in the header", [1])
    col = {
        name: header.index(name)
        for name in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)
        if name in header
    }
    return reader, header, col


def _read_rows(path: Path, reader: Iterator[list[str]], col: dict[str, int]) -> list[LabelRow]:
    """The non-blank rows; an empty cell or a non-integer fold is an error naming its lines."""
    rows: list[LabelRow] = []
    empty: dict[str, list[int]] = defaultdict(list)
    bad_fold: list[int] = []
    for line, values in enumerate(reader, start=2):
        if not any(v.strip() for v in values):
            continue  # blank line

        def cell(name: str, values: list[str] = values) -> str:
            i = col[name]
            return values[i].strip() if i < len(values) else ""

        slide, label = cell("slide"), cell("label")
        patient = cell("patient") if "patient" in col else None
        fold_text = cell("fold") if "fold" in col else None
        for name, value in (
            ("slide", slide),
            ("label", label),
            ("patient", patient),
            ("fold", fold_text),
        ):
            if value == "":
                empty[name].append(line)
        fold = None
        if fold_text:
            try:
                fold = int(fold_text)
            except ValueError:
                bad_fold.append(line)
        rows.append(LabelRow(line, slide, label, patient or None, fold))

    if empty:
        name, where = next(iter(empty.items()))
        hint = {
            "patient": "fill in every patient or remove the column",
            "fold": "give every slide a fold or remove the column",
        }.get(name, "every row needs a slide and a label")
        raise LabelsError(path, f"empty {name!r} on {line_list(where)}; {hint}", where)
    if bad_fold:
        raise LabelsError(path, f"'fold' is not an integer on {line_list(bad_fold)}", bad_fold)
    if not rows:
        raise LabelsError(path, "no rows below the header")
    return rows


def _check_rows(path: Path, rows: list[LabelRow], has_fold: bool) -> None:
    """No slide twice; with a fold column, each patient in one fold and at least 2 folds."""
    seen: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        seen[r.slide].append(r.line)
    dups = {s: ls for s, ls in seen.items() if len(ls) > 1}
    if dups:
        where = [ln for ls in dups.values() for ln in ls]
        first, ls = next(iter(dups.items()))
        raise LabelsError(
            path,
            f"{len(dups)} slide(s) listed more than once, e.g. {first!r} on {line_list(ls)}; "
            "keep one row per slide",
            where,
        )
    if has_fold:
        folds_of: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            if r.patient is not None and r.fold is not None:
                folds_of[r.patient][r.fold].append(r.line)
        split = {p: f for p, f in folds_of.items() if len(f) > 1}
        if split:
            patient, folds = next(iter(split.items()))
            lines = [ln for ls in folds.values() for ln in ls]
            rest = [p for p in split if p != patient]
            others = (
                f"; so {'is' if len(rest) == 1 else 'are'} {len(rest)} other patient"
                f"{'' if len(rest) == 1 else 's'} ({first_few(map(repr, rest))})"
                if rest
                else ""
            )
            raise LabelsError(
                path,
                f"patient {patient!r} is in folds {sorted(folds)} ({line_list(lines)}){others}; "
                "a patient's slides must share one fold",
                [ln for f in split.values() for ls in f.values() for ln in ls],
            )
        if len({r.fold for r in rows}) < 2:
            raise LabelsError(path, "the 'fold' column has a single value; give at least 2 folds")
