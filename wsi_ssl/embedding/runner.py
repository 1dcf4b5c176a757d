"""The embedding loop: tiles from the loader through the encoder into each slide's writer.

One DataLoader runs over all slides to do, so the device stays busy across slide boundaries;
workers read whole tile ranges; the main process only moves uint8 batches to the device
(or, for JPEG stores with ``EmbedConfig.decode`` "device", or "auto" on CUDA, decodes the
stored streams there: :mod:`wsi_ssl.embedding.decode`), runs the encoder (autocast on CUDA per the encoder's precision), and copies the vectors back, one
batch in flight on CUDA so the copy of batch k overlaps the compute of batch k+1.

Only a slide's ``EmbedSlide.encode`` tiles are read and encoded (``skip_flagged_tiles``); each
batch is written as the block of rows from its first tile to the next batch's, the rows between
taken from the slide's earlier array or left NaN (:mod:`wsi_ssl.embedding.slides`).

A slide that fails (a tile read, a non-finite vector, a write) gets its outcome and its partial
array removed; the others go on. A slide whose store was re-tiled (or re-flagged by QC) after
the job planned it is "busy" once its lock is taken (``EmbedTarget.store_changed``): none of its
batches, those read before the lock included, is written. A slide is committed atomically once
its last row is written (``wsi_ssl.storage.embeddings``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from wsi_ssl.embedding.batch_size import auto_batch_size
from wsi_ssl.embedding.decode import decode_jpeg_batch, on_device
from wsi_ssl.embedding.loader import TileBatch, TileBatches, make_loader, work_units
from wsi_ssl.embedding.slides import EmbedSlide, EmbedTarget
from wsi_ssl.errors import (
    DeviceOutOfMemoryError,
    NonFiniteEmbeddingError,
    StoreLockedError,
    StoreRetiledError,
    TileReadError,
    WsiSslError,
)
from wsi_ssl.outcome import SlideOutcome
from wsi_ssl.storage.embeddings import EmbeddingWriter

__all__ = ["EmbedRunner"]

WRITE_ROWS = 8192
"""Most rows of vectors built and written at once (48 MB at 1,536 float32 dims)."""

_Inflight = tuple[EmbedSlide, int, torch.Tensor, Any]  # slide, unit start, vectors, event


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


class EmbedRunner:
    """Runs the prepared slides of one job through its encoder (see the module docstring)."""

    def __init__(self, target: EmbedTarget, stain: Any, progress: bool) -> None:
        self.target = target
        self.encoder = target.encoder
        self.config = target.config
        self.stain = stain
        self.progress = progress
        self.cuda = self.encoder.device.type == "cuda"
        self.device_decode = on_device(self.config.decode, self.encoder.device)
        self.batch_size = self.config.batch_size or auto_batch_size(self.encoder)
        self.loader_wait = 0.0  # seconds the main process waited for decoded batches

    def run(self, slides: list[EmbedSlide]) -> None:
        """Embed ``slides``; each ends with its ``outcome`` set."""
        for s in slides:
            if not len(s.encode):  # nothing to encode: empty, all flagged, or rows kept
                try:
                    self._start(s)
                    if not s.done:
                        s.received = self._write_rows(s, 0, 0, None)
                        self._commit(s)
                except Exception as err:
                    self._fail(s, err)
        todo = [s for s in slides if len(s.encode)]
        if todo:
            self._loop(todo)
        for s in todo:
            if not s.done:
                self._fail(s, RuntimeError(f"only {s.received} of {s.n} rows were written"))

    def _loader(self, todo: list[EmbedSlide]) -> Any:
        units = work_units([len(s.encode) for s in todo], self.batch_size)
        # On the CPU the workers also preprocess (in parallel with the forward passes); on
        # CUDA uint8 batches travel (4x smaller) and are preprocessed on the device.
        plain = self.cuda or self.device_decode or not self.config.n_workers
        plain = plain or self.stain is not None
        transform = None if plain else self.encoder.preprocessor
        paths = [str(s.store.path / "tiles") for s in todo]
        tiles = [None if len(s.encode) == s.n else s.encode for s in todo]
        dataset = TileBatches(paths, units, transform, [self.device_decode] * len(todo), tiles)
        return make_loader(
            dataset,
            workers=self.config.n_workers,
            pin_memory=self.cuda,
            prefetch=self.config.prefetch,
        )

    def _loop(self, todo: list[EmbedSlide]) -> None:
        bar = tqdm(
            total=sum(len(s.encode) for s in todo),
            unit="tile",
            desc=f"embed {self.encoder.config.name}"[:30],
            disable=not self.progress,
            dynamic_ncols=True,
            smoothing=0.1,
        )
        inflight: _Inflight | None = None
        try:
            deterministic = self.config.deterministic and not self.cuda
            with torch.inference_mode(), _deterministic(deterministic):
                batches = iter(self._loader(todo))
                while (batch := self._next(batches)) is not None:
                    launched = self._batch(todo[batch.slide], batch)
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

    def _next(self, batches: Iterator[TileBatch]) -> TileBatch | None:
        waited = time.perf_counter()
        batch = next(batches, None)
        self.loader_wait += time.perf_counter() - waited
        return batch

    def _batch(self, slide: EmbedSlide, batch: TileBatch) -> _Inflight | None:
        """Launch one loaded batch (None when its slide is done or the read failed)."""
        if slide.done:
            return None
        if batch.error:
            path = slide.store.path / "tiles"
            error: Exception = TileReadError(path, *batch.error_tiles, batch.error)
            with contextlib.suppress(WsiSslError, OSError, KeyError, ValueError):
                if self.target.store_changed(slide):  # the read met a store re-tiled since
                    error = StoreRetiledError(slide.store.path)
            self._fail(slide, error)
            return None
        return self._launch(slide, batch)

    def _start(self, slide: EmbedSlide) -> None:
        """Take the slide's writer (its locks); skip it if another job completed it meanwhile;
        raise (busy) if its store changed since it was planned (see ``store_changed``)."""
        slide.started = time.perf_counter()

        def unchanged() -> None:  # under the writer's locks, before it makes anything
            if self.target.store_changed(slide):  # _fail: busy, later batches dropped
                raise StoreRetiledError(slide.store.path)

        slide.writer = EmbeddingWriter(
            slide.store.path,
            self.target.encoder_id,
            n_rows=slide.n,
            dim=self.encoder.embed_dim,
            dtype=self.config.dtype,
            attrs=slide.attrs,
            chunk_rows=self.config.chunk_rows,
            wait=self.config.wait,
            check=unchanged,  # a refused slide leaves nothing in its (new) store
        )
        if self.config.resume and self.target.is_current(slide):
            slide.writer.abort()
            slide.outcome = SlideOutcome(slide.slide_id, "skipped", slide.n)
        elif self.target.base_changed(slide):  # another job wrote them meanwhile: run again
            raise StoreLockedError(slide.store.path / "embeddings" / self.target.encoder_id)

    def _launch(self, slide: EmbedSlide, batch: TileBatch) -> _Inflight | None:
        """Start one batch on the device; returns what ``_finish`` needs (None if it failed)."""
        start = batch.start  # position in slide.encode
        try:
            if slide.writer is None:
                self._start(slide)
            if slide.done:
                return None
            if batch.sizes.numel():  # JPEG streams, decoded here on the device
                where = slide.store.path / "tiles"
                tiles = slide.encode[start : start + len(batch.sizes)]
                x = decode_jpeg_batch(batch.tiles, batch.sizes, self.encoder.device, where, tiles)
            else:
                x = batch.tiles.to(self.encoder.device, non_blocking=self.cuda)
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
        except torch.OutOfMemoryError as err:
            n = len(batch.sizes) if batch.sizes.numel() else len(batch.tiles)  # JPEG: bytes
            self._fail(slide, self._out_of_memory(n, err))
            return None
        except Exception as err:
            self._fail(slide, err)
            return None

    def _out_of_memory(self, n: int, err: torch.OutOfMemoryError) -> DeviceOutOfMemoryError:
        """A batch the device could not hold, as the typed error naming what to lower."""
        error = DeviceOutOfMemoryError(
            f"{self.encoder.device}: encoder {self.encoder.config.name!r} ran out of memory on "
            f"a batch of {n} tiles (batch_size={self.batch_size}); pass a smaller batch_size, "
            "or precision='bf16', or free memory on the device",
            parameters=("batch_size", "precision"),
        )
        error.__cause__ = err.with_traceback(None)  # its frames hold the batch on the device
        return error

    def _finish(self, slide: EmbedSlide, start: int, feats: torch.Tensor, event: Any) -> int:
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
                tile = int(slide.encode[start + row])
                x, y = (int(v) for v in slide.coords[tile])
                raise NonFiniteEmbeddingError(str(slide.store.path), tile, (x, y), what)
            slide.received += self._write_rows(slide, start, start + len(out), out)
            if slide.received == slide.n:
                self._commit(slide)
        except Exception as err:
            self._fail(slide, err)
        return len(feats)

    def _write_rows(self, slide: EmbedSlide, a: int, b: int, out: np.ndarray | None) -> int:
        """Write the rows of the vectors of ``slide.encode[a:b]`` (``out``) and the rows between
        them, copied from the slide's earlier array (NaN where it clears them) or NaN; returns
        the rows written. Written ``WRITE_ROWS`` at a time: completing a slide that lacks a few
        vectors spans most of its rows, which would otherwise be one n x D block in memory."""
        assert slide.writer is not None
        lo, hi = slide.rows(a, b)
        tiles = slide.encode[a:b]
        for first in range(lo, hi, WRITE_ROWS):
            last = min(first + WRITE_ROWS, hi)
            if slide.base is not None:
                block = np.asarray(slide.base[first:last], dtype=self.config.dtype)
                cleared = slide.clear[(slide.clear >= first) & (slide.clear < last)]
                block[cleared - first] = np.nan  # flagged by QC: not embedded now
            else:
                block = np.full((last - first, self.encoder.embed_dim), np.nan, self.config.dtype)
            if out is not None:
                inside = (tiles >= first) & (tiles < last)
                block[tiles[inside] - first] = out[inside]
            slide.writer.write(first, block)
        return hi - lo

    def _commit(self, slide: EmbedSlide) -> None:
        if slide.writer is None:
            self._start(slide)
        assert slide.writer is not None
        seconds = time.perf_counter() - slide.started
        slide.writer.commit(
            {
                # to the microsecond: it tells embedding runs apart (an index's --add, check)
                "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "seconds": round(seconds, 3),
            }
        )
        slide.outcome = SlideOutcome(
            slide.slide_id, "complete", len(slide.encode), seconds=seconds, details=slide.details
        )

    def _fail(self, slide: EmbedSlide, err: BaseException) -> None:
        if slide.done:
            return
        if slide.writer is not None:
            slide.writer.abort()
        seconds = time.perf_counter() - slide.started if slide.started else 0.0
        slide.outcome = SlideOutcome.failure(slide.slide_id, err, seconds)
