"""``--config FILE.toml``: the values of a config dataclass, read and checked in one place."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from wsi_ssl.errors import ConfigError


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
