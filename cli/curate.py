"""``wsi-ssl curate ROOT --out FILE``: a curated selection of pretraining tiles from the
archive's own embeddings (near duplicates removed, even draws over k-means clusters), with a
coverage plot beside it; ``wsi-ssl pretrain ROOT --curation FILE`` trains on it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from wsi_ssl.cli.arg_types import add_encoder_id


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "curate",
        help="select pretraining tiles evenly over clusters of the archive's embeddings",
        description="Read every slide's embeddings of one encoder (wsi-ssl embed), drop near "
        "duplicates (cosine similarity >= --dedup-threshold to a tile kept before), cluster "
        "the rest with k-means and draw the same number of tiles from every cluster. Writes "
        "the selection (JSON, for wsi-ssl pretrain --curation) and a coverage plot (PNG).",
    )
    p.add_argument("root", type=Path, metavar="ROOT", help="archive root with embeddings")
    p.add_argument("--out", required=True, type=Path, metavar="FILE", help="selection (JSON)")
    add_encoder_id(p, "the embeddings to cluster")
    p.add_argument("--n-tiles", type=int, required=True, help="tiles to select")
    p.add_argument("--n-clusters", type=int, default=16, help="k of k-means (default 16)")
    dedup = p.add_mutually_exclusive_group()
    dedup.add_argument(
        "--dedup-threshold",
        type=float,
        default=0.98,
        help="cosine similarity from which a tile is a near duplicate (default 0.98)",
    )
    dedup.add_argument("--no-dedup", action="store_true", help="keep near duplicates")
    p.add_argument("--seed", type=int, default=0, help="k-means and draw seed (default 0)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wsi_ssl.ssl.curation import curate

    result = curate(
        args.root,
        args.out,
        n_tiles=args.n_tiles,
        encoder_id=args.encoder,
        n_clusters=args.n_clusters,
        dedup_threshold=None if args.no_dedup else args.dedup_threshold,
        seed=args.seed,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(
        f"selected {result.n_selected} of {result.n_unique} unique tiles ({result.n_tiles} in "
        f"all) over {result.n_clusters} clusters of {result.encoder_id} embeddings"
    )
    print(f"per cluster  {' '.join(map(str, result.selected_per_cluster))}")
    print(f"selection    {result.path}")
    print(f"coverage     {result.plot}")
    for note in result.notes:
        print(f"note: {note}")
    return 0
