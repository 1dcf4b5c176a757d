"""The index's encoder, recreated from the ``EncoderConfig`` recorded with its embeddings.

The recorded config names where the encoder came from (``source``: a seeded random init, a
weights file or a ``wsi-ssl pretrain`` checkpoint), its registry name or architecture, and the
fields that were overridden (resize, precision, input size, normalisation). Creating the
encoder from those and comparing the ``encoder_id`` is the round trip: the same id means the
same vectors. An encoder named by the caller (its weights moved, say) gets the recorded
overrides too, so the same weights give the index's id; where it still differs, the error
says in which recorded settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_ssl.errors import EncoderMismatchError, WsiSslError

if TYPE_CHECKING:
    from wsi_ssl.encoders import Encoder, EncoderConfig

__all__ = ["encoder_from_config", "index_encoder"]

_OVERRIDDEN = ("resize", "precision", "input_size", "mean", "std")
_ADVICE_PARAMETERS = ("encoder", "weights")  # the CLI spells them --encoder, --weights


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


def _advice(config: EncoderConfig | None) -> str:
    """What to pass to query with the encoder ``config`` records (None: unreadable)."""
    if config is None:
        return "pass encoder=NAME (and weights=FILE) naming the encoder that embedded the archive"
    if config.source == "wsi-ssl":
        return (
            "pass encoder=CHECKPOINT: the `wsi-ssl pretrain` checkpoint that embedded the "
            f"archive (recorded at {config.weights_path})"
        )
    name = _spec(config) or config.name
    if config.source == "file":
        return (
            f"pass encoder={name!r} and weights=FILE: the weights file the archive was "
            f"embedded with (recorded at {config.weights_path}; its recorded settings, such as "
            "resize, are applied)"
        )
    return f"pass encoder={name!r} naming the encoder that embedded the archive"


def _differences(given: EncoderConfig, recorded: EncoderConfig) -> str:
    """The identity settings in which ``given`` differs from ``recorded``, as a clause ("" when
    none): ``resize 'never', the index's 'bilinear'; the weights (sha256 ..., the index's ...)``;
    another architecture alone when the arch differs."""
    mine, theirs = given.identity(), recorded.identity()
    if mine["arch"] != theirs["arch"]:  # another model: its settings differ as a matter of course
        return f"arch {mine['arch']!r}, the index's {theirs['arch']!r}"
    said = (
        []
        if given.name == recorded.name
        else [f"name {given.name!r}, the index's {recorded.name!r}"]
    )
    for key, value in theirs.items():
        if mine.get(key) == value:
            continue
        if key == "weights_sha256":
            said.append(
                f"the weights (sha256 {mine.get(key, '')[:12]}…, the index's {value[:12]}…)"
            )
        else:
            said.append(f"{key} {mine.get(key)!r}, the index's {value!r}")
    return "; ".join(said)


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
            reason = (
                f"{spec} gives {enc.encoder_id}, differing in {_differences(enc.config, config)}"
            )
    raise EncoderMismatchError(
        f"cannot recreate encoder {config.encoder_id!r} from its recorded config ({reason}); "
        + _advice(config),
        parameters=_ADVICE_PARAMETERS,
    )


def _named_encoder(
    spec: str | Path, weights: str | Path | None, recorded: EncoderConfig | None, device: str
) -> Encoder:
    """The encoder ``spec`` names, with the seed and overrides ``recorded`` (where they apply
    to it: another encoder that refuses them is made as it comes, and told apart later)."""
    from wsi_ssl.encoders import create_encoder

    if recorded is not None:
        overrides = {k: getattr(recorded, k) for k in _OVERRIDDEN}
        seed = int(recorded.seed or 0)
        try:
            return create_encoder(spec, weights=weights, seed=seed, device=device, **overrides)
        except WsiSslError:
            pass  # not the index's encoder, or its weights are not there: as it comes
    return create_encoder(spec, weights=weights, device=device)


def _recorded(encoder_id: str, encoder_config: dict[str, Any]) -> EncoderConfig:
    """The recorded config, checked to give ``encoder_id``."""
    from wsi_ssl.encoders import EncoderConfig

    try:
        config = EncoderConfig.from_dict(encoder_config)
    except (WsiSslError, TypeError) as err:
        raise EncoderMismatchError(
            f"the index's encoder {encoder_id!r} has no usable recorded config ({err}); "
            + _advice(None),
            parameters=_ADVICE_PARAMETERS,
        ) from err
    if config.encoder_id != encoder_id:
        raise EncoderMismatchError(
            f"the recorded encoder config gives {config.encoder_id!r}, not the index's "
            f"{encoder_id!r}; " + _advice(None),
            parameters=_ADVICE_PARAMETERS,
        )
    return config


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
        encoder: an encoder, or a spec for ``create_encoder``, to use instead of recreating it;
            a spec gets the recorded seed and overrides (resize, precision, input size,
            normalisation), so the index's weights at another path give the index's encoder.
        weights: weights file for ``encoder`` given as a spec.

    Raises:
        EncoderMismatchError: the given encoder is not the index's (the message names the
            recorded settings it differs in), or the recorded config cannot be recreated into
            it here.
    """
    from wsi_ssl.encoders import Encoder

    if encoder is None:
        return encoder_from_config(_recorded(encoder_id, encoder_config), device=device)
    try:
        recorded: EncoderConfig | None = _recorded(encoder_id, encoder_config)
    except EncoderMismatchError:
        recorded = None  # nothing to take settings from or to compare with
    if isinstance(encoder, Encoder):
        enc = encoder
    else:
        enc = _named_encoder(encoder, weights, recorded, device)
    if enc.encoder_id != encoder_id:
        diff = _differences(enc.config, recorded) if recorded is not None else ""
        raise EncoderMismatchError(
            f"encoder {enc.encoder_id!r} is not the index's {encoder_id!r}"
            + (f" (it differs in {diff})" if diff else "")
            + ": vectors from different encoders cannot be compared; query with the index's "
            "encoder or build an index for this one"
        )
    return enc.to(device)
