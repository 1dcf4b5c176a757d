"""Typed errors. Each inherits the matching builtin, names the path and says what to do."""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "CheckpointError",
    "ConfigError",
    "CorruptSlideError",
    "DeviceUnavailableError",
    "EncoderMismatchError",
    "MissingMppError",
    "NoTissueError",
    "SchemaMismatchError",
    "SlideNotFoundError",
    "StoreIncompleteError",
    "StoreNotFoundError",
    "UnsupportedSlideError",
    "WsiSslError",
]


class WsiSslError(Exception):
    """Base class of every error wsi-ssl raises on purpose."""


class ConfigError(WsiSslError, ValueError):
    """A configuration value is out of range or inconsistent."""


class SlideNotFoundError(WsiSslError, FileNotFoundError):
    def __init__(self, path: str | Path) -> None:
        super().__init__(f"{path}: no such slide file; check the path")
        self.path = Path(path)


class UnsupportedSlideError(WsiSslError, ValueError):
    """No registered backend can open the file."""

    def __init__(self, path: str | Path, reasons: dict[str, str]) -> None:
        tried = "; ".join(f"{name}: {why}" for name, why in reasons.items())
        super().__init__(
            f"{path}: not a slide any backend can open (tried {tried}); "
            "check the file is a whole-slide image and not truncated"
        )
        self.path = Path(path)
        self.reasons = reasons


class CorruptSlideError(WsiSslError, OSError):
    """The slide opened but its pixel data cannot be decoded."""

    def __init__(self, path: str | Path, detail: str) -> None:
        super().__init__(
            f"{path}: pixel data cannot be read ({detail}); re-export or re-scan the slide"
        )
        self.path = Path(path)


class MissingMppError(WsiSslError, ValueError):
    """No usable physical scale: refuse rather than tile at a wrong scale."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(
            f"{path}: no microns-per-pixel in vendor properties, TIFF resolution tags or objective "
            "power; pass --mpp-override MPP (or an 'mpp' column in --mpp-csv) to set it"
        )
        self.path = Path(path)


class NoTissueError(WsiSslError, ValueError):
    def __init__(self, path: str | Path, threshold: float) -> None:
        super().__init__(
            f"{path}: no tile has at least {threshold:.0%} tissue; lower --tissue-threshold "
            "or check the slide is not blank"
        )
        self.path = Path(path)


class StoreNotFoundError(WsiSslError, FileNotFoundError):
    def __init__(self, path: str | Path, what: str = "store") -> None:
        super().__init__(f"{path}: no such {what}; run `wsi-ssl tile` first")
        self.path = Path(path)


class StoreIncompleteError(WsiSslError, RuntimeError):
    def __init__(self, path: str | Path, status: str) -> None:
        super().__init__(
            f"{path}: store status is {status!r}, not 'complete' (a job was interrupted or failed); "
            "re-run `wsi-ssl tile` to redo it"
        )
        self.path = Path(path)


class SchemaMismatchError(WsiSslError, ValueError):
    """A store or file was written with another schema or incompatible settings."""


class EncoderMismatchError(WsiSslError, ValueError):
    """Vectors or a model were made by another encoder than the one asked for."""


class CheckpointError(WsiSslError, ValueError):
    """A checkpoint is missing, truncated, or for another architecture."""


class DeviceUnavailableError(WsiSslError, RuntimeError):
    """The requested compute device is not present."""
