"""``wsi-ssl serve``."""

from __future__ import annotations

import argparse
import contextlib
import socket
from pathlib import Path

from wsi_ssl.cli.arg_types import whole_number


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="web page: draw a region on a slide, see where similar tissue occurs",
        description="Serves a page over ROOT's search index (build it with `wsi-ssl index`): "
        "pick a slide, drag a box over tissue, and see the most similar regions, tiles or "
        "slides of the archive; click one to open its slide. Listens on loopback by default.",
    )
    p.add_argument("root", type=Path, metavar="ROOT", help="archive root")
    p.add_argument("--index", metavar="NAME", help="index name (default: the only one)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument(
        "--port",
        type=whole_number(0, 65535, "a port 0..65535"),
        default=8765,
        help="port (default 8765; 0 picks a free one)",
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
    from wsi_ssl.search import SearchIndex
    from wsi_ssl.serve import create_app

    index = SearchIndex.open(args.root, args.index)
    app = create_app(index)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as err:
        sock.close()
        raise ConfigError(
            f"cannot listen on {args.host}:{args.port} ({err.strerror}); pass another --port "
            "(0 picks a free one)"
        ) from None
    host, port = sock.getsockname()[:2]
    print(
        f"serving index {index.name} ({index.n_vectors} tiles from {len(index.slides)} slides) "
        f"at http://{host if ':' not in host else f'[{host}]'}:{port}/  (Ctrl+C stops)",
        flush=True,
    )
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl+C after shutting down
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    print("stopped", flush=True)
    return 0
