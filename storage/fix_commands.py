"""The commands ``wsi-ssl check`` prints to fix what it finds: the flags that repeat a slide's
recorded tiling, an index's build or its stain normalisation, the encoder name to embed with."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

__all__ = ["encoder_name", "index_flags", "some_names", "stain_flags", "tile_flags"]


def tile_flags(tiling: dict[str, Any] | None) -> str:
    """`` --mpp 1.0 --roi FILE ...``: the ``wsi-ssl tile`` flags of the recorded settings that
    differ from the defaults."""
    from wsi_ssl.config import TilingConfig

    defaults = TilingConfig().to_dict()
    flags = []
    for name, default in defaults.items():  # in TilingConfig's order
        value = (tiling or {}).get(name, default)
        if value == default:
            continue
        flag = "--" + name.replace("_", "-")
        if name == "qc":
            flags.append("--no-qc")
        elif value is True:  # allow_upsampling
            flags.append(flag)
        elif name == "thumbnail_mpp":  # no flag: a --config file's
            flags.append(f"--config TOML(thumbnail_mpp = {value})")
        elif isinstance(value, list):
            flags += [f"{flag} {shlex.quote(str(v))}" for v in value]
        else:
            flags.append(f"{flag} {shlex.quote(str(value))}")
    return "".join(f" {f}" for f in flags)


def some_names(names: list[str]) -> str:
    """Up to five names, comma-separated."""
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


def stain_flags(provenance: dict[str, Any] | None) -> str:
    """The ``wsi-ssl embed`` flags that normalise tiles as ``provenance`` records."""
    if not provenance:
        return "--stain-normalize none"
    reference = shlex.quote(str(provenance.get("reference_path") or "REFERENCE_IMAGE"))
    return f"--stain-normalize {provenance['method']} --stain-reference {reference}"


def encoder_name(array_dir: Path, encoder_id: str) -> str:
    """The encoder name to pass to ``wsi-ssl embed`` (from the array's provenance)."""
    try:
        attrs = json.loads((array_dir / "zarr.json").read_text())["attributes"]
        return str(attrs["encoder"]["name"])
    except (OSError, ValueError, KeyError, TypeError):
        return encoder_id.rsplit("-", 1)[0]


def index_flags(name: str, record: dict[str, Any]) -> str:
    """``--encoder ID --name NAME ...``: the ``wsi-ssl index`` flags that rebuild an index as its
    recorded ``config.json`` says it was built (``ENCODER_ID`` where that is unreadable)."""
    recorded = record.get("config")
    build: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
    flags = [f"--encoder {shlex.quote(str(record.get('encoder_id') or 'ENCODER_ID'))}"]
    flags.append(f"--name {shlex.quote(name)}")
    if build.get("kind", "auto") != "auto":
        flags.append(f"--kind {shlex.quote(str(build['kind']))}")
    if build.get("target_recall", 0.95) != 0.95:
        flags.append(f"--target-recall {build['target_recall']}")
    return " ".join(flags)
