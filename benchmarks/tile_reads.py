"""Random single-tile reads from a slide store: Zarr's ``array[i]`` vs ``TileReader``.

Pretraining and the search and MIL pictures read stored tiles one at a time in random order.
In one run, on the same tiles and the same random rows:

* decode floor: the tile's bytes already in memory, decoded only (the array's own decoder);
* zarr: ``np.asarray(tiles[i])`` through Zarr's sharding codec (the baseline);
* TileReader one by one: ``reader[i]`` (shard index cached, one ``pread`` + decode);
* TileReader batch: ``reader.read(rows)`` for 64 rows at a time.

For a jpeg store (the default) and a zstd store of CMU-1-Small-Region (or a synthetic slide
when ../shared/fixtures is absent). Median of 3 passes; prints a table and writes
``results/tile_reads.json``.

Usage: python benchmarks/tile_reads.py [--reads 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from wsi_ssl.config import TilingConfig
from wsi_ssl.storage import open_store
from wsi_ssl.storage.shards import inner_decoder, shard_path
from wsi_ssl.storage.tile_reader import TileReader
from wsi_ssl.tiling.batch import tile_slide

HERE = Path(__file__).resolve().parent
FIXTURE = HERE.parent.parent / "shared" / "fixtures" / "slides" / "CMU-1-Small-Region.svs"


def build_store(codec: str) -> tuple[Path, str]:
    root = HERE / "data" / f"tile-reads-{codec}"
    if FIXTURE.is_file():
        slide = FIXTURE
    else:
        from wsi_ssl.synthetic import write_synthetic_slide

        slide = write_synthetic_slide(HERE / "data" / "synthetic-0.tiff", (8192, 8192), seed=0)
    shutil.rmtree(root, ignore_errors=True)
    tile_slide(slide, root, TilingConfig(tile_size=224, codec=codec))
    (slide_id,) = open_store(root).slide_ids
    return root, slide_id


def rate(fn: Callable[[], object], n: int) -> float:
    """Tiles per second, median of 3 passes."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n / statistics.median(times)


def measure(codec: str, reads: int) -> dict[str, float]:
    root, slide_id = build_store(codec)
    tiles = open_store(root).slide(slide_id).tiles
    reader = TileReader(tiles)
    rows = np.random.default_rng(0).integers(0, tiles.shape[0], reads)
    # the encoded bytes of each row, for the floor (read through the reader's own file layout)
    blobs = []
    for r in rows[:256]:
        shard, inner = divmod(int(r), reader._per_shard)
        path = shard_path(tiles, shard)
        fd = os.open(path, os.O_RDONLY)
        offset, nbytes = reader._index(shard, fd, path)[inner]
        blobs.append(os.pread(fd, int(nbytes), int(offset)))
        os.close(fd)
    decode = inner_decoder(tiles)  # the decoder the reader uses
    assert decode is not None

    def floor() -> None:
        for i in range(reads):
            decode(blobs[i % len(blobs)])

    def zarr_loop() -> None:
        for r in rows:
            np.asarray(tiles[int(r)])

    def reader_loop() -> None:
        for r in rows:
            reader[int(r)]

    def reader_batches() -> None:
        for i in range(0, reads, 64):
            reader.read(rows[i : i + 64])

    return {
        "decode floor": rate(floor, reads),
        "zarr tiles[i] (baseline)": rate(zarr_loop, reads),
        "TileReader, one by one": rate(reader_loop, reads),
        "TileReader, 64 per call": rate(reader_batches, reads),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--reads", type=int, default=2000)
    args = p.parse_args()
    results = {codec: measure(codec, args.reads) for codec in ("jpeg", "zstd")}
    print(f"{'case':<28} {'codec':<6} {'tiles/s':>9} {'x zarr':>7} {'/floor':>7}")
    for codec, rows in results.items():
        base, floor = rows["zarr tiles[i] (baseline)"], rows["decode floor"]
        for name, value in rows.items():
            print(f"{name:<28} {codec:<6} {value:>9.0f} {value / base:>7.2f} {value / floor:>7.2f}")
    out = HERE / "results" / "tile_reads.json"
    out.write_text(
        json.dumps(
            {
                "machine": {
                    "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                },
                "date": time.strftime("%Y-%m-%d"),
                "tile_px": 224,
                "reads": args.reads,
                "rows": results,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
