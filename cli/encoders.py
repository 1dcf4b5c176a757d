"""``wsi-ssl encoders``: the registered encoders and the foundation-model zoo."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "encoders",
        help="list the registered encoders (the foundation-model zoo: dim, µm/px, tile size, "
        "licence, weights file to fetch)",
        description="Weights are never downloaded: fetch the listed file from the model card "
        "and put it at the listed place (or pass --weights PATH to embed).",
    )
    p.add_argument("pattern", nargs="?", help="only names containing PATTERN")
    p.add_argument("--json", action="store_true", help="print JSON on stdout")
    p.set_defaults(func=run_encoders)


def rows(pattern: str | None = None) -> list[dict[str, Any]]:
    """One row per registered encoder: what a user needs to choose and fetch it."""
    from wsi_ssl.encoders import encoder_entry, list_encoders, weights_dir

    out = []
    for name in list_encoders(pattern):
        c = encoder_entry(name).config
        out.append(
            {
                "name": name,
                "dim": c.embed_dim,
                "mpp": list(c.mpp),
                "tile_size": c.input_size,
                "precision": c.precision,
                "licence": c.licence,
                "model_card": c.model_card,
                "weights_files": list(c.weights_files),
                "weights_path": str(weights_dir() / name / c.weights_files[0])
                if c.weights_files
                else "",
                "source": c.source,
                "arch": c.arch,
                "description": c.description,
            }
        )
    return out


def run_encoders(args: argparse.Namespace) -> int:
    from wsi_ssl.encoders import list_encoders
    from wsi_ssl.errors import ConfigError

    table = rows(args.pattern)
    if not table:  # a pattern matching nothing: a bad argument, not an empty table
        raise ConfigError(
            f"no registered encoder name contains {args.pattern!r} (case matters); "
            f"registered: {', '.join(list_encoders())}"
        )
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    lines = [("name", "dim", "µm/px", "tile", "licence", "weights file")]
    for r in table:
        where = r["weights_path"] or ("random init" if r["source"] == "random" else "--weights")
        mpp = "/".join(f"{m:g}" for m in r["mpp"]) or "-"
        lines.append(
            (r["name"], str(r["dim"]), mpp, str(r["tile_size"]), r["licence"] or "-", where)
        )
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    for line in lines:
        print(
            "  ".join(
                c.rjust(w) if i in (1, 3) else c.ljust(w)
                for i, (c, w) in enumerate(zip(line[:5], widths, strict=True))
            )
            + "  "
            + line[5]
        )
    return 0
