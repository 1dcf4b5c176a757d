"""Which of an archive's indexes ``wsi-ssl serve ROOT`` opens the page on (without ``--index``).

The only index; with several, the one named ``main``; without one of that name, the most
recently built (its recorded ``created`` time, then its manifest's time, then its name). The
page offers the others in its "index" choice either way. Torch- and faiss-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEFAULT_NAME", "DefaultIndex", "default_index"]

DEFAULT_NAME = "main"
"""The index served by default when the archive has several."""


@dataclass(frozen=True)
class DefaultIndex:
    """The index to serve and why.

    Args:
        name: its name.
        reason: why it was picked ("the only one", "the one named main", "the most recently
            built").
    """

    name: str
    reason: str


def _built(root: Path, name: str) -> tuple[str, int, str]:
    """Sort key of index ``name``: its recorded build time, its manifest's mtime, its name."""
    from wsi_ssl.storage.index_files import MANIFEST, index_path, recorded_config

    path = index_path(root, name)
    created = recorded_config(path).get("created")
    try:
        written = (path / MANIFEST).stat().st_mtime_ns
    except OSError:
        written = 0
    return (created if isinstance(created, str) else "", written, name)


def default_index(root: str | Path) -> DefaultIndex | None:
    """The index ``wsi-ssl serve ROOT`` serves without ``--index`` (see the module docstring);
    None when ``root`` holds none (``SearchIndex.open`` then says what it is)."""
    from wsi_ssl.storage.index_files import list_indexes

    root = Path(root)
    names = list_indexes(root)
    if not names:
        return None
    if len(names) == 1:
        name, reason = names[0], "the only one"
    elif DEFAULT_NAME in names:
        name, reason = DEFAULT_NAME, f"the one named {DEFAULT_NAME}"
    else:
        name = max(names, key=lambda n: _built(root, n))
        reason = "the most recently built"
    return DefaultIndex(name, reason)
