"""Child processes that end with the job that started them.

A job killed outright (SIGKILL, the OOM killer) runs no cleanup: the worker processes it
started (tile workers, embedding device processes) would go on, holding files, locks and
devices, and writing what nobody will read. :func:`die_with_parent` makes a child end with
its job: Linux's parent-death signal ends it at once when the process that started it ends,
and a watcher thread covers the rest (a forkserver, which waits for its workers; systems
without that signal).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int) -> None:
    """In a child process of job ``parent``: end as soon as ``parent`` does."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    threading.Thread(target=_exit_when_gone, args=(parent,), daemon=True).start()


def _exit_when_gone(parent: int, every: float = 0.5) -> None:
    """End this process as soon as process ``parent`` is gone (asked every ``every`` s)."""
    while True:
        try:
            os.kill(parent, 0)
        except (ProcessLookupError, PermissionError):  # gone (its pid another user's since)
            os._exit(1)
        time.sleep(every)
