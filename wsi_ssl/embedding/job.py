"""The embedding job: every complete slide store (or those named) -> ``embeddings/<encoder_id>``.

One DataLoader runs over all slides to do, so the device stays busy across slide boundaries;
workers decode whole tile ranges; the main process only moves uint8 batches to the device,
runs the encoder (autocast on CUDA per the encoder's precision), and copies the vectors back,
one batch in flight on CUDA so the copy of batch k overlaps the compute of batch k+1.

Per slide: one writer (the embeddings' lock, see ``wsi_ssl.storage.locks``: a slide another job
is writing is reported "busy", or waited for with ``EmbedConfig.wait``), resume (skip
embeddings of the same ``encoder_id`` that are complete *by content*, redo anything else),
damaged stores reported and skipped, failure isolation (a slide that fails is recorded and its partial array removed; the
others go on), NaN/inf detection naming the slide and tile, and an atomic commit
(``wsi_ssl.storage.embeddings``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from wsi_ssl.embedding.config import EmbedConfig
from wsi_ssl.embedding.loader import TileBatches, make_loader, work_units
from wsi_ssl.encoders import Encoder, create_encoder
from wsi_ssl.errors import (
    CheckpointError,
    NonFiniteEmbeddingError,
    StoreLockedError,
    TileReadError,
    WsiSslError,
)
from wsi_ssl.storage import Archive, SlideStore, open_store
from wsi_ssl.storage.embeddings import (
    EmbeddingWriter,
    coords_sha256,
    embeddings_busy,
    embeddings_problem,
    open_embeddings_array,
)
from wsi_ssl.storage.resolve import resolve_slide

__all__ = ["EmbedSummary", "SlideEmbedResult", "embed", "embed_for_demo", "embed_slide"]


@dataclass
class SlideEmbedResult:
    """What happened to one slide."""

    slide_id: str
    status: str  # "complete" | "skipped" | "busy" (another job writes it) | "failed"
    n_tiles: int = 0
    error: str | None = None
    error_type: str | None = None
    seconds: float = 0.0


@dataclass
class EmbedSummary:
    """The outcome of a job; ``to_dict()`` is the ``--json`` output."""

    root: str
    encoder_id: str
    encoder: dict[str, Any]
    config: dict[str, Any]
    compute: dict[str, Any]
    results: list[SlideEmbedResult] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)  # stores left out: not complete
    seconds: float = 0.0
    loader_wait_s: float = 0.0  # time the main process waited for decoded tiles

    @property
    def failed(self) -> list[SlideEmbedResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def busy(self) -> list[SlideEmbedResult]:
        return [r for r in self.results if r.status == "busy"]

    @property
    def tiles_embedded(self) -> int:
        return sum(r.n_tiles for r in self.results if r.status == "complete")

    def to_dict(self) -> dict[str, Any]:
        counts = {
            s: sum(r.status == s for r in self.results)
            for s in ("complete", "skipped", "busy", "failed")
        }
        return {
            "root": self.root,
            "encoder_id": self.encoder_id,
            **counts,
            "tiles_embedded": self.tiles_embedded,
            "seconds": round(self.seconds, 3),
            "loader_wait_s": round(self.loader_wait_s, 3),
            "tiles_per_s": round(self.tiles_embedded / self.seconds, 1) if self.seconds else 0.0,
            "incomplete_stores": self.incomplete,
            "encoder": self.encoder,
            "config": self.config,
            "compute": self.compute,
            "slides": [asdict(r) for r in self.results],
        }

    def lines(self) -> list[str]:
        """Human-readable report: one line per slide, then a total."""
        out = []
        for r in self.results:
            line = f"{r.status:>8}  {r.n_tiles:>7} tiles  {r.seconds:6.1f}s  {r.slide_id}"
            out.append(line if r.error is None else f"{line}\n          {r.error_type}: {r.error}")
        d = self.to_dict()
        out.append(
            f"{d['complete']} embedded, {d['skipped']} already complete, {d['busy']} busy "
            f"(another job is writing them), {d['failed']} failed; "
            f"{d['tiles_embedded']} tiles at {d['tiles_per_s']} tiles/s with {self.encoder_id}"
        )
        if self.incomplete:
            out.append(f"left out {len(self.incomplete)} store(s) that are not complete")
        return out


def _failed(slide_id: str, err: BaseException, seconds: float) -> SlideEmbedResult:
    status = "busy" if isinstance(err, StoreLockedError) else "failed"
    result = SlideEmbedResult(
        slide_id, status, error=str(err), error_type=type(err).__name__, seconds=seconds
    )
    result.exception = err  # type: ignore[attr-defined]  # not a field: not in to_dict()
    return result


@dataclass
class _Slide:
    """A slide to embed and its progress."""

    store: SlideStore
    n: int
    coords: np.ndarray
    attrs: dict[str, Any]
    writer: EmbeddingWriter | None = None
    received: int = 0
    started: float = 0.0
    result: SlideEmbedResult | None = None

    @property
    def done(self) -> bool:
        return self.result is not None


@contextlib.contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def _nonfinite(out: np.ndarray, raw: np.ndarray) -> tuple[int, str] | None:
    """(row, what) of the first row with a non-finite value, else None."""
    ok = np.isfinite(out).all(axis=1)
    if ok.all():
        return None
    row = int(np.argmin(ok))
    vals = raw[row]
    if np.isnan(vals).any():
        what = "NaN"
    elif np.isinf(vals).any():
        what = "inf"
    else:
        what = f"a value beyond {out.dtype} range (max |x| = {np.abs(vals).max():.4g})"
    return row, what


class _Job:
    def __init__(
        self, archive: Archive, encoder: Encoder, config: EmbedConfig, progress: bool
    ) -> None:
        from wsi_ssl import __version__

        self.archive = archive
        self.encoder = encoder
        self.config = config
        self.progress = progress
        self.version = __version__
        self.eid = encoder.encoder_id
        self.cuda = encoder.device.type == "cuda"
        self.loader_wait = 0.0  # seconds the main process waited for decoded batches
        self.stain, self.stain_attrs = _stain_normalizer(config)

    # -- per-slide checks, before any compute ---------------------------------------------
    def prepare(self, slide_id: str) -> _Slide | SlideEmbedResult:
        started = time.perf_counter()
        try:
            store = self.archive.slide(slide_id)
            n = store.n_tiles
            coords = store.coords
            tile_size = int(store.tiles.shape[1])
            chash = coords_sha256(coords)
            if self.config.resume and self._is_current(store, n, chash):
                return SlideEmbedResult(slide_id, "skipped", n)
            busy = embeddings_busy(store.path, self.eid) if not self.config.wait else None
            if busy is not None:
                return _failed(slide_id, busy, time.perf_counter() - started)
            self.encoder.check_input_size(tile_size, int(store.tiles.shape[2]), str(store.path))
            if self.config.check_mpp:
                self.encoder.check_scale(store.tiling.get("mpp"), tile_size, str(store.path))
        except (WsiSslError, OSError, KeyError, ValueError) as err:
            return _failed(slide_id, err, time.perf_counter() - started)
        tiling = store.tiling
        attrs = {
            "encoder_id": self.eid,
            "encoder": self.encoder.config.to_dict(),
            "weights_sha256": self.encoder.config.weights_sha256,
            "slide_id": slide_id,
            "n_tiles": n,
            "dim": self.encoder.embed_dim,
            "dtype": self.config.dtype,
            "coords_sha256": chash,
            "tile_size": tile_size,
            "tiling": {k: tiling.get(k) for k in ("mpp", "tile_size", "tile_size_level0")},
            "wsi_ssl_version": self.version,
            "embed": {"batch_size": self.config.batch_size},
            "compute": self.encoder.compute,
        }
        if self.stain_attrs is not None:
            attrs["stain"] = self.stain_attrs
        if hasattr(self.encoder, "checkpoint_sha256"):
            attrs["checkpoint_sha256"] = self.encoder.checkpoint_sha256
        return _Slide(store, n, coords, attrs)

    def _is_current(self, store: SlideStore, n: int, chash: str) -> bool:
        """Complete by content (every chunk there and decodable), for these tiles, encoder
        and dtype."""
        if embeddings_problem(store, self.eid) is not None:
            return False
        array = open_embeddings_array(store.path, self.eid)
        a = array.attrs
        return (
            array.shape == (n, self.encoder.embed_dim)
            and a.get("encoder_id") == self.eid
            and a.get("coords_sha256") == chash
            and a.get("dtype") == self.config.dtype
            and a.get("stain") == self.stain_attrs
        )

    # -- the loop ---------------------------------------------------------------------------
    def run(self, slides: list[_Slide]) -> None:
        todo = [s for s in slides if s.n > 0]
        for s in slides:
            if s.n == 0:  # an empty (0, D) array, complete at once
                try:
                    self._start(s)
                    if not s.done:
                        self._commit(s)
                except Exception as err:
                    self._fail(s, err)
        if not todo:
            return
        units = work_units([s.n for s in todo], self.config.batch_size)
        # On the CPU the workers also preprocess (in parallel with the forward passes); on
        # CUDA uint8 batches travel (4x smaller) and are preprocessed on the device.
        plain = self.cuda or not self.config.n_workers or self.stain is not None
        transform = None if plain else self.encoder.preprocessor
        dataset = TileBatches([str(s.store.path / "tiles") for s in todo], units, transform)
        loader = make_loader(
            dataset,
            workers=self.config.n_workers,
            pin_memory=self.cuda,
            prefetch=self.config.prefetch,
        )
        total = sum(s.n for s in todo)
        bar = tqdm(
            total=total,
            unit="tile",
            desc=f"embed {self.encoder.config.name}"[:30],
            disable=not self.progress,
            dynamic_ncols=True,
            smoothing=0.1,
        )
        inflight: tuple[_Slide, int, torch.Tensor, Any] | None = None
        try:
            with (
                torch.inference_mode(),
                _deterministic(self.config.deterministic and not self.cuda),
            ):
                batches = iter(loader)
                while True:
                    waited = time.perf_counter()
                    batch = next(batches, None)
                    self.loader_wait += time.perf_counter() - waited
                    if batch is None:
                        break
                    slide = todo[batch.slide]
                    if slide.done:
                        continue
                    if batch.error:
                        stop = min(batch.start + self.config.batch_size, slide.n)
                        self._fail(
                            slide,
                            TileReadError(
                                slide.store.path / "tiles", batch.start, stop, batch.error
                            ),
                        )
                        continue
                    launched = self._launch(slide, batch.start, batch.tiles)
                    if inflight is not None:
                        bar.update(self._finish(*inflight))
                    inflight = launched
                    if not self.cuda and inflight is not None:  # nothing to overlap on the CPU
                        bar.update(self._finish(*inflight))
                        inflight = None
                if inflight is not None:
                    bar.update(self._finish(*inflight))
        except BaseException:
            for s in todo:
                if s.writer is not None and not s.done:
                    s.writer.abort()
            raise
        finally:
            bar.close()
        for s in todo:
            if not s.done:
                self._fail(s, RuntimeError(f"only {s.received} of {s.n} tiles were embedded"))

    def _start(self, slide: _Slide) -> None:
        """Take the slide's writer (its locks); skip it if another job completed it meanwhile."""
        slide.started = time.perf_counter()
        slide.writer = EmbeddingWriter(
            slide.store.path,
            self.eid,
            n_rows=slide.n,
            dim=self.encoder.embed_dim,
            dtype=self.config.dtype,
            attrs=slide.attrs,
            chunk_rows=self.config.chunk_rows,
            wait=self.config.wait,
        )
        chash = str(slide.attrs["coords_sha256"])
        if self.config.resume and self._is_current(slide.store, slide.n, chash):
            slide.writer.abort()
            slide.result = SlideEmbedResult(slide.store.slide_id, "skipped", slide.n)

    def _launch(
        self, slide: _Slide, start: int, tiles: torch.Tensor
    ) -> tuple[_Slide, int, torch.Tensor, Any] | None:
        """Start one batch on the device; returns what ``_finish`` needs (None if it failed)."""
        try:
            if slide.writer is None:
                self._start(slide)
            if slide.done:
                return None
            x = tiles.to(self.encoder.device, non_blocking=self.cuda)
            if self.stain is not None:  # uint8 (B, T, T, 3) tiles, normalised on the device
                x = self.stain(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).contiguous()
            if x.dtype == torch.uint8:
                feats = self.encoder(x, where=str(slide.store.path))
            else:  # preprocessed by the loader worker
                feats = self.encoder.forward_preprocessed(x)
            if self.cuda:
                host = feats.to("cpu", non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                return slide, start, host, event
            return slide, start, feats, None
        except Exception as err:
            self._fail(slide, err)
            return None

    def _finish(self, slide: _Slide, start: int, feats: torch.Tensor, event: Any) -> int:
        """Check and write one batch's vectors; returns the number of tiles done."""
        if slide.done:
            return 0
        try:
            if event is not None:
                event.synchronize()
            raw = feats.numpy()
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below
                out = raw.astype(self.config.dtype, copy=False)
            bad = _nonfinite(out, raw)
            if bad is not None:
                row, what = bad
                tile = start + row
                x, y = (int(v) for v in slide.coords[tile])
                raise NonFiniteEmbeddingError(str(slide.store.path), tile, (x, y), what)
            assert slide.writer is not None
            slide.writer.write(start, out)
            slide.received += len(out)
            if slide.received == slide.n:
                self._commit(slide)
        except Exception as err:
            self._fail(slide, err)
        return len(feats)

    def _commit(self, slide: _Slide) -> None:
        if slide.writer is None:
            self._start(slide)
        assert slide.writer is not None
        seconds = time.perf_counter() - slide.started
        slide.writer.commit(
            {
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "seconds": round(seconds, 3),
            }
        )
        slide.result = SlideEmbedResult(slide.store.slide_id, "complete", slide.n, seconds=seconds)

    def _fail(self, slide: _Slide, err: BaseException) -> None:
        if slide.done:
            return
        if slide.writer is not None:
            slide.writer.abort()
        seconds = time.perf_counter() - slide.started if slide.started else 0.0
        slide.result = _failed(slide.store.slide_id, err, seconds)


def _stain_normalizer(config: EmbedConfig) -> tuple[Any, dict[str, Any] | None]:
    """The stain normaliser of ``config`` and its provenance (both None when off)."""
    if config.stain_normalize is None or config.stain_reference is None:
        return None, None
    import hashlib

    from wsi_ssl.stain import StainNormalizer

    normalizer = StainNormalizer(config.stain_normalize, config.stain_reference)
    digest = hashlib.sha256(Path(config.stain_reference).read_bytes()).hexdigest()
    provenance = {
        "method": config.stain_normalize,
        "reference": Path(config.stain_reference).name,
        "reference_sha256": digest,
    }
    return normalizer, provenance


def _slide_id(archive: Archive, name: str) -> str:
    """A slide id as given when its store exists (complete or not), else resolved from a file
    name, stem or unique prefix; unresolvable names are kept (their store "is missing")."""
    if archive.store_path(name).exists():
        return name
    try:
        return resolve_slide(archive, name)
    except WsiSslError:
        return name


def _as_encoder(encoder: Encoder | str | Path, weights: str | Path | None) -> Encoder:
    if isinstance(encoder, Encoder):
        return encoder
    return create_encoder(encoder, weights=weights, device="cpu")


def embed(
    root: str | Path,
    encoder: Encoder | str | Path,
    config: EmbedConfig | None = None,
    *,
    slides: Sequence[str] | None = None,
    weights: str | Path | None = None,
    progress: bool = False,
    **options: Any,
) -> EmbedSummary:
    """Embed the complete slide stores under ``root`` into ``<slide>.zarr/embeddings/<encoder_id>``.

    Args:
        root: an archive root written by ``wsi-ssl tile``.
        encoder: an :class:`~wsi_ssl.encoders.Encoder`, a registered name, ``timm/<arch>``,
            ``torchvision/<arch>`` or a ``wsi-ssl pretrain`` run/checkpoint path.
        config: job settings; ``options`` (e.g. ``batch_size=64, device="cpu"``) replace fields.
        slides: slide ids to embed (default: every complete store; named stores that are
            missing or incomplete fail with a typed error in the summary).
        weights: weights file for a named encoder (``"random"`` for a seeded init).
        progress: show a tiles/s progress bar.

    Returns:
        An :class:`EmbedSummary`; a failing slide never stops the others (see ``.failed``).

    Raises:
        StoreNotFoundError: ``root`` is not an archive.
        EncoderNotFoundError, WeightsNotFoundError, CheckpointError, DeviceUnavailableError:
            before any slide is touched.
    """
    config = dataclasses.replace(config or EmbedConfig(), **options)
    started = time.perf_counter()
    archive = open_store(root)
    enc = _as_encoder(encoder, weights).to(config.device)
    if config.compile:
        enc.compile()
    job = _Job(archive, enc, config, progress)
    scan = archive.scan()
    if slides is None:
        ids, incomplete = scan.complete, scan.incomplete
    else:
        ids, incomplete = [_slide_id(archive, name) for name in dict.fromkeys(slides)], []
    summary = EmbedSummary(
        str(root),
        enc.encoder_id,
        enc.describe(),
        config.to_dict(),
        enc.compute,
        incomplete=incomplete,
    )
    prepared: list[_Slide | SlideEmbedResult] = [
        _failed(Path(str(getattr(err, "path", "?"))).name.removesuffix(".zarr"), err, 0.0)
        for err in (scan.damaged if slides is None else [])
    ]
    prepared += [job.prepare(s) for s in ids]
    todo = [p for p in prepared if isinstance(p, _Slide)]
    job.run(todo)
    for p in prepared:
        summary.results.append(p.result if isinstance(p, _Slide) else p)  # type: ignore[arg-type]
    summary.seconds = time.perf_counter() - started
    summary.loader_wait_s = job.loader_wait
    return summary


def embed_slide(
    root: str | Path,
    slide_id: str,
    encoder: Encoder | str | Path,
    config: EmbedConfig | None = None,
    **options: Any,
) -> SlideEmbedResult:
    """Embed one slide; raises its error instead of recording it (see :func:`embed`)."""
    summary = embed(root, encoder, config, slides=[slide_id], **options)
    [result] = summary.results
    if result.status == "failed":
        err = getattr(result, "exception", None)
        if isinstance(err, BaseException):
            raise err
        raise WsiSslError(f"{slide_id}: {result.error_type}: {result.error}")
    return result


def embed_for_demo(
    root: str | Path, checkpoint: str | Path, *, progress: bool = True
) -> EmbedSummary:
    """Embed the demo archive with the encoder the demo just trained (a pretrain checkpoint or
    run directory); ``summary.lines()`` gives the report to print."""
    if not Path(checkpoint).exists():
        raise CheckpointError(f"{checkpoint}: no such pretrain run or checkpoint")
    return embed(root, Path(checkpoint), progress=progress)
