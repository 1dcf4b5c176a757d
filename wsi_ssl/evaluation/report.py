"""The comparison table: typed rows, the ranking of each task, text and JSON; the lines an
evaluation says as it goes (:class:`Progress`) and the folder it writes into."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_ssl.evaluation.config import EvaluationConfig
from wsi_ssl.evaluation.statistics import (
    Estimate,
    Metric,
    Resamples,
    estimate,
    paired_difference,
)
from wsi_ssl.storage.atomic import atomic_write_text

__all__ = [
    "EvaluationReport",
    "Progress",
    "Ranking",
    "ResultRow",
    "Scores",
    "TaskSummary",
    "keep_earlier",
    "rank",
    "workdir",
]


@dataclass(frozen=True)
class ResultRow:
    """One encoder's score on one task, method and metric.

    ``split`` is a digest of the folds actually used: equal on every row of a task.
    ``rank`` is 1 for the best value of the task/method/metric and for every value level with
    it at the printed precision (see :func:`level`); other ties share a rank too.
    """

    task: str
    kind: str  # patch | tiles | slide | retrieval
    method: str  # knn | linear | abmil | search
    metric: str  # balanced_accuracy | macro_f1 | auc | mmv@k | precision@k
    encoder: str
    encoder_id: str
    value: float
    ci_low: float | None
    ci_high: float | None
    n: int
    split: str
    rank: int


@dataclass(frozen=True)
class Ranking:
    """Which encoder ranks first on a task/method/metric, and whether it is clearly first:
    ``exceeds_intervals`` is True when the paired bootstrap interval of its difference to the
    runner-up excludes 0 (None: no interval, i.e. a single encoder, no bootstrap resamples, or
    a task too small for intervals, ``no_interval`` saying why: then no verdict is given)."""

    task: str
    method: str
    metric: str
    first: str
    value: float
    runner_up: str | None
    difference: float | None
    difference_low: float | None
    difference_high: float | None
    exceeds_intervals: bool | None
    tied: tuple[str, ...] = ()
    """The other encoders level with the first at the printed precision (:func:`level`):
    they rank first too."""
    no_interval: str | None = None
    """Why the task has no intervals although resamples were asked for (too few slides)."""

    def sentence(self) -> str:
        head = f"{self.task} / {self.method} / {self.metric}: {self.first} ranks first"
        if self.runner_up is None or self.difference is None:
            return f"{head} ({self.value:.3f})"
        if self.tied or f"{abs(self.difference):.3f}" == "0.000":
            others = " and ".join(self.tied or (self.runner_up,))
            return f"{head} ({self.value:.3f}), tied with {others}"
        gap = f"{self.difference:+.3f} over {self.runner_up}"
        if self.no_interval is not None:
            return f"{head}, {gap}; no interval, so no verdict ({self.no_interval})"
        if self.exceeds_intervals is None:
            return f"{head}, {gap} (no interval for this metric)"
        verdict = "exceeds" if self.exceeds_intervals else "does not exceed"
        return (
            f"{head}, {gap}: the difference {verdict} the intervals "
            f"(paired bootstrap [{self.difference_low:+.3f}, {self.difference_high:+.3f}])"
        )


@dataclass(frozen=True)
class TaskSummary:
    """One task as evaluated: items, classes, folds and what was left out."""

    name: str
    kind: str
    source: str
    n: int
    classes: tuple[str, ...]
    folds: int
    split: str
    notes: tuple[str, ...] = ()
    no_intervals: str | None = None
    """Why the task has no bootstrap intervals although some were asked for (then its
    rows have none and no ranking claims a lead beyond them); also one of ``notes``."""

    def line(self) -> str:
        """``task NAME (KIND): N items, C classes, F folds; notes``, as the report prints it."""
        return (
            f"task {self.name} ({self.kind}): {self.n} items, {len(self.classes)} classes"
            + (f", {self.folds} folds" if self.folds else "")
            + "".join(f"; {n}" for n in self.notes)
        )


class Progress:
    """What an evaluation says as it goes: ``log`` gets a line at each step (None: no lines)
    and ``bars`` shows progress bars (tqdm, on stderr) while images and slides are embedded.

    Lines said before :meth:`start` (the tasks, the encoders, the first task's summary) are
    held until the work begins, an encoder's weights read or the first embedding, so that a
    run refused before any work (an unknown encoder, labels of one class) says nothing but its
    error.
    """

    def __init__(self, log: Callable[[str], None] | None = None, bars: bool = False) -> None:
        self.log = log
        self.bars = bars
        self._held: list[str] | None = []

    def __call__(self, line: str) -> None:
        if self._held is not None:
            self._held.append(line)
        elif self.log is not None:
            self.log(line)

    def start(self) -> None:
        """The work begins: say the lines held until now, and each line from now on at once."""
        held, self._held = self._held or [], None
        for line in held:
            self(line)

    def now(self, line: str) -> None:
        """Work that can take long begins (a large encoder's load): say ``line`` at once, after
        the lines held until now."""
        self.start()
        self(line)

    def on(self, task: str, encoder: str) -> Callable[[str], None]:
        """Say lines about ``encoder`` on ``task``: ``task TASK: ENCODER: line``."""
        return lambda line: self(f"task {task}: {encoder}: {line}")


@dataclass(frozen=True)
class Scores:
    """Per-encoder outputs on one task/method/metric, ready to rank.

    ``outputs`` maps an encoder label to its per-item output (predicted classes, class
    probabilities, or a retrieval item's summed precision and count) scored by ``score``
    against ``y``; intervals resample the items (whole slides or patients where the task
    groups them).
    """

    task: TaskSummary
    method: str
    metric: str
    encoder_ids: dict[str, str]
    y: np.ndarray
    score: Metric
    outputs: dict[str, np.ndarray]


def level(a: float, b: float) -> bool:
    """True when ``a`` and ``b`` are tied as the report prints them (3 decimals): their
    difference prints as 0.000, or they print alike."""
    if not (np.isfinite(a) and np.isfinite(b)):
        return False
    return f"{abs(a - b):.3f}" == "0.000" or f"{a:.3f}" == f"{b:.3f}"


def _ranks(values: list[float]) -> list[int]:
    """Competition ranks, the values level with the best (:func:`level`) all first."""
    best = max(values)
    return [1 if level(v, best) else 1 + sum(other > v for other in values) for v in values]


def rank(
    scores: Scores, resamples: Resamples, confidence: float
) -> tuple[list[ResultRow], Ranking]:
    """The rows of every encoder (with intervals when there are resamples: none for a task
    too small for them, see ``draw_resamples``) and the ranking."""
    labels = list(scores.encoder_ids)
    est: dict[str, Estimate] = {
        label: estimate(scores.score, scores.y, scores.outputs[label], resamples, confidence)
        for label in labels
    }
    values = [est[label].value for label in labels]
    finite = [v if np.isfinite(v) else -np.inf for v in values]
    ranks = _ranks(finite)
    rows = [
        ResultRow(
            scores.task.name,
            scores.task.kind,
            scores.method,
            scores.metric,
            label,
            scores.encoder_ids[label],
            est[label].value,
            est[label].low,
            est[label].high,
            scores.task.n,
            scores.task.split,
            r,
        )
        for label, r in zip(labels, ranks, strict=True)
    ]
    order = sorted(range(len(labels)), key=lambda i: (ranks[i], -finite[i]))  # first: the best
    first = labels[order[0]]
    second = labels[order[1]] if len(order) > 1 else None
    diff = None
    if second is not None:
        first_out, second_out = scores.outputs[first], scores.outputs[second]
        diff = paired_difference(
            scores.score, scores.y, first_out, second_out, resamples, confidence
        )
    exceeds = None
    if diff is not None and diff.low is not None and diff.high is not None:
        exceeds = bool(diff.low > 0 or diff.high < 0)
    ranking = Ranking(
        scores.task.name,
        scores.method,
        scores.metric,
        first,
        est[first].value,
        second,
        diff.value if diff else None,
        diff.low if diff else None,
        diff.high if diff else None,
        exceeds,
        tuple(labels[i] for i in order[1:] if ranks[i] == 1),
        scores.task.no_intervals,
    )
    return rows, ranking


def _fmt(row: ResultRow, missing: bool) -> str:
    """``value [low, high]``; ``value [n/a]`` when ``missing`` (the task is too small)."""
    if row.ci_low is None or row.ci_high is None:
        return f"{row.value:.3f}" + (" [n/a]" if missing else "")
    return f"{row.value:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}]"


@dataclass(frozen=True)
class EvaluationReport:
    """Encoders x tasks: the table (``rows``), the winners (``rankings``) and what was used."""

    rows: tuple[ResultRow, ...]
    rankings: tuple[Ranking, ...]
    tasks: tuple[TaskSummary, ...]
    encoders: tuple[tuple[str, str], ...]  # (label, encoder_id)
    config: EvaluationConfig
    json_path: Path | None = None
    plot_path: Path | None = None
    earlier: Path | None = None  # where the evaluation this one replaced in ``out`` was kept

    def table(self) -> str:
        """One line per task/method/metric, one column per encoder: value [CI low, high]."""
        labels = [label for label, _ in self.encoders]
        groups: dict[tuple[str, str, str], dict[str, ResultRow]] = {}
        for row in self.rows:
            groups.setdefault((row.task, row.method, row.metric), {})[row.encoder] = row
        missing = {t.name for t in self.tasks if t.no_intervals is not None}
        head = ["task", "method", "metric", *labels]
        body = [
            [
                *key,
                *(
                    _fmt(g[label], key[0] in missing) + ("*" if g[label].rank == 1 else "")
                    for label in labels
                ),
            ]
            for key, g in groups.items()
        ]
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *body]
        ]
        legend = "* ranks first; [ ] bootstrap interval"
        if missing:
            legend += " ([n/a]: none, the task's note says why)"
        return "\n".join([*lines, legend])

    def lines(self) -> list[str]:
        """The report ``wsi-ssl evaluate`` prints: tasks, table, rankings, files."""
        out = [t.line() for t in self.tasks]
        out += [self.table(), *(r.sentence() for r in self.rankings)]
        out += [f"wrote {p}" for p in (self.json_path, self.plot_path) if p is not None]
        if self.earlier is not None:
            out.append(f"kept the earlier evaluation of this folder as {self.earlier}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "encoders": [{"label": lab, "encoder_id": eid} for lab, eid in self.encoders],
            "tasks": [asdict(t) for t in self.tasks],
            "rows": [asdict(r) for r in self.rows],
            "rankings": [asdict(r) for r in self.rankings],
        }

    def write_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON (temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2, default=str))


def keep_earlier(out: Path) -> Path | None:
    """Rename an earlier ``evaluation.json`` (and its plot) in ``out`` to
    ``evaluation-<its UTC time>.json`` so a new evaluation does not replace it; returns the
    new name (None: there was none)."""
    json_path = out / "evaluation.json"
    if not json_path.is_file():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(json_path.stat().st_mtime))
    stem, n = f"evaluation-{stamp}", 1
    while (out / f"{stem}.json").exists():
        n += 1
        stem = f"evaluation-{stamp}-{n}"
    if (out / "evaluation.png").is_file():
        os.replace(out / "evaluation.png", out / f"{stem}.png")
    os.replace(json_path, out / f"{stem}.json")
    return out / f"{stem}.json"


@contextlib.contextmanager
def workdir(out: str | Path | None) -> Iterator[Path]:
    """``out``, made if needed (a run that fails before writing anything into a folder it
    made removes it again), or a temporary folder for None."""
    if out is not None:
        path = Path(out)
        made = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        try:
            yield path
        except BaseException:
            if made and not any(path.iterdir()):
                path.rmdir()
            raise
    else:
        with tempfile.TemporaryDirectory(prefix="wsi-ssl-evaluate-") as tmp:
            yield Path(tmp)
