"""The index's encoder, rebuilt from the config recorded with the embeddings (image queries)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_ssl.errors import EncoderMismatchError, WsiSslError

if TYPE_CHECKING:
    from wsi_ssl.encoders import Encoder

__all__ = ["index_encoder"]

_OVERRIDABLE = ("resize", "precision", "input_size", "mean", "std")


def _candidates(cfg: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(spec, kwargs) to try with ``create_encoder``, most likely first."""
    name, arch, source = str(cfg.get("name", "")), str(cfg.get("arch", "")), cfg.get("source")
    overrides = {
        k: (tuple(cfg[k]) if isinstance(cfg[k], list) else cfg[k]) for k in _OVERRIDABLE if k in cfg
    }
    specs: list[str] = []
    if source == "wsi-ssl":
        if cfg.get("weights_path"):
            specs.append(str(cfg["weights_path"]))
        return [(s, {"weights": None, **overrides}) for s in specs]
    for spec in (name, name.removeprefix("random-"), arch):
        if spec and spec not in specs:
            specs.append(spec)
    if source == "random":
        seed = int(cfg.get("seed") or 0)
        return [(s, {"weights": "random", "seed": seed, **overrides}) for s in specs]
    weights = cfg.get("weights_path")
    return [(s, {"weights": weights, **overrides}) for s in specs]


def index_encoder(
    encoder_id: str,
    encoder_config: dict[str, Any],
    *,
    encoder: Encoder | str | Path | None = None,
    weights: str | Path | None = None,
    device: str = "cpu",
) -> Encoder:
    """An encoder whose ``encoder_id`` is the index's.

    Args:
        encoder_id: the index's encoder id.
        encoder_config: the config recorded with the embeddings (``EncoderConfig.to_dict``).
        encoder: an encoder, or a spec for ``create_encoder``, to use instead of rebuilding.
        weights: weights file for ``encoder`` given as a spec.

    Raises:
        EncoderMismatchError: the given encoder is not the index's, or the recorded config
            cannot be rebuilt into it here (the message says to pass ``--encoder``).
    """
    from wsi_ssl.encoders import Encoder, create_encoder

    if encoder is not None:
        enc = (
            encoder
            if isinstance(encoder, Encoder)
            else create_encoder(encoder, weights=weights, device=device)
        )
        if enc.encoder_id != encoder_id:
            raise EncoderMismatchError(
                f"encoder {enc.encoder_id!r} is not the index's {encoder_id!r}: vectors from "
                "different encoders cannot be compared; query with the index's encoder or build "
                "an index for this one"
            )
        return enc.to(device)
    tried = []
    for spec, kwargs in _candidates(encoder_config):
        overrides = {k: v for k, v in kwargs.items() if k in _OVERRIDABLE}
        rest = {k: v for k, v in kwargs.items() if k not in _OVERRIDABLE}
        for ov in (overrides, {}):
            try:
                enc = create_encoder(spec, device=device, **rest, **ov)
            except (WsiSslError, TypeError, ValueError, OSError) as err:
                tried.append(f"{spec}: {type(err).__name__}")
                break
            if enc.encoder_id == encoder_id:
                return enc
            tried.append(f"{spec}: gives {enc.encoder_id}")
    raise EncoderMismatchError(
        f"cannot rebuild the index's encoder {encoder_id!r} here (tried {'; '.join(tried) or 'nothing'}); "
        "pass --encoder NAME_OR_CHECKPOINT (and --weights PATH) naming the encoder that embedded "
        "the archive"
    )
