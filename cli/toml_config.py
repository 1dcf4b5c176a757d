"""``--config FILE.toml``: the values of a config dataclass, read and checked in one place."""

from __future__ import annotations

import tomllib
import types
import typing
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


def read_toml_config(
    path: Path | None, config_type: type, *, checked_by_caller: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The values in ``path`` (none when None), each of its field's type (but the keys
    ``checked_by_caller``); unknown keys and values of another type are a `ConfigError`."""
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
    hints = typing.get_type_hints(config_type)
    return {
        key: value if key in checked_by_caller else _typed(path, key, value, hints[key])
        for key, value in values.items()
    }


_KINDS: dict[type, str] = {bool: "true or false", int: "a whole number", float: "a number"}


def _typed(path: Path, key: str, value: Any, hint: Any) -> Any:
    """``value`` as field type ``hint`` wants it (TOML arrays as tuples, whole numbers as
    floats where a float is wanted).

    Raises:
        ConfigError: the value has another type (``qc = "no"``, ``tile_size = 224.5``).
    """
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    options = tuple(o for o in options if o is not type(None))  # TOML has no null
    for option in options:
        origin = typing.get_origin(option) or option
        if origin is tuple and isinstance(value, list):
            return tuple(value)
        if origin is float and _is_number(value):
            return float(value)
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin in (bool, str) and isinstance(value, origin):
            return value
        if origin not in (tuple, float, int, bool, str):
            return value  # a type not checked here: the config checks it
    wanted = " or ".join(
        _KINDS.get(o, "a list" if typing.get_origin(o) is tuple else "a string") for o in options
    )
    raise ConfigError(f"{path}: {key} must be {wanted}, got {value!r}", parameters=(key,))
