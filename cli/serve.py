"""``wsi-ssl serve``."""

from __future__ import annotations

import argparse
import contextlib
import errno
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from wsi_ssl.cli.arg_types import whole_number

if TYPE_CHECKING:
    from wsi_ssl.search import SearchIndex
    from wsi_ssl.serve.indexes import DefaultIndex


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="web page: draw a region on a slide, see where similar tissue occurs",
        description="Serves a page over ROOT's search index (build it with `wsi-ssl index`): "
        "pick a slide, drag a box over tissue, and see the most similar regions, tiles or "
        "slides of the archive; click one to open its slide. Listens on loopback by default.",
    )
    p.add_argument("root", type=Path, metavar="ROOT", help="archive root")
    p.add_argument(
        "--index",
        dest="name",
        metavar="NAME",
        help="the index the page opens on (default: the only one; with several, the one named "
        "main, else the most recently built); the page offers the archive's other indexes too",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1); any other address needs --token",
    )
    p.add_argument(
        "--token",
        metavar="SECRET",
        help="access token every request must carry (open the printed URL once: it sets a "
        "cookie); required when --host is not loopback",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests for this Host name (default: loopback names only; any name "
        "when --host is not loopback, where the token protects)",
    )
    p.add_argument(
        "--port",
        type=whole_number(0, 65535, "a port 0..65535"),
        default=8765,
        help="port (default 8765; 0 picks a free one)",
    )
    p.add_argument(
        "--labels",
        type=Path,
        metavar="CSV",
        help="slide labels (slide,label, as for `wsi-ssl mil`) for the page's label filter "
        "(default: ROOT/labels/slides.csv when present)",
    )
    p.add_argument(
        "--mil-predictions",
        type=Path,
        metavar="DIR",
        help="the folder `wsi-ssl mil predict` wrote (or its run directory): attention "
        "heatmaps and predicted classes over the slides",
    )
    p.add_argument(
        "--max-image-mb",
        type=whole_number(1, 1024, "megabytes 1..1024"),
        default=16,
        help="largest picture the page may upload to search with (default 16 MB)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wsi_ssl.errors import ConfigError

    try:
        import uvicorn
    except ImportError:
        raise ConfigError(
            "wsi-ssl serve needs fastapi and uvicorn: pip install 'wsi-ssl[serve]'"
        ) from None
    from wsi_ssl.serve import create_app
    from wsi_ssl.serve.indexes import default_index
    from wsi_ssl.serve.security import LOOPBACK_HOSTS, check_token
    from wsi_ssl.storage.index_files import list_indexes

    loopback = args.host in LOOPBACK_HOSTS or args.host.startswith("127.")
    if not loopback and not args.token:
        raise ConfigError(
            f"--host {args.host} would serve the archive to the network without a login; "
            "pass --token SECRET too (or keep the default 127.0.0.1)"
        )
    check_token(args.token)
    chosen = None if args.name is not None else default_index(args.root)
    index = _open_served(args.root, args.name, chosen)
    hosts = (*LOOPBACK_HOSTS, *args.allow_host) if loopback else ("*",)
    app = create_app(
        index,
        allowed_hosts=hosts,
        token=args.token,
        slide_labels=args.labels,
        mil_predictions=args.mil_predictions,
        max_image_bytes=args.max_image_mb << 20,
    )
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as err:
        sock.close()
        raise ConfigError(
            f"cannot listen on {args.host}:{args.port} ({err.strerror}); {_bind_advice(err)}"
        ) from None
    host, port = sock.getsockname()[:2]
    if not loopback:
        print(
            f"wsi-ssl: warning: listening on {args.host}, reachable from other machines; every "
            "request needs the token (plain HTTP: use it only on a trusted network)",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"serving index {index.name} ({index.n_vectors} tiles from {len(index.slides)} slides) "
        f"at http://{host if ':' not in host else f'[{host}]'}:{port}/"
        + (f"?token={args.token}" if args.token else "")
        + "  (Ctrl+C stops)",
        flush=True,
    )
    note = _index_note(index.name, chosen, list_indexes(args.root))
    if note:
        print(note, flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl+C after shutting down
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    print("stopped", flush=True)
    return 0


def _open_served(root: Path, name: str | None, chosen: DefaultIndex | None) -> SearchIndex:
    """Index ``name``, or ``chosen`` (the default) when no --index named one; a damaged
    default is refused naming the archive's intact indexes and the --index that serves one."""
    from wsi_ssl.errors import CorruptIndexError, WsiSslError
    from wsi_ssl.listing import first_few
    from wsi_ssl.search import SearchIndex
    from wsi_ssl.storage.index_files import list_indexes

    if chosen is None:
        return SearchIndex.open(root, name)
    try:
        return SearchIndex.open(root, chosen.name)
    except CorruptIndexError as err:
        intact = []
        for other in list_indexes(root):
            if other != chosen.name:
                with contextlib.suppress(WsiSslError):
                    SearchIndex.open(root, other)
                    intact.append(other)
        if intact:
            which = "it" if len(intact) == 1 else "the first"
            err.args = (
                f"{err}; serve opens index {chosen.name} when no --index names one "
                f"({chosen.reason}); the archive's intact indexes: {first_few(intact)} "
                f"(`--index {intact[0]}` serves {which})",
            )
        raise


def _index_note(served: str, chosen: DefaultIndex | None, names: list[str]) -> str:
    """The start-up line on the archive's other indexes ("" when it has no other): why
    ``served`` was picked when no --index named it, and that the page offers the others."""
    from wsi_ssl.listing import first_few

    others = [n for n in names if n != served]
    if not others:
        return ""
    why = f"index {served} opens the page ({chosen.reason}); " if chosen is not None else ""
    return (
        f"{why}the page's index choice offers the other{'s' if len(others) > 1 else ''} "
        f"too: {first_few(others)}" + (" (--index NAME opens it on another)" if why else "")
    )


def _bind_advice(err: OSError) -> str:
    """What to change when the listening socket cannot be bound."""
    if err.errno == errno.EADDRINUSE:
        return "pass another --port (0 picks a free one)"
    if err.errno == errno.EACCES:
        return "pass a --port of 1024 or more (0 picks a free one)"
    return "pass a --host that is an address of this machine (default 127.0.0.1)"
