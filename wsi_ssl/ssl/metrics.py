"""The run's metrics log (``metrics.jsonl``, one JSON object per logged step) and loss plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from wsi_ssl.storage.atomic import atomic_write_text, atomic_write_with

__all__ = ["MetricsLog", "plot_loss"]


class MetricsLog:
    """Append-only JSONL log; on resume, rows after the resumed step are dropped first."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
        return rows

    def truncate_after(self, step: int) -> float:
        """Keep only rows with ``step <= step`` (a resumed run rewrites what follows); return
        the training seconds of the last row kept (0 when none), where a resumed run's
        ``seconds`` go on from."""
        if not self.path.is_file():
            return 0.0
        keep = [r for r in self.rows() if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        seconds = keep[-1].get("seconds") if keep else None
        return float(seconds) if isinstance(seconds, int | float) else 0.0

    def append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def plot_loss(rows: list[dict[str, Any]], out: str | Path, title: str = "pretraining") -> Path:
    """Loss (and learning rate) against step, saved as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [r for r in rows if isinstance(r.get("loss"), float) and math.isfinite(r["loss"])]
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = [r["step"] for r in rows]
    marker = "o" if len(rows) == 1 else None  # one logged step is a point, not a line
    ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", marker=marker, label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="tab:blue")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if rows and "lr" in rows[0]:
        ax2 = ax.twinx()
        ax2.plot(steps, [r["lr"] for r in rows], color="tab:orange", alpha=0.6, label="lr")
        ax2.set_ylabel("learning rate", color="tab:orange")
    fig.tight_layout()
    atomic_write_with(out, fig.savefig)
    return out
