"""Apply a run to an archive: ``wsi_ssl.mil.predict`` and ``wsi-ssl mil predict``.

Writes, under ``OUT`` (default ``RUN/predictions``)::

    predictions.csv            slide_id, name, n_tiles, predicted, prob_<class> ..., files,
                               note (a training slide, another stain or tiling), run
    heatmaps/<slide_id>.png    attention / max attention over the thumbnail
    tiles/<slide_id>.png       the most attended tiles (stores that keep tiles)
    geojson/<slide_id>.geojson every tile of the bag with its attention, for QuPath

A slide that cannot be predicted (no embeddings of the run's encoder, an empty bag, a store
whose metadata is damaged) is reported and the others go on. ``predictions.csv`` gathers
every slide predicted into ``OUT`` by one run (another run's predictions there are refused:
their rows and pictures would mix): a later call (other slides, another archive) replaces
the rows of the slides it tries (a slide that fails loses its earlier row) and keeps the
others, as it keeps their pictures.

Each slide's pictures are drawn under temporary names, renamed over the earlier ones only
once all are complete, and its row goes into ``predictions.csv`` (rewritten atomically after
every slide) at once, Ctrl-C held meanwhile: an interrupted call keeps the slides it
finished, every earlier slide's files stay whole, and the CSV names no missing file.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_ssl.errors import ConfigError, EncoderMismatchError, WsiSslError
from wsi_ssl.interrupts import interrupts_held
from wsi_ssl.mil.explain import attention_geojson, attention_heatmap, tile_gallery
from wsi_ssl.mil.matching import slide_file_names
from wsi_ssl.mil.run import IN_SAMPLE, MILPrediction, MILRun, load, same_run
from wsi_ssl.mil.training import torch_threads
from wsi_ssl.outcome import BatchOutcome, ErrorText, SlideOutcome, interrupt_report
from wsi_ssl.storage import Archive, SlideStore, open_store
from wsi_ssl.storage.archive import damaged_slide_id
from wsi_ssl.storage.atomic import (
    atomic_write_text,
    fsync_file,
    remove_path,
    rename_into_place,
    sweep_temp_files,
    temp_name,
)
from wsi_ssl.storage.embeddings import embedding_ids
from wsi_ssl.storage.resolve import resolve_slides

if TYPE_CHECKING:
    import numpy as np

__all__ = ["PredictResult", "SlidePrediction", "predict"]

_FILES = {
    "heatmap": ("heatmaps", "png"),
    "gallery": ("tiles", "png"),
    "geojson": ("geojson", "geojson"),
}
"""Each picture of a slide: its folder under ``OUT`` and suffix."""


@dataclass
class SlidePrediction:
    """One slide's prediction and the files written for it (the outcome's ``details``)."""

    slide_id: str
    name: str
    n_tiles: int
    label: str
    probabilities: dict[str, float]
    heatmap: Path | None = None
    gallery: Path | None = None
    geojson: Path | None = None
    prediction: MILPrediction | None = field(default=None, repr=False)
    note: str = ""
    """Read it with care: a training slide (in-sample), or embedded or tiled otherwise than
    the training slides."""

    def details(self) -> dict[str, Any]:
        """JSON-able: slide_id, name, predicted, probabilities and the files (None if not written)."""
        files = {k: None if p is None else str(p) for k, p in self.files().items()}
        return {
            "slide_id": self.slide_id,
            "name": self.name,
            "predicted": self.label,
            "probabilities": self.probabilities,
            **files,
            "note": self.note,
        }

    def files(self) -> dict[str, Path | None]:
        return {"heatmap": self.heatmap, "gallery": self.gallery, "geojson": self.geojson}


@dataclass(kw_only=True)
class PredictResult(BatchOutcome):
    """What :func:`predict` wrote: one :class:`SlideOutcome` per slide (``details``: see
    :meth:`SlidePrediction.details`; failed slides add their ``name``), and the predictions
    themselves (``slides``, with the attention and neighbours)."""

    out: Path
    run: Path
    encoder_id: str
    classes: list[str]
    predictions: list[SlidePrediction] = field(default_factory=list)
    seconds: float = 0.0
    note: str = ""
    """Why no pictures were drawn though asked for (a model that weighs no tiles)."""

    @property
    def slides(self) -> list[SlidePrediction]:
        """The slides that were predicted, in order."""
        return self.predictions

    @property
    def csv_path(self) -> Path:
        return self.out / "predictions.csv"

    def total_lines(self) -> list[str]:
        explained = any(p.heatmap is not None for p in self.predictions)
        pictures = (
            f" and heatmaps, tile galleries and GeoJSON under {self.out}" if explained else ""
        )
        return (
            [
                f"{len(self.predictions)} slide(s) predicted, {len(self.failed)} failed; wrote "
                f"{self.csv_path}{pictures}"
            ]
            + ([self.note] if self.note else [])
            + self._in_sample_line()
        )

    def _in_sample_line(self) -> list[str]:
        n = sum(p.note.startswith(IN_SAMPLE) for p in self.predictions)
        if not n:
            return []
        return [
            f"{n} slide(s) predicted in-sample (the models were trained on them); the run's "
            f"out-of-fold predictions of its training slides are in {self.run}/predictions.csv"
        ]

    def lines(self, error_text: ErrorText | None = None) -> list[str]:
        """One line per slide (its label, probabilities, tiles and name, or its error), then
        the totals."""
        by_slide = {p.slide_id: p for p in self.predictions}
        out = []
        for o in self.outcomes:
            s = by_slide.get(o.slide)
            if s is None:
                out.append(o.line(error_text))
                continue
            probs = "  ".join(f"{c} {p:.3f}" for c, p in s.probabilities.items())
            note = f"  ({s.note})" if s.note else ""
            out.append(f"{s.label:>12}  {probs}  {s.n_tiles:>6} tiles  {s.name}{note}")
        header = []
        if self.predictions:  # the columns' names over the columns
            first = self.predictions[0].probabilities
            width = len("  ".join(f"{c} {p:.3f}" for c, p in first.items()))
            header = [f"{'predicted':>12}  {'probabilities':<{width}}  {'tiles':>12}  slide"]
        return header + out + self.total_lines()

    def to_dict(self) -> dict[str, Any]:
        """``out``, ``run``, ``encoder_id``, ``classes``, ``csv``, ``seconds``, the outcome
        counts, ``slides`` (every slide with its status) and ``errors`` (the failed ones)."""
        return {
            "out": str(self.out),
            "run": str(self.run),
            "encoder_id": self.encoder_id,
            "classes": self.classes,
            "csv": str(self.csv_path),
            "seconds": round(self.seconds, 3),
            **self.outcomes_dict(),
            "errors": [o.to_dict() for o in self.failed],
        }


def predict(
    run: str | Path | MILRun,
    root: str | Path,
    out: str | Path | None = None,
    slides: Sequence[str] | None = None,
    *,
    top_k: int = 16,
    explain: bool = True,
    progress: bool = False,
) -> PredictResult:
    """Predict the slides of an archive with a trained run and explain each prediction.

    Args:
        run: a run directory or a loaded :class:`~wsi_ssl.mil.run.MILRun`.
        root: archive root with embeddings of the run's encoder.
        out: output folder (default ``RUN/predictions``).
        slides: slide ids, file names, stems or unique id prefixes (default: every complete
            store), resolved by :func:`wsi_ssl.storage.resolve.resolve_slides`.
        top_k: tiles in each gallery.
        explain: write heatmaps, galleries and GeoJSON (attention models only).
        progress: show a progress bar.

    Raises:
        CheckpointError: ``run`` is not a run, or a checkpoint is not the file training
            wrote (its sha256 differs from the one ``run.json`` records).
        StoreNotFoundError: ``root`` is not an archive.
        UnknownSlideError: a name in ``slides`` matches no complete store, or several.
        EncoderMismatchError: none of the slides has embeddings of the run's encoder but some
            have embeddings of others (the run is applied to another encoder's vectors).
        ConfigError: ``top_k`` < 1, or ``out`` holds a ``predictions.csv`` of another run.
    """
    if top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}", parameters=("top_k",))
    started = time.perf_counter()
    model = run if isinstance(run, MILRun) else load(run)
    archive = open_store(root)
    scan = None if slides else archive.scan()  # every store: the damaged ones fail, named
    ids = scan.complete if scan is not None else resolve_slides(archive, slides or [])
    names = slide_file_names(archive, ids)
    have = {sid: embedding_ids(archive.store_path(sid)) for sid in ids}
    if ids and not any(model.encoder_id in e for e in have.values()):
        other = sorted({i for e in have.values() for i in e})
        if other:
            raise EncoderMismatchError(
                f"{root}: the slides have embeddings {', '.join(other)} but run {model.path} was "
                f"trained on {model.encoder_id!r}; embed them with that encoder first"
            )
    out = Path(out) if out is not None else model.path / "predictions"
    table = _Table(out / "predictions.csv", model)  # refuses another run's before any work
    out.mkdir(parents=True, exist_ok=True)
    for folder in [out, *(out / f for f, _ in _FILES.values())]:
        sweep_temp_files(folder)  # the pictures of a killed call, drawn but never renamed
    result = PredictResult(
        out=out, run=model.path, encoder_id=model.encoder_id, classes=model.classes
    )
    for err in scan.damaged if scan is not None else []:
        sid = damaged_slide_id(err)
        table.drop(sid)  # its earlier row is not current
        result.outcomes.append(SlideOutcome.failure(sid, err))
    with (
        torch_threads(model.config.threads),
        interrupt_report(
            result, lambda: [sid for sid in ids if sid not in {o.slide for o in result.outcomes}]
        ),
    ):
        _predict_all(model, archive, ids, names, table, result, top_k, explain, progress)
    table.write()
    if explain and result.predictions and all(p.heatmap is None for p in result.predictions):
        result.note = (
            f"no heatmaps or galleries: a {model.config.model} run weighs no tile above another"
        )
    result.seconds = time.perf_counter() - started
    return result


def _predict_all(
    model: MILRun,
    archive: Archive,
    ids: list[str],
    names: dict[str, str],
    table: _Table,
    result: PredictResult,
    top_k: int,
    explain: bool,
    progress: bool,
) -> None:
    from tqdm.auto import tqdm

    for sid in tqdm(ids, desc="mil predict", unit="slide", disable=not progress):
        name = names.get(sid, sid)
        started = time.perf_counter()
        try:
            item = _predict_one(model, archive, sid, name, result.out, top_k, explain)
        except WsiSslError as err:
            seconds = time.perf_counter() - started
            with interrupts_held():  # the CSV and the report agree on what was done
                table.drop(sid)  # its earlier row is not current
                result.outcomes.append(SlideOutcome.failure(sid, err, seconds, name=name))
            continue
        with interrupts_held():  # the slide is as before or wholly new, and reported as it is
            _commit(item, result.out, table)
            result.predictions.append(item)
            result.outcomes.append(
                SlideOutcome(
                    sid,
                    "complete",
                    n_tiles=item.n_tiles,
                    seconds=time.perf_counter() - started,
                    details=item.details(),
                )
            )


def _predict_one(
    model: MILRun,
    archive: Archive,
    sid: str,
    name: str,
    out: Path,
    top_k: int,
    explain: bool,
) -> SlidePrediction:
    """The slide's prediction, its pictures drawn under temporary names (see :func:`_commit`)."""
    store = archive.slide(sid)
    pred = model.predict_slide(store, name=name)
    item = SlidePrediction(
        sid,
        name,
        pred.n_tiles,  # the bag's: QC-flagged tiles left out (it counted the store's)
        pred.label,
        {c: float(p) for c, p in zip(model.classes, pred.probabilities, strict=True)},
        prediction=pred,
        note=model.slide_note(store),
    )
    if explain and pred.attention is not None:
        _draw(item, pred, pred.attention, store, model, out, top_k)
    return item


def _draw(
    item: SlidePrediction,
    pred: MILPrediction,
    attention: np.ndarray,
    store: SlideStore,
    model: MILRun,
    out: Path,
    top_k: int,
) -> None:
    """Draw the heatmap, gallery and GeoJSON under temporary names beside their final ones
    (``item``'s paths name them); none is left behind if drawing fails or is interrupted."""
    staged = {}
    for kind, (folder, suffix) in _FILES.items():
        (out / folder).mkdir(parents=True, exist_ok=True)
        staged[kind] = out / folder / temp_name(f"{item.slide_id}.{suffix}", f".{suffix}")
    probs = ", ".join(f"{c} {p:.2f}" for c, p in item.probabilities.items())
    bag = pred.bag_tiles
    meta = {
        "slide_id": item.slide_id,
        "name": item.name,
        "run": str(model.path),
        "encoder_id": model.encoder_id,
        "predicted": pred.label,
        "probabilities": item.probabilities,
    }
    try:
        title = f"{item.name}: {pred.label} ({probs})"
        item.heatmap = attention_heatmap(
            store, attention, staged["heatmap"], title=title, tiles=bag
        )
        item.gallery = tile_gallery(store, attention, staged["gallery"], k=top_k, tiles=bag)
        item.geojson = attention_geojson(
            store, attention, staged["geojson"], properties={"wsi_ssl": meta}, tiles=bag
        )
    except BaseException:
        for path in staged.values():
            remove_path(path)
        raise


def _commit(item: SlidePrediction, out: Path, table: _Table) -> None:
    """Rename the slide's pictures into place (over an earlier prediction's), put its row in
    ``predictions.csv``, then remove the earlier pictures it has none for (called with
    Ctrl-C held: the slide is either as before or wholly the new prediction)."""
    staged = item.files()
    try:
        for kind, tmp in staged.items():
            if tmp is not None:
                folder, suffix = _FILES[kind]
                final = out / folder / f"{item.slide_id}.{suffix}"
                fsync_file(tmp)
                rename_into_place(tmp, final)
                setattr(item, kind, final)
        table.add(item)
        for kind, (folder, suffix) in _FILES.items():
            if staged[kind] is None:  # e.g. --no-explain now: the old picture is stale
                (out / folder / f"{item.slide_id}.{suffix}").unlink(missing_ok=True)
    finally:
        for tmp in staged.values():
            if tmp is not None:
                remove_path(tmp)  # left only by a rename that failed


class _Table:
    """``predictions.csv`` as this call updates it: the earlier rows of the slides it has not
    tried (yet), then its own, rewritten atomically after every slide."""

    def __init__(self, path: Path, model: MILRun) -> None:
        self.path = path
        self.model = model
        self.header = _csv_header(model.classes)
        self.earlier = _earlier_rows(path, self.header, model)
        self.tried: set[str] = set()
        self.rows: dict[str, list[str]] = {}

    def add(self, s: SlidePrediction) -> None:
        """Put (or replace) ``s``'s row and rewrite the file."""
        self.tried.add(s.slide_id)
        self.rows[s.slide_id] = (
            [s.slide_id, s.name, str(s.n_tiles), s.label]
            + [f"{p:.6f}" for p in s.probabilities.values()]
            + [_rel(p, self.path.parent) for p in (s.heatmap, s.gallery, s.geojson)]
            + [s.note, self.model.run_id]
        )
        self.write()

    def drop(self, slide_id: str) -> None:
        """Leave out the earlier row of a slide that failed and rewrite the file."""
        self.tried.add(slide_id)
        self.rows.pop(slide_id, None)
        self.write()

    def write(self) -> None:
        kept = [row for row in self.earlier if row[0] not in self.tried]
        text = io.StringIO(newline="")
        csv.writer(text).writerows([self.header, *kept, *self.rows.values()])
        atomic_write_text(self.path, text.getvalue())


def _csv_header(classes: list[str]) -> list[str]:
    return (
        ["slide_id", "name", "n_tiles", "predicted"]
        + [f"prob_{c}" for c in classes]
        + ["heatmap", "gallery", "geojson", "note", "run"]
    )


def _earlier_rows(path: Path, header: list[str], model: MILRun) -> list[list[str]]:
    """The rows of an earlier ``predictions.csv`` at ``path`` (none where there is none); one
    written before rows named their run is taken as this run's in its own default folder.

    Raises:
        ConfigError: its columns are not ``header`` (another run's classes) or its rows are
            another run's.
    """
    try:
        rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))
    except FileNotFoundError:
        return []
    older = header[:-2]  # before the note and run columns
    own = (Path(model.path) / "predictions").resolve()
    if rows and rows[0] == older and path.parent.resolve() == own:
        return [[*row, "", model.run_id] for row in rows[1:]]
    if not rows or rows[0] != header:
        raise ConfigError(
            f"{path} holds predictions with other columns ({', '.join(rows[0] if rows else [])}),"
            " not this run's; predict into another folder or move that file away",
            parameters=("out",),
        )
    others = sorted({row[-1] for row in rows[1:] if not same_run(row[-1], model.run_id)})
    if others:
        raise ConfigError(
            f"{path} holds predictions of another run ({others[0]}; this one is "
            f"{model.run_id}); predict into another folder (by default each run's own "
            "RUN/predictions) or move it away",
            parameters=("out",),
        )
    return rows[1:]


def _rel(path: Path | None, base: Path) -> str:
    if path is None:
        return ""
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)
