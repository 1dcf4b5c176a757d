"""Approximate search with slides left out: hits, recall and time, before and after.

"Other slides only" leaves out the query's own slide, whose tiles are usually its nearest; a
slide-label filter leaves out most of the index. FAISS's HNSW visits a beam of ``efSearch``
vectors and the ``IDSelector`` drops the excluded ones among them, so few hits were left.
Baseline: one search at ``max(efSearch, k)`` with the selector (as before); against it
``wsi_ssl.search.filtered.filtered_search`` (effort scaled by the share left out, then grown
fourfold until two efforts agree; an exact pass over the vectors let through when they are at
most ``EXACT_FLOATS``). HNSW (M 32, efConstruction 64, efSearch 32, the project's
plan) over 200 slides × 1,000 tiles of 128-d clustered vectors, each slide drawn from 3 of 60
tissue clusters so that a slide's own tiles crowd around its queries; 256 queries (tiles of
slide 0, off the index), k = 20, one FAISS thread, median of 5 runs; recall against an exact search of the
vectors let through.

    python benchmarks/filtered_search.py [--slides 200] [--out PATH]

Prints a table and writes ``results/filtered_search.json`` (``--out``). ``--slides 30``: a
quick check that it runs (its figures are not the documented ones).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from wsi_ssl.search.filtered import filtered_search
from wsi_ssl.search.ids import decode_ids, encode_ids, exclusion_selector
from wsi_ssl.search.kinds import index_kind

HERE = Path(__file__).resolve().parent
SLIDES, TILES, DIM, K, QUERIES, EF = 200, 1000, 128, 20, 256, 32


def slide_vectors(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    """``n`` unit vectors of one slide: around 3 of the tissue clusters."""
    own = centres[rng.choice(len(centres), 3, replace=False)]
    x = own[rng.integers(0, 3, n)] + 0.25 * rng.standard_normal((n, DIM))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean([len(set(a[a >= 0]) & set(b)) / len(b) for a, b in zip(ids, truth, strict=True)])
    )


def timed(search: Callable[[], np.ndarray], n: int) -> tuple[np.ndarray, float]:
    """The ids ``search()`` finds and its median milliseconds per query over 5 runs."""
    times = []
    for _ in range(5):
        start = time.perf_counter()
        ids = search()
        times.append((time.perf_counter() - start) * 1000 / n)
    return ids, statistics.median(times)


def run_case(
    index: Any, vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, left_out: list[int]
) -> dict[str, float]:
    kind = index_kind("hnsw")
    params = {"efSearch": EF}
    selector, keep = exclusion_selector(None, left_out)
    allowed = ~np.isin(decode_ids(ids)[0], left_out)
    truth_rows = np.argsort(-(queries @ vectors[allowed].T), axis=1)[:, :K]
    truth = ids[allowed][truth_rows]
    row: dict[str, float] = {}

    def before_search() -> np.ndarray:
        return index.search(queries, K, params=kind.search_params(params, K, selector))[1]

    def after_search() -> np.ndarray:
        return filtered_search(
            index, kind, params, queries, K, int(allowed.sum()), (left_out, None)
        )[1]

    before, row["before_ms"] = timed(before_search, len(queries))
    after, row["after_ms"] = timed(after_search, len(queries))
    del keep
    row["before_hits"] = float((before >= 0).sum(axis=1).mean())
    row["after_hits"] = float((after >= 0).sum(axis=1).mean())
    row["before_recall"], row["after_recall"] = recall(before, truth), recall(after, truth)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--slides", type=int, default=SLIDES, help="slides in the index (>= 11)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "filtered_search.json")
    args = p.parse_args()
    if args.slides < 11:
        p.error("--slides must be at least 11")
    slides = args.slides
    import faiss

    faiss.omp_set_num_threads(1)  # sub-millisecond searches: threads' start-up is noise
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((60, DIM)).astype(np.float32)
    per_slide = [
        slide_vectors(rng, centres, TILES + (QUERIES if s == 0 else 0)) for s in range(slides)
    ]
    queries, per_slide[0] = per_slide[0][:QUERIES], per_slide[0][QUERIES:]
    vectors = np.concatenate(per_slide)
    ids = encode_ids(np.repeat(np.arange(slides), TILES), np.tile(np.arange(TILES), slides))
    kind = index_kind("hnsw")
    index = kind.new_index({"M": 32, "efConstruction": 64}, DIM)
    start = time.perf_counter()
    index.add_with_ids(vectors, ids)
    print(f"HNSW over {len(vectors):,} vectors built in {time.perf_counter() - start:.0f} s")
    cases = {
        "nothing left out": [],
        "the query's own slide left out": [0],
        "all but 10 slides left out (a label filter)": list(range(slides - 10)),
    }
    rows = {}
    print(f"{'case':<46} {'hits before':>11} {'after':>6} {'recall before':>13} {'after':>6} "
          f"{'ms/query before':>15} {'after':>6}")  # fmt: skip
    for name, left_out in cases.items():
        r = rows[name] = run_case(index, vectors, ids, queries, left_out)
        print(f"{name:<46} {r['before_hits']:>11.1f} {r['after_hits']:>6.1f} "
              f"{r['before_recall']:>13.3f} {r['after_recall']:>6.3f} "
              f"{r['before_ms']:>15.2f} {r['after_ms']:>6.2f}")  # fmt: skip
    machine = {"platform": platform.platform(), "cpus": os.cpu_count()}
    result = {"machine": machine, "date": time.strftime("%Y-%m-%d"), "slides": slides, "rows": rows}
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
