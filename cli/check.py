"""``wsi-ssl check``: verify an archive; ``--repair`` removes debris and marks work for redo."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from wsi_ssl.listing import first_few

if TYPE_CHECKING:
    from wsi_ssl.storage.check import CheckReport


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check",
        help="verify every store, embeddings array and index of an archive; --repair cleans up",
        description="Checks every slide store (metadata, status, tile shards, coords), every "
        "embeddings array (complete by content), every search index generation and manifest, "
        "the catalog against the stores, leftover temp files and stale locks. Prints each "
        "problem with the command that fixes it. Exit 0: clean (or everything repaired); "
        "1: problems remain.",
    )
    p.add_argument(
        "root",
        type=Path,
        metavar="ROOT",
        help="archive root (or the --out of a multi-scale tile: each mpp-* root is checked)",
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="remove temp files, stale locks, orphan index generations, unfinished or damaged "
        "embeddings and re-tile leftovers; mark damaged stores for re-tiling in the catalog",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="do not decode every embedding row (files only)",
    )
    p.add_argument(
        "--verify-tiles",
        action="store_true",
        help="also read every tile shard against the CRC32C recorded when it was tiled (reads "
        "the whole archive)",
    )
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.set_defaults(func=run_check)


def archive_roots(root: Path) -> list[Path]:
    """``root`` itself, and, for the output of a multi-scale ``wsi-ssl tile --mpp 0.5,1.0``,
    its ``mpp-*`` archive roots (``root`` alone when it is neither)."""
    from wsi_ssl.storage.archive import is_archive_root

    scales = sorted(p for p in root.glob("mpp-*") if is_archive_root(p))
    return ([root] if is_archive_root(root) or not scales else []) + scales


def run_check(args: argparse.Namespace) -> int:
    from wsi_ssl.storage.check import check_archive

    reports = [
        check_archive(
            root, repair=args.repair, decode=not args.quick, verify_tiles=args.verify_tiles
        )
        for root in archive_roots(args.root)
    ]
    if args.json:
        dicts = [r.to_dict() for r in reports]
        print(json.dumps(dicts[0] if len(dicts) == 1 else dicts, indent=2))
    else:
        for report in reports:
            print_report(report, named=len(reports) > 1)
    return 0 if all(r.ok for r in reports) else 1


def print_report(report: CheckReport, named: bool) -> None:
    """Each finding with its fix, then the counts (prefixed by the root when ``named``)."""
    for f in report.findings:
        state = "repaired" if f.repaired else "problem"
        print(f"{state}: {f.path}: {f.problem}")
        if not f.repaired:
            print(f"    fix: {f.fix}")
    if failed := report.failed_slides:
        shown = first_few(failed)
        print(f"note: {len(failed)} slide(s) failed to tile and are not in the archive ({shown})")
    if busy := report.busy:
        print(
            f"note: {len(busy)} store(s) being written by a tiling job now were not checked "
            f"({first_few(busy)}); check again when it ends"
        )
    if stale := report.stale_locks:
        print(
            f"note: {len(stale)} stale lock file(s) of killed jobs, harmless ({first_few(stale)}); "
            "the next job writing the same thing or --repair clears them"
        )
    remaining = len(report.problems)
    repaired = len(report.findings) - remaining
    print(
        (f"{report.root}: " if named else "")
        + f"checked {report.stores} store(s), {report.arrays} embeddings array(s), "
        f"{report.indexes} index(es): {remaining} problem(s)"
        + (f", {repaired} repaired" if repaired else "")
    )
