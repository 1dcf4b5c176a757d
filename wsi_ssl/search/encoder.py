"""The index's encoder, recreated from the ``EncoderConfig`` recorded with its embeddings.

The recorded config names where the encoder came from (``source``: a seeded random init, a
weights file or a ``wsi-ssl pretrain`` checkpoint), its registry name or architecture, and the
fields that were overridden (resize, precision, input size, normalisation). Creating the
encoder from those and comparing the ``encoder_id`` is the round trip: the same id means the
same vectors.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_ssl.errors import EncoderMismatchError, WsiSslError

if TYPE_CHECKING:
    from wsi_ssl.encoders import Encoder, EncoderConfig

__all__ = ["encoder_from_config", "index_encoder"]

_OVERRIDDEN = ("resize", "precision", "input_size", "mean", "std")


def _spec(config: EncoderConfig) -> str | None:
    """What ``create_encoder`` is given: the checkpoint, the registry name, or the arch."""
    from wsi_ssl.encoders import list_encoders

    if config.source == "wsi-ssl":
        return config.weights_path
    registered = set(list_encoders())
    for name in (config.name, config.name.removeprefix("random-")):
        if name in registered:
            return name
    return config.arch


def encoder_from_config(config: EncoderConfig, *, device: str = "cpu") -> Encoder:
    """The encoder ``config`` describes (its ``encoder_id`` equals ``config.encoder_id``).

    Raises:
        EncoderMismatchError: it cannot be created here (weights missing or moved, unknown
            architecture) or it gives another ``encoder_id``.
    """
    from wsi_ssl.encoders import create_encoder

    spec = _spec(config)
    weights: str | None = "random" if config.source == "random" else config.weights_path
    if config.source == "wsi-ssl":
        weights = None
    overrides = {k: getattr(config, k) for k in _OVERRIDDEN}
    reason = ""
    if spec is None:
        reason = "no checkpoint path was recorded"
    else:
        try:
            enc = create_encoder(
                spec, weights=weights, seed=int(config.seed or 0), device=device, **overrides
            )
        except (WsiSslError, OSError) as err:
            reason = f"{spec}: {type(err).__name__}: {err}"
        else:
            if enc.encoder_id == config.encoder_id:
                return enc
            reason = f"{spec} gives {enc.encoder_id}"
    raise EncoderMismatchError(
        f"cannot recreate encoder {config.encoder_id!r} from its recorded config ({reason}); "
        "pass encoder= (and weights=) naming the encoder that embedded the archive"
    )


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
        encoder: an encoder, or a spec for ``create_encoder``, to use instead of recreating it.
        weights: weights file for ``encoder`` given as a spec.

    Raises:
        EncoderMismatchError: the given encoder is not the index's, or the recorded config
            cannot be recreated into it here.
    """
    from wsi_ssl.encoders import Encoder, EncoderConfig, create_encoder

    if encoder is None:
        try:
            config = EncoderConfig.from_dict(encoder_config)
        except (WsiSslError, TypeError) as err:
            raise EncoderMismatchError(
                f"the index's encoder {encoder_id!r} has no usable recorded config ({err}); "
                "pass encoder= (and weights=) naming the encoder that embedded the archive"
            ) from err
        if config.encoder_id != encoder_id:
            raise EncoderMismatchError(
                f"the recorded encoder config gives {config.encoder_id!r}, not the index's "
                f"{encoder_id!r}; pass encoder= (and weights=)"
            )
        return encoder_from_config(config, device=device)
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
