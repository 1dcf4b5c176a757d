"""A batch job's report: the summary (or its JSON) on stdout, one ``wsi-ssl: error:`` line per
slide that failed or was busy on stderr, and the job's exit code (1 when any slide is not done)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from wsi_ssl.outcome import BatchOutcome, ErrorText, SlideOutcome


def print_report(
    summary: BatchOutcome,
    args: argparse.Namespace,
    note: Callable[[SlideOutcome], str] = lambda outcome: "",
) -> int:
    """Print ``summary`` as ``args`` asks (``--json``); ``note`` adds to a slide's error line."""
    if args.json:
        print(json.dumps(json_summary(summary, args.error_text), indent=2))
    else:
        print("\n".join(summary.lines(args.error_text)))
    for outcome in summary.busy + summary.failed:
        print(f"wsi-ssl: error: {outcome.message(args.error_text)}{note(outcome)}", file=sys.stderr)
    return summary.exit_code


def json_summary(summary: BatchOutcome, error_text: ErrorText) -> dict[str, Any]:
    """``summary.to_dict()`` with each slide's ``error`` worded as its stderr line words it
    (the command's flags, not the Python API's names)."""
    data = summary.to_dict()
    worded = {(o.slide, o.error): o.message(error_text) for o in summary.outcomes if o.error}
    for key in ("slides", "errors"):  # every listing of the failed slides
        for entry in data.get(key, []):
            entry["error"] = worded.get((entry.get("slide"), entry.get("error")), entry["error"])
    return data


def reports_here() -> bool:
    """Whether this process prints its job's report: every process but a torchrun rank other
    than 0 (rank 0 reports for all)."""
    return os.environ.get("RANK", "0") == "0"
