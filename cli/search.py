"""``wsi-ssl index`` and ``wsi-ssl search``."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from wsi_ssl.cli.arg_types import add_encoder_id, positive_number, whole_number, whole_numbers
from wsi_ssl.search.config import KINDS

if TYPE_CHECKING:
    from wsi_ssl.search import SearchIndex


def register(sub: argparse._SubParsersAction) -> None:
    """Declare the command's arguments.

    Size: one argparse declaration per flag and nothing else; splitting it would scatter them.
    """
    p = sub.add_parser(
        "index",
        help="build, extend or trim the FAISS search index of an archive's embeddings",
        description="Builds ROOT/index/NAME/ from the tile embeddings of one encoder "
        "(exact for small archives, HNSW or IVF-PQ beyond; parameters derived from the size "
        "and recorded). --add appends slides embedded since; --remove drops slides.",
    )
    p.add_argument("root", type=Path, metavar="ROOT", help="archive root")
    add_encoder_id(p, "the embeddings to index")
    p.add_argument("--name", help="index name (default: the encoder id)")
    p.add_argument("--kind", choices=KINDS, default="auto", help="index kind (default auto)")
    p.add_argument(
        "--target-recall",
        type=float,
        default=0.95,
        help="recall@10 vs exact search the approximate kinds calibrate to (default 0.95)",
    )
    p.add_argument(
        "--slides",
        nargs="+",
        metavar="SLIDE",
        help="only these slides: ids, file names or stems (or a unique id prefix)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--add", action="store_true", help="append slides embedded since the build")
    mode.add_argument(
        "--remove", nargs="+", metavar="SLIDE_ID", help="remove these slides from the index"
    )
    mode.add_argument(
        "--compact", action="store_true", help="rebuild an HNSW graph without removed slides"
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=run_index)

    p = sub.add_parser(
        "search",
        help="find tiles, regions or slides similar to a tile, region, image or slide",
        description="Queries ROOT's search index. --slide with --xy: the nearest tiles; with "
        "--box: non-overlapping regions ranked by the summed similarity of matched tiles; "
        "alone: slides like it. --image: regions like an image file. --slides ranks slides.",
    )
    p.add_argument("root", type=Path, metavar="ROOT", help="archive root")
    p.add_argument(
        "--index", dest="name", metavar="NAME", help="index name (default: the only one)"
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--slide", metavar="ID", help="query slide: id, unique id prefix or file name"
    )
    what.add_argument(
        "--image", type=Path, metavar="PATH", help="query image file (PNG, JPEG, TIFF)"
    )
    what.add_argument("--list", action="store_true", help="list the index and its slides")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--xy",
        type=whole_numbers(2, "X,Y"),
        metavar="X,Y",
        help="tile query: a level-0 point on --slide",
    )
    where.add_argument(
        "--box",
        type=whole_numbers(4, "X,Y,W,H"),
        metavar="X,Y,W,H",
        help="region query: a level-0 box on --slide (a negative X or Y needs the = form: "
        "--box=-100,-50,400,400)",
    )
    p.add_argument(
        "--image-mpp",
        type=positive_number,
        metavar="MPP",
        help="microns per pixel of --image (default: the index's)",
    )
    p.add_argument(
        "--encoder",
        metavar="NAME_OR_CHECKPOINT",
        help="encoder for --image (default: rebuilt from the index's record)",
    )
    p.add_argument("--weights", help="weights file for --encoder")
    p.add_argument("-k", "--top", dest="k", type=int, default=10, help="results (default 10)")
    p.add_argument("--exclude-self", action="store_true", help="drop hits on the query slide")
    p.add_argument("--slides", action="store_true", help="rank slides instead of regions/tiles")
    p.add_argument(
        "--hits-per-tile",
        type=whole_number(1),
        metavar="N",
        help="neighbours searched per query tile",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--gallery",
        type=Path,
        metavar="OUT.png",
        help="save a gallery picture: PNG, or JPEG for a .jpg/.jpeg name",
    )
    p.set_defaults(func=run_search)


def _progress(args: argparse.Namespace) -> Callable[[str], None] | None:
    if args.quiet or args.json:
        return None
    return lambda msg: print(msg, file=sys.stderr)


def index_lines(d: dict[str, Any]) -> list[str]:
    """Three lines describing an index (from ``SearchIndex.describe()``), four when its slides
    were stain-normalised."""
    from wsi_ssl.stain_settings import stain_text

    cal = d["calibration"]
    p = d["params"]
    search = ", ".join(f"{k}={p[k]}" for k in ("efSearch", "nprobe") if k in p)
    shape = ", ".join(
        f"{k}={p[k]}"
        for k in ("M", "efConstruction", "nlist", "pq_m", "pq_nbits", "opq", "train_size")
        if k in p
    )
    recall = (
        "exact"
        if cal.get("exact")
        else f"recall@10 {cal.get('recall_at_k')} on {cal.get('queries')} calibration queries "
        f"(target {cal.get('target_recall')}{'' if cal.get('met', True) else ', NOT met'})"
    )
    stain = d.get("stain")
    return [
        f"index {d['name']}: {d['kind']}, {d['n_vectors']} vectors from {d['n_slides']} slides, "
        f"{d['dim']}-d, encoder {d['encoder_id']}",
        f"  {shape or 'no parameters'}{'; ' + search if search else ''}; {recall}",
        *([f"  tiles stain-normalised: {stain_text(stain)}"] if isinstance(stain, dict) else []),
        *(
            ["  stain normalisation: not recorded (an index from before it was)"]
            if stain == "unknown"
            else []
        ),
        f"  {d['index_bytes'] / 2**20:.1f} MiB ({d['bytes_per_vector']} B/vector) at {d['path']}",
    ]


def run_index(args: argparse.Namespace) -> int:
    from wsi_ssl.search import IndexConfig, SearchIndex

    out: dict[str, object] = {}
    damaged: list[str] = []  # slides left out: store or embeddings unreadable
    if args.add or args.remove or args.compact:
        name = args.name
        if name is None and args.encoder is not None:
            from wsi_ssl.search.archive import resolve_encoder_id
            from wsi_ssl.storage import open_store

            name = resolve_encoder_id(open_store(args.root), args.encoder)
        index = SearchIndex.open(args.root, name, mmap=False)
        _check_kept_settings(args, index)
        if args.add:
            summary = index.add(args.slides, progress=_progress(args))
            out["added"] = summary.added
            out["updated"] = summary.updated
            out["removed"] = summary.removed
            out["vectors_added"] = summary.vectors
            out["excluded"] = summary.excluded
            out["notes"] = summary.notes
            damaged = summary.damaged
            n_gone = len(summary.removed)
            gone = f", removed {n_gone} whose embeddings are gone" if n_gone else ""
            lines = [
                f"added {len(summary.added)} slide(s), re-added {len(summary.updated)} "
                f"re-embedded one(s){gone}: {summary.vectors} vectors; {summary.unchanged} "
                "unchanged",
                *summary.notes,
            ]
            if summary.excluded:
                lines.append(
                    f"left out {len(summary.excluded)} slide(s) taken out with --remove (name "
                    "them with --slides to add them again)"
                )
        elif args.remove:
            removed = {s: index.remove(s) for s in args.remove}
            out["removed"] = removed
            lines = [f"removed {s}: {n} vectors" for s, n in removed.items()]
        else:
            index.compact()
            lines = ["compacted"]
    else:
        config = IndexConfig(kind=args.kind, target_recall=args.target_recall)
        index = SearchIndex.build(
            args.root,
            args.encoder,  # None: the archive's only encoder
            name=args.name,
            config=config,
            slides=args.slides,
            progress=_progress(args),
        )
        lines, damaged = list(index.notes), [str(err) for err in index.damaged]
        out["notes"] = index.notes  # slides left out mid-swap, named
    if damaged:
        out["damaged"] = damaged
        lines.append(f"left out {len(damaged)} damaged slide(s)")
        for message in damaged:
            print(f"wsi-ssl: error: {message}", file=sys.stderr)
    out["index"] = index.describe()
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print("\n".join([*lines, *index_lines(index.describe())]))
    return 1 if damaged else 0


def _check_kept_settings(args: argparse.Namespace, index: SearchIndex) -> None:
    """--add/--remove/--compact keep the index's encoder and kind: refuse flags asking for
    others (they were ignored silently)."""
    from wsi_ssl.errors import ConfigError

    if args.encoder is not None and args.name is not None:
        from wsi_ssl.search.archive import resolve_encoder_id
        from wsi_ssl.storage import open_store

        wanted = resolve_encoder_id(open_store(args.root), args.encoder)
        if wanted != index.encoder_id:
            raise ConfigError(
                f"index {index.name} holds {index.encoder_id}'s vectors, not {wanted}'s; leave "
                "--encoder out, or build an index of that encoder under another --name"
            )
    built = index.record.get("config") or {}
    recall = built.get("target_recall", 0.95) if isinstance(built, dict) else 0.95
    if args.kind not in ("auto", index.kind) or args.target_recall not in (0.95, recall):
        raise ConfigError(
            f"--kind and --target-recall set how an index is built; index {index.name} keeps "
            f"its own ({index.kind}) when slides are added, removed or "
            "compacted: rebuild it without --add/--remove/--compact to change them"
        )


def run_search(args: argparse.Namespace) -> int:
    from wsi_ssl.errors import ConfigError
    from wsi_ssl.search import SearchIndex

    image_only = {
        "--image-mpp": args.image_mpp,
        "--encoder": args.encoder,
        "--weights": args.weights,
    }
    query_flags = {
        "--xy": args.xy,
        "--box": args.box,
        "--slides": args.slides or None,
        "--exclude-self": args.exclude_self or None,
        "--hits-per-tile": args.hits_per_tile,
        "--gallery": args.gallery,
        **image_only,
    }  # --slide and --image: argparse refuses them with --list
    if args.list and any(v is not None for v in query_flags.values()):
        given = ", ".join(k for k, v in query_flags.items() if v is not None)
        raise ConfigError(f"--list shows the index and takes no query ({given})")
    if args.image is None and any(v is not None for v in image_only.values()):
        given = ", ".join(k for k, v in image_only.items() if v is not None)
        raise ConfigError(f"{given} go with --image (a slide query uses the index's own vectors)")
    if args.gallery is not None:
        from wsi_ssl.search.gallery import gallery_format

        gallery_format(args.gallery)  # a name for another format: refused before the search
    index = SearchIndex.open(args.root, args.name)
    if args.list:
        _print_list(index, as_json=args.json)
        return 0
    if args.image is not None and (args.xy or args.box):
        raise ConfigError("--xy and --box go with --slide, not --image")
    if args.k < 1:
        raise ConfigError(f"-k must be >= 1, got {args.k}")
    mode: Literal["slides"] | None = "slides" if args.slides else None
    if args.image is not None:
        query = index.query_image(
            args.image, image_mpp=args.image_mpp, encoder=args.encoder, weights=args.weights
        )
    elif args.xy is not None:
        query = index.query_tile(args.slide, args.xy)
    elif args.box is not None:
        query = index.query_region(args.slide, args.box)
    else:
        query = index.query_slide(args.slide)
        mode = "slides"
    result = index.search(
        query,
        k=args.k,
        mode=mode,
        exclude_self=args.exclude_self,
        hits_per_tile=args.hits_per_tile,
    )
    if args.gallery is not None:
        index.gallery(result, args.gallery)
    hit_slides = [] if result.mode == "slides" else [hit.slide_id for hit in result.hits]
    retiled = _retiled_notes(index, hit_slides)  # a slide hit has no tile boxes to be stale
    if args.json:
        d = result.to_dict()
        if args.gallery is not None:
            d["gallery"] = str(args.gallery)
        if retiled:
            d["notes"] = retiled
        print(json.dumps(d, indent=2))
    else:
        print(result.table())
        if args.gallery is not None:
            print(f"gallery: {args.gallery}")
    if query.slide_id is not None and (note := _changed_file_note(index, str(query.slide_id))):
        print(f"note: {note}", file=sys.stderr)
    for note in retiled:
        print(f"note: {note}", file=sys.stderr)
    return 0


def _print_list(index: SearchIndex, *, as_json: bool) -> None:
    """``search --list``: the index and a line a slide, with the vectors it holds of the
    slide (they add up to the header's; fewer than its tiles where QC left tiles out)."""
    if as_json:
        slides = [s.to_dict() for s in index.slides]
        print(json.dumps({"index": index.describe(), "slides": slides}, indent=2))
        return
    print("\n".join(index_lines(index.describe())))
    for s in index.slides:
        tiles = f" of its {s.n_tiles} tiles" if s.vectors != s.n_tiles else ""
        print(f"{s.number:>6}  {s.slide_id}  {s.vectors:>7} vectors{tiles}  {s.name}")


def _retiled_notes(index: SearchIndex, slide_ids: list[str]) -> list[str]:
    """A line for each hit slide whose store no longer holds the tiles it was indexed with."""
    from wsi_ssl.search.retiled import retiled_reason, store_coords_digest

    notes = []
    for slide_id in dict.fromkeys(slide_ids):
        entry = index.resolve_slide(slide_id)
        reason = retiled_reason(entry, functools.partial(store_coords_digest, index.root, slide_id))
        if reason is not None:
            notes.append(reason)
    return notes


def _changed_file_note(index: SearchIndex, slide_id: str) -> str | None:
    """A line when the query slide's file no longer holds what was tiled (its new content is
    another slide, not searched until embedded and added), else None; a damaged catalog is
    said, not raised: the search it follows succeeded."""
    from wsi_ssl.errors import CatalogCorruptError
    from wsi_ssl.storage import open_store
    from wsi_ssl.tiling.source import holds_slide

    try:
        entry = open_store(index.root).catalog.get(slide_id)
    except CatalogCorruptError as err:
        return f"cannot tell whether the query slide's file changed since tiling: {err}"
    if entry is None or not Path(entry.path).exists():  # gone: nothing newer to search
        return None
    if holds_slide(Path(entry.path), entry.fingerprint):
        return None
    return (
        f"{entry.path} has changed since slide {slide_id} was tiled from it: the query is the "
        "indexed earlier version; tile, embed and `wsi-ssl index --add` the file to search its "
        "current content"
    )
