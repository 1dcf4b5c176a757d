"""Verify an archive root (``wsi-ssl check``) and, on request, remove its debris.

What is checked, each problem a :class:`Finding` with the command that fixes it:

- every slide store: metadata readable, status complete, every tile shard file present (and,
  with ``verify_tiles``, holding the bytes whose CRC32C was recorded when it was tiled: every
  tile byte of the archive read), ``coords`` / ``tissue_fraction`` rows equal to the tile
  count, every other array (coords, tissue fraction, thumbnail, mask, QC, labels) readable and
  holding the values whose sha256 was recorded when the store was completed; swap leftovers
  (``<id>.zarr.new`` / ``.old``) of a killed re-tile;
- every embeddings array: complete by content (``embeddings_problem``), and unfinished
  (``.writing-*``) or set-aside (``.replaced-*``) arrays of killed jobs;
- every search index: the manifest, the generation it names (sizes and sha256 of every file),
  indexed slides whose embeddings are gone or changed since (``index --add`` updates them;
  slides re-embedded with another stain normalisation are named with the embed that fixes them),
  slides with sound embeddings by its encoder that it lacks (``index --add`` adds them),
  orphan generations of killed writers, temp files;
- the catalog: readable and there (else one finding; ``repair`` sets a damaged one aside and
  rebuilds it from the complete stores' metadata), against the stores (a slide the catalog
  calls complete whose store is not, and the reverse: ``repair`` adds its row);
- temp files of dead writers anywhere; stale lock files are noted, not problems (harmless).

``repair=True`` removes the debris (temp files, stale locks, orphan generations, unfinished or
damaged embeddings, swap leftovers: finishing a swap that only lacked its last rename) and
marks what must be redone in the catalog (status "failed"), so that a plain re-run of
``wsi-ssl tile`` / ``embed`` / ``index`` redoes it. Anything another process is writing now
(its lock is held) is left alone.
"""

from __future__ import annotations

import itertools
import shlex
import shutil
from pathlib import Path
from typing import Any

from wsi_ssl.errors import (
    CatalogCorruptError,
    CatalogWriteError,
    CorruptIndexError,
    IndexNotFoundError,
    LockFileError,
    StoreLockedError,
    WsiSslError,
)
from wsi_ssl.listing import first_few
from wsi_ssl.stain_settings import stain_key, stain_text
from wsi_ssl.storage.archive import Archive, open_slide_store
from wsi_ssl.storage.atomic import dead_temp_files, remove_path
from wsi_ssl.storage.catalog import CatalogEntry, rebuild_catalog, row_from_store
from wsi_ssl.storage.check_refusals import (
    FULL,
    Refusal,
    archive_unwritable,
    refusal,
    refused_fix,
    unreadable_fix,
    unwritable_finding,
)
from wsi_ssl.storage.check_report import CheckReport, Finding
from wsi_ssl.storage.check_retile import retile_command, source_problem
from wsi_ssl.storage.embeddings import (
    EMBEDDINGS_GROUP,
    PARTIAL_PREFIX,
    REPLACED_PREFIX,
    clear_partial,
    complete_embedding_attrs,
    embeddings_problem,
)
from wsi_ssl.storage.fix_commands import (
    embedding_stain_flags,
    encoder_flags,
    index_flags,
    stain_flags,
)
from wsi_ssl.storage.index_files import (
    INDEX_DIR,
    LOCK_FILE,
    MANIFEST,
    _current_generation,
    _generations,
    index_lock,
    prune_generations,
    read_index_files,
    recorded_config,
)
from wsi_ssl.storage.locks import (
    embeddings_lock,
    embeddings_lock_path,
    is_locked,
    remove_stale_lock,
    slide_lock,
    slide_lock_path,
    stale_lock_files,
)
from wsi_ssl.storage.slide_store import (
    ASIDE_SUFFIX,
    STAGING_SUFFIX,
    STATUS_COMPLETE,
    SlideStore,
    recorded_attrs,
    recover_swap,
)
from wsi_ssl.storage.swaps import mid_swap

__all__ = ["CheckReport", "Finding", "check_archive"]

REPAIR = "wsi-ssl check {root} --repair"


class _Checker:
    def __init__(self, root: Path, repair: bool, decode: bool, verify_tiles: bool) -> None:
        self.root = root
        self.shell_root = shlex.quote(str(root))  # the root as fix commands name it
        self.archive = Archive(root)
        self.repair = repair
        self.decode = decode
        self.verify_tiles = verify_tiles
        self.report = CheckReport(root)
        self.catalog: dict[str, CatalogEntry] = {}
        self.reported: set[str] = set()  # slides with a store finding already
        self.embedded: dict[str, set[str]] = {}  # slide -> encoder ids of its sound embeddings
        self.sources: dict[str, str | None] = {}  # slide -> why its file no longer holds it
        self.unwritable: Refusal | None = None  # why --repair could not write the archive

    def add(self, path: Path, problem: str, fix: str, repair: Any = None) -> None:
        """Record a finding; with ``--repair`` run ``repair()`` (True: done; a string: what it
        did, which becomes the fix's first words)."""
        done = False
        if self.repair and repair is not None:
            try:
                result, err = repair(), None
            except (OSError, WsiSslError) as error:
                result, err = False, error
            refused = refusal(err) if result is False else None
            if result is False and refused is None:  # a repair that failed without saying why
                refused = archive_unwritable(self.root)
            if refused is not None:
                fix = refused_fix(refused, fix)
                if refused.kind != FULL and self.unwritable is None:
                    self.unwritable = refused
            if isinstance(result, str):
                fix = f"{result}: {fix}"
            done = result is True
        self.report.findings.append(
            Finding(str(path), problem, fix.format(root=self.shell_root), repair is not None, done)
        )

    def mark_redo(self, slide_id: str, why: str) -> str | bool:
        """Mark a slide "failed" in the catalog so a plain ``wsi-ssl tile`` redoes it (not
        repaired yet: what was done, for the fix); False: the catalog does not list it."""
        entry = self.catalog.get(slide_id)
        if entry is None:
            return False
        self.archive.catalog.upsert(
            slide_id=slide_id,
            path=entry.path,
            name=entry.name,
            fingerprint=entry.fingerprint,
            status="failed",
            error=why,
            tiling=entry.tiling,
        )
        if self.source_problem(slide_id) is not None:
            return "marked for re-tiling"  # its file no longer holds it: the fix says so
        return "marked for re-tiling (a re-run of its tiling job redoes it)"

    def source_problem(self, slide_id: str) -> str | None:
        """Why the file a slide was tiled from no longer holds it (asked once a slide)."""
        if slide_id not in self.sources:
            self.sources[slide_id] = source_problem(self.catalog.get(slide_id))
        return self.sources[slide_id]

    def tile_fix(self, slide_id: str) -> str:
        """The ``wsi-ssl tile`` that redoes a slide as it was tiled (its catalog settings), or
        what to do where its file no longer holds it (``check_retile``)."""
        store = self.archive.store_path(slide_id)
        entry = self.catalog.get(slide_id)
        return retile_command(entry, store, self.source_problem(slide_id))

    # -- stores ------------------------------------------------------------------------------
    def stores(self) -> None:
        slides = self.archive.slides_dir
        for path in sorted(slides.glob("*.zarr")) if slides.is_dir() else []:
            if path.is_dir():
                self.report.stores += 1
                try:  # as a reader: no tiling job swaps the store while it is checked
                    slide_id = path.name.removesuffix(".zarr")
                    with slide_lock(self.root, slide_id, shared=True, clear_stale=False):
                        self.store(path)
                except StoreLockedError:
                    self.report.busy.append(str(path))
                except LockFileError:  # a read-only archive: no writer can be at work in it
                    self.store(path)
        for suffix in (STAGING_SUFFIX, ASIDE_SUFFIX):
            for left in sorted(slides.glob(f"*.zarr{suffix}")) if slides.is_dir() else []:
                self.swap_leftover(left, left.name.removesuffix(suffix))

    def swap_leftover(self, left: Path, store_name: str) -> None:
        slide_id = store_name.removesuffix(".zarr")
        if is_locked(slide_lock_path(self.root, slide_id)):
            return  # a re-tile is running

        def repair() -> bool:
            with slide_lock(self.root, slide_id):
                if recover_swap(self.archive.store_path(slide_id)) == "rolled forward":
                    self.add_to_catalog(slide_id)  # the new store's settings, not the old row's
            return not left.exists()

        killed = "left by a tiling job that was killed (a first tiling or a re-tile)"
        self.add(left, killed, REPAIR, repair)

    def store(self, path: Path) -> None:
        slide_id = path.name.removesuffix(".zarr")
        try:
            store = open_slide_store(path, require_complete=False)
        except WsiSslError as err:
            detail = _short(err)
            self.reported.add(slide_id)
            self.add(
                path, detail, self.tile_fix(slide_id), lambda: self.mark_redo(slide_id, detail)
            )
            return
        if store.status != STATUS_COMPLETE:  # and no tiling job holds it (see stores)
            self.reported.add(slide_id)
            why = f"status {store.status!r}: a tiling job was interrupted"
            self.add(path, why, self.tile_fix(slide_id), lambda: self.mark_redo(slide_id, why))
            return
        problem = store.problem(verify=self.verify_tiles)
        if problem is not None:
            self.reported.add(slide_id)
            self.add(
                path, problem, self.tile_fix(slide_id), lambda: self.mark_redo(slide_id, problem)
            )
            return
        self.embeddings(store)

    def embeddings(self, store: SlideStore) -> None:
        group = store.path / EMBEDDINGS_GROUP
        for child in sorted(group.iterdir()) if group.is_dir() else []:
            if not child.is_dir():
                continue
            eid = child.name.removeprefix(PARTIAL_PREFIX).removeprefix(REPLACED_PREFIX)
            if is_locked(embeddings_lock_path(self.root, store.slide_id, eid)):
                continue  # being written now
            if child.name.startswith("."):
                what = "unfinished embeddings (a job was killed)"
                self.add(child, what, REPAIR, lambda e=eid: clear_partial(store.path, e))
                continue
            self.report.arrays += 1
            problem = embeddings_problem(store, eid, decode=self.decode)
            if problem is not None:
                attrs = self.embedding_attrs(child)
                fix = f"wsi-ssl embed {{root}} {encoder_flags(attrs, eid)} --slides "
                fix += f"{store.slide_id} {embedding_stain_flags(attrs)}".rstrip()
                self.add(child, f"embeddings {problem}", fix, lambda e=eid: self.drop(store, e))
            else:
                self.embedded.setdefault(store.slide_id, set()).add(eid)

    def embedding_attrs(self, array_dir: Path) -> dict[str, Any]:
        """What an embeddings array records, from it or (damaged) the first readable array of
        the same encoder id on another slide; {} when none is readable."""
        others = self.root.glob(f"slides/*.zarr/{EMBEDDINGS_GROUP}/{array_dir.name}")
        for candidate in itertools.chain([array_dir], others):
            attrs = recorded_attrs(candidate)
            if isinstance(attrs.get("encoder"), dict):
                return attrs
        return {}

    def drop(self, store: SlideStore, encoder_id: str) -> str | bool:
        """Remove damaged embeddings (a plain ``wsi-ssl embed`` then redoes them)."""
        with embeddings_lock(self.root, store.slide_id, encoder_id):
            if embeddings_problem(store, encoder_id, decode=self.decode) is None:
                return True
            shutil.rmtree(store.path / EMBEDDINGS_GROUP / encoder_id)
            return "removed (a re-run of its embedding job redoes it)"

    # -- indexes, catalog, debris ------------------------------------------------------------
    def indexes(self) -> None:
        base = self.root / INDEX_DIR
        for path in sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []:
            self.report.indexes += 1
            self.index(path)

    def index(self, path: Path) -> None:
        name = path.name
        if is_locked(path / ".lock"):
            return  # a writer is at work
        fix = f"wsi-ssl index {{root}} {index_flags(name, recorded_config(path), self.root)}"
        try:
            files = read_index_files(self.root, name, verify=True)
        except (CorruptIndexError, IndexNotFoundError) as err:
            if not (path / MANIFEST).is_file():  # no build of it ever finished
                what = "unfinished first build of a killed or failed index job (nothing complete)"
                self.add(path, what, fix, lambda: self.drop_unfinished_index(name))
                return
            self.add(path, _short(err), fix)
        else:
            self.index_freshness(path, files.config, files.slides)
        current = _current_generation(path)
        gens = _generations(path)
        if current is None or not gens:
            return
        number = int(current.removeprefix("g-"))
        older = [g for n, g in gens if n < number]
        keep = {current, *(g.name for g in older[-1:])}
        for n, gen in gens:
            if gen.name not in keep:
                what = "orphan generation of a killed writer" if n > number else "old generation"

                def repair(gen: Path = gen) -> bool:
                    with index_lock(self.root, name):
                        prune_generations(path, keep)
                    return not gen.exists()

                self.add(gen, what, REPAIR, repair)

    def drop_unfinished_index(self, name: str) -> bool:
        """Remove index ``name`` when no build of it finished (no manifest), under its lock."""
        path = self.root / INDEX_DIR / name
        with index_lock(self.root, name):
            if (path / MANIFEST).is_file():
                return False  # a build finished meanwhile
            for entry in path.iterdir():
                if entry.name != LOCK_FILE:
                    remove_path(entry)
        (path / LOCK_FILE).unlink(missing_ok=True)
        path.rmdir()  # OSError (not empty: a new build began) leaves it to that build
        return True

    def index_freshness(
        self, path: Path, config: dict[str, Any], slides: list[dict[str, Any]]
    ) -> None:
        """Indexed slides whose embeddings are gone or not those indexed (re-tiled,
        re-embedded): the index would answer with tiles that no longer exist. Slides
        re-embedded with another stain normalisation than the index's are named apart:
        ``index --add`` refuses them until they are embedded as the others were. Then slides
        with sound embeddings by its encoder that it lacks (left out damaged or mid-swap by its
        build, embedded since): from what the stores' check found, no vector read; those taken
        out (``--remove``) stay out, as do the others of an index built from chosen slides."""
        encoder_id = str(config.get("encoder_id"))
        stale, other_stain = [], []
        for entry in slides:
            if entry.get("status", "active") != "active":
                continue
            store_path = self.archive.store_path(entry["slide_id"])
            if mid_swap(self.root, entry["slide_id"], encoder_id):
                continue  # the store's finding says to finish the swap; the index keeps it
            now = complete_embedding_attrs(store_path, encoder_id)
            indexed = {
                "coords_sha256": entry.get("coords_sha256"),
                "created": entry.get("embedded"),
            }
            if now is None or any(v is not None and now.get(k) != v for k, v in indexed.items()):
                known = "stain" in config  # indexes from before it was recorded: unknown
                if (
                    now is not None
                    and known
                    and stain_key(now.get("stain")) != stain_key(config["stain"])
                ):
                    other_stain.append((entry, store_path / EMBEDDINGS_GROUP / encoder_id))
                else:
                    stale.append(str(entry.get("name") or entry["slide_id"]))
        add = f"wsi-ssl index {{root}} --name {path.name} --add"
        newest = {e["slide_id"]: e.get("status", "active") for e in slides}  # last entry wins
        lacks = [
            sid
            for sid, ids in sorted(self.embedded.items())
            if encoder_id in ids and newest.get(sid) not in ("active", "excluded")
        ]
        if lacks and not config.get("slides_chosen"):  # built from chosen slides: by design
            names = [getattr(self.catalog.get(sid), "name", None) or sid for sid in lacks]
            what = f"{len(lacks)} slide(s) with complete embeddings by its encoder not in it"
            self.add(path, f"{what} ({first_few(names)}); searches never return them", add)
        if stale:
            self.add(
                path,
                f"{len(stale)} indexed slide(s) changed since indexing (re-tiled, re-embedded or "
                f"embeddings removed: {first_few(stale)}); searches return their old tiles",
                add,
            )
        if other_stain:
            names = [str(e.get("name") or e["slide_id"]) for e, _ in other_stain]
            ids = " ".join(e["slide_id"] for e, _ in other_stain)
            encoder = encoder_flags(self.embedding_attrs(other_stain[0][1]), encoder_id)
            self.add(
                path,
                f"{len(other_stain)} indexed slide(s) re-embedded with another stain "
                f"normalisation than the index's ({stain_text(config['stain'])}: "
                f"{first_few(names)}); searches return their old tiles and index --add refuses them",
                f"wsi-ssl embed {{root}} {encoder} --slides {ids} "
                f"{stain_flags(config['stain'])} --no-resume, then {add}",
            )

    def catalog_agreement(self) -> None:
        scan = self.archive.scan()
        complete, swapping = set(scan.complete), set(self.archive.swapping())
        for sid, entry in self.catalog.items():
            if entry.status != STATUS_COMPLETE or sid in complete | self.reported:
                continue
            if is_locked(slide_lock_path(self.root, sid)):  # a re-tile between its renames
                self.report.busy.append(str(self.archive.store_path(sid)))
            elif sid not in swapping:  # a killed swap's leftovers: their --repair finishes it
                self.add(
                    self.archive.store_path(sid),
                    "the catalog says complete but the store is not",
                    self.tile_fix(sid),
                    lambda s=sid: self.mark_redo(s, "store missing or not complete"),
                )
        self.report.failed_slides = [
            e.path
            for sid, e in self.catalog.items()
            if e.status == "failed" and sid not in complete | self.reported
        ]
        for sid in sorted(complete - set(self.catalog)):
            self.add(
                self.archive.store_path(sid),
                "a complete store the catalog does not list",
                REPAIR,
                lambda s=sid: self.add_to_catalog(s),
            )

    def rebuild_catalog(self) -> bool:
        """Write the catalog from the complete stores' metadata, at once (a damaged one is set
        aside; a full disk or a read-only archive changes nothing)."""
        slides = self.archive.scan().complete
        rows = [row_from_store(self.archive.slide(slide_id)) for slide_id in slides]
        rebuild_catalog(self.root / "catalog.sqlite", rows)
        return True

    def add_to_catalog(self, slide_id: str) -> bool:
        self.archive.catalog.upsert(**row_from_store(self.archive.slide(slide_id)))
        return True

    def debris(self) -> None:
        for temp in dead_temp_files(self.root, recursive=True, skip=("tiles", "c")):
            self.add(temp, "temp file of a killed writer", REPAIR, lambda t=temp: _gone(t))
        for lock in stale_lock_files(self.root):
            if self.repair:  # one a job took meanwhile is no longer stale: that counts too
                gone = lambda p=lock: remove_stale_lock(p) or is_locked(p)  # noqa: E731
                self.add(lock, "stale lock of a killed job", REPAIR, gone)
            else:
                self.report.stale_locks.append(str(lock))

    def run(self) -> CheckReport:
        path = self.root / "catalog.sqlite"
        readable = path.is_file()
        try:
            entries = self.archive.catalog.entries() if readable else []
        except CatalogCorruptError as err:
            self.add(path, f"damaged ({err.detail})", REPAIR, self.rebuild_catalog)
            readable = self.report.findings[-1].repaired
            entries = self.archive.catalog.entries() if readable else []
        except CatalogWriteError as err:  # reading it must write it (a hot journal): refused
            self.add(path, err.reason, unreadable_fix(path))
            readable, entries = False, []
        if not path.exists() and (stores := len(self.archive.scan().complete)):
            self.add(path, f"missing ({stores} complete store(s))", REPAIR, self.rebuild_catalog)
            readable = self.report.findings[-1].repaired
            entries = self.archive.catalog.entries() if readable else []
        self.catalog = {e.slide_id: e for e in entries}
        self.stores()
        self.indexes()
        if readable:  # a damaged one is one finding, not one a store
            self.catalog_agreement()
        self.debris()
        if self.unwritable is not None:  # said once, here, for every repair it refused
            repair = REPAIR.format(root=self.shell_root)
            self.report.findings.append(unwritable_finding(self.unwritable, self.root, repair))
        return self.report


def _short(err: BaseException) -> str:
    """An error's message without the leading path and the trailing advice."""
    return str(err).split(": ", 1)[-1].split("; ", 1)[0]


def _gone(path: Path) -> bool:
    remove_path(path)
    return not path.exists()


def check_archive(
    root: str | Path, *, repair: bool = False, decode: bool = True, verify_tiles: bool = False
) -> CheckReport:
    """Check the archive at ``root`` (see the module docstring); ``repair`` removes debris and
    marks for redo what must be redone; ``decode=False`` skips decoding every embedding row;
    ``verify_tiles`` reads every tile shard against its recorded CRC32C.

    Raises:
        StoreNotFoundError: ``root`` is not an archive.
    """
    from wsi_ssl.storage.archive import open_store

    return _Checker(open_store(root).root, repair, decode, verify_tiles).run()
