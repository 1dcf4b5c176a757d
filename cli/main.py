"""``wsi-ssl``: argument parsing into the library's config dataclasses, nothing else."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from wsi_ssl import __version__
from wsi_ssl.cli import (
    check,
    curate,
    demo,
    embed,
    encoders,
    evaluate,
    mil,
    pretrain,
    search,
    serve,
    tile,
)
from wsi_ssl.cli.hints import REDO_ADVICE, RESUME_ADVICE, command_parser, in_command_words
from wsi_ssl.cli.report import json_summary, reports_here
from wsi_ssl.errors import IndexBusyError, StoreLockedError, WsiSslError
from wsi_ssl.outcome import JobInterrupted

COMMANDS = (tile, pretrain, curate, embed, encoders, search, mil, serve, demo, evaluate, check)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsi-ssl",
        description="Tile whole-slide images into Zarr stores and learn from them.",
    )
    parser.add_argument("--version", action="version", version=f"wsi-ssl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (0 ok, 1 some slides failed or something it
    writes is held by another job, 2 error)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    command = command_parser(parser, args)
    if unknown:  # the sub-command's usage, not the top level's (`wsi-ssl [-h] COMMAND ...`)
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.error_text = lambda err: in_command_words(err, command)  # per-slide lines use it too
    # tifffile logs what it finds wrong in a malformed file; the slide's own error says it once
    logging.getLogger("tifffile").setLevel(logging.ERROR)
    terminated: list[int] = []
    try:
        with _sigterm_stops_like_ctrl_c(terminated):
            return int(args.func(args))
    except (StoreLockedError, IndexBusyError) as err:  # held by another job: retry later
        print(f"wsi-ssl: error: {args.error_text(err)}", file=sys.stderr)
        return 1
    except WsiSslError as err:
        print(f"wsi-ssl: error: {args.error_text(err)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of stdout stopped early (`| head`): end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as the shell's own tools end
    except KeyboardInterrupt as err:
        code = 128 + (signal.SIGTERM if terminated else signal.SIGINT)
        if not reports_here():  # under torchrun: rank 0 alone reports
            return code
        if isinstance(err, JobInterrupted):  # a batch job: what it finished, as it reports
            as_json = getattr(args, "json", False)
            report = err.lines(args.error_text)
            done = {**json_summary(err.summary, args.error_text), **err.to_dict(summary=False)}
            print(json.dumps(done, indent=2) if as_json else "\n".join(report))
        sys.stdout.flush()  # what the command printed before the interrupt stays printed
        after = getattr(args, "after_interrupt", "nothing half-written is kept; re-run the command")
        if after == RESUME_ADVICE and getattr(args, "no_resume", False):
            after = REDO_ADVICE
        how = " (SIGTERM)" if terminated else ""
        ranks = " (torchrun: rank 0 reports for all ranks)" if "RANK" in os.environ else ""
        print(f"wsi-ssl: interrupted{how}{ranks}; {after}", file=sys.stderr)
        return code
    except Exception as err:  # not a library error: still one line, the traceback on request
        if os.environ.get("WSI_SSL_DEBUG"):
            raise
        print(
            f"wsi-ssl: error: {type(err).__name__}: {err} (unexpected; set WSI_SSL_DEBUG=1 for "
            "the traceback)",
            file=sys.stderr,
        )
        return 2


@contextlib.contextmanager
def _sigterm_stops_like_ctrl_c(terminated: list[int]) -> Iterator[None]:
    """SIGTERM (how batch schedulers stop a job) raises KeyboardInterrupt, so a job stops as
    cleanly as on Ctrl-C, with its report; ``terminated`` records that it came."""

    def stop(signum: int, frame: Any) -> None:
        terminated.append(signum)
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run() -> None:
    """The ``wsi-ssl`` command: :func:`main`, then exit without the interpreter's last garbage
    collections (what is left is freed with the process: ~0.08 s after a `tile`)."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
