"""``wsi-ssl demo``."""

from __future__ import annotations

import argparse
from pathlib import Path

from wsi_ssl.cli.arg_types import whole_number


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on synthetic slides (or the slides given)",
        description="Tile, pretrain (DINO on the CPU), embed, search a region and train a "
        "cross-validated attention-MIL classifier, on twelve synthetic H&E-like slides (half with "
        "a lesion) or on your own slides. Re-running resumes every stage.",
    )
    p.add_argument("slides", nargs="*", type=Path, metavar="SLIDE")
    p.add_argument("--out", type=Path, default=Path("wsi-ssl-demo"), help="output folder")
    p.add_argument(
        "--labels", type=Path, help="labels CSV (slide,label) for the MIL step on your slides"
    )
    p.add_argument(
        "--steps",
        type=whole_number(1),
        default=200,
        help="DINO pretraining steps (default 200)",
    )
    p.add_argument(
        "--mpp-override", type=float, help="mpp for your slides that record none (as tile's)"
    )
    p.add_argument(
        "--tissue-threshold", type=float, help="minimum tissue fraction (default 0.1, as tile's)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wsi_ssl.config import TilingConfig
    from wsi_ssl.demo import run_demo

    given = {"mpp_override": args.mpp_override, "tissue_threshold": args.tissue_threshold}
    result = run_demo(
        args.out,
        args.slides,
        labels=args.labels,
        pretrain_steps=args.steps,
        tiling=TilingConfig(**{k: v for k, v in given.items() if v is not None}),
        progress=not args.quiet,
        echo=lambda line: print(line if line.startswith("==") else f"  {line}", flush=True),
        error_text=args.error_text,
    )
    if result.tiled:  # a folder with no slide tiled in it is no archive to show
        print(f"archive: {result.root}")
    for picture in result.pictures:
        print(f"picture: {picture}")
    return 1 if result.failed else 0
