"""``wsi-ssl tile`` and ``wsi-ssl info``."""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_ssl.cli import tile_roi
from wsi_ssl.cli.arg_types import number_list, seconds, whole_number
from wsi_ssl.cli.hints import RESUME_ADVICE
from wsi_ssl.cli.report import print_report
from wsi_ssl.cli.toml_config import read_toml_config, toml_scales
from wsi_ssl.config import CODECS, TilingConfig
from wsi_ssl.errors import ConfigError

if TYPE_CHECKING:
    from wsi_ssl.slide import SlideReader


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tile", help="tile slides (files or folders) into Zarr stores under --out")
    p.add_argument("inputs", nargs="+", metavar="SLIDE_OR_DIR")
    p.add_argument("--out", required=True, type=Path, help="archive root")
    p.add_argument("--config", type=Path, help="TOML file of TilingConfig values (flags win)")
    p.add_argument(
        "--mpp",
        type=number_list,
        metavar="MPP[,MPP...]",
        help="target microns per pixel (default 0.5); several (0.5,1.0) write one archive per "
        "scale under --out (mpp-0.5/, mpp-1/), reading each slide once",
    )
    p.add_argument("--tile-size", type=int, help="tile edge in pixels (default 256)")
    p.add_argument("--overlap", type=int, help="overlap in pixels (default 0)")
    p.add_argument("--tissue-threshold", type=float, help="minimum tissue fraction (default 0.1)")
    p.add_argument("--codec", choices=CODECS, help="tile codec (default jpeg)")
    p.add_argument("--jpeg-quality", type=int, help="JPEG quality (default 90)")
    p.add_argument("--tiles-per-chunk", type=int, help="tiles per task and shard (default 64)")
    p.add_argument("--mpp-override", type=float, help="mpp for slides that record none")
    p.add_argument(
        "--thumbnail-mpp", type=float, help="scale of the thumbnail and tissue mask (default 8.0)"
    )
    p.add_argument("--mpp-csv", type=Path, help="CSV with columns slide,mpp (file name or path)")
    tile_roi.add_arguments(p)
    p.add_argument(
        "--allow-upsampling",
        action="store_true",
        default=None,
        help="allow --mpp more than 2x finer than the slide's finest level",
    )
    p.add_argument(
        "--max-tile-size", type=whole_number(16), help="largest --tile-size accepted (default 4096)"
    )
    p.add_argument(
        "--max-tiles", type=whole_number(1), help="largest tile plan per slide (default 10000000)"
    )
    p.add_argument(
        "--scheduler",
        default="threads",
        metavar="threads|processes|ADDRESS",
        help="local threads (default) or processes, or a dask.distributed scheduler address",
    )
    p.add_argument(
        "--workers", type=whole_number(1), help="local threads or processes (default: all cores)"
    )
    p.add_argument("--no-resume", action="store_true", help="redo slides that are already complete")
    p.add_argument(
        "--discard-embeddings",
        action="store_true",
        help="let a re-tile that changes the tiles drop the slide's embeddings",
    )
    p.add_argument(
        "--lock-wait",
        type=seconds,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for a slide another job is writing; default 0: report it as busy, "
        "go on with the others and exit 1",
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_tile, after_interrupt=RESUME_ADVICE)

    p = sub.add_parser("info", help="print a slide's geometry, scale and reader")
    p.add_argument("slide", type=Path)
    p.add_argument(
        "--mpp-override", type=float, help="mpp for a slide that records none (as tile's)"
    )
    p.add_argument("--json", action="store_true", help="print the slide's details as JSON")
    p.set_defaults(func=run_info)


def tiling_config(args: argparse.Namespace) -> tuple[TilingConfig, tuple[float, ...] | None]:
    """TOML values overlaid with the flags that were given, and the scales when ``--mpp`` (or
    the TOML ``mpp``, a list) names several. A TOML ``roi`` is relative to the TOML file."""
    values = read_toml_config(args.config, TilingConfig, checked_by_caller=("mpp",))
    toml_mpps = toml_scales(values, args.config)
    if args.config is not None and values.get("roi"):  # relative to the file, as a CSV's rows
        values["roi"] = str(args.config.parent / values["roi"])
    names = {f.name for f in fields(TilingConfig)} - {"mpp"}
    values.update({n: getattr(args, n) for n in names if getattr(args, n, None) is not None})
    mpps = getattr(args, "mpp", None) or toml_mpps
    if mpps:
        values["mpp"] = mpps[0]
    return TilingConfig(**values), (mpps if mpps and len(mpps) > 1 else None)


def read_mpp_csv(path: Path) -> dict[str, float]:
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as err:
        raise ConfigError(f"{path}: cannot read mpp CSV ({err})") from err
    if rows and not {"slide", "mpp"} <= set(rows[0]):
        raise ConfigError(f"{path}: the mpp CSV needs columns 'slide' and 'mpp'")
    table = {}
    for line, row in enumerate(rows, start=2):
        try:
            mpp = float(row["mpp"])
        except (TypeError, ValueError):
            mpp = math.nan
        if not mpp > 0 or math.isinf(mpp):
            raise ConfigError(
                f"{path}: line {line}: mpp {row['mpp']!r} of {row['slide']!r} is not a number > 0"
            )
        table[row["slide"]] = mpp
    return table


def run_tile(args: argparse.Namespace) -> int:
    from wsi_ssl.tiling.batch import tile_slides

    config, mpps = tiling_config(args)
    overrides = read_mpp_csv(args.mpp_csv) if args.mpp_csv else None
    rois = tile_roi.read_roi_csv(args.roi_csv) if args.roi_csv else None
    from wsi_ssl.tiling.extract import LOCAL_SCHEDULERS

    client = None
    if args.scheduler not in LOCAL_SCHEDULERS:
        from distributed import Client

        try:
            client = Client(args.scheduler, timeout=10)
        except (OSError, ValueError, TimeoutError) as err:
            raise ConfigError(
                f"cannot reach the Dask scheduler at {args.scheduler} ({err}); "
                "start it with `dask scheduler` or use --scheduler threads"
            ) from err
    try:
        summary = tile_slides(
            args.inputs,
            args.out,
            config,
            mpps=mpps,
            mpp_overrides=overrides,
            rois=rois,
            scheduler=client or args.scheduler,
            workers=args.workers,
            resume=not args.no_resume,
            progress=not (args.quiet or args.json),
            discard_embeddings=args.discard_embeddings,
            lock_wait=args.lock_wait,
        )
    finally:
        if client is not None:
            client.close()
    several = len({o.details.get("mpp") for o in summary.outcomes}) > 1
    return print_report(
        summary, args, lambda o: f" (at mpp {o.details['mpp']:g})" if several else ""
    )


def run_info(args: argparse.Namespace) -> int:
    from wsi_ssl.errors import CorruptSlideError
    from wsi_ssl.slide import open_slide

    if Path(args.slide).is_dir():  # a DICOM series is one slide; other folders may hold many
        from wsi_ssl.listing import first_few
        from wsi_ssl.tiling.source import collect_slide_paths

        found = collect_slide_paths([args.slide])
        if len(found) > 1:
            raise ConfigError(
                f"{args.slide}: holds {len(found)} slides ({first_few([str(p) for p in found])}); "
                "info describes one: give one of them"
            )
    failure = None
    with open_slide(args.slide, mpp_override=args.mpp_override) as reader:
        info = _slide_info(reader)
        # pixels too, as tiling reads them first: the centre of the coarsest level
        level = reader.level_count - 1
        (w, h), ds = reader.level_dimensions[level], reader.level_downsamples[level]
        try:
            reader.read_region((int(w // 2 * ds), int(h // 2 * ds)), level, (16, 16))
            info["pixels"] = "readable"
        except CorruptSlideError as err:
            info["pixels"], failure = "unreadable", err
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(info)
    if failure is not None:
        sys.stdout.flush()
        raise failure
    return 0


def _slide_info(reader: SlideReader) -> dict[str, Any]:
    """What ``info`` prints of an open slide: its geometry, scale (with any ignored as out of
    range) and readers: the one that opened it and the one tiling reads it with (tiffslide
    where it finds the same levels in a tiled TIFF, `open_for_tiling`; told by tifffile here,
    as importing tiffslide takes longer than the rest of ``info``)."""
    from wsi_ssl.slide import tiled_tiff_levels

    tiling_reader = reader.backend
    if tiling_reader != "tiffslide" and tiled_tiff_levels(reader.path) == reader.level_dimensions:
        tiling_reader = "tiffslide"
    props = reader.properties
    return {
        "path": str(reader.path),
        "reader": reader.backend,
        "tiling_reader": tiling_reader,
        "vendor": reader.vendor,
        "format": props.get("openslide.vendor") or props.get("tiffslide.vendor"),
        "dimensions": list(reader.dimensions),
        "levels": [
            {"dimensions": list(d), "downsample": round(float(s), 4)}
            for d, s in zip(reader.level_dimensions, reader.level_downsamples, strict=True)
        ],
        "mpp": reader.mpp,
        "mpp_source": reader.mpp_source,
        "mpp_ignored": [
            {"source": source, "mpp": mpp}
            for source, mpp in (reader.ignored_mpp() if reader.mpp is None else [])
        ],
    }


def _print_info(info: dict[str, Any]) -> None:
    """``info`` without ``--json``: one setting a line."""
    reader = info["reader"]
    if info["tiling_reader"] != reader:
        reader += (
            f" (tiling reads it with {info['tiling_reader']}, faster on its tiles, if that "
            "reads the same scale)"
        )
    vendor = info["vendor"] or f"none ({info['format'] or 'no vendor recorded'})"
    mpp = "none (pass --mpp-override)" if info["mpp"] is None else f"{info['mpp']:.4f} µm/px"
    ignored = "".join(
        f"; ignored: {i['source']} {i['mpp']:.5g} µm/px, out of range" for i in info["mpp_ignored"]
    )
    print(f"path        {info['path']}")
    print(f"reader      {reader}")
    print(f"vendor      {vendor}")
    print(f"dimensions  {info['dimensions'][0]} x {info['dimensions'][1]}")
    print(f"mpp         {mpp}  [{info['mpp_source'] or '-'}]{ignored}")
    for i, level in enumerate(info["levels"]):
        w, h = level["dimensions"]
        print(f"level {i:<5} {w} x {h}  downsample {level['downsample']}")
    print(f"pixels      {info['pixels']}")
