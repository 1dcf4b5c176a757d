"""``wsi-ssl demo``."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the pipeline on a synthetic slide (or the slides given)")
    p.add_argument("slides", nargs="*", type=Path, metavar="SLIDE")
    p.add_argument("--out", type=Path, default=Path("wsi-ssl-demo"), help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wsi_ssl.demo import run_demo

    result = run_demo(args.out, args.slides, progress=not args.quiet)
    print(f"archive: {result.root}")
    for line in result.lines:
        print(f"  {line}")
    for picture in result.pictures:
        print(f"picture: {picture}")
    return 1 if any(line.startswith("FAILED") for line in result.lines) else 0
