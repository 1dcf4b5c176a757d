"""The MIL model registry: ``@register_model("name")`` on a factory, timm style.

The registry itself imports nothing heavy; :func:`list_models` and :func:`create_model` import
the built-in model modules (and so torch) on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from wsi_ssl.errors import ConfigError

if TYPE_CHECKING:
    from wsi_ssl.mil.config import MILConfig
    from wsi_ssl.mil.models.base import MILModel

__all__ = ["create_model", "list_models", "register_model"]

ModelFactory = Callable[[int, int, "MILConfig"], "MILModel"]
F = TypeVar("F", bound=ModelFactory)

_REGISTRY: dict[str, ModelFactory] = {}
_BUILTIN_MODULES = ("abmil", "transmil", "meanpool")
_loaded = False


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for name in _BUILTIN_MODULES:
            importlib.import_module(f"wsi_ssl.mil.models.{name}")


def register_model(name: str) -> Callable[[F], F]:
    """Register ``factory(in_dim, n_classes, config) -> MILModel`` under ``name``.

    Example:
        >>> @register_model("my-mil")
        ... def my_mil(in_dim, n_classes, config):
        ...     return MyMIL(in_dim, n_classes, config.hidden_dim)
    """

    def decorate(factory: F) -> F:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ConfigError(f"MIL model {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorate


def list_models() -> list[str]:
    """Names of the registered MIL models, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def create_model(name: str, in_dim: int, n_classes: int, config: MILConfig) -> MILModel:
    """A fresh model ``name`` for ``in_dim``-dimensional tile embeddings and ``n_classes``."""
    _load_builtins()
    if name not in _REGISTRY:
        raise ConfigError(f"model {name!r}: not a MIL model; valid: {', '.join(sorted(_REGISTRY))}")
    if in_dim < 1 or n_classes < 2:
        raise ConfigError(f"in_dim must be >= 1 and n_classes >= 2, got {in_dim}, {n_classes}")
    return _REGISTRY[name](in_dim, n_classes, config)
