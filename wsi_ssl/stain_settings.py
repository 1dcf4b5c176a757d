"""The stain normalisation settings shared by ``EmbedConfig`` and ``PretrainConfig``: the
methods :mod:`wsi_ssl.stain` implements and the check of a (method, reference) pair, without
loading torch (configs are built at CLI start)."""

from __future__ import annotations

from wsi_ssl.errors import ConfigError

__all__ = ["METHODS", "check_stain_settings"]

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
