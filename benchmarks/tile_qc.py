"""What tile QC costs: ``wsi-ssl tile`` of one slide with QC scoring and without, side by side.

In one run, alternating (2 passes each, best kept):

* a synthetic 8192 x 6144 JPEG slide at 0.5 µm/px, every grid tile kept (768 tiles, each
  copied from the file as its JPEG stream, so QC decodes it first);
* CMU-1-Small-Region at 224 px, default settings (when ../shared/fixtures is present);

and ``tile_scores`` alone on 64 real 256 px tiles (ms per tile, CPU time, best of 9), beside
the focus score as it was computed before (float32 temporaries and ``var``: the baseline)
and the full JPEG decode a passed-through tile costs QC. Prints a table and writes
``results/tile_qc.json`` (``--out``). ``--quick``: a 4096 x 3072 synthetic slide and no
CMU row, to check the script runs (figures not comparable with the full run's).

Usage: python benchmarks/tile_qc.py [--workers 2] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from wsi_ssl.config import TilingConfig
from wsi_ssl.synthetic import write_synthetic_slide
from wsi_ssl.tiling.batch import tile_slide
from wsi_ssl.tiling.qc import tile_scores

HERE = Path(__file__).resolve().parent
CMU = HERE.parent.parent / "shared" / "fixtures" / "slides" / "CMU-1-Small-Region.svs"


def tiling_rates(slide: Path, config: TilingConfig, workers: int, work: Path) -> dict[str, float]:
    """Best end-to-end tiles/s of two passes each, QC off and on, alternating."""
    best = {"qc off": 0.0, "qc on": 0.0}
    for _ in range(2):
        for label, qc in (("qc off", False), ("qc on", True)):
            shutil.rmtree(work, ignore_errors=True)
            started = time.perf_counter()
            result = tile_slide(
                slide, work, TilingConfig(**{**config.to_dict(), "qc": qc}), workers=workers
            )
            rate = result.n_tiles / (time.perf_counter() - started)
            best[label] = max(best[label], rate)
    return best


def cpu_ms(fn: Callable[[], object], n: int) -> float:
    """Best CPU time of 9 calls of ``fn``, in ms per tile (CPU time: this box is shared)."""
    best = float("inf")
    for _ in range(9):
        started = time.process_time()
        fn()
        best = min(best, time.process_time() - started)
    return best / n * 1000


def focus_before(tiles: list[np.ndarray]) -> list[float]:
    """The focus score as computed before (the baseline): float32 temporaries, ``var``."""
    out = []
    for tile in tiles:
        green = tile[::2, ::2, 1].astype(np.float32)
        lap = 4 * green[1:-1, 1:-1] - green[:-2, 1:-1] - green[2:, 1:-1]
        lap -= green[1:-1, :-2] + green[1:-1, 2:]
        out.append(float(lap.var()))
    return out


def score_costs(tiles: list[np.ndarray]) -> dict[str, float]:
    import imagecodecs

    from wsi_ssl.tiling.qc import laplacian_variance

    streams = [bytes(imagecodecs.jpeg8_encode(t, level=90)) for t in tiles]
    n = len(tiles)
    green = np.stack(tiles)[:, ::2, ::2, 1]  # as tile_scores takes it, one (k, T/2, T/2) batch
    return {
        "tile_scores (all four metrics)": cpu_ms(lambda: tile_scores(tiles), n),
        "focus alone, before (baseline)": cpu_ms(lambda: focus_before(tiles), n),
        "focus alone, now": cpu_ms(lambda: laplacian_variance(green), n),
        "JPEG decode of a passed-through tile": cpu_ms(
            lambda: [imagecodecs.jpeg8_decode(s) for s in streams], n
        ),
    }


def sample_tiles(slide: Path, width: int, height: int, n: int = 64) -> list[np.ndarray]:
    """``n`` 256 px tiles of the slide, row by row from y = 2048 (higher where the slide is too
    short for them), every one inside the slide: a row of 64 ran past its right edge."""
    from wsi_ssl.slide import open_slide

    per_row = width // 256
    top = min(2048, height - 256 * -(-n // per_row))
    corners = [(256 * (i % per_row), top + 256 * (i // per_row)) for i in range(n)]
    with open_slide(slide) as reader:
        return [reader.read_region(xy, 0, (256, 256)) for xy in corners]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="small slide, no CMU row")
    p.add_argument("--out", type=Path, default=HERE / "results" / "tile_qc.json")
    args = p.parse_args()
    width, height = (4096, 3072) if args.quick else (8192, 6144)
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        synth = write_synthetic_slide(Path(tmp) / "s.tiff", (width, height), seed=4)
        rows[f"synthetic {width}x{height} jpeg"] = tiling_rates(
            synth, TilingConfig(tissue_threshold=0.0), args.workers, Path(tmp) / "a"
        )
        if CMU.is_file() and not args.quick:
            rows["CMU-1-Small-Region 224"] = tiling_rates(
                CMU, TilingConfig(tile_size=224), args.workers, Path(tmp) / "b"
            )
        tiles = sample_tiles(synth, width, height)
    costs = score_costs(tiles)
    print(f"{'slide':<28} {'qc off t/s':>10} {'qc on t/s':>10} {'on/off':>7}")
    for name, r in rows.items():
        print(
            f"{name:<28} {r['qc off']:>10.0f} {r['qc on']:>10.0f} {r['qc on'] / r['qc off']:>7.2f}"
        )
    for name, ms in costs.items():
        print(f"{name:<40} {ms:.3f} ms per 256 px tile")
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": {
                    "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                },
                "date": time.strftime("%Y-%m-%d"),
                "workers": args.workers,
                "quick": args.quick,
                "tiles_per_s": rows,
                "cpu_ms_per_tile": costs,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
