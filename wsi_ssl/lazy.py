"""One helper for lazily resolved package exports (module ``__getattr__`` and ``__dir__``).

    __getattr__, __dir__ = lazy_exports(__name__, {"wsi_ssl.search.index": ("SearchIndex",)})

Each module maps to the names it defines; a name that is the module's own last component
(``"wsi_ssl.search.evaluate": ("evaluate",)``) is the submodule itself. Nothing is imported
until a name is first used, so a package can expose torch- or faiss-backed names while
``import package`` stays light. The package still lists the names in ``__all__`` and imports
them under ``if TYPE_CHECKING:`` for static checkers; ``tests/test_imports.py`` checks that
``__all__`` and the exports agree and that every name resolves.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["exported_names", "lazy_exports"]

_REGISTERED: dict[str, dict[str, str]] = {}


def lazy_exports(
    package: str, exports: Mapping[str, Iterable[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` exporting ``exports`` (module -> names)."""
    table = {name: module for module, names in exports.items() for name in names}
    _REGISTERED[package] = table

    def __getattr__(name: str) -> Any:
        target = table.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(target)
        value = module if target.endswith(f".{name}") else getattr(module, name)
        setattr(sys.modules[package], name, value)  # resolved once
        return value

    def __dir__() -> list[str]:
        return sorted(set(table) | set(vars(sys.modules[package])))

    return __getattr__, __dir__


def exported_names(package: str) -> dict[str, str]:
    """name -> defining module of a package set up with :func:`lazy_exports` (after import)."""
    importlib.import_module(package)
    return dict(_REGISTERED.get(package, {}))
