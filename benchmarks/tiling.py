"""Tiling throughput and memory: decode floor vs the openslide read_region loop vs `wsi-ssl tile`.

Builds (once, cached under benchmarks/data/) a pyramidal JPEG TIFF of real H&E texture by
mirroring CMU-1-Small-Region.svs, then measures in one run on the same cores:

(a) decode floor: every stored level-0 tile decoded once (libjpeg-turbo via imagecodecs);
(b) baseline: an openslide ``read_region`` loop over the tiling grid, RGBA -> RGB numpy;
(c) ``wsi-ssl tile`` end to end (subprocess, peak RSS sampled), per codec, 1 and 2 workers.
    The default grid (256 px at 0.5 µm/px) coincides with the file's 256 px YCbCr JPEG tiles,
    so the jpeg store copies the JPEG streams and the zstd store decodes each stored tile
    once; a last row tiles at 1 µm/px, where every tile is read as strips and resampled.

Usage: python benchmarks/tiling.py [--size 24576] [--baseline-tiles 3000]
Prints a table and writes benchmarks/results/tiling.json.

``--single-level 16384 65536`` measures instead the memory of slides without a pyramid: for a
single-level tiled JPEG TIFF of each size (a pink square on glass, 512 px tiles), the peak RSS
of a fresh process making the thumbnail and tissue mask the way ``wsi-ssl tile`` does (block
reads), beside the whole-level read it replaced (baseline, run only where the level fits in
``--baseline-max-gb``), and of the whole ``wsi-ssl tile`` command. Writes
benchmarks/results/tiling_single_level.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import imagecodecs
import numpy as np
import psutil
import tifffile
from PIL import Image

HERE = Path(__file__).resolve().parent
CMU = HERE.parent.parent / "shared" / "fixtures" / "slides" / "CMU-1-Small-Region.svs"
TILE = 256


def _mirror(image: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    xs = xs % (2 * w)
    ys = ys % (2 * h)
    xs = np.where(xs >= w, 2 * w - 1 - xs, xs)
    ys = np.where(ys >= h, 2 * h - 1 - ys, ys)
    return image[ys[:, None], xs[None, :]]


def build_slide(path: Path, size: int) -> Path:
    """A size x size pyramidal TIFF (JPEG q90, 256 px tiles, 0.5 µm/px) of mirrored CMU-1."""
    if path.exists():
        return path
    import tiffslide

    with tiffslide.TiffSlide(CMU) as src:
        cmu = np.asarray(src.read_region((0, 0), 0, src.dimensions).convert("RGB"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    res = (1e4 / 0.5, 1e4 / 0.5)  # pixels per cm at 0.5 µm/px
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for ds in (1, 4, 16, 64):
            n = size // ds
            source = cmu if ds == 1 else np.asarray(Image.fromarray(cmu).reduce(ds))

            def tiles(n: int = n, source: np.ndarray = source) -> object:
                for ty in range(0, n, TILE):
                    for tx in range(0, n, TILE):
                        yield _mirror(source, np.arange(tx, tx + TILE), np.arange(ty, ty + TILE))

            tif.write(
                tiles(),
                shape=(n, n, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 90},
                resolution=(res[0] / ds, res[1] / ds),
                resolutionunit="CENTIMETER",
                subfiletype=0 if ds == 1 else 1,
                metadata=None,
            )
    tmp.rename(path)
    return path


def decode_floor(path: Path) -> dict[str, float]:
    """Decode every stored level-0 tile once, single thread."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offsets, counts = page.dataoffsets, page.databytecounts
        tables = page.jpegtables
        fh = tif.filehandle
        start = time.perf_counter()
        for off, cnt in zip(offsets, counts, strict=True):
            fh.seek(off)
            imagecodecs.jpeg8_decode(fh.read(cnt), tables=tables)
        seconds = time.perf_counter() - start
    return {"tiles": len(offsets), "seconds": seconds, "tiles_per_s": len(offsets) / seconds}


def openslide_loop(path: Path, n_tiles: int) -> dict[str, float]:
    """The usual loop: read_region per 256 px tile at level 0, converted to an RGB array."""
    import openslide

    slide = openslide.OpenSlide(str(path))
    w, h = slide.dimensions
    coords = [(x, y) for y in range(0, h, TILE) for x in range(0, w, TILE)][:n_tiles]
    start = time.perf_counter()
    for x, y in coords:
        np.asarray(slide.read_region((x, y), 0, (TILE, TILE)).convert("RGB"))
    seconds = time.perf_counter() - start
    slide.close()
    return {"tiles": len(coords), "seconds": seconds, "tiles_per_s": len(coords) / seconds}


def wsi_ssl_tile(
    path: Path,
    out: Path,
    codec: str,
    workers: int,
    mpp: float = 0.5,
    tissue_threshold: float = 0.0,
) -> dict[str, float]:
    """`wsi-ssl tile` in a subprocess, all grid tiles kept, peak RSS sampled every 50 ms."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "wsi_ssl.cli.main",
        "tile",
        str(path),
        "--out",
        str(out),
        "--codec",
        codec,
        "--workers",
        str(workers),
        "--tissue-threshold",
        str(tissue_threshold),
        "--mpp",
        str(mpp),
        "--json",
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    summary = json.loads(proc.stdout.read())  # type: ignore[union-attr]
    tiles = summary["tiles"]
    size = sum(p.stat().st_size for p in (out / "slides").rglob("c/*/*/*/*") if p.is_file())
    return {
        "tiles": tiles,
        "seconds": seconds,
        "tiles_per_s": tiles / seconds,
        "peak_rss_mb": peak / 2**20,
        "bytes_per_tile": size / tiles,
    }


def build_single_level(path: Path, size: int, tile: int = 512) -> Path:
    """A size x size single-level tiled JPEG TIFF at 0.5 µm/px: a pink middle square on glass."""
    if path.exists():
        return path
    pink = np.full((tile, tile, 3), (206, 104, 160), dtype=np.uint8)
    glass = np.full((tile, tile, 3), (241, 240, 242), dtype=np.uint8)
    n = size // tile
    middle = range(n // 4, 3 * n // 4)
    tiles = (pink if r in middle and c in middle else glass for r in range(n) for c in range(n))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tifffile.imwrite(
        tmp,
        tiles,
        shape=(size, size, 3),
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="rgb",
        compression="jpeg",
        resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
        bigtiff=True,
    )
    tmp.rename(path)
    return path


# peak RSS of this process image (VmHWM): ru_maxrss would carry the launcher's peak over fork
_THUMBNAIL = """
import json, re, sys, time
import wsi_ssl.slide._base as base
from wsi_ssl.tiling.batch import open_for_tiling, thumbnail_and_mask
if sys.argv[2] == "whole-level":  # the read this replaced: the whole level, then resized
    base.THUMBNAIL_WHOLE_LEVEL_PIXELS = 2**62
with open_for_tiling(sys.argv[1], None) as reader:
    start = time.perf_counter()
    thumbnail, mask = thumbnail_and_mask(reader, reader.require_mpp(), 8.0)
    print(json.dumps({"seconds": time.perf_counter() - start, "thumbnail": list(thumbnail.shape),
                      "peak_rss_mb": int(re.search(r"VmHWM:\\s+(\\d+)",
                                           open("/proc/self/status").read()).group(1)) / 1024}))
"""


def single_level(sizes: list[int], baseline_max_gb: float) -> None:
    data = HERE / "data"
    rows: dict[str, dict[str, float]] = {}
    for size in sizes:
        slide = build_single_level(data / f"single-level-{size}.tiff", size)
        level_gb = size * size * 3 / 1e9
        modes = ["blocks"] + (["whole-level"] if level_gb * 2.5 <= baseline_max_gb else [])
        for mode in modes:
            done = subprocess.run(
                [sys.executable, "-c", _THUMBNAIL, str(slide), mode],
                capture_output=True,
                text=True,
                check=True,
            )
            rows[f"{size} px, thumbnail + mask, {mode}"] = json.loads(done.stdout)
        r = wsi_ssl_tile(slide, data / "out", "jpeg", 2, tissue_threshold=0.1)
        rows[f"{size} px, wsi-ssl tile (jpeg, 2 workers)"] = r
        shutil.rmtree(data / "out", ignore_errors=True)
    print(f"{'case':<52} {'peak RSS MB':>11} {'seconds':>8}")
    for name, r in rows.items():
        print(f"{name:<52} {r['peak_rss_mb']:>11.0f} {r['seconds']:>8.1f}")
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    out = HERE / "results" / "tiling_single_level.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=24576, help="slide edge in pixels")
    parser.add_argument("--small-size", type=int, default=8192, help="second slide, memory check")
    parser.add_argument("--baseline-tiles", type=int, default=3000)
    parser.add_argument("--single-level", type=int, nargs="+", metavar="SIZE")
    parser.add_argument("--baseline-max-gb", type=float, default=6.0)
    args = parser.parse_args()
    if args.single_level:
        single_level(args.single_level, args.baseline_max_gb)
        return
    data = HERE / "data"
    big = build_slide(data / f"cmu-mirror-{args.size}.tiff", args.size)
    small = build_slide(data / f"cmu-mirror-{args.small_size}.tiff", args.small_size)
    rows: dict[str, dict[str, float]] = {}
    rows["decode floor (1 core)"] = decode_floor(big)
    rows["openslide read_region loop (1 core)"] = openslide_loop(big, args.baseline_tiles)
    for codec in ("jpeg", "zstd"):
        for workers in (1, 2):
            rows[f"wsi-ssl tile {codec}, {workers} worker(s)"] = wsi_ssl_tile(
                big, data / "out", codec, workers
            )
    rows[f"wsi-ssl tile jpeg, 2 workers, {args.small_size} px slide"] = wsi_ssl_tile(
        small, data / "out", "jpeg", 2
    )
    # 1 µm/px: no stored level at that scale, so every tile is read as strips and resampled
    rows["wsi-ssl tile jpeg, 2 workers, resampled to 1 µm/px"] = wsi_ssl_tile(
        big, data / "out", "jpeg", 2, mpp=1.0
    )
    # a batch: the start-up (interpreter, imports) is paid once, not once per slide
    batch = data / "batch"
    for i in range(8):
        copy = batch / f"slide-{i}.tiff"
        if not copy.exists():
            batch.mkdir(parents=True, exist_ok=True)
            copy.write_bytes(small.read_bytes() + bytes([i]))  # trailing byte: own fingerprint
    for workers in (1, 2):
        rows[f"wsi-ssl tile jpeg, {workers} worker(s), batch of 8 x {args.small_size} px"] = (
            wsi_ssl_tile(batch, data / "out", "jpeg", workers)
        )
    shutil.rmtree(data / "out", ignore_errors=True)
    base = rows["openslide read_region loop (1 core)"]["tiles_per_s"]
    floor = rows["decode floor (1 core)"]["tiles_per_s"]
    print(
        f"slide {args.size} x {args.size} px ({args.size**2 / 1e9:.2f} gigapixel), tiles {TILE} px"
    )
    print(
        f"{'case':<48} {'tiles/s':>9} {'x loop':>7} {'/floor/core':>11} {'peak MB':>8} {'B/tile':>8}"
    )
    for name, r in rows.items():
        workers = 2 if "2 worker" in name else 1
        per_core = r["tiles_per_s"] / workers / floor
        print(
            f"{name:<48} {r['tiles_per_s']:>9.0f} {r['tiles_per_s'] / base:>7.2f} {per_core:>11.2f} "
            f"{r.get('peak_rss_mb', float('nan')):>8.0f} {r.get('bytes_per_tile', float('nan')):>8.0f}"
        )
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "date": time.strftime("%Y-%m-%d"),
        "slide_px": args.size,
        "rows": rows,
    }
    out = HERE / "results" / "tiling.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
