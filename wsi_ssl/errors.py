"""Typed errors. Each inherits the matching builtin, names the path and says what to do.

Size: one short class per error of every part of the package, kept in one place so callers
and the CLI share a single hierarchy."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from wsi_ssl.listing import first_few

__all__ = [
    "ArchitectureMismatchError",
    "CatalogCorruptError",
    "CatalogWriteError",
    "CheckpointError",
    "ConfigError",
    "CorruptIndexError",
    "CorruptSlideError",
    "DeviceOutOfMemoryError",
    "DeviceUnavailableError",
    "DiskFullError",
    "EmbeddingWriteError",
    "EmbeddingsCorruptError",
    "EmbeddingsIncompleteError",
    "EmbeddingsNotFoundError",
    "EmbeddingsWouldBeDiscardedError",
    "EmbeddingsWouldBeReplacedError",
    "EmptyBagError",
    "EncoderMismatchError",
    "EncoderNotFoundError",
    "ImageQueryError",
    "ImageTooLargeError",
    "IndexBusyError",
    "IndexLockedError",
    "IndexNotFoundError",
    "InputSizeMismatchError",
    "LabelsError",
    "LockFileError",
    "MagnificationMismatchError",
    "MissingMppError",
    "MultiScaleRootError",
    "NoTilesInRegionError",
    "NoTissueError",
    "NonFiniteEmbeddingError",
    "PickleCheckpointError",
    "PresetWeightsNotFoundError",
    "RegionOutsideSlideError",
    "SchemaMismatchError",
    "SlideNotFoundError",
    "StainNormalizationError",
    "StainReferenceError",
    "StoreCorruptError",
    "StoreIncompleteError",
    "StoreLockedError",
    "StoreNotFoundError",
    "StoreRetiledError",
    "TileReadError",
    "TileWorkerDiedError",
    "TilesNotEmbeddedError",
    "TilingMismatchError",
    "TrainingDivergedError",
    "TruncatedSlideError",
    "TruncatedWeightsError",
    "UnknownSlideError",
    "UnsupportedSlideError",
    "WeightsMismatchError",
    "WeightsNotFoundError",
    "WsiSslError",
]


def _root_of(path: str | Path) -> str:
    """The archive root above ``path`` (a slide store or a file in one, an index, the catalog),
    for the commands a message names; "ROOT" when it is not under one."""
    p = Path(path)
    if p.name == "catalog.sqlite":
        return str(p.parent)
    for folder in (p, *p.parents):
        if folder.name in ("slides", "index"):
            return str(folder.parent)
    return "ROOT"


class WsiSslError(Exception):
    """Base class of every error wsi-ssl raises on purpose.

    Messages speak the Python API's language; ``parameters`` names the config fields or
    function arguments a message advises changing, which the CLI turns into its own flags.
    """

    parameters: tuple[str, ...] = ()

    def __init__(self, *args: object, parameters: Sequence[str] = ()) -> None:
        super().__init__(*args)
        if parameters:
            self.parameters = tuple(parameters)


class ConfigError(WsiSslError, ValueError):
    """A configuration value is out of range or inconsistent."""


class SlideNotFoundError(WsiSslError, FileNotFoundError):
    def __init__(
        self, path: str | Path, detail: str = "no such slide file; check the path"
    ) -> None:
        super().__init__(f"{path}: {detail}")
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


class TruncatedSlideError(CorruptSlideError):
    """The slide file is shorter than its own directory says: an interrupted copy or download."""

    def __init__(self, path: str | Path, detail: str) -> None:
        WsiSslError.__init__(
            self, f"{path}: the file is cut short ({detail}); copy it again from its source"
        )
        self.path = Path(path)


class MissingMppError(WsiSslError, ValueError):
    """No usable physical scale: refuse rather than tile at a wrong scale."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(
            f"{path}: no microns-per-pixel in vendor properties, TIFF resolution tags or objective "
            "power; set it with mpp_override=MPP, or give each slide's scale "
            "(pass mpp_overrides={name: MPP} to tile_slides)",  # the CLI: its own flags
            parameters=("mpp_override", "mpp_overrides"),
        )
        self.path = Path(path)


class NoTissueError(WsiSslError, ValueError):
    def __init__(self, path: str | Path, threshold: float, dark: bool = False) -> None:
        if dark:  # fluorescence: stained objects glow on black, no brightfield tissue to find
            message = (
                f"{path}: no tissue found, and the slide's background is dark: it looks like a "
                "fluorescence scan, and wsi-ssl tiles brightfield (H&E, IHC) slides; "
                "tissue_threshold=0 tiles it whole if you mean to"
            )
        else:
            message = (
                f"{path}: no tile has at least {threshold:.0%} tissue; check the slide is not "
                "blank or smaller than one tile, then lower tissue_threshold (tissue pieces "
                "under the detector's minimum area are ignored as debris)"
            )
        super().__init__(message, parameters=("tissue_threshold",))
        self.path = Path(path)


class StoreNotFoundError(WsiSslError, FileNotFoundError):
    """No store at ``path``; ``mid_swap``: a slide store caught between the renames of a
    re-tile (its ``.old`` set aside or its ``.new`` complete beside it), which the message says
    instead of sending the user to tile it."""

    def __init__(self, path: str | Path, what: str = "store", *, mid_swap: bool = False) -> None:
        advice = "run `wsi-ssl tile` first"
        if what == "slide store" and Path(path).suffix != ".zarr":  # a slide's name or file
            advice = (
                "a slide store is ARCHIVE/slides/<slide id>.zarr; open_store(ARCHIVE).slide(NAME) "
                "finds one by the slide's file name or stem"
            )
        if mid_swap:  # ARCHIVE/slides/<id>.zarr: nothing lost, the swap is to finish
            advice = (
                "the slide is caught mid-swap (a re-tile between its renames now, or killed "
                f"there); when that job ends, or after `wsi-ssl check {shlex.quote(str(Path(path).parent.parent))} "
                "--repair`, its complete store is back"
            )
        super().__init__(f"{path}: no such {what}; {advice}")
        self.path = Path(path)


class MultiScaleRootError(StoreNotFoundError):
    """A multi-scale tiling output (one archive root per scale) where one root is needed."""

    def __init__(self, path: str | Path, scales: list[Path]) -> None:
        names = ", ".join(str(p) for p in scales)
        WsiSslError.__init__(
            self,
            f"{path}: not an archive root but one per scale, written by a multi-scale tile "
            f"({names}); name one of them (pretraining reads them all when each is named, "
            "with mixed_scales=True)",  # the CLI drops the aside where there is no such flag
            parameters=("mixed_scales",),
        )
        self.path = Path(path)


class DiskFullError(WsiSslError, OSError):
    """The disk filled up while writing; what was half written has been removed (``advice``,
    when given, replaces what the message says to do)."""

    def __init__(self, path: str | Path, advice: str | None = None) -> None:
        super().__init__(
            f"{path}: no space left on device; "
            + (
                advice
                or "free space or write elsewhere, then re-run (the unfinished output was removed)"
            )
        )
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


class TilingMismatchError(SchemaMismatchError):
    """A slide is tiled otherwise (scale, tile size) than the index it is queried against,
    e.g. re-tiled after indexing."""


class EncoderMismatchError(WsiSslError, ValueError):
    """Vectors or a model were made by another encoder than the one asked for."""


class CheckpointError(WsiSslError, ValueError):
    """A checkpoint is missing, truncated, or for another architecture."""


class DeviceUnavailableError(WsiSslError, RuntimeError):
    """The requested compute device is not present."""


class TrainingDivergedError(WsiSslError, FloatingPointError):
    """Pretraining produced a non-finite loss; the last checkpoint is left as it was."""


# -- encoders and embeddings ------------------------------------------------------------------


class EncoderNotFoundError(WsiSslError, LookupError):
    """No registered encoder, source prefix or checkpoint path matches the name."""

    def __init__(self, name: str, valid: list[str]) -> None:
        base, _, options = name.partition(",")
        settings = [o.strip() for o in options.split(",") if "=" in o]
        if settings and base in valid:  # evaluate's NAME,KEY=VALUE given to another command
            super().__init__(
                f"{name!r}: NAME,KEY=VALUE names an encoder for `wsi-ssl evaluate`; name it "
                f"{base!r} and set {' and '.join(settings)}",
                parameters=tuple(o.partition("=")[0] for o in settings),
            )
        else:
            super().__init__(
                f"{name!r}: not a registered encoder, 'timm/<arch>', 'torchvision/<arch>' or an "
                f"existing checkpoint path; registered encoders: {', '.join(valid)}"
            )
        self.name = name


class WeightsNotFoundError(WsiSslError, FileNotFoundError):
    """An encoder needs a local weights file that is not there (wsi-ssl never downloads);
    ``how``: how the caller gives another file (evaluate's specs: ``NAME,weights=PATH``)."""

    def __init__(
        self, encoder: str, path: str | Path, *, given: bool = False, how: str = "pass weights=PATH"
    ) -> None:
        if given:  # the path was given: it is wrong, not the place to put the weights
            message = f"{path}: no such weights file (given for encoder {encoder!r})"
        else:
            message = (
                f"{path}: no weights file for encoder {encoder!r}; put its state dict there "
                "(torch.save(model.state_dict(), PATH) on a machine that has the weights) or "
                f"{how}; wsi-ssl never downloads weights"
            )
        super().__init__(message, parameters=("weights",))
        self.path = Path(path)


class InputSizeMismatchError(WsiSslError, ValueError):
    """Tiles are not the encoder's input size and its config does not allow resizing."""

    def __init__(
        self,
        where: str,
        tile_size: int,
        input_size: int,
        encoder: str,
        scale: tuple[float, float] | None = None,
    ) -> None:
        """``scale``: (µm/px the tiles would reach the model at if resized, µm/px it was
        trained at) when resizing would not help, so the advice is to re-tile at both."""
        text = (
            f"{where}: tiles are {tile_size} px but encoder {encoder!r} takes {input_size} px and "
            "its config says resize='never'; "
        )
        if scale is None:
            advice = f"re-tile with tile_size={input_size} or choose resize='bilinear' (a "
            advice += "different encoder_id)"
            parameters: tuple[str, ...] = ("tile_size", "resize")
        else:
            resized, trained = scale
            advice = (
                f"re-tile with tile_size={input_size} and mpp={trained:g} (resized, these tiles "
                f"would reach it at {resized:.3g} µm/px, not the {trained:g} µm/px it was "
                "trained at; choose resize='bilinear' with check_mpp=False to embed them so anyway)"
            )
            parameters = ("tile_size", "mpp", "resize", "check_mpp")
        super().__init__(text + advice, parameters=parameters)
        self.tile_size = tile_size
        self.input_size = input_size
        self.encoder = encoder


class NonFiniteEmbeddingError(WsiSslError, FloatingPointError):
    """The encoder produced NaN or inf (or a value float16 cannot hold) for a tile."""

    def __init__(self, slide: str, tile: int, xy: tuple[int, int] | None, detail: str) -> None:
        where = f"tile {tile}" + (f" (level-0 x={xy[0]}, y={xy[1]})" if xy is not None else "")
        super().__init__(
            f"{slide}: {where}: embedding has {detail}; check the encoder weights and precision "
            "(dtype='float32' if values overflow float16)",
            parameters=("dtype",),
        )
        self.slide = slide
        self.tile = tile


class TileWorkerDiedError(WsiSslError, RuntimeError):
    """A tile worker process was killed mid-slide (out of memory, most often)."""

    def __init__(self, slide: str | Path, store: str | Path) -> None:
        super().__init__(
            f"{slide}: a tile worker process died while writing {store} (killed from outside, "
            "most often for lack of memory); the slide's new store was not kept: re-run it with "
            "fewer workers or with scheduler='threads'",
            parameters=("workers", "scheduler"),
        )
        self.path = Path(slide)


class TileReadError(WsiSslError, OSError):
    """Stored tiles cannot be read or decoded."""

    def __init__(self, path: str | Path, start: int, stop: int, detail: str) -> None:
        super().__init__(
            f"{path}: tiles {start}..{stop - 1} cannot be read ({detail}); re-tile this slide "
            f"with the settings it was tiled with (`wsi-ssl check {shlex.quote(str(_root_of(path)))} "
            "--verify-tiles` prints that command)"
        )  # the remedy is another command's, so it is named here
        self.path = Path(path)
        self.tiles = (start, stop)
        self.detail = detail


class EmbeddingsNotFoundError(WsiSslError, FileNotFoundError):
    """No complete embeddings by an encoder (None: by any); ``why`` (when known)
    replaces the advice to embed, e.g. that every slide with some is between the renames of
    a swap."""

    def __init__(
        self, path: str | Path, encoder_id: str | None, available: list[str], why: str = ""
    ) -> None:
        if encoder_id is None:
            text, advice = "by any encoder", why or "run `wsi-ssl embed` first"
        else:
            have = ", ".join(available) if available else "none"
            choose = "name one of those ids (or a unique prefix of one), or " if available else ""
            text = f"{encoder_id!r} (available: {have})"
            advice = why or f"{choose}run `wsi-ssl embed` with that encoder first"
        super().__init__(f"{path}: no complete embeddings {text}; {advice}")
        self.path = Path(path)


class EmbeddingsIncompleteError(WsiSslError, RuntimeError):
    def __init__(self, path: str | Path, encoder_id: str, status: str) -> None:
        super().__init__(
            f"{path}: embeddings {encoder_id!r} have status {status!r}, not 'complete' (a job was "
            "interrupted or failed); re-run `wsi-ssl embed` to redo them"
        )
        self.path = Path(path)


class EmbeddingsCorruptError(WsiSslError, OSError):
    """Complete embeddings whose chunks are missing, unreadable or not finite."""

    def __init__(self, path: str | Path, encoder_id: str, detail: str) -> None:
        super().__init__(
            f"{path}: embeddings {encoder_id!r} are damaged ({detail}); re-embed this slide: "
            f"`wsi-ssl check {shlex.quote(str(_root_of(path)))}` prints the embed command, with the encoder's weights and "
            "settings, that redoes only it"
        )  # export, index and search meet it too: the remedy is embed's
        self.path = Path(path)


class EmbeddingWriteError(WsiSslError, OSError):
    """Embeddings could not be written (disk full, permissions); nothing was left complete."""

    def __init__(self, path: str | Path, detail: str) -> None:
        super().__init__(
            f"{path}: cannot write embeddings ({detail}); free disk space or fix permissions and "
            "re-run the same command (finished slides are kept)"
        )
        self.path = Path(path)


# -- MIL --------------------------------------------------------------------------------------


class LabelsError(WsiSslError, ValueError):
    """A labels CSV cannot be used: missing columns, duplicates, unknown slides, one class.

    ``rows`` holds the 1-based CSV line numbers at fault (the header is line 1).
    """

    def __init__(
        self,
        path: str | Path,
        problem: str,
        rows: list[int] | None = None,
        *,
        parameters: Sequence[str] = (),
    ) -> None:
        self.path = Path(path)
        self.rows = list(rows or [])
        super().__init__(f"{path}: {problem}", parameters=parameters)


class EmptyBagError(WsiSslError, ValueError):
    """A slide has no tile embeddings (no tissue was found): there is nothing to classify."""

    def __init__(self, slide: str, encoder_id: str | None = None) -> None:
        what = f"embeddings {encoder_id!r}" if encoder_id else "its bag"
        super().__init__(
            f"{slide}: {what} have 0 tiles (no tissue was kept); leave the slide out or re-tile "
            "it with a lower tissue_threshold",
            parameters=("tissue_threshold",),
        )
        self.slide = slide


# -- index and search -------------------------------------------------------------------------


class IndexNotFoundError(WsiSslError, FileNotFoundError):
    """No index of that name under ``<root>/index``."""

    def __init__(self, path: str | Path, available: list[str]) -> None:
        have = ", ".join(available) if available else "none"
        super().__init__(
            f"{path}: no such search index (indexes under this root: {have}); "
            f"build one first (`wsi-ssl index {shlex.quote(str(_root_of(path)))}`)"
        )
        self.path = Path(path)


class CorruptIndexError(WsiSslError, OSError):
    """An index file is truncated, altered or unreadable."""

    def __init__(self, path: str | Path, detail: str) -> None:
        super().__init__(
            f"{path}: search index is corrupt or truncated ({detail}); rebuild it "
            f"(`wsi-ssl check {shlex.quote(str(_root_of(path)))}` prints the index command that builds it again)"
        )
        self.path = Path(path)


class IndexBusyError(WsiSslError, RuntimeError):
    """Another process is writing the same index."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(
            f"{path}: another process is writing this index; wait for it to finish and retry"
        )
        self.path = Path(path)


class UnknownSlideError(WsiSslError, LookupError):
    """A slide id (or name) that is not in the archive or the index."""

    def __init__(self, slide: str, where: str, hint: str = "", matches: Sequence[str] = ()) -> None:
        if matches:  # a name several slides share
            message = (
                f"{slide!r} names {len(matches)} slides in {where} ({', '.join(sorted(matches))}); "
                "give the slide id"
            )
        else:
            message = f"{slide!r}: no such slide in {where}" + (f"; {hint}" if hint else "")
        super().__init__(message)
        self.slide = slide


class RegionOutsideSlideError(WsiSslError, ValueError):
    """A query box or point does not lie on the slide."""


class NoTilesInRegionError(WsiSslError, ValueError):
    """A query box or point holds no stored (tissue) tile."""


class ImageQueryError(WsiSslError, ValueError):
    """A query image cannot be read as an RGB image."""


class ImageTooLargeError(ImageQueryError):
    """A query image exceeds the pixel limit (a decompression bomb or simply too big)."""


# -- archive safety ---------------------------------------------------------------------------


class StaleWriterError(WsiSslError, RuntimeError):
    """A tile task whose job no longer writes the store (stopped, another job took over), or
    a worker that cannot read the job's token where the job wrote it."""


class StoreLockedError(WsiSslError, RuntimeError):
    """Another live process holds the writer lock of a store, an embeddings array or an index.

    ``holder`` is a :class:`wsi_ssl.storage.locks.LockHolder` (None when it could not be read).
    """

    def __init__(self, path: str | Path, holder: object | None = None) -> None:
        describe = getattr(holder, "describe", None)
        who = describe() if callable(describe) else "another process"
        super().__init__(
            f"{path} is being written by {who}; wait for that job to finish (or stop it) and re-run",
            parameters=("lock_wait", "wait"),  # the CLI names the command's flag that waits
        )
        self.path = Path(path)
        self.holder = holder


class StoreRetiledError(StoreLockedError):
    """A slide store was re-tiled (or its tiles re-flagged by QC) by another job after this job
    planned from it and before it took the slide's lock: busy, as with a held lock (exit 1; a
    re-run embeds the new tiles), nothing written for it."""

    def __init__(self, path: str | Path) -> None:
        WsiSslError.__init__(
            self,
            f"{path} was re-tiled (or its tiles re-flagged by QC) by another job while this one "
            "ran; none of its vectors were written: re-run to embed its new tiles",
        )
        self.path = Path(path)
        self.holder = None


class LockFileError(WsiSslError, OSError):
    """A writer's lock file could not be created or written: the archive is read-only, not
    ours to write, or its disk is full."""

    def __init__(self, path: str | Path, err: OSError) -> None:
        super().__init__(
            f"{path}: cannot take the writer's lock ({err.strerror or err}); a job that writes "
            "the archive needs it writable, with free space: fix that and re-run"
        )
        self.path = Path(path)


class CatalogWriteError(LockFileError):
    """An archive's ``catalog.sqlite`` cannot be created or written: the archive is read-only
    or not ours to write (``reason`` says which)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        WsiSslError.__init__(
            self,
            f"{path}: cannot write the archive's catalog ({reason}); make it writable (or "
            "run where it is) and re-run",
        )
        self.path = Path(path)
        self.reason = reason


class IndexLockedError(IndexBusyError, StoreLockedError):
    """Another process is writing the same search index (says which)."""

    def __init__(self, path: str | Path, holder: object | None = None) -> None:
        describe = getattr(holder, "describe", None)
        who = describe() if callable(describe) else "another process"
        WsiSslError.__init__(
            self,
            f"{path} is being written by {who}; wait for that job to finish (or stop it) and "
            "re-run",
        )
        self.path = Path(path)
        self.holder = holder


class CatalogCorruptError(WsiSslError, OSError):
    """An archive's ``catalog.sqlite`` cannot be read (the slide stores themselves may be whole)."""

    def __init__(self, path: str | Path, detail: str) -> None:
        super().__init__(
            f"{path}: the archive's catalog is damaged ({detail}); `wsi-ssl check "
            f"{shlex.quote(str(_root_of(path)))} --repair` rebuilds it from the slide stores (the damaged file is "
            "kept beside it)"
        )
        self.path = Path(path)
        self.detail = detail


class StoreCorruptError(WsiSslError, OSError):
    """A slide store's metadata cannot be read; archive-wide commands skip and report it."""

    def __init__(self, path: str | Path, detail: str) -> None:
        super().__init__(
            f"{path}: slide store is damaged ({detail}); `wsi-ssl check {shlex.quote(str(_root_of(path)))}` prints "
            "the tile command that redoes it"
        )
        self.path = Path(path)
        self.detail = detail


# -- encoder zoo ------------------------------------------------------------------------------


class PresetWeightsNotFoundError(WeightsNotFoundError):
    """A zoo preset's published weights file is not on this machine (never downloaded)."""

    def __init__(
        self,
        encoder: str,
        path: str | Path,
        files: list[str],
        card: str,
        how: str = "pass weights=PATH",
    ) -> None:
        WsiSslError.__init__(
            self,
            f"{path}: no weights file for encoder {encoder!r}; download {' or '.join(files)} from "
            f"{card} (accept its licence there) and put it at {path}, or {how}; "
            "wsi-ssl never downloads weights",
            parameters=("weights",),
        )
        self.path = Path(path)


class WeightsMismatchError(CheckpointError):
    """A weights file has missing, unexpected or wrongly shaped tensors for the encoder."""


class TruncatedWeightsError(CheckpointError):
    """A weights file is shorter than its own header says (an interrupted download or copy)."""


class PickleCheckpointError(CheckpointError):
    """A checkpoint that only unpickles with arbitrary code (refused; convert it once)."""


class MagnificationMismatchError(WsiSslError, ValueError):
    """Tiles are at another scale (µm/px at the model input) than the encoder was trained at."""


# -- pretraining recipes ----------------------------------------------------------------------


class ArchitectureMismatchError(ConfigError):
    """A backbone (or ``init`` encoder) whose architecture the pretraining method cannot use."""


# -- annotations and ROIs ---------------------------------------------------------------------


class AnnotationError(WsiSslError, ValueError):
    """An annotation or ROI file that cannot be read, or classes it does not hold."""

    def __init__(self, path: str | Path, detail: str, parameters: Sequence[str] = ()) -> None:
        super().__init__(f"{path}: {detail}", parameters=parameters)
        self.path = Path(path)


class NoLabelsError(WsiSslError, LookupError):
    """A slide store holds no ``labels/<name>`` (it was tiled without that annotation file)."""

    def __init__(self, path: str | Path, name: str, available: list[str]) -> None:
        have = ", ".join(available) or "none"
        super().__init__(
            f"{path}: no labels/{name} in this store (it has: {have}); tile the slide with "
            "roi=ANNOTATION_FILE to store annotation labels"
        )
        self.path = Path(path)


class EmbeddingsWouldBeDiscardedError(WsiSslError, RuntimeError):
    """A re-tile would change the tiles of a store that has embeddings (they would be lost)."""

    def __init__(self, path: str | Path, encoder_ids: list[str], reason: str) -> None:
        super().__init__(
            f"{path}: re-tiling changes its tiles ({reason}), which would discard the embeddings "
            f"{', '.join(encoder_ids)}; the store is kept as it is: pass discard_embeddings=True "
            "to re-tile anyway",
            parameters=("discard_embeddings",),
        )
        self.path = Path(path)
        self.encoder_ids = list(encoder_ids)


class EmbeddingsWouldBeReplacedError(WsiSslError, RuntimeError):
    """An embedding job would replace a slide's complete vectors with vectors made otherwise
    (another stain normalisation): the same encoder id, other values."""

    def __init__(self, path: str | Path, encoder_id: str, had: str, wanted: str) -> None:
        super().__init__(
            f"{path}: its embeddings {encoder_id} were made {had}; this job would replace them "
            f"with vectors made {wanted}: pass resume=False to replace them, or embed as before "
            "to keep them",
            parameters=("resume",),
        )
        self.path = Path(path)


class StainReferenceError(WsiSslError, FileNotFoundError):
    """The reference image a stain normalisation recorded is gone or changed since."""


class StainNormalizationError(WsiSslError, ValueError):
    """An image without enough stained tissue to estimate its stains (blank or white tile)."""

    def __init__(self, what: str, detail: str) -> None:
        super().__init__(f"{what}: {detail}")
        self.what = what


class TilesNotEmbeddedError(WsiSslError, ValueError):
    """Tiles asked for by their vectors were left out by an embedding job run with
    ``skip_flagged_tiles`` (their rows hold no vector)."""

    def __init__(self, path: str | Path, encoder_id: str, tiles: list[int]) -> None:
        shown = first_few(tiles, 8)
        super().__init__(
            f"{path}: embeddings {encoder_id!r} hold no vector for {len(tiles)} of the tiles "
            f"asked for (tiles {shown}: flagged by QC and skipped); embed the slide with "
            "skip_flagged_tiles=False to add them (only the missing tiles are encoded)",
            parameters=("skip_flagged_tiles",),
        )
        self.path = Path(path)
        self.tiles = list(tiles)


class DeviceOutOfMemoryError(WsiSslError, MemoryError):
    """A compute device ran out of memory for the work asked of it (the message says which
    setting to lower)."""
