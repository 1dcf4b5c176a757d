"""What stain normalisation costs per tile: Reinhard, Macenko and Vahadane side by side, with
a plain copy of the tile as the baseline, on real CMU-1 tiles (each tile's own stains are fitted,
as ``embed --stain-normalize`` does).

One run, one thread (the embed loader's workers each normalise their own tiles), the methods
alternating over ``--passes`` passes, the best pass kept. Prints a table and writes
``results/stain.json``.

Usage: python benchmarks/stain.py [--tiles 32] [--passes 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from wsi_ssl.slide import open_slide
from wsi_ssl.stain import METHODS, StainNormalizer

HERE = Path(__file__).resolve().parent
CMU = HERE.parent.parent / "shared" / "fixtures" / "slides" / "CMU-1-Small-Region.svs"
SIZE = 224


def cmu_tiles(count: int) -> list[torch.Tensor]:
    """``count`` 224 px tiles of CMU-1-Small-Region with the most tissue, ``(3, H, W)`` uint8."""
    with open_slide(CMU) as slide:
        width, height = slide.dimensions
        tiles = [
            np.asarray(slide.read_region((x, y), 0, (SIZE, SIZE)))[..., :3]
            for y in range(0, height - SIZE + 1, SIZE)
            for x in range(0, width - SIZE + 1, SIZE)
        ]
    tiles.sort(key=lambda t: float(t.mean()))  # darkest (most tissue) first
    return [torch.from_numpy(np.ascontiguousarray(t)).permute(2, 0, 1) for t in tiles[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=32)
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tiles = cmu_tiles(args.tiles + 1)
    reference, tiles = tiles[0], tiles[1:]
    methods = {"copy (baseline)": lambda t: t.clone()}
    for method in METHODS:
        methods[method] = StainNormalizer(method, reference.permute(1, 2, 0).numpy())
    best = dict.fromkeys(methods, float("inf"))
    for _ in range(args.passes):
        for name, normalize in methods.items():
            started = time.perf_counter()
            for tile in tiles:
                normalize(tile)
            best[name] = min(best[name], time.perf_counter() - started)
    rows = [
        {
            "method": name,
            "tiles_per_s": round(len(tiles) / s, 1),
            "ms_per_tile": 1e3 * s / len(tiles),
        }
        for name, s in best.items()
    ]
    print(f"{len(tiles)} CMU-1 tiles of {SIZE} px, one thread, best of {args.passes} passes")
    print(f"{'method':<16} {'tiles/s':>9} {'ms/tile':>9}")
    for row in rows:
        print(f"{row['method']:<16} {row['tiles_per_s']:>9.1f} {row['ms_per_tile']:>9.2f}")
    out = HERE / "results" / "stain.json"
    record = {
        "machine": platform.platform(),
        "processor": platform.processor(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "tiles": len(tiles),
        "rows": rows,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
