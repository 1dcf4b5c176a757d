"""The MIL model registry: ``@register_model("name")`` on a factory, timm style.

The registry imports nothing heavy: the built-in models' names are known up front and their
modules (and so torch) are imported when a model is first created (:mod:`wsi_ssl.registry`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from wsi_ssl.errors import ConfigError
from wsi_ssl.registry import Registry

if TYPE_CHECKING:
    from wsi_ssl.mil.config import MILConfig
    from wsi_ssl.mil.models.base import MILModel

__all__ = ["MODELS", "create_model", "list_models", "register_model"]

ModelFactory = Callable[[int, int, "MILConfig"], "MILModel"]
F = TypeVar("F", bound=ModelFactory)

MODELS: Registry[ModelFactory] = Registry(
    "MIL model",
    builtins={name: f"wsi_ssl.mil.models.{name}" for name in ("abmil", "transmil", "meanpool")},
    parameter="model",
)


def register_model(name: str) -> Callable[[F], F]:
    """Register ``factory(in_dim, n_classes, config) -> MILModel`` under ``name``.

    Example:
        >>> @register_model("my-mil")
        ... def my_mil(in_dim, n_classes, config):
        ...     return MyMIL(in_dim, n_classes, config.hidden_dim)
    """
    return MODELS.register(name)


def list_models() -> list[str]:
    """Names of the registered MIL models, sorted (imports no model module)."""
    return MODELS.names()


def create_model(name: str, in_dim: int, n_classes: int, config: MILConfig) -> MILModel:
    """A fresh model ``name`` for ``in_dim``-dimensional tile embeddings and ``n_classes``."""
    if name not in MODELS:
        raise ConfigError(f"model {name!r}: not a MIL model; valid: {', '.join(list_models())}")
    if in_dim < 1 or n_classes < 2:
        raise ConfigError(f"in_dim must be >= 1 and n_classes >= 2, got {in_dim}, {n_classes}")
    return MODELS.get(name)(in_dim, n_classes, config)
