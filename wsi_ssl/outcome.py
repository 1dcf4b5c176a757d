"""What happened to each slide of a batch job: one outcome type for tile, embed, export, predict.

A batch job never stops at the first bad slide: every slide gets a :class:`SlideOutcome`
(``complete``, ``skipped`` because it was already done, ``busy`` because another job holds it
or re-tiled it meanwhile, or ``failed`` with the error), and the job returns a summary built on :class:`BatchOutcome`,
whose ``lines()`` the CLI prints as they are and whose ``to_dict()`` is its ``--json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from wsi_ssl.errors import StoreLockedError, WsiSslError
from wsi_ssl.listing import first_few

__all__ = [
    "STATUSES",
    "BatchOutcome",
    "ErrorText",
    "JobInterrupted",
    "RemoteError",
    "SlideOutcome",
    "Status",
    "interrupt_report",
]

Status = Literal["complete", "skipped", "busy", "failed"]
STATUSES: tuple[Status, ...] = ("complete", "skipped", "busy", "failed")
ErrorText = Callable[[BaseException], str]
"""How a caller words a failed slide's error (the CLI: with the command's flags)."""


class RemoteError(WsiSslError):
    """An error raised in another process (a ``--devices`` process, a torchrun rank) by a
    slide or by that process's job, as it comes back: its message, the name of its type and
    its ``parameters``, so that the report line is the one-process line, flag hint included
    (the exception itself stays there: custom signatures do not unpickle)."""

    def __init__(self, message: str, type_name: str, parameters: Sequence[str] = ()) -> None:
        super().__init__(message, parameters=parameters)
        self.type_name = type_name

    @classmethod
    def of(cls, err: BaseException) -> RemoteError:
        """``err`` as it can cross to another process."""
        if isinstance(err, RemoteError):
            return err
        parameters = err.parameters if isinstance(err, WsiSslError) else ()
        return cls(str(err), type(err).__name__, parameters)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.type_name, self.parameters))


@dataclass
class SlideOutcome:
    """One slide's result: its status, tile count, time and, when it failed, the error.

    ``slide`` names the slide (its id, or its path before it has one); ``details`` holds what
    one kind of job adds (the file written, the predicted label, ...). The exception itself is
    kept privately (``exception``) for callers that re-raise (an outcome from another process
    holds a :class:`RemoteError` in its place); it is not part of ``to_dict()``.
    """

    slide: str
    status: Status
    n_tiles: int = 0
    seconds: float = 0.0
    error: str | None = None
    error_type: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    _exception: BaseException | None = field(default=None, repr=False, compare=False)

    @classmethod
    def failure(
        cls, slide: str, err: BaseException, seconds: float = 0.0, **details: Any
    ) -> SlideOutcome:
        """The outcome of a slide that raised ``err``: ``busy`` when another job holds it."""
        status: Status = "busy" if isinstance(err, StoreLockedError) else "failed"
        return cls(
            slide,
            status,
            seconds=seconds,
            error=str(err),
            error_type=err.type_name if isinstance(err, RemoteError) else type(err).__name__,
            details=dict(details),
            _exception=err,
        )

    @property
    def exception(self) -> BaseException | None:
        """The exception a failed slide raised (None otherwise)."""
        return self._exception

    def portable(self) -> SlideOutcome:
        """A copy fit to cross processes (pickled): the exception becomes a
        :class:`RemoteError` with its message, type name and parameters."""
        err = None if self._exception is None else RemoteError.of(self._exception)
        return dataclasses.replace(self, _exception=err)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: slide, status, n_tiles, seconds, error, error_type and the details."""
        return {
            "slide": self.slide,
            "status": self.status,
            "n_tiles": self.n_tiles,
            "seconds": round(self.seconds, 3),
            "error": self.error,
            "error_type": self.error_type,
            **self.details,
        }

    def message(self, error_text: ErrorText | None = None) -> str:
        """The error (worded by ``error_text``); "" when the slide did not fail."""
        if error_text is not None and self._exception is not None:
            return error_text(self._exception)
        return self.error or ""

    def line(self, error_text: ErrorText | None = None) -> str:
        """One report line (the slide, and its file name when ``details`` has one); a failure
        adds a second line with the error (worded by ``error_text``)."""
        name = self.details.get("name")
        slide = f"{self.slide} ({name})" if name and name != self.slide else self.slide
        text = f"{self.status:>8}  {self.n_tiles:>7} tiles  {self.seconds:6.1f}s  {slide}"
        if self.error is None:
            return text
        return f"{text}\n          {self.error_type}: {self.message(error_text)}"


@dataclass(kw_only=True)
class BatchOutcome:
    """The per-slide outcomes of a batch job; job summaries extend it with their totals."""

    outcomes: list[SlideOutcome] = field(default_factory=list)

    def with_status(self, status: Status) -> list[SlideOutcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def failed(self) -> list[SlideOutcome]:
        return self.with_status("failed")

    @property
    def busy(self) -> list[SlideOutcome]:
        return self.with_status("busy")

    @property
    def counts(self) -> dict[str, int]:
        """How many slides ended in each status (every status present, zeros included)."""
        return {s: len(self.with_status(s)) for s in STATUSES}

    @property
    def tiles_done(self) -> int:
        """Tiles of the slides this job completed (skipped slides not counted)."""
        return sum(o.n_tiles for o in self.with_status("complete"))

    @property
    def exit_code(self) -> int:
        """0 when every slide is done; 1 when one failed or was busy (another job held it:
        not done, so a batch script re-runs the job later)."""
        return 1 if self.failed or self.busy else 0

    def total_lines(self) -> list[str]:
        """The job's totals, after the slide lines; summaries override it."""
        return [self.count_line()]

    def lines(self, error_text: ErrorText | None = None) -> list[str]:
        """The report the CLI prints: one line per slide, then the totals."""
        return [o.line(error_text) for o in self.outcomes] + self.total_lines()

    def count_line(self, done: str = "done") -> str:
        """``N <done>, N already complete, N busy (...), N failed``."""
        c = self.counts
        return ", ".join(
            [
                f"{c['complete']} {done}",
                *self.skipped_counts(),
                f"{c['busy']} busy (another job is writing or re-tiled them; run again)",
                f"{c['failed']} failed",
            ]
        )

    def skipped_counts(self) -> list[str]:
        """How the count line names the skipped slides; a summary may tell kinds apart."""
        return [f"{self.counts['skipped']} already complete"]

    def outcomes_dict(self) -> dict[str, Any]:
        """The counts and the per-slide list, for a summary's ``to_dict()``."""
        return {**self.counts, "slides": [o.to_dict() for o in self.outcomes]}

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` output; summaries add their totals."""
        return self.outcomes_dict()


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C in a batch job, with what it had done by then: ``summary`` holds the outcomes of
    the slides finished before it, ``not_done`` names the others (the one being written is
    left to a re-run, which redoes or resumes it)."""

    def __init__(self, summary: BatchOutcome, not_done: Sequence[str]) -> None:
        super().__init__()
        self.summary = summary
        self.not_done = list(not_done)

    def lines(self, error_text: ErrorText | None = None) -> list[str]:
        """The report of the slides done, then how many were not."""
        line = f"not done: {len(self.not_done)} slide(s) when interrupted"
        if self.not_done:
            line += f" ({first_few(self.not_done)})"
        return [*self.summary.lines(error_text), line]

    def to_dict(self, summary: bool = True) -> dict[str, Any]:
        """The job's ``--json`` output so far, with ``interrupted`` and ``not_done`` (those
        alone without ``summary``)."""
        done = self.summary.to_dict() if summary else {}
        return {**done, "interrupted": True, "not_done": self.not_done}


@contextlib.contextmanager
def interrupt_report(summary: BatchOutcome, not_done: Callable[[], list[str]]) -> Iterator[None]:
    """Turn Ctrl-C in the block into :class:`JobInterrupted` with ``summary`` as it stands
    and the slides ``not_done()`` names."""
    try:
        yield
    except KeyboardInterrupt as err:
        if isinstance(err, JobInterrupted):
            raise
        raise JobInterrupted(summary, not_done()) from err
