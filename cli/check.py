"""``wsi-ssl check``: verify an archive; ``--repair`` removes debris and marks work for redo."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


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
    p.add_argument("root", type=Path, metavar="ROOT", help="archive root")
    p.add_argument(
        "--repair",
        action="store_true",
        help="remove temp files, stale locks, orphan index generations, unfinished or damaged "
        "embeddings and re-tile leftovers; mark damaged stores for re-tiling in the catalog",
    )
    p.add_argument(
        "--quick", action="store_true", help="do not decode every embedding row (files only)"
    )
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    from wsi_ssl.storage.check import check_archive

    report = check_archive(args.root, repair=args.repair, decode=not args.quick)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0 if report.ok else 1
    for f in report.findings:
        state = "repaired" if f.repaired else "problem"
        print(f"{state}: {f.path}: {f.problem}")
        if not f.repaired:
            print(f"    fix: {f.fix}")
    remaining = len(report.problems)
    repaired = len(report.findings) - remaining
    print(
        f"checked {report.stores} store(s), {report.arrays} embeddings array(s), "
        f"{report.indexes} index(es): {remaining} problem(s)"
        + (f", {repaired} repaired" if repaired else "")
    )
    return 0 if report.ok else 1
