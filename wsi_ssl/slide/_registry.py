"""The backend registry and `open_slide`, which tries the backends in registration order."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from wsi_ssl.errors import ConfigError, SlideNotFoundError, UnsupportedSlideError, WsiSslError
from wsi_ssl.slide._base import BaseSlideReader, SlideReader
from wsi_ssl.slide._truncation import check_not_truncated

__all__ = ["BACKENDS", "open_slide", "register_backend"]

BACKENDS: dict[str, type[BaseSlideReader]] = {}
"""Reader classes by backend name, in fallback order (the order they were registered)."""

_Reader = TypeVar("_Reader", bound=type[BaseSlideReader])


def register_backend(name: str) -> Callable[[_Reader], _Reader]:
    """Class decorator: register a reader under `name`, after those already registered."""

    def register(cls: _Reader) -> _Reader:
        if name in BACKENDS:
            raise ValueError(f"slide backend {name!r} is already registered")
        cls.backend = name
        BACKENDS[name] = cls
        return cls

    return register


def open_slide(
    path: str | Path, *, mpp_override: float | None = None, backend: str | None = None
) -> SlideReader:
    """Open a slide with the first backend that can, or with the one named.

    Args:
        path: the slide file (for DICOM, any file of the series).
        mpp_override: microns per pixel to use when the slide records none.
        backend: a key of `BACKENDS` to use only that backend.

    Raises:
        SlideNotFoundError: no such file.
        TruncatedSlideError: a TIFF whose pages store data past the end of the file.
        UnsupportedSlideError: no backend (or not the one named) can open it; `reasons`
            says why for each.
        ConfigError: unknown `backend`, or `mpp_override` out of range.
    """
    if backend is not None and backend not in BACKENDS:
        raise ConfigError(f"unknown slide backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    path = Path(path)
    if not path.exists():
        raise SlideNotFoundError(path)
    if path.is_file():
        check_not_truncated(path)
    reasons: dict[str, str] = {}
    for name in [backend] if backend else BACKENDS:
        try:
            return BACKENDS[name](path, mpp_override=mpp_override)
        except UnsupportedSlideError as err:
            reasons |= err.reasons
        except WsiSslError:
            raise
        except Exception as err:  # a malformed file can break a library's parser in any way
            reasons[name] = f"{type(err).__name__}: {err}"
    raise UnsupportedSlideError(path, reasons)
