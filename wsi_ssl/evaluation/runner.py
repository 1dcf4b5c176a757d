"""``evaluate_encoders``: every encoder on every task, same items, folds and resamples.

Each task is loaded once; its folds and bootstrap resamples are drawn once from the labels
and the seed; every encoder is then scored on them:

* patch, per-tile label and labelled-region tasks: k-NN and linear probes, balanced accuracy
  and macro-F1; tile folds and bootstrap resamples keep each slide's tiles together (a slide
  is never both trained and tested on; intervals resample slides, not tiles);
* slide tasks: ABMIL cross-validated by :func:`wsi_ssl.mil.train` with the task's folds
  written into the labels it is given, AUC of the out-of-fold probabilities;
* retrieval tasks: mMV@k and precision@k of a flat index per encoder
  (:mod:`wsi_ssl.evaluation.retrieval`), both with intervals resampled over the labelled
  slides (precision@k pools each resampled slide's query tiles).

Slide and retrieval intervals resample patients when the labels CSV has a ``patient`` column.
Before anything is embedded, every encoder is checked against the archive's tile size and
scale, and every retrieval task's ``mmv_k`` against its labels
(:mod:`wsi_ssl.evaluation.preflight`).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_ssl.errors import ConfigError, LabelsError
from wsi_ssl.evaluation.config import EncoderSpec, EvaluationConfig
from wsi_ssl.evaluation.features import (
    Given,
    Named,
    build_encoders,
    embed_archive,
    image_features,
    tile_features,
)
from wsi_ssl.evaluation.preflight import check_archives, check_encoders, check_labels
from wsi_ssl.evaluation.probes import (
    assign_folds,
    knn_predictions,
    linear_predictions,
    split_digest,
)
from wsi_ssl.evaluation.report import (
    EvaluationReport,
    Progress,
    Ranking,
    ResultRow,
    Scores,
    TaskSummary,
    keep_earlier,
    rank,
    workdir,
)
from wsi_ssl.evaluation.retrieval import patients_of, retrieval_scores
from wsi_ssl.evaluation.statistics import METRICS, Resamples, draw_resamples
from wsi_ssl.evaluation.tasks import (
    LabelledSlides,
    LabelledTiles,
    PatchTask,
    RegionLabelTask,
    RetrievalTask,
    SlideTask,
    Task,
    TileLabelTask,
    load_images,
    load_slide_labels,
    load_tile_labels,
    task_name,
)

__all__ = ["evaluate_encoders"]

Log = Callable[[str], None]


@dataclass(frozen=True)
class _TaskResult:
    summary: TaskSummary
    scores: list[Scores]
    resamples: Resamples


def _intervals(
    summary: TaskSummary, drawn: tuple[Resamples, str | None], say: Progress
) -> tuple[TaskSummary, Resamples]:
    """The task's summary, saying why when it is too small for intervals (``drawn``'s reason,
    in its notes and ``no_intervals``), said (before any encoder is scored); its resamples."""
    resamples, why = drawn
    if why is not None:
        note = f"no bootstrap intervals ({why})"
        summary = dataclasses.replace(summary, notes=(*summary.notes, note), no_intervals=why)
    say(summary.line())
    return summary, resamples


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "task"


def _probe_scores(
    summary: TaskSummary,
    y: np.ndarray,
    folds: np.ndarray,
    feats: dict[str, np.ndarray],
    ids: dict[str, str],
    config: EvaluationConfig,
    say: Progress,
) -> list[Scores]:
    methods: dict[str, dict[str, np.ndarray]] = {"knn": {}}
    if config.linear:
        methods["linear"] = {}
    for label, x in feats.items():
        methods["knn"][label] = knn_predictions(x, y, folds, config.knn_k)
        if config.linear:
            methods["linear"][label] = linear_predictions(x, y, folds, config.seed)
        say.on(summary.name, label)("scored (" + " and ".join(methods) + " probes)")
    return [
        Scores(summary, method, metric, ids, y, METRICS[metric], outputs)
        for method, outputs in methods.items()
        for metric in ("balanced_accuracy", "macro_f1")
    ]


def _patch(
    task: PatchTask, encoders: Named, config: EvaluationConfig, out: Path, say: Progress
) -> _TaskResult:
    images = load_images(task.source)
    folds, note = assign_folds(images.y, config.folds, config.seed)
    summary = TaskSummary(
        task_name(task),
        task.kind,
        str(task.source),
        len(images.y),
        images.classes,
        int(folds.max()) + 1,
        split_digest(folds),
        (note,) if note else (),
    )
    n, seed = config.n_bootstrap, config.seed
    drawn = draw_resamples(images.y, None, images.classes, "image", n, seed)
    summary, resamples = _intervals(summary, drawn, say)
    cache = out / "features" / _safe(summary.name)
    say.start()
    feats = {
        lab: image_features(
            e, images, cache, config.batch_size, say.bars, say.on(summary.name, lab)
        )
        for lab, e in encoders
    }
    ids = {lab: e.encoder_id for lab, e in encoders}
    scores = _probe_scores(summary, images.y, folds, feats, ids, config, say)
    return _TaskResult(summary, scores, resamples)


def _embed_all(
    task: TileLabelTask | RegionLabelTask | SlideTask | RetrievalTask,
    encoders: Named,
    slides: list[str],
    config: EvaluationConfig,
    enough: Callable[[dict[str, str]], object],
    given: Given,
    say: Progress,
) -> dict[str, str]:
    """Embed ``slides`` with every encoder: first every encoder is checked against every
    slide's tile size and scale (slides one cannot take are left out for all) and ``enough``
    checks what is left, so that nothing is embedded for a run that cannot finish.
    Returns ``{slide id: why}`` of the slides left out."""
    failed = check_encoders(task.root, encoders, slides, config, given)
    enough(failed)
    left = [s for s in slides if s not in failed]
    say.start()
    for label, enc in encoders:
        done = "those embedded before are skipped"
        say.on(task_name(task), label)(f"embedding {len(left)} slide(s) ({done})")
        failed |= embed_archive(task.root, enc, left, config, progress=say.bars)
    return failed


def _tiles(
    task: TileLabelTask | RegionLabelTask,
    encoders: Named,
    config: EvaluationConfig,
    given: Given,
    say: Progress,
) -> _TaskResult:
    if isinstance(task, RegionLabelTask):
        from wsi_ssl.evaluation.regions import load_region_labels

        tiles = load_region_labels(task, config.max_tiles_per_class, config.seed)
        source = str(task.regions)
    else:
        tiles = load_tile_labels(task, config.max_tiles_per_class, config.seed)
        source = f"{task.root}:labels/{task.labels}"

    def folds_of(gone: dict[str, str]) -> tuple[LabelledTiles, np.ndarray, str | None]:
        left = tiles.without(set(gone), task.root) if gone else tiles
        return left, *assign_folds(left.y, config.folds, config.seed, groups=left.groups)

    failed = _embed_all(task, encoders, list(tiles.rows), config, folds_of, given, say)
    tiles, folds, note = folds_of(failed)  # grouped by slide: never trained and tested on
    notes = [note] if note else []
    notes += [f"slide {sid} left out: {err}" for sid, err in failed.items()]
    summary = TaskSummary(
        task_name(task),
        task.kind,
        source,
        len(tiles.y),
        tiles.classes,
        int(folds.max()) + 1,
        split_digest(folds),
        tuple(notes),
    )
    # whole slides resampled: one slide's tiles resemble each other more than another's
    drawn = draw_resamples(
        tiles.y, tiles.groups, tiles.classes, "slide", config.n_bootstrap, config.seed
    )
    summary, resamples = _intervals(summary, drawn, say)
    feats = {lab: tile_features(task.root, e.encoder_id, tiles) for lab, e in encoders}
    ids = {lab: e.encoder_id for lab, e in encoders}
    scores = _probe_scores(summary, tiles.y, folds, feats, ids, config, say)
    return _TaskResult(summary, scores, resamples)


def _usable(
    task: SlideTask | RetrievalTask,
    encoders: Named,
    config: EvaluationConfig,
    given: Given,
    say: Progress,
) -> tuple[LabelledSlides, list[str]]:
    """The labelled slides every encoder could embed (embedding them), and notes."""
    root, labels = task.root, task.labels
    labelled = load_slide_labels(root, labels)

    def enough(failed: dict[str, str]) -> None:
        if len({r.label for r in labelled.table.rows if r.slide not in failed}) < 2:
            first = next(iter(failed.values()), "")
            raise LabelsError(  # the CLI words the first failure's setting as evaluate's flag
                labels,
                _too_few_classes(failed, len(labelled.slide_ids)),
                parameters=("check_mpp",) if "check_mpp=False" in first else (),
            )

    failed = _embed_all(task, encoders, labelled.slide_ids, config, enough, given, say)
    enough(failed)
    notes = labelled.left_out(root)
    notes += [f"slide {sid} left out: {err}" for sid, err in failed.items()]
    rows = [r for r in labelled.table.rows if r.slide not in failed]
    table = dataclasses.replace(labelled.table, rows=rows)
    return dataclasses.replace(labelled, table=table), notes


def _too_few_classes(failed: dict[str, str], n_slides: int) -> str:
    """Why fewer than two classes are left: the slides that failed and the first reason in
    full (with its advice)."""
    if not failed:
        return "fewer than two classes are left"
    first = next(iter(failed.values()))
    return (
        f"{len(failed)} of {n_slides} labelled slide(s) cannot be embedded, so fewer than two "
        f"classes are left; the first: {first}"
    )


def _slide_resamples(
    rows: Sequence[Any], y: np.ndarray, classes: Sequence[str], config: EvaluationConfig
) -> tuple[Resamples, str | None]:
    """Bootstrap resamples of labelled slides (whole patients when the CSV names them), or
    none and why (too few per class)."""
    patients = patients_of(rows)
    groups = None if patients is None else np.array([patients[r.slide] for r in rows])
    unit = "slide" if patients is None else "patient"
    return draw_resamples(y, groups, classes, unit, config.n_bootstrap, config.seed)


def _slide_folds(labelled: LabelledSlides, config: EvaluationConfig) -> np.ndarray:
    """The test fold of every labelled slide: the CSV's, or patient-grouped and stratified."""
    from wsi_ssl.mil import assign_folds as assign_patient_folds
    from wsi_ssl.mil.labels import sort_classes

    rows = labelled.table.rows
    if all(r.fold is not None for r in rows):
        values = sorted({int(r.fold) for r in rows if r.fold is not None})
        return np.array([values.index(int(r.fold or 0)) for r in rows], dtype=np.int64)
    classes = sort_classes(r.label for r in rows)
    y = [classes.index(r.label) for r in rows]
    patients = [r.patient or r.slide for r in rows]
    per_class = {
        c: len({p for p, yy in zip(patients, y, strict=True) if yy == i})
        for i, c in enumerate(classes)
    }
    rare, n_rare = min(per_class.items(), key=lambda kv: kv[1])
    if n_rare < 2:
        raise LabelsError(
            labelled.table.path,
            f"class {rare!r} has {n_rare} patient; cross-validation needs at least 2 per class",
        )
    return assign_patient_folds(y, patients, min(config.folds, n_rare), config.seed)


def _read_predictions(run: Path, classes: list[str]) -> dict[str, tuple[int, np.ndarray]]:
    """slide id -> (fold, class probabilities) from a MIL run's ``predictions.csv``."""
    with open(run / "predictions.csv", newline="") as f:
        return {
            row["slide_id"]: (
                int(row["fold"]),
                np.array([float(row[f"prob_{c}"]) for c in classes]),
            )
            for row in csv.DictReader(f)
        }


def _slide(
    task: SlideTask,
    encoders: Named,
    config: EvaluationConfig,
    out: Path,
    given: Given,
    say: Progress,
) -> _TaskResult:
    from wsi_ssl.mil import MILConfig, train
    from wsi_ssl.mil.labels import sort_classes

    labelled, notes = _usable(task, encoders, config, given, say)
    folds = _slide_folds(labelled, config)
    rows = [
        dataclasses.replace(r, fold=int(f)) for r, f in zip(labelled.table.rows, folds, strict=True)
    ]
    table = dataclasses.replace(
        labelled.table, rows=rows, columns=[*labelled.table.columns, "fold"]
    )
    classes = sort_classes(r.label for r in rows)
    y = np.array([classes.index(r.label) for r in rows], dtype=np.int64)
    name = task_name(task)
    summary = TaskSummary(
        name,
        task.kind,
        str(task.labels),
        len(rows),
        tuple(classes),
        int(folds.max()) + 1,
        split_digest(folds),
        tuple(notes),
    )
    summary, resamples = _intervals(summary, _slide_resamples(rows, y, classes, config), say)
    mil_config = MILConfig(
        folds=summary.folds,
        epochs=config.mil_epochs,
        val_fraction=0.0,
        seed=config.seed,
        device=config.device,
        workers=0,
        threads=config.threads,
    )
    outputs: dict[str, np.ndarray] = {}
    for label, enc in encoders:
        run = out / "mil" / _safe(name) / enc.encoder_id
        train(task.root, table, enc.encoder_id, run, mil_config, overwrite=True)
        got = _read_predictions(run, classes)
        used = np.array([got[r.slide][0] for r in rows])
        if split_digest(used) != summary.split:  # the run must have used the task's folds
            raise RuntimeError(f"{run}: MIL folds differ from the task's folds")
        outputs[label] = np.stack([got[r.slide][1] for r in rows])
        say.on(name, label)(f"scored (ABMIL, {summary.folds} folds)")
    ids = {lab: e.encoder_id for lab, e in encoders}
    scores = [Scores(summary, "abmil", "auc", ids, y, METRICS["auc"], outputs)]
    return _TaskResult(summary, scores, resamples)


def _retrieval(
    task: RetrievalTask, encoders: Named, config: EvaluationConfig, given: Given, say: Progress
) -> _TaskResult:
    from wsi_ssl.mil.labels import sort_classes

    labelled, notes = _usable(task, encoders, config, given, say)
    rows = labelled.table.rows
    classes = sort_classes(r.label for r in rows)
    y = np.array([classes.index(r.label) for r in rows], dtype=np.int64)
    summary, scores = retrieval_scores(task, [], config, labelled, notes)  # before any index
    summary, resamples = _intervals(summary, _slide_resamples(rows, y, classes, config), say)
    outputs: list[dict[str, np.ndarray]] = [{} for _ in scores]
    for label, enc in encoders:  # one at a time, to say as each is scored
        _, got = retrieval_scores(task, [(label, enc)], config, labelled, notes)
        for kept, one in zip(outputs, got, strict=True):
            kept.update(one.outputs)
        say.on(summary.name, label)("scored (" + " and ".join(s.metric for s in scores) + ")")
    ids = {lab: e.encoder_id for lab, e in encoders}
    scores = [
        dataclasses.replace(s, task=summary, encoder_ids=ids, outputs=o)
        for s, o in zip(scores, outputs, strict=True)
    ]
    return _TaskResult(summary, scores, resamples)


def _run_task(
    task: Task, encoders: Named, config: EvaluationConfig, out: Path, given: Given, say: Progress
) -> _TaskResult:
    if isinstance(task, PatchTask):
        return _patch(task, encoders, config, out, say)
    if isinstance(task, TileLabelTask | RegionLabelTask):
        return _tiles(task, encoders, config, given, say)
    if isinstance(task, SlideTask):
        return _slide(task, encoders, config, out, given, say)
    if isinstance(task, RetrievalTask):
        return _retrieval(task, encoders, config, given, say)
    raise ConfigError(f"{task!r}: not an evaluation task")


def evaluate_encoders(
    encoders: Sequence[EncoderSpec | str],
    tasks: Sequence[Task],
    out: str | Path | None = None,
    config: EvaluationConfig | None = None,
    *,
    log: Log | None = None,
    progress: bool = False,
    **options: Any,
) -> EvaluationReport:
    """Compare encoders on tasks: the same items, folds, seeds and resamples for each.

    Args:
        encoders: :class:`EncoderSpec` or spec strings (``NAME[,weights=FILE][,seed=N]``).
        tasks: :class:`PatchTask`, :class:`TileLabelTask`, :class:`RegionLabelTask`,
            :class:`SlideTask`, :class:`RetrievalTask`.
        out: folder for ``evaluation.json``, ``evaluation.png``, cached image features and
            MIL runs (None: nothing is written; MIL runs go to a temporary folder).
        config: settings; ``options`` (e.g. ``folds=3``) replace fields.
        log: called with a line at each step: the tasks and encoders, each task's items,
            classes and notes, each encoder embedding and scored on it, each task done;
            lines come as soon as they are known, once an encoder's weights file is read or
            the first embedding begins (those before are held until then: a run refused
            before any work, for its specs, weights files or labels, or a registered
            encoder's config that cannot take an archive's tiles, says nothing).
        progress: show progress bars (tqdm, on stderr) while images and slides are embedded.

    Raises:
        EncoderNotFoundError, WeightsNotFoundError: an encoder cannot be built (before any
            task runs).
        LabelsError: a task with one class, too few items per class, or labels that match no
            slide of its archive.
    """
    config = dataclasses.replace(config or EvaluationConfig(), **options)
    if not tasks:
        raise ConfigError("tasks is empty; give at least one task")
    names = [task_name(t) for t in tasks]
    if len(set(names)) < len(names):
        raise ConfigError(f"two tasks share a name ({names}); name them apart")
    say = Progress(log, progress)
    listed = ", ".join(f"{n} ({t.kind})" for n, t in zip(names, tasks, strict=True))
    say(f"evaluating {len(encoders)} encoder(s) on {len(tasks)} task(s): {listed}")
    check_labels(tasks, config)  # before any encoder is loaded, as are the specs and weights
    tiles = functools.partial(check_archives, tasks, config=config)  # before a file's load
    named, given = build_encoders(encoders, config, say.now, tiles)
    for label, e in named:
        say(f"encoder {label} ready" + (f" ({e.encoder_id})" if e.encoder_id != label else ""))
    check_archives(tasks, named, config, given)  # an encoder that cannot take the tiles
    rows: list[ResultRow] = []
    rankings: list[Ranking] = []
    summaries: list[TaskSummary] = []
    with workdir(out) as work:
        for task in tasks:
            result = _run_task(task, named, config, work, given, say)
            summaries.append(result.summary)
            for scores in result.scores:
                got, ranking = rank(scores, result.resamples, config.confidence)
                rows += got
                rankings.append(ranking)
            say(f"task {result.summary.name}: {len(named)} encoder(s) scored")
    report = EvaluationReport(
        tuple(rows),
        tuple(rankings),
        tuple(summaries),
        tuple((label, e.encoder_id) for label, e in named),
        config,
    )
    if out is None:
        return report
    from wsi_ssl.evaluation.plot import plot_results

    earlier = keep_earlier(Path(out))
    json_path = Path(out) / "evaluation.json"
    no_intervals = {t.name: t.no_intervals for t in summaries if t.no_intervals is not None}
    labels = [label for label, _ in named]
    plot_path = plot_results(rows, labels, Path(out) / "evaluation.png", no_intervals)
    report = dataclasses.replace(report, json_path=json_path, plot_path=plot_path, earlier=earlier)
    report.write_json(json_path)
    return report
