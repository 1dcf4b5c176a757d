"""A label filter's cost: FAISS search with most slides left out.

The page's slide-label filter leaves out every slide without a wanted label through a FAISS
``IDSelector``. Baseline: one ``IDSelectorRange`` per left-out slide, unioned left-deep (as it
was built before); against it ``wsi_ssl.search.ids.exclusion_selector`` (consecutive slides
merged into one range, a balanced union). Flat inner-product index of 4,000 slides × 50
tiles of 128-d random vectors, 8 queries, k = 64, 10 slides kept; median of 3 runs.

    python benchmarks/label_filter.py [--slides 4000] [--out PATH]

Prints a table and writes ``results/label_filter.json`` (``--out``). ``--slides 400``: a
quick check that it runs (its figures are not the documented ones).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from wsi_ssl.search.ids import encode_ids, exclusion_selector, slide_id_range

HERE = Path(__file__).resolve().parent
SLIDES, TILES, DIM, K = 4000, 50, 128, 64


def per_slide_selector(excluded: list[int]) -> tuple[Any, list[Any]]:
    """The baseline: one range per left-out slide, unioned left-deep."""
    parts = [faiss.IDSelectorRange(*slide_id_range(n)) for n in excluded]
    keep: list[Any] = list(parts)
    union = parts[0]
    for part in parts[1:]:
        union = faiss.IDSelectorOr(union, part)
        keep.append(union)
    selector = faiss.IDSelectorNot(union)
    keep.append(selector)
    return selector, keep


def seconds(index: Any, queries: np.ndarray, selector: Any) -> float:
    params = faiss.SearchParameters(sel=selector)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        index.search(queries, K, params=params)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--slides", type=int, default=SLIDES, help="slides in the index (>= 20)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "label_filter.json")
    args = p.parse_args()
    if args.slides < 20:
        p.error("--slides must be at least 20")
    slides = args.slides
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((slides * TILES, DIM)).astype("float32")
    ids = encode_ids(np.repeat(np.arange(slides), TILES), np.tile(np.arange(TILES), slides))
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    index.add_with_ids(vectors, ids)
    queries = rng.standard_normal((8, DIM)).astype("float32")
    kept = set(rng.choice(slides, 10, replace=False).tolist())
    rows = {}
    print(f"{'slides left out':>15} {'per-slide ranges s':>19} {'merged ranges s':>16} {'×':>7}")
    for n in (1, slides // 40, slides // 4, slides - 10):  # 1, 100, 1000, 3990 of 4000
        excluded = [s for s in range(slides) if s not in kept][:n]
        base = seconds(index, queries, per_slide_selector(excluded)[0])
        merged = seconds(index, queries, exclusion_selector(None, excluded)[0])
        rows[str(n)] = {"per_slide_s": base, "merged_s": merged}
        print(f"{n:>15} {base:>19.3f} {merged:>16.3f} {base / merged:>7.1f}")
    machine = {"platform": platform.platform(), "cpus": os.cpu_count()}
    result = {"machine": machine, "date": time.strftime("%Y-%m-%d"), "slides": slides, "rows": rows}
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
