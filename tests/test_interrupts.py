"""Cleanup under a second Ctrl-C, in a real process with real signals: the signals wait until
the cleanup is done, then stop the process as they would have (a quick second Ctrl-C left a
re-tile's half-written ``<id>.zarr.new`` behind)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = """
import sys, time
from pathlib import Path
from wsi_ssl.interrupts import interrupts_held

cleaned = Path(sys.argv[1])
try:
    with interrupts_held():
        print("cleaning", flush=True)
        for _ in range(100):  # the parent's signals come meanwhile
            time.sleep(0.01)
        cleaned.write_text("done")
except KeyboardInterrupt:
    print("stopped after the cleanup", flush=True)
    sys.exit(130)
print("not stopped", flush=True)
"""


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_cleanup_waits_for_it(stop: signal.Signals, tmp_path: Path) -> None:
    cleaned = tmp_path / "cleaned"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(cleaned)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "cleaning\n"
        proc.send_signal(stop)
        proc.send_signal(stop)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert cleaned.read_text() == "done"
    if stop == signal.SIGINT:  # raised again as Ctrl-C raises it: KeyboardInterrupt
        assert (proc.returncode, out) == (130, "stopped after the cleanup\n")
    else:  # delivered to its own handler (the default here: the process ends by it)
        assert proc.returncode == -signal.SIGTERM and out == ""


def test_outside_a_signal_the_block_just_runs(tmp_path: Path) -> None:
    from wsi_ssl.interrupts import interrupts_held

    before = signal.getsignal(signal.SIGINT)
    with interrupts_held():
        assert signal.getsignal(signal.SIGINT) is not before
    assert signal.getsignal(signal.SIGINT) is before
