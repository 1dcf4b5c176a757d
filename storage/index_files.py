"""Search index files: ``<root>/index/<name>/``, written atomically, read without unpickling.

Layout::

    <root>/index/<name>/
        MANIFEST.json           {"format", "format_version", "generation", "config_sha256"}
        g-000003/               one generation: everything one reader needs, never modified
            index.faiss         faiss.write_index output (ids = slide number << 32 | tile)
            coords.npy          int64 (M, 2) level-0 x, y of every tile ever added, by offset
            slides.json         the id map: slide number -> slide id, name, offset, status, ...
            config.json         the build config, derived parameters, calibration, and the
                                byte size and sha256 of the three files above
        .lock                   the writer lock (``wsi_ssl.storage.locks``: build, --add,
                                --remove); names the writing pid and host while held

Writing is atomic: a generation is written in full into a temporary directory
``.generation.tmp-<pid>-<host>-<hex>``, fsync'ed, renamed to ``g-<n+1>`` (a fresh name, so
the rename is atomic), and only then does ``MANIFEST.json`` (``wsi_ssl.storage.atomic``: temp
file, fsync, rename, directory fsync) point at it. A reader reads the manifest first and then
the generation it names, so it sees either the old index or the new one, never half of one.
Pruning is relative to the manifest: the new generation and the one the manifest named just
before stay (a reader that read the old manifest a moment before the switch can still open
its files); every other generation (older ones, and orphans of writers killed between the
rename and the manifest) and every temp file are removed by the next writer, which holds the
lock.

Reading never unpickles: ``faiss.read_index`` (memory-mapped for large files: FAISS's
``IO_FLAG_MMAP`` for IVF inverted lists, ``IO_FLAG_MMAP_IFC`` for flat and HNSW vector
storage), JSON, and ``np.load(..., allow_pickle=False)``. Every file's size is checked against
``config.json`` (a truncated file is caught before FAISS parses it), and its sha256 too for
files up to ``VERIFY_MAX_BYTES`` (all files with ``verify=True``); ``config.json`` itself is
checked against the manifest. Anything that does not match raises
:class:`~wsi_ssl.errors.CorruptIndexError`.

A memory-mapped FAISS index is read-only: FAISS aborts the process on a write to it, so
callers must load an index without ``mmap`` before adding or removing vectors.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from wsi_ssl.errors import (
    ConfigError,
    CorruptIndexError,
    DiskFullError,
    IndexLockedError,
    IndexNotFoundError,
    StoreLockedError,
)
from wsi_ssl.interrupts import interrupts_held
from wsi_ssl.storage.atomic import (
    TEMP_MARK,
    atomic_write_json,
    fsync_dir,
    fsync_file,
    remove_path,
    rename_into_place,
    temp_name,
)
from wsi_ssl.storage.index_generation import file_sha256, is_disk_full, write_json
from wsi_ssl.storage.locks import hold_lock

if TYPE_CHECKING:
    import faiss

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "INDEX_DIR",
    "MMAP_MIN_BYTES",
    "VERIFY_MAX_BYTES",
    "IndexFiles",
    "index_lock",
    "index_path",
    "list_indexes",
    "prune_generations",
    "read_faiss_index",
    "read_index",
    "read_index_files",
    "remove_index",
    "remove_temp_files",
    "validate_index_name",
    "write_index",
]

FORMAT = "wsi-ssl-index"
FORMAT_VERSION = 1
INDEX_DIR = "index"
MANIFEST = "MANIFEST.json"
INDEX_FILE = "index.faiss"
COORDS_FILE = "coords.npy"
SLIDES_FILE = "slides.json"
CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
GEN_PREFIX = "g-"
MMAP_MIN_BYTES = 256 << 20
"""``mmap="auto"`` memory-maps FAISS index files of at least this size."""
VERIFY_MAX_BYTES = 256 << 20
"""``verify="auto"`` hashes files up to this size (larger ones: size check only)."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_GEN = re.compile(rf"^{GEN_PREFIX}(\d{{6,}})$")

Verify = bool | Literal["auto"]


@dataclass
class IndexFiles:
    """One generation of an index: everything but the FAISS index itself.

    Attributes:
        root: the archive root.
        name: the index name.
        path: the generation directory the files were read from.
        config: ``config.json`` (build config, derived parameters, calibration, files).
        slides: ``slides.json``: one dict per slide number, in slide-number order.
        coords: int64 (M, 2) level-0 x, y of every tile ever added; slide ``s`` owns rows
            ``slides[s]["offset"] .. + slides[s]["n_tiles"]``.
    """

    root: Path
    name: str
    path: Path
    config: dict[str, Any]
    slides: list[dict[str, Any]]
    coords: np.ndarray

    @property
    def index_file(self) -> Path:
        return self.path / INDEX_FILE


def validate_index_name(name: str) -> str:
    """An index name: letters, digits, '_', '.', '-' (it becomes a directory name)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"index name {name!r}: use 1-128 letters, digits, '_', '.' and '-', starting with a "
            "letter or digit"
        )
    return name


def index_path(root: str | Path, name: str) -> Path:
    """``<root>/index/<name>``."""
    return Path(root) / INDEX_DIR / validate_index_name(name)


def list_indexes(root: str | Path) -> list[str]:
    """Names of the indexes under ``root`` that have a manifest, sorted."""
    base = Path(root) / INDEX_DIR
    if not base.is_dir():
        return []
    return sorted(
        p.name for p in base.iterdir() if _NAME.match(p.name) and (p / MANIFEST).is_file()
    )


# -- locking ----------------------------------------------------------------------------------


@contextlib.contextmanager
def index_lock(root: str | Path, name: str, *, wait: float = 0.0) -> Iterator[None]:
    """Hold the index's writer lock ``<root>/index/<name>/.lock`` (re-entrant in a thread;
    see ``wsi_ssl.storage.locks``).

    Raises:
        IndexLockedError: (an :class:`IndexBusyError`) another process holds it for longer
            than ``wait`` seconds; the message names its pid and host.
    """
    path = index_path(root, name)
    path.mkdir(parents=True, exist_ok=True)
    try:
        lock = hold_lock(path / LOCK_FILE, path, wait=wait)
        lock.__enter__()
    except StoreLockedError as err:
        raise IndexLockedError(path, err.holder) from err
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def remove_index(root: str | Path, name: str) -> bool:
    """Delete the index ``name`` of archive ``root`` under its lock; False if there is none."""
    path = index_path(root, name)
    if not path.is_dir():
        return False
    with index_lock(root, name):
        for entry in path.iterdir():
            if entry.name != LOCK_FILE:
                remove_path(entry)
    remove_path(path)
    return True


# -- writing ----------------------------------------------------------------------------------


def _current_generation(path: Path) -> str | None:
    """The generation the manifest names now (None: no manifest, or unreadable)."""
    try:
        generation = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["generation"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return generation if isinstance(generation, str) and _GEN.match(generation) else None


def recorded_config(path: Path) -> dict[str, Any]:
    """The ``config.json`` of index directory ``path``'s current generation, or with a damaged
    manifest the newest generation's that reads, without any check (for advice on a damaged
    index: its encoder and settings); {} when none is readable."""
    config = _recorded(path, CONFIG_FILE)
    return config if isinstance(config, dict) else {}


def recorded_slide_ids(path: Path) -> list[str]:
    """The slides index directory ``path`` holds (``slides.json``, as :func:`recorded_config`
    reads ``config.json``, entries taken out left out); [] when none is readable."""
    slides = _recorded(path, SLIDES_FILE)
    rows = slides if isinstance(slides, list) else []
    active = [r for r in rows if isinstance(r, dict) and r.get("status", "active") == "active"]
    return list(dict.fromkeys(str(r["slide_id"]) for r in active if "slide_id" in r))


def _recorded(path: Path, file: str) -> Any:
    """The JSON of ``file`` in the current generation of index directory ``path``, else in the
    newest generation where it reads; None when none does."""
    current = _current_generation(path)
    newest_first = [gen.name for _, gen in reversed(_generations(path))]
    for generation in ([current] if current is not None else []) + newest_first:
        try:
            return json.loads((path / generation / file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
    return None


def prune_generations(path: Path, keep: set[str]) -> list[Path]:
    """Remove the generations of index directory ``path`` not named in ``keep`` (call with the
    writer lock); returns what went."""
    removed = [gen for _, gen in _generations(path) if gen.name not in keep]
    for gen in removed:
        shutil.rmtree(gen, ignore_errors=True)
    return removed


def remove_temp_files(path: Path) -> list[Path]:
    """Remove every temp file or directory in index directory ``path`` (call with the writer
    lock: then all of them are left by writers that died)."""
    found = [p for p in path.iterdir() if TEMP_MARK in p.name and p.name.startswith(".")]
    for child in found:
        remove_path(child)
    return found


def _generations(path: Path) -> list[tuple[int, Path]]:
    out = []
    for child in path.iterdir() if path.is_dir() else ():
        m = _GEN.match(child.name)
        if m and child.is_dir():
            out.append((int(m.group(1)), child))
    return sorted(out)


def write_index(
    root: str | Path,
    name: str,
    index: faiss.Index,
    *,
    config: dict[str, Any],
    slides: list[dict[str, Any]],
    coords: np.ndarray,
) -> Path:
    """Write a new generation of index ``name`` atomically; returns its directory.

    ``config`` gets ``format``, ``format_version``, ``name``, ``n_vectors``, ``dim`` and
    ``files`` (byte size and sha256 of each file) filled in. Takes the writer lock (which a
    caller doing read-modify-write should already hold, see :func:`index_lock`).

    Raises:
        IndexBusyError: another process is writing this index.
        DiskFullError: the disk filled up (nothing is left half-written).
        OSError: the disk is not writable (nothing is left half-written).
    """
    import faiss

    coords = np.ascontiguousarray(coords, dtype=np.int64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must be (M, 2), got {coords.shape}")
    path = index_path(root, name)
    with index_lock(root, name):
        remove_temp_files(path)  # debris of killed writers (we hold the lock)
        previous = _current_generation(path)
        tmp = path / temp_name("generation")
        tmp.mkdir()
        renamed: Path | None = None  # the new generation, once renamed in
        try:
            faiss.write_index(index, str(tmp / INDEX_FILE))
            np.save(tmp / COORDS_FILE, coords, allow_pickle=False)
            write_json(tmp / SLIDES_FILE, slides)
            files = {}
            for fname in (INDEX_FILE, COORDS_FILE, SLIDES_FILE):
                fpath = tmp / fname
                fsync_file(fpath)
                files[fname] = {"bytes": fpath.stat().st_size, "sha256": file_sha256(fpath)}
            full = {
                **config,
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "name": name,
                "n_vectors": int(index.ntotal),
                "dim": int(index.d),
                "files": files,
            }
            write_json(tmp / CONFIG_FILE, full)
            fsync_file(tmp / CONFIG_FILE)
            fsync_dir(tmp)
            gens = _generations(path)
            number = gens[-1][0] + 1 if gens else 1
            final = path / f"{GEN_PREFIX}{number:06d}"
            rename_into_place(tmp, final)
            renamed = final
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "generation": final.name,
                "config_sha256": file_sha256(final / CONFIG_FILE),
                "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            atomic_write_json(path / MANIFEST, manifest)
        except BaseException as err:
            with interrupts_held():  # a second Ctrl-C waits for the cleanup
                shutil.rmtree(tmp, ignore_errors=True)
                if renamed is not None and _current_generation(path) != renamed.name:
                    shutil.rmtree(renamed, ignore_errors=True)  # the manifest never named it
            if is_disk_full(err):
                raise DiskFullError(path) from err
            raise
        # keep the new generation and the one the manifest named before (a reader may be
        # opening it); orphans of killed writers and older generations go
        prune_generations(path, {final.name} | ({previous} if previous else set()))
    return final


# -- reading ----------------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as err:
        raise CorruptIndexError(path, f"{what} is missing") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptIndexError(path, f"{what} is not valid JSON: {err}") from err


def _manifest(path: Path, root: Path) -> dict[str, Any]:
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise IndexNotFoundError(path, list_indexes(root))
    manifest = _read_json(mpath, "manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptIndexError(mpath, "not a wsi-ssl index manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CorruptIndexError(
            mpath,
            f"format_version {manifest.get('format_version')!r}, this wsi-ssl reads "
            f"{FORMAT_VERSION}",
        )
    if not isinstance(manifest.get("generation"), str) or not _GEN.match(manifest["generation"]):
        raise CorruptIndexError(mpath, "manifest names no generation")
    return manifest


def _check_file(path: Path, expected: dict[str, Any], verify: Verify) -> None:
    if not path.is_file():
        raise CorruptIndexError(path, "file is missing")
    size = path.stat().st_size
    if size != expected.get("bytes"):
        raise CorruptIndexError(
            path, f"{size} bytes where {expected.get('bytes')} were written (truncated?)"
        )
    hashed = verify is True or (verify == "auto" and size <= VERIFY_MAX_BYTES)
    if hashed and file_sha256(path) != expected.get("sha256"):
        raise CorruptIndexError(path, "sha256 does not match the one recorded at write")


def read_index_files(root: str | Path, name: str, *, verify: Verify = "auto") -> IndexFiles:
    """The config, id map and coords of index ``name`` (checked), without the FAISS index.

    Raises:
        IndexNotFoundError: no index of that name.
        CorruptIndexError: a file is missing, truncated, altered or unparsable.
    """
    root = Path(root)
    path = index_path(root, name)
    for attempt in range(3):  # a writer may remove the generation we were pointed at
        manifest = _manifest(path, root)
        gen = path / manifest["generation"]
        if gen.is_dir() or attempt == 2:
            break
        time.sleep(0.05)
    cpath = gen / CONFIG_FILE
    if not cpath.is_file():
        raise CorruptIndexError(cpath, "config.json of the current generation is missing")
    if file_sha256(cpath) != manifest.get("config_sha256"):
        raise CorruptIndexError(cpath, "config.json does not match the manifest's sha256")
    config = _read_json(cpath, "config.json")
    files = config.get("files") if isinstance(config, dict) else None
    if not isinstance(files, dict) or any(
        f not in files for f in (INDEX_FILE, COORDS_FILE, SLIDES_FILE)
    ):
        raise CorruptIndexError(cpath, "config.json lists no files")
    for fname in (COORDS_FILE, SLIDES_FILE, INDEX_FILE):
        _check_file(gen / fname, files[fname], verify)
    slides = _read_json(gen / SLIDES_FILE, "slides.json")
    try:
        coords = np.load(gen / COORDS_FILE, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise CorruptIndexError(gen / COORDS_FILE, f"cannot read coords: {err}") from err
    if coords.dtype != np.int64 or coords.ndim != 2 or coords.shape[1] != 2:
        raise CorruptIndexError(gen / COORDS_FILE, f"coords are {coords.dtype} {coords.shape}")
    if not isinstance(slides, list) or any(
        not isinstance(s, dict) or s.get("number") != i for i, s in enumerate(slides)
    ):
        raise CorruptIndexError(gen / SLIDES_FILE, "the id map is not a list of numbered slides")
    return IndexFiles(root, name, gen, config, slides, coords)


def read_faiss_index(
    files: IndexFiles, *, mmap: bool | Literal["auto"] = "auto", inverted_lists: bool = False
) -> faiss.Index:
    """The FAISS index of a generation, memory-mapped when ``mmap`` (or large, for "auto");
    ``inverted_lists``: the index has inverted lists (IVF), mapped with ``IO_FLAG_MMAP``.

    Raises:
        CorruptIndexError: FAISS cannot parse the file, or it disagrees with ``config.json``.
    """
    import faiss

    path = files.index_file
    if mmap == "auto":
        mmap = path.stat().st_size >= MMAP_MIN_BYTES
    flags = 0
    if mmap:
        flags = faiss.IO_FLAG_MMAP if inverted_lists else faiss.IO_FLAG_MMAP_IFC
    try:
        index = faiss.read_index(str(path), flags)
    except RuntimeError as err:
        detail = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise CorruptIndexError(path, f"FAISS cannot read it: {detail[:200]}") from err
    if index.ntotal != files.config.get("n_vectors") or index.d != files.config.get("dim"):
        raise CorruptIndexError(
            path,
            f"holds {index.ntotal} vectors of dimension {index.d}, config.json says "
            f"{files.config.get('n_vectors')} of {files.config.get('dim')}",
        )
    return index


def read_index(
    root: str | Path,
    name: str,
    *,
    mmap: bool | Literal["auto"] = "auto",
    verify: Verify = "auto",
) -> tuple[faiss.Index, IndexFiles]:
    """``(faiss_index, files)`` of index ``name``; see :func:`read_index_files`."""
    files = read_index_files(root, name, verify=verify)
    return read_faiss_index(files, mmap=mmap), files
