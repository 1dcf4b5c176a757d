"""Latency of the web page's API (`wsi-ssl serve`) vs the same query in-process.

Builds (once, cached under benchmarks/data/serve-SIZE/) an archive of one mirrored-CMU-1 slide
(`tiling.build_slide`, real H&E texture; a synthetic slide without ../shared/fixtures), tiled
at 224 px and embedded with the random-init CNN, with an exact (flat) index. Then starts the
real uvicorn server on loopback and measures, over the same random tissue boxes of 3 x 3 tiles:

* baseline: ``index.search(index.query_region(slide, box))`` in the same process;
* ``POST /api/search`` (the query + JSON over HTTP);
* ``region.png`` of a hit (what each result card loads), of a large box (a quarter of the
  slide's side at 900 px), and the cached thumbnail;
* the viewer's DZI tiles (``dzi/slide_files/LEVEL/COL_ROW.jpeg``) at three zoom levels (full
  resolution, 1:4, 1:16), cold (first request of each tile) and cached (the same again);
* ``POST /api/search`` while 16 clients keep fetching uncached large region pictures, against
  the same searches on the idle server (target: p95 within 2x of idle).

With ``--million``: time from box to first result on an archive of 2**20 indexed tiles
(16 slide stores of 65 536 tiles; synthetic clustered 128-d vectors, ``wsi_ssl.testing``, written
as real stores through the storage API and indexed by ``SearchIndex.build``, exact flat FAISS),
over the HTTP API against the same search in-process; writes results/serve-1m.json.

Usage: python benchmarks/serve.py [--size 16384] [--repeats 50] [--million] [--out PATH]
Prints p50/p95 latency per case and writes results/serve.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import socket
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ENCODER = "random-cnn"


def build_archive(size: int) -> Path:
    from wsi_ssl.config import TilingConfig
    from wsi_ssl.embedding import EmbedConfig, embed
    from wsi_ssl.search import SearchIndex
    from wsi_ssl.tiling.batch import tile_slide

    root = HERE / "data" / f"serve-{size}"
    if root.is_dir():
        return root
    from tiling import CMU, build_slide

    if CMU.is_file():
        slide = build_slide(HERE / "data" / f"cmu-mirror-{size}.tiff", size)
    else:
        from wsi_ssl.synthetic import write_synthetic_slide

        slide = write_synthetic_slide(HERE / "data" / f"synthetic-{size}.tiff", (size, size))
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tile_slide(slide, tmp, TilingConfig(tile_size=224))
    embed(tmp, ENCODER, EmbedConfig(device="cpu", workers=1))
    SearchIndex.build(tmp, ENCODER, kind="flat")
    tmp.rename(root)
    return root


MILLION = (16, 65536, 128)
"""Slides, tiles per slide, vector length of the --million archive."""


def build_million(kind: str = "flat") -> Path:
    """The 2**20-tile archive of synthetic vectors (cached under benchmarks/data/), with a
    flat index (named after the encoder) and, for another ``kind``, an index named ``kind``."""
    from wsi_ssl.search import SearchIndex
    from wsi_ssl.testing.bags import write_bag_store
    from wsi_ssl.testing.vectors import ClusteredVectors

    n_slides, per_slide, dim = MILLION
    root = HERE / "data" / f"serve-1m-{dim}"
    if (root / "index").is_dir():
        if kind != "flat" and not (root / "index" / kind).is_dir():
            SearchIndex.build(root, ENCODER, name=kind, kind=kind)
        return root
    shutil.rmtree(root, ignore_errors=True)
    vectors = ClusteredVectors(dim=dim, seed=3)
    for i in range(n_slides):
        rows = vectors.rows(i * per_slide, (i + 1) * per_slide)
        write_bag_store(
            root, f"{i:016x}", rows, encoder_id=ENCODER, thumbnail_scale=1 / 224, dtype="float16"
        )
    SearchIndex.build(root, ENCODER, kind="flat")
    if kind != "flat":
        SearchIndex.build(root, ENCODER, name=kind, kind=kind)
    return root


def million(repeats: int, kind: str = "flat", out: Path | None = None) -> None:
    """Box to first result on the 2**20-tile archive: in-process vs POST /api/search."""
    from wsi_ssl.search import SearchIndex
    from wsi_ssl.storage import open_store

    started = time.perf_counter()
    root = build_million(kind)
    built = time.perf_counter() - started
    index = SearchIndex.open(root, _flat_name(root) if kind == "flat" else kind)
    rng = np.random.default_rng(0)
    slides = [s["slide_id"] for s in index.slides]
    boxes = []
    for i in range(repeats + 1):
        store = open_store(root).slide(slides[i % len(slides)])
        x, y = (int(v) for v in store.coords[rng.integers(0, store.n_tiles)])
        t = int(store.tiling["tile_size_level0"])
        boxes.append((store.slide_id, (x, y, 3 * t, 3 * t)))
    base, server = serve(root, index.name)

    def http_search(i: int) -> dict:
        slide, box = boxes[i]
        body = json.dumps({"slide": slide, "box": list(box), "k": 8}).encode()
        request = urllib.request.Request(
            base + "/api/search", body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=300) as r:
            return dict(json.loads(r.read()))

    def local(i: int) -> object:
        slide, box = boxes[i]
        return index.search(index.query_region(slide, box), k=8)

    rows = {
        "in-process region search (baseline)": timings(local, repeats),
        "box to first result: POST /api/search": timings(http_search, repeats),
    }
    server.should_exit = True
    print(f"{index.n_vectors} tiles, {len(slides)} slides, dim {index.dim}, index {index.kind}")
    print(f"{'case':<45} {'p50 ms':>8} {'p95 ms':>8}")
    for name, r in rows.items():
        print(f"{name:<45} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f}")
    record = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "n_vectors": index.n_vectors,
        "n_slides": len(slides),
        "dim": index.dim,
        "kind": index.kind,
        "archive_build_s_if_built_now": round(built, 1),
        "rows": rows,
    }
    if out is None:
        out = HERE / "results" / ("serve-1m.json" if kind == "flat" else f"serve-1m-{kind}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


def machine() -> dict[str, object]:
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def _flat_name(root: Path) -> str:
    from wsi_ssl.storage.index_files import list_indexes

    return next(n for n in list_indexes(root) if n.startswith(ENCODER))


def serve(root: Path, name: str | None = None) -> tuple[str, object]:
    """The real uvicorn server over ``root``'s index ``name`` on a free loopback port."""
    import uvicorn

    from wsi_ssl.search import SearchIndex
    from wsi_ssl.serve import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = create_app(SearchIndex.open(root, name))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server


def timings(fn: Callable[[int], object], repeats: int, *, warm_up: bool = True) -> dict[str, float]:
    if warm_up:
        fn(0)
    ms = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        ms.append((time.perf_counter() - start) * 1e3)
    ms.sort()
    return {"p50_ms": statistics.median(ms), "p95_ms": ms[int(0.95 * (len(ms) - 1))]}


def viewer_rows(
    get: Callable[[str], bytes], slide_id: str, size: tuple[int, int], repeats: int
) -> dict[str, dict[str, float]]:
    """Cold and cached latency of DZI tiles at full resolution, 1:4 and 1:16."""
    top = math.ceil(math.log2(max(size)))
    rng = np.random.default_rng(1)
    rows = {}
    for name, level in (("1:1", top), ("1:4", top - 2), ("1:16", top - 4)):
        scale = 2.0 ** (level - top)
        cols, lines = (math.ceil(math.ceil(v * scale) / 256) for v in size)
        picks = rng.permutation(cols * lines)[:repeats]
        urls = [
            f"/api/slides/{slide_id}/dzi/0/slide_files/{level}/{i % cols}_{i // cols}.jpeg"
            for i in picks
        ]
        fetch = lambda i, u=urls: get(u[i])  # noqa: E731
        rows[f"viewer tile {name}, cold"] = timings(fetch, len(urls), warm_up=False)
        rows[f"viewer tile {name}, cached"] = timings(fetch, len(urls), warm_up=False)
    return rows


def search_under_load(
    get: Callable[[str], bytes],
    search: Callable[[int], object],
    slide_id: str,
    size: tuple[int, int],
    repeats: int,
) -> dict[str, float]:
    """Search latency while 16 clients fetch uncached pictures of a quarter of the slide.

    ``pictures_per_s``: the pictures answered from the clients' start to the searches' end,
    over that span (the 2 s warm-up included: the searches alone, ~0.3 s, see too few to give
    a rate); answers that came back afterwards, while the clients stop, are not counted."""
    stop = threading.Event()
    lock = threading.Lock()
    counts = {"pictures": 0, "busy": 0}

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            x, y = (int(v) for v in rng.integers(0, 3 * min(size) // 4, 2))
            url = f"/api/slides/{slide_id}/region.png?box={x},{y},{size[0] // 4},{size[1] // 4}&px=900"
            try:
                get(url)
                with lock:
                    counts["pictures"] += 1
            except urllib.error.HTTPError as err:
                with lock:
                    counts["busy"] += err.code == 503

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(16)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(2)  # let the load build up
    row = timings(search, repeats)
    with lock:
        elapsed = time.perf_counter() - started
        pictures, busy = counts["pictures"], counts["busy"]
    stop.set()
    for t in threads:
        t.join(60)
    return {**row, "pictures_per_s": pictures / elapsed, "pictures": pictures, "busy_503": busy}


def main() -> None:
    args = _arguments()
    if args.million:
        million(args.repeats, args.million_kind, args.out)
        return
    if args.render_niceness is not None:
        from wsi_ssl.serve import service

        service.RENDER_NICENESS = args.render_niceness
    rows, slide = measure(args.size, args.repeats)
    _print_rows(rows, slide, args.repeats)
    suffix = "" if args.render_niceness is None else f"-nice{args.render_niceness}"
    out = args.out or HERE / "results" / f"serve{suffix}.json"
    record = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "slide_px": slide["px"],
        "n_tiles": slide["n_tiles"],
        "render_niceness": args.render_niceness,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


def _arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=16384, help="slide edge in px")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument(
        "--render-niceness",
        type=int,
        default=None,
        help="CPU niceness of the picture threads (default: the server's; 0 to compare)",
    )
    p.add_argument("--million", action="store_true", help="only the 2**20-tile archive case")
    p.add_argument(
        "--million-kind", default="flat", help="index kind of --million (flat, hnsw, ivfpq)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON to write (default: results/serve.json, serve-nice*.json, serve-1m*.json)",
    )
    return p.parse_args()


def measure(size: int, repeats: int) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Every case on the ``size`` archive's slide through the real server, over the same
    random boxes of 3 x 3 tiles; the rows, and the slide measured (px, tiles, tile size,
    index kind)."""
    from wsi_ssl.search import SearchIndex
    from wsi_ssl.storage import open_store

    root = build_archive(size)
    index = SearchIndex.open(root)
    slide_id = index.slides[0]["slide_id"]
    store = open_store(root).slide(slide_id)
    t = int(store.tiling["tile_size_level0"])
    rng = np.random.default_rng(0)
    starts = store.coords[rng.integers(0, store.n_tiles, repeats + 1)]
    boxes = [(int(x), int(y), 3 * t, 3 * t) for x, y in starts]
    base, server = serve(root)
    get, http_search = _requests(base, slide_id, boxes)
    hits = [http_search(i)["hits"][0]["image"] for i in range(len(boxes))]
    w, h = (int(v) for v in store.source["dimensions"])
    views = [
        f"/api/slides/{slide_id}/region.png?box={int(x)},{int(y)},{w // 4},{h // 4}&px=900"
        for x, y in rng.integers(0, 3 * w // 4, (repeats + 1, 2))
    ]
    rows = {
        "in-process search (baseline)": timings(
            lambda i: index.search(index.query_region(slide_id, boxes[i]), k=8), repeats
        ),
        "POST /api/search": timings(http_search, repeats),
        "region.png of a hit (3x3 tiles, 320 px)": timings(lambda i: get(hits[i]), repeats),
        "region.png of a 4x viewport (900 px)": timings(lambda i: get(views[i]), repeats),
        "thumbnail.png (cached)": timings(
            lambda i: get(f"/api/slides/{slide_id}/thumbnail.png"), repeats
        ),
        **viewer_rows(get, slide_id, (w, h), repeats),
    }
    rows["POST /api/search, idle (again)"] = timings(http_search, repeats)
    rows["POST /api/search, 16 clients fetching pictures"] = search_under_load(
        get, http_search, slide_id, (w, h), repeats
    )
    server.should_exit = True
    slide = {"px": [w, h], "n_tiles": store.n_tiles, "tile_px": t, "index": index.kind}
    return rows, slide


def _requests(
    base: str, slide_id: str, boxes: list[tuple[int, int, int, int]]
) -> tuple[Callable[[str], bytes], Callable[[int], dict]]:
    """GET of a path of the server at ``base``, and its region search of ``boxes[i]``."""

    def get(path: str) -> bytes:
        with urllib.request.urlopen(base + path, timeout=60) as r:
            return bytes(r.read())

    def http_search(i: int) -> dict:
        body = json.dumps({"slide": slide_id, "box": list(boxes[i]), "k": 8}).encode()
        request = urllib.request.Request(
            base + "/api/search", body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            return dict(json.loads(r.read()))

    return get, http_search


def _print_rows(rows: dict[str, dict[str, float]], slide: dict[str, Any], repeats: int) -> None:
    """A line per case (p50, p95, p50 against the in-process baseline), then the search
    under load against idle."""
    base_p50 = rows["in-process search (baseline)"]["p50_ms"]
    w, h = slide["px"]
    print(
        f"slide {w} x {h} px, {slide['n_tiles']} tiles of {slide['tile_px']} px, index "
        f"{slide['index']}, {repeats} requests per case"
    )
    print(f"{'case':<50} {'p50 ms':>8} {'p95 ms':>8} {'x baseline':>10}")
    for name, r in rows.items():
        print(f"{name:<50} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} {r['p50_ms'] / base_p50:>10.2f}")
    loaded = rows["POST /api/search, 16 clients fetching pictures"]
    idle = rows["POST /api/search, idle (again)"]
    print(
        f"under load: p95 {loaded['p95_ms'] / idle['p95_ms']:.2f}x idle (target <= 2x), "
        f"{loaded['pictures_per_s']:.1f} pictures/s drawn ({loaded['pictures']:.0f} pictures), "
        f"{loaded['busy_503']} answered 503"
    )


if __name__ == "__main__":
    main()
