"""Cleanup that a second Ctrl-C must not cut short.

A job stopped by Ctrl-C (or SIGTERM, which the CLI turns into the same) removes what it had
half-written. A user who presses Ctrl-C twice would interrupt that removal and leave the
half-written files behind; :func:`interrupts_held` makes such signals wait until the cleanup
is done, then delivers them as they came.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["interrupts_held"]

_STOPS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while the block runs; the first that came is raised again (to its
    own handler: KeyboardInterrupt for Ctrl-C) when the block ends. Outside the main thread,
    where Python delivers no signals, the block just runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        came.append(signum)

    previous = {stop: signal.signal(stop, hold) for stop in _STOPS}
    try:
        yield
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)
    if came:
        signal.raise_signal(came[0])
