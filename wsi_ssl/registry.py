"""One registry mechanism (timm style): ``@registry.register("name")`` on a factory.

    MODELS: Registry[ModelFactory] = Registry("MIL model", builtins={"abmil": "wsi_ssl.mil.models.abmil"})

    @MODELS.register("abmil")
    def abmil(in_dim, n_classes, config): ...

``builtins`` maps names to the modules that register them: :meth:`Registry.names` lists them
without importing anything, and :meth:`Registry.get` imports the module on first use, so a
registry of torch models can validate a name while torch stays unloaded.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

from wsi_ssl.errors import ConfigError

__all__ = ["Registry"]

T = TypeVar("T")
F = TypeVar("F")


class Registry(Generic[T]):
    """Named entries of one kind (``what`` names the kind in messages; ``parameter`` is the
    config field that takes a name, so the CLI can hint its flag when a name is unknown)."""

    def __init__(
        self, what: str, builtins: Mapping[str, str] | None = None, parameter: str | None = None
    ) -> None:
        self.what = what
        self.parameter = parameter
        self._builtins = dict(builtins or {})
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator registering ``entry`` under ``name`` (registering it again is a no-op;
        another entry under a taken name is a ``ConfigError``)."""

        def decorate(entry: F) -> F:
            self.add(name, entry)  # type: ignore[arg-type]
            return entry

        return decorate

    def add(self, name: str, entry: T) -> None:
        """Register ``entry`` under ``name``; a built-in name is loaded first, so it cannot be
        taken over by another entry."""
        builtin = self._builtins.get(name)
        if builtin and name not in self._entries and getattr(entry, "__module__", "") != builtin:
            importlib.import_module(builtin)
        if name in self._entries and self._entries[name] is not entry:
            raise ConfigError(f"{self.what} {name!r} is already registered")
        self._entries[name] = entry

    def names(self) -> list[str]:
        """Every registered and built-in name, sorted (imports nothing)."""
        return sorted(set(self._entries) | set(self._builtins))

    def items(self) -> list[tuple[str, T]]:
        """The registered entries in registration order (built-ins not yet loaded are left out)."""
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._builtins

    def get(self, name: str) -> T:
        """The entry ``name`` (importing its built-in module on first use).

        Raises:
            ConfigError: no such entry (the message lists the valid names).
        """
        if name not in self._entries and name in self._builtins:
            importlib.import_module(self._builtins[name])
        if name not in self._entries:
            raise ConfigError(
                f"{self.what} {name!r}: not registered; valid: {', '.join(self.names())}",
                parameters=(self.parameter,) if self.parameter else (),
            )
        return self._entries[name]
