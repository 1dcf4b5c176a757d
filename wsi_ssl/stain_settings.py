"""The stain normalisation settings shared by ``EmbedConfig`` and ``PretrainConfig``: the
methods :mod:`wsi_ssl.stain` implements and the check of a (method, reference) pair, without
loading torch (configs are built at CLI start)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wsi_ssl.errors import ConfigError, StainReferenceError

__all__ = [
    "METHODS",
    "check_stain_settings",
    "recorded_reference",
    "stain_key",
    "stain_provenance",
    "stain_text",
]

METHODS = ("macenko", "reinhard", "vahadane")


def check_stain_settings(method: str | None, reference: str | None) -> None:
    """Refuse a method without a reference image (or the reverse) and an unknown method.

    Raises:
        ConfigError: naming ``stain_normalize`` (and ``stain_reference``).
    """
    if (method is None) != (reference is None):
        raise ConfigError(
            "stain_normalize and stain_reference go together: give both (a method and a "
            f"reference image) or neither; got {method!r}, {reference!r}",
            parameters=("stain_normalize", "stain_reference"),
        )
    if method is not None and method not in METHODS:
        raise ConfigError(
            f"stain_normalize must be one of {', '.join(METHODS)}; got {method!r}",
            parameters=("stain_normalize",),
        )


def stain_provenance(method: str, reference: str | Path) -> dict[str, Any]:
    """What a stain normalisation was: ``method``, the reference file's ``reference`` name,
    ``reference_path`` (resolved) and ``reference_sha256``."""
    path = Path(reference)
    return {
        "method": method,
        "reference": path.name,
        "reference_path": str(path.resolve()),
        "reference_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


def stain_key(provenance: Any) -> tuple[str, str] | None:
    """What a stain normalisation does to the vectors: its method and the reference's
    sha256 (not where the reference lies), from its provenance (a JSON mapping); None: no
    normalisation."""
    if not provenance:
        return None
    return str(provenance["method"]), str(provenance["reference_sha256"])


def stain_text(provenance: Any) -> str:
    """A provenance in words: ``"reinhard to ref.png"``, or ``"none"``."""
    if not provenance:
        return "none"
    return f"{provenance['method']} to {provenance['reference']}"


def recorded_reference(provenance: Mapping[str, Any], what: str) -> Path:
    """The reference image a provenance recorded (``reference_path``), checked by its sha256.

    Raises:
        StainReferenceError: it is not recorded, gone or changed; the message starts with
            ``what``.
    """
    recorded = provenance.get("reference_path")
    path = Path(str(recorded)) if recorded else None
    found = path is not None and path.is_file()
    if (
        path is None
        or not found
        or (hashlib.sha256(path.read_bytes()).hexdigest() != provenance["reference_sha256"])
    ):
        where = (
            "whose path was not recorded"
            if path is None
            else (f"{path}, which is {'changed' if found else 'gone'}")
        )
        raise StainReferenceError(
            f"{what} stain-normalised ({provenance['method']}) to {provenance['reference']} "
            f"({where})",
            parameters=("stain_normalize", "stain_reference"),
        )
    return path
