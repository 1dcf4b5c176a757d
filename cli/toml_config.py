"""``--config FILE.toml``: the values of a config dataclass, read and checked in one place."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from wsi_ssl.errors import ConfigError


def toml_scales(values: dict[str, Any], path: Path | None) -> tuple[float, ...] | None:
    """Take ``mpp`` out of ``values``: one number, or a list of them (several scales, as
    ``mpp = [0.5, 1.0]``); None when absent.

    Raises:
        ConfigError: ``mpp`` is neither a number nor a non-empty list of numbers.
    """
    if "mpp" not in values:
        return None
    value = values.pop("mpp")
    items = value if isinstance(value, list) else [value]
    if not items or not all(_is_number(v) for v in items):
        raise ConfigError(
            f"{path}: mpp must be a number or a list of numbers (mpp = [0.5, 1.0]), got {value!r}",
            parameters=("mpp",),
        )
    return tuple(float(v) for v in items)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def read_toml_config(path: Path | None, config_type: type) -> dict[str, Any]:
    """The values in ``path`` (none when None); unknown keys are a `ConfigError` listing the
    valid ones."""
    if path is None:
        return {}
    try:
        values = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: cannot read TOML config ({err})") from err
    names = {f.name for f in fields(config_type)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(
            f"{path}: unknown keys {sorted(unknown)}; valid keys: {', '.join(sorted(names))}"
        )
    return values
