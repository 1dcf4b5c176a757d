"""The commands ``wsi-ssl check`` prints to fix what it finds: the flags that repeat a slide's
recorded tiling, an index's build or its stain normalisation, the encoder and stain flags an
embeddings array was made with."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from wsi_ssl.errors import WsiSslError
from wsi_ssl.storage.index_files import index_path, recorded_slide_ids

__all__ = [
    "embedding_stain_flags",
    "encoder_flags",
    "index_flags",
    "stain_flags",
    "tile_flags",
]


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
        elif isinstance(value, list):
            flags += [f"{flag} {shlex.quote(str(v))}" for v in value]
        else:
            flags.append(f"{flag} {shlex.quote(str(value))}")
    return "".join(f" {f}" for f in flags)


def stain_flags(provenance: dict[str, Any] | None) -> str:
    """The ``wsi-ssl embed`` flags that normalise tiles as ``provenance`` records."""
    if not provenance:
        return "--stain-normalize none"
    reference = shlex.quote(str(provenance.get("reference_path") or "REFERENCE_IMAGE"))
    return f"--stain-normalize {provenance['method']} --stain-reference {reference}"


def encoder_flags(attrs: dict[str, Any], encoder_id: str) -> str:
    """``--encoder NAME [--weights FILE] [--seed N] [--resize R] [--precision P] [--dtype D]``:
    the ``wsi-ssl embed`` flags that make the encoder and array an embeddings array's
    ``attrs`` record (its name alone where they are unreadable)."""
    encoder = attrs.get("encoder") or {}
    source, weights = encoder.get("source"), encoder.get("weights_path")
    spec = weights if source == "wsi-ssl" and weights else encoder.get("name")
    flags = [f"--encoder {shlex.quote(str(spec or encoder_id.rsplit('-', 1)[0]))}"]
    if source == "file" and weights:
        flags.append(f"--weights {shlex.quote(str(weights))}")
    if source == "random" and encoder.get("seed"):
        flags.append(f"--seed {int(encoder['seed'])}")
    defaults = _defaults(encoder)  # a setting as the encoder's own default: the same id
    for setting in ("resize", "precision"):
        if encoder.get(setting) not in (None, defaults[setting]):
            flags.append(f"--{setting} {shlex.quote(str(encoder[setting]))}")
    if attrs.get("dtype") not in (None, "float16"):
        flags.append(f"--dtype {attrs['dtype']}")
    return " ".join(flags)


def _defaults(encoder: dict[str, Any]) -> dict[str, Any]:
    """The resize and precision an embed of this encoder gets without flags: a registered
    preset's own, a pretrain run's (bilinear, fp32), else EncoderConfig's (never, fp32)."""
    if encoder.get("source") == "wsi-ssl":
        return {"resize": "bilinear", "precision": "fp32"}
    from wsi_ssl.encoders.registry import ENCODERS

    name = encoder.get("name")
    if isinstance(name, str) and name in ENCODERS:
        config = ENCODERS.get(name).config
        return {"resize": config.resize, "precision": config.precision}
    return {"resize": "never", "precision": "fp32"}


def embedding_stain_flags(attrs: dict[str, Any]) -> str:
    """The ``--stain-normalize`` flags that normalise tiles as an embeddings array's
    ``attrs`` record ("" where nothing is to be said: none, and none by default)."""
    if attrs.get("stain"):
        return stain_flags(attrs["stain"])
    return stain_flags(None) if (attrs.get("encoder") or {}).get("stain") else ""


def index_flags(name: str, record: dict[str, Any], root: Path | None = None) -> str:
    """``--encoder ID --name NAME ...``: the ``wsi-ssl index`` flags that rebuild an index as its
    recorded ``config.json`` says it was built (an index built from chosen slides: those it
    holds, ``--slides``). Where that is unreadable, the encoder is the
    archive ``root``'s one encoder id, or the index's name where that is one (the default name
    of an encoder's index), else ``ENCODER_ID`` with the ids to choose from."""
    recorded = record.get("config")
    build: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
    encoder, choose = record.get("encoder_id") or name, ""
    if not record.get("encoder_id"):
        encoder, choose = _encoder_of_lost_index(name, root)
    flags = [f"--encoder {shlex.quote(encoder)}"]
    flags.append(f"--name {shlex.quote(name)}")
    if build.get("kind", "auto") != "auto":
        flags.append(f"--kind {shlex.quote(str(build['kind']))}")
    if build.get("target_recall", 0.95) != 0.95:
        flags.append(f"--target-recall {build['target_recall']}")
    if record.get("slides_chosen") and root is not None:  # built from slides it was given
        ids = recorded_slide_ids(index_path(root, name))
        flags += [f"--slides {' '.join(ids)}"] if ids else []
    return " ".join(flags) + choose


def _encoder_of_lost_index(name: str, root: Path | None) -> tuple[str, str]:
    """The encoder to rebuild index ``name`` with when its config is lost: ``name`` when it is
    one of the archive ``root``'s encoder ids or the archive has none to tell, the archive's
    only one, else ``ENCODER_ID`` and the words that list the ids to choose from."""
    if root is None:
        return name, ""
    from wsi_ssl.storage.archive import open_store
    from wsi_ssl.storage.resolve import archive_encoder_ids

    try:
        ids = archive_encoder_ids(open_store(root))
    except WsiSslError:
        ids = []
    if name in ids or not ids:
        return name, ""
    if len(ids) == 1:
        return ids[0], ""
    return "ENCODER_ID", f" (ENCODER_ID: one of {', '.join(ids)})"
