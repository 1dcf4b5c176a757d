"""A batch job's report: the summary (or its JSON) on stdout, one ``wsi-ssl: error:`` line per
slide that failed or was busy on stderr, and the job's exit code (1 when any slide is not done)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from wsi_ssl.outcome import BatchOutcome, SlideOutcome


def print_report(
    summary: BatchOutcome,
    args: argparse.Namespace,
    note: Callable[[SlideOutcome], str] = lambda outcome: "",
) -> int:
    """Print ``summary`` as ``args`` asks (``--json``); ``note`` adds to a slide's error line."""
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print("\n".join(summary.lines(args.error_text)))
    for outcome in summary.busy + summary.failed:
        print(f"wsi-ssl: error: {outcome.message(args.error_text)}{note(outcome)}", file=sys.stderr)
    return summary.exit_code
