"""The re-tile ``wsi-ssl check`` asks for a damaged or unfinished slide store: the ``wsi-ssl
tile`` command that repeats its recorded tiling, and, first, whether the file it was tiled from
still holds that slide.

A slide's store is named by its content (the fingerprint of its file): a re-tile redoes the
store only when it is given the same slide. The file at the recorded path may since hold
another slide (overwritten by another scan) or be gone (moved, deleted); the plain command
would then tile the other slide under another id, or fail, and leave the damaged store as it
is. So the file is fingerprinted again, only for the stores that need a re-tile, and the fix
then says what happened and what does redo the store.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from wsi_ssl.errors import WsiSslError
from wsi_ssl.storage.catalog import CatalogEntry
from wsi_ssl.storage.fix_commands import tile_flags

__all__ = ["retile_command", "source_problem"]


def retile_command(entry: CatalogEntry | None, store: Path, problem: str | None) -> str:
    """The fix of the store at ``store`` (``{root}`` stands for the archive root): its tile
    command (``SLIDE_FILE`` where the catalog does not list it), led, when ``problem`` (from
    :func:`source_problem`) says its file no longer holds it, by what to do instead."""
    tiling = dict(entry.tiling or {}) if entry is not None else None
    source = shlex.quote(entry.path) if entry is not None else "SLIDE_FILE"
    if entry is None or not (tiling and tiling.get("mpp_table")):
        plain = f"wsi-ssl tile {source} --out {{root}}{tile_flags(tiling)} --no-resume"
        return _led_by(problem, plain, store)
    # a table row's scale over the file's own: --mpp-override would not replace it, so the row
    # is written to a file of its own (keyed by file name: the slide may have moved)
    mpp = tiling.pop("mpp_override")
    row = shlex.quote(_csv_field(Path(entry.path).name))
    table = f"t=$(mktemp) && printf 'slide,mpp\\n%s,%s\\n' {row} {mpp} > \"$t\" && "
    flags = f'{tile_flags(tiling)} --mpp-csv "$t" --no-resume && rm -f "$t"'
    command = f"wsi-ssl tile {source} --out {{root}}{flags}"
    return _led_by(problem, table + command, store)


def _csv_field(text: str) -> str:
    """``text`` as one CSV field (quoted where it holds a comma, quote or line break)."""
    return f'"{text.replace(chr(34), chr(34) * 2)}"' if any(c in text for c in ',"\n\r') else text


def _led_by(problem: str | None, command: str, store: Path) -> str:
    """``command``, led, when ``problem`` says the slide's file (of the store at ``store``)
    no longer holds it, by what to do instead."""
    if problem is None:
        return command
    return (
        f"{problem}: restore the slide's file (its content names the store, not its path) and "
        f"re-tile it: {command} (with its new path if it is elsewhere); or give the slide up: "
        f"rm -r {shlex.quote(str(store))}, then wsi-ssl check {{root}} --repair"
    )


def source_problem(entry: CatalogEntry | None) -> str | None:
    """Why the file the catalog ``entry`` records no longer holds its slide (gone, unreadable,
    another slide now); None when it does, or nothing is recorded to compare (no entry, or a
    relative path, which names a file only from the folder the tiling ran in)."""
    if entry is None:
        return None
    from wsi_ssl.tiling.legacy_ids import legacy_fingerprint
    from wsi_ssl.tiling.source import slide_fingerprint

    path = Path(entry.path)
    if not path.is_absolute():  # an older catalog's path as given: relative to where it ran
        return None
    if not path.exists():
        return f"its slide file {entry.path} is gone (moved or deleted)"
    try:
        now = slide_fingerprint(path)
        if entry.fingerprint in (now, legacy_fingerprint(path)):
            return None  # a DICOM slide tiled under its one file's fingerprint: the same
    except (WsiSslError, OSError) as err:
        return f"its slide file {entry.path} cannot be read ({err})"
    return f"the file at {entry.path} now holds another slide (id {now[:16]}), not this one"
